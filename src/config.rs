//! Network configuration shared by the factory and the server.

use std::time::Duration;

use crate::error::ConfigError;
use crate::tls::TlsConfig;

/// Which transport carries Raft traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
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
}

impl Transport {
    /// The lowercase name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            #[cfg(feature = "grpc")]
            Transport::Grpc => "grpc",
            #[cfg(feature = "quic")]
            Transport::Quic => "quic",
        }
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
            other => Err(ConfigError::UnknownTransport(other.to_string())),
        }
    }
}

/// Settings for [`NetworkFactory`](crate::NetworkFactory) and [`Server`](crate::Server).
///
/// Build one with [`Config::builder`]; every setting has a default chosen for replication
/// between machines on a LAN.
#[derive(Debug, Clone)]
pub struct Config {
    pub(crate) transport: Transport,
    pub(crate) connect_timeout: Duration,
    pub(crate) rpc_timeout: Option<Duration>,
    pub(crate) max_message_size: usize,
    pub(crate) max_in_flight_requests: usize,
    pub(crate) max_in_flight_bytes: usize,
    pub(crate) snapshot_chunk_size: usize,
    pub(crate) snapshot_idle_timeout: Duration,
    pub(crate) shutdown_grace: Duration,
    pub(crate) tls: Option<TlsConfig>,
    pub(crate) quic: QuicTuning,
}

impl Config {
    fn defaults() -> Self {
        Config {
            transport: Transport::default(),
            connect_timeout: Duration::from_secs(2),
            rpc_timeout: None,
            max_message_size: 64 << 20,
            max_in_flight_requests: 64,
            max_in_flight_bytes: 64 << 20,
            snapshot_chunk_size: 1 << 20,
            snapshot_idle_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(1),
            tls: None,
            quic: QuicTuning::default(),
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

    /// The transport this config selects.
    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// The most encoded bytes one message may have, on send and on receive.
    pub fn max_message_size(&self) -> usize {
        self.max_message_size
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
    /// Selects the transport. Default: [`Transport::Grpc`].
    pub fn transport(mut self, transport: Transport) -> Self {
        self.config.transport = transport;
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

    /// QUIC transport tuning (ignored by gRPC).
    pub fn quic(mut self, tuning: QuicTuning) -> Self {
        self.config.quic = tuning;
        self
    }

    /// Validates and returns the config.
    pub fn build(self) -> Result<Config, ConfigError> {
        let c = self.config;
        #[cfg(feature = "quic")]
        if c.transport == Transport::Quic && self.plaintext {
            return Err(ConfigError::Invalid {
                field: "insecure_plaintext",
                requirement: "unset for QUIC (QUIC always runs mutual TLS)",
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
        if c.snapshot_chunk_size + 1024 > c.max_message_size {
            return Err(ConfigError::Invalid {
                field: "snapshot_chunk_size",
                requirement: "at least 1 KiB below max_message_size",
                value: c.snapshot_chunk_size.to_string(),
            });
        }
        if c.connect_timeout.is_zero() {
            return Err(ConfigError::Invalid {
                field: "connect_timeout",
                requirement: "non-zero",
                value: "0s".into(),
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
pub(crate) fn compiled_transports() -> &'static str {
    match (cfg!(feature = "grpc"), cfg!(feature = "quic")) {
        (true, true) => "grpc, quic",
        (true, false) => "grpc",
        (false, true) => "quic",
        (false, false) => "none",
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
    /// Concurrent bidirectional streams a peer may open. Default: 256 (heartbeats, votes and
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
    }

    #[test]
    fn transport_names_round_trip() {
        #[cfg(feature = "grpc")]
        assert_eq!("grpc".parse::<Transport>().unwrap(), Transport::Grpc);
        #[cfg(feature = "quic")]
        assert_eq!("quic".parse::<Transport>().unwrap(), Transport::Quic);
        assert!("carrier-pigeon".parse::<Transport>().is_err());
    }
}
