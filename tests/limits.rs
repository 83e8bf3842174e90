//! Nothing a peer does makes a node hold more than its configured limits: half-open
//! handshakes, stream floods, oversized control messages and departed peers are each driven
//! past a (deliberately small) limit while a cluster keeps committing, and afterwards the
//! process's sockets and the runtime's tasks are back to where they were before the flood.
//!
//! The tests of this file run one at a time (see `serial`), so the VmRSS figure each prints
//! is its own. Figures observed on the development machine are noted next to each print.
#![cfg(all(feature = "app", feature = "grpc", feature = "quic"))]

mod common;

use std::collections::BTreeSet;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use bytes::Bytes;
use common::Cluster;
use common::Net;
use common::loopback;
use raftwire::Transport;
use raftwire::demo;
use raftwire::kv::KvNode;

/// The tests of this file measure memory and sockets of the whole process: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// This process's resident set size in KiB (`VmRSS` of `/proc/self/status`).
fn vm_rss_kib() -> i64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Open sockets of this process and live tasks of the test's runtime (which the servers run
/// on): what a flood may raise for a while and must give back. (Only sockets: the next test's
/// runtime, waiting for `SERIAL`, opens its own epoll and event descriptors meanwhile.)
#[derive(Debug, Clone, Copy)]
struct Usage {
    sockets: usize,
    tasks: usize,
}

/// What each open file descriptor of this process refers to (`socket:[inode]` and the like).
fn fd_targets() -> Vec<String> {
    let mut all: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|t| t.display().to_string())
        .collect();
    all.sort();
    all
}

impl Usage {
    fn now() -> Usage {
        Usage {
            sockets: fd_targets().iter().filter(|t| t.starts_with("socket:")).count(),
            tasks: tokio::runtime::Handle::current().metrics().num_alive_tasks(),
        }
    }

    /// Waits (up to 5 s) until sockets and tasks are back at this baseline or below.
    async fn assert_returned(self, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let now = Usage::now();
            if now.sockets <= self.sockets && now.tasks <= self.tasks {
                println!("{what}: sockets and tasks back to {now:?} (baseline {self:?})");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: 5 s after the flood, {now:?}; baseline {self:?}; open: {:?}",
                fd_targets()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Lets a freshly initialized node finish starting up (openraft spawns some of its tasks
/// only once the node leads), so that a baseline taken next is its steady state.
async fn settle(node: &KvNode) {
    node.write("settled".to_string(), Bytes::from_static(b"v"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
}

/// Rows of `/proc/self/net/{tcp,tcp6}` that are established (01) or listening (0A), as
/// (local port, remote port).
fn tcp_sockets() -> Vec<(u16, u16)> {
    let port = |addr: &str| {
        addr.rsplit(':')
            .next()
            .and_then(|p| u16::from_str_radix(p, 16).ok())
            .unwrap_or(0)
    };
    let mut out = Vec::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/self/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() > 3 && (cols[3] == "01" || cols[3] == "0A") {
                out.push((port(cols[1]), port(cols[2])));
            }
        }
    }
    out
}

/// Live TCP sockets bound to `port` whose peer is one of `peers` (a server's side of those
/// clients' connections).
fn sockets_on_from(port: u16, peers: &HashSet<u16>) -> usize {
    tcp_sockets()
        .iter()
        .filter(|(local, remote)| *local == port && peers.contains(remote))
        .count()
}

/// Live TCP sockets connected to one of `ports` from elsewhere (a client's side).
fn sockets_toward(ports: &HashSet<u16>) -> usize {
    tcp_sockets()
        .iter()
        .filter(|(local, remote)| ports.contains(remote) && !ports.contains(local))
        .count()
}

/// Keeps writing to `leader` until stopped; counts committed writes.
struct Writer {
    committed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    fn start(leader: Arc<KvNode>) -> Writer {
        let committed = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (committed.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut i = 0u64;
            while !s.load(Ordering::SeqCst) {
                let write = leader.write(format!("w{i}"), Bytes::from_static(b"v"));
                if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), write).await {
                    c.fetch_add(1, Ordering::SeqCst);
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        Writer {
            committed,
            stop,
            task,
        }
    }

    fn committed(&self) -> u64 {
        self.committed.load(Ordering::SeqCst)
    }

    /// Asserts that writes commit within `within`.
    async fn assert_committing(&self, what: &str, within: Duration) {
        let before = self.committed();
        let deadline = Instant::now() + within;
        while self.committed() < before + 5 {
            assert!(
                Instant::now() < deadline,
                "{what}: the cluster stopped committing ({} writes in {within:?})",
                self.committed() - before
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap();
        self.committed.load(Ordering::SeqCst)
    }
}

/// A 3-node cluster led by node 1, with every node shared for the writer.
async fn cluster(net: Net) -> (Arc<KvNode>, KvNode, KvNode) {
    let cluster = Cluster::voters_with(net, 3).await;
    let mut nodes = cluster.nodes;
    let n1 = nodes.remove(&1).unwrap();
    let n2 = nodes.remove(&2).unwrap();
    let n3 = nodes.remove(&3).unwrap();
    (Arc::new(n1), n2, n3)
}

async fn stop_all(leader: Arc<KvNode>, mut others: Vec<KvNode>) {
    let mut leader = Arc::into_inner(leader).expect("the writer let go of the leader");
    leader.stop().await.unwrap();
    for n in &mut others {
        n.stop().await.unwrap();
    }
}

/// The rustls client config of a raw peer holding node 9's certificate from the cluster CA.
fn node9_crypto(net: &Net, alpn: &[u8]) -> rustls::ClientConfig {
    common::raw_client_crypto(&net.ca, 9, alpn)
}

/// A raw QUIC connection to `addr` (node `node`) as node 9.
async fn quic_node9(net: &Net, addr: SocketAddr, node: u64) -> (quinn::Endpoint, quinn::Connection) {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(node9_crypto(net, b"raftwire/1")).unwrap();
    let endpoint = quinn::Endpoint::client(loopback()).unwrap();
    let conn = endpoint
        .connect_with(
            quinn::ClientConfig::new(Arc::new(crypto)),
            addr,
            &raftwire::node_dns_name(node),
        )
        .unwrap();
    let conn = tokio::time::timeout(Duration::from_secs(3), conn)
        .await
        .expect("QUIC handshake timed out")
        .expect("node 9's certificate is accepted");
    (endpoint, conn)
}

/// A raw HTTP/2 connection to `addr` (node `node`) over mutual TLS as node 9.
async fn h2_node9(net: &Net, addr: SocketAddr, node: u64) -> h2::client::SendRequest<Bytes> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(node9_crypto(net, b"h2")));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(raftwire::node_dns_name(node)).unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

/// A gRPC request head for `method` of raftwire's service.
fn grpc_request(node: u64, method: &str) -> http::Request<()> {
    http::Request::builder()
        .method("POST")
        .uri(format!(
            "https://{}/raftwire.v1.Raft/{method}",
            raftwire::node_dns_name(node)
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}

// ---------------------------------------------------------------------------------------
// (a) half-open TLS handshakes on gRPC
// ---------------------------------------------------------------------------------------

/// 2,000 TCP connections to node 2's gRPC port that never start TLS, held open while the
/// cluster commits. At most `max_concurrent_handshakes` (16 here) are held by the server;
/// the rest are closed on arrival, and the 16 go when the handshake timeout (1 s) runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_half_open_handshakes_are_bounded_and_released() {
    let _serial = SERIAL.lock().await;
    let net = Net::with(Transport::Grpc, |b| {
        b.connect_timeout(Duration::from_secs(1))
            .max_concurrent_handshakes(16)
    });
    let (leader, n2, n3) = cluster(net).await;
    let addr = n2.addr();
    let port = addr.port();
    let writer = Writer::start(leader.clone());
    writer.assert_committing("before", Duration::from_secs(5)).await;
    let rss = vm_rss_kib();
    let baseline = Usage::now();

    // The server's side of the attacker's connections, sampled as they pile in.
    let mut held = Vec::with_capacity(2000);
    let mut attackers = HashSet::new();
    let mut most = 0;
    for i in 0..2000 {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        attackers.insert(tcp.local_addr().unwrap().port());
        held.push(tcp);
        if i % 50 == 49 {
            most = most.max(sockets_on_from(port, &attackers));
        }
    }
    let rss_during = vm_rss_kib();
    writer
        .assert_committing("during the flood", Duration::from_secs(5))
        .await;
    // Once the accept loop has drained the kernel's backlog (connections it has not accepted
    // yet count above), at most the 16 handshake slots' connections are open.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let settled = sockets_on_from(port, &attackers);
    assert!(
        settled <= 16,
        "the server holds {settled} of the attacker's connections (16 handshake slots)"
    );

    // Past the handshake timeout every half-open connection is gone on the server's side,
    // although the clients still hold theirs.
    let deadline = Instant::now() + Duration::from_secs(3);
    while sockets_on_from(port, &attackers) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        sockets_on_from(port, &attackers),
        0,
        "the server holds none of the attacker's 2,000 connections"
    );
    writer.assert_committing("after", Duration::from_secs(5)).await;
    drop(held);
    baseline.assert_returned("grpc half-open handshakes").await;
    // Observed: VmRSS +2-4 MiB while 2,000 connections were held (mostly the client side's).
    println!(
        "grpc half-open handshakes: at most {most} attacker connections on the server's port while connecting (backlog included), {settled} after; VmRSS {rss} KiB -> {rss_during} KiB (delta {} KiB)",
        rss_during - rss
    );
    let committed = writer.stop().await;
    assert!(committed > 0);
    stop_all(leader, vec![n2, n3]).await;
}

// ---------------------------------------------------------------------------------------
// (b) abandoned QUIC handshakes
// ---------------------------------------------------------------------------------------

/// The destination connection id of a long-header QUIC packet.
fn long_header_dcid(packet: &[u8]) -> Option<&[u8]> {
    if packet.len() < 6 || packet[0] & 0x80 == 0 {
        return None;
    }
    let len = packet[5] as usize;
    packet.get(6..6 + len)
}

/// 500 real QUIC Initials (captured from a quinn client aimed at a black hole) replayed to
/// node 2 from a socket that never answers. The server runs at most 16 handshakes (its
/// `max_concurrent_handshakes`), each until the 1 s handshake timeout; every other Initial
/// gets a stateless Retry. The cluster commits throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_abandoned_handshakes_are_bounded() {
    let _serial = SERIAL.lock().await;
    let net = Net::with(Transport::Quic, |b| {
        b.connect_timeout(Duration::from_secs(1))
            .max_concurrent_handshakes(16)
    });
    let (leader, n2, n3) = cluster(net.clone()).await;
    let addr = n2.addr();
    let writer = Writer::start(leader.clone());
    writer.assert_committing("before", Duration::from_secs(5)).await;

    // Capture 500 Initials with distinct connection ids.
    let hole = tokio::net::UdpSocket::bind(loopback()).await.unwrap();
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(node9_crypto(&net, b"raftwire/1")).unwrap();
    let client_config = quinn::ClientConfig::new(Arc::new(crypto));
    let client = quinn::Endpoint::client(loopback()).unwrap();
    let connecting: Vec<_> = (0..500)
        .map(|_| {
            client
                .connect_with(
                    client_config.clone(),
                    hole.local_addr().unwrap(),
                    "node-2.raftwire",
                )
                .unwrap()
        })
        .collect();
    let mut initials = Vec::new();
    let mut seen = HashSet::new();
    let mut buf = vec![0u8; 2048];
    let deadline = Instant::now() + Duration::from_secs(5);
    while initials.len() < 500 {
        let left = deadline.saturating_duration_since(Instant::now());
        let (n, _) = tokio::time::timeout(left, hole.recv_from(&mut buf))
            .await
            .expect("the client sent fewer than 500 Initials")
            .unwrap();
        let packet = buf[..n].to_vec();
        let fresh = long_header_dcid(&packet).is_some_and(|dcid| seen.insert(dcid.to_vec()));
        if fresh {
            initials.push(packet);
        }
    }
    drop(connecting);
    client.close(quinn::VarInt::from_u32(0), b"");
    client.wait_idle().await;
    drop(client);
    // Measured from here: the capturing client's own state is gone.
    let rss = vm_rss_kib();
    let baseline = Usage::now();

    // Replay them all, then never answer.
    let ghost = tokio::net::UdpSocket::bind(loopback()).await.unwrap();
    // Paced in bursts: UDP drops what a socket buffer cannot hold, on either side.
    for burst in initials.chunks(20) {
        for packet in burst {
            ghost.send_to(packet, addr).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let replayed = Instant::now();
    // What the server sends back: a Retry (long header, type 3) costs it nothing; any other
    // long-header packet belongs to a handshake it runs.
    let mut retried = HashSet::new();
    let mut handshaking = HashSet::new();
    let until = Instant::now() + Duration::from_secs(5);
    while retried.len() + handshaking.len() < 500 {
        let left = until.saturating_duration_since(Instant::now());
        let Ok(Ok((n, _))) = tokio::time::timeout(left, ghost.recv_from(&mut buf)).await else {
            break;
        };
        let packet = &buf[..n];
        let Some(dcid) = long_header_dcid(packet) else {
            continue;
        };
        if packet[0] & 0x30 == 0x30 {
            retried.insert(dcid.to_vec());
        } else {
            handshaking.insert(dcid.to_vec());
        }
    }
    let rss_during = vm_rss_kib();
    writer
        .assert_committing("during the flood", Duration::from_secs(5))
        .await;
    assert!(
        handshaking.len() <= 16,
        "the server ran {} handshakes at once (limit 16)",
        handshaking.len()
    );
    // Beyond the 16 handshake slots the server answers only with Retries. How many of them
    // arrive within the window depends on the machine's load (seen: 195 to 484 of 500 on a
    // 2-core machine sharing a core with a fuzzer), so only the mechanism is asserted here.
    assert!(
        retried.len() >= 100,
        "only {} of 500 Initials were answered with a Retry ({} handshakes)",
        retried.len(),
        handshaking.len()
    );

    // Once the abandoned handshakes time out (1 s after the replay), a certified peer gets
    // in again.
    tokio::time::sleep(Duration::from_millis(1200).saturating_sub(replayed.elapsed())).await;
    let (endpoint, conn) = quic_node9(&net, addr, 2).await;
    conn.close(quinn::VarInt::from_u32(0), b"done");
    endpoint.wait_idle().await;
    drop((endpoint, conn));
    writer.assert_committing("after", Duration::from_secs(5)).await;
    drop(ghost);
    baseline.assert_returned("quic abandoned handshakes").await;
    // Observed: VmRSS delta of 1-3 MiB for 500 Initials (16 handshake states, 484 Retries).
    println!(
        "quic abandoned handshakes: {} handshakes run, {} retried; VmRSS {rss} KiB -> {rss_during} KiB (delta {} KiB)",
        handshaking.len(),
        retried.len(),
        rss_during - rss
    );
    writer.stop().await;
    stop_all(leader, vec![n2, n3]).await;
}

// ---------------------------------------------------------------------------------------
// (c) stream floods from a certified peer
// ---------------------------------------------------------------------------------------

/// Node 9 (a valid certificate, not a member) tries to open 10,000 streams on one QUIC
/// connection to node 2 and sends one byte on each, so the server keeps every stream it
/// accepts waiting for a frame. Exactly `max_concurrent_streams` (32 here) get in; the
/// cluster commits throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_stream_flood_is_capped() {
    let _serial = SERIAL.lock().await;
    let net = Net::with(Transport::Quic, |b| b.max_concurrent_streams(32));
    let (leader, n2, n3) = cluster(net.clone()).await;
    let writer = Writer::start(leader.clone());
    writer.assert_committing("before", Duration::from_secs(5)).await;
    let rss = vm_rss_kib();
    let baseline = Usage::now();
    let (endpoint, conn) = quic_node9(&net, n2.addr(), 2).await;
    let opened = Arc::new(AtomicU64::new(0));
    let (o, c) = (opened.clone(), conn.clone());
    let flood = tokio::spawn(async move {
        let mut held = Vec::new();
        for _ in 0..10_000 {
            let Ok((mut send, recv)) = c.open_bi().await else {
                break;
            };
            if send.write_all(b"R").await.is_err() {
                break;
            }
            held.push((send, recv));
            o.fetch_add(1, Ordering::SeqCst);
        }
        held
    });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    writer
        .assert_committing("during the flood", Duration::from_secs(5))
        .await;
    let rss_during = vm_rss_kib();
    assert_eq!(
        opened.load(Ordering::SeqCst),
        32,
        "streams the attacker got open at once"
    );
    flood.abort();
    conn.close(quinn::VarInt::from_u32(0), b"done");
    drop((endpoint, conn));
    baseline.assert_returned("quic stream flood").await;
    // Observed: VmRSS delta under 1 MiB.
    println!(
        "quic stream flood: 32 of 10000 streams opened; VmRSS {rss} KiB -> {rss_during} KiB (delta {} KiB)",
        rss_during - rss
    );
    writer.stop().await;
    stop_all(leader, vec![n2, n3]).await;
}

/// Node 9 opens replication streams (StreamAppend calls that never send a message) on one
/// HTTP/2 connection to node 2, 10,000 attempts. The server announces
/// `max_concurrent_streams` (32 here) in its SETTINGS and answers exactly that many; the
/// client can open no more. The cluster commits throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_stream_flood_is_capped() {
    let _serial = SERIAL.lock().await;
    let net = Net::with(Transport::Grpc, |b| b.max_concurrent_streams(32));
    let (leader, n2, n3) = cluster(net.clone()).await;
    let writer = Writer::start(leader.clone());
    writer.assert_committing("before", Duration::from_secs(5)).await;
    let rss = vm_rss_kib();
    let baseline = Usage::now();
    let mut send = h2_node9(&net, n2.addr(), 2).await;
    // The server's SETTINGS frame follows the handshake.
    send = send.ready().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    while send.current_max_send_streams() == usize::MAX && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        send.current_max_send_streams(),
        32,
        "the server's SETTINGS_MAX_CONCURRENT_STREAMS"
    );
    // h2, like any compliant client, holds back a request past the server's limit (and
    // takes no further one until it is sent): `ready` stalls while 32 streams are open.
    // (How many it sent in all varies: streams the server is done with free their slots.)
    let mut held = Vec::new();
    let mut answered = Vec::new();
    for _ in 0..10_000 {
        // Not a clone: only the handle that sent the held-back request waits for it.
        let Ok(Ok(ready)) = tokio::time::timeout(Duration::from_millis(300), send.ready()).await else {
            break;
        };
        send = ready;
        let (response, stream) = send.send_request(grpc_request(2, "StreamAppend"), false).unwrap();
        held.push(stream);
        answered.push(tokio::spawn(response));
    }
    let attempted = held.len();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let heads = answered.iter().filter(|r| r.is_finished()).count();
    writer
        .assert_committing("during the flood", Duration::from_secs(5))
        .await;
    let rss_during = vm_rss_kib();
    assert_eq!(heads, 32, "the server answers at most 32 streams at once");
    for r in answered {
        r.abort();
    }
    drop(held);
    baseline.assert_returned("grpc stream flood").await;
    // Observed: VmRSS delta about 18 MiB in a debug build (32 open replication sessions on
    // the server plus the test's own h2 client and 33 tasks), independent of the 10,000.
    println!(
        "grpc stream flood: {heads} streams answered, {attempted} of 10000 sent; VmRSS {rss} KiB -> {rss_during} KiB (delta {} KiB)",
        rss_during - rss
    );
    writer.stop().await;
    stop_all(leader, vec![n2, n3]).await;
}

// ---------------------------------------------------------------------------------------
// (d) oversized control messages
// ---------------------------------------------------------------------------------------

const SIXTY_MIB: u32 = 60 << 20;

/// A certified peer announces a 60 MiB vote on QUIC and sends 1 KiB of it: the server
/// answers TooLarge from the header alone and stops the stream, so the rest cannot even be
/// sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_oversized_vote_is_refused_from_its_header() {
    let _serial = SERIAL.lock().await;
    let net = Net::new(Transport::Quic);
    let node = KvNode::start(1, demo::raft_config(), net.config(1), loopback())
        .await
        .unwrap();
    demo::initialize_alone(&node).await.unwrap();
    settle(&node).await;
    let rss = vm_rss_kib();
    let baseline = Usage::now();
    let (endpoint, conn) = quic_node9(&net, node.addr(), 1).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let mut head = Vec::new();
    head.extend_from_slice(b"RW");
    head.push(1); // version
    head.push(1); // kind: vote
    head.extend_from_slice(&0u16.to_be_bytes());
    head.extend_from_slice(&SIXTY_MIB.to_be_bytes());
    head.extend_from_slice(&7u64.to_be_bytes());
    head.extend_from_slice(&[0u8; 1024]);
    send.write_all(&head).await.unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(3), recv.read_to_end(64 << 10))
        .await
        .expect("the server answers before the body arrives")
        .unwrap();
    assert!(reply.len() > 20, "an error frame: {reply:02x?}");
    assert_eq!(reply[3], 15, "an error frame");
    assert_eq!(u16::from_be_bytes([reply[18], reply[19]]), 2, "code TooLarge");
    let message = String::from_utf8_lossy(&reply[20..]).to_string();
    assert!(
        message.contains("65536"),
        "the refusal names the control limit: {message}"
    );
    // The stream is stopped: the rest of the 60 MiB is refused at the sender.
    let chunk = vec![0u8; 1 << 20];
    let mut refused = false;
    for _ in 0..60 {
        if tokio::time::timeout(Duration::from_secs(3), send.write_all(&chunk))
            .await
            .expect("a stopped stream fails writes, never blocks them")
            .is_err()
        {
            refused = true;
            break;
        }
    }
    assert!(refused, "the server stopped the stream");
    let rss_after = vm_rss_kib();
    // Observed: VmRSS delta about 1 MiB (the sender's own 1 MiB chunk), never 60 MiB.
    println!(
        "quic 60 MiB vote: refused ({message}); VmRSS {rss} KiB -> {rss_after} KiB (delta {} KiB)",
        rss_after - rss
    );
    assert!(rss_after - rss < 30 << 10, "the server did not buffer the vote");
    conn.close(quinn::VarInt::from_u32(0), b"done");
    drop((send, recv, conn, endpoint));
    baseline.assert_returned("quic 60 MiB vote").await;
    let mut node = node;
    node.stop().await.unwrap();
}

/// The same on gRPC: a Vote call whose message prefix announces 60 MiB is answered
/// `ResourceExhausted` while only 1 KiB of it was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_oversized_vote_is_refused_from_its_prefix() {
    let _serial = SERIAL.lock().await;
    let net = Net::new(Transport::Grpc);
    let node = KvNode::start(1, demo::raft_config(), net.config(1), loopback())
        .await
        .unwrap();
    demo::initialize_alone(&node).await.unwrap();
    settle(&node).await;
    let rss = vm_rss_kib();
    let baseline = Usage::now();
    let send = h2_node9(&net, node.addr(), 1).await;
    let mut send = send.ready().await.unwrap();
    let (response, mut stream) = send.send_request(grpc_request(1, "Vote"), false).unwrap();
    let mut data = vec![0u8];
    data.extend_from_slice(&SIXTY_MIB.to_be_bytes());
    data.extend_from_slice(&[0u8; 1024]);
    stream.send_data(Bytes::from(data), false).unwrap();
    assert_eq!(grpc_status(response).await, "8", "ResourceExhausted");
    let rss_after = vm_rss_kib();
    // Observed: VmRSS delta well under 1 MiB.
    println!(
        "grpc 60 MiB vote: ResourceExhausted after 1 KiB; VmRSS {rss} KiB -> {rss_after} KiB (delta {} KiB)",
        rss_after - rss
    );
    assert!(rss_after - rss < 30 << 10, "the server did not buffer the vote");
    drop((stream, send));
    baseline.assert_returned("grpc 60 MiB vote").await;
    let mut node = node;
    node.stop().await.unwrap();
}

/// The gRPC status a call ended with (from the head, or the trailers after the body), waiting
/// at most 3 s for the head.
async fn grpc_status(response: h2::client::ResponseFuture) -> String {
    let response = tokio::time::timeout(Duration::from_secs(3), response)
        .await
        .expect("the server answers before the body arrives")
        .unwrap();
    if let Some(s) = response.headers().get("grpc-status") {
        return s.to_str().unwrap().to_string();
    }
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        let _ = chunk;
    }
    let trailers = body.trailers().await.unwrap().unwrap_or_default();
    trailers
        .get("grpc-status")
        .map(|s| s.to_str().unwrap().to_string())
        .unwrap_or_default()
}

/// On a compressing node, a Vote sent compressed is refused from its message prefix: its
/// compressed length (a few bytes here) says nothing of what it would inflate to (60 MiB).
#[cfg(feature = "compression")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_compressed_vote_is_refused_from_its_prefix() {
    let _serial = SERIAL.lock().await;
    let net = Net::with(Transport::Grpc, |b| b.compression(raftwire::Compression::zstd()));
    let node = KvNode::start(1, demo::raft_config(), net.config(1), loopback())
        .await
        .unwrap();
    demo::initialize_alone(&node).await.unwrap();
    let send = h2_node9(&net, node.addr(), 1).await;
    let mut send = send.ready().await.unwrap();
    let mut head = grpc_request(1, "Vote");
    head.headers_mut()
        .insert("grpc-encoding", "zstd".parse().unwrap());
    head.headers_mut()
        .insert("raftwire-compression", "zstd".parse().unwrap());
    let (response, mut stream) = send.send_request(head, false).unwrap();
    let bomb = zstd::bulk::compress(&vec![0u8; SIXTY_MIB as usize], 1).unwrap();
    let mut data = vec![1u8];
    data.extend_from_slice(&(bomb.len() as u32).to_be_bytes());
    data.extend_from_slice(&bomb);
    stream.send_data(Bytes::from(data), true).unwrap();
    assert_eq!(grpc_status(response).await, "8", "ResourceExhausted");
    drop((stream, send));
    let mut node = node;
    node.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// (e) departed peers
// ---------------------------------------------------------------------------------------

/// What the leader held while `count` learners were members, and how long after their removal
/// it had let go of them all.
struct Departure {
    with: raftwire::NetworkStats,
    toward: usize,
    took: Duration,
}

/// Starts `count` learners with ids from `first`, adds them in one membership change, waits
/// until they have a write, removes them and waits until the leader forgets them; then stops
/// them.
async fn learners_come_and_go(net: &Net, leader: &KvNode, first: u64, count: u64) -> Departure {
    let transport = net.transport;
    let baseline = leader.network.stats();
    let mut learners = Vec::new();
    for id in first..first + count {
        learners.push(
            KvNode::start(id, demo::raft_config(), net.config(id), loopback())
                .await
                .unwrap(),
        );
    }
    let ports: HashSet<u16> = learners.iter().map(|l| l.addr().port()).collect();
    // One membership change for all of them: fifty `add_learner` calls would rebuild every
    // replication stream fifty times.
    let joining = learners.iter().map(|l| (l.id, l.node())).collect();
    leader
        .raft
        .change_membership(openraft::ChangeMembers::AddNodes(joining), false)
        .await
        .unwrap();
    leader
        .write(format!("with-learners-{first}"), Bytes::from_static(b"v"))
        .await
        .unwrap();
    let target = leader.sm.last_applied().unwrap().index;
    for l in &learners {
        demo::await_applied(l, target).await.unwrap();
    }
    let with = leader.network.stats();
    let toward = sockets_toward(&ports);
    assert_eq!(
        with.peers_cached,
        baseline.peers_cached + count,
        "{transport}: {with:?}"
    );
    if transport.name() == "grpc" {
        assert!(
            toward as u64 >= count,
            "{transport}: {toward} connections toward the learners"
        );
    }

    let ids: BTreeSet<u64> = learners.iter().map(|l| l.id).collect();
    leader
        .raft
        .change_membership(openraft::ChangeMembers::RemoveNodes(ids), false)
        .await
        .unwrap();
    let removed = Instant::now();
    let deadline = removed + Duration::from_secs(5);
    loop {
        let now = leader.network.stats();
        let toward = sockets_toward(&ports);
        if now.peers_cached == baseline.peers_cached
            && now.links_cached == baseline.links_cached
            && toward == 0
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{transport}: 5 s after removing the learners the leader still caches {now:?} and holds {toward} connections toward them"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = removed.elapsed();
    leader
        .write(format!("after-removal-{first}"), Bytes::from_static(b"v"))
        .await
        .unwrap();
    futures::future::join_all(learners.iter_mut().map(|l| l.stop())).await;
    Departure { with, toward, took }
}

async fn departed_learners_are_forgotten(transport: Transport) {
    let net = Net::with(transport, |b| {
        b.idle_peer_timeout(Duration::from_millis(300))
            .shutdown_grace(Duration::from_millis(50))
    });
    let cluster = Cluster::voters_with(net.clone(), 1).await;
    let leader = cluster.node(1);
    // One learner first: what the leader creates once, on its first peer (QUIC: its client
    // endpoint), is part of the baseline.
    learners_come_and_go(&net, leader, 10, 1).await;
    let usage = Usage::now();
    let rss = vm_rss_kib();
    let fifty = learners_come_and_go(&net, leader, 100, 50).await;
    let rss_after = vm_rss_kib();
    // Observed: gRPC ~150 links, QUIC 50; all released within ~0.5 s of the removal.
    println!(
        "{transport}: 50 learners: {} peers / {} links cached, {} TCP connections toward them; forgotten {:?} after removal; VmRSS {rss} -> {rss_after} KiB",
        fifty.with.peers_cached, fifty.with.links_cached, fifty.toward, fifty.took
    );
    usage
        .assert_returned(&format!("{transport}: 50 learners added and removed"))
        .await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_departed_learners_are_forgotten() {
    let _serial = SERIAL.lock().await;
    departed_learners_are_forgotten(Transport::Grpc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_departed_learners_are_forgotten() {
    let _serial = SERIAL.lock().await;
    departed_learners_are_forgotten(Transport::Quic).await;
}
