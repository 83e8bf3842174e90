//! The TCP transport's own behaviour over real sockets: connections reused across exchanges,
//! hostile frames from a certified peer, and one TCP port shared with gRPC by ALPN. (Every
//! transport-neutral scenario runs on TCP too, in the other test files.)
#![cfg(all(feature = "app", feature = "tcp"))]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::Cluster;
use common::Net;
use common::loopback;
use openraft::RaftNetworkFactory;
use openraft::impls::BasicNode;
use openraft::network::RPCOption;
use openraft::network::RaftNetworkV2;
use raftwire::Transport;
use raftwire::demo;
use raftwire::kv::KvConfig;
use raftwire::kv::KvNode;
use raftwire::kv::KvSnapshotData;
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWriteExt;

const ALPN: &[u8] = b"raftwire-tcp/1";

/// An 18-byte frame header: magic, version 1, `kind`, no flags, `len`, request id 0.
fn header(kind: u8, len: u32) -> Vec<u8> {
    let mut h = b"RW\x01".to_vec();
    h.push(kind);
    h.extend_from_slice(&[0, 0]);
    h.extend_from_slice(&len.to_be_bytes());
    h.extend_from_slice(&[0; 8]);
    h
}

/// The End frame that closes one side of an exchange (and greets a new connection).
fn end() -> Vec<u8> {
    header(14, 0)
}

/// A raw TLS connection to node `target` at `addr` as node `id`, past the server's greeting.
async fn raw(
    net: &Net,
    id: u64,
    addr: SocketAddr,
    target: u64,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let crypto = common::raw_client_crypto(&net.ca, id, ALPN);
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(raftwire::node_dns_name(target)).unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(crypto))
        .connect(name, tcp)
        .await
        .unwrap();
    let mut greeting = [0u8; 18];
    tls.read_exact(&mut greeting).await.unwrap();
    assert_eq!(greeting.to_vec(), end(), "the server greets with an End frame");
    tls
}

/// Everything the server sends until it closes the connection (bounded by 5 s).
async fn answer(tls: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> Vec<u8> {
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "the server neither answered nor closed");
    got
}

/// The error code of the error frame (kind 15) at the start of `bytes`.
fn error_code(bytes: &[u8]) -> u16 {
    assert!(bytes.len() >= 20, "an error frame: {bytes:02x?}");
    assert_eq!(bytes[3], 15, "an error frame: {bytes:02x?}");
    u16::from_be_bytes([bytes[18], bytes[19]])
}

/// A vote from node `from` that changes nothing at the receiver: term 0, below any real term.
fn stale_vote(from: u64) -> openraft::raft::VoteRequest<KvConfig> {
    openraft::raft::VoteRequest {
        vote: openraft::impls::Vote::new(0, from),
        last_log_id: None,
        leadership_transfer: false,
    }
}

/// Heartbeats, votes and writes reuse a few connections per peer instead of one per call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_reused_across_exchanges() {
    let cluster = Cluster::voters(Transport::Tcp, 3).await;
    let leader = cluster.await_leader(1, None).await;
    let n = cluster.node(leader);
    for i in 0..300 {
        n.raft
            .client_write(raftwire::kv::KvRequest::Set {
                key: format!("k{i}"),
                value: bytes::Bytes::from_static(b"v"),
            })
            .await
            .unwrap();
    }
    // A second of heartbeats: about 20 per follower at the demo's 50 ms interval.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stats = n.network.stats();
    assert!(stats.append_requests > 40, "{stats:?}");
    // Per follower: replication, heartbeats, a vote or two, the odd extra while one is busy.
    assert!(
        stats.connects <= 2 * 6,
        "{} connections for {} append requests: not reused ({stats:?})",
        stats.connects,
        stats.append_requests
    );
    cluster.shutdown().await;
}

/// A certified peer sending garbage, an oversized vote or a truncated exchange gets an error
/// frame (or a closed connection) and nothing else; the node keeps serving everyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_frames_are_refused_and_the_node_serves_on() {
    let net = Net::with(Transport::Tcp, |b| b.max_control_message_size(1024));
    let mut node = KvNode::start(2, demo::raft_config(), net.config(2), loopback())
        .await
        .unwrap();
    demo::initialize_alone(&node).await.unwrap();
    let addr = node.addr();

    // Noise where a frame header belongs: BadRequest (1), then the connection closes.
    let mut tls = raw(&net, 1, addr, 2).await;
    tls.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    tls.flush().await.unwrap();
    assert_eq!(error_code(&answer(&mut tls).await), 1);

    // A vote announcing 60 MiB: TooLarge (2) from the header, before any body arrives.
    let mut tls = raw(&net, 1, addr, 2).await;
    tls.write_all(&header(1, 60 << 20)).await.unwrap();
    tls.flush().await.unwrap();
    assert_eq!(error_code(&answer(&mut tls).await), 2);

    // An exchange that starts with a reply kind: UnexpectedKind (4).
    let mut tls = raw(&net, 1, addr, 2).await;
    let mut frame = header(10, 0);
    frame.extend_from_slice(&end());
    tls.write_all(&frame).await.unwrap();
    tls.flush().await.unwrap();
    let got = answer(&mut tls).await;
    assert!(matches!(error_code(&got), 1 | 4), "{got:02x?}");

    // A frame cut short by the connection closing: nothing to answer, nothing breaks.
    let mut tls = raw(&net, 1, addr, 2).await;
    let mut cut = header(6, 1000);
    cut.extend_from_slice(&[0; 10]);
    tls.write_all(&cut).await.unwrap();
    tls.shutdown().await.unwrap();
    drop(tls);

    // The node still answers a real client.
    let mut factory = raftwire::NetworkFactory::<KvConfig, KvSnapshotData>::new(1, net.config(1)).unwrap();
    let mut client = factory.new_client(2, &BasicNode::new(addr.to_string())).await;
    client
        .vote(stale_vote(1), RPCOption::new(Duration::from_secs(3)))
        .await
        .unwrap();
    node.stop().await.unwrap();
}

/// gRPC and TCP on one TCP port, told apart by ALPN: clients of either transport reach the
/// node there, with the same identity checks, and a client preferring TCP uses it.
#[cfg(feature = "grpc")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_and_tcp_share_one_port() {
    let net = Net::with(Transport::Tcp, |b| {
        b.transports([Transport::Tcp, Transport::Grpc])
            .fallback_backoff(Duration::from_millis(300))
    });
    let mut node = KvNode::start(2, demo::raft_config(), net.config(2), loopback())
        .await
        .unwrap();
    demo::initialize_alone(&node).await.unwrap();
    let server = node.addr();
    for transport in [Transport::Tcp, Transport::Grpc] {
        let config = raftwire::Config::builder()
            .transport(transport)
            .tls(net.ca.tls_config(1).unwrap())
            .build()
            .unwrap();
        let mut factory = raftwire::NetworkFactory::<KvConfig, KvSnapshotData>::new(1, config).unwrap();
        let mut client = factory.new_client(2, &BasicNode::new(server.to_string())).await;
        client
            .vote(stale_vote(1), RPCOption::new(Duration::from_secs(3)))
            .await
            .unwrap_or_else(|e| panic!("{transport}: {e}"));
        // Node 1 may not speak for node 3, on either transport.
        let forged = client
            .vote(stale_vote(3), RPCOption::new(Duration::from_secs(3)))
            .await
            .unwrap_err();
        assert!(forged.to_string().contains("node 1"), "{transport}: {forged}");
        assert_eq!(factory.stats().peer_transports.get(&2), Some(&transport));
    }
    node.stop().await.unwrap();
}

/// Server-side TCP connections established on `port` (this process hosts the server).
fn established_on(port: u16) -> usize {
    let text = std::fs::read_to_string("/proc/self/net/tcp").unwrap_or_default();
    text.lines()
        .skip(1)
        .filter(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let local = cols.get(1).and_then(|l| l.rsplit(':').next());
            let port_here = local.and_then(|p| u16::from_str_radix(p, 16).ok());
            port_here == Some(port) && cols.get(3) == Some(&"01")
        })
        .count()
}

/// A burst of concurrent calls dials a connection per call in flight; once it is over, at
/// most `max_idle_connections` stay open toward the peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_beyond_the_limit_are_closed() {
    let net = Net::with(Transport::Tcp, |b| b.max_idle_connections(2));
    let mut node = KvNode::start(2, demo::raft_config(), net.config(2), loopback())
        .await
        .unwrap();
    demo::initialize_alone(&node).await.unwrap();
    let addr = node.addr();
    let mut factory = raftwire::NetworkFactory::<KvConfig, KvSnapshotData>::new(1, net.config(1)).unwrap();
    let mut clients = Vec::new();
    for _ in 0..12 {
        clients.push(factory.new_client(2, &BasicNode::new(addr.to_string())).await);
    }
    let calls = clients
        .iter_mut()
        .map(|client| client.vote(stale_vote(1), RPCOption::new(Duration::from_secs(5))));
    for outcome in futures::future::join_all(calls).await {
        outcome.unwrap();
    }
    let connects = factory.stats().connects;
    assert!(
        connects > 2,
        "the burst needed more than 2 connections: {connects}"
    );
    // The ones beyond the limit were closed; the server notices each close at once.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while established_on(addr.port()) > 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        established_on(addr.port()) <= 2,
        "{} connections still open after a burst of {connects}",
        established_on(addr.port())
    );
    drop(clients);
    node.stop().await.unwrap();
}

/// A pooled connection the server closed meanwhile (here: the peer restarted on the same
/// address) is not used: the next call dials afresh and succeeds at its first attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_the_server_closed_are_not_reused() {
    let net = Net::new(Transport::Tcp);
    let mut node = KvNode::start(2, demo::raft_config(), net.config(2), loopback())
        .await
        .unwrap();
    demo::initialize_alone(&node).await.unwrap();
    let addr = node.addr();
    let mut factory = raftwire::NetworkFactory::<KvConfig, KvSnapshotData>::new(1, net.config(1)).unwrap();
    let mut client = factory.new_client(2, &BasicNode::new(addr.to_string())).await;
    client
        .vote(stale_vote(1), RPCOption::new(Duration::from_secs(3)))
        .await
        .unwrap();
    node.stop().await.unwrap();
    let mut node = KvNode::start(2, demo::raft_config(), net.config(2), addr)
        .await
        .unwrap();
    demo::initialize_alone(&node).await.unwrap();
    // Let the old connection's close arrive.
    tokio::time::sleep(Duration::from_millis(100)).await;
    client
        .vote(stale_vote(1), RPCOption::new(Duration::from_secs(3)))
        .await
        .unwrap_or_else(|e| panic!("the first call after the restart failed: {e}"));
    node.stop().await.unwrap();
}
