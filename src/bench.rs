//! The benchmark harness behind `cargo bench` and `raftwire bench --quick`.
//!
//! Every subject is measured the same way, with setup (runtime, certificates, connections,
//! warm-up) outside the timed calls, and every transport gets the same in-flight window:
//! - [`AppendBench`]: pipelined AppendEntries to one follower;
//! - [`RpcBench`]: one vote or one heartbeat round trip;
//! - [`ClusterBench`]: client writes on a 3-node cluster, with per-write commit latency;
//! - [`SnapshotBench`]: one whole snapshot, file to file;
//! - the baselines: [`Subject::RawTls`], the same bytes over a raw mutual-TLS TCP stream (the
//!   floor a transport cannot beat), [`Subject::RawTlsFile`], that stream between two files
//!   (the floor for snapshots, storage included), and [`Subject::InProcess`], openraft
//!   talking to itself over in-process channels (openraft's ceiling without a network).

use std::collections::BTreeSet;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use bytes::Bytes;
use futures::Stream;
use futures::StreamExt;
use openraft::EntryPayload;
use openraft::RaftNetworkFactory;
use openraft::alias::SnapshotOf;
use openraft::alias::VoteOf;
use openraft::base::BoxFuture;
use openraft::base::BoxStream;
use openraft::errors::RPCError;
use openraft::errors::ReplicationClosed;
use openraft::errors::StreamingError;
use openraft::errors::Unreachable;
use openraft::impls::BasicNode;
use openraft::network::RPCOption;
use openraft::network::RPCTypes;
use openraft::network::RaftNetworkV2;
use openraft::raft::AppendEntriesRequest;
use openraft::raft::AppendEntriesResponse;
use openraft::raft::SnapshotResponse;
use openraft::raft::StreamAppendResult;
use openraft::raft::TransferLeaderRequest;
use openraft::raft::TransferLeaderResponse;
use openraft::raft::VoteRequest;
use openraft::raft::VoteResponse;
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::CertificateAuthority;
use crate::Config;
use crate::Network;
use crate::NetworkFactory;
use crate::Transport;
use crate::WireLeaderId;
use crate::WireMessage;
use crate::error::TransportError;
use crate::kv::KvConfig;
use crate::kv::KvNode;
use crate::kv::KvRaft;
use crate::kv::KvRequest;
use crate::kv::KvSnapshotData;
use crate::kv::LogStore;
use crate::kv::NodeError;
use crate::kv::StateMachine;
use crate::pipeline;
use crate::pipeline::RequestSink;
use crate::pipeline::SendError;

/// What is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    /// A raftwire transport.
    Transport(Transport),
    /// The same bytes over a raw mutual-TLS TCP stream: the floor.
    RawTls,
    /// The raw TLS stream between two files (snapshots only): the sender reads the snapshot
    /// file and the receiver writes each snapshot into a fresh file, both through
    /// `tokio::fs::File` in 1 MiB chunks, each chunk handed over as it arrives and one flush at
    /// the end, as raftwire's snapshot receiver writes the benchmark state machine's files. The
    /// floor for a file-to-file snapshot: what the storage costs before any transport.
    RawTlsFile,
    /// openraft over in-process channels, no encoding, no network: the ceiling.
    InProcess,
    /// The same, with each entry payload encoded, copied into one buffer and decoded again
    /// on the way, as any transport must: the fair ceiling for large entries.
    InProcessEncoded,
}

impl Subject {
    /// The name used in benchmark ids and reports.
    pub fn name(self) -> &'static str {
        match self {
            Subject::Transport(t) => t.name(),
            Subject::RawTls => "raw-tls",
            Subject::RawTlsFile => "raw-tls-file",
            Subject::InProcess => "in-process",
            Subject::InProcessEncoded => "in-process-encoded",
        }
    }

    /// Every compiled transport.
    pub fn transports() -> Vec<Subject> {
        vec![
            #[cfg(feature = "grpc")]
            Subject::Transport(Transport::Grpc),
            #[cfg(feature = "quic")]
            Subject::Transport(Transport::Quic),
            #[cfg(feature = "tcp")]
            Subject::Transport(Transport::Tcp),
        ]
    }
}

/// A benchmark setup step that failed.
#[derive(Debug, thiserror::Error)]
#[error("benchmark {what}: {reason}")]
pub struct BenchError {
    what: String,
    reason: String,
}

fn bench_err(what: impl Into<String>) -> impl FnOnce(String) -> BenchError {
    let what = what.into();
    move |reason| BenchError { what, reason }
}

impl From<NodeError> for BenchError {
    fn from(e: NodeError) -> Self {
        BenchError {
            what: e.step,
            reason: e.reason,
        }
    }
}

mod veth;

pub use veth::Far;
pub use veth::VETH_MTU;
pub use veth::Veth;

/// How long a benchmark write keeps looking for a leader that serves it.
const LEADER_WAIT: Duration = Duration::from_secs(10);

/// The node id the benchmark's own "leader" identity uses.
const BENCH_LEADER: u64 = 100;
const LOOPBACK: ([u8; 4], u16) = ([127, 0, 0, 1], 0);

/// Where a receiving end listens: loopback, or the far side's address (any port).
fn listen_addr(far: Option<&Far>) -> SocketAddr {
    match far {
        Some(far) => SocketAddr::new(far.addr(), 0),
        None => LOOPBACK.into(),
    }
}

/// Certificates for every node of a benchmark.
struct Pki {
    ca: CertificateAuthority,
}

impl Pki {
    fn new() -> Result<Pki, BenchError> {
        let ca = CertificateAuthority::generate("raftwire bench CA")
            .map_err(|e| bench_err("CA")(e.to_string()))?;
        Ok(Pki { ca })
    }

    fn config(&self, id: u64, transport: Transport, window: usize) -> Result<Config, BenchError> {
        self.tuned(id, transport, window, &AppendOptions::default())
    }

    fn tuned(
        &self,
        id: u64,
        transport: Transport,
        window: usize,
        options: &AppendOptions,
    ) -> Result<Config, BenchError> {
        let tls = self
            .ca
            .tls_config(id)
            .map_err(|e| bench_err("certificates")(e.to_string()))?;
        let builder = Config::builder()
            .transport(transport)
            .quic(options.quic.clone())
            .tls(tls)
            .max_in_flight_requests(window)
            .max_in_flight_bytes(usize::MAX / 2);
        #[cfg(feature = "compression")]
        let builder = builder.compression(options.compression);
        builder.build().map_err(|e| bench_err("config")(e.to_string()))
    }
}

fn raft_config(snapshot_every: Option<u64>) -> Result<Arc<openraft::Config>, BenchError> {
    let config = openraft::Config {
        cluster_name: "raftwire-bench".into(),
        heartbeat_interval: 200,
        election_timeout_min: 1500,
        election_timeout_max: 3000,
        install_snapshot_timeout: 5000,
        snapshot_policy: match snapshot_every {
            Some(n) => openraft::SnapshotPolicy::LogsSinceLast(n),
            None => openraft::SnapshotPolicy::Never,
        },
        max_in_snapshot_log_to_keep: 1000,
        ..Default::default()
    };
    config
        .validate()
        .map(Arc::new)
        .map_err(|e| bench_err("raft config")(e.to_string()))
}

fn option() -> RPCOption {
    RPCOption::new(Duration::from_secs(20))
}

/// How many entries of `size` bytes one AppendEntries request carries: about 256 KiB per
/// request, at most openraft's default `max_payload_entries` (300).
pub fn entries_per_request(size: usize) -> usize {
    ((256 << 10) / size.max(1)).clamp(1, 300)
}

// ---------------------------------------------------------------------------------------------
// Pipelined AppendEntries to one follower

/// What an entry's value holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Payload {
    /// One byte repeated (the default: what every other figure uses).
    #[default]
    Constant,
    /// JSON records, like an application's documents: compresses several-fold.
    Json,
    /// Pseudo-random bytes: incompressible.
    Random,
}

impl Payload {
    /// `n` values of `size` bytes of this kind, each different (but `Constant`'s): a batch
    /// of identical entries would let a compressor find every entry in the one before it.
    pub fn values(self, size: usize, n: usize) -> Vec<Bytes> {
        match self {
            Payload::Constant => vec![Bytes::from(vec![0x5a; size]); n],
            Payload::Json => (0..n as u64).map(|k| json_records(size, k * 1_000_003)).collect(),
            Payload::Random => (0..n as u64).map(|k| random_bytes(size, k)).collect(),
        }
    }
}

/// `size` bytes of JSON records numbered from `first`.
fn json_records(size: usize, first: u64) -> Bytes {
    let mut out = String::with_capacity(size + 160);
    let mut id = first;
    while out.len() < size {
        id += 1;
        let user = id.wrapping_mul(7919) % 100_003;
        out.push_str(&format!(
            "{{\"id\":{id},\"user\":\"user-{user}\",\"email\":\"user-{user}@example.com\",\
             \"active\":{},\"score\":{},\"tags\":[\"raft\",\"wire\"]}},",
            id.is_multiple_of(3),
            id.wrapping_mul(31) % 1000
        ));
    }
    out.truncate(size);
    Bytes::from(out)
}

/// `size` pseudo-random bytes (xorshift64, seeded by `seed`).
fn random_bytes(size: usize, seed: u64) -> Bytes {
    let mut x = 0x9e37_79b9_7f4a_7c15_u64 ^ seed.wrapping_mul(0x2545_f491_4f6c_dd1d);
    (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

/// How an [`AppendBench`] differs from the defaults.
#[derive(Debug, Clone, Default)]
pub struct AppendOptions {
    /// QUIC tuning on both ends.
    pub quic: crate::QuicTuning,
    /// Compression on both ends.
    #[cfg(feature = "compression")]
    pub compression: crate::Compression,
    /// What the entries carry.
    pub payload: Payload,
    /// Where the follower runs: across a veth link ([`Veth`]), or (`None`) on loopback.
    pub far: Option<Far>,
}

enum AppendTarget {
    Net(Box<Network<KvConfig, KvSnapshotData>>),
    InProcess(InProcessNetwork),
    Raw(RawTlsClient),
}

/// Pipelined AppendEntries from a benchmark "leader" to one follower that never commits
/// (its log keeps only the newest entries, so memory stays flat however long it runs).
pub struct AppendBench {
    target: AppendTarget,
    follower: Option<KvNode>,
    _raw: Option<RawTlsServer>,
    /// One value per entry of a request (all the same for [`Payload::Constant`]).
    values: Vec<Bytes>,
    per_request: usize,
    next_index: u64,
}

impl AppendBench {
    /// Starts a follower (or a raw TLS sink) and connects to it.
    pub async fn start(
        subject: Subject,
        entry_size: usize,
        window: usize,
    ) -> Result<AppendBench, BenchError> {
        Self::start_with(subject, entry_size, window, AppendOptions::default()).await
    }

    /// Like [`AppendBench::start`], with `options` on both ends.
    pub async fn start_with(
        subject: Subject,
        entry_size: usize,
        window: usize,
        options: AppendOptions,
    ) -> Result<AppendBench, BenchError> {
        let pki = Pki::new()?;
        let per_request = entries_per_request(entry_size);
        let values = options.payload.values(entry_size, per_request);
        let mut bench = AppendBench {
            target: AppendTarget::Raw(RawTlsClient::placeholder()),
            follower: None,
            _raw: None,
            values,
            per_request,
            next_index: 0,
        };
        match subject {
            Subject::Transport(transport) => {
                let config = pki.tuned(1, transport, window, &options)?;
                let log = LogStore::bounded_for_benchmarks(4 * per_request * window.max(1));
                let start = KvNode::start_with_stores(
                    1,
                    raft_config(None)?,
                    config,
                    listen_addr(options.far.as_ref()),
                    log,
                    StateMachine::default(),
                );
                let follower = match &options.far {
                    Some(far) => far.run(start).await??,
                    None => start.await?,
                };
                let leader_config = pki.tuned(BENCH_LEADER, transport, window, &options)?;
                let mut factory =
                    NetworkFactory::<KvConfig, KvSnapshotData>::new(BENCH_LEADER, leader_config)
                        .map_err(|e| bench_err("network")(e.to_string()))?;
                let client = factory.new_client(1, &follower.node()).await;
                bench.target = AppendTarget::Net(Box::new(client));
                bench.follower = Some(follower);
            }
            Subject::InProcess | Subject::InProcessEncoded if options.far.is_some() => {
                return Err(bench_err("append")(
                    "the in-process network has no link to cross".into(),
                ));
            }
            Subject::InProcess | Subject::InProcessEncoded => {
                let log = LogStore::bounded_for_benchmarks(4 * per_request * window.max(1));
                let router = InProcessRouter::new(subject);
                let raft = openraft::Raft::new(
                    1,
                    raft_config(None)?,
                    router.factory(1, window),
                    log,
                    StateMachine::default(),
                )
                .await
                .map_err(|e| bench_err("start in-process follower")(e.to_string()))?;
                router.add(1, raft);
                bench.target = AppendTarget::InProcess(router.network(BENCH_LEADER, 1, window));
            }
            Subject::RawTls => {
                let server = RawTlsServer::start_on(&pki, options.far.as_ref(), None).await?;
                let client = RawTlsClient::connect(&pki, server.addr, window).await?;
                bench.target = AppendTarget::Raw(client);
                bench._raw = Some(server);
            }
            Subject::RawTlsFile => return Err(snapshot_only("append")),
        }
        // Warm up: connections, the follower's first vote change, allocator pools.
        bench.run(4).await?;
        Ok(bench)
    }

    /// Application bytes carried by one request.
    pub fn bytes_per_request(&self) -> u64 {
        self.values.iter().map(|v| v.len() as u64).sum()
    }

    fn request(&mut self) -> AppendEntriesRequest<KvConfig> {
        let leader = WireLeaderId {
            term: 1,
            node_id: BENCH_LEADER,
        };
        let prev = (self.next_index > 0).then(|| openraft::LogId {
            leader_id: leader,
            index: self.next_index - 1,
        });
        let entries = (0..self.per_request as u64)
            .map(|i| openraft::impls::Entry {
                log_id: openraft::LogId {
                    leader_id: leader,
                    index: self.next_index + i,
                },
                payload: EntryPayload::Normal(KvRequest::Set {
                    key: "k".into(),
                    value: self.values[i as usize].clone(),
                }),
            })
            .collect();
        self.next_index += self.per_request as u64;
        AppendEntriesRequest {
            vote: openraft::impls::Vote {
                leader_id: leader,
                committed: true,
            },
            prev_log_id: prev,
            entries,
            leader_commit: None,
        }
    }

    /// Sends `requests` requests over one replication session and waits for every ack; the
    /// returned time covers only that.
    pub async fn run(&mut self, requests: usize) -> Result<Duration, BenchError> {
        if let AppendTarget::Raw(client) = &mut self.target {
            let bytes = self.values.iter().map(|v| v.len() + 40).sum::<usize>();
            return client.pipelined(requests, bytes).await;
        }
        let reqs: Vec<_> = (0..requests).map(|_| self.request()).collect();
        let started = Instant::now();
        let input = futures::stream::iter(reqs);
        let mut acked = 0;
        let mut replies = match &mut self.target {
            AppendTarget::Net(client) => client.stream_append(input, option()).await,
            AppendTarget::InProcess(client) => client.stream_append(input, option()).await,
            AppendTarget::Raw(_) => {
                return Err(bench_err("replication")(
                    "the raw TLS target has no replication stream".into(),
                ));
            }
        }
        .map_err(|e| bench_err("open a replication stream")(e.to_string()))?;
        while let Some(reply) = replies.next().await {
            match reply {
                Ok(Ok(_)) => acked += 1,
                other => return Err(bench_err("replication")(format!("{other:?}"))),
            }
        }
        drop(replies);
        if acked != requests {
            return Err(bench_err("replication")(format!(
                "{acked} of {requests} requests acknowledged"
            )));
        }
        Ok(started.elapsed())
    }

    /// Stops the follower.
    pub async fn stop(mut self) {
        if let Some(mut f) = self.follower.take() {
            let _ = f.stop().await;
        }
    }
}

/// One heartbeat over `net`: an empty one-request replication session, read to its end as
/// openraft does.
async fn heartbeat_on<N: RaftNetworkV2<KvConfig>>(net: &mut N, term: u64) -> Result<Duration, BenchError> {
    let leader = WireLeaderId {
        term,
        node_id: BENCH_LEADER,
    };
    let req = AppendEntriesRequest::<KvConfig> {
        vote: openraft::impls::Vote {
            leader_id: leader,
            committed: true,
        },
        prev_log_id: None,
        entries: Vec::new(),
        leader_commit: None,
    };
    let started = Instant::now();
    let mut replies = net
        .stream_append(futures::stream::iter([req]), option())
        .await
        .map_err(|e| bench_err("heartbeat")(e.to_string()))?;
    match replies.next().await {
        Some(Ok(_)) => {}
        other => return Err(bench_err("heartbeat")(format!("{other:?}"))),
    }
    if let Some(extra) = replies.next().await {
        return Err(bench_err("heartbeat")(format!("an extra reply: {extra:?}")));
    }
    drop(replies);
    Ok(started.elapsed())
}

// ---------------------------------------------------------------------------------------------
// Round trips

/// One vote or one heartbeat (an empty one-request replication session on the heartbeat
/// client, as openraft sends it) to a follower: over a transport, or over the in-process
/// network (openraft's and raftwire's pipeline share of a round trip, no network); or a small
/// raw TLS ping-pong.
pub struct RpcBench {
    follower: Option<KvNode>,
    client: Option<Network<KvConfig, KvSnapshotData>>,
    heartbeat: Option<Network<KvConfig, KvSnapshotData>>,
    in_process: Option<(KvRaft, InProcessNetwork)>,
    raw: Option<(RawTlsServer, RawTlsClient)>,
    term: u64,
}

impl RpcBench {
    /// Starts a follower (or a raw TLS echo server) and connects to it.
    pub async fn start(subject: Subject) -> Result<RpcBench, BenchError> {
        let pki = Pki::new()?;
        let mut bench = RpcBench {
            follower: None,
            client: None,
            heartbeat: None,
            in_process: None,
            raw: None,
            term: 1,
        };
        match subject {
            Subject::Transport(t) => {
                let follower =
                    KvNode::start(1, raft_config(None)?, pki.config(1, t, 64)?, LOOPBACK.into()).await?;
                let mut factory = NetworkFactory::<KvConfig, KvSnapshotData>::new(
                    BENCH_LEADER,
                    pki.config(BENCH_LEADER, t, 64)?,
                )
                .map_err(|e| bench_err("network")(e.to_string()))?;
                bench.client = Some(factory.new_client(1, &follower.node()).await);
                bench.heartbeat = Some(factory.new_heartbeat_client(1, &follower.node()).await);
                bench.follower = Some(follower);
            }
            Subject::RawTls => {
                let server = RawTlsServer::start_on(&pki, None, None).await?;
                let client = RawTlsClient::connect(&pki, server.addr, 1).await?;
                bench.raw = Some((server, client));
            }
            Subject::RawTlsFile => return Err(snapshot_only("rpc")),
            Subject::InProcess | Subject::InProcessEncoded => {
                let router = InProcessRouter::new(subject);
                let raft = openraft::Raft::new(
                    1,
                    raft_config(None)?,
                    router.factory(1, 64),
                    LogStore::default(),
                    StateMachine::default(),
                )
                .await
                .map_err(|e| bench_err("start in-process follower")(e.to_string()))?;
                router.add(1, raft.clone());
                bench.in_process = Some((raft, router.network(BENCH_LEADER, 1, 64)));
            }
        }
        for _ in 0..20 {
            bench.vote().await?;
            bench.heartbeat().await?;
        }
        Ok(bench)
    }

    /// One vote round trip.
    pub async fn vote(&mut self) -> Result<Duration, BenchError> {
        let req = VoteRequest::new(openraft::impls::Vote::new(self.term, BENCH_LEADER), None);
        let started = Instant::now();
        let voted = match (&mut self.raw, &mut self.in_process, &mut self.client) {
            (Some((_, raw)), _, _) => return raw.ping(48).await,
            (_, Some((_, net)), _) => net.vote(req, option()).await.map(drop),
            (_, _, Some(client)) => client.vote(req, option()).await.map(drop),
            _ => return Err(bench_err("vote")("no client".into())),
        };
        voted.map_err(|e| bench_err("vote")(e.to_string()))?;
        Ok(started.elapsed())
    }

    /// One heartbeat round trip.
    pub async fn heartbeat(&mut self) -> Result<Duration, BenchError> {
        let term = self.term;
        match (&mut self.raw, &mut self.in_process, &mut self.heartbeat) {
            (Some((_, raw)), _, _) => raw.ping(48).await,
            (_, Some((_, net)), _) => heartbeat_on(net, term).await,
            (_, _, Some(client)) => heartbeat_on(client, term).await,
            _ => Err(bench_err("heartbeat")("no client".into())),
        }
    }

    /// Stops the follower.
    pub async fn stop(mut self) {
        if let Some(mut f) = self.follower.take() {
            let _ = f.stop().await;
        }
        if let Some((raft, _)) = self.in_process.take() {
            let _ = raft.shutdown().await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Client writes on a 3-node cluster

enum ClusterNodes {
    Net(Vec<KvNode>),
    InProcess(Vec<KvRaft>),
}

/// A 3-node cluster of the demo KV store (snapshots and log purges as configured for a long
/// run), written to through its leader.
pub struct ClusterBench {
    nodes: ClusterNodes,
    keys: Vec<String>,
}

/// What one batch of writes measured.
#[derive(Debug, Clone)]
pub struct WriteRun {
    /// Wall time of the batch.
    pub elapsed: Duration,
    /// Commit latency of every write (client_write call to its response).
    pub latencies: Vec<Duration>,
}

impl ClusterBench {
    /// Starts 3 voters on `subject` (a transport with mTLS, or in-process channels).
    pub async fn start(subject: Subject) -> Result<ClusterBench, BenchError> {
        let raft_config = raft_config(Some(20_000))?;
        let keys = (0..4096).map(|i| format!("key-{i:05}")).collect();
        let nodes = match subject {
            Subject::Transport(t) => {
                let pki = Pki::new()?;
                let mut nodes = Vec::new();
                for id in 1..=3 {
                    nodes.push(
                        KvNode::start(id, raft_config.clone(), pki.config(id, t, 64)?, LOOPBACK.into())
                            .await?,
                    );
                }
                crate::demo::initialize_alone(&nodes[0]).await?;
                for n in &nodes[1..] {
                    nodes[0]
                        .raft
                        .add_learner(n.id, n.node(), true)
                        .await
                        .map_err(|e| bench_err("add learner")(e.to_string()))?;
                }
                nodes[0]
                    .raft
                    .change_membership(BTreeSet::from([1, 2, 3]), false)
                    .await
                    .map_err(|e| bench_err("membership")(e.to_string()))?;
                ClusterNodes::Net(nodes)
            }
            Subject::InProcess | Subject::InProcessEncoded => {
                let router = InProcessRouter::new(subject);
                let mut rafts = Vec::new();
                for id in 1..=3 {
                    let raft = openraft::Raft::new(
                        id,
                        raft_config.clone(),
                        router.factory(id, 64),
                        LogStore::default(),
                        StateMachine::default(),
                    )
                    .await
                    .map_err(|e| bench_err("start in-process node")(e.to_string()))?;
                    router.add(id, raft.clone());
                    rafts.push(raft);
                }
                let members = (1..=3).map(|id| {
                    (
                        id,
                        BasicNode {
                            addr: format!("in-process:{id}"),
                        },
                    )
                });
                rafts[0]
                    .initialize(members.collect::<std::collections::BTreeMap<_, _>>())
                    .await
                    .map_err(|e| bench_err("initialize")(e.to_string()))?;
                rafts[0]
                    .wait(Some(Duration::from_secs(10)))
                    .metrics(|m| m.current_leader == Some(1), "leader")
                    .await
                    .map_err(|e| bench_err("initialize")(e.to_string()))?;
                ClusterNodes::InProcess(rafts)
            }
            Subject::RawTls | Subject::RawTlsFile => {
                return Err(bench_err("cluster")("no raw-TLS cluster".into()));
            }
        };
        Ok(ClusterBench { nodes, keys })
    }

    fn rafts(&self) -> Vec<&KvRaft> {
        match &self.nodes {
            ClusterNodes::Net(nodes) => nodes.iter().map(|n| &n.raft).collect(),
            ClusterNodes::InProcess(rafts) => rafts.iter().collect(),
        }
    }

    /// The node that leads now (waiting out an election, if one is under way).
    async fn leader(&self) -> Result<&KvRaft, BenchError> {
        let rafts = self.rafts();
        let m = rafts[0]
            .wait(Some(Duration::from_secs(10)))
            .metrics(|m| m.current_leader.is_some(), "a leader")
            .await
            .map_err(|e| bench_err("find the leader")(e.to_string()))?;
        let id = m
            .current_leader
            .ok_or_else(|| bench_err("find the leader")("metrics lost the leader".into()))?;
        rafts
            .into_iter()
            .find(|r| *r.node_id() == id)
            .ok_or_else(|| bench_err("find the leader")(format!("node {id}")))
    }

    /// Writes `writes` values of `size` bytes with `writers` concurrent writers. A write that
    /// meets a leader change (a CPU-starved machine can time out a heartbeat), or a leader not
    /// serving yet (just elected, its first entry not committed), is retried on the leader of
    /// the moment for up to 10 s; its latency includes the wait.
    pub async fn run(&self, writes: usize, writers: usize, size: usize) -> Result<WriteRun, BenchError> {
        let value = Bytes::from(vec![0x42; size]);
        let first = self.leader().await?;
        let started = Instant::now();
        let mut latencies = Vec::with_capacity(writes);
        let mut stream = futures::stream::iter(0..writes)
            .map(|i| {
                let req = KvRequest::Set {
                    key: self.keys[i % self.keys.len()].clone(),
                    value: value.clone(),
                };
                async move {
                    let t = Instant::now();
                    let mut leader = first;
                    loop {
                        match leader.client_write(req.clone()).await {
                            Ok(_) => return Ok(t.elapsed()),
                            Err(e) if e.forward_to_leader().is_some() && t.elapsed() < LEADER_WAIT => {
                                tokio::time::sleep(Duration::from_millis(5)).await;
                                leader = self.leader().await?;
                            }
                            Err(e) if e.forward_to_leader().is_some() => {
                                return Err(bench_err("write")(format!(
                                    "no leader served the write within {LEADER_WAIT:?}: {e}"
                                )));
                            }
                            Err(e) => return Err(bench_err("write")(e.to_string())),
                        }
                    }
                }
            })
            .buffer_unordered(writers.max(1));
        while let Some(r) = stream.next().await {
            latencies.push(r?);
        }
        Ok(WriteRun {
            elapsed: started.elapsed(),
            latencies,
        })
    }

    /// Stops every node.
    pub async fn stop(self) {
        match self.nodes {
            ClusterNodes::Net(nodes) => {
                for mut n in nodes {
                    let _ = n.stop().await;
                }
            }
            ClusterNodes::InProcess(rafts) => {
                for r in rafts {
                    let _ = r.shutdown().await;
                }
            }
        }
    }
}

/// Does `iterations` times the metrics work of one pipelined append (the in-flight gauge up
/// and down, the reply's counter and round-trip histogram, the bytes sent and received, and
/// the one clock read per send the round trip adds to the pipeline) through handles
/// registered now, with whatever recorder is installed; returns the time.
/// `cargo bench -- metrics` runs it without a recorder and with a Prometheus one: the cost a
/// transport pays per append for its metrics, apart from the transport.
pub fn metrics_per_append(transport: Transport, iterations: u64) -> Duration {
    let stats = crate::stats::Stats::default().for_peer(2, transport);
    let (sent, received) = stats.byte_counters();
    let rtt = Duration::from_micros(50);
    let started = Instant::now();
    for _ in 0..iterations {
        std::hint::black_box(tokio::time::Instant::now());
        stats.record_in_flight(std::hint::black_box(1));
        sent.increment(std::hint::black_box(16 << 10));
        received.increment(std::hint::black_box(40));
        stats.record_answered(1);
        stats.record_ok(crate::stats::RpcKind::Append, std::hint::black_box(rtt));
    }
    started.elapsed()
}

/// The `p`-th percentile (0..=100) of `samples`, by nearest rank.
pub fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.sort_unstable();
    let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1]
}

// ---------------------------------------------------------------------------------------------
// The in-process network: openraft talking to itself over channels

/// Raft handles by node id, shared by every in-process client.
#[derive(Clone, Default)]
struct InProcessRouter {
    nodes: Arc<Mutex<HashMap<u64, KvRaft>>>,
    /// Whether replication requests go through [`through_the_wire`].
    encoded: bool,
}

impl InProcessRouter {
    fn new(subject: Subject) -> Self {
        InProcessRouter {
            nodes: Arc::default(),
            encoded: subject == Subject::InProcessEncoded,
        }
    }

    fn add(&self, id: u64, raft: KvRaft) {
        self.nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, raft);
    }

    fn factory(&self, id: u64, window: usize) -> InProcessFactory {
        InProcessFactory {
            router: self.clone(),
            id,
            window,
        }
    }

    fn network(&self, from: u64, target: u64, window: usize) -> InProcessNetwork {
        InProcessNetwork {
            router: self.clone(),
            from,
            target,
            window,
        }
    }
}

struct InProcessFactory {
    router: InProcessRouter,
    id: u64,
    window: usize,
}

impl RaftNetworkFactory<KvConfig> for InProcessFactory {
    type Network = InProcessNetwork;

    async fn new_client(&mut self, target: u64, _node: &BasicNode) -> InProcessNetwork {
        self.router.network(self.id, target, self.window)
    }
}

struct InProcessNetwork {
    router: InProcessRouter,
    from: u64,
    target: u64,
    window: usize,
}

impl InProcessNetwork {
    fn raft(&self) -> Result<KvRaft, RPCError<KvConfig>> {
        let nodes = self.router.nodes.lock().unwrap_or_else(|p| p.into_inner());
        nodes.get(&self.target).cloned().ok_or_else(|| {
            let e = TransportError::Connect {
                addr: format!("in-process:{}", self.target),
                reason: "no such node".into(),
            };
            RPCError::Unreachable(Unreachable::new(&e))
        })
    }

    fn refused<E: std::fmt::Display>(&self, rpc: RPCTypes, e: E) -> RPCError<KvConfig> {
        TransportError::Remote {
            rpc,
            reason: e.to_string(),
        }
        .into_rpc(self.from, self.target)
    }
}

struct InProcessSink {
    tx: Option<mpsc::Sender<AppendEntriesRequest<KvConfig>>>,
    encoded: bool,
}

/// What any transport does to a request's entry payloads at the least: encodes each (the
/// application's `WireMessage`), copies them into one buffer (the send), and decodes each
/// from a slice of it (the receive).
fn through_the_wire(
    mut req: AppendEntriesRequest<KvConfig>,
) -> Result<AppendEntriesRequest<KvConfig>, TransportError> {
    let mut wire = bytes::BytesMut::new();
    let mut spans = Vec::with_capacity(req.entries.len());
    for entry in &req.entries {
        if let EntryPayload::Normal(r) = &entry.payload {
            let encoded = WireMessage::encode(r)?;
            spans.push(wire.len()..wire.len() + encoded.len());
            wire.extend_from_slice(&encoded);
        }
    }
    let wire = wire.freeze();
    let normal = req.entries.iter_mut().filter_map(|e| match &mut e.payload {
        EntryPayload::Normal(r) => Some(r),
        _ => None,
    });
    for (r, span) in normal.zip(spans) {
        *r = WireMessage::decode(wire.slice(span)).map_err(|e| TransportError::Decode {
            rpc: RPCTypes::AppendEntries,
            source: e,
        })?;
    }
    Ok(req)
}

impl RequestSink<KvConfig> for InProcessSink {
    async fn send(&mut self, req: AppendEntriesRequest<KvConfig>) -> Result<usize, SendError<KvConfig>> {
        let closed = || TransportError::Broken {
            rpc: RPCTypes::AppendEntries,
            reason: "closed".into(),
        };
        let size = req.entries.len();
        let req = match self.encoded {
            true => through_the_wire(req)?,
            false => req,
        };
        self.tx
            .as_ref()
            .ok_or_else(closed)?
            .send(req)
            .await
            .map_err(|_| closed())?;
        Ok(size)
    }

    async fn finish(&mut self) -> Result<(), TransportError> {
        self.tx = None;
        Ok(())
    }
}

impl RaftNetworkV2<KvConfig> for InProcessNetwork {
    type SnapshotData = KvSnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<KvConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<KvConfig>, RPCError<KvConfig>> {
        self.raft()?
            .append_entries(rpc)
            .await
            .map_err(|e| self.refused(RPCTypes::AppendEntries, e))
    }

    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<
        's,
        Result<BoxStream<'s, Result<StreamAppendResult<KvConfig>, RPCError<KvConfig>>>, RPCError<KvConfig>>,
    >
    where
        S: Stream<Item = AppendEntriesRequest<KvConfig>> + Send + Unpin + 'static,
    {
        Box::pin(async move {
            let raft = self.raft()?;
            let (from, target) = (self.from, self.target);
            let (tx, rx) = mpsc::channel(self.window.max(1));
            let replies = raft
                .stream_append(tokio_stream::wrappers::ReceiverStream::new(rx))
                .map(|r| {
                    r.map_err(|e| TransportError::Remote {
                        rpc: RPCTypes::AppendEntries,
                        reason: e.to_string(),
                    })
                });
            let window = pipeline::Window {
                requests: self.window.max(1),
                bytes: usize::MAX,
            };
            let out = pipeline::run(
                input,
                InProcessSink {
                    tx: Some(tx),
                    encoded: self.router.encoded,
                },
                Box::pin(replies),
                window,
                option.soft_ttl(),
                crate::stats::Stats::default(),
                crate::stats::RpcKind::Append,
            )
            .map(move |r| r.map_err(|e| e.into_rpc(from, target)));
            Ok(Box::pin(out) as BoxStream<'s, _>)
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<KvConfig>,
        _option: RPCOption,
    ) -> Result<VoteResponse<KvConfig>, RPCError<KvConfig>> {
        self.raft()?
            .vote(rpc)
            .await
            .map_err(|e| self.refused(RPCTypes::Vote, e))
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<KvConfig>,
        _option: RPCOption,
    ) -> Result<VoteResponse<KvConfig>, RPCError<KvConfig>> {
        self.raft()?
            .pre_vote(rpc)
            .await
            .map_err(|e| self.refused(RPCTypes::Vote, e))
    }

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<KvConfig>,
        snapshot: SnapshotOf<KvConfig, KvSnapshotData>,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<KvConfig>, StreamingError<KvConfig>> {
        let raft = self.raft().map_err(|e| match e {
            RPCError::Unreachable(u) => StreamingError::Unreachable(u),
            other => StreamingError::Unreachable(Unreachable::new(&other)),
        })?;
        tokio::select! {
            r = raft.install_full_snapshot(vote, snapshot) => r.map_err(|e| {
                TransportError::Remote { rpc: RPCTypes::InstallSnapshot, reason: e.to_string() }
                    .into_streaming(self.from, self.target)
            }),
            closed = cancel => Err(StreamingError::Closed(closed)),
        }
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<KvConfig>,
        _option: RPCOption,
    ) -> Result<TransferLeaderResponse<KvConfig>, RPCError<KvConfig>> {
        self.raft()?
            .handle_transfer_leader(req)
            .await
            .map_err(|e| self.refused(RPCTypes::TransferLeader, e))
    }
}

// ---------------------------------------------------------------------------------------------
// Raw mutual TLS over TCP: the floor

/// A TLS server that reads length-prefixed messages and answers each with a 32-byte ack.
struct RawTlsServer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
    /// Bytes written into the newest file (file mode), for checking a transfer arrived whole.
    written: Arc<std::sync::atomic::AtomicU64>,
}

impl Drop for RawTlsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const RAW_ALPN: &[u8] = b"raftwire-bench-raw";

impl RawTlsServer {
    /// Starts the server on loopback, or on the far side of a veth link. With `files`, each
    /// empty message starts a fresh file in that directory and every payload is written to it
    /// before its ack (the file-to-file snapshot floor); without, payloads are discarded.
    async fn start_on(
        pki: &Pki,
        far: Option<&Far>,
        files: Option<PathBuf>,
    ) -> Result<RawTlsServer, BenchError> {
        let tls = pki
            .ca
            .tls_config(1)
            .map_err(|e| bench_err("raw TLS")(e.to_string()))?;
        let config = tls
            .server_config(RAW_ALPN)
            .map_err(|e| bench_err("raw TLS")(e.to_string()))?;
        let addr = listen_addr(far);
        match far {
            Some(far) => far.run(Self::serve(config, addr, files)).await?,
            None => Self::serve(config, addr, files).await,
        }
    }

    async fn serve(
        config: rustls::ServerConfig,
        addr: SocketAddr,
        files: Option<PathBuf>,
    ) -> Result<RawTlsServer, BenchError> {
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| bench_err("raw TLS")(e.to_string()))?;
        let addr = listener
            .local_addr()
            .map_err(|e| bench_err("raw TLS")(e.to_string()))?;
        let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let count = written.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let files = files.clone();
                let count = count.clone();
                tokio::spawn(async move {
                    let _ = tcp.set_nodelay(true);
                    let Ok(stream) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let _ = Self::absorb(stream, files, count).await;
                });
            }
        });
        Ok(RawTlsServer { addr, task, written })
    }

    /// Reads messages until the stream ends, acking each. With `files`, data goes into a file
    /// the way the snapshot receiver writes it (each chunk handed to `tokio::fs` as it arrives,
    /// one flush at the end): the first data message after an empty one starts a new file,
    /// an empty message flushes and closes the current one before its ack.
    async fn absorb(
        stream: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        files: Option<PathBuf>,
        written: Arc<std::sync::atomic::AtomicU64>,
    ) -> std::io::Result<()> {
        use std::sync::atomic::Ordering;
        let (mut rd, mut wr) = tokio::io::split(stream);
        let mut buf = vec![0u8; 1 << 20];
        let mut file: Option<tokio::fs::File> = None;
        loop {
            let len = rd.read_u32().await? as usize;
            if len == 0 {
                if let Some(mut done) = file.take() {
                    done.flush().await?;
                }
            } else if let Some(dir) = files.as_ref().filter(|_| file.is_none()) {
                file = Some(tokio::fs::File::from_std(tempfile::tempfile_in(dir)?));
                written.store(0, Ordering::Release);
            }
            let mut left = len;
            while left > 0 {
                let n = left.min(buf.len());
                rd.read_exact(&mut buf[..n]).await?;
                if let Some(f) = file.as_mut() {
                    f.write_all(&buf[..n]).await?;
                    written.fetch_add(n as u64, Ordering::Release);
                }
                left -= n;
            }
            wr.write_all(&[0u8; 32]).await?;
            wr.flush().await?;
        }
    }
}

/// The client half of the raw TLS baseline.
struct RawTlsClient {
    stream: Option<Box<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>>,
    window: usize,
}

impl RawTlsClient {
    fn placeholder() -> Self {
        RawTlsClient {
            stream: None,
            window: 1,
        }
    }

    async fn connect(pki: &Pki, addr: SocketAddr, window: usize) -> Result<RawTlsClient, BenchError> {
        let tls = pki
            .ca
            .tls_config(BENCH_LEADER)
            .map_err(|e| bench_err("raw TLS")(e.to_string()))?;
        let config = tls
            .client_config(1, RAW_ALPN)
            .map_err(|e| bench_err("raw TLS")(e.to_string()))?;
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| bench_err("raw TLS connect")(e.to_string()))?;
        tcp.set_nodelay(true)
            .map_err(|e| bench_err("raw TLS")(e.to_string()))?;
        let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(crate::tls::server_name(1), tcp)
            .await
            .map_err(|e| bench_err("raw TLS handshake")(e.to_string()))?;
        Ok(RawTlsClient {
            stream: Some(Box::new(stream)),
            window: window.max(1),
        })
    }

    /// One message of `size` bytes and its ack.
    async fn ping(&mut self, size: usize) -> Result<Duration, BenchError> {
        self.pipelined(1, size).await
    }

    /// `count` messages of `size` bytes with up to `window` unacknowledged, until every ack.
    async fn pipelined(&mut self, count: usize, size: usize) -> Result<Duration, BenchError> {
        // The length prefix and the payload go out in one write, as a transport would.
        let mut frame = Vec::with_capacity(4 + size);
        frame.extend_from_slice(&(size as u32).to_be_bytes());
        frame.resize(4 + size, 0x5a);
        let started = Instant::now();
        self.windowed(count, RawPayload::Fixed(&frame)).await?;
        Ok(started.elapsed())
    }

    /// The whole of `file` in messages of up to `chunk` bytes, read as they are sent, then an
    /// empty message that has a file-writing server flush and close its file before the last
    /// ack.
    async fn send_file(
        &mut self,
        file: &mut tokio::fs::File,
        size: u64,
        chunk: usize,
    ) -> Result<Duration, BenchError> {
        let started = Instant::now();
        self.windowed((size as usize).div_ceil(chunk), RawPayload::File { file, chunk })
            .await?;
        self.windowed(1, RawPayload::Fixed(&0u32.to_be_bytes())).await?;
        Ok(started.elapsed())
    }

    /// Sends `count` messages with up to `window` unacknowledged, until every ack.
    async fn windowed(&mut self, count: usize, mut payload: RawPayload<'_>) -> Result<(), BenchError> {
        let io = |e: std::io::Error| bench_err("raw TLS")(e.to_string());
        let stream = self
            .stream
            .as_mut()
            .ok_or_else(|| bench_err("raw TLS")("not connected".into()))?;
        let mut ack = [0u8; 32];
        let (mut sent, mut acked) = (0, 0);
        while acked < count {
            while sent < count && sent - acked < self.window {
                match &mut payload {
                    RawPayload::Fixed(frame) => stream.write_all(frame).await.map_err(io)?,
                    RawPayload::File { file, chunk } => {
                        let data = crate::snapshot::next_chunk(*file, *chunk)
                            .await
                            .map_err(io)?
                            .ok_or_else(|| bench_err("raw TLS")("the file ended early".into()))?;
                        // The length prefix and the chunk in one write, as a transport would.
                        let prefix = (data.len() as u32).to_be_bytes();
                        stream
                            .write_all_buf(&mut bytes::Buf::chain(&prefix[..], &data[..]))
                            .await
                            .map_err(io)?;
                    }
                }
                sent += 1;
            }
            stream.flush().await.map_err(io)?;
            stream.read_exact(&mut ack).await.map_err(io)?;
            acked += 1;
        }
        Ok(())
    }
}

/// What each message of a raw TLS run carries.
enum RawPayload<'a> {
    /// The same length-prefixed frame every time.
    Fixed(&'a [u8]),
    /// The next `chunk` bytes of a file.
    File {
        file: &'a mut tokio::fs::File,
        chunk: usize,
    },
}

fn snapshot_only(group: &str) -> BenchError {
    bench_err(group)("the file-to-file raw TLS baseline measures snapshots only".into())
}

// ---------------------------------------------------------------------------------------------
// Quick mode

/// One transport's line of the quick report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QuickTransport {
    /// Pipelined 16 KiB-entry append throughput (window 64), bytes/s.
    pub append_16k_bytes_per_sec: f64,
    /// That throughput as a fraction of the raw TLS stream's.
    pub append_16k_vs_raw_tls: f64,
    /// CPU seconds (user + system, the whole process: sender and receiver) per MiB of entry
    /// payload in that run.
    pub append_16k_cpu_s_per_mib: f64,
    /// Client writes/s of a 3-node cluster, 256 writers, 256 B entries.
    pub writes_per_sec_256: f64,
    /// Those writes/s as a fraction of the in-process cluster's.
    pub writes_vs_in_process: f64,
    /// CPU µs (user + system, all three nodes) per write in that run.
    pub write_cpu_us: f64,
    /// That CPU per write as a multiple of the in-process cluster's.
    pub write_cpu_vs_in_process: f64,
    /// Heartbeat round trip, median, µs.
    pub heartbeat_p50_us: f64,
    /// Heartbeat round trip, 99th percentile, µs.
    pub heartbeat_p99_us: f64,
    /// Median heartbeat as a multiple of the raw TLS ping-pong median.
    pub heartbeat_p50_vs_raw: f64,
    /// The transport's share of the median heartbeat: it less the in-process network's
    /// median (openraft's and the pipeline's share), µs.
    pub heartbeat_p50_transport_us: f64,
}

/// What `raftwire bench --quick` measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QuickReport {
    /// Per transport.
    pub transports: std::collections::BTreeMap<&'static str, QuickTransport>,
    /// Raw TLS 16 KiB-entry stream, bytes/s.
    pub raw_tls_bytes_per_sec: f64,
    /// Raw TLS stream, CPU seconds per MiB.
    pub raw_tls_cpu_s_per_mib: f64,
    /// Raw TLS ping-pong, median µs.
    pub raw_tls_ping_p50_us: f64,
    /// Raw TLS ping-pong, 99th percentile µs.
    pub raw_tls_ping_p99_us: f64,
    /// In-process cluster writes/s (256 writers, 256 B).
    pub in_process_writes_per_sec: f64,
    /// In-process cluster, CPU µs per write.
    pub in_process_write_cpu_us: f64,
    /// In-process append throughput (16 KiB entries, window 64), bytes/s.
    pub in_process_bytes_per_sec: f64,
    /// In-process heartbeat round trip, median µs: openraft's share of every transport's.
    pub in_process_heartbeat_p50_us: f64,
}

/// CPU time (user + system) this process has used so far: every thread, so a benchmark's
/// senders, receivers and Raft nodes alike (they all run in this process).
pub fn cpu_time() -> Duration {
    // SAFETY: `getrusage` only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Median of several timed runs of `requests` appends: bytes/s, and CPU seconds per MiB of
/// entry payload (the median run's).
async fn append_rate(subject: Subject, requests: usize, rounds: usize) -> Result<(f64, f64), BenchError> {
    let mut bench = AppendBench::start(subject, 16 << 10, 64).await?;
    let mut runs = Vec::new();
    for _ in 0..rounds {
        let cpu = cpu_time();
        let t = bench.run(requests).await?;
        let cpu = cpu_time().saturating_sub(cpu);
        let bytes = bench.bytes_per_request() as f64 * requests as f64;
        runs.push((
            bytes / t.as_secs_f64(),
            cpu.as_secs_f64() / (bytes / (1 << 20) as f64),
        ));
    }
    bench.stop().await;
    runs.sort_by(|a, b| a.0.total_cmp(&b.0));
    Ok(runs[runs.len() / 2])
}

/// Client writes/s of a 3-node cluster (256 writers, 256 B), and CPU µs per write.
async fn write_rate(subject: Subject, writes: usize) -> Result<(f64, f64), BenchError> {
    let cluster = ClusterBench::start(subject).await?;
    cluster.run(writes / 4, 256, 256).await?; // warm-up
    let cpu = cpu_time();
    let run = cluster.run(writes, 256, 256).await?;
    let cpu = cpu_time().saturating_sub(cpu);
    cluster.stop().await;
    Ok((
        writes as f64 / run.elapsed.as_secs_f64(),
        cpu.as_secs_f64() * 1e6 / writes as f64,
    ))
}

/// Heartbeat (or raw ping-pong) round trips: (p50, p99) in µs.
async fn heartbeat_latency(subject: Subject, samples: usize) -> Result<(f64, f64), BenchError> {
    let mut bench = RpcBench::start(subject).await?;
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        times.push(bench.heartbeat().await?);
    }
    bench.stop().await;
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    Ok((us(percentile(&mut times, 50.0)), us(percentile(&mut times, 99.0))))
}

/// The reduced matrix of `raftwire bench --quick`: well under two minutes.
pub async fn quick(mut progress: impl FnMut(&str)) -> Result<QuickReport, BenchError> {
    let (requests, rounds, writes, samples) = (512, 7, 100_000, 2_000);
    progress("raw TLS baseline");
    let (raw_rate, raw_cpu) = append_rate(Subject::RawTls, requests, rounds).await?;
    let (raw_p50, raw_p99) = heartbeat_latency(Subject::RawTls, samples).await?;
    progress("in-process baseline");
    let (in_process_rate, _) = append_rate(Subject::InProcess, requests, rounds).await?;
    let (in_process_writes, in_process_cpu) = write_rate(Subject::InProcess, writes).await?;
    let (in_process_p50, _) = heartbeat_latency(Subject::InProcess, samples).await?;
    let mut transports = std::collections::BTreeMap::new();
    for subject in Subject::transports() {
        progress(subject.name());
        let (rate, append_cpu) = append_rate(subject, requests, rounds).await?;
        let (writes_per_sec, write_cpu) = write_rate(subject, writes).await?;
        let (p50, p99) = heartbeat_latency(subject, samples).await?;
        transports.insert(
            subject.name(),
            QuickTransport {
                append_16k_bytes_per_sec: rate,
                append_16k_vs_raw_tls: rate / raw_rate,
                append_16k_cpu_s_per_mib: append_cpu,
                writes_per_sec_256: writes_per_sec,
                writes_vs_in_process: writes_per_sec / in_process_writes,
                write_cpu_us: write_cpu,
                write_cpu_vs_in_process: write_cpu / in_process_cpu,
                heartbeat_p50_us: p50,
                heartbeat_p99_us: p99,
                heartbeat_p50_vs_raw: p50 / raw_p50,
                heartbeat_p50_transport_us: p50 - in_process_p50,
            },
        );
    }
    Ok(QuickReport {
        transports,
        raw_tls_bytes_per_sec: raw_rate,
        raw_tls_cpu_s_per_mib: raw_cpu,
        raw_tls_ping_p50_us: raw_p50,
        raw_tls_ping_p99_us: raw_p99,
        in_process_writes_per_sec: in_process_writes,
        in_process_write_cpu_us: in_process_cpu,
        in_process_bytes_per_sec: in_process_rate,
        in_process_heartbeat_p50_us: in_process_p50,
    })
}

// ---------------------------------------------------------------------------------------------
// Snapshots

/// A state machine that keeps no data, for snapshot benchmarks: it applies entries (answering
/// each with an empty response) and, on a snapshot install, only records its size. Its
/// snapshot data is a file, so a snapshot of any size streams with bounded memory.
#[derive(Clone, Default)]
pub struct BlobStateMachine {
    inner: Arc<Mutex<BlobState>>,
}

#[derive(Default)]
struct BlobState {
    last_applied: Option<openraft::LogId<WireLeaderId>>,
    membership: openraft::StoredMembership<WireLeaderId, u64, BasicNode>,
    installed_bytes: u64,
}

type BlobSnapshot = openraft::Snapshot<WireLeaderId, u64, BasicNode, tokio::fs::File>;
type BlobMeta = openraft::SnapshotMeta<WireLeaderId, u64, BasicNode>;

impl BlobStateMachine {
    fn state(&self) -> std::sync::MutexGuard<'_, BlobState> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes of every snapshot installed so far.
    pub fn installed_bytes(&self) -> u64 {
        self.state().installed_bytes
    }
}

impl openraft::RaftSnapshotBuilder<KvConfig> for BlobStateMachine {
    type SnapshotData = tokio::fs::File;

    async fn build_snapshot(&mut self) -> Result<BlobSnapshot, std::io::Error> {
        // This state machine holds no data: its snapshot is an empty file.
        let file = tokio::fs::File::from_std(tempfile::tempfile()?);
        let s = self.state();
        Ok(openraft::Snapshot {
            meta: BlobMeta {
                last_log_id: s.last_applied,
                last_membership: s.membership.clone(),
            },
            snapshot: file,
        })
    }
}

impl openraft::storage::RaftStateMachine<KvConfig> for BlobStateMachine {
    type SnapshotData = tokio::fs::File;
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<
        (
            Option<openraft::LogId<WireLeaderId>>,
            openraft::StoredMembership<WireLeaderId, u64, BasicNode>,
        ),
        std::io::Error,
    > {
        let s = self.state();
        Ok((s.last_applied, s.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), std::io::Error>
    where
        Strm:
            Stream<Item = Result<openraft::storage::EntryResponder<KvConfig>, std::io::Error>> + Unpin + Send,
    {
        use futures::TryStreamExt;
        while let Some((entry, responder)) = entries.try_next().await? {
            {
                let mut s = self.state();
                s.last_applied = Some(entry.log_id);
                if let EntryPayload::Membership(m) = entry.payload {
                    s.membership = openraft::StoredMembership::new(Some(entry.log_id), m);
                }
            }
            if let Some(r) = responder {
                r.send(crate::kv::KvResponse::default());
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &BlobMeta,
        snapshot: tokio::fs::File,
    ) -> Result<(), std::io::Error> {
        let size = snapshot.metadata().await?.len();
        let mut s = self.state();
        s.installed_bytes += size;
        s.last_applied = meta.last_log_id;
        s.membership = meta.last_membership.clone();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<BlobSnapshot>, std::io::Error> {
        // Installed snapshots are counted, not kept: there is none to serve.
        Ok(None)
    }
}

enum SnapshotTarget {
    Net {
        client: Box<Network<KvConfig, tokio::fs::File>>,
        receiver: openraft::Raft<KvConfig, BlobStateMachine>,
        sm: BlobStateMachine,
        server: Option<crate::Server>,
    },
    /// The raw TLS baseline; its server keeps running while held and counts what it wrote.
    Raw {
        server: RawTlsServer,
        client: RawTlsClient,
        /// Read from the snapshot file and written to files on the receiver.
        with_files: bool,
    },
}

/// A whole snapshot of `size` bytes, read from a file, sent to a receiver that writes it to a
/// file; or the same bytes over raw TLS.
pub struct SnapshotBench {
    target: SnapshotTarget,
    dir: tempfile::TempDir,
    size: u64,
    next_index: u64,
}

impl SnapshotBench {
    /// Writes a `size`-byte snapshot file and starts the receiver.
    pub async fn start(subject: Subject, size: u64) -> Result<SnapshotBench, BenchError> {
        Self::start_on(subject, size, None).await
    }

    /// Like [`SnapshotBench::start`], with the receiver's listener on the far side of a veth
    /// link when `far` is set.
    pub async fn start_on(
        subject: Subject,
        size: u64,
        far: Option<Far>,
    ) -> Result<SnapshotBench, BenchError> {
        let io = |e: std::io::Error| bench_err("snapshot file")(e.to_string());
        let dir = tempfile::tempdir().map_err(io)?;
        {
            let mut f = tokio::fs::File::create(dir.path().join("snapshot"))
                .await
                .map_err(io)?;
            let block = vec![0xa5u8; 1 << 20];
            let mut left = size;
            while left > 0 {
                let n = left.min(block.len() as u64) as usize;
                f.write_all(&block[..n]).await.map_err(io)?;
                left -= n as u64;
            }
            f.flush().await.map_err(io)?;
        }
        let pki = Pki::new()?;
        let target = match subject {
            Subject::Transport(t) => {
                let sm = BlobStateMachine::default();
                let config = pki.config(1, t, 64)?;
                let network = NetworkFactory::<KvConfig, tokio::fs::File>::new(1, config.clone())
                    .map_err(|e| bench_err("network")(e.to_string()))?;
                let receiver =
                    openraft::Raft::new(1, raft_config(None)?, network, LogStore::default(), sm.clone())
                        .await
                        .map_err(|e| bench_err("start receiver")(e.to_string()))?;
                let recv_dir = dir.path().to_path_buf();
                let sink = move || {
                    let dir = recv_dir.clone();
                    async move { tempfile::tempfile_in(dir).map(tokio::fs::File::from_std) }
                };
                let bind = crate::Server::builder_with_sink(receiver.clone(), config, sink)
                    .bind(listen_addr(far.as_ref()));
                let server = match &far {
                    Some(far) => far.run(bind).await?,
                    None => bind.await,
                }
                .map_err(|e| bench_err("start receiver")(e.to_string()))?;
                let node = BasicNode {
                    addr: server.local_addr().to_string(),
                };
                let mut factory = NetworkFactory::<KvConfig, tokio::fs::File>::new(
                    BENCH_LEADER,
                    pki.config(BENCH_LEADER, t, 64)?,
                )
                .map_err(|e| bench_err("network")(e.to_string()))?;
                let client = Box::new(factory.new_snapshot_client(1, &node).await);
                SnapshotTarget::Net {
                    client,
                    receiver,
                    sm,
                    server: Some(server),
                }
            }
            Subject::RawTls | Subject::RawTlsFile => {
                let files = (subject == Subject::RawTlsFile).then(|| dir.path().to_path_buf());
                let with_files = files.is_some();
                let server = RawTlsServer::start_on(&pki, far.as_ref(), files).await?;
                let client = RawTlsClient::connect(&pki, server.addr, 64).await?;
                SnapshotTarget::Raw {
                    server,
                    client,
                    with_files,
                }
            }
            Subject::InProcess | Subject::InProcessEncoded => {
                return Err(bench_err("snapshot")("no in-process snapshot is measured".into()));
            }
        };
        Ok(SnapshotBench {
            target,
            dir,
            size,
            next_index: 1,
        })
    }

    /// Sends the whole snapshot once; the time covers the transfer and the receiver's answer.
    pub async fn run(&mut self) -> Result<Duration, BenchError> {
        match &mut self.target {
            SnapshotTarget::Raw {
                server,
                client,
                with_files,
            } => {
                let chunk = 1usize << 20;
                if *with_files {
                    let mut file = tokio::fs::File::open(self.dir.path().join("snapshot"))
                        .await
                        .map_err(|e| bench_err("snapshot file")(e.to_string()))?;
                    let elapsed = client.send_file(&mut file, self.size, chunk).await?;
                    let written = server.written.load(std::sync::atomic::Ordering::Acquire);
                    if written != self.size {
                        return Err(bench_err("snapshot")(format!(
                            "{written} of {} bytes written on the raw receiver",
                            self.size
                        )));
                    }
                    Ok(elapsed)
                } else {
                    client
                        .pipelined((self.size as usize).div_ceil(chunk), chunk)
                        .await
                }
            }
            SnapshotTarget::Net { client, sm, .. } => {
                let file = tokio::fs::File::open(self.dir.path().join("snapshot"))
                    .await
                    .map_err(|e| bench_err("snapshot file")(e.to_string()))?;
                let leader = WireLeaderId {
                    term: 1,
                    node_id: BENCH_LEADER,
                };
                let log_id = openraft::LogId {
                    leader_id: leader,
                    index: self.next_index,
                };
                self.next_index += 1;
                let membership = openraft::Membership::new_with_defaults(
                    vec![BTreeSet::from([BENCH_LEADER])],
                    [BENCH_LEADER],
                );
                let meta = BlobMeta {
                    last_log_id: Some(log_id),
                    last_membership: openraft::StoredMembership::new(Some(log_id), membership),
                };
                let vote = openraft::impls::Vote {
                    leader_id: leader,
                    committed: true,
                };
                let before = sm.installed_bytes();
                let started = Instant::now();
                client
                    .full_snapshot(
                        vote,
                        openraft::Snapshot { meta, snapshot: file },
                        std::future::pending(),
                        option(),
                    )
                    .await
                    .map_err(|e| bench_err("snapshot")(e.to_string()))?;
                let elapsed = started.elapsed();
                let installed = sm.installed_bytes() - before;
                if installed != self.size {
                    return Err(bench_err("snapshot")(format!(
                        "{installed} of {} bytes installed",
                        self.size
                    )));
                }
                Ok(elapsed)
            }
        }
    }

    /// Stops the receiver and removes the files.
    pub async fn stop(self) {
        if let SnapshotTarget::Net {
            receiver, mut server, ..
        } = self.target
        {
            if let Some(s) = server.take() {
                let _ = s.shutdown().await;
            }
            let _ = receiver.shutdown().await;
        }
    }
}
