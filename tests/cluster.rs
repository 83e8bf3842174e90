//! Cluster behaviour over real sockets on 127.0.0.1, on every compiled transport.
#![cfg(feature = "app")]

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use common::Cluster;
use common::applied;
use common::learner_via_snapshot;
use common::loopback;
use common::snapshot_and_purge;
use common::write_many;
use raftwire::Transport;
use raftwire::demo;
use raftwire::kv::KvNode;
use raftwire::kv::KvSnapshotData;

on_every_transport!(
    election,
    ten_thousand_writes_are_identical_everywhere,
    replication_is_pipelined,
    leader_crash_loses_no_acknowledged_write,
    snapshot_in_chunks_reaches_learner_after_purge,
    membership_change,
    restarted_follower_reconnects,
    heartbeats_flow_while_snapshot_streams,
    leadership_transfer,
    small_message_limit_splits_batches_and_caps_snapshot_chunks,
);

async fn election(transport: Transport) {
    let c = Cluster::voters(transport, 3).await;
    for id in 1..=3 {
        assert_eq!(c.await_leader(id, None).await, 1, "node {id} sees node 1 lead");
    }
    let m = c.node(1).metrics();
    assert_eq!(
        m.membership_config
            .membership()
            .voter_ids()
            .collect::<BTreeSet<_>>(),
        BTreeSet::from([1, 2, 3])
    );
    c.shutdown().await;
}

async fn ten_thousand_writes_are_identical_everywhere(transport: Transport) {
    let c = Cluster::voters(transport, 3).await;
    write_many(c.node(1), 10_000, Bytes::from_static(b"value"), 64).await;
    let target = applied(c.node(1));
    for id in 2..=3 {
        c.await_applied(id, target).await;
    }
    let reference = c.node(1).sm.dump();
    assert_eq!(reference.len(), 10_000);
    for id in 2..=3 {
        assert_eq!(
            c.node(id).sm.dump(),
            reference,
            "node {id} differs from the leader"
        );
    }
    c.shutdown().await;
}

async fn replication_is_pipelined(transport: Transport) {
    let c = Cluster::voters(transport, 3).await;
    write_many(c.node(1), 3_000, Bytes::from(vec![1u8; 1024]), 256).await;
    let stats = c.node(1).network.stats();
    assert!(
        stats.max_in_flight > 1,
        "never more than one request in flight: {stats:?}"
    );
    c.shutdown().await;
}

async fn leader_crash_loses_no_acknowledged_write(transport: Transport) {
    let mut c = Cluster::voters(transport, 3).await;
    write_many(c.node(1), 1_000, Bytes::from_static(b"acked"), 32).await;
    let mut old = c.nodes.remove(&1).unwrap();
    old.stop().await.unwrap();
    let new_leader = c.await_leader(2, Some(1)).await;
    assert_ne!(new_leader, 1);
    let leader = c.node(new_leader);
    leader.read("k000000").await.unwrap();
    for i in 0..1_000 {
        assert_eq!(
            leader.sm.get(&format!("k{i:06}")).as_deref(),
            Some(&b"acked"[..]),
            "write {i} lost"
        );
    }
    // The new leader accepts writes.
    leader.write("after-failover", "x").await.unwrap();
    c.shutdown().await;
}

async fn snapshot_in_chunks_reaches_learner_after_purge(transport: Transport) {
    let chunk = 64 << 10;
    let net = common::Net::with(transport, move |b| b.snapshot_chunk_size(chunk));
    let mut c = Cluster::voters_with(net, 3).await;
    let upto = snapshot_and_purge(&c, 200, 16 << 10).await;
    let (n4, leader) = learner_via_snapshot(&c, upto).await;
    assert_eq!(n4.sm.dump(), c.node(1).sm.dump());
    // The learner installs before the leader reads the reply: give the reply a moment.
    let mut stats = c.node(leader).network.stats();
    for _ in 0..50 {
        if stats.snapshots_sent > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        stats = c.node(leader).network.stats();
    }
    assert_eq!(stats.snapshots_sent, 1, "{stats:?}");
    assert!(
        stats.snapshot_bytes_sent >= 3 * chunk as u64,
        "snapshot was not several chunks: {stats:?}"
    );
    c.nodes.insert(4, n4);
    c.shutdown().await;
}

async fn membership_change(transport: Transport) {
    let c = Cluster::voters(transport, 3).await;
    let leader = c.node(1);
    // `retain`: node 3 stays on as a learner, so it can be promoted again.
    leader
        .raft
        .change_membership(BTreeSet::from([1, 2]), true)
        .await
        .unwrap();
    let voters = |id: u64| {
        let m = c.node(id).metrics();
        m.membership_config
            .membership()
            .voter_ids()
            .collect::<BTreeSet<_>>()
    };
    assert_eq!(voters(1), BTreeSet::from([1, 2]));
    leader.write("two-voters", "ok").await.unwrap();
    leader
        .raft
        .change_membership(BTreeSet::from([1, 2, 3]), false)
        .await
        .unwrap();
    let target = applied(leader);
    c.await_applied(3, target).await;
    assert_eq!(voters(3), BTreeSet::from([1, 2, 3]));
    assert_eq!(c.node(3).sm.get("two-voters").as_deref(), Some(&b"ok"[..]));
    c.shutdown().await;
}

async fn restarted_follower_reconnects(transport: Transport) {
    let mut c = Cluster::voters(transport, 3).await;
    write_many(c.node(1), 100, Bytes::from_static(b"before"), 8).await;
    let mut f = c.nodes.remove(&3).unwrap();
    f.stop().await.unwrap();
    let connects_before = c.node(1).network.stats().connects;
    write_many(c.node(1), 100, Bytes::from_static(b"while-down"), 8).await;
    c.node(1).write("last", "x").await.unwrap();
    let f = f.restart().await.unwrap();
    let target = applied(c.node(1));
    demo::await_applied(&f, target).await.unwrap();
    assert_eq!(f.sm.get("last").as_deref(), Some(&b"x"[..]));
    assert!(
        c.node(1).network.stats().connects > connects_before,
        "leader never reconnected"
    );
    c.nodes.insert(3, f);
    c.shutdown().await;
}

/// A voter catches up through a snapshot larger than the connection window whose receiver
/// stalls for longer than an election timeout; heartbeats to it must keep being acknowledged
/// meanwhile (they travel on their own connection), and nobody starts an election.
async fn heartbeats_flow_while_snapshot_streams(transport: Transport) {
    let slow = Arc::new(AtomicBool::new(false));
    let stalling = Arc::new(AtomicBool::new(false));
    let mut c = Cluster::voters(transport, 2).await;
    let (config, raft_config) = (c.net.config(3), demo::raft_config());
    let (sink_slow, sink_stalling) = (slow.clone(), stalling.clone());
    let sink = move || {
        let slow = sink_slow.load(Ordering::SeqCst);
        let stalling = sink_stalling.clone();
        async move {
            if slow {
                stalling.store(true, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(2_500)).await;
            }
            Ok::<_, std::io::Error>(KvSnapshotData::default())
        }
    };
    let n3 = KvNode::start_with_sink(3, raft_config, config, loopback(), sink)
        .await
        .unwrap();
    c.node(1).raft.add_learner(3, n3.node(), true).await.unwrap();
    c.node(1)
        .raft
        .change_membership(BTreeSet::from([1, 2, 3]), false)
        .await
        .unwrap();
    let mut n3 = n3;
    n3.stop().await.unwrap();

    let upto = snapshot_and_purge(&c, 96, 256 << 10).await; // 24 MiB
    slow.store(true, Ordering::SeqCst);
    let n3 = n3.restart().await.unwrap();

    // Once the snapshot is under way and its receiver stalls, sample the leader's last
    // heartbeat ack from node 3.
    for _ in 0..200 {
        if stalling.load(Ordering::SeqCst) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        stalling.load(Ordering::SeqCst),
        "the snapshot to node 3 never started"
    );
    // (A restarted voter may campaign before the leader reaches it again; what must not happen
    // is an election while the snapshot streams.)
    let leader = c.await_leader(1, Some(3)).await;
    let term = c.node(leader).metrics().current_term;
    let mut acks = BTreeSet::new();
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let m = c.node(leader).metrics();
        if let Some(Some(at)) = m.heartbeat.as_ref().and_then(|h| h.get(&3).cloned()) {
            acks.insert(at);
        }
    }
    demo::await_applied(&n3, upto).await.unwrap();
    assert_eq!(
        n3.sm.snapshots_installed(),
        1,
        "node 3 caught up without a snapshot"
    );
    assert!(
        acks.len() >= 5,
        "heartbeats to node 3 stalled during the snapshot: {} distinct acks",
        acks.len()
    );
    let m = c.node(leader).metrics();
    assert_eq!(m.current_term, term, "an election happened during the snapshot");
    assert_eq!(m.current_leader, Some(leader));
    c.nodes.insert(3, n3);
    c.shutdown().await;
}

/// `trigger().transfer_leader` goes through the TransferLeader RPC: the target takes over.
async fn leadership_transfer(transport: Transport) {
    let c = Cluster::voters(transport, 3).await;
    c.node(1).write("before", "x").await.unwrap();
    c.node(1).raft.trigger().transfer_leader(2).await.unwrap();
    assert_eq!(c.await_leader(3, Some(1)).await, 2);
    // Node 2 itself leads once its own metrics say so (a follower may learn of it first).
    c.node(2)
        .raft
        .wait(Some(Duration::from_secs(10)))
        .metrics(
            |m| m.current_leader == Some(2) && m.state == openraft::ServerState::Leader,
            "node 2 leads",
        )
        .await
        .unwrap();
    let target = applied(c.node(1));
    c.await_applied(2, target).await;
    let mut attempt = 0;
    while let Err(e) = c.node(2).write("after", "y").await {
        let m = c.node(2).metrics();
        eprintln!(
            "attempt {attempt}: {e}; node 2 state {:?} leader {:?} term {}",
            m.state, m.current_leader, m.current_term
        );
        attempt += 1;
        assert!(attempt < 20, "node 2 never accepted a write");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(c.node(2).sm.get("before").as_deref(), Some(&b"x"[..]));
    c.shutdown().await;
}

/// With a 64 KiB message limit, batches of 16 KiB entries (openraft sends up to 300 entries
/// per request) go out split into parts that fit, and a snapshot goes out in chunks below the
/// limit although openraft asks for 3 MiB chunks: everything replicates.
async fn small_message_limit_splits_batches_and_caps_snapshot_chunks(transport: Transport) {
    let net = common::Net::with(transport, |b| {
        b.max_message_size(64 << 10).snapshot_chunk_size(32 << 10)
    });
    let mut c = Cluster::voters_with(net, 3).await;
    let upto = snapshot_and_purge(&c, 200, 16 << 10).await;
    for id in 2..=3 {
        c.await_applied(id, upto).await;
        assert_eq!(c.node(id).sm.dump(), c.node(1).sm.dump());
    }
    let (n4, _) = learner_via_snapshot(&c, upto).await;
    assert_eq!(n4.sm.dump(), c.node(1).sm.dump());
    c.nodes.insert(4, n4);
    c.shutdown().await;
}
