//! Network configuration shared by the factory and the server.

use std::sync::Arc;
use std::time::Duration;

use crate::error::ConfigError;
use crate::error::TransportError;
use crate::tls::TlsConfig;

/// Which transport carries Raft traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Transport {
    /// gRPC over HTTP/2 (tonic + prost): the default.
    #[cfg(feature = "grpc")]
    #[cfg_attr(feature = "grpc", default)]
    Grpc,
    /// QUIC (quinn) with raftwire's own framing: a stream per replication session, heartbeat,
    /// vote and snapshot, so none waits behind another. Always encrypted (mutual TLS).
    #[cfg(feature = "quic")]
    #[cfg_attr(not(feature = "grpc"), default)]
    Quic,
    /// raftwire's own framing over TLS 1.3 on TCP: the bulk-throughput path. Separate
    /// connections per peer for replication, heartbeats and votes, and snapshots. Always
    /// encrypted (mutual TLS); shares a TCP port with gRPC (told apart by ALPN).
    #[cfg(feature = "tcp")]
    #[cfg_attr(not(any(feature = "grpc", feature = "quic")), default)]
    Tcp,
}

impl Transport {
    /// The lowercase name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            #[cfg(feature = "grpc")]
            Transport::Grpc => "grpc",
            #[cfg(feature = "quic")]
            Transport::Quic => "quic",
            #[cfg(feature = "tcp")]
            Transport::Tcp => "tcp",
        }
    }
}

impl Transport {
    /// Parses a preference list such as `quic,grpc` (most preferred first; no repeats).
    pub fn parse_list(s: &str) -> Result<Vec<Transport>, ConfigError> {
        let list = s
            .split(',')
            .map(|t| t.trim().parse())
            .collect::<Result<Vec<Transport>, _>>()?;
        check_preference(&list)?;
        Ok(list)
    }
}

/// A preference list names at least one transport and none twice.
fn check_preference(list: &[Transport]) -> Result<(), ConfigError> {
    let names = || list.iter().map(|t| t.name()).collect::<Vec<_>>().join(",");
    if list.is_empty() {
        return Err(ConfigError::Invalid {
            field: "transports",
            requirement: "at least one transport",
            value: "none".into(),
        });
    }
    if list.iter().enumerate().any(|(i, t)| list[..i].contains(t)) {
        return Err(ConfigError::Invalid {
            field: "transports",
            requirement: "each transport at most once",
            value: names(),
        });
    }
    Ok(())
}

/// Decides whether a failed call means "this transport does not work toward this peer" (so
/// the factory falls back to the next transport of the preference list for a while) rather
/// than "this peer is down or busy" (reported to openraft as it is). See
/// [`ConfigBuilder::fallback_when`].
#[derive(Clone)]
pub struct FallbackPolicy(Arc<dyn Fn(&TransportError) -> bool + Send + Sync>);

impl FallbackPolicy {
    /// The default: a failed connect or TLS handshake ([`TransportError::Connect`]). A peer
    /// that is down fails every transport alike, so falling back costs nothing there.
    pub fn connect_failures() -> Self {
        FallbackPolicy(Arc::new(|e| matches!(e, TransportError::Connect { .. })))
    }

    /// Whether `error` makes the factory fall back.
    pub fn falls_back(&self, error: &TransportError) -> bool {
        (self.0)(error)
    }
}

impl std::fmt::Debug for FallbackPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FallbackPolicy(..)")
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Transport {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            #[cfg(feature = "grpc")]
            "grpc" => Ok(Transport::Grpc),
            #[cfg(feature = "quic")]
            "quic" => Ok(Transport::Quic),
            #[cfg(feature = "tcp")]
            "tcp" => Ok(Transport::Tcp),
            other => Err(ConfigError::UnknownTransport(other.to_string())),
        }
    }
}

/// Settings for [`NetworkFactory`](crate::NetworkFactory) and [`Server`](crate::Server).
///
/// Build one with [`Config::builder`]; every setting has a default chosen for replication
/// between machines on a LAN.
///
/// # Limits
///
/// Nothing a peer can make a node hold grows without bound; each limit is a setting:
///
/// | limit | default | setting |
/// |---|---|---|
/// | unused cached connections to a peer | closed after 60 s | [`ConfigBuilder::idle_peer_timeout`] |
/// | concurrent requests per connection | 256 | [`ConfigBuilder::max_concurrent_streams`] |
/// | TLS handshakes in progress (server) | 64, each ≤ `connect_timeout` | [`ConfigBuilder::max_concurrent_handshakes`] |
/// | connections per node identity (server) | 16 | [`ConfigBuilder::max_connections_per_peer`] |
/// | idle TCP connections per peer and purpose (client) | 4 | [`ConfigBuilder::max_idle_connections`] |
/// | vote / pre-vote / transfer-leader request | 64 KiB | [`ConfigBuilder::max_control_message_size`] |
/// | any other message | 64 MiB | [`ConfigBuilder::max_message_size`] |
/// | a snapshot in flight | one chunk (1 MiB) | [`ConfigBuilder::snapshot_chunk_size`] |
///
/// **Server-wide buffered bytes** are bounded by these, not by a budget of their own. A peer
/// without a certificate from the cluster CA gets no further than a handshake: at most
/// `max_concurrent_handshakes` TLS states (a few tens of KiB each) at any time. A certified
/// peer may have `max_connections_per_peer` connections, each with at most
/// `max_concurrent_streams` requests being received, each of at most `max_message_size`
/// bytes, so the worst case is `peers × max_connections_per_peer × max_concurrent_streams ×
/// max_message_size` (on top of each connection's receive window: 16 MiB on gRPC,
/// [`QuicTuning::receive_window`] on QUIC). Only nodes holding certificates of the cluster CA
/// can reach it; lower `max_concurrent_streams` or `max_message_size` where that worst case
/// matters.
#[derive(Debug, Clone)]
pub struct Config {
    /// Most preferred first; never empty.
    pub(crate) transports: Vec<Transport>,
    pub(crate) fallback_backoff: Duration,
    pub(crate) fallback: FallbackPolicy,
    pub(crate) connect_timeout: Duration,
    pub(crate) rpc_timeout: Option<Duration>,
    pub(crate) max_message_size: usize,
    pub(crate) max_in_flight_requests: usize,
    pub(crate) max_in_flight_bytes: usize,
    pub(crate) snapshot_chunk_size: usize,
    pub(crate) snapshot_idle_timeout: Duration,
    pub(crate) shutdown_grace: Duration,
    pub(crate) idle_peer_timeout: Duration,
    pub(crate) max_concurrent_streams: u32,
    pub(crate) max_concurrent_handshakes: usize,
    pub(crate) max_connections_per_peer: usize,
    pub(crate) max_idle_connections: usize,
    pub(crate) max_control_message_size: usize,
    pub(crate) tls: Option<TlsConfig>,
    pub(crate) quic: QuicTuning,
    #[cfg(feature = "compression")]
    pub(crate) compression: Compression,
}

impl Config {
    fn defaults() -> Self {
        Config {
            transports: vec![Transport::default()],
            fallback_backoff: Duration::from_secs(10),
            fallback: FallbackPolicy::connect_failures(),
            connect_timeout: Duration::from_secs(2),
            rpc_timeout: None,
            max_message_size: 64 << 20,
            max_in_flight_requests: 64,
            max_in_flight_bytes: 64 << 20,
            snapshot_chunk_size: 1 << 20,
            snapshot_idle_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(1),
            idle_peer_timeout: Duration::from_secs(60),
            max_concurrent_streams: 256,
            max_concurrent_handshakes: 64,
            max_connections_per_peer: 16,
            max_idle_connections: 4,
            max_control_message_size: 64 << 10,
            tls: None,
            quic: QuicTuning::default(),
            #[cfg(feature = "compression")]
            compression: Compression::Off,
        }
    }

    /// Starts a builder with the defaults. Either [`ConfigBuilder::tls`] or the explicit
    /// [`ConfigBuilder::insecure_plaintext`] must be called before `build`.
    pub fn builder() -> ConfigBuilder {
        ConfigBuilder {
            config: Config::defaults(),
            plaintext: false,
        }
    }

    /// This node's TLS identity and CA, or `None` for the plaintext opt-in.
    pub fn tls(&self) -> Option<&TlsConfig> {
        self.tls.as_ref()
    }

    /// The transport this config prefers (the first of [`Config::transports`]).
    pub fn transport(&self) -> Transport {
        self.transports[0]
    }

    /// Every transport this config uses, most preferred first: a server serves all of them,
    /// a factory tries them in this order per peer.
    pub fn transports(&self) -> &[Transport] {
        &self.transports
    }

    /// The most encoded bytes one message may have, on send and on receive.
    pub fn max_message_size(&self) -> usize {
        self.max_message_size
    }

    /// Whether and how large frames are compressed.
    #[cfg(feature = "compression")]
    pub fn compression(&self) -> Compression {
        self.compression
    }

    /// The in-flight window of one replication stream.
    pub(crate) fn window(&self) -> crate::pipeline::Window {
        crate::pipeline::Window {
            requests: self.max_in_flight_requests,
            bytes: self.max_in_flight_bytes,
        }
    }

    /// The deadline for one RPC: openraft's `soft_ttl`, capped by `rpc_timeout` if set.
    pub(crate) fn deadline(&self, soft_ttl: Duration) -> Duration {
        match self.rpc_timeout {
            Some(cap) => soft_ttl.min(cap),
            None => soft_ttl,
        }
    }
}

/// Builder for [`Config`]; [`ConfigBuilder::build`] validates the combination.
#[derive(Debug, Clone)]
pub struct ConfigBuilder {
    config: Config,
    plaintext: bool,
}

impl ConfigBuilder {
    /// Selects one transport. Default: [`Transport::Grpc`].
    pub fn transport(mut self, transport: Transport) -> Self {
        self.config.transports = vec![transport];
        self
    }

    /// Selects several transports, most preferred first (for example QUIC, then gRPC). A
    /// [`Server`](crate::Server) serves every one of them (by default on the same port
    /// number: TCP for gRPC, UDP for QUIC). A [`NetworkFactory`](crate::NetworkFactory) uses,
    /// per peer, the most preferred transport that connects, and falls back to the next when
    /// a call fails in a way [`ConfigBuilder::fallback_when`] attributes to the transport.
    /// `build` refuses an empty list or a repeated transport.
    pub fn transports(mut self, preference: impl IntoIterator<Item = Transport>) -> Self {
        self.config.transports = preference.into_iter().collect();
        self
    }

    /// How long a peer stays on a fallback transport after its preferred one failed, before
    /// the preferred one is probed again (in the background; calls keep using the fallback
    /// until the probe connects). Default: 10 s.
    pub fn fallback_backoff(mut self, backoff: Duration) -> Self {
        self.config.fallback_backoff = backoff;
        self
    }

    /// Which failures make the factory fall back to the next transport of the preference
    /// list (for that call and for [`fallback_backoff`](ConfigBuilder::fallback_backoff)).
    /// Default: [`FallbackPolicy::connect_failures`]. Other failures are reported to openraft
    /// unchanged.
    pub fn fallback_when(
        mut self,
        predicate: impl Fn(&TransportError) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.config.fallback = FallbackPolicy(Arc::new(predicate));
        self
    }

    /// How long establishing a connection (TCP + HTTP/2 handshake) may take before the peer
    /// counts as unreachable. Default: 2 s, long enough for a cross-datacenter handshake,
    /// short enough that openraft's backoff starts promptly.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.config.connect_timeout = timeout;
        self
    }

    /// An upper bound on any single RPC, applied on top of openraft's per-call `soft_ttl`.
    /// Default: none (openraft's deadline alone applies).
    pub fn rpc_timeout(mut self, timeout: Duration) -> Self {
        self.config.rpc_timeout = Some(timeout);
        self
    }

    /// The largest encoded message accepted or sent. Default: 64 MiB, which holds openraft's
    /// default 300-entry batches of entries up to ~200 KiB each. Larger messages are refused
    /// with `ResourceExhausted`.
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.config.max_message_size = bytes;
        self
    }

    /// How many AppendEntries requests a replication stream keeps in flight before waiting
    /// for an ack. openraft sets no window of its own: this is the pipeline depth.
    /// Default: 64, which matches the follower's internal pipeline.
    pub fn max_in_flight_requests(mut self, requests: usize) -> Self {
        self.config.max_in_flight_requests = requests;
        self
    }

    /// How many encoded bytes a replication stream keeps in flight. One request is always
    /// allowed even if it alone is larger. Default: 64 MiB.
    pub fn max_in_flight_bytes(mut self, bytes: usize) -> Self {
        self.config.max_in_flight_bytes = bytes;
        self
    }

    /// The size of each snapshot chunk on the wire; also the most snapshot data either side
    /// buffers at once. openraft's `snapshot_max_chunk_size`, when set on the call, wins.
    /// Default: 1 MiB.
    pub fn snapshot_chunk_size(mut self, bytes: usize) -> Self {
        self.config.snapshot_chunk_size = bytes;
        self
    }

    /// How long a snapshot transfer may make no progress (no chunk accepted, or no reply
    /// after the last chunk while the receiver installs it) before it fails with a timeout.
    /// A deadline on progress, not on the total, so large snapshots are not cut off.
    /// Default: 10 s.
    pub fn snapshot_idle_timeout(mut self, timeout: Duration) -> Self {
        self.config.snapshot_idle_timeout = timeout;
        self
    }

    /// How long [`Server::shutdown`](crate::Server::shutdown) lets calls in flight finish
    /// after it stops accepting, before it closes every connection. Replication streams from
    /// a live leader never end on their own, so this is always waited out while a leader is
    /// connected. Default: 1 s, longer than any heartbeat or vote round trip.
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.config.shutdown_grace = grace;
        self
    }

    /// How long a peer's cached connections may go unused, with no client of openraft holding
    /// them, before the factory closes them and forgets the peer. Without it a node keeps a
    /// connection (and its buffers) to every peer it ever talked to, removed members and
    /// departed learners included. A swept peer is simply dialled again on next use (one
    /// handshake, in the background). Default: 60 s, far longer than any gap between
    /// heartbeats or elections of a live membership.
    pub fn idle_peer_timeout(mut self, timeout: Duration) -> Self {
        self.config.idle_peer_timeout = timeout;
        self
    }

    /// How many requests one peer may have open at once on one connection (HTTP/2
    /// `SETTINGS_MAX_CONCURRENT_STREAMS` for gRPC; the bidirectional stream credit for QUIC,
    /// where the smaller of this and [`QuicTuning::max_concurrent_streams`] applies). Default:
    /// 256: a peer needs a handful (a replication stream, heartbeats, a vote, a snapshot), and
    /// the cap bounds what one hostile connection makes the server hold (tonic otherwise
    /// leaves HTTP/2 unbounded).
    pub fn max_concurrent_streams(mut self, streams: u32) -> Self {
        self.config.max_concurrent_streams = streams;
        self
    }

    /// How many TLS handshakes the server runs at once. Each lasts at most
    /// [`connect_timeout`](ConfigBuilder::connect_timeout); connections arriving while every
    /// slot is busy are turned away at once (gRPC closes the TCP connection; QUIC answers with
    /// a Retry, which costs the server no state, or refuses an already validated address).
    /// Default: 64, far more than a cluster's peers ever dial at once, while a flood of
    /// half-open handshakes holds at most 64 sockets and TLS states.
    pub fn max_concurrent_handshakes(mut self, handshakes: usize) -> Self {
        self.config.max_concurrent_handshakes = handshakes;
        self
    }

    /// How many connections the server keeps open for one node identity (the node id in the
    /// peer's certificate); a connection over the limit is closed as soon as its handshake
    /// reveals who it is, and logged. Not applied to plaintext gRPC, whose callers have no
    /// identity. Default: 16: a gRPC peer legitimately uses 3 (replication, heartbeats,
    /// snapshots), a QUIC peer 1, and reconnects briefly overlap the old connection.
    pub fn max_connections_per_peer(mut self, connections: usize) -> Self {
        self.config.max_connections_per_peer = connections;
        self
    }

    /// How many idle connections the TCP transport keeps per peer and purpose (replication,
    /// heartbeats and votes, snapshots) for the next exchange; one whose exchange ends while
    /// this many wait is closed. A connection carries one exchange at a time, so a burst of
    /// concurrent calls dials more, and this caps what stays open after it. Default: 4 (a
    /// replication session, heartbeats and an election need one or two each), well under
    /// [`max_connections_per_peer`](ConfigBuilder::max_connections_per_peer) at the peer.
    pub fn max_idle_connections(mut self, connections: usize) -> Self {
        self.config.max_idle_connections = connections;
        self
    }

    /// The largest vote, pre-vote or transfer-leader request the server accepts. These are a
    /// few dozen bytes; refusing anything larger before reading it (QUIC: from the frame
    /// header; gRPC: from the message prefix, and never past this many body bytes) keeps a
    /// peer from making the server buffer up to
    /// [`max_message_size`](ConfigBuilder::max_message_size) for them. Refused with
    /// `ResourceExhausted` (gRPC) or a `TooLarge` error frame (QUIC). Default: 64 KiB.
    pub fn max_control_message_size(mut self, bytes: usize) -> Self {
        self.config.max_control_message_size = bytes;
        self
    }

    /// Mutual TLS with this node's identity and the cluster CA: required unless
    /// [`ConfigBuilder::insecure_plaintext`] is chosen explicitly.
    pub fn tls(mut self, tls: TlsConfig) -> Self {
        self.config.tls = Some(tls);
        self
    }

    /// Opts out of TLS: peers are not authenticated and traffic is readable by anyone on the
    /// path. gRPC only (QUIC always encrypts); logged as a warning wherever it is used.
    pub fn insecure_plaintext(mut self) -> Self {
        self.plaintext = true;
        self
    }

    /// Compresses large frames: append batches and snapshot chunks (see [`Compression`]).
    /// Every node of a cluster must use the same setting: a peer that differs is refused at
    /// connect with an error that says so (QUIC and TCP: no common ALPN protocol in the TLS
    /// handshake; gRPC: every call refused with `FailedPrecondition`). Default:
    /// [`Compression::Off`].
    #[cfg(feature = "compression")]
    pub fn compression(mut self, compression: Compression) -> Self {
        self.config.compression = compression;
        self
    }

    /// QUIC transport tuning (ignored by gRPC).
    pub fn quic(mut self, tuning: QuicTuning) -> Self {
        self.config.quic = tuning;
        self
    }

    /// Validates and returns the config.
    pub fn build(self) -> Result<Config, ConfigError> {
        let c = self.config;
        check_preference(&c.transports)?;
        #[cfg(feature = "quic")]
        if c.transports.contains(&Transport::Quic) && self.plaintext {
            return Err(ConfigError::Invalid {
                field: "insecure_plaintext",
                requirement: "unset for QUIC (QUIC always runs mutual TLS)",
                value: "set".into(),
            });
        }
        #[cfg(feature = "tcp")]
        if c.transports.contains(&Transport::Tcp) && self.plaintext {
            return Err(ConfigError::Invalid {
                field: "insecure_plaintext",
                requirement: "unset for TCP (the TCP transport always runs mutual TLS)",
                value: "set".into(),
            });
        }
        match (&c.tls, self.plaintext) {
            (Some(_), true) => {
                return Err(ConfigError::Invalid {
                    field: "tls",
                    requirement: "either a TLS identity or insecure_plaintext(), not both",
                    value: "both".into(),
                });
            }
            (None, false) => {
                return Err(ConfigError::Invalid {
                    field: "tls",
                    requirement: "a TLS identity (secure by default), or an explicit insecure_plaintext()",
                    value: "none".into(),
                });
            }
            _ => {}
        }
        let positive = |field: &'static str, value: usize| {
            if value == 0 {
                Err(ConfigError::Invalid {
                    field,
                    requirement: "greater than zero",
                    value: value.to_string(),
                })
            } else {
                Ok(())
            }
        };
        positive("max_in_flight_requests", c.max_in_flight_requests)?;
        positive("max_in_flight_bytes", c.max_in_flight_bytes)?;
        positive("snapshot_chunk_size", c.snapshot_chunk_size)?;
        positive("max_message_size", c.max_message_size)?;
        positive("max_concurrent_streams", c.max_concurrent_streams as usize)?;
        positive("max_concurrent_handshakes", c.max_concurrent_handshakes)?;
        positive("max_connections_per_peer", c.max_connections_per_peer)?;
        positive("max_control_message_size", c.max_control_message_size)?;
        if c.idle_peer_timeout.is_zero() {
            return Err(ConfigError::Invalid {
                field: "idle_peer_timeout",
                requirement: "non-zero",
                value: "0s".into(),
            });
        }
        if c.snapshot_chunk_size + 1024 > c.max_message_size {
            return Err(ConfigError::Invalid {
                field: "snapshot_chunk_size",
                requirement: "at least 1 KiB below max_message_size",
                value: c.snapshot_chunk_size.to_string(),
            });
        }
        if c.fallback_backoff.is_zero() {
            return Err(ConfigError::Invalid {
                field: "fallback_backoff",
                requirement: "non-zero",
                value: "0s".into(),
            });
        }
        if c.connect_timeout.is_zero() {
            return Err(ConfigError::Invalid {
                field: "connect_timeout",
                requirement: "non-zero",
                value: "0s".into(),
            });
        }
        #[cfg(feature = "compression")]
        if let Compression::Zstd { level, .. } = c.compression
            && (!(-7..=19).contains(&level) || level == 0)
        {
            return Err(ConfigError::Invalid {
                field: "compression",
                requirement: "a zstd level from -7 to 19, not 0 (zstd's fast levels are negative; receivers accept windows up to level 19's 8 MiB)",
                value: level.to_string(),
            });
        }
        if c.snapshot_idle_timeout.is_zero() {
            return Err(ConfigError::Invalid {
                field: "snapshot_idle_timeout",
                requirement: "non-zero",
                value: "0s".into(),
            });
        }
        Ok(c)
    }
}

/// The transports compiled into this build, for error messages.
pub(crate) fn compiled_transports() -> String {
    let compiled = [
        (cfg!(feature = "grpc"), "grpc"),
        (cfg!(feature = "quic"), "quic"),
        (cfg!(feature = "tcp"), "tcp"),
    ];
    let names: Vec<&str> = compiled.iter().filter(|(on, _)| *on).map(|(_, n)| *n).collect();
    match names.is_empty() {
        true => "none".into(),
        false => names.join(", "),
    }
}

/// Compression of large frames, set per cluster with [`ConfigBuilder::compression`] (cargo
/// feature `compression`).
///
/// On QUIC and TCP, an append batch or snapshot chunk whose encoded body has at least
/// `min_size` bytes is compressed with zstd and sent compressed only if that made it smaller
/// (incompressible data costs one compression attempt, never extra bytes on the wire).
/// Votes, heartbeats without entries and replies are never compressed. A compressed frame
/// decompresses to at most [`max_message_size`](ConfigBuilder::max_message_size) bytes; a
/// larger one is refused like an oversized frame. gRPC uses gRPC's own message compression
/// (`grpc-encoding: zstd`) for replication and snapshot messages as above (at `level`, from
/// `min_size` bytes); unary calls and replies are never compressed.
///
/// Memory: every sending stream (a replication session, a snapshot upload, a QUIC or TCP
/// exchange) keeps one zstd compression context for as long as it lives, made when its first
/// large frame is compressed; its size grows with the level, from about a megabyte at the
/// fast levels to tens of MiB at level 19. QUIC and TCP receivers keep one decompression
/// context per stream, its window capped at 8 MiB; gRPC receivers use tonic's zstd decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg(feature = "compression")]
pub enum Compression {
    /// Nothing is compressed (the default).
    #[default]
    Off,
    /// zstd at `level` (1 to 19; negative levels down to -7 are faster and compress less) for
    /// bodies of at least `min_size` bytes.
    Zstd {
        /// zstd's compression level.
        level: i32,
        /// The smallest encoded body worth compressing, in bytes.
        min_size: usize,
    },
}

#[cfg(feature = "compression")]
impl Compression {
    /// zstd at level 1 for bodies of 4 KiB and more: fast enough to keep up with a
    /// replication stream on one core (see BENCHMARKS.md).
    pub fn zstd() -> Self {
        Compression::Zstd {
            level: 1,
            min_size: 4096,
        }
    }

    /// Whether this setting compresses anything.
    pub fn is_on(self) -> bool {
        !matches!(self, Compression::Off)
    }
}

/// The congestion controller of QUIC connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum CongestionControl {
    /// CUBIC (RFC 9438): the default of quinn and of Linux TCP.
    #[default]
    Cubic,
    /// NewReno (RFC 9002).
    NewReno,
    /// BBR (experimental in quinn).
    Bbr,
}

/// QUIC connection tuning. Defaults favour bulk replication on a LAN; see each field.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct QuicTuning {
    /// Per-stream receive window. Must cover the bandwidth-delay product of one replication
    /// stream: quinn's 1.25 MB default caps a 1 ms-RTT path near 10 Gbit/s and stalls large
    /// batches. Default: 16 MiB.
    pub stream_receive_window: u64,
    /// Connection-wide receive window (all streams). Default: 64 MiB.
    pub receive_window: u64,
    /// Bytes the sender keeps unacknowledged per connection. Default: 64 MiB.
    pub send_window: u64,
    /// Initial MTU (UDP payload). 1200 is valid on every path; 1452 fits Ethernet, loopback
    /// and veth and saves a fifth of the per-packet costs. Path MTU discovery raises it
    /// further where possible. Default: 1452.
    pub initial_mtu: u16,
    /// The largest UDP payload path MTU discovery tries. Larger packets cost less per byte
    /// (crypto, header protection, ACKs and a syscall share are paid per packet), but a bound
    /// above what the path carries only wastes probes. 1452 fits Ethernet and the internet's
    /// usual paths; a jumbo-frame LAN (MTU 9000) carries 8952, loopback up to 65527. Never
    /// below `initial_mtu`. Default: 1452.
    pub max_mtu: u16,
    /// Keep-alive interval, so idle connections survive NAT and middlebox timeouts and dead
    /// peers are noticed. Default: 5 s.
    pub keep_alive_interval: std::time::Duration,
    /// A connection with no traffic for this long is closed. Default: 30 s.
    pub idle_timeout: std::time::Duration,
    /// The congestion controller. Default: CUBIC.
    pub congestion: CongestionControl,
    /// Requested UDP socket buffer sizes (send and receive), raised where the OS allows; a
    /// smaller granted size is logged as a warning (raise `net.core.rmem_max`/`wmem_max`).
    /// Default: 8 MiB.
    pub udp_buffer: usize,
    /// The round-trip time assumed before the first measurement. It sets how soon a lost
    /// handshake packet is resent: quinn's 333 ms (RFC 9002's value for the open internet)
    /// makes a dial that started while a restarting peer was down wait up to a second after
    /// the peer is back. Default: 100 ms, generous for a LAN; raise it on long-haul links.
    pub initial_rtt: std::time::Duration,
    /// Concurrent bidirectional streams a peer may open. The smaller of this and
    /// [`ConfigBuilder::max_concurrent_streams`] applies. Default: 256 (heartbeats, votes and
    /// replication of a handful of sessions need far fewer; the cap bounds a hostile peer).
    pub max_concurrent_streams: u32,
}

impl Default for QuicTuning {
    fn default() -> Self {
        QuicTuning {
            stream_receive_window: 16 << 20,
            receive_window: 64 << 20,
            send_window: 64 << 20,
            initial_mtu: 1452,
            max_mtu: 1452,
            keep_alive_interval: std::time::Duration::from_secs(5),
            idle_timeout: std::time::Duration::from_secs(30),
            congestion: CongestionControl::Cubic,
            udp_buffer: 8 << 20,
            initial_rtt: std::time::Duration::from_millis(100),
            max_concurrent_streams: 256,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A builder with a valid identity, so every transport accepts it.
    fn builder() -> ConfigBuilder {
        let ca = crate::certs::CertificateAuthority::generate("config test CA").unwrap();
        Config::builder().tls(ca.tls_config(1).unwrap())
    }

    #[test]
    fn preference_lists_parse_and_must_be_sound() {
        let all: Vec<Transport> = [
            #[cfg(feature = "quic")]
            Transport::Quic,
            #[cfg(feature = "tcp")]
            Transport::Tcp,
            #[cfg(feature = "grpc")]
            Transport::Grpc,
        ]
        .into();
        let names = all.iter().map(|t| t.name()).collect::<Vec<_>>().join(" , ");
        assert_eq!(Transport::parse_list(&names).unwrap(), all);
        let twice = format!("{0},{0}", all[0].name());
        let err = Transport::parse_list(&twice).unwrap_err();
        assert!(err.to_string().contains("at most once"), "{err}");
        assert!(Transport::parse_list("carrier-pigeon").is_err());
        assert!(Transport::parse_list("").is_err());

        let c = builder().transports(all.clone()).build().unwrap();
        assert_eq!(c.transports(), &all[..]);
        assert_eq!(c.transport(), all[0]);
        let err = builder().transports([]).build().unwrap_err();
        assert!(err.to_string().contains("transports"), "{err}");
        let err = builder().fallback_backoff(Duration::ZERO).build().unwrap_err();
        assert!(err.to_string().contains("fallback_backoff"), "{err}");
    }

    #[test]
    fn the_fallback_predicate_defaults_to_connect_failures_and_can_be_set() {
        let connect = TransportError::Connect {
            addr: "a:1".into(),
            reason: "refused".into(),
        };
        let broken = TransportError::Broken {
            rpc: openraft::network::RPCTypes::Vote,
            reason: "reset".into(),
        };
        let c = builder().build().unwrap();
        assert!(c.fallback.falls_back(&connect));
        assert!(!c.fallback.falls_back(&broken));
        let c = builder().fallback_when(|_| true).build().unwrap();
        assert!(c.fallback.falls_back(&broken));
    }

    #[test]
    fn zero_window_is_refused_by_name() {
        let err = builder().max_in_flight_requests(0).build().unwrap_err();
        assert!(err.to_string().contains("max_in_flight_requests"), "{err}");
    }

    #[test]
    fn chunk_must_fit_in_a_message() {
        let err = builder()
            .max_message_size(1 << 20)
            .snapshot_chunk_size(1 << 20)
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("snapshot_chunk_size"), "{err}");
    }

    #[test]
    fn rpc_timeout_caps_soft_ttl() {
        let c = builder().rpc_timeout(Duration::from_millis(10)).build().unwrap();
        assert_eq!(c.deadline(Duration::from_secs(1)), Duration::from_millis(10));
        assert_eq!(
            Config::defaults().deadline(Duration::from_secs(1)),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn tls_is_required_unless_plaintext_is_chosen() {
        let err = Config::builder().build().unwrap_err();
        assert!(err.to_string().contains("tls"), "{err}");
        #[cfg(feature = "grpc")]
        assert!(
            Config::builder()
                .transport(Transport::Grpc)
                .insecure_plaintext()
                .build()
                .is_ok()
        );
        #[cfg(feature = "quic")]
        assert!(
            Config::builder()
                .transport(Transport::Quic)
                .insecure_plaintext()
                .build()
                .is_err()
        );
        #[cfg(feature = "tcp")]
        assert!(
            Config::builder()
                .transport(Transport::Tcp)
                .insecure_plaintext()
                .build()
                .is_err()
        );
    }

    #[test]
    fn transport_names_round_trip() {
        #[cfg(feature = "grpc")]
        assert_eq!("grpc".parse::<Transport>().unwrap(), Transport::Grpc);
        #[cfg(feature = "quic")]
        assert_eq!("quic".parse::<Transport>().unwrap(), Transport::Quic);
        #[cfg(feature = "tcp")]
        assert_eq!("tcp".parse::<Transport>().unwrap(), Transport::Tcp);
        assert!("carrier-pigeon".parse::<Transport>().is_err());
    }
}
