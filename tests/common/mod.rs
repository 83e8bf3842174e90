//! A cluster of demo KV nodes on 127.0.0.1 for the integration tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use raftwire::Config;
use raftwire::Transport;
use raftwire::demo;
use raftwire::kv::KvNode;

pub const LOOPBACK: ([u8; 4], u16) = ([127, 0, 0, 1], 0);

pub fn loopback() -> SocketAddr {
    LOOPBACK.into()
}

pub fn net_config(transport: Transport) -> Config {
    Config::builder().transport(transport).build().unwrap()
}

/// Every transport compiled into this build; cluster tests run on each.
pub fn transports() -> Vec<Transport> {
    vec![
        #[cfg(feature = "grpc")]
        Transport::Grpc,
    ]
}

pub struct Cluster {
    pub nodes: BTreeMap<u64, KvNode>,
    pub transport: Transport,
    pub config: Config,
}

impl Cluster {
    /// Starts `n` nodes, initializes node 1 and makes all of them voters.
    pub async fn voters(transport: Transport, n: u64) -> Cluster {
        Self::voters_with(net_config(transport), n).await
    }

    pub async fn voters_with(config: Config, n: u64) -> Cluster {
        let mut nodes = BTreeMap::new();
        for id in 1..=n {
            nodes.insert(
                id,
                KvNode::start(id, demo::raft_config(), config.clone(), loopback())
                    .await
                    .unwrap(),
            );
        }
        let cluster = Cluster {
            nodes,
            transport: config.transport(),
            config,
        };
        let n1 = &cluster.nodes[&1];
        demo::initialize_alone(n1).await.unwrap();
        for id in 2..=n {
            n1.raft
                .add_learner(id, cluster.nodes[&id].node(), true)
                .await
                .unwrap();
        }
        if n > 1 {
            n1.raft
                .change_membership((1..=n).collect::<BTreeSet<_>>(), false)
                .await
                .unwrap();
        }
        cluster
    }

    pub fn node(&self, id: u64) -> &KvNode {
        &self.nodes[&id]
    }

    /// Waits until node `on` sees a leader other than `not`; returns it.
    pub async fn await_leader(&self, on: u64, not: Option<u64>) -> u64 {
        let m = self.nodes[&on]
            .raft
            .wait(Some(Duration::from_secs(10)))
            .metrics(
                |m| m.current_leader.is_some() && m.current_leader != not,
                "leader",
            )
            .await
            .unwrap();
        m.current_leader.unwrap()
    }

    pub async fn await_applied(&self, id: u64, index: u64) {
        demo::await_applied(&self.nodes[&id], index).await.unwrap();
    }

    pub async fn shutdown(self) {
        for (_, mut n) in self.nodes {
            n.stop().await.unwrap();
        }
    }
}

/// Declares one `#[tokio::test]` per transport for each listed scenario `async fn(Transport)`.
#[macro_export]
macro_rules! on_every_transport {
    ($($scenario:ident),* $(,)?) => {
        #[cfg(feature = "grpc")]
        mod grpc {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(raftwire::Transport::Grpc).await
                }
            )*
        }
    };
}
