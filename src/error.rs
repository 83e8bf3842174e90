//! Error types, and the one place transport failures become openraft errors.

use std::fmt;
use std::io;
use std::time::Duration;

use openraft::errors::NetworkError;
use openraft::errors::RPCError;
use openraft::errors::StreamingError;
use openraft::errors::Timeout;
use openraft::errors::Unreachable;
use openraft::network::RPCTypes;

use crate::types::RaftWireConfig;

/// A [`Config`](crate::Config) that cannot work.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A setting is out of range.
    #[error("config field `{field}` must be {requirement}, got {value}")]
    Invalid {
        /// The builder method / field name.
        field: &'static str,
        /// What the value must satisfy.
        requirement: &'static str,
        /// The value given.
        value: String,
    },
    /// A transport name that is not known or not compiled in.
    #[error("unknown transport `{0}` (compiled in: {compiled})", compiled = crate::config::compiled_transports())]
    UnknownTransport(String),
    /// The TLS certificate speaks for another node than the one it is used for: every peer
    /// would refuse it.
    #[error(
        "node {node_id} is configured with a TLS certificate for {certificate_names:?}: a node must present its own identity (node-{node_id}.raftwire)"
    )]
    IdentityMismatch {
        /// The node's own id.
        node_id: u64,
        /// The node names the certificate carries.
        certificate_names: Vec<String>,
    },
}

impl ConfigError {
    /// `Err` unless `tls` (if any) is node `node_id`'s identity.
    pub(crate) fn check_identity(
        node_id: u64,
        tls: Option<&crate::tls::TlsConfig>,
    ) -> Result<(), ConfigError> {
        match tls {
            Some(tls) if tls.node_id() != node_id => Err(ConfigError::IdentityMismatch {
                node_id,
                certificate_names: vec![crate::tls::node_dns_name(tls.node_id())],
            }),
            _ => Ok(()),
        }
    }
}

/// A message that does not decode: names the field path (`entries[3].log_id`) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field `{path}`: {reason}")]
pub struct DecodeError {
    path: String,
    reason: String,
}

impl DecodeError {
    /// A required field is absent.
    pub fn missing(field: &str) -> Self {
        DecodeError {
            path: field.to_string(),
            reason: "required field is missing".to_string(),
        }
    }

    /// A field is present but its value is invalid.
    pub fn invalid(field: &str, why: impl fmt::Display) -> Self {
        DecodeError {
            path: field.to_string(),
            reason: why.to_string(),
        }
    }

    /// Prefixes the path with the enclosing field: `log_id` within `entries[3]`.
    pub fn within(mut self, parent: &str) -> Self {
        self.path = if self.path.is_empty() {
            parent.to_string()
        } else {
            format!("{parent}.{}", self.path)
        };
        self
    }

    /// The dotted path of the offending field.
    pub fn field(&self) -> &str {
        &self.path
    }
}

/// An application value its [`WireMessage`](crate::WireMessage) impl could not encode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot encode value: {0}")]
pub struct EncodeError(pub String);

/// Why a call to a peer failed, before it is turned into an openraft error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The connection (TCP, TLS or protocol handshake) could not be made.
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// The peer address.
        addr: String,
        /// The underlying failure.
        reason: String,
    },
    /// No answer within the deadline.
    #[error("{rpc} got no answer within {after:?}")]
    Timeout {
        /// The RPC kind.
        rpc: RPCTypes,
        /// The deadline that passed.
        after: Duration,
    },
    /// An established call or stream broke.
    #[error("{rpc} call broke: {reason}")]
    Broken {
        /// The RPC kind.
        rpc: RPCTypes,
        /// The underlying failure.
        reason: String,
    },
    /// The peer answered with an error of its own (its Raft stopped, or it refused our input).
    #[error("peer refused {rpc}: {reason}")]
    Remote {
        /// The RPC kind.
        rpc: RPCTypes,
        /// The peer's explanation.
        reason: String,
    },
    /// The peer's reply did not decode.
    #[error("reply to {rpc} does not decode: {source}")]
    Decode {
        /// The RPC kind.
        rpc: RPCTypes,
        /// The decode failure.
        source: DecodeError,
    },
    /// A value of ours could not be encoded.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// A single log entry encodes to more than the peer accepts: it can never be sent until
    /// `max_message_size` is raised on every node.
    #[error("a log entry of {size} bytes exceeds max_message_size ({max} bytes); raise it on every node")]
    TooLarge {
        /// The encoded size of the request holding the entry.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// Reading the local snapshot failed.
    #[error("reading the snapshot to send failed: {0}")]
    SnapshotRead(#[source] io::Error),
}

impl TransportError {
    /// Maps a transport failure into openraft's error kinds. This and
    /// [`TransportError::into_streaming`] are the only places that decide it:
    /// - `Connect`: `Unreachable` (openraft backs off);
    /// - `TooLarge`: `Unreachable` too: the same entry would fail again at once;
    /// - `Remote`: `Unreachable` too: `RPCError<C>` has no constructible remote variant, and a
    ///   peer whose Raft refuses or stopped deserves the same long backoff;
    /// - `Timeout`: `Timeout`;
    /// - everything else: `Network` (retried soon).
    pub(crate) fn into_rpc<C: RaftWireConfig>(self, local: u64, target: u64) -> RPCError<C> {
        match self {
            TransportError::Connect { .. }
            | TransportError::Remote { .. }
            | TransportError::TooLarge { .. } => RPCError::Unreachable(Unreachable::new(&self)),
            TransportError::Timeout { rpc, after } => RPCError::Timeout(Timeout {
                action: rpc,
                id: local,
                target,
                timeout: after,
            }),
            _ => RPCError::Network(NetworkError::new(&self)),
        }
    }

    /// The same mapping for snapshot transfers.
    pub(crate) fn into_streaming<C: RaftWireConfig>(self, local: u64, target: u64) -> StreamingError<C> {
        match self.into_rpc::<C>(local, target) {
            RPCError::Unreachable(e) => StreamingError::Unreachable(e),
            RPCError::Timeout(e) => StreamingError::Timeout(e),
            RPCError::Network(e) => StreamingError::Network(e),
            RPCError::RemoteError(e) => match e.source {},
        }
    }
}

/// Why a [`Server`](crate::Server) could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// Binding the listening socket failed.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The requested address.
        addr: String,
        /// The OS error.
        source: io::Error,
    },
    /// The serving loop failed.
    #[error("server failed: {0}")]
    Serve(String),
    /// The configuration cannot serve this `Raft` (its certificate is another node's).
    #[error("server config refused: {0}")]
    Config(#[from] ConfigError),
}

/// An error and its sources, joined with ": ", for messages that must say what went wrong
/// underneath (a TLS alert inside a transport error).
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        // Many errors already print their source; say each cause once.
        let cause = c.to_string();
        if !s.contains(&cause) {
            s.push_str(": ");
            s.push_str(&cause);
        }
        cur = c.source();
    }
    s
}

/// Why a TLS handshake was refused, if `e` or one of its causes says so: a rustls error (also
/// inside an `io::Error`), or a QUIC connection closed over a TLS alert or raftwire's
/// refusal. Seen from the client, which is the only side that dials. `None` for every other
/// failure.
pub(crate) fn handshake_refusal(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if let Some(r) = c.downcast_ref::<rustls::Error>() {
            return Some(rustls_refusal(r));
        }
        #[cfg(feature = "quic")]
        if let Some(r) = c.downcast_ref::<quinn::ConnectionError>()
            && let Some(reason) = crate::quic::refusal(r)
        {
            return Some(reason);
        }
        // `io::Error::source` skips the error it wraps: look at that one too.
        cur = match c.downcast_ref::<io::Error>().and_then(|io| io.get_ref()) {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => c.source(),
        };
    }
    None
}

/// Whether a TLS alert says the peer refused a certificate (as opposed to the handshake in
/// general).
pub(crate) fn is_certificate_alert(alert: rustls::AlertDescription) -> bool {
    use rustls::AlertDescription as A;
    matches!(
        alert,
        A::BadCertificate
            | A::UnsupportedCertificate
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::CertificateUnknown
            | A::UnknownCA
            | A::AccessDenied
            | A::DecryptError
            | A::CertificateRequired
            | A::BadCertificateStatusResponse
    )
}

/// A client's reading of a TLS alert the server sent.
pub(crate) fn alert_refusal(alert: rustls::AlertDescription) -> String {
    if is_certificate_alert(alert) {
        format!("the server refused our certificate: {alert:?}")
    } else if alert == rustls::AlertDescription::NoApplicationProtocol {
        "the server speaks none of the protocols we asked for (TLS alert NoApplicationProtocol): \
         its transport or compression setting differs from ours, and every node of a cluster \
         needs the same"
            .to_string()
    } else {
        format!("the server refused the TLS handshake: {alert:?}")
    }
}

fn rustls_refusal(e: &rustls::Error) -> String {
    match e {
        rustls::Error::AlertReceived(alert) => alert_refusal(*alert),
        rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented => {
            format!("we refused the server's certificate: {e}")
        }
        _ => format!("TLS handshake failed: {e}"),
    }
}
