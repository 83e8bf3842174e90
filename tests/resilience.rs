//! Links that are slow, peers that crash and come back, servers that shut down: on every
//! transport, over real sockets.
#![cfg(feature = "app")]

mod common;

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use bytes::Bytes;
use common::Net;
use common::applied;
use common::loopback;
use common::relay::Relay;
use openraft::impls::BasicNode;
use raftwire::Transport;
use raftwire::demo;
use raftwire::kv::KvNode;

on_every_transport!(
    cluster_commits_through_a_delay_proxy,
    restarted_peer_is_reconnected_within_two_seconds,
);

/// A relay of the transport's kind (TCP for gRPC, UDP for QUIC) in front of `target`.
async fn relay(transport: Transport, target: SocketAddr, one_way: Duration) -> Relay {
    match transport {
        #[cfg(feature = "grpc")]
        Transport::Grpc => Relay::tcp(target, one_way).await,
        #[cfg(feature = "tcp")]
        Transport::Tcp => Relay::tcp(target, one_way).await,
        _ => Relay::udp(target, one_way).await,
    }
}

/// Starts nodes 1..=n, each reachable by its peers only through its own relay, and makes
/// them one cluster of voters led by node 1.
async fn relayed_cluster(net: &Net, n: u64, one_way: Duration) -> (Vec<KvNode>, Vec<Relay>) {
    let mut nodes = Vec::new();
    let mut relays = Vec::new();
    for id in 1..=n {
        let node = KvNode::start(id, demo::raft_config(), net.config(id), loopback())
            .await
            .unwrap();
        relays.push(relay(net.transport, node.addr(), one_way).await);
        nodes.push(node);
    }
    let via = |i: usize| BasicNode::new(relays[i].addr.to_string());
    nodes[0]
        .raft
        .initialize(BTreeMap::from([(1, via(0))]))
        .await
        .unwrap();
    nodes[0]
        .raft
        .wait(Some(Duration::from_secs(10)))
        .metrics(
            |m| m.current_leader == Some(1) && m.last_applied.is_some_and(|l| l.leader_id.term > 0),
            "node 1 leads with a committed entry",
        )
        .await
        .unwrap();
    for id in 2..=n {
        nodes[0]
            .raft
            .add_learner(id, via(id as usize - 1), true)
            .await
            .unwrap();
    }
    nodes[0]
        .raft
        .change_membership((1..=n).collect::<BTreeSet<_>>(), false)
        .await
        .unwrap();
    (nodes, relays)
}

/// Every link has a 50 ms round trip: longer than nothing, shorter than openraft's deadline
/// for a heartbeat (75 ms here), but a connect plus a TLS handshake does not fit in one
/// deadline. The cluster forms, commits and replicates anyway.
async fn cluster_commits_through_a_delay_proxy(transport: Transport) {
    let net = Net::new(transport);
    let (mut nodes, relays) = relayed_cluster(&net, 3, Duration::from_millis(25)).await;
    for i in 0..50 {
        nodes[0]
            .write(format!("k{i}"), Bytes::from_static(b"slow link"))
            .await
            .unwrap();
    }
    let target = applied(&nodes[0]);
    for node in &nodes[1..] {
        demo::await_applied(node, target).await.unwrap();
        assert_eq!(node.sm.dump(), nodes[0].sm.dump());
    }
    // Connections were made once and kept, not remade per call.
    let connects = nodes[0].network.stats().connects;
    assert!(connects <= 8, "the leader connected {connects} times");
    drop(relays);
    for node in &mut nodes {
        node.stop().await.unwrap();
    }
}

/// A follower dies without a word (its link is cut before it stops, so no close reaches the
/// leader) and comes back on the same address: the leader notices and replicates to it again
/// within two seconds.
async fn restarted_peer_is_reconnected_within_two_seconds(transport: Transport) {
    let net = Net::new(transport);
    let (mut nodes, relays) = relayed_cluster(&net, 3, Duration::ZERO).await;
    for i in 0..20 {
        nodes[0]
            .write(format!("a{i}"), Bytes::from_static(b"1"))
            .await
            .unwrap();
    }
    demo::await_applied(&nodes[1], applied(&nodes[0])).await.unwrap();

    relays[1].cut();
    let mut victim = nodes.remove(1);
    victim.stop().await.unwrap();
    let victim = victim.restart().await.unwrap();
    relays[1].restore();
    let back = Instant::now();

    // Writes go on (nodes 1 and 3 make the quorum) while the leader finds node 2 again. If
    // node 2 campaigns before it hears from the leader, leadership may move: writes then go
    // to whoever leads, and what is measured is only when node 2 takes part again.
    let writing = Arc::new(AtomicBool::new(true));
    let target = nodes.iter().map(applied).max().unwrap_or(0) + 1;
    let everyone = [&nodes[0], &victim, &nodes[1]];
    let writes = async {
        let mut i = 0;
        while writing.load(Ordering::SeqCst) {
            for node in everyone {
                if node
                    .write(format!("b{i}"), Bytes::from_static(b"2"))
                    .await
                    .is_ok()
                {
                    break;
                }
            }
            i += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let caught_up = async {
        victim
            .raft
            .wait(Some(Duration::from_secs(10)))
            .applied_index_at_least(Some(target), "replicating again")
            .await
            .unwrap();
        let took = back.elapsed();
        writing.store(false, Ordering::SeqCst);
        took
    };
    let ((), took) = tokio::join!(writes, caught_up);
    assert!(
        took < Duration::from_secs(2),
        "node 2 took part again only after {took:?}"
    );
    nodes.insert(1, victim);
    drop(relays);
    for node in &mut nodes {
        node.stop().await.unwrap();
    }
}

/// Sockets bound to `port` by this process that are listening or connected: TCP (gRPC) from
/// `/proc/self/net/tcp{,6}`, UDP (QUIC) from `/proc/self/net/udp{,6}`.
fn sockets_on(port: u16) -> usize {
    let mut n = 0;
    for table in ["tcp", "tcp6", "udp", "udp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/self/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state)) = (cols.get(1), cols.get(3)) else {
                continue;
            };
            let local_port = local
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            // TCP: 01 established, 0A listening (TIME_WAIT and the like own no socket).
            let live = table.starts_with("udp") || *state == "01" || *state == "0A";
            if local_port == Some(port) && live {
                n += 1;
            }
        }
    }
    n
}

/// `Server::shutdown` stops accepting, waits out the grace period for calls in flight, then
/// closes every connection and task: afterwards nothing is bound to its port, the tasks of
/// its runtime are back to what Raft alone runs, and no request reaches the Raft any more
/// although the leader keeps trying.
#[test]
fn shutdown_closes_every_connection_and_task() {
    for transport in common::transports() {
        shutdown_closes_everything_on(transport);
    }
}

fn shutdown_closes_everything_on(transport: Transport) {
    let main = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // The server under test runs alone on its own runtime, so its task count is its own.
    let subject = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let net = Net::with(transport, |b| b.shutdown_grace(Duration::from_millis(300)));
    main.block_on(async {
        let leader = KvNode::start(1, demo::raft_config(), net.config(1), loopback())
            .await
            .unwrap();
        let peer = KvNode::start(2, demo::raft_config(), net.config(2), loopback())
            .await
            .unwrap();
        // Node 3: its Raft first, then (counted apart) its server.
        let config3 = net.config(3);
        let raft3 = subject
            .spawn(async move {
                let network = raftwire::NetworkFactory::new(3, config3).unwrap();
                openraft::Raft::new(
                    3,
                    demo::raft_config(),
                    network,
                    raftwire::kv::LogStore::default(),
                    raftwire::kv::StateMachine::default(),
                )
                .await
                .unwrap()
            })
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let tasks_before = subject.metrics().num_alive_tasks();
        let (r, config3) = (raft3.clone(), net.config(3));
        let server = subject
            .spawn(async move {
                raftwire::Server::builder(r, config3)
                    .bind(loopback())
                    .await
                    .unwrap()
            })
            .await
            .unwrap();
        let port = server.local_addr().port();

        demo::initialize_alone(&leader).await.unwrap();
        leader.raft.add_learner(2, peer.node(), true).await.unwrap();
        let node3 = BasicNode::new(server.local_addr().to_string());
        leader.raft.add_learner(3, node3, true).await.unwrap();
        leader
            .raft
            .change_membership(BTreeSet::from([1, 2, 3]), false)
            .await
            .unwrap();
        for i in 0..100 {
            leader
                .write(format!("k{i}"), Bytes::from_static(b"v"))
                .await
                .unwrap();
        }
        // gRPC: the listener and the peers' connections; QUIC: the one UDP socket.
        let expected = if transport.name() == "grpc" { 2 } else { 1 };
        assert!(
            sockets_on(port) >= expected,
            "{transport}: the server listens and the leader is connected: {}",
            std::fs::read_to_string("/proc/self/net/tcp").unwrap()
        );
        assert!(subject.metrics().num_alive_tasks() > tasks_before);

        // Writes go on during and after the shutdown (nodes 1 and 2 make the quorum).
        let writing = Arc::new(AtomicBool::new(true));
        let w = writing.clone();
        let leader = Arc::new(leader);
        let l = leader.clone();
        let writer = tokio::spawn(async move {
            let mut i = 0;
            while w.load(Ordering::SeqCst) {
                let _ = l.write(format!("w{i}"), Bytes::from_static(b"v")).await;
                i += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = Instant::now();
        subject.spawn(server.shutdown()).await.unwrap().unwrap();
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(2),
            "{transport}: shutdown took {took:?}"
        );

        use openraft::async_runtime::watch::WatchReceiver;
        // Requests the old Raft took in before the shutdown may still be finishing: wait until
        // its log stops moving (writes go on all along, so a connection that survived the
        // shutdown would keep it moving).
        let last = || raft3.metrics().borrow_watched().last_log_index;
        let mut seen = last();
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if last() == seen {
                break;
            }
            seen = last();
        }
        assert_eq!(
            sockets_on(port),
            0,
            "{transport}: nothing is left on the server's port"
        );
        // Aborted tasks are reaped by the runtime right after.
        let deadline = Instant::now() + Duration::from_millis(500);
        while subject.metrics().num_alive_tasks() > tasks_before && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            subject.metrics().num_alive_tasks(),
            tasks_before,
            "{transport}: the server's tasks are gone"
        );
        // The leader keeps replicating (and retrying node 3) for a while: nothing arrives.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            raft3.metrics().borrow_watched().last_log_index,
            seen,
            "{transport}: no request reached the old Raft"
        );
        assert!(applied(&leader) > 100, "the cluster kept committing");
        writing.store(false, Ordering::SeqCst);
        writer.await.unwrap();
        let mut leader = Arc::into_inner(leader).unwrap();
        leader.stop().await.unwrap();
        let mut peer = peer;
        peer.stop().await.unwrap();
        subject
            .spawn(async move { raft3.shutdown().await })
            .await
            .unwrap()
            .unwrap();
    });
    subject.shutdown_timeout(Duration::from_secs(1));
}
