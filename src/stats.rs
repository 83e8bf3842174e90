//! Counters a factory keeps about its traffic, for observability and tests.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;

use crate::config::Transport;

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

/// Shared handle to the counters; cheap to clone.
#[derive(Debug, Clone, Default)]
pub(crate) struct Stats(Arc<Counters>);

impl Stats {
    pub(crate) fn record_in_flight(&self, n: usize) {
        self.0.append_requests.fetch_add(1, Ordering::Relaxed);
        self.0.max_in_flight.fetch_max(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn record_connect(&self) {
        self.0.connects.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn record_snapshot_bytes(&self, n: usize) {
        self.0.snapshot_bytes_sent.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn record_snapshot_sent(&self) {
        self.0.snapshots_sent.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> NetworkStats {
        let c = &self.0;
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
