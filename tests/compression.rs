//! Compression configured per cluster (cargo feature `compression`), over real sockets on every
//! transport: large frames travel compressed and arrive intact, and a peer whose setting
//! differs is refused at connect with an error that says why.
#![cfg(all(feature = "app", feature = "compression"))]

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use common::Cluster;
use common::Net;
use common::learner_via_snapshot;
use common::loopback;
use common::snapshot_and_purge;
use metrics_exporter_prometheus::PrometheusBuilder;
use metrics_exporter_prometheus::PrometheusHandle;
use openraft::RaftNetworkFactory;
use openraft::errors::RPCError;
use openraft::impls::BasicNode;
use openraft::network::RPCOption;
use openraft::network::RaftNetworkV2;
use raftwire::Compression;
use raftwire::Config;
use raftwire::Transport;
use raftwire::demo;
use raftwire::kv::KvConfig;
use raftwire::kv::KvNode;
use raftwire::kv::KvSnapshotData;

on_every_transport!(
    large_writes_and_snapshots_travel_compressed,
    mismatched_compression_is_refused_at_connect,
);

/// The process's metrics recorder: bytes each transport sent, per peer.
fn recorder() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::set_global_recorder(recorder).expect("no other recorder in this test binary");
        handle
    })
}

/// Bytes every node of this process sent on `transport` so far (all peers).
fn bytes_sent(transport: Transport) -> u64 {
    let label = format!("transport=\"{}\"", transport.name());
    recorder()
        .render()
        .lines()
        .filter(|l| l.starts_with("raftwire_bytes_sent_total{") && l.contains(&label))
        .map(|l| l.rsplit_once(' ').unwrap().1.parse::<f64>().unwrap() as u64)
        .sum()
}

/// 200 compressible 16 KiB values replicated to two followers, then a snapshot of them sent to
/// a newcomer: everything arrives intact, in a fraction of the bytes it would take
/// uncompressed.
async fn large_writes_and_snapshots_travel_compressed(transport: Transport) {
    let before = bytes_sent(transport);
    let net = Net::with(transport, |b| b.compression(Compression::zstd()));
    let mut c = Cluster::voters_with(net, 3).await;
    let upto = snapshot_and_purge(&c, 200, 16 << 10).await;
    let (n4, _) = learner_via_snapshot(&c, upto).await;
    let data = c.node(1).sm.dump();
    assert_eq!(data.len(), 200);
    assert_eq!(n4.sm.dump(), data);
    for id in [2, 3] {
        assert_eq!(c.node(id).sm.dump(), data, "node {id}");
    }
    // Uncompressed: 3.2 MiB of values to each of two followers, and again in the snapshot.
    let payload = 3 * 200 * (16 << 10) as u64;
    let sent = bytes_sent(transport) - before;
    assert!(
        sent < payload / 8,
        "{sent} bytes sent for {payload} bytes of values: not compressed"
    );
    c.nodes.insert(4, n4);
    c.shutdown().await;
}

/// Node 2 with one setting, node 1 calling it with the other, both ways round: the call fails
/// as unreachable, naming the cause, and node 2 keeps serving peers that agree with it.
async fn mismatched_compression_is_refused_at_connect(transport: Transport) {
    let net = Net::new(transport);
    let config = |id: u64, compression: Compression| -> Config {
        Config::builder()
            .transport(transport)
            .tls(net.ca.tls_config(id).unwrap())
            .connect_timeout(Duration::from_secs(2))
            .compression(compression)
            .build()
            .unwrap()
    };
    for (server, client) in [
        (Compression::zstd(), Compression::Off),
        (Compression::Off, Compression::zstd()),
    ] {
        let mut node = KvNode::start(2, demo::raft_config(), config(2, server), loopback())
            .await
            .unwrap();
        let peer = BasicNode::new(node.addr().to_string());
        let vote = |from: u64| openraft::raft::VoteRequest::<KvConfig> {
            vote: openraft::impls::Vote::new(0, from),
            last_log_id: None,
            leadership_transfer: false,
        };
        let mut factory =
            raftwire::NetworkFactory::<KvConfig, KvSnapshotData>::new(1, config(1, client)).unwrap();
        let err = factory
            .new_client(2, &peer)
            .await
            .vote(vote(1), RPCOption::new(Duration::from_secs(3)))
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, RPCError::Unreachable(_)) && text.contains("compression"),
            "server {server:?}, client {client:?}: {err:?}"
        );
        // A peer with the server's own setting is served.
        let mut agreeing =
            raftwire::NetworkFactory::<KvConfig, KvSnapshotData>::new(3, config(3, server)).unwrap();
        agreeing
            .new_client(2, &peer)
            .await
            .vote(vote(3), RPCOption::new(Duration::from_secs(3)))
            .await
            .unwrap();
        node.stop().await.unwrap();
    }
}

#[test]
fn zstd_levels_outside_zstd_s_range_are_refused() {
    let net = Net::new(common::transports()[0]);
    for level in [0, 20, -1000] {
        let err = Config::builder()
            .tls(net.ca.tls_config(1).unwrap())
            .compression(Compression::Zstd {
                level,
                min_size: 4096,
            })
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("compression"), "{level}: {err}");
    }
}
