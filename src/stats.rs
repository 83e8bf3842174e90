//! What a factory records about its traffic: counters of its own ([`NetworkStats`]) and, per
//! peer and transport, metrics through the [`metrics`] facade (names in [`METRICS`]).
//!
//! Metric handles are registered once per link, when the factory makes it; recording is then
//! an update of a handle, which is a no-op while the application installs no recorder. Only
//! failures (rare) register their handle when they happen, because their labels name the
//! failure.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;

use metrics::Counter;
use metrics::Gauge;
use metrics::Histogram;

use crate::config::Transport;
use crate::error::TransportError;

/// The metrics raftwire records, each labelled `peer` (the target node id) and `transport`:
/// `(name, kind, help)`.
pub const METRICS: &[(&str, &str, &str)] = &[
    (
        RPCS,
        "counter",
        "RPCs to a peer by `kind` (vote, pre_vote, append, heartbeat, transfer_leader, snapshot) \
         and `outcome` (ok, rejected, or the failure: connect, timeout, broken, remote, decode, \
         encode, too_large, snapshot_read, abandoned); each pipelined append is one",
    ),
    (
        RTT,
        "histogram",
        "Seconds from a request's send to its reply, by `kind` (a pipelined append: from the \
         moment the transport took it)",
    ),
    (
        IN_FLIGHT,
        "gauge",
        "Pipelined AppendEntries requests sent to a peer and not yet answered",
    ),
    (
        BYTES_SENT,
        "counter",
        "Bytes sent to a peer: TCP payload (TLS records) for gRPC, stream data for QUIC",
    ),
    (
        BYTES_RECEIVED,
        "counter",
        "Bytes received from a peer: TCP payload (TLS records) for gRPC, stream data for QUIC",
    ),
    (
        CONNECTS,
        "counter",
        "Connections established to a peer: the first and every reconnect",
    ),
    (SNAPSHOT_BYTES, "counter", "Snapshot data bytes sent to a peer"),
    (
        SNAPSHOT_SECONDS,
        "histogram",
        "Seconds a completed snapshot transfer to a peer took, from opening to its answer",
    ),
];

const RPCS: &str = "raftwire_rpcs_total";
const RTT: &str = "raftwire_rpc_round_trip_seconds";
const IN_FLIGHT: &str = "raftwire_append_in_flight";
const BYTES_SENT: &str = "raftwire_bytes_sent_total";
const BYTES_RECEIVED: &str = "raftwire_bytes_received_total";
const CONNECTS: &str = "raftwire_connects_total";
const SNAPSHOT_BYTES: &str = "raftwire_snapshot_bytes_sent_total";
const SNAPSHOT_SECONDS: &str = "raftwire_snapshot_seconds";

/// Tells the installed recorder (if any) what each metric means.
pub(crate) fn describe() {
    for &(name, kind, help) in METRICS {
        match kind {
            "counter" => metrics::describe_counter!(name, help),
            "gauge" => metrics::describe_gauge!(name, help),
            _ => metrics::describe_histogram!(name, help),
        }
    }
}

/// The kinds of RPC the metrics tell apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RpcKind {
    Vote,
    PreVote,
    Append,
    Heartbeat,
    TransferLeader,
    Snapshot,
}

impl RpcKind {
    const ALL: [RpcKind; 6] = [
        RpcKind::Vote,
        RpcKind::PreVote,
        RpcKind::Append,
        RpcKind::Heartbeat,
        RpcKind::TransferLeader,
        RpcKind::Snapshot,
    ];

    fn name(self) -> &'static str {
        match self {
            RpcKind::Vote => "vote",
            RpcKind::PreVote => "pre_vote",
            RpcKind::Append => "append",
            RpcKind::Heartbeat => "heartbeat",
            RpcKind::TransferLeader => "transfer_leader",
            RpcKind::Snapshot => "snapshot",
        }
    }
}

/// The `outcome` label of a failed RPC.
fn failure(e: &TransportError) -> &'static str {
    match e {
        TransportError::Connect { .. } => "connect",
        TransportError::Timeout { .. } => "timeout",
        TransportError::Broken { .. } => "broken",
        TransportError::Remote { .. } => "remote",
        TransportError::Decode { .. } => "decode",
        TransportError::Encode(_) => "encode",
        TransportError::TooLarge { .. } => "too_large",
        TransportError::SnapshotRead(_) => "snapshot_read",
    }
}

/// The metric handles of one peer on one transport.
struct PeerMeter {
    peer: String,
    transport: &'static str,
    ok: [Counter; RpcKind::ALL.len()],
    rejected: [Counter; RpcKind::ALL.len()],
    rtt: [Histogram; RpcKind::ALL.len()],
    in_flight: Gauge,
    sent: Counter,
    received: Counter,
    connects: Counter,
    snapshot_bytes: Counter,
    snapshot_seconds: Histogram,
}

impl PeerMeter {
    fn new(target: u64, transport: Transport) -> Self {
        let peer = target.to_string();
        let transport = transport.name();
        let labels = || [("peer", peer.clone()), ("transport", transport.to_string())];
        let by_kind = |outcome: &'static str| {
            RpcKind::ALL.map(|k| {
                metrics::counter!(
                    RPCS,
                    &[
                        ("peer", peer.clone()),
                        ("transport", transport.to_string()),
                        ("kind", k.name().to_string()),
                        ("outcome", outcome.to_string()),
                    ]
                )
            })
        };
        PeerMeter {
            ok: by_kind("ok"),
            rejected: by_kind("rejected"),
            rtt: RpcKind::ALL.map(|k| {
                metrics::histogram!(
                    RTT,
                    &[
                        ("peer", peer.clone()),
                        ("transport", transport.to_string()),
                        ("kind", k.name().to_string()),
                    ]
                )
            }),
            in_flight: metrics::gauge!(IN_FLIGHT, &labels()),
            sent: metrics::counter!(BYTES_SENT, &labels()),
            received: metrics::counter!(BYTES_RECEIVED, &labels()),
            connects: metrics::counter!(CONNECTS, &labels()),
            snapshot_bytes: metrics::counter!(SNAPSHOT_BYTES, &labels()),
            snapshot_seconds: metrics::histogram!(SNAPSHOT_SECONDS, &labels()),
            peer,
            transport,
        }
    }
}

/// A point-in-time copy of a factory's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct NetworkStats {
    /// AppendEntries requests sent on replication streams (heartbeats included).
    pub append_requests: u64,
    /// The most requests one replication stream ever had in flight at once.
    pub max_in_flight: u64,
    /// Connections established (the first and every reconnect).
    pub connects: u64,
    /// Snapshots sent to completion.
    pub snapshots_sent: u64,
    /// Snapshot data bytes sent.
    pub snapshot_bytes_sent: u64,
    /// Peers in the factory's connection cache: peers of the current membership, plus
    /// departed ones until their links have been unused for
    /// [`idle_peer_timeout`](crate::ConfigBuilder::idle_peer_timeout).
    pub peers_cached: u64,
    /// Links in the factory's connection cache, each holding at most one connection (gRPC
    /// keeps up to 3 per peer: replication, heartbeats, snapshots; QUIC 1).
    pub links_cached: u64,
    /// The transport each cached peer is on: with one transport, that one; with a preference
    /// list, the transport the peer's last successful call or reply used (absent before the
    /// first).
    pub peer_transports: BTreeMap<u64, Transport>,
}

#[derive(Debug, Default)]
struct Counters {
    append_requests: AtomicU64,
    max_in_flight: AtomicU64,
    connects: AtomicU64,
    snapshots_sent: AtomicU64,
    snapshot_bytes_sent: AtomicU64,
}

/// Shared handle to the counters, and to one peer's metrics once made for a link
/// ([`Stats::for_peer`]); cheap to clone.
#[derive(Clone, Default)]
pub(crate) struct Stats {
    counters: Arc<Counters>,
    peer: Option<Arc<PeerMeter>>,
}

impl std::fmt::Debug for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("Stats");
        d.field("counters", &self.counters);
        if let Some(p) = &self.peer {
            d.field("peer", &p.peer).field("transport", &p.transport);
        }
        d.finish()
    }
}

impl Stats {
    /// The same counters, plus metrics labelled with `target` and `transport`: what a link
    /// records through. Registers the handles, so call it once per link, never per call.
    pub(crate) fn for_peer(&self, target: u64, transport: Transport) -> Stats {
        Stats {
            counters: self.counters.clone(),
            peer: Some(Arc::new(PeerMeter::new(target, transport))),
        }
    }

    /// An RPC's outcome; `rtt` is its round trip if it was answered.
    pub(crate) fn record_rpc<T>(&self, kind: RpcKind, outcome: &Result<T, TransportError>, rtt: Duration) {
        match outcome {
            Ok(_) => self.record_ok(kind, rtt),
            Err(e) => self.record_error(kind, e),
        }
    }

    /// An RPC answered after `rtt`.
    pub(crate) fn record_ok(&self, kind: RpcKind, rtt: Duration) {
        if let Some(p) = &self.peer {
            p.ok[kind as usize].increment(1);
            p.rtt[kind as usize].record(rtt);
        }
    }

    /// An RPC that failed with `e`.
    pub(crate) fn record_error(&self, kind: RpcKind, e: &TransportError) {
        self.record_failure(kind, failure(e));
    }

    /// An RPC the peer answered with a refusal of its own (a conflict, a higher vote).
    pub(crate) fn record_rejected(&self, kind: RpcKind) {
        if let Some(p) = &self.peer {
            p.rejected[kind as usize].increment(1);
        }
    }

    /// An RPC that failed for `outcome`; registers its handle now (failures are rare).
    pub(crate) fn record_failure(&self, kind: RpcKind, outcome: &'static str) {
        if let Some(p) = &self.peer {
            metrics::counter!(
                RPCS,
                &[
                    ("peer", p.peer.clone()),
                    ("transport", p.transport.to_string()),
                    ("kind", kind.name().to_string()),
                    ("outcome", outcome.to_string()),
                ]
            )
            .increment(1);
        }
    }

    /// A pipelined request was sent; `n` are now awaiting their replies on its stream.
    pub(crate) fn record_in_flight(&self, n: usize) {
        self.counters.append_requests.fetch_add(1, Ordering::Relaxed);
        self.counters.max_in_flight.fetch_max(n as u64, Ordering::Relaxed);
        if let Some(p) = &self.peer {
            p.in_flight.increment(1.0);
        }
    }

    /// `n` pipelined requests were answered or given up on.
    pub(crate) fn record_answered(&self, n: usize) {
        if let Some(p) = &self.peer
            && n > 0
        {
            p.in_flight.decrement(n as f64);
        }
    }

    pub(crate) fn record_connect(&self) {
        self.counters.connects.fetch_add(1, Ordering::Relaxed);
        if let Some(p) = &self.peer {
            p.connects.increment(1);
        }
    }

    pub(crate) fn record_snapshot_bytes(&self, n: usize) {
        self.counters
            .snapshot_bytes_sent
            .fetch_add(n as u64, Ordering::Relaxed);
        if let Some(p) = &self.peer {
            p.snapshot_bytes.increment(n as u64);
        }
    }

    /// A snapshot transfer completed in `took`.
    pub(crate) fn record_snapshot_sent(&self, took: Duration) {
        self.counters.snapshots_sent.fetch_add(1, Ordering::Relaxed);
        if let Some(p) = &self.peer {
            p.snapshot_seconds.record(took);
        }
    }

    /// The counters that bytes sent and received are added to (no-ops without a peer).
    pub(crate) fn byte_counters(&self) -> (Counter, Counter) {
        match &self.peer {
            Some(p) => (p.sent.clone(), p.received.clone()),
            None => (Counter::noop(), Counter::noop()),
        }
    }

    pub(crate) fn snapshot(&self) -> NetworkStats {
        let c = &self.counters;
        NetworkStats {
            append_requests: c.append_requests.load(Ordering::Relaxed),
            max_in_flight: c.max_in_flight.load(Ordering::Relaxed),
            connects: c.connects.load(Ordering::Relaxed),
            snapshots_sent: c.snapshots_sent.load(Ordering::Relaxed),
            snapshot_bytes_sent: c.snapshot_bytes_sent.load(Ordering::Relaxed),
            // Filled in by the factory, which owns the cache.
            peers_cached: 0,
            links_cached: 0,
            peer_transports: BTreeMap::new(),
        }
    }
}
