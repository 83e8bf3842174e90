//! The `raftwire demo` run: a whole cluster lifecycle on loopback, in one process.
//!
//! Three nodes start; node 1 initializes, adds 2 and 3 as learners and promotes them; `N` keys
//! are written and read back linearizably; the leader is stopped and the failover observed;
//! the old leader restarts and catches up; the new leader snapshots and purges its log; a 4th
//! node joins and catches up through the snapshot. Every step checks its outcome.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::io::IsTerminal;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use bytes::Bytes;
use futures::StreamExt;

use crate::CertificateAuthority;
use crate::Config;
use crate::TlsConfig;
use crate::Transport;
use crate::Validity;
use crate::kv::KvNode;
use crate::kv::NodeError;

/// What to run.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// The transports every node serves and prefers, most preferred first (one, usually).
    pub transports: Vec<Transport>,
    /// How many keys to write.
    pub writes: u64,
    /// Bytes per value.
    pub value_size: usize,
    /// Concurrent writers.
    pub concurrency: usize,
    /// Print each step and a progress bar (on a terminal) to stderr.
    pub verbose: bool,
    /// Run without TLS (the explicit, logged opt-out). Default: mutual TLS with a CA the demo
    /// generates into a temporary directory.
    pub plaintext: bool,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            transports: vec![Transport::default()],
            writes: 10_000,
            value_size: 64,
            concurrency: 64,
            verbose: false,
            plaintext: false,
        }
    }
}

/// What a completed run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DemoReport {
    /// Always true in a returned report: a failed step returns an error instead.
    pub ok: bool,
    /// The transports used, most preferred first (`quic,grpc`).
    pub transport: String,
    /// `"mtls"`, or `"plaintext"` for the opt-out.
    pub tls: &'static str,
    /// How many nodes took part.
    pub nodes: usize,
    /// Keys written (and read back).
    pub writes: u64,
    /// Write throughput of the write step.
    pub writes_per_sec: f64,
    /// Leader changes observed (the failover).
    pub leader_changes: u64,
    /// Whether the 4th node caught up through a snapshot.
    pub snapshot_installed: bool,
    /// Wall time of the whole run.
    pub elapsed_ms: u64,
}

/// The step that failed and why.
#[derive(Debug, thiserror::Error)]
#[error("demo step `{step}` failed: {reason}")]
pub struct DemoError {
    /// The step's name.
    pub step: &'static str,
    /// Why it failed.
    pub reason: String,
}

fn fail(step: &'static str) -> impl Fn(NodeError) -> DemoError {
    move |e| DemoError {
        step,
        reason: e.to_string(),
    }
}

fn check(step: &'static str, ok: bool, why: impl FnOnce() -> String) -> Result<(), DemoError> {
    if ok {
        Ok(())
    } else {
        Err(DemoError { step, reason: why() })
    }
}

/// The openraft settings of the demo (and the cluster tests): loopback-fast timers, manual
/// snapshots, and no log kept behind a snapshot so a purge really forces snapshot catch-up.
pub fn raft_config() -> Arc<openraft::Config> {
    let config = openraft::Config {
        cluster_name: "raftwire-demo".into(),
        heartbeat_interval: 100,
        election_timeout_min: 600,
        election_timeout_max: 1200,
        install_snapshot_timeout: 2000,
        snapshot_policy: openraft::SnapshotPolicy::Never,
        max_in_snapshot_log_to_keep: 0,
        ..Default::default()
    };
    // The values above are constants known to be valid.
    Arc::new(config.validate().expect("demo raft config is valid"))
}

struct Narrator {
    verbose: bool,
}

impl Narrator {
    fn step(&self, msg: impl AsRef<str>) {
        if self.verbose {
            eprintln!("==> {}", msg.as_ref());
        }
    }

    fn progress(&self, done: u64, total: u64) {
        if self.verbose && std::io::stderr().is_terminal() && (done.is_multiple_of(250) || done == total) {
            let width = 40;
            let filled = (done * width / total.max(1)) as usize;
            eprint!(
                "\r    [{}{}] {done}/{total}",
                "#".repeat(filled),
                " ".repeat(width as usize - filled)
            );
            if done == total {
                eprintln!();
            }
            let _ = std::io::stderr().flush();
        }
    }
}

fn key(i: u64) -> String {
    format!("key-{i:08}")
}

/// Waits until `node` reports a leader other than `not`, and returns it.
async fn await_leader(node: &KvNode, not: Option<u64>) -> Result<u64, NodeError> {
    let m = node
        .raft
        .wait(Some(Duration::from_secs(10)))
        .metrics(
            |m| m.current_leader.is_some() && m.current_leader != not,
            "a leader",
        )
        .await
        .map_err(|e| NodeError::new(format!("wait for a leader on node {}", node.id), e))?;
    m.current_leader
        .ok_or_else(|| NodeError::new("wait for a leader", "metrics lost the leader"))
}

/// Initializes a single-node cluster of `node` and waits until it leads with its membership
/// committed (so that learners can be added right away).
pub async fn initialize_alone(node: &KvNode) -> Result<(), NodeError> {
    let step = || format!("initialize node {}", node.id);
    node.raft
        .initialize(BTreeMap::from([(node.id, node.node())]))
        .await
        .map_err(|e| NodeError::new(step(), e))?;
    let id = node.id;
    node.raft
        .wait(Some(Duration::from_secs(10)))
        .metrics(
            |m| m.current_leader == Some(id) && m.last_applied.is_some_and(|l| l.leader_id.term > 0),
            "leading with a committed entry of its own term",
        )
        .await
        .map_err(|e| NodeError::new(step(), e))?;
    Ok(())
}

/// Waits until `node` has applied at least `index`.
pub async fn await_applied(node: &KvNode, index: u64) -> Result<(), NodeError> {
    node.raft
        .wait(Some(Duration::from_secs(20)))
        .applied_index_at_least(Some(index), "catch up")
        .await
        .map(|_| ())
        .map_err(|e| NodeError::new(format!("node {} catching up to {index}", node.id), e))
}

/// A throw-away cluster CA and node certificates, written as PEM files into a temporary
/// directory (removed when dropped) and loaded back from there as a real node would.
struct DemoCerts {
    dir: tempfile::TempDir,
}

impl DemoCerts {
    fn generate(nodes: u64) -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("cannot create a temporary directory: {e}"))?;
        let ca = CertificateAuthority::generate("raftwire demo CA").map_err(|e| e.to_string())?;
        ca.write(dir.path()).map_err(|e| e.to_string())?;
        for id in 1..=nodes {
            let node = ca
                .issue(id, &["127.0.0.1".to_string()], Validity::default())
                .map_err(|e| e.to_string())?;
            node.write(dir.path()).map_err(|e| e.to_string())?;
        }
        Ok(DemoCerts { dir })
    }

    fn load(&self, id: u64) -> Result<TlsConfig, DemoError> {
        let d = self.dir.path();
        TlsConfig::from_pem_files(
            d.join("ca.pem"),
            d.join(format!("node-{id}.pem")),
            d.join(format!("node-{id}.key")),
        )
        .map_err(|e| DemoError {
            step: "certificates",
            reason: e.to_string(),
        })
    }
}

/// Runs the demo; every step checks its outcome and a failure names the step.
pub async fn run(opts: DemoOptions) -> Result<DemoReport, DemoError> {
    let started = Instant::now();
    let say = Narrator {
        verbose: opts.verbose,
    };
    let certs = if opts.plaintext {
        None
    } else {
        say.step("generating a cluster CA and node certificates in a temporary directory");
        Some(DemoCerts::generate(4).map_err(|reason| DemoError {
            step: "certificates",
            reason,
        })?)
    };
    let net = |id: u64| -> Result<Config, DemoError> {
        let builder = Config::builder().transports(opts.transports.iter().copied());
        let builder = match &certs {
            Some(certs) => builder.tls(certs.load(id)?),
            None => builder.insecure_plaintext(),
        };
        builder.build().map_err(|e| DemoError {
            step: "config",
            reason: e.to_string(),
        })
    };
    let loopback: SocketAddr = ([127, 0, 0, 1], 0).into();
    let raft_config = raft_config();

    say.step(format!(
        "starting 3 nodes on 127.0.0.1 over {}",
        transport_names(&opts.transports)
    ));
    let mut nodes = Vec::new();
    for id in 1..=3 {
        nodes.push(Some(
            KvNode::start(id, raft_config.clone(), net(id)?, loopback)
                .await
                .map_err(fail("start nodes"))?,
        ));
    }

    say.step("initializing node 1");
    let n1 = node(&nodes, 1)?;
    initialize_alone(n1).await.map_err(fail("initialize"))?;

    say.step("adding nodes 2 and 3 as learners");
    for id in [2, 3] {
        let n = node(&nodes, id)?;
        n1.raft
            .add_learner(id, n.node(), true)
            .await
            .map_err(|e| DemoError {
                step: "add learners",
                reason: e.to_string(),
            })?;
    }
    say.step("changing membership to voters {1, 2, 3}");
    n1.raft
        .change_membership(BTreeSet::from([1, 2, 3]), false)
        .await
        .map_err(|e| DemoError {
            step: "change membership",
            reason: e.to_string(),
        })?;

    say.step(format!(
        "writing {} keys with {} concurrent writers",
        opts.writes, opts.concurrency
    ));
    let value = Bytes::from(vec![b'v'; opts.value_size]);
    let write_start = Instant::now();
    let mut done = 0u64;
    let mut writes = futures::stream::iter(0..opts.writes)
        .map(|i| n1.write(key(i), value.clone()))
        .buffer_unordered(opts.concurrency.max(1));
    while let Some(result) = writes.next().await {
        result.map_err(fail("write keys"))?;
        done += 1;
        say.progress(done, opts.writes);
    }
    drop(writes);
    let write_secs = write_start.elapsed().as_secs_f64();
    let writes_per_sec = opts.writes as f64 / write_secs.max(1e-9);

    say.step("reading every key back linearizably");
    verify_keys(n1, opts.writes, &value, "read back").await?;

    say.step("stopping the leader (node 1)");
    let mut old = nodes[0].take().ok_or(DemoError {
        step: "failover",
        reason: "node 1 vanished".into(),
    })?;
    old.stop().await.map_err(fail("failover"))?;
    let failover_start = Instant::now();
    let new_leader = await_leader(node(&nodes, 2)?, Some(1))
        .await
        .map_err(fail("failover"))?;
    let leader_changes = u64::from(new_leader != 1);
    say.step(format!(
        "node {new_leader} leads after {} ms",
        failover_start.elapsed().as_millis()
    ));
    let leader = node(&nodes, new_leader)?;
    verify_keys(leader, opts.writes, &value, "failover keeps writes").await?;

    say.step("restarting node 1 as a follower");
    let restarted = old.restart().await.map_err(fail("restart node 1"))?;
    let applied = leader.sm.last_applied().map_or(0, |l| l.index);
    await_applied(&restarted, applied)
        .await
        .map_err(fail("restart node 1"))?;
    nodes[0] = Some(restarted);

    say.step(format!("node {new_leader} builds a snapshot and purges its log"));
    let leader = node(&nodes, new_leader)?;
    let applied = leader.sm.last_applied().map_or(0, |l| l.index);
    leader.raft.trigger().snapshot().await.map_err(|e| DemoError {
        step: "snapshot",
        reason: e.to_string(),
    })?;
    leader
        .raft
        .wait(Some(Duration::from_secs(10)))
        .metrics(
            |m| m.snapshot.is_some_and(|s| s.index >= applied),
            "snapshot built",
        )
        .await
        .map_err(|e| DemoError {
            step: "snapshot",
            reason: e.to_string(),
        })?;
    leader
        .raft
        .trigger()
        .purge_log(applied)
        .await
        .map_err(|e| DemoError {
            step: "purge",
            reason: e.to_string(),
        })?;
    leader
        .raft
        .wait(Some(Duration::from_secs(10)))
        .metrics(|m| m.purged.is_some_and(|p| p.index >= applied), "log purged")
        .await
        .map_err(|e| DemoError {
            step: "purge",
            reason: e.to_string(),
        })?;

    say.step("adding node 4, which must catch up through the snapshot");
    let n4 = KvNode::start(4, raft_config.clone(), net(4)?, loopback)
        .await
        .map_err(fail("add node 4"))?;
    leader
        .raft
        .add_learner(4, n4.node(), true)
        .await
        .map_err(|e| DemoError {
            step: "add node 4",
            reason: e.to_string(),
        })?;
    await_applied(&n4, applied).await.map_err(fail("add node 4"))?;
    let snapshot_installed = n4.sm.snapshots_installed() > 0;
    check("add node 4", snapshot_installed, || {
        "node 4 caught up without a snapshot".into()
    })?;
    let missing = (0..opts.writes)
        .filter(|i| n4.sm.get(&key(*i)).as_ref() != Some(&value))
        .count();
    check("add node 4", missing == 0, || {
        format!("{missing} keys missing on node 4")
    })?;
    nodes.push(Some(n4));

    say.step("shutting down");
    let count = nodes.len();
    for mut n in nodes.into_iter().flatten() {
        n.stop().await.map_err(fail("shutdown"))?;
    }
    Ok(DemoReport {
        ok: true,
        transport: transport_names(&opts.transports),
        tls: if opts.plaintext { "plaintext" } else { "mtls" },
        nodes: count,
        writes: opts.writes,
        writes_per_sec: (writes_per_sec * 10.0).round() / 10.0,
        leader_changes,
        snapshot_installed,
        elapsed_ms: started.elapsed().as_millis() as u64,
    })
}

fn node(nodes: &[Option<KvNode>], id: u64) -> Result<&KvNode, DemoError> {
    let found = nodes.get(id as usize - 1).and_then(Option::as_ref);
    found.ok_or(DemoError {
        step: "lookup",
        reason: format!("node {id} is not running"),
    })
}

/// Confirms leadership once (ReadIndex), then checks every key on the leader: one
/// linearizable read point covers all reads issued after it.
async fn verify_keys(
    leader: &KvNode,
    writes: u64,
    value: &Bytes,
    step: &'static str,
) -> Result<(), DemoError> {
    leader.read(&key(0)).await.map_err(fail(step))?;
    let missing = (0..writes)
        .filter(|i| leader.sm.get(&key(*i)).as_ref() != Some(value))
        .count();
    check(step, missing == 0, || {
        format!("{missing} of {writes} keys missing on node {}", leader.id)
    })
}

/// `quic,grpc`.
fn transport_names(transports: &[Transport]) -> String {
    transports.iter().map(|t| t.name()).collect::<Vec<_>>().join(",")
}
