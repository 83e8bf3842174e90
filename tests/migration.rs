//! Moving a running cluster between transports: servers that serve several transports at
//! once, per-peer preference with fallback, and a rolling upgrade from gRPC to QUIC under
//! continuous writes, on real sockets.
#![cfg(all(feature = "app", feature = "grpc", feature = "quic"))]

mod common;

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use bytes::Bytes;
use common::loopback;
use common::relay::Relay;
use openraft::RaftNetworkFactory;
use openraft::errors::RPCError;
use openraft::impls::BasicNode;
use openraft::network::RPCOption;
use openraft::network::RaftNetworkV2;
use openraft::raft::VoteRequest;
use raftwire::CertificateAuthority;
use raftwire::Config;
use raftwire::NetworkFactory;
use raftwire::Transport;
use raftwire::demo;
use raftwire::kv::KvConfig;
use raftwire::kv::KvNode;
use raftwire::kv::KvRaft;
use raftwire::kv::KvRequest;
use raftwire::kv::KvSnapshotData;

const GRPC: Transport = Transport::Grpc;
const QUIC: Transport = Transport::Quic;

/// Node `id`'s config over `transports` (most preferred first), with a short fallback
/// back-off so that tests see the preferred transport probed again.
fn config(ca: &CertificateAuthority, id: u64, transports: &[Transport]) -> Config {
    Config::builder()
        .transports(transports.iter().copied())
        .tls(ca.tls_config(id).unwrap())
        .connect_timeout(Duration::from_millis(500))
        .fallback_backoff(Duration::from_millis(300))
        .shutdown_grace(Duration::from_millis(100))
        .build()
        .unwrap()
}

/// A vote request that changes nothing at the receiver: term 0, below any real term.
fn stale_vote(from: u64) -> VoteRequest<KvConfig> {
    VoteRequest {
        vote: openraft::impls::Vote::new(0, from),
        last_log_id: None,
        leadership_transfer: false,
    }
}

/// Sends `from`'s stale vote to `to` through `factory`; the call's outcome.
async fn ping(
    factory: &mut NetworkFactory<KvConfig, KvSnapshotData>,
    from: u64,
    to: u64,
    addr: &str,
    deadline: Duration,
) -> Result<(), RPCError<KvConfig>> {
    let mut client = factory.new_client(to, &BasicNode::new(addr)).await;
    client
        .vote(stale_vote(from), RPCOption::new(deadline))
        .await
        .map(|_| ())
}

/// Pings until the peer is reported on `transport` (a background probe may need a moment).
async fn await_on(
    factory: &mut NetworkFactory<KvConfig, KvSnapshotData>,
    from: u64,
    to: u64,
    addr: &str,
    transport: Transport,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pinged = ping(factory, from, to, addr, Duration::from_secs(2)).await;
        let on = factory.stats().peer_transports.get(&to).copied();
        if pinged.is_ok() && on == Some(transport) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {from} -> {to}: not on {transport} after 10 s (on {on:?}, last call {pinged:?})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One server serves QUIC and gRPC on the same port number (UDP and TCP), with the same
/// identity checks on each; `listen` moves one transport to an address of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_server_serves_every_transport() {
    let ca = CertificateAuthority::generate("migration test CA").unwrap();
    let mut node = KvNode::start(2, demo::raft_config(), config(&ca, 2, &[QUIC, GRPC]), loopback())
        .await
        .unwrap();
    demo::initialize_alone(&node).await.unwrap();
    let addr = node.addr().to_string();
    for transport in [QUIC, GRPC] {
        let mut factory =
            NetworkFactory::<KvConfig, KvSnapshotData>::new(1, config(&ca, 1, &[transport])).unwrap();
        ping(&mut factory, 1, 2, &addr, Duration::from_secs(3))
            .await
            .unwrap_or_else(|e| panic!("{transport}: {e}"));
        // The identity check holds on every transport: node 1 may not speak for node 3.
        let mut client = factory.new_client(2, &BasicNode::new(addr.clone())).await;
        let forged = client
            .vote(stale_vote(3), RPCOption::new(Duration::from_secs(3)))
            .await
            .unwrap_err();
        assert!(forged.to_string().contains("node 1"), "{transport}: {forged}");
    }
    node.stop().await.unwrap();

    // QUIC moved to a port of its own.
    let raft_config = demo::raft_config();
    let log = raftwire::kv::LogStore::default();
    let sm = raftwire::kv::StateMachine::default();
    let network = NetworkFactory::<KvConfig, KvSnapshotData>::new(3, config(&ca, 3, &[QUIC, GRPC])).unwrap();
    let raft = KvRaft::new(3, raft_config, network, log, sm).await.unwrap();
    let elsewhere = std::net::UdpSocket::bind(loopback()).unwrap();
    let quic_at = elsewhere.local_addr().unwrap();
    drop(elsewhere);
    let server = raftwire::Server::builder(raft.clone(), config(&ca, 3, &[QUIC, GRPC]))
        .listen(QUIC, quic_at)
        .bind(loopback())
        .await
        .unwrap();
    assert_eq!(server.transport_addr(QUIC), Some(quic_at));
    let grpc_at = server.transport_addr(GRPC).unwrap();
    assert_ne!(grpc_at.port(), quic_at.port());
    assert_eq!(
        server.local_addr(),
        quic_at,
        "the most preferred transport's address"
    );
    for (transport, at) in [(QUIC, quic_at), (GRPC, grpc_at)] {
        let mut factory =
            NetworkFactory::<KvConfig, KvSnapshotData>::new(1, config(&ca, 1, &[transport])).unwrap();
        ping(&mut factory, 1, 3, &at.to_string(), Duration::from_secs(3))
            .await
            .unwrap_or_else(|e| panic!("{transport} at {at}: {e}"));
    }
    server.shutdown().await.unwrap();
    raft.shutdown().await.unwrap();
}

/// A client preferring QUIC talks gRPC to a peer that serves only gRPC, moves to QUIC once
/// the peer serves it too, and falls back within the same call when QUIC stops connecting.
/// With a predicate that never falls back, that call fails instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_moves_to_the_preferred_transport_and_falls_back() {
    let ca = CertificateAuthority::generate("migration test CA").unwrap();
    let mut node = KvNode::start(2, demo::raft_config(), config(&ca, 2, &[GRPC]), loopback())
        .await
        .unwrap();
    demo::initialize_alone(&node).await.unwrap();
    let addr = node.addr().to_string();
    let mut client =
        NetworkFactory::<KvConfig, KvSnapshotData>::new(1, config(&ca, 1, &[QUIC, GRPC])).unwrap();

    // The peer serves only gRPC: the first call already gets through, on gRPC.
    let started = Instant::now();
    ping(&mut client, 1, 2, &addr, Duration::from_secs(3))
        .await
        .unwrap();
    let first_call = started.elapsed();
    assert_eq!(client.stats().peer_transports.get(&2), Some(&GRPC));
    // Every later call goes straight to gRPC: QUIC is probed in the background only.
    for _ in 0..20 {
        let t = Instant::now();
        ping(&mut client, 1, 2, &addr, Duration::from_secs(3))
            .await
            .unwrap();
        assert!(
            t.elapsed() < Duration::from_millis(250),
            "a call waited for the unserved transport: {:?}",
            t.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(client.stats().peer_transports.get(&2), Some(&GRPC));
    println!("first call on a gRPC-only peer took {first_call:?}");

    // The peer restarts serving QUIC too: the client moves over within a back-off.
    node.stop().await.unwrap();
    let mut node = node.restart_with(config(&ca, 2, &[QUIC, GRPC])).await.unwrap();
    await_on(&mut client, 1, 2, &addr, QUIC).await;

    // And restarts serving gRPC only again: the next call fails on QUIC (its connection is
    // closed, a new one does not connect) and falls back to gRPC within the same call.
    node.stop().await.unwrap();
    let mut node = node.restart_with(config(&ca, 2, &[GRPC])).await.unwrap();
    ping(&mut client, 1, 2, &addr, Duration::from_secs(3))
        .await
        .expect("the call falls back to gRPC");
    assert_eq!(client.stats().peer_transports.get(&2), Some(&GRPC));

    // A predicate that never falls back: the same situation fails the call.
    let strict = Config::builder()
        .transports([QUIC, GRPC])
        .tls(ca.tls_config(1).unwrap())
        .connect_timeout(Duration::from_millis(500))
        .fallback_when(|_| false)
        .build()
        .unwrap();
    let mut strict = NetworkFactory::<KvConfig, KvSnapshotData>::new(1, strict).unwrap();
    let node2 = {
        node.stop().await.unwrap();
        node.restart_with(config(&ca, 2, &[QUIC, GRPC])).await.unwrap()
    };
    await_on(&mut strict, 1, 2, &addr, QUIC).await;
    let mut node2 = node2;
    node2.stop().await.unwrap();
    let mut node2 = node2.restart_with(config(&ca, 2, &[GRPC])).await.unwrap();
    let err = ping(&mut strict, 1, 2, &addr, Duration::from_secs(3))
        .await
        .unwrap_err();
    assert!(matches!(err, RPCError::Unreachable(_)), "{err}");
    node2.stop().await.unwrap();
}

/// The current leader among `rafts`, as any of them sees it.
fn leader(rafts: &BTreeMap<u64, KvRaft>) -> Option<(u64, u64)> {
    use openraft::async_runtime::watch::WatchReceiver;
    rafts.values().find_map(|r| {
        let m = r.metrics().borrow_watched().clone();
        m.current_leader.map(|l| (l, m.current_term))
    })
}

/// Writes keys one after another through whichever node leads, until stopped; records the
/// acknowledged ones. A write whose outcome is unknown is retried with the same key and value
/// (a `Set` is idempotent), so nothing acknowledged is lost or duplicated by a retry.
struct Writer {
    acked: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    fn start(rafts: Arc<Mutex<BTreeMap<u64, KvRaft>>>) -> Writer {
        let acked = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (acked.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut i = 0u64;
            while !s.load(Ordering::SeqCst) {
                let key = format!("k{i:06}");
                let target = {
                    let rafts = rafts.lock().unwrap();
                    leader(&rafts).and_then(|(l, _)| rafts.get(&l).cloned())
                };
                let Some(raft) = target else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                let write = raft.client_write(KvRequest::Set {
                    key: key.clone(),
                    value: Bytes::from(format!("v{i}")),
                });
                match tokio::time::timeout(Duration::from_secs(2), write).await {
                    Ok(Ok(_)) => {
                        a.lock().unwrap().push(key);
                        i += 1;
                    }
                    _ => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        });
        Writer { acked, stop, task }
    }

    fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    async fn assert_committing(&self, what: &str) {
        let before = self.acked();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.acked() < before + 20 {
            assert!(Instant::now() < deadline, "{what}: writes stopped committing");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(self) -> Vec<String> {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap();
        Arc::into_inner(self.acked).unwrap().into_inner().unwrap()
    }
}

/// A 3-node gRPC cluster under continuous writes; each node in turn restarts serving QUIC and
/// gRPC, preferring QUIC. Afterwards every pair of nodes talks QUIC, every acknowledged write
/// is on every node, and the leader changed only when the leader itself restarted (a
/// follower's restart costs no election: the term stays).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_upgrade_from_grpc_to_quic() {
    let ca = CertificateAuthority::generate("migration test CA").unwrap();
    let mut nodes = BTreeMap::new();
    for id in 1..=3 {
        let node = KvNode::start(id, demo::raft_config(), config(&ca, id, &[GRPC]), loopback())
            .await
            .unwrap();
        nodes.insert(id, node);
    }
    let n1 = &nodes[&1];
    demo::initialize_alone(n1).await.unwrap();
    for id in 2..=3 {
        n1.raft.add_learner(id, nodes[&id].node(), true).await.unwrap();
    }
    n1.raft
        .change_membership(BTreeSet::from([1, 2, 3]), false)
        .await
        .unwrap();
    let rafts = Arc::new(Mutex::new(
        nodes
            .iter()
            .map(|(id, n)| (*id, n.raft.clone()))
            .collect::<BTreeMap<_, _>>(),
    ));
    let writer = Writer::start(rafts.clone());
    writer.assert_committing("before the upgrade").await;

    for id in 1..=3 {
        let (leader_before, term_before) = leader(&rafts.lock().unwrap()).unwrap();
        let mut node = nodes.remove(&id).unwrap();
        rafts.lock().unwrap().remove(&id);
        node.stop().await.unwrap();
        let node = node.restart_with(config(&ca, id, &[QUIC, GRPC])).await.unwrap();
        rafts.lock().unwrap().insert(id, node.raft.clone());
        nodes.insert(id, node);
        writer
            .assert_committing(&format!("after restarting node {id}"))
            .await;
        let (leader_after, term_after) = leader(&rafts.lock().unwrap()).unwrap();
        // Restarting the leader may elect anyone (itself again included); restarting a
        // follower must elect no one.
        if id != leader_before {
            assert_eq!(
                (leader_after, term_after),
                (leader_before, term_before),
                "restarting follower {id} caused an election"
            );
        }
        println!(
            "node {id} upgraded: leader {leader_before} (term {term_before}) -> {leader_after} (term {term_after})"
        );
    }

    // Every pair of nodes talks QUIC (the leader's replication included).
    let (leader_now, term_now) = leader(&rafts.lock().unwrap()).unwrap();
    for (&from, node) in nodes.iter_mut() {
        let peers: Vec<(u64, String)> = (1..=3)
            .filter(|p| *p != from)
            .map(|p| (p, node_addr(p, &rafts)))
            .collect();
        for (to, addr) in peers {
            await_on(&mut node.network, from, to, &addr, QUIC).await;
        }
    }
    let stats = nodes[&leader_now].network.stats();
    assert!(
        stats.peer_transports.values().all(|t| *t == QUIC) && stats.peer_transports.len() == 2,
        "the leader replicates over QUIC: {stats:?}"
    );
    assert_eq!(
        leader(&rafts.lock().unwrap()),
        Some((leader_now, term_now)),
        "checking the pairs caused no election"
    );

    let acked = writer.stop().await;
    let last = nodes[&leader_now].sm.last_applied().unwrap().index;
    for (id, node) in &nodes {
        demo::await_applied(node, last).await.unwrap();
        let data = node.sm.dump();
        for key in &acked {
            assert!(data.contains_key(key), "node {id} lost acknowledged write {key}");
        }
    }
    println!("{} acknowledged writes, all on every node", acked.len());
    for (_, mut node) in nodes {
        node.stop().await.unwrap();
    }
}

/// The address node `id` has in the membership, as the leader sees it.
fn node_addr(id: u64, rafts: &Arc<Mutex<BTreeMap<u64, KvRaft>>>) -> String {
    use openraft::async_runtime::watch::WatchReceiver;
    let rafts = rafts.lock().unwrap();
    let m = rafts.values().next().unwrap().metrics().borrow_watched().clone();
    m.membership_config
        .membership()
        .get_node(&id)
        .map(|n| n.addr.clone())
        .unwrap()
}

/// Node 3's UDP is blocked (its advertised address forwards TCP to it and drops UDP): the
/// leader and node 2 prefer QUIC, and the leader keeps replicating to node 3 over gRPC while
/// it talks QUIC to node 2. (Only node 3's inbound UDP is blocked in this simulation.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_udp_keeps_replicating_over_grpc() {
    let ca = CertificateAuthority::generate("migration test CA").unwrap();
    let mut nodes = BTreeMap::new();
    for id in 1..=3 {
        let node = KvNode::start(
            id,
            demo::raft_config(),
            config(&ca, id, &[QUIC, GRPC]),
            loopback(),
        )
        .await
        .unwrap();
        nodes.insert(id, node);
    }
    // Node 3's advertised address: TCP relayed to it, UDP swallowed by a socket that never
    // answers (a firewall dropping UDP).
    let (relay, black_hole) = blocked_udp_front(nodes[&3].addr()).await;
    let n1 = &nodes[&1];
    demo::initialize_alone(n1).await.unwrap();
    n1.raft.add_learner(2, nodes[&2].node(), true).await.unwrap();
    n1.raft
        .add_learner(3, BasicNode::new(relay.addr.to_string()), true)
        .await
        .unwrap();
    n1.raft
        .change_membership(BTreeSet::from([1, 2, 3]), false)
        .await
        .unwrap();
    for i in 0..50 {
        n1.write(format!("key{i}"), Bytes::from_static(b"v"))
            .await
            .unwrap();
    }
    let last = n1.sm.last_applied().unwrap().index;
    for node in nodes.values() {
        demo::await_applied(node, last).await.unwrap();
    }
    let stats = n1.network.stats();
    assert_eq!(stats.peer_transports.get(&2), Some(&QUIC), "{stats:?}");
    assert_eq!(stats.peer_transports.get(&3), Some(&GRPC), "{stats:?}");
    assert_eq!(nodes[&3].sm.dump().len(), 50);
    drop(black_hole);
    drop(relay);
    for (_, mut node) in nodes {
        node.stop().await.unwrap();
    }
}

/// A TCP relay to `target` and a UDP socket on the relay's port that reads nothing.
async fn blocked_udp_front(target: SocketAddr) -> (Relay, std::net::UdpSocket) {
    for _ in 0..20 {
        let relay = Relay::tcp(target, Duration::ZERO).await;
        if let Ok(udp) = std::net::UdpSocket::bind(relay.addr) {
            return (relay, udp);
        }
    }
    panic!("no port free for both TCP and UDP");
}

/// A node value that says which transports its node serves.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Advertised {
    addr: String,
    serves: Vec<Transport>,
}

impl raftwire::PeerAddr for Advertised {
    fn peer_addr(&self) -> &str {
        &self.addr
    }

    fn transports(&self) -> Option<Vec<Transport>> {
        Some(self.serves.clone())
    }
}

impl raftwire::WireMessage for Advertised {
    fn encode(&self) -> Result<Bytes, raftwire::EncodeError> {
        let serves: Vec<&str> = self.serves.iter().map(|t| t.name()).collect();
        Ok(Bytes::from(format!("{} {}", self.addr, serves.join(","))))
    }

    fn decode(bytes: Bytes) -> Result<Self, raftwire::DecodeError> {
        let text = String::decode(bytes)?;
        let (addr, serves) = text
            .split_once(' ')
            .ok_or_else(|| raftwire::DecodeError::invalid("node", "no transport list"))?;
        let serves = Transport::parse_list(serves).map_err(|e| raftwire::DecodeError::invalid("node", e))?;
        Ok(Advertised {
            addr: addr.to_string(),
            serves,
        })
    }
}

openraft::declare_raft_types!(
    AdvertisedConfig:
        D = KvRequest,
        R = raftwire::kv::KvResponse,
        Node = Advertised,
);

/// A peer whose node value says it serves only gRPC is never tried over QUIC, although the
/// client prefers QUIC and the peer (unknown to the value) would accept it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transport_the_node_value_does_not_list_is_never_tried() {
    use raftwire::WireMessage;
    let ca = CertificateAuthority::generate("migration test CA").unwrap();
    let mut node = KvNode::start(2, demo::raft_config(), config(&ca, 2, &[QUIC, GRPC]), loopback())
        .await
        .unwrap();
    demo::initialize_alone(&node).await.unwrap();
    let value = Advertised {
        addr: node.addr().to_string(),
        serves: vec![GRPC],
    };
    assert_eq!(Advertised::decode(value.encode().unwrap()).unwrap(), value);
    let mut factory =
        NetworkFactory::<AdvertisedConfig, KvSnapshotData>::new(1, config(&ca, 1, &[QUIC, GRPC])).unwrap();
    // Calls spread over several fallback back-offs (300 ms): QUIC would have been probed.
    for _ in 0..10 {
        let mut client = factory.new_client(2, &value).await;
        client
            .vote(
                VoteRequest {
                    vote: openraft::impls::Vote::new(0, 1),
                    last_log_id: None,
                    leadership_transfer: false,
                },
                RPCOption::new(Duration::from_secs(2)),
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stats = factory.stats();
    assert_eq!(stats.peer_transports.get(&2), Some(&GRPC), "{stats:?}");
    assert_eq!(stats.connects, 1, "one gRPC connection, no QUIC one: {stats:?}");
    node.stop().await.unwrap();
}

/// `raftwire demo --transport quic,grpc`: the whole demo (failover, snapshot catch-up) runs
/// with every node serving both transports and preferring QUIC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_on_a_preference_list() {
    let opts = demo::DemoOptions {
        transports: Transport::parse_list("quic,grpc").unwrap(),
        writes: 300,
        concurrency: 8,
        ..Default::default()
    };
    let report = demo::run(opts).await.unwrap();
    assert!(report.ok);
    assert_eq!(report.transport, "quic,grpc");
    assert!(report.snapshot_installed);
}
