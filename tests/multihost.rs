//! A secured cluster across hosts: each `raftwire node` in a network namespace of its own,
//! joined by veth pairs on a bridge (private addresses 10.x.0.0/24), driven only by
//! `raftwire ctl` (from the bridge's namespace) and signals. On each transport: a 3-voter
//! cluster under a 20,000-write load whose leader is killed with SIGKILL and restarted from
//! its data directory; the leader cut off by blackhole routes, a new leader elected by the
//! majority, the partition healed; a learner added after a snapshot purged the log; a node
//! with a foreign CA's certificate refused; the operator's client certificate refused on the
//! Raft listener; every node's `/metrics` scraped; every acknowledged write readable and every node's
//! digest equal. Needs root and network namespaces: skipped with a loud message otherwise.
//! Runs when both transports are compiled (the default build), which covers each of them.
#![cfg(all(feature = "app", feature = "grpc", feature = "quic"))]

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use common::procs::Bed;
use common::procs::Netns;
use common::procs::run;
use common::raw;
use common::raw::RAFT_RPCS;
use raftwire::Transport;

fn multihost(transport: &'static str, subnet: u8) {
    if let Some(why) = Netns::unavailable() {
        eprintln!(
            "!!! SKIPPING the multi-host test ({transport}): {why}. It needs root and network namespaces."
        );
        return;
    }
    let net = Netns::new(&transport[..1], subnet, &[1, 2, 3]);
    let mut bed = Bed::new(transport, &[1, 2, 3, 4], Some(net));
    // Node 4 joins later; its host is made now.
    for id in [1, 2, 3] {
        bed.start(id);
    }
    bed.ctl_ok(&["init"]);
    for id in [2, 3] {
        let addr = bed.raft_addr(id);
        bed.ctl_ok(&["add-learner", &id.to_string(), &addr]);
    }
    bed.ctl_ok(&["promote", "2,3"]);
    bed.ctl_ok(&["put", "first", "1"]);
    bed.check_metrics(&[1, 2, 3]);
    client_certificate_cannot_append(&bed);

    // 20,000 writes; the leader is killed (SIGKILL) while they run.
    let keys = bed.dir.path().join("keys.tsv");
    let load = bed
        .ctl_command(
            &bed.endpoints(),
            &[
                "load",
                "--writes",
                "20000",
                "--concurrency",
                "32",
                "--value-size",
                "64",
                "--keys-out",
                keys.to_str().unwrap(),
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let first = bed.leader();
    assert!(!bed.signal(first, "-KILL").success());
    let second = bed.leader();
    assert_ne!(second, first, "a new leader after killing node {first}");
    let out = load.wait_with_output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("load: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    let acked = report["acknowledged"].as_u64().unwrap();
    assert!(acked > 10_000, "{report}");
    eprintln!("{transport}: load with the leader killed: {report}");
    bed.start(first);
    bed.await_converged(&[1, 2, 3]);

    // The leader cut off from the others (blackhole routes in its namespace): the majority
    // elects a new leader and keeps committing; healed, the old leader converges.
    let cut = bed.leader();
    let others: Vec<u64> = [1, 2, 3].into_iter().filter(|i| *i != cut).collect();
    bed.net.as_ref().unwrap().cut(cut, &others);
    let majority_leader = {
        let up = bed.await_status("a new leader in the majority", |up| {
            up.iter().any(|n| {
                n["role"] == "leader"
                    && n["id"].as_u64() != Some(cut)
                    && others.contains(&n["id"].as_u64().unwrap_or(0))
            })
        });
        up.iter()
            .find(|n| n["role"] == "leader" && n["id"].as_u64() != Some(cut))
            .unwrap()["id"]
            .as_u64()
            .unwrap()
    };
    assert_ne!(majority_leader, cut);
    bed.ctl_ok(&["put", "during-partition", "majority"]);
    bed.net.as_ref().unwrap().heal(cut, &others);
    bed.await_converged(&[1, 2, 3]);

    // A snapshot purges the leader's log; a new learner can only catch up from it.
    bed.ctl_ok(&["snapshot"]);
    bed.net.as_mut().unwrap().add_host(4);
    bed.start(4);
    let addr4 = bed.raft_addr(4);
    bed.ctl_ok(&["add-learner", "4", &addr4]);
    let up = bed.await_converged(&[1, 2, 3, 4]);
    let keys_total = up[0]["keys"].as_u64().unwrap();
    assert!(keys_total > acked, "{keys_total} keys, {acked} acknowledged");

    // Every acknowledged write is readable (a sample, through linearizable reads; the digests
    // above already say every node holds the same data).
    let written = std::fs::read_to_string(&keys).unwrap();
    let lines: Vec<&str> = written.lines().collect();
    assert_eq!(lines.len() as u64, acked);
    for line in lines.iter().step_by(lines.len() / 25 + 1) {
        let mut fields = line.split('\t');
        let key = fields.next().unwrap();
        let hex = fields.nth(1).unwrap();
        let got = bed.ctl_ok(&["get", key]);
        let value = got["value"].as_str().unwrap_or_default();
        let value_hex: String = value.bytes().map(|b| format!("{b:02x}")).collect();
        // Values are bytes; ctl shows them as (lossy) text: compare when it is plain ASCII.
        if value.is_ascii() {
            assert_eq!(value_hex, hex, "{key}");
        }
        assert_eq!(got["found"], true, "acknowledged {key} lost");
    }

    // A node whose certificate a foreign CA signed cannot join.
    let foreign = bed.dir.path().join("foreign");
    let out = run(&[
        "certs",
        "init",
        "--out",
        foreign.to_str().unwrap(),
        "--nodes",
        "5",
        "--ca-name",
        "some other CA",
    ]);
    assert!(out.status.success());
    bed.add_node(5);
    bed.net.as_mut().unwrap().add_host(5);
    bed.start_with(5, &foreign);
    std::thread::sleep(Duration::from_millis(500));
    assert!(bed.running(5), "the foreign node runs: {}", bed.log(5));
    let addr5 = bed.raft_addr(5);
    let (v, ok) = bed.ctl(&["add-learner", "5", &addr5]);
    assert!(!ok, "a node with a foreign certificate joined: {v}");
    assert!(bed.running(5), "{}", bed.log(5));
    bed.ctl_ok(&["remove", "5"]);
    bed.ctl_ok(&["put", "after-foreign", "ok"]);
}

/// From the operators' side of the bridge: the operator's client certificate is refused on
/// the leader's Raft listener for appends (pipelined or not), while a node certificate making
/// the same raw calls is answered, so the refusal is the certificate's doing.
fn client_certificate_cannot_append(bed: &Bed) {
    let transport = Transport::parse_list(bed.transport).unwrap()[0];
    let certs = bed.certs();
    let read = |f: &str| std::fs::read_to_string(certs.join(f)).unwrap();
    let (ca, ops_cert, ops_key) = (read("ca.pem"), read("client-ops.pem"), read("client-ops.key"));
    let leader = bed.leader();
    let other = [1, 2, 3].into_iter().find(|id| *id != leader).unwrap();
    let (node_cert, node_key) = (
        read(&format!("node-{other}.pem")),
        read(&format!("node-{other}.key")),
    );
    let addr: SocketAddr = bed.raft_addr(leader).parse().unwrap();
    let switch = bed.net.as_ref().unwrap().switch();
    in_netns(&switch, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            for rpc in RAFT_RPCS.into_iter().filter(|(name, _)| name.contains("Append")) {
                let what = format!("{transport:?} {} with a client certificate", rpc.0);
                let ops = raw::client_crypto_pem(transport, &ca, Some((&ops_cert, &ops_key)));
                let err = raw::raw_rpc(transport, ops, addr, leader, rpc)
                    .await
                    .expect_err(&format!("{what}: answered"));
                // The server's alert names the refusal; across a real link the client's first
                // HTTP/2 bytes may instead meet the closed connection (a reset), which still
                // is a refusal before any call was read (tests/tls.rs checks the alert).
                let refused = ["AccessDenied", "reset", "Broken pipe", "closed"];
                assert!(refused.iter().any(|r| err.contains(r)), "{what}: {err}");
                let node = raw::client_crypto_pem(transport, &ca, Some((&node_cert, &node_key)));
                let answer = raw::raw_rpc(transport, node, addr, leader, rpc).await;
                assert!(
                    answer.is_ok(),
                    "{transport:?} {} from node {other}: {answer:?}",
                    rpc.0
                );
            }
        });
    });
}

/// Runs `f` on a thread inside the network namespace `ns` (a namespace `ip netns` made).
fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    use std::os::fd::AsRawFd;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let file = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
                // SAFETY: setns with a valid namespace fd changes only this thread's network
                // namespace; the thread ends with `f`.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns {ns}: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .unwrap()
    })
}

#[test]
fn grpc_across_namespaces() {
    multihost("grpc", 77);
}

#[test]
fn quic_across_namespaces() {
    multihost("quic", 78);
}

#[cfg(feature = "tcp")]
#[test]
fn tcp_across_namespaces() {
    multihost("tcp", 79);
}
