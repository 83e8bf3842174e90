//! Network configuration shared by the factory and the server.

use std::time::Duration;

use crate::error::ConfigError;
use crate::tls::TlsConfig;

/// Which transport carries Raft traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Transport {
    /// gRPC over HTTP/2 (tonic + prost): the default.
    #[default]
    Grpc,
}

impl Transport {
    /// The lowercase name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Grpc => "grpc",
        }
    }
}

impl std::str::FromStr for Transport {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "grpc" => Ok(Transport::Grpc),
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
    pub(crate) tls: Option<TlsConfig>,
}

impl Config {
    fn defaults() -> Self {
        Config {
            transport: Transport::Grpc,
            connect_timeout: Duration::from_secs(2),
            rpc_timeout: None,
            max_message_size: 64 << 20,
            max_in_flight_requests: 64,
            max_in_flight_bytes: 64 << 20,
            snapshot_chunk_size: 1 << 20,
            snapshot_idle_timeout: Duration::from_secs(10),
            tls: None,
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

    /// Validates and returns the config.
    pub fn build(self) -> Result<Config, ConfigError> {
        let c = self.config;
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
    "grpc"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_window_is_refused_by_name() {
        let err = Config::builder()
            .insecure_plaintext()
            .max_in_flight_requests(0)
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("max_in_flight_requests"), "{err}");
    }

    #[test]
    fn chunk_must_fit_in_a_message() {
        let err = Config::builder()
            .insecure_plaintext()
            .max_message_size(1 << 20)
            .snapshot_chunk_size(1 << 20)
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("snapshot_chunk_size"), "{err}");
    }

    #[test]
    fn rpc_timeout_caps_soft_ttl() {
        let c = Config::builder()
            .insecure_plaintext()
            .rpc_timeout(Duration::from_millis(10))
            .build()
            .unwrap();
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
        assert!(Config::builder().insecure_plaintext().build().is_ok());
    }

    #[test]
    fn transport_names_round_trip() {
        assert_eq!("grpc".parse::<Transport>().unwrap(), Transport::Grpc);
        assert!("carrier-pigeon".parse::<Transport>().is_err());
    }
}
