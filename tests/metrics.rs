//! What the library records through the `metrics` facade, read back from a Prometheus recorder
//! installed in this test process, after real traffic over real sockets on every transport.
#![cfg(feature = "app")]

mod common;

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use common::Cluster;
use common::loopback;
use futures::StreamExt;
use metrics_exporter_prometheus::PrometheusBuilder;
use metrics_exporter_prometheus::PrometheusHandle;
use raftwire::Transport;
use raftwire::demo;
use raftwire::kv::KvNode;

on_every_transport!(replication_snapshots_votes_and_failures_are_recorded_per_peer_and_transport);

/// The process's recorder (both transports' tests share it; their `transport` labels differ).
fn recorder() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&[0.001, 0.01, 0.1, 1.0])
            .unwrap()
            .build_recorder();
        let handle = recorder.handle();
        metrics::set_global_recorder(recorder).expect("no other recorder in this test binary");
        handle
    })
}

/// One sample: its metric name and labels.
type Series = (String, BTreeMap<String, String>);

/// Parses Prometheus text into samples.
fn samples(text: &str) -> BTreeMap<Series, f64> {
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let (series, value) = line.rsplit_once(' ').expect("a sample has a value");
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let labels = labels
            .split(',')
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (k, v) = l.split_once('=').expect("label=value");
                (k.to_string(), v.trim_matches('"').to_string())
            })
            .collect();
        out.insert((name.to_string(), labels), value.parse().expect("a number"));
    }
    out
}

/// The value of `name` for `transport` with every label of `with`; 0 if absent.
fn value(all: &BTreeMap<Series, f64>, name: &str, transport: Transport, with: &[(&str, &str)]) -> f64 {
    all.iter()
        .filter(|((n, labels), _)| {
            n == name
                && labels.get("transport").map(String::as_str) == Some(transport.name())
                && with
                    .iter()
                    .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, v)| *v)
        .sum()
}

/// Polls the recorder until `check` holds, at most 10 s; returns the samples it held for.
async fn until(what: &str, check: impl Fn(&BTreeMap<Series, f64>) -> bool) -> BTreeMap<Series, f64> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let all = samples(&recorder().render());
        if check(&all) {
            return all;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not recorded within 10 s; the recorder holds:\n{}",
            recorder().render()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn replication_snapshots_votes_and_failures_are_recorded_per_peer_and_transport(transport: Transport) {
    recorder();
    let mut c = Cluster::voters(transport, 3).await;
    let t = transport;
    {
        let n1 = c.node(1);
        let mut writes = futures::stream::iter(0..200)
            .map(|i| n1.write(format!("k{i:04}"), Bytes::from(vec![7u8; 1024])))
            .buffer_unordered(16);
        while let Some(r) = writes.next().await {
            r.unwrap();
        }
    }

    // Pipelined appends, their round trips, heartbeats, bytes and connections, per peer.
    let all = until("replication to node 2", |all| {
        value(
            all,
            "raftwire_rpcs_total",
            t,
            &[("peer", "2"), ("kind", "append"), ("outcome", "ok")],
        ) >= 10.0
            && value(
                all,
                "raftwire_rpcs_total",
                t,
                &[("peer", "2"), ("kind", "heartbeat"), ("outcome", "ok")],
            ) >= 1.0
    })
    .await;
    let appends = value(
        &all,
        "raftwire_rpcs_total",
        t,
        &[("peer", "3"), ("kind", "append"), ("outcome", "ok")],
    );
    assert!(appends >= 10.0, "appends to node 3: {appends}");
    let rtt_count = value(
        &all,
        "raftwire_rpc_round_trip_seconds_count",
        t,
        &[("peer", "2"), ("kind", "append")],
    );
    let rtt_sum = value(
        &all,
        "raftwire_rpc_round_trip_seconds_sum",
        t,
        &[("peer", "2"), ("kind", "append")],
    );
    assert!(
        rtt_count >= 10.0 && rtt_sum > 0.0,
        "round trips: {rtt_count} totalling {rtt_sum} s"
    );
    for peer in ["2", "3"] {
        let sent = value(&all, "raftwire_bytes_sent_total", t, &[("peer", peer)]);
        let received = value(&all, "raftwire_bytes_received_total", t, &[("peer", peer)]);
        // 200 KiB of values went to each follower; their replies are small but not nothing.
        assert!(sent >= 200.0 * 1024.0, "bytes sent to {peer}: {sent}");
        assert!(received > 0.0, "bytes received from {peer}: {received}");
        let connects = value(&all, "raftwire_connects_total", t, &[("peer", peer)]);
        assert!(connects >= 1.0, "connections to {peer}: {connects}");
    }

    // A snapshot to a newcomer: its bytes, its duration, one completed transfer.
    let n1 = c.node(1);
    let upto = n1.sm.last_applied().unwrap().index;
    n1.raft.trigger().snapshot().await.unwrap();
    let wait = n1.raft.wait(Some(Duration::from_secs(10)));
    wait.metrics(|m| m.snapshot.is_some_and(|s| s.index >= upto), "snapshot")
        .await
        .unwrap();
    n1.raft.trigger().purge_log(upto).await.unwrap();
    wait.metrics(|m| m.purged.is_some_and(|p| p.index >= upto), "purge")
        .await
        .unwrap();
    let n4 = KvNode::start(4, demo::raft_config(), c.net.config(4), loopback())
        .await
        .unwrap();
    c.node(1).raft.add_learner(4, n4.node(), true).await.unwrap();
    demo::await_applied(&n4, upto).await.unwrap();
    c.nodes.insert(4, n4);
    // A render reads counters and histograms one after the other: wait for both.
    let all = until("the snapshot to node 4", |all| {
        value(all, "raftwire_snapshot_seconds_count", t, &[("peer", "4")]) >= 1.0
            && value(
                all,
                "raftwire_rpcs_total",
                t,
                &[("peer", "4"), ("kind", "snapshot"), ("outcome", "ok")],
            ) >= 1.0
    })
    .await;
    let snapshot_bytes = value(&all, "raftwire_snapshot_bytes_sent_total", t, &[("peer", "4")]);
    assert!(
        snapshot_bytes >= 200.0 * 1024.0,
        "snapshot bytes: {snapshot_bytes}"
    );
    let snapshots = value(
        &all,
        "raftwire_rpcs_total",
        t,
        &[("peer", "4"), ("kind", "snapshot"), ("outcome", "ok")],
    );
    assert_eq!(
        snapshots,
        1.0,
        "one completed snapshot to node 4; the recorder holds:\n{}",
        recorder().render()
    );

    // A leadership transfer, then the new leader's votes.
    c.node(1).raft.trigger().transfer_leader(2).await.unwrap();
    assert_eq!(c.await_leader(1, Some(1)).await, 2);
    until("the transfer and the new leader's votes", |all| {
        value(
            all,
            "raftwire_rpcs_total",
            t,
            &[("peer", "2"), ("kind", "transfer_leader"), ("outcome", "ok")],
        ) >= 1.0
            && value(
                all,
                "raftwire_rpcs_total",
                t,
                &[("peer", "1"), ("kind", "vote"), ("outcome", "ok")],
            ) >= 1.0
    })
    .await;

    // A follower gone: calls to it fail, and the failures are counted by what went wrong.
    let mut n3 = c.nodes.remove(&3).unwrap();
    n3.stop().await.unwrap();
    let n2 = c.node(2);
    n2.write("after node 3 left", "x").await.unwrap();
    let failed = |all: &BTreeMap<Series, f64>| {
        all.iter()
            .filter(|((n, l), _)| {
                n == "raftwire_rpcs_total"
                    && l.get("transport").map(String::as_str) == Some(t.name())
                    && l.get("peer").map(String::as_str) == Some("3")
                    && !matches!(l.get("outcome").map(String::as_str), Some("ok" | "rejected"))
            })
            .map(|((_, l), v)| format!("{}={v}", l["outcome"]))
            .collect::<Vec<_>>()
    };
    let all = until("failed calls to the stopped node 3", |all| {
        !failed(all).is_empty()
    })
    .await;
    for outcome in failed(&all) {
        let name = outcome.split('=').next().unwrap();
        assert!(
            ["connect", "timeout", "broken"].contains(&name),
            "a stopped peer fails calls by connect, timeout or broken: {outcome}"
        );
    }

    // Once every node is down, nothing is in flight any more.
    c.shutdown().await;
    until("no request in flight after shutdown", |all| {
        all.iter()
            .filter(|((n, l), _)| {
                n == "raftwire_append_in_flight" && l.get("transport").map(String::as_str) == Some(t.name())
            })
            .all(|(_, v)| *v == 0.0)
    })
    .await;
}
