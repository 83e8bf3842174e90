//! `raftwire node` processes on durable storage, driven only by `raftwire ctl` and signals, on
//! 127.0.0.1: a 3-voter cluster formed, loaded, its leader killed with SIGKILL and restarted
//! from its data directory, a clean SIGTERM stop, and the start-up errors a node reports. On
//! every transport.
#![cfg(all(feature = "app", feature = "grpc"))]

mod common;

use std::process::Command;
use std::process::Stdio;
use std::time::Duration;

use common::procs::BIN;
use common::procs::Bed;

fn cluster_lifecycle(transport: &'static str) {
    let mut bed = Bed::new(transport, &[1, 2, 3], None);
    for id in [1, 2, 3] {
        bed.start(id);
    }
    bed.ctl_ok(&["init"]);
    for id in [2, 3] {
        let addr = bed.raft_addr(id);
        bed.ctl_ok(&["add-learner", &id.to_string(), &addr]);
    }
    bed.ctl_ok(&["promote", "2,3"]);
    bed.ctl_ok(&["put", "greeting", "hello"]);
    let got = bed.ctl_ok(&["get", "greeting"]);
    assert_eq!(got["value"], "hello", "{got}");
    bed.check_metrics(&[1, 2, 3]);

    // A load with the leader killed in the middle.
    let keys = bed.dir.path().join("keys.tsv");
    let load = bed
        .ctl_command(
            &bed.endpoints(),
            &[
                "load",
                "--writes",
                "3000",
                "--concurrency",
                "16",
                "--value-size",
                "32",
                "--keys-out",
                keys.to_str().unwrap(),
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let old = bed.leader();
    let status = bed.signal(old, "-KILL");
    assert!(!status.success(), "SIGKILL ends the process");
    let out = load.wait_with_output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("load: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert!(report["acknowledged"].as_u64().unwrap() > 0, "{report}");
    let new = bed.leader();
    assert_ne!(new, old, "a new leader after killing node {old}");

    // The killed node restarts from its data directory and catches up.
    bed.start(old);
    let up = bed.await_converged(&[1, 2, 3]);
    let keys_written = std::fs::read_to_string(&keys).unwrap();
    let acked: Vec<&str> = keys_written.lines().collect();
    assert_eq!(acked.len() as u64, report["acknowledged"].as_u64().unwrap());
    // Every acknowledged load key, and "greeting".
    assert!(up[0]["keys"].as_u64().unwrap() > acked.len() as u64);
    // Spot-check acknowledged writes through a linearizable read.
    for line in acked.iter().step_by(acked.len().max(1) / 20 + 1) {
        let key = line.split('\t').next().unwrap();
        let got = bed.ctl_ok(&["get", key]);
        assert_eq!(got["found"], true, "acknowledged {key} lost: {got}");
    }

    // A clean stop: SIGTERM, exit status 0, and the rest keep a leader.
    let leader = bed.leader();
    let status = bed.signal(leader, "-TERM");
    assert!(
        status.success(),
        "SIGTERM exits 0: {status:?}\n{}",
        bed.log(leader)
    );
    let next = bed.leader();
    assert_ne!(next, leader);
    bed.ctl_ok(&["put", "after", "stop"]);
}

#[test]
fn grpc_cluster_lifecycle() {
    cluster_lifecycle("grpc");
}

#[cfg(feature = "quic")]
#[test]
fn quic_cluster_lifecycle() {
    cluster_lifecycle("quic");
}

/// Each start-up mistake ends with one line naming the problem and a non-zero status.
#[test]
fn start_up_errors_are_one_line_and_fail() {
    let mut bed = Bed::new("grpc", &[1, 2], None);
    let check = |args: Vec<String>, needle: &str| {
        let out = Command::new(BIN).args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        let line = stderr.lines().find(|l| l.contains("error")).unwrap_or_default();
        assert!(
            line.contains(needle),
            "{args:?}: expected `{needle}` in: {stderr}"
        );
    };
    // A bad flag value.
    let mut args = bed.node_args(1);
    args[4] = "not-an-address".into();
    check(args, "--listen");
    // Missing certificates.
    let mut args = bed.node_args(1);
    args[12] = bed.dir.path().join("nowhere").display().to_string();
    check(args, "nowhere");
    // A data directory that belongs to another node.
    std::fs::create_dir_all(bed.data(2)).unwrap();
    std::fs::write(bed.data(2).join("node-id"), "2\n").unwrap();
    let mut args = bed.node_args(1);
    args[10] = bed.data(2).display().to_string();
    check(args, "belongs to node 2");
    // Node 2's certificate for node 1 (a mismatch).
    let certs = bed.certs();
    let swapped = bed.dir.path().join("swapped");
    std::fs::create_dir_all(&swapped).unwrap();
    std::fs::copy(certs.join("ca.pem"), swapped.join("ca.pem")).unwrap();
    std::fs::copy(certs.join("node-2.pem"), swapped.join("node-1.pem")).unwrap();
    std::fs::copy(certs.join("node-2.key"), swapped.join("node-1.key")).unwrap();
    let mut args = bed.node_args(1);
    args[12] = swapped.display().to_string();
    check(args, "node 2");
    // A port in use.
    bed.start(2);
    let mut args = bed.node_args(1);
    args[4] = format!("127.0.0.1:{}", bed.node(2).raft);
    check(args, "in use");
    // A metrics port in use: named as the metrics listener's.
    let mut args = bed.node_args(1);
    let last = args.len() - 1;
    args[last] = format!("127.0.0.1:{}", bed.node(2).metrics);
    check(args, "cannot serve metrics");
    // A metrics address that is not one.
    let mut args = bed.node_args(1);
    args[last] = "localhost".into();
    check(args, "--metrics-listen");
    let _ = bed.signal(2, "-TERM");
}
