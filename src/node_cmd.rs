//! `raftwire node` (run one node of a secured cluster) and `raftwire ctl` (operate it).

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use bytes::Bytes;
use clap::Args;
use clap::Subcommand;
use raftwire::ClientTls;
use raftwire::Transport;
use raftwire::node::Ctl;
use raftwire::node::CtlError;
use raftwire::node::NodeOptions;
use raftwire::node::pb;

/// The flags of `raftwire node`.
#[derive(Args)]
pub struct NodeArgs {
    /// This node's id; its certificate (`node-<id>.pem` in --certs) must name it.
    #[arg(long)]
    id: u64,
    /// Where to serve Raft traffic (every transport on this port number: TCP for gRPC, UDP
    /// for QUIC).
    #[arg(long)]
    listen: SocketAddr,
    /// The HOST:PORT peers reach this node's Raft traffic at (recorded in the membership).
    #[arg(long)]
    advertise: String,
    /// Where to serve the client API (default: the --listen address with port + 1).
    #[arg(long)]
    api_listen: Option<SocketAddr>,
    /// Log, vote, state machine and snapshots; created if missing, refused if it belongs to
    /// another node.
    #[arg(long)]
    data_dir: PathBuf,
    /// The directory with ca.pem, node-<id>.pem and node-<id>.key.
    #[arg(long)]
    certs: PathBuf,
    /// Transport, or a preference list such as `quic,grpc`.
    #[arg(long, default_value = "grpc")]
    transport: String,
    /// Serve Prometheus metrics (the network's and openraft's) at http://ADDR/metrics, plain
    /// HTTP: bind it where only your monitoring reaches.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
}

/// Runs a node until SIGTERM or SIGINT; exit status 0 after a clean stop.
pub fn node(args: NodeArgs, runtime: &tokio::runtime::Runtime) -> ExitCode {
    let transports = match Transport::parse_list(&args.transport) {
        Ok(t) => t,
        Err(e) => return fail(format!("--transport: {e}")),
    };
    let api_listen = match args.api_listen {
        Some(a) => a,
        None => match args.listen.port().checked_add(1) {
            Some(port) if args.listen.port() != 0 => SocketAddr::new(args.listen.ip(), port),
            _ => return fail("--api-listen is required when --listen has port 0 or 65535".into()),
        },
    };
    let opts = NodeOptions {
        id: args.id,
        listen: args.listen,
        advertise: args.advertise,
        api_listen,
        data_dir: args.data_dir,
        certs: args.certs,
        transports,
        metrics_listen: args.metrics_listen,
    };
    let result = runtime.block_on(raftwire::node::run(opts, stop_signal(), |serving| {
        let raft: Vec<String> = serving.raft.iter().map(|(t, a)| format!("{t} {a}")).collect();
        let metrics = match serving.metrics {
            Some(addr) => format!(", metrics on http://{addr}/metrics"),
            None => String::new(),
        };
        eprintln!(
            "serving raft on {} and the client API on {}{metrics}",
            raft.join(", "),
            serving.api
        );
    }));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e.to_string()),
    }
}

/// Resolves on SIGTERM or SIGINT (or if the handlers cannot be installed: then at once, so
/// the node does not run unstoppable).
async fn stop_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot handle SIGTERM: {e}");
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn fail(message: String) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::FAILURE
}

/// The flags every `raftwire ctl` command takes.
#[derive(Args)]
pub struct CtlArgs {
    /// Client API endpoints, HOST:PORT[,HOST:PORT...].
    #[arg(long, value_delimiter = ',', required = true)]
    endpoints: Vec<String>,
    /// The directory with ca.pem and the client's client-<NAME>.pem and .key.
    #[arg(long)]
    certs: PathBuf,
    /// The client identity to use (made by `raftwire certs add-client`).
    #[arg(long)]
    client: String,
    /// Print one JSON object on stdout instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: CtlCommand,
}

/// What `raftwire ctl` does.
#[derive(Subcommand)]
pub enum CtlCommand {
    /// Each node's role, term, leader, log and applied index, membership, followers' progress
    /// and state digest.
    Status,
    /// Makes the first endpoint's node a one-voter cluster.
    Init,
    /// Adds node ID (Raft address HOST:PORT) as a learner; returns once it caught up.
    AddLearner {
        /// The node id.
        id: u64,
        /// Its Raft address, as peers reach it.
        addr: String,
    },
    /// Makes learners voters.
    Promote {
        /// Node ids, comma-separated.
        #[arg(value_delimiter = ',')]
        ids: Vec<u64>,
    },
    /// Removes a node from the membership.
    Remove {
        /// The node id.
        id: u64,
    },
    /// Hands leadership to another voter.
    TransferLeader {
        /// The node id.
        id: u64,
    },
    /// Builds a snapshot on the leader and purges its log.
    Snapshot,
    /// Writes KEY = VALUE.
    Put {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// Reads KEY (linearizable).
    Get {
        /// The key.
        key: String,
    },
    /// Writes N keys with C concurrent writers and reports throughput and latency.
    Load {
        /// How many writes.
        #[arg(long, default_value_t = 10_000)]
        writes: u64,
        /// Concurrent writers.
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// Bytes per value.
        #[arg(long, default_value_t = 64)]
        value_size: usize,
        /// Records every acknowledged key and value here.
        #[arg(long)]
        keys_out: Option<PathBuf>,
    },
}

/// Runs one `ctl` command; prints its outcome (text or `--json`).
pub fn ctl(args: CtlArgs, runtime: &tokio::runtime::Runtime) -> ExitCode {
    let json = args.json;
    let report = |value: serde_json::Value, text: String| {
        if json {
            println!("{value}");
        } else {
            println!("{text}");
        }
        ExitCode::SUCCESS
    };
    let failed = |e: String| {
        if json {
            println!("{}", serde_json::json!({"ok": false, "error": e}));
        } else {
            eprintln!("error: {e}");
        }
        ExitCode::FAILURE
    };
    let dir = &args.certs;
    let tls = match ClientTls::from_pem_files(
        dir.join("ca.pem"),
        dir.join(format!("client-{}.pem", args.client)),
        dir.join(format!("client-{}.key", args.client)),
    ) {
        Ok(t) => t,
        Err(e) => return failed(format!("client certificate in {}: {e}", dir.display())),
    };
    let ctl = match Ctl::new(args.endpoints, &tls) {
        Ok(c) => c,
        Err(e) => return failed(e.to_string()),
    };
    let outcome: Result<(serde_json::Value, String), CtlError> = runtime.block_on(async {
        match args.command {
            CtlCommand::Status => {
                let all = ctl.status().await;
                let value = serde_json::json!({
                    "ok": all.iter().any(|s| s.status.is_ok()),
                    "nodes": all.iter().map(status_json).collect::<Vec<_>>(),
                });
                Ok((value, status_table(&all)))
            }
            CtlCommand::Init => {
                let r = ctl.init().await?;
                Ok((
                    membership_json(&r),
                    format!("initialized: {}", members_text(&r.members)),
                ))
            }
            CtlCommand::AddLearner { id, addr } => {
                let r = ctl.add_learner(id, &addr).await?;
                Ok((
                    membership_json(&r),
                    format!("node {id} added as a learner: {}", members_text(&r.members)),
                ))
            }
            CtlCommand::Promote { ids } => {
                let r = ctl.promote(&ids).await?;
                Ok((
                    membership_json(&r),
                    format!("promoted {ids:?}: {}", members_text(&r.members)),
                ))
            }
            CtlCommand::Remove { id } => {
                let r = ctl.remove(id).await?;
                Ok((
                    membership_json(&r),
                    format!("removed node {id}: {}", members_text(&r.members)),
                ))
            }
            CtlCommand::TransferLeader { id } => {
                ctl.transfer_leader(id).await?;
                Ok((
                    serde_json::json!({"ok": true, "leader": id}),
                    format!("node {id} leads"),
                ))
            }
            CtlCommand::Snapshot => {
                let index = ctl.snapshot().await?;
                Ok((
                    serde_json::json!({"ok": true, "index": index}),
                    format!("snapshot up to index {index:?}; log purged"),
                ))
            }
            CtlCommand::Put { key, value } => {
                let index = ctl.put(&key, Bytes::from(value)).await?;
                Ok((
                    serde_json::json!({"ok": true, "index": index}),
                    format!("ok (log index {index})"),
                ))
            }
            CtlCommand::Get { key } => {
                let value = ctl.get(&key).await?;
                let text = value.as_ref().map(|v| String::from_utf8_lossy(v).into_owned());
                Ok((
                    serde_json::json!({"ok": true, "key": key, "found": value.is_some(), "value": text}),
                    text.unwrap_or_else(|| "(not found)".into()),
                ))
            }
            CtlCommand::Load {
                writes,
                concurrency,
                value_size,
                keys_out,
            } => {
                let bar = std::io::stderr().is_terminal() && !json;
                let progress = move |done: u64| {
                    if bar && (done.is_multiple_of(100) || done == writes) {
                        let width = 40;
                        let filled = (done * width / writes.max(1)) as usize;
                        eprint!(
                            "\r[{}{}] {done}/{writes}",
                            "#".repeat(filled),
                            " ".repeat(width as usize - filled)
                        );
                    }
                };
                let r = ctl
                    .load(writes, concurrency, value_size, keys_out.as_deref(), &progress)
                    .await?;
                if bar {
                    eprintln!();
                }
                let mut value = serde_json::to_value(&r).unwrap_or_default();
                value["ok"] = serde_json::Value::Bool(r.failed == 0);
                let text = format!(
                    "acknowledged {} failed {} ({} retried): {:.0} writes/s, p50 {:.2} ms, p99 {:.2} ms",
                    r.acknowledged, r.failed, r.retried, r.writes_per_sec, r.p50_ms, r.p99_ms
                );
                Ok((value, text))
            }
        }
    });
    match outcome {
        Ok((value, text)) => {
            let ok = value.get("ok").and_then(|v| v.as_bool()).unwrap_or(true);
            let code = report(value, text);
            if ok { code } else { ExitCode::FAILURE }
        }
        Err(e) => failed(e.to_string()),
    }
}

fn members_text(members: &[pb::Member]) -> String {
    let voters: Vec<String> = members
        .iter()
        .filter(|m| m.voter)
        .map(|m| m.id.to_string())
        .collect();
    let learners: Vec<String> = members
        .iter()
        .filter(|m| !m.voter)
        .map(|m| m.id.to_string())
        .collect();
    format!("voters [{}], learners [{}]", voters.join(","), learners.join(","))
}

fn members_json(members: &[pb::Member]) -> serde_json::Value {
    members
        .iter()
        .map(|m| serde_json::json!({"id": m.id, "addr": m.addr, "voter": m.voter}))
        .collect()
}

fn membership_json(r: &pb::MembershipReply) -> serde_json::Value {
    serde_json::json!({"ok": true, "index": r.index, "members": members_json(&r.members)})
}

fn status_json(s: &raftwire::node::EndpointStatus) -> serde_json::Value {
    match &s.status {
        Ok(r) => serde_json::json!({
            "endpoint": s.endpoint,
            "id": r.id,
            "role": r.role,
            "term": r.term,
            "leader": r.leader,
            "last_log_index": r.last_log_index,
            "applied": r.applied,
            "voters": r.members.iter().filter(|m| m.voter).map(|m| m.id).collect::<Vec<_>>(),
            "learners": r.members.iter().filter(|m| !m.voter).map(|m| m.id).collect::<Vec<_>>(),
            "members": members_json(&r.members),
            "matched": r.followers.iter().map(|f| (f.id.to_string(), serde_json::json!(f.matched))).collect::<serde_json::Map<_, _>>(),
            "digest": r.digest,
            "keys": r.keys,
            "transports": r.transports,
        }),
        Err(e) => serde_json::json!({"endpoint": s.endpoint, "error": e.to_string()}),
    }
}

fn status_table(all: &[raftwire::node::EndpointStatus]) -> String {
    let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    let mut out = format!(
        "{:<22} {:>4} {:<9} {:>5} {:>6} {:>8} {:>8} {:>6}  {:<16} {:<20} {}",
        "endpoint",
        "id",
        "role",
        "term",
        "leader",
        "last log",
        "applied",
        "keys",
        "digest",
        "members",
        "matched"
    );
    for s in all {
        out.push('\n');
        match &s.status {
            Ok(r) => {
                let matched: Vec<String> = r
                    .followers
                    .iter()
                    .map(|f| format!("{}:{}", f.id, opt(f.matched)))
                    .collect();
                out.push_str(&format!(
                    "{:<22} {:>4} {:<9} {:>5} {:>6} {:>8} {:>8} {:>6}  {:<16} {:<20} {}",
                    s.endpoint,
                    r.id,
                    r.role,
                    r.term,
                    opt(r.leader),
                    opt(r.last_log_index),
                    opt(r.applied),
                    r.keys,
                    &r.digest[..r.digest.len().min(16)],
                    members_text(&r.members),
                    matched.join(" ")
                ));
            }
            Err(e) => out.push_str(&format!("{:<22} unreachable: {e}", s.endpoint)),
        }
    }
    out
}
