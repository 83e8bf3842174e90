//! A cluster of demo KV nodes on 127.0.0.1 for the integration tests.
#![allow(dead_code)]

pub mod logs;
#[cfg(feature = "grpc")]
pub mod procs;
pub mod raw;
pub mod relay;

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use raftwire::CertificateAuthority;
use raftwire::Config;
use raftwire::ConfigBuilder;
use raftwire::Transport;
use raftwire::demo;
use raftwire::kv::KvNode;

pub fn loopback() -> SocketAddr {
    ([127, 0, 0, 1], 0).into()
}

/// Every transport compiled into this build; cluster tests run on each.
pub fn transports() -> Vec<Transport> {
    vec![
        #[cfg(feature = "grpc")]
        Transport::Grpc,
        #[cfg(feature = "quic")]
        Transport::Quic,
        #[cfg(feature = "tcp")]
        Transport::Tcp,
    ]
}

type Tweak = Arc<dyn Fn(ConfigBuilder) -> ConfigBuilder + Send + Sync>;

/// How every node of a test cluster is configured: one transport, one CA, mutual TLS.
#[derive(Clone)]
pub struct Net {
    pub transport: Transport,
    pub ca: Arc<CertificateAuthority>,
    tweak: Tweak,
}

impl Net {
    pub fn new(transport: Transport) -> Net {
        Self::with(transport, |b| b)
    }

    /// Like `new`, with extra settings applied to every node's config.
    pub fn with(
        transport: Transport,
        tweak: impl Fn(ConfigBuilder) -> ConfigBuilder + Send + Sync + 'static,
    ) -> Net {
        let ca = CertificateAuthority::generate("raftwire test CA").unwrap();
        Net {
            transport,
            ca: Arc::new(ca),
            tweak: Arc::new(tweak),
        }
    }

    /// Node `id`'s config: its own certificate from the cluster CA.
    pub fn config(&self, id: u64) -> Config {
        let builder = Config::builder()
            .transport(self.transport)
            .tls(self.ca.tls_config(id).unwrap());
        (self.tweak)(builder).build().unwrap()
    }
}

pub struct Cluster {
    pub nodes: BTreeMap<u64, KvNode>,
    pub net: Net,
}

impl Cluster {
    /// Starts `n` nodes, initializes node 1 and makes all of them voters.
    pub async fn voters(transport: Transport, n: u64) -> Cluster {
        Self::voters_with(Net::new(transport), n).await
    }

    pub async fn voters_with(net: Net, n: u64) -> Cluster {
        let mut nodes = BTreeMap::new();
        for id in 1..=n {
            nodes.insert(
                id,
                KvNode::start(id, demo::raft_config(), net.config(id), loopback())
                    .await
                    .unwrap(),
            );
        }
        let cluster = Cluster { nodes, net };
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

/// Writes `n` copies of `value` through `node` (keys `k000000`…), `concurrency` at a time.
pub async fn write_many(node: &KvNode, n: u64, value: Bytes, concurrency: usize) {
    let mut writes = futures::stream::iter(0..n)
        .map(|i| node.write(format!("k{i:06}"), value.clone()))
        .buffer_unordered(concurrency);
    while let Some(r) = writes.next().await {
        r.unwrap();
    }
}

/// The last log index `node` applied.
pub fn applied(node: &KvNode) -> u64 {
    node.sm.last_applied().map_or(0, |l| l.index)
}

/// Writes `n` values of `size` bytes through node 1, then snapshots and purges the log of every
/// node, so whichever node leads must send a snapshot to a newcomer.
pub async fn snapshot_and_purge(c: &Cluster, n: u64, size: usize) -> u64 {
    write_many(c.node(1), n, Bytes::from(vec![7u8; size]), 16).await;
    let upto = applied(c.node(1));
    for node in c.nodes.values() {
        demo::await_applied(node, upto).await.unwrap();
        node.raft.trigger().snapshot().await.unwrap();
        let wait = node.raft.wait(Some(Duration::from_secs(10)));
        wait.metrics(|m| m.snapshot.is_some_and(|s| s.index >= upto), "snapshot")
            .await
            .unwrap();
        node.raft.trigger().purge_log(upto).await.unwrap();
        wait.metrics(|m| m.purged.is_some_and(|p| p.index >= upto), "purge")
            .await
            .unwrap();
    }
    upto
}

/// Starts node 4, adds it as a learner through the current leader and waits until it has
/// applied `upto`, which it must have got from exactly one snapshot (the log was purged).
/// Returns the learner and the leader that added it.
pub async fn learner_via_snapshot(c: &Cluster, upto: u64) -> (KvNode, u64) {
    let n4 = KvNode::start(4, demo::raft_config(), c.net.config(4), loopback())
        .await
        .unwrap();
    let leader = c.await_leader(1, None).await;
    c.node(leader).raft.add_learner(4, n4.node(), true).await.unwrap();
    demo::await_applied(&n4, upto).await.unwrap();
    assert_eq!(
        n4.sm.snapshots_installed(),
        1,
        "learner caught up without a snapshot"
    );
    (n4, leader)
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
        #[cfg(feature = "quic")]
        mod quic {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(raftwire::Transport::Quic).await
                }
            )*
        }
        #[cfg(feature = "tcp")]
        mod tcp {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(raftwire::Transport::Tcp).await
                }
            )*
        }
    };
}

/// CRC32C (Castagnoli) computed bit by bit from its definition: an independent check of the
/// library's arithmetic for tests that build snapshot trailers by hand.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// The rustls client config of a raw peer holding node `id`'s certificate from `ca`
/// (TLS 1.3, one ALPN protocol): for tests that speak the wire protocol by hand.
pub fn raw_client_crypto(ca: &CertificateAuthority, id: u64, alpn: &[u8]) -> rustls::ClientConfig {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca.cert_pem().as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let (chain, key) = raw_identity(ca, id);
    let mut crypto = rustls::ClientConfig::builder_with_provider(raw_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    crypto.alpn_protocols = vec![alpn.to_vec()];
    crypto
}

/// The rustls server config of a raw peer holding node `id`'s certificate from `ca`, asking
/// no client certificate.
pub fn raw_server_crypto(ca: &CertificateAuthority, id: u64, alpn: &[u8]) -> rustls::ServerConfig {
    let (chain, key) = raw_identity(ca, id);
    let mut crypto = rustls::ServerConfig::builder_with_provider(raw_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    crypto.alpn_protocols = vec![alpn.to_vec()];
    crypto
}

type RawIdentity = (
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
);

fn raw_identity(ca: &CertificateAuthority, id: u64) -> RawIdentity {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::pem::PemObject;
    let cert = ca.issue(id, &[], raftwire::Validity::default()).unwrap();
    let chain = CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).unwrap();
    (chain, key)
}

fn raw_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}
