//! Mutual TLS with node identity, shared by both transports.
//!
//! # Node identity
//!
//! Every node certificate carries the DNS subject alternative name `node-<id>.raftwire`
//! (see [`node_dns_name`]), signed by the cluster CA. A client verifies the server's chain
//! against the CA *and* that the certificate names the node it meant to reach; a server
//! demands a client certificate from the same CA and learns the caller's node id from it.

use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rustls::DigitallySignedStruct;
use rustls::DistinguishedName;
use rustls::RootCertStore;
use rustls::SignatureScheme;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::client::danger::ServerCertVerified;
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::ServerName;
use rustls::pki_types::UnixTime;
use rustls::pki_types::pem::PemObject;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerified;
use rustls::server::danger::ClientCertVerifier;
use rustls::sign::CertifiedKey;

/// The DNS name a node certificate carries to prove it belongs to node `id`.
pub fn node_dns_name(id: u64) -> String {
    format!("node-{id}.raftwire")
}

/// The names in a certificate that could make it speak for a node: its `node-<id>.raftwire`
/// DNS SANs and any wildcard DNS SAN (which a name check would let stand for every node).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct NodeNames {
    /// The node ids of the `node-<id>.raftwire` names, in certificate order.
    pub(crate) ids: Vec<u64>,
    /// Every wildcard DNS name.
    pub(crate) wildcards: Vec<String>,
}

impl NodeNames {
    /// The one node this certificate names, if it names exactly one and no wildcard.
    pub(crate) fn exact(&self) -> Option<u64> {
        match (&self.ids[..], self.wildcards.is_empty()) {
            ([id], true) => Some(*id),
            _ => None,
        }
    }
}

impl fmt::Display for NodeNames {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node ids {:?}", self.ids)?;
        if !self.wildcards.is_empty() {
            write!(f, " and wildcard names {:?}", self.wildcards)?;
        }
        Ok(())
    }
}

/// The node names a certificate carries (nothing when it does not parse).
pub(crate) fn node_names(cert: &CertificateDer<'_>) -> NodeNames {
    let mut names = NodeNames::default();
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return names;
    };
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return names;
    };
    for name in &san.value.general_names {
        if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
            if dns.contains('*') {
                names.wildcards.push(dns.to_string());
            } else if let Some(id) = parse_node_dns_name(dns) {
                names.ids.push(id);
            }
        }
    }
    names
}

/// The id in `node-<id>.raftwire`, compared as a name check would (case-insensitively).
/// Only the canonical spelling of the id counts: `node-01` is no name of node 1.
pub(crate) fn parse_node_dns_name(dns: &str) -> Option<u64> {
    let dns = dns.to_ascii_lowercase();
    let digits = dns.strip_prefix("node-")?.strip_suffix(".raftwire")?;
    let id: u64 = digits.parse().ok()?;
    (id.to_string() == digits).then_some(id)
}

/// Why TLS material could not be loaded or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// PEM input holds nothing usable of the expected kind.
    #[error("{what}: {reason}")]
    Pem {
        /// Which input (CA bundle, certificate, key).
        what: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// The node certificate names no node id, or more than one.
    #[error(
        "the node certificate must name exactly one node id as DNS SAN `node-<id>.raftwire`, found {0:?}"
    )]
    NodeId(Vec<u64>),
    /// The node certificate carries a wildcard DNS name, which would stand for any node.
    #[error("the node certificate must not carry wildcard DNS names, found {0:?}")]
    Wildcard(Vec<String>),
    /// The private key does not belong to the certificate.
    #[error("the private key does not match the node certificate: {0}")]
    KeyMismatch(String),
    /// rustls refused the configuration.
    #[error("TLS configuration refused: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The cluster CA bundle and this node's identity (certificate chain and key), for mutual TLS
/// on every transport.
///
/// Loading checks everything it can up front: the key must match the certificate, which must
/// name exactly one node id. rustls uses the crypto provider given to
/// [`TlsConfig::with_crypto_provider`] (default: aws-lc-rs); no process-wide provider is
/// installed. `Debug` never prints the key.
#[derive(Clone)]
pub struct TlsConfig {
    inner: Arc<Inner>,
}

struct Inner {
    ca: Vec<CertificateDer<'static>>,
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    node_id: u64,
    provider: Arc<CryptoProvider>,
    allowed_peers: Option<BTreeSet<u64>>,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("node_id", &self.inner.node_id)
            .field("ca_certificates", &self.inner.ca.len())
            .field("chain_certificates", &self.inner.chain.len())
            .field("key", &"<redacted>")
            .field("allowed_peers", &self.inner.allowed_peers)
            .finish()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

impl TlsConfig {
    /// Loads the CA bundle, this node's certificate chain and its private key from PEM files.
    pub fn from_pem_files(
        ca: impl AsRef<Path>,
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<Self, TlsError> {
        Self::from_pem(&read(ca.as_ref())?, &read(cert.as_ref())?, &read(key.as_ref())?)
    }

    /// Loads the CA bundle, this node's certificate chain and its private key from PEM text.
    pub fn from_pem(ca_pem: &[u8], cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, TlsError> {
        let certs = |what: &'static str, pem: &[u8]| -> Result<Vec<CertificateDer<'static>>, TlsError> {
            let certs = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| TlsError::Pem {
                    what,
                    reason: e.to_string(),
                })?;
            if certs.is_empty() {
                return Err(TlsError::Pem {
                    what,
                    reason: "no certificate found".into(),
                });
            }
            Ok(certs)
        };
        let ca = certs("CA bundle", ca_pem)?;
        let chain = certs("node certificate", cert_pem)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::Pem {
            what: "node private key",
            reason: e.to_string(),
        })?;
        Self::new(
            ca,
            chain,
            key,
            Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
        )
    }

    fn new(
        ca: Vec<CertificateDer<'static>>,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        for cert in &ca {
            roots.add(cert.clone()).map_err(|e| TlsError::Pem {
                what: "CA bundle",
                reason: e.to_string(),
            })?;
        }
        let names = node_names(&chain[0]);
        if !names.wildcards.is_empty() {
            return Err(TlsError::Wildcard(names.wildcards));
        }
        let Some(node_id) = names.exact() else {
            return Err(TlsError::NodeId(names.ids));
        };
        let signing_key = provider
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| TlsError::KeyMismatch(format!("unusable key: {e}")))?;
        CertifiedKey::new(chain.clone(), signing_key)
            .keys_match()
            .map_err(|e| TlsError::KeyMismatch(e.to_string()))?;
        let inner = Inner {
            ca,
            roots: Arc::new(roots),
            chain,
            key,
            node_id,
            provider,
            allowed_peers: None,
        };
        Ok(TlsConfig {
            inner: Arc::new(inner),
        })
    }

    /// Uses `provider` for every handshake and record (the default is aws-lc-rs).
    pub fn with_crypto_provider(self, provider: Arc<CryptoProvider>) -> Result<Self, TlsError> {
        let i = &self.inner;
        let next = Self::new(i.ca.clone(), i.chain.clone(), i.key.clone_key(), provider)?;
        Ok(match &i.allowed_peers {
            Some(allowed) => next.allow_peers(allowed.iter().copied()),
            None => next,
        })
    }

    /// Accepts connections only from these node ids (default: any node the CA certified).
    pub fn allow_peers(self, ids: impl IntoIterator<Item = u64>) -> Self {
        let i = &self.inner;
        let inner = Inner {
            ca: i.ca.clone(),
            roots: i.roots.clone(),
            chain: i.chain.clone(),
            key: i.key.clone_key(),
            node_id: i.node_id,
            provider: i.provider.clone(),
            allowed_peers: Some(ids.into_iter().collect()),
        };
        TlsConfig {
            inner: Arc::new(inner),
        }
    }

    /// The node id this identity's certificate names.
    pub fn node_id(&self) -> u64 {
        self.inner.node_id
    }

    /// A 32-byte secret for `label`, derived from this node's private key: stable across
    /// restarts of the same identity, unguessable without the key.
    #[cfg(feature = "quic")]
    pub(crate) fn derive_secret(&self, label: &[u8]) -> [u8; 32] {
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, self.inner.key.secret_der());
        let tag = aws_lc_rs::hmac::sign(&key, label);
        let mut out = [0u8; 32];
        out.copy_from_slice(&tag.as_ref()[..32]);
        out
    }

    /// A server config demanding a client certificate from the cluster CA (and, if set, one of
    /// the allowed node ids).
    pub(crate) fn server_config(&self, alpn: &[u8]) -> Result<rustls::ServerConfig, TlsError> {
        let i = &self.inner;
        let inner = WebPkiClientVerifier::builder_with_provider(i.roots.clone(), i.provider.clone())
            .build()
            .map_err(|e| TlsError::Pem {
                what: "CA bundle",
                reason: e.to_string(),
            })?;
        let verifier = NodeClientVerifier {
            inner,
            allowed: i.allowed_peers.clone(),
        };
        let mut config = rustls::ServerConfig::builder_with_provider(i.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(verifier))
            .with_single_cert(i.chain.clone(), i.key.clone_key())?;
        config.alpn_protocols = vec![alpn.to_vec()];
        Ok(config)
    }

    /// A client config presenting this node's identity and accepting only a server whose
    /// certificate names node `expected`.
    pub(crate) fn client_config(&self, expected: u64, alpn: &[u8]) -> Result<rustls::ClientConfig, TlsError> {
        let i = &self.inner;
        let inner = WebPkiServerVerifier::builder_with_provider(i.roots.clone(), i.provider.clone())
            .build()
            .map_err(|e| TlsError::Pem {
                what: "CA bundle",
                reason: e.to_string(),
            })?;
        let verifier = NodeServerVerifier { inner, expected };
        let mut config = rustls::ClientConfig::builder_with_provider(i.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(i.chain.clone(), i.key.clone_key())?;
        config.alpn_protocols = vec![alpn.to_vec()];
        Ok(config)
    }
}

/// The server name a client uses to reach node `id`.
pub(crate) fn server_name(id: u64) -> ServerName<'static> {
    // `node-<u64>.raftwire` is always a valid DNS name.
    ServerName::try_from(node_dns_name(id)).expect("node DNS names are valid")
}

/// Why a peer's certificate was refused on identity grounds.
#[derive(thiserror::Error)]
enum IdentityError {
    #[error("server identity mismatch: expected node {expected}, the certificate presents {presented}")]
    WrongServer { expected: u64, presented: NodeNames },
    #[error(
        "the certificate must name exactly one node (DNS SAN node-<id>.raftwire) and no wildcard; it presents {0}"
    )]
    NotExact(NodeNames),
    #[error("node {id} is not among the peers this server accepts ({allowed:?})")]
    NotAllowed { id: u64, allowed: BTreeSet<u64> },
}

/// rustls shows certificate errors with `Debug`: make that the readable message.
impl fmt::Debug for IdentityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

fn identity_error(e: IdentityError) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(Arc::new(e))))
}

/// The reason a server gives a client it refuses, whatever the detail.
#[derive(thiserror::Error)]
#[error("certificate refused")]
struct Refused;

/// rustls shows certificate errors with `Debug`.
impl fmt::Debug for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// What a server tells a client it refuses: the class of the failure (which picks the TLS
/// alert), never its details. rustls sends only the alert over TLS, but QUIC puts the error's
/// text in the CONNECTION_CLOSE frame, and the details (the server's clock against the
/// validity window, the allow-list) are nothing an unauthenticated peer should learn. The
/// details are logged on the server instead.
fn redacted(e: &rustls::Error) -> rustls::Error {
    use rustls::CertificateError as E;
    let rustls::Error::InvalidCertificate(cert) = e else {
        return rustls::Error::General(Refused.to_string());
    };
    let class = match cert {
        E::Expired | E::ExpiredContext { .. } => E::Expired,
        E::NotValidYet | E::NotValidYetContext { .. } => E::NotValidYet,
        E::ExpiredRevocationList | E::ExpiredRevocationListContext { .. } => E::ExpiredRevocationList,
        E::NotValidForName | E::NotValidForNameContext { .. } => E::NotValidForName,
        E::InvalidPurpose | E::InvalidPurposeContext { .. } => E::InvalidPurpose,
        E::UnsupportedSignatureAlgorithmContext { .. }
        | E::UnsupportedSignatureAlgorithmForPublicKeyContext { .. } => E::BadSignature,
        E::BadEncoding => E::BadEncoding,
        E::Revoked => E::Revoked,
        E::UnhandledCriticalExtension => E::UnhandledCriticalExtension,
        E::UnknownIssuer => E::UnknownIssuer,
        E::UnknownRevocationStatus => E::UnknownRevocationStatus,
        E::BadSignature => E::BadSignature,
        E::InvalidOcspResponse => E::InvalidOcspResponse,
        E::ApplicationVerificationFailure => E::ApplicationVerificationFailure,
        _ => E::Other(rustls::OtherError(Arc::new(Refused))),
    };
    rustls::Error::InvalidCertificate(class)
}

#[derive(Debug)]
struct NodeServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    expected: u64,
}

impl ServerCertVerifier for NodeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // Chain, validity period and usage are webpki's checks; the name it checks is the
        // expected node's identity, whatever address we dialled.
        let name = server_name(self.expected);
        let verified = self
            .inner
            .verify_server_cert(end_entity, intermediates, &name, ocsp_response, now);
        let wrong_name = matches!(
            verified,
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                    | rustls::CertificateError::NotValidForNameContext { .. }
            ))
        );
        if let (false, Err(e)) = (wrong_name, &verified) {
            // Chain and validity failures say more than the names do.
            return Err(e.clone());
        }
        // The name check passes for a certificate that also names other nodes, or names
        // them all with a wildcard: neither identifies one node.
        let names = node_names(end_entity);
        match names.exact() {
            Some(id) if id == self.expected && !wrong_name => verified,
            None => Err(identity_error(IdentityError::NotExact(names))),
            Some(_) => Err(identity_error(IdentityError::WrongServer {
                expected: self.expected,
                presented: names,
            })),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[derive(Debug)]
struct NodeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    allowed: Option<BTreeSet<u64>>,
}

impl ClientCertVerifier for NodeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Details are logged here; the client learns only the class (see `redacted`).
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(|e| {
                tracing::warn!("refusing a client certificate: {e}");
                redacted(&e)
            })?;
        let refuse = |e: IdentityError| {
            tracing::warn!("refusing a client: {e}");
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        };
        let names = node_names(end_entity);
        let Some(id) = names.exact() else {
            return refuse(IdentityError::NotExact(names));
        };
        if let Some(allowed) = &self.allowed
            && !allowed.contains(&id)
        {
            return refuse(IdentityError::NotAllowed {
                id,
                allowed: allowed.clone(),
            });
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A node may speak only for itself: the candidate of a vote, the leader of an append or a
/// snapshot must be the node whose certificate the connection presented. `caller` is `None`
/// on a plaintext connection, where nothing can be checked.
pub(crate) fn speaks_for(caller: Option<u64>, claimed: u64) -> Result<(), String> {
    match caller {
        Some(id) if id != claimed => Err(format!(
            "the connection belongs to node {id}, the request speaks for node {claimed}"
        )),
        _ => Ok(()),
    }
}

/// The authenticated node id of a TLS peer, from its (already verified) certificate chain.
/// `None` unless the certificate names exactly one node (the verifier refuses any other).
pub(crate) fn peer_node_id(certs: Option<&[CertificateDer<'_>]>) -> Option<u64> {
    certs.and_then(|c| c.first()).and_then(|c| node_names(c).exact())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_canonical_node_name_counts() {
        assert_eq!(parse_node_dns_name("node-7.raftwire"), Some(7));
        assert_eq!(parse_node_dns_name("NODE-7.Raftwire"), Some(7));
        for other in [
            "node-07.raftwire",
            "node-+7.raftwire",
            "node-.raftwire",
            "node-7.raftwire.x",
            "*.raftwire",
        ] {
            assert_eq!(parse_node_dns_name(other), None, "{other}");
        }
        let names = |ids: Vec<u64>, wildcards: Vec<&str>| NodeNames {
            ids,
            wildcards: wildcards.into_iter().map(String::from).collect(),
        };
        assert_eq!(names(vec![3], vec![]).exact(), Some(3));
        assert_eq!(names(vec![], vec![]).exact(), None);
        assert_eq!(names(vec![3, 4], vec![]).exact(), None);
        assert_eq!(names(vec![3], vec!["*.raftwire"]).exact(), None);
    }

    #[test]
    fn refused_clients_learn_the_class_not_the_details() {
        use rustls::CertificateError as E;
        let time = UnixTime::since_unix_epoch(std::time::Duration::from_secs(1_700_000_000));
        let not_after = UnixTime::since_unix_epoch(std::time::Duration::from_secs(1_600_000_000));
        let expired = rustls::Error::InvalidCertificate(E::ExpiredContext { time, not_after });
        assert!(expired.to_string().contains("1700000000"), "{expired}");
        let told = redacted(&expired);
        assert_eq!(told, rustls::Error::InvalidCertificate(E::Expired));
        let other = identity_error(IdentityError::NotAllowed {
            id: 3,
            allowed: BTreeSet::from([4242]),
        });
        let told = redacted(&other).to_string();
        assert!(
            !told.contains("4242") && told.contains("certificate refused"),
            "{told}"
        );
    }

    /// Found by the `certificates` fuzz target: `node-0000000000000000000000.raftwire` was taken
    /// for node 0, as were `node-+1.raftwire` for node 1 and the like.
    #[test]
    fn only_canonical_node_names_carry_an_id() {
        assert_eq!(parse_node_dns_name("node-1.raftwire"), Some(1));
        assert_eq!(parse_node_dns_name("node-0.raftwire"), Some(0));
        assert_eq!(parse_node_dns_name(&node_dns_name(u64::MAX)), Some(u64::MAX));
        for name in [
            "node-0000000000000000000000.raftwire",
            "node-01.raftwire",
            "node-+1.raftwire",
            "node-.raftwire",
            "node-1.raftwire.",
            "node-18446744073709551616.raftwire",
        ] {
            assert_eq!(parse_node_dns_name(name), None, "{name}");
        }
    }
}
