//! `raftwire node` processes on durable storage, driven only by `raftwire ctl` and signals, on
//! 127.0.0.1: a 3-voter cluster formed, loaded, its leader killed with SIGKILL and restarted
//! from its data directory, a clean SIGTERM stop, and the start-up errors a node reports. On
//! every transport.
#![cfg(all(feature = "app", feature = "grpc"))]

use std::path::PathBuf;
use std::process::Child;
use std::process::Command;
use std::process::Output;
use std::process::Stdio;
use std::time::Duration;
use std::time::Instant;

const BIN: &str = env!("CARGO_BIN_EXE_raftwire");

/// A port free on both TCP and UDP (so every transport can use it), and another for the API.
fn free_ports() -> (u16, u16) {
    loop {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        let Ok(udp) = std::net::UdpSocket::bind(("127.0.0.1", port)) else {
            continue;
        };
        let api = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let api_port = api.local_addr().unwrap().port();
        drop((tcp, udp, api));
        return (port, api_port);
    }
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("raftwire runs")
}

/// The node processes of a test; killed (SIGKILL) when dropped, whatever happened.
struct Bed {
    dir: tempfile::TempDir,
    transport: &'static str,
    nodes: Vec<Node>,
}

struct Node {
    id: u64,
    raft: u16,
    api: u16,
    child: Option<Child>,
}

impl Drop for Bed {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

impl Bed {
    fn new(transport: &'static str, ids: &[u64]) -> Bed {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        let nodes: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
        let out = run(&[
            "certs",
            "init",
            "--out",
            certs.to_str().unwrap(),
            "--nodes",
            &nodes.join(","),
            "--hosts",
            "127.0.0.1",
        ]);
        assert!(
            out.status.success(),
            "certs init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = run(&[
            "certs",
            "add-client",
            "--dir",
            certs.to_str().unwrap(),
            "--name",
            "ops",
        ]);
        assert!(
            out.status.success(),
            "certs add-client: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let nodes = ids
            .iter()
            .map(|&id| {
                let (raft, api) = free_ports();
                Node {
                    id,
                    raft,
                    api,
                    child: None,
                }
            })
            .collect();
        Bed {
            dir,
            transport,
            nodes,
        }
    }

    fn certs(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    fn data(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("data-{id}"))
    }

    fn node(&self, id: u64) -> &Node {
        self.nodes.iter().find(|n| n.id == id).unwrap()
    }

    fn node_args(&self, id: u64) -> Vec<String> {
        let n = self.node(id);
        vec![
            "node".into(),
            "--id".into(),
            id.to_string(),
            "--listen".into(),
            format!("127.0.0.1:{}", n.raft),
            "--advertise".into(),
            format!("127.0.0.1:{}", n.raft),
            "--api-listen".into(),
            format!("127.0.0.1:{}", n.api),
            "--data-dir".into(),
            self.data(id).display().to_string(),
            "--certs".into(),
            self.certs().display().to_string(),
            "--transport".into(),
            self.transport.into(),
        ]
    }

    /// Starts node `id` and waits until its client API accepts connections.
    fn start(&mut self, id: u64) {
        let args = self.node_args(id);
        let log = std::fs::File::create(self.dir.path().join(format!("node-{id}.log"))).unwrap();
        let child = Command::new(BIN)
            .args(&args)
            .env("RAFTWIRE_LOG", "info,openraft=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let api = self.node(id).api;
        self.nodes.iter_mut().find(|n| n.id == id).unwrap().child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", api)).is_err() {
            assert!(
                Instant::now() < deadline,
                "node {id} did not start: {}",
                self.log(id)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self, id: u64) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("node-{id}.log"))).unwrap_or_default()
    }

    fn signal(&mut self, id: u64, signal: &str) -> std::process::ExitStatus {
        let n = self.nodes.iter_mut().find(|n| n.id == id).unwrap();
        let mut child = n.child.take().unwrap();
        let status = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        child.wait().unwrap()
    }

    fn endpoints(&self) -> String {
        let all: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.api))
            .collect();
        all.join(",")
    }

    /// `raftwire ctl --json <args>`: the JSON object it printed, and whether it exited 0.
    fn ctl(&self, args: &[&str]) -> (serde_json::Value, bool) {
        let certs = self.certs();
        let endpoints = self.endpoints();
        let mut all = vec![
            "ctl",
            "--endpoints",
            &endpoints,
            "--certs",
            certs.to_str().unwrap(),
            "--client",
            "ops",
            "--json",
        ];
        all.extend_from_slice(args);
        let out = run(&all);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let value: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "ctl {args:?}: not one JSON object ({e}): {stdout} / {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (value, out.status.success())
    }

    fn ctl_ok(&self, args: &[&str]) -> serde_json::Value {
        let (v, ok) = self.ctl(args);
        assert!(ok, "ctl {args:?} failed: {v}");
        v
    }

    /// Polls `ctl status` until `check` holds for the answering nodes.
    fn await_status(
        &self,
        what: &str,
        check: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (v, _) = self.ctl(&["status"]);
            let nodes: Vec<serde_json::Value> = v["nodes"].as_array().cloned().unwrap_or_default();
            let up: Vec<serde_json::Value> = nodes.into_iter().filter(|n| n.get("error").is_none()).collect();
            if check(&up) {
                return up;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within 30 s; last status {v}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn leader(&self) -> u64 {
        let up = self.await_status("a leader", |up| up.iter().any(|n| n["role"] == "leader"));
        up.iter().find(|n| n["role"] == "leader").unwrap()["id"]
            .as_u64()
            .unwrap()
    }
}

fn cluster_lifecycle(transport: &'static str) {
    let mut bed = Bed::new(transport, &[1, 2, 3]);
    for id in [1, 2, 3] {
        bed.start(id);
    }
    bed.ctl_ok(&["init"]);
    for id in [2, 3] {
        let addr = format!("127.0.0.1:{}", bed.node(id).raft);
        bed.ctl_ok(&["add-learner", &id.to_string(), &addr]);
    }
    bed.ctl_ok(&["promote", "2,3"]);
    bed.ctl_ok(&["put", "greeting", "hello"]);
    let got = bed.ctl_ok(&["get", "greeting"]);
    assert_eq!(got["value"], "hello", "{got}");

    // A load with the leader killed in the middle.
    let keys = bed.dir.path().join("keys.tsv");
    let certs = bed.certs();
    let endpoints = bed.endpoints();
    let load = Command::new(BIN)
        .args([
            "ctl",
            "--endpoints",
            &endpoints,
            "--certs",
            certs.to_str().unwrap(),
            "--client",
            "ops",
            "--json",
        ])
        .args([
            "load",
            "--writes",
            "3000",
            "--concurrency",
            "16",
            "--value-size",
            "32",
        ])
        .args(["--keys-out", keys.to_str().unwrap()])
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
    let up = bed.await_status("every node equal", |up| {
        up.len() == 3
            && up
                .iter()
                .all(|n| n["digest"] == up[0]["digest"] && n["applied"] == up[0]["applied"])
    });
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
    let mut bed = Bed::new("grpc", &[1, 2]);
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
    let _ = bed.signal(2, "-TERM");
}
