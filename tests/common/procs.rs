//! `raftwire node` processes driven by `raftwire ctl`, on 127.0.0.1 or each in a network
//! namespace of its own ("hosts" on a bridge). Everything a bed made (processes, namespaces,
//! files) goes when it is dropped, also when the test fails.

use std::path::PathBuf;
use std::process::Child;
use std::process::Command;
use std::process::ExitStatus;
use std::process::Output;
use std::process::Stdio;
use std::time::Duration;
use std::time::Instant;

pub const BIN: &str = env!("CARGO_BIN_EXE_raftwire");

pub fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("raftwire runs")
}

/// A port free on both TCP and UDP (so every transport can use it), and another for the API.
fn free_ports() -> (u16, u16, u16) {
    loop {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        let Ok(udp) = std::net::UdpSocket::bind(("127.0.0.1", port)) else {
            continue;
        };
        let api = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let api_port = api.local_addr().unwrap().port();
        let metrics = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let metrics_port = metrics.local_addr().unwrap().port();
        drop((tcp, udp, api, metrics));
        return (port, api_port, metrics_port);
    }
}

/// `ip ARGS`, which must succeed.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip runs");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Network namespaces standing in for hosts: one per node (`<prefix>n<id>`, address
/// `10.<subnet>.0.<id>`) and a switch namespace holding the bridge, where `ctl` runs (address
/// `10.<subnet>.0.254`). Removed on drop.
pub struct Netns {
    prefix: String,
    subnet: u8,
    made: Vec<String>,
}

impl Netns {
    /// Whether namespaces can be made here (root, iproute2); the reason when not.
    pub fn unavailable() -> Option<String> {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let root = status
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .is_some_and(|l| l.split_whitespace().nth(1) == Some("0"));
        if !root {
            return Some("not running as root".into());
        }
        match Command::new("ip").args(["netns", "list"]).output() {
            Ok(o) if o.status.success() => None,
            Ok(o) => Some(format!(
                "`ip netns` fails: {}",
                String::from_utf8_lossy(&o.stderr)
            )),
            Err(e) => Some(format!("no `ip` command: {e}")),
        }
    }

    /// Makes the switch and one namespace per id.
    pub fn new(tag: &str, subnet: u8, ids: &[u64]) -> Netns {
        let prefix = format!("rw{}{tag}", std::process::id() % 100_000);
        let mut net = Netns {
            prefix: prefix.clone(),
            subnet,
            made: Vec::new(),
        };
        let sw = net.switch();
        ip(&["netns", "add", &sw]);
        net.made.push(sw.clone());
        ip(&["-n", &sw, "link", "set", "lo", "up"]);
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"]);
        ip(&[
            "-n",
            &sw,
            "addr",
            "add",
            &format!("10.{subnet}.0.254/24"),
            "dev",
            "br0",
        ]);
        ip(&["-n", &sw, "link", "set", "br0", "up"]);
        for &id in ids {
            net.add_host(id);
        }
        net
    }

    pub fn switch(&self) -> String {
        format!("{}sw", self.prefix)
    }

    pub fn host(&self, id: u64) -> String {
        format!("{}n{id}", self.prefix)
    }

    pub fn addr(&self, id: u64) -> String {
        format!("10.{}.0.{id}", self.subnet)
    }

    /// One more host on the bridge.
    pub fn add_host(&mut self, id: u64) {
        let (ns, sw) = (self.host(id), self.switch());
        ip(&["netns", "add", &ns]);
        self.made.push(ns.clone());
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        let (inner, outer) = (format!("v{id}"), format!("p{id}"));
        ip(&[
            "-n", &ns, "link", "add", &inner, "type", "veth", "peer", "name", &outer, "netns", &sw,
        ]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{}/24", self.addr(id)),
            "dev",
            &inner,
        ]);
        ip(&["-n", &ns, "link", "set", &inner, "up"]);
        ip(&["-n", &sw, "link", "set", &outer, "master", "br0"]);
        ip(&["-n", &sw, "link", "set", &outer, "up"]);
    }

    /// Host `id` stops reaching `others` (blackhole routes in its namespace).
    pub fn cut(&self, id: u64, others: &[u64]) {
        for o in others {
            ip(&[
                "-n",
                &self.host(id),
                "route",
                "add",
                "blackhole",
                &format!("{}/32", self.addr(*o)),
            ]);
        }
    }

    /// Undoes `cut`.
    pub fn heal(&self, id: u64, others: &[u64]) {
        for o in others {
            ip(&[
                "-n",
                &self.host(id),
                "route",
                "del",
                "blackhole",
                &format!("{}/32", self.addr(*o)),
            ]);
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting a namespace deletes its veth ends (and their peers) with it.
        for ns in self.made.drain(..).rev() {
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        }
    }
}

pub struct Node {
    pub id: u64,
    pub host: String,
    pub raft: u16,
    pub api: u16,
    pub metrics: u16,
    child: Option<Child>,
}

/// Node processes; killed (SIGKILL) when dropped, whatever happened.
pub struct Bed {
    pub dir: tempfile::TempDir,
    pub transport: &'static str,
    pub nodes: Vec<Node>,
    /// `None`: every node on 127.0.0.1.
    pub net: Option<Netns>,
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
    /// Certificates for `ids` (and a client `ops`); nodes on loopback, or on `net`.
    pub fn new(transport: &'static str, ids: &[u64], net: Option<Netns>) -> Bed {
        let dir = tempfile::tempdir().unwrap();
        let mut bed = Bed {
            dir,
            transport,
            nodes: Vec::new(),
            net,
        };
        let hosts: Vec<String> = match &bed.net {
            Some(net) => ids.iter().map(|id| net.addr(*id)).collect(),
            None => vec!["127.0.0.1".into()],
        };
        let certs = bed.certs();
        let list: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
        let out = run(&[
            "certs",
            "init",
            "--out",
            certs.to_str().unwrap(),
            "--nodes",
            &list.join(","),
            "--hosts",
            &hosts.join(","),
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
        for &id in ids {
            bed.add_node(id);
        }
        bed
    }

    /// Plans node `id` (its host and ports); `start` runs it.
    pub fn add_node(&mut self, id: u64) {
        let (host, raft, api, metrics) = match &self.net {
            Some(net) => (net.addr(id), 7000, 7001, 7002),
            None => {
                let (raft, api, metrics) = free_ports();
                ("127.0.0.1".to_string(), raft, api, metrics)
            }
        };
        self.nodes.push(Node {
            id,
            host,
            raft,
            api,
            metrics,
            child: None,
        });
    }

    pub fn certs(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    pub fn data(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("data-{id}"))
    }

    pub fn node(&self, id: u64) -> &Node {
        self.nodes.iter().find(|n| n.id == id).unwrap()
    }

    pub fn raft_addr(&self, id: u64) -> String {
        let n = self.node(id);
        format!("{}:{}", n.host, n.raft)
    }

    /// A command run on node `id`'s host (`None`: where `ctl` runs).
    fn command(&self, host: Option<u64>) -> Command {
        match (&self.net, host) {
            (Some(net), Some(id)) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &net.host(id), BIN]);
                c
            }
            (Some(net), None) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &net.switch(), BIN]);
                c
            }
            (None, _) => Command::new(BIN),
        }
    }

    pub fn node_args(&self, id: u64) -> Vec<String> {
        self.node_args_with(id, &self.certs())
    }

    pub fn node_args_with(&self, id: u64, certs: &std::path::Path) -> Vec<String> {
        let n = self.node(id);
        let listen = match &self.net {
            Some(_) => format!("0.0.0.0:{}", n.raft),
            None => format!("127.0.0.1:{}", n.raft),
        };
        let api_host = if self.net.is_some() {
            "0.0.0.0"
        } else {
            "127.0.0.1"
        };
        vec![
            "node".into(),
            "--id".into(),
            id.to_string(),
            "--listen".into(),
            listen,
            "--advertise".into(),
            self.raft_addr(id),
            "--api-listen".into(),
            format!("{api_host}:{}", n.api),
            "--data-dir".into(),
            self.data(id).display().to_string(),
            "--certs".into(),
            certs.display().to_string(),
            "--transport".into(),
            self.transport.into(),
            "--metrics-listen".into(),
            format!("{api_host}:{}", n.metrics),
        ]
    }

    /// Starts node `id` and waits until its client API answers a status.
    pub fn start(&mut self, id: u64) {
        let certs = self.certs();
        self.start_with(id, &certs);
        let deadline = Instant::now() + Duration::from_secs(20);
        let endpoint = format!("{}:{}", self.node(id).host, self.node(id).api);
        loop {
            let (v, _) = self.ctl_at(&endpoint, &["status"]);
            if v["nodes"][0].get("id").is_some() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {id} did not start: {v}\n{}",
                self.log(id)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts node `id` with the certificates in `certs`, not waiting for it.
    pub fn start_with(&mut self, id: u64, certs: &std::path::Path) {
        let args = self.node_args_with(id, certs);
        let log = std::fs::File::create(self.dir.path().join(format!("node-{id}.log"))).unwrap();
        let child = self
            .command(Some(id))
            .args(&args)
            .env("RAFTWIRE_LOG", "info,openraft=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.nodes.iter_mut().find(|n| n.id == id).unwrap().child = Some(child);
    }

    /// Node `id`'s `/metrics` page, fetched from where `ctl` runs (HTTP/1.0 by hand: the
    /// namespaces have no HTTP client, bash's /dev/tcp is enough).
    pub fn scrape(&self, id: u64) -> String {
        let n = self.node(id);
        let script = format!(
            "exec 3<>/dev/tcp/{}/{} && printf 'GET /metrics HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3",
            n.host, n.metrics
        );
        let mut c = match &self.net {
            Some(net) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &net.switch(), "bash", "-c", &script]);
                c
            }
            None => {
                let mut c = Command::new("bash");
                c.args(["-c", &script]);
                c
            }
        };
        let out = c.output().unwrap();
        let page = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success() && page.starts_with("HTTP/1.1 200 OK"),
            "scraping node {id}: {page}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        page
    }

    /// Every node's `/metrics` page has openraft's view of the cluster, and the leader's has the
    /// network's per-peer metrics on this transport.
    pub fn check_metrics(&self, ids: &[u64]) {
        let (bed, transport) = (self, self.transport);
        let leader = bed.leader();
        for &id in ids {
            let page = bed.scrape(id);
            assert!(
                page.contains(&format!("raftwire_raft_leader{{node=\"{id}\"}} {leader}\n")),
                "node {id} names its leader: {page}"
            );
            assert!(
                page.contains(&format!("raftwire_raft_term{{node=\"{id}\"}} ")),
                "{page}"
            );
            assert!(
                page.contains(&format!("raftwire_raft_applied_index{{node=\"{id}\"}} ")),
                "{page}"
            );
        }
        let page = bed.scrape(leader);
        assert!(
            page.contains(&format!("raftwire_raft_is_leader{{node=\"{leader}\"}} 1\n")),
            "{page}"
        );
        for &follower in ids.iter().filter(|f| **f != leader) {
            assert!(
                page.contains(&format!(
                    "raftwire_raft_follower_lag{{node=\"{leader}\",follower=\"{follower}\"}} "
                )),
                "the leader reports follower {follower}'s lag: {page}"
            );
            let appends = page.lines().find(|l| {
                l.starts_with("raftwire_rpcs_total{")
                    && [
                        format!("peer=\"{follower}\""),
                        format!("transport=\"{transport}\""),
                        "kind=\"append\"".into(),
                        "outcome=\"ok\"".into(),
                    ]
                    .iter()
                    .all(|label| l.contains(label.as_str()))
            });
            assert!(
                appends.is_some(),
                "appends to {follower} over {transport}: {page}"
            );
            assert!(
                page.contains("# TYPE raftwire_rpc_round_trip_seconds histogram"),
                "{page}"
            );
        }
    }

    /// Whether node `id`'s process is still running.
    pub fn running(&mut self, id: u64) -> bool {
        let n = self.nodes.iter_mut().find(|n| n.id == id).unwrap();
        n.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn log(&self, id: u64) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("node-{id}.log"))).unwrap_or_default()
    }

    /// Sends `signal` (`-TERM`, `-KILL`) to node `id` and waits for it to exit.
    pub fn signal(&mut self, id: u64, signal: &str) -> ExitStatus {
        let n = self.nodes.iter_mut().find(|n| n.id == id).unwrap();
        let mut child = n.child.take().unwrap();
        // `ip netns exec` execs the node: the child's pid is the node's.
        let status = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        child.wait().unwrap()
    }

    pub fn endpoints(&self) -> String {
        let all: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| format!("{}:{}", n.host, n.api))
            .collect();
        all.join(",")
    }

    /// `raftwire ctl --json <args>` against every running node: the JSON object it printed,
    /// and whether it exited 0.
    pub fn ctl(&self, args: &[&str]) -> (serde_json::Value, bool) {
        self.ctl_at(&self.endpoints(), args)
    }

    fn ctl_at(&self, endpoints: &str, args: &[&str]) -> (serde_json::Value, bool) {
        let out = self.ctl_command(endpoints, args).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let value: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "ctl {args:?}: not one JSON object ({e}): {stdout} / {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (value, out.status.success())
    }

    /// The `ctl` command line (to spawn it in the background).
    pub fn ctl_command(&self, endpoints: &str, args: &[&str]) -> Command {
        let certs = self.certs();
        let mut c = self.command(None);
        c.args([
            "ctl",
            "--endpoints",
            endpoints,
            "--certs",
            certs.to_str().unwrap(),
        ])
        .args(["--client", "ops", "--json"])
        .args(args);
        c
    }

    pub fn ctl_ok(&self, args: &[&str]) -> serde_json::Value {
        let (v, ok) = self.ctl(args);
        assert!(ok, "ctl {args:?} failed: {v}");
        v
    }

    /// Polls `ctl status` until `check` holds for the nodes that answer.
    pub fn await_status(
        &self,
        what: &str,
        check: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (v, _) = self.ctl(&["status"]);
            let nodes: Vec<serde_json::Value> = v["nodes"].as_array().cloned().unwrap_or_default();
            let up: Vec<serde_json::Value> = nodes.into_iter().filter(|n| n.get("error").is_none()).collect();
            if check(&up) {
                return up;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within 60 s; last status {v}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The leader as the nodes at the highest term see it.
    pub fn leader(&self) -> u64 {
        let up = self.await_status("a leader at the highest term", |up| top_leader(up).is_some());
        top_leader(&up).unwrap()
    }

    /// Waits until every node in `ids` answers with the same digest and applied index.
    pub fn await_converged(&self, ids: &[u64]) -> Vec<serde_json::Value> {
        self.await_status("every node equal", |up| {
            ids.iter()
                .all(|id| up.iter().any(|n| n["id"].as_u64() == Some(*id)))
                && up
                    .iter()
                    .all(|n| n["digest"] == up[0]["digest"] && n["applied"] == up[0]["applied"])
        })
    }
}

/// The node that leads at the highest term any node reports.
fn top_leader(up: &[serde_json::Value]) -> Option<u64> {
    let top = up.iter().filter_map(|n| n["term"].as_u64()).max()?;
    up.iter()
        .find(|n| n["role"] == "leader" && n["term"].as_u64() == Some(top))
        .and_then(|n| n["id"].as_u64())
}
