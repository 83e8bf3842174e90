//! Mutual TLS with node and client identities, shared by both transports.
//!
//! # Node identity
//!
//! Every node certificate carries the DNS subject alternative name `node-<id>.raftwire`
//! (see [`node_dns_name`]), signed by the cluster CA. A client verifies the server's chain
//! against the CA *and* that the certificate names the node it meant to reach; a server
//! demands a client certificate from the same CA and learns the caller's node id from it.
//!
//! # Client identity
//!
//! An operator tool (`raftwire ctl`) holds a client certificate instead: the single DNS SAN
//! `client-<name>.raftwire` (see [`client_dns_name`]) and no node name, loaded as a
//! [`ClientTls`]. The roles never mix: the Raft listener ([`TlsConfig::server_config`])
//! refuses client certificates, the client API listener ([`TlsConfig::api_server_config`])
//! refuses node certificates, and a certificate naming both a node and a client is neither.

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

/// The DNS name a client certificate carries to prove it belongs to the client `name`
/// (an operator tool such as `raftwire ctl`): `client-<name>.raftwire`.
///
/// This only formats; [`validate_client_name`] says whether `name` is a client name at all
/// (issuing and loading a client identity check it).
pub fn client_dns_name(name: &str) -> String {
    format!("client-{name}.raftwire")
}

/// The longest client name: a DNS label holds at most 63 characters.
const MAX_CLIENT_NAME: usize = 63;

/// Checks that `name` can name a client: 1 to 63 characters of `a-z`, `0-9` and `-`, neither
/// starting nor ending with `-`. (Lower case only, so that a name and its certificate's DNS
/// SAN, which name checks compare case-insensitively, are spelled one way.)
pub fn validate_client_name(name: &str) -> Result<(), TlsError> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > MAX_CLIENT_NAME {
        Some("it is longer than 63 characters")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        Some("only lower-case letters a-z, digits and `-` are allowed")
    } else if name.starts_with('-') || name.ends_with('-') {
        Some("it must not start or end with `-`")
    } else {
        None
    };
    match reason {
        None => Ok(()),
        Some(reason) => Err(TlsError::ClientName {
            name: name.chars().take(80).collect(),
            reason,
        }),
    }
}

/// The client name in `client-<name>.raftwire`, compared as a name check would
/// (case-insensitively); `None` unless the name is a valid client name.
pub(crate) fn parse_client_dns_name(dns: &str) -> Option<String> {
    let dns = dns.to_ascii_lowercase();
    let name = dns.strip_prefix("client-")?.strip_suffix(".raftwire")?;
    validate_client_name(name).ok().map(|()| name.to_string())
}

/// The names in a certificate that could make it speak for a node or a client: its
/// `node-<id>.raftwire` and `client-<name>.raftwire` DNS SANs and any wildcard DNS SAN (which a
/// name check would let stand for every node).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct NodeNames {
    /// The node ids of the `node-<id>.raftwire` names, in certificate order.
    pub(crate) ids: Vec<u64>,
    /// The client names of the `client-<name>.raftwire` names, in certificate order.
    pub(crate) clients: Vec<String>,
    /// Every wildcard DNS name.
    pub(crate) wildcards: Vec<String>,
}

impl NodeNames {
    /// The one node this certificate names, if it names exactly one, no client and no
    /// wildcard.
    pub(crate) fn exact(&self) -> Option<u64> {
        match (&self.ids[..], self.clients.is_empty(), self.wildcards.is_empty()) {
            ([id], true, true) => Some(*id),
            _ => None,
        }
    }

    /// The one client this certificate names, if it names exactly one, no node and no
    /// wildcard.
    pub(crate) fn client(&self) -> Option<&str> {
        match (&self.clients[..], self.ids.is_empty(), self.wildcards.is_empty()) {
            ([name], true, true) => Some(name),
            _ => None,
        }
    }
}

impl fmt::Display for NodeNames {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node ids {:?}", self.ids)?;
        if !self.clients.is_empty() {
            write!(f, " and client names {:?}", self.clients)?;
        }
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
            } else if let Some(client) = parse_client_dns_name(dns) {
                names.clients.push(client);
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
    /// The node certificate names no node id, or more than one (see also
    /// [`TlsError::ClientNotNode`]).
    #[error(
        "the node certificate must name exactly one node id as DNS SAN `node-<id>.raftwire`, found {0:?}"
    )]
    NodeId(Vec<u64>),
    /// The certificate carries a wildcard DNS name, which would stand for any node.
    #[error("the certificate must not carry wildcard DNS names, found {0:?}")]
    Wildcard(Vec<String>),
    /// A client certificate was given where a node identity was expected.
    #[error(
        "the certificate names client {0:?} (DNS SAN client-<name>.raftwire): a client certificate \
         may call only the client API and is no node identity"
    )]
    ClientNotNode(Vec<String>),
    /// A node certificate was given where a client identity was expected.
    #[error(
        "the certificate names node ids {0:?} (DNS SAN node-<id>.raftwire): a node certificate is \
         no client identity; issue one with `raftwire certs add-client`"
    )]
    NodeNotClient(Vec<u64>),
    /// The client certificate names no client, or more than one.
    #[error(
        "the client certificate must name exactly one client as DNS SAN `client-<name>.raftwire`, found {0:?}"
    )]
    ClientId(Vec<String>),
    /// A client name is not 1-63 characters of `a-z`, `0-9` and `-` (not first nor last).
    #[error(
        "invalid client name {name:?}: {reason} (a client name is 1-63 characters of a-z, 0-9 and `-`, not starting or ending with `-`)"
    )]
    ClientName {
        /// The name (at most its first 80 characters).
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The private key does not belong to the certificate.
    #[error("the private key does not match the certificate: {0}")]
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

fn default_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

type Pems = (
    Vec<CertificateDer<'static>>,
    Vec<CertificateDer<'static>>,
    PrivateKeyDer<'static>,
);

/// Which inputs an identity's PEM text makes, for errors: (certificate, key).
const NODE_PEMS: (&str, &str) = ("node certificate", "node private key");
const CLIENT_PEMS: (&str, &str) = ("client certificate", "client private key");

/// The CA bundle, the certificate chain and the private key of an identity, from PEM text;
/// `what` names the certificate and key in errors.
fn parse_pem(
    what: (&'static str, &'static str),
    ca_pem: &[u8],
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<Pems, TlsError> {
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
    let (cert_what, key_what) = what;
    let ca = certs("CA bundle", ca_pem)?;
    let chain = certs(cert_what, cert_pem)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::Pem {
        what: key_what,
        reason: e.to_string(),
    })?;
    Ok((ca, chain, key))
}

fn root_store(ca: &[CertificateDer<'static>]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in ca {
        roots.add(cert.clone()).map_err(|e| TlsError::Pem {
            what: "CA bundle",
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// The key must be usable by `provider` and belong to the chain's first certificate.
fn check_key(
    chain: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
    provider: &CryptoProvider,
) -> Result<(), TlsError> {
    let signing_key = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| TlsError::KeyMismatch(format!("unusable key: {e}")))?;
    CertifiedKey::new(chain.to_vec(), signing_key)
        .keys_match()
        .map_err(|e| TlsError::KeyMismatch(e.to_string()))
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
        let (ca, chain, key) = parse_pem(NODE_PEMS, ca_pem, cert_pem, key_pem)?;
        Self::new(ca, chain, key, default_provider())
    }

    fn new(
        ca: Vec<CertificateDer<'static>>,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, TlsError> {
        let roots = root_store(&ca)?;
        let names = node_names(&chain[0]);
        if !names.wildcards.is_empty() {
            return Err(TlsError::Wildcard(names.wildcards));
        }
        if !names.clients.is_empty() {
            return Err(TlsError::ClientNotNode(names.clients));
        }
        let Some(node_id) = names.exact() else {
            return Err(TlsError::NodeId(names.ids));
        };
        check_key(&chain, &key, &provider)?;
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
    ///
    /// Client certificates (`client-<name>.raftwire`) are refused here: they may not speak
    /// Raft.
    pub(crate) fn server_config(&self, alpn: &[u8]) -> Result<rustls::ServerConfig, TlsError> {
        self.server_config_for(&[alpn])
    }

    /// Like [`TlsConfig::server_config`], offering every protocol of `alpns` (transports
    /// sharing one TCP port are told apart by the protocol the client asks for).
    pub(crate) fn server_config_for(&self, alpns: &[&[u8]]) -> Result<rustls::ServerConfig, TlsError> {
        let i = &self.inner;
        let verifier = NodeClientVerifier {
            inner: client_verifier(&i.roots, &i.provider)?,
            allowed: i.allowed_peers.clone(),
        };
        let mut config = self.server_config_with(Arc::new(verifier), alpns[0])?;
        config.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
        Ok(config)
    }

    /// A server config for the client API listener: this node's certificate, TLS 1.3, and a
    /// client certificate demanded from the cluster CA that names exactly one client
    /// (`client-<name>.raftwire`) and no node. Node certificates, certificates from another
    /// CA and connections without a certificate are refused; the reason is logged at WARN
    /// (`refusing a client certificate: ...`), the client learns only its class.
    /// [`peer_client_name`] names the caller of an accepted connection.
    // Used by `raftwire node` and `raftwire ctl` (the application side).
    #[cfg_attr(not(all(feature = "app", feature = "grpc")), allow(dead_code))]
    pub(crate) fn api_server_config(&self, alpn: &[u8]) -> Result<rustls::ServerConfig, TlsError> {
        let i = &self.inner;
        let verifier = ApiClientVerifier {
            inner: client_verifier(&i.roots, &i.provider)?,
        };
        self.server_config_with(Arc::new(verifier), alpn)
    }

    fn server_config_with(
        &self,
        verifier: Arc<dyn ClientCertVerifier>,
        alpn: &[u8],
    ) -> Result<rustls::ServerConfig, TlsError> {
        let i = &self.inner;
        let mut config = rustls::ServerConfig::builder_with_provider(i.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(i.chain.clone(), i.key.clone_key())?;
        config.alpn_protocols = vec![alpn.to_vec()];
        Ok(config)
    }

    /// A client config presenting this node's identity and accepting only a server whose
    /// certificate names node `expected`.
    pub(crate) fn client_config(&self, expected: u64, alpn: &[u8]) -> Result<rustls::ClientConfig, TlsError> {
        let i = &self.inner;
        let verifier = NodeServerVerifier {
            inner: server_verifier(&i.roots, &i.provider)?,
            expected,
        };
        let mut config = rustls::ClientConfig::builder_with_provider(i.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(i.chain.clone(), i.key.clone_key())?;
        config.alpn_protocols = vec![alpn.to_vec()];
        Ok(config)
    }
}

/// webpki's check of a client certificate's chain, validity and usage against the CA.
fn client_verifier(
    roots: &Arc<RootCertStore>,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| TlsError::Pem {
            what: "CA bundle",
            reason: e.to_string(),
        })
}

/// webpki's check of a server certificate's chain, validity, usage and name against the CA.
fn server_verifier(
    roots: &Arc<RootCertStore>,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<WebPkiServerVerifier>, TlsError> {
    WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| TlsError::Pem {
            what: "CA bundle",
            reason: e.to_string(),
        })
}

/// The identity of an operator tool (such as `raftwire ctl`) towards the nodes' client API:
/// the cluster CA bundle and a client certificate naming exactly one client as its DNS SAN
/// `client-<name>.raftwire` (see [`client_dns_name`]), with its key.
///
/// A client identity is no node identity: node certificates are refused here, and the nodes'
/// Raft listeners refuse client certificates. Loading checks the key against the certificate.
/// rustls uses the crypto provider given to [`ClientTls::with_crypto_provider`] (default:
/// aws-lc-rs). `Debug` never prints the key.
#[derive(Clone)]
pub struct ClientTls {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    ca: Vec<CertificateDer<'static>>,
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    name: String,
    provider: Arc<CryptoProvider>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("name", &self.inner.name)
            .field("ca_certificates", &self.inner.ca.len())
            .field("chain_certificates", &self.inner.chain.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

impl ClientTls {
    /// Loads the CA bundle, the client's certificate chain and its private key from PEM
    /// files (as written by `raftwire certs add-client`: `ca.pem`, `client-<name>.pem`,
    /// `client-<name>.key`).
    pub fn from_pem_files(
        ca: impl AsRef<Path>,
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<Self, TlsError> {
        Self::from_pem(&read(ca.as_ref())?, &read(cert.as_ref())?, &read(key.as_ref())?)
    }

    /// Loads the CA bundle, the client's certificate chain and its private key from PEM text.
    /// The certificate must name exactly one client and no node or wildcard.
    pub fn from_pem(ca_pem: &[u8], cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, TlsError> {
        let (ca, chain, key) = parse_pem(CLIENT_PEMS, ca_pem, cert_pem, key_pem)?;
        Self::new(ca, chain, key, default_provider())
    }

    fn new(
        ca: Vec<CertificateDer<'static>>,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, TlsError> {
        let roots = root_store(&ca)?;
        let names = node_names(&chain[0]);
        if !names.wildcards.is_empty() {
            return Err(TlsError::Wildcard(names.wildcards));
        }
        if !names.ids.is_empty() {
            return Err(TlsError::NodeNotClient(names.ids));
        }
        let Some(name) = names.client().map(str::to_string) else {
            return Err(TlsError::ClientId(names.clients));
        };
        check_key(&chain, &key, &provider)?;
        let inner = ClientInner {
            ca,
            roots: Arc::new(roots),
            chain,
            key,
            name,
            provider,
        };
        Ok(ClientTls {
            inner: Arc::new(inner),
        })
    }

    /// Uses `provider` for every handshake and record (the default is aws-lc-rs).
    pub fn with_crypto_provider(self, provider: Arc<CryptoProvider>) -> Result<Self, TlsError> {
        let i = &self.inner;
        Self::new(i.ca.clone(), i.chain.clone(), i.key.clone_key(), provider)
    }

    /// The client name the certificate carries (`ops` for `client-ops.raftwire`).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// A client config presenting this client's certificate (TLS 1.3) and accepting a server
    /// whose certificate chains to the CA and names exactly one node, whichever: the client
    /// API may be reached at any node, and the name dialled plays no part.
    // Used by `raftwire node` and `raftwire ctl` (the application side).
    #[cfg_attr(not(all(feature = "app", feature = "grpc")), allow(dead_code))]
    pub(crate) fn client_config(&self, alpn: &[u8]) -> Result<rustls::ClientConfig, TlsError> {
        let i = &self.inner;
        let verifier = AnyNodeServerVerifier {
            inner: server_verifier(&i.roots, &i.provider)?,
        };
        let mut config = rustls::ClientConfig::builder_with_provider(i.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(i.chain.clone(), i.key.clone_key())?;
        config.alpn_protocols = vec![alpn.to_vec()];
        Ok(config)
    }

    /// The server name (SNI) a client sends to the client API: a fixed name, since the
    /// verifier ignores it and a node serves one certificate.
    // Used by `raftwire node` and `raftwire ctl` (the application side).
    #[cfg_attr(not(all(feature = "app", feature = "grpc")), allow(dead_code))]
    pub(crate) fn server_name() -> ServerName<'static> {
        // A constant that is a valid DNS name (checked by a test).
        ServerName::try_from(API_SERVER_NAME).expect("the client API server name is a valid DNS name")
    }
}

/// The SNI of connections to the client API.
const API_SERVER_NAME: &str = "api.raftwire";

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
        "the certificate must name exactly one node (DNS SAN node-<id>.raftwire) and no client or wildcard name; it presents {0}"
    )]
    NotExact(NodeNames),
    #[error("node {id} is not among the peers this server accepts ({allowed:?})")]
    NotAllowed { id: u64, allowed: BTreeSet<u64> },
    #[error("a client certificate ({0}) may not speak Raft: only node certificates may")]
    ClientSpeaksRaft(String),
    #[error(
        "a node certificate ({0}) may not call the client API: only client certificates (client-<name>.raftwire) may"
    )]
    NodeCallsApi(String),
    #[error(
        "the certificate must name exactly one client (DNS SAN client-<name>.raftwire) and no node or wildcard name; it presents {0}"
    )]
    NotExactClient(NodeNames),
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
        if let Some(client) = names.client() {
            return refuse(IdentityError::ClientSpeaksRaft(client_dns_name(client)));
        }
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

/// A client API client's check of the server: the chain to the CA, validity and usage, and a
/// certificate that names exactly one node, whichever node that is.
#[derive(Debug)]
struct AnyNodeServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for AnyNodeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let names = node_names(end_entity);
        // webpki checks the chain, validity period, usage and the name of the node the
        // certificate claims (any node name will do when it claims none: the identity check
        // below refuses it, after the chain's verdict, which says more).
        let name = server_name(names.exact().unwrap_or(0));
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
            return Err(e.clone());
        }
        match names.exact() {
            Some(_) if !wrong_name => verified,
            _ => Err(identity_error(IdentityError::NotExact(names))),
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

/// The client API's check of its callers: a certificate from the CA naming exactly one client
/// and no node. Refusals are logged here; the client learns only the class (see `redacted`).
#[derive(Debug)]
struct ApiClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for ApiClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(|e| {
                tracing::warn!("refusing a client certificate: {e}");
                redacted(&e)
            })?;
        let names = node_names(end_entity);
        if names.client().is_some() {
            return Ok(verified);
        }
        let e = match names.exact() {
            Some(id) => IdentityError::NodeCallsApi(node_dns_name(id)),
            None => IdentityError::NotExactClient(names),
        };
        tracing::warn!("refusing a client certificate: {e}");
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::ApplicationVerificationFailure,
        ))
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

/// The authenticated client name of a TLS peer on the client API, from its (already
/// verified) certificate chain. `None` unless the certificate names exactly one client and no
/// node (the API verifier refuses any other).
// Used by `raftwire node` and `raftwire ctl` (the application side).
#[cfg_attr(not(all(feature = "app", feature = "grpc")), allow(dead_code))]
pub(crate) fn peer_client_name(certs: Option<&[CertificateDer<'_>]>) -> Option<String> {
    certs
        .and_then(|c| c.first())
        .and_then(|c| node_names(c).client().map(str::to_string))
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
            clients: Vec::new(),
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

    #[test]
    fn client_names_are_checked() {
        assert_eq!(client_dns_name("ops"), "client-ops.raftwire");
        let longest = "a".repeat(63);
        for good in ["ops", "a", "0", "ci-2", "node-1", longest.as_str()] {
            validate_client_name(good).unwrap_or_else(|e| panic!("{good:?}: {e}"));
            assert_eq!(
                parse_client_dns_name(&client_dns_name(good)).as_deref(),
                Some(good)
            );
        }
        let too_long = "a".repeat(64);
        for (bad, why) in [
            ("", "empty"),
            (too_long.as_str(), "longer than 63"),
            ("Ops", "lower-case"),
            ("a_b", "lower-case"),
            ("a.b", "lower-case"),
            ("a b", "lower-case"),
            ("../x", "lower-case"),
            ("é", "lower-case"),
            ("-ops", "start or end"),
            ("ops-", "start or end"),
            ("-", "start or end"),
        ] {
            let err = validate_client_name(bad).expect_err(bad);
            assert!(
                matches!(&err, TlsError::ClientName { reason, .. } if reason.contains(why)),
                "{bad:?}: {err:?}"
            );
            assert!(err.to_string().contains("invalid client name"), "{err}");
        }
        // As a name check compares them: case-insensitively, and only valid names count.
        assert_eq!(
            parse_client_dns_name("CLIENT-Ops.Raftwire").as_deref(),
            Some("ops")
        );
        for other in [
            "client-.raftwire",
            "client--ops.raftwire",
            "client-ops-.raftwire",
            "client-a_b.raftwire",
            "client-ops.raftwire.x",
            "client-ops",
            "node-1.raftwire",
            "ops.raftwire",
        ] {
            assert_eq!(parse_client_dns_name(other), None, "{other}");
        }
        // The client API's SNI is a fixed, valid name.
        assert_eq!(
            ClientTls::server_name(),
            ServerName::try_from("api.raftwire").unwrap()
        );
    }

    #[test]
    fn a_certificate_is_a_node_or_a_client_never_both() {
        let names = |ids: Vec<u64>, clients: Vec<&str>, wildcards: Vec<&str>| NodeNames {
            ids,
            clients: clients.into_iter().map(String::from).collect(),
            wildcards: wildcards.into_iter().map(String::from).collect(),
        };
        let node = names(vec![3], vec![], vec![]);
        assert_eq!((node.exact(), node.client()), (Some(3), None));
        let client = names(vec![], vec!["ops"], vec![]);
        assert_eq!((client.exact(), client.client()), (None, Some("ops")));
        for neither in [
            names(vec![3], vec!["ops"], vec![]),
            names(vec![], vec!["ops", "ci"], vec![]),
            names(vec![], vec!["ops"], vec!["*.raftwire"]),
            names(vec![], vec![], vec![]),
        ] {
            assert_eq!((neither.exact(), neither.client()), (None, None), "{neither}");
        }
        assert_eq!(
            names(vec![3], vec!["ops"], vec![]).to_string(),
            "node ids [3] and client names [\"ops\"]"
        );
    }

    use crate::certs::CertificateAuthority;
    use crate::certs::Validity;

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    #[test]
    fn client_and_node_identities_do_not_mix() {
        let ca = CertificateAuthority::generate("tls unit test CA").unwrap();
        let ca_pem = ca.cert_pem().as_bytes();
        let valid = Validity::default();
        let ops = ca.issue_client("ops", valid).unwrap();
        let node = ca.issue(1, &[], valid).unwrap();
        // Node 1's certificate that also names a client: neither identity.
        let both = ca.issue(1, &[client_dns_name("ops")], valid).unwrap();

        let client =
            ClientTls::from_pem(ca_pem, ops.cert_pem().as_bytes(), ops.key_pem().as_bytes()).unwrap();
        assert_eq!(client.name(), "ops");

        // A node certificate is no client identity, a client certificate no node identity.
        let err = ClientTls::from_pem(ca_pem, node.cert_pem.as_bytes(), node.key_pem.as_bytes()).unwrap_err();
        assert!(
            matches!(&err, TlsError::NodeNotClient(ids) if ids == &[1]),
            "{err:?}"
        );
        assert!(err.to_string().contains("add-client"), "{err}");
        let err =
            TlsConfig::from_pem(ca_pem, ops.cert_pem().as_bytes(), ops.key_pem().as_bytes()).unwrap_err();
        assert!(
            matches!(&err, TlsError::ClientNotNode(names) if names == &["ops"]),
            "{err:?}"
        );
        assert!(err.to_string().contains("client API"), "{err}");
        let err = TlsConfig::from_pem(ca_pem, both.cert_pem.as_bytes(), both.key_pem.as_bytes()).unwrap_err();
        assert!(matches!(&err, TlsError::ClientNotNode(_)), "{err:?}");
        let err = ClientTls::from_pem(ca_pem, both.cert_pem.as_bytes(), both.key_pem.as_bytes()).unwrap_err();
        assert!(matches!(&err, TlsError::NodeNotClient(_)), "{err:?}");

        // A certificate naming no client (the CA's), a key of another certificate, a file
        // that is not there.
        let err = ClientTls::from_pem(ca_pem, ca_pem, ops.key_pem().as_bytes()).unwrap_err();
        assert!(
            matches!(&err, TlsError::ClientId(names) if names.is_empty()),
            "{err:?}"
        );
        let err =
            ClientTls::from_pem(ca_pem, ops.cert_pem().as_bytes(), node.key_pem.as_bytes()).unwrap_err();
        assert!(matches!(err, TlsError::KeyMismatch(_)), "{err:?}");
        let err =
            ClientTls::from_pem(ca_pem, ops.key_pem().as_bytes(), ops.key_pem().as_bytes()).unwrap_err();
        assert!(
            matches!(
                err,
                TlsError::Pem {
                    what: "client certificate",
                    ..
                }
            ),
            "{err:?}"
        );
        let err =
            ClientTls::from_pem_files("/nonexistent/ca.pem", "/nonexistent/c.pem", "/nonexistent/c.key")
                .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");

        // The peers' names, as the listeners read them.
        let chain = |pem: &str| vec![der(pem)];
        assert_eq!(
            peer_client_name(Some(&chain(ops.cert_pem()))).as_deref(),
            Some("ops")
        );
        assert_eq!(peer_node_id(Some(&chain(ops.cert_pem()))), None);
        assert_eq!(peer_client_name(Some(&chain(&node.cert_pem))), None);
        assert_eq!(peer_client_name(Some(&chain(&both.cert_pem))), None);
        assert_eq!(peer_node_id(Some(&chain(&both.cert_pem))), None);
        assert_eq!(peer_client_name(None), None);

        // Debug never prints the key.
        for debug in [format!("{client:?}"), format!("{client:#?}"), format!("{ops:?}")] {
            assert!(debug.contains("redacted") && debug.contains("ops"), "{debug}");
            assert!(!debug.contains("PRIVATE KEY"), "{debug}");
            for line in ops.key_pem().lines().filter(|l| !l.starts_with("-----")) {
                assert!(!debug.contains(line), "{debug}");
            }
        }
    }

    /// WARN lines logged on this thread while the guard lives (the handshake tests run on a
    /// current-thread runtime, so the server's verifier logs here).
    #[derive(Clone, Default)]
    struct Logs(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Logs {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Logs {
        fn capture() -> (Logs, tracing::subscriber::DefaultGuard) {
            let logs = Logs::default();
            let writer = logs.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .with_max_level(tracing::Level::WARN)
                .finish();
            (logs, tracing::subscriber::set_default(subscriber))
        }

        /// Everything logged since the last call.
        fn take(&self) -> String {
            String::from_utf8_lossy(&std::mem::take(&mut *self.0.lock().unwrap())).into_owned()
        }
    }

    #[test]
    fn the_raft_verifier_refuses_client_certificates() {
        let (logs, _guard) = Logs::capture();
        let ca = CertificateAuthority::generate("tls unit test CA").unwrap();
        let node = ca.tls_config(2).unwrap();
        let verifier = NodeClientVerifier {
            inner: client_verifier(&node.inner.roots, &node.inner.provider).unwrap(),
            allowed: None,
        };
        let now = UnixTime::now();
        // The control: a node certificate passes.
        let one = ca.issue(1, &[], Validity::default()).unwrap();
        verifier
            .verify_client_cert(&der(&one.cert_pem), &[], now)
            .unwrap();
        let ops = ca.issue_client("ops", Validity::default()).unwrap();
        let err = verifier
            .verify_client_cert(&der(ops.cert_pem()), &[], now)
            .unwrap_err();
        assert_eq!(
            err,
            rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure)
        );
        let logged = logs.take();
        assert!(
            logged.contains("WARN")
                && logged.contains(
                    "refusing a client: a client certificate (client-ops.raftwire) may not speak Raft"
                ),
            "{logged}"
        );
    }

    const TEST_ALPN: &[u8] = b"raftwire-api-test";

    /// What the test API server saw of one connection: the client name of an accepted one, or
    /// why the handshake failed.
    type Seen = Result<Option<String>, String>;

    /// Serves `config` on 127.0.0.1:0: every accepted connection gets `hello` and is held
    /// until the client closes it. Returns the address and what each connection came to.
    async fn serve(
        config: rustls::ServerConfig,
    ) -> (
        std::net::SocketAddr,
        tokio::sync::mpsc::UnboundedReceiver<Seen>,
        tokio::task::JoinHandle<()>,
    ) {
        use tokio::io::AsyncReadExt;
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                match acceptor.accept(tcp).await {
                    Ok(mut stream) => {
                        let name = peer_client_name(stream.get_ref().1.peer_certificates());
                        let _ = tx.send(Ok(name));
                        let _ = stream.write_all(b"hello").await;
                        let _ = stream.flush().await;
                        let _ = stream.read(&mut [0u8; 16]).await;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                    }
                }
            }
        });
        (addr, rx, task)
    }

    /// Connects with `config` and reads the server's first bytes: `hello`, or the error that
    /// came instead (TLS 1.3: the server checks our certificate after our side of the
    /// handshake is done, so its refusal arrives as the first read).
    async fn dial(config: rustls::ClientConfig, addr: std::net::SocketAddr) -> Result<String, String> {
        use tokio::io::AsyncReadExt;
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let mut stream = connector
            .connect(ClientTls::server_name(), tcp)
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(std::time::Duration::from_secs(3), stream.read(&mut buf))
            .await
            .map_err(|_| "the server neither answered nor refused".to_string())?;
        match read {
            Ok(n) => Ok(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// A client config presenting `cert_pem` / `key_pem` (any certificate, unchecked) and
    /// verifying the server as a client API client does; no certificate if `None`.
    fn raw_api_client(ca: &CertificateAuthority, identity: Option<(&str, &str)>) -> rustls::ClientConfig {
        let roots = Arc::new(root_store(&[der(ca.cert_pem())]).unwrap());
        let provider = default_provider();
        let verifier = AnyNodeServerVerifier {
            inner: server_verifier(&roots, &provider).unwrap(),
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier));
        let mut config = match identity {
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    vec![der(cert)],
                    PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![TEST_ALPN.to_vec()];
        config
    }

    /// The client API listener's TLS over a real socket: a client certificate is accepted and
    /// named; node certificates, certificates naming a node and a client, foreign CAs and no
    /// certificate at all are refused, with the reason in the server's log only.
    #[tokio::test]
    async fn the_client_api_accepts_client_certificates_only() {
        let (logs, _guard) = Logs::capture();
        let ca = CertificateAuthority::generate("tls unit test CA").unwrap();
        let valid = Validity::default();
        let node2 = ca.tls_config(2).unwrap();
        let (addr, mut seen, task) = serve(node2.api_server_config(TEST_ALPN).unwrap()).await;

        // A client identity is accepted, and the server learns its name.
        let ops = ca.client_tls("ops").unwrap();
        let answer = dial(ops.client_config(TEST_ALPN).unwrap(), addr).await;
        assert_eq!(answer.as_deref(), Ok("hello"));
        assert_eq!(seen.recv().await, Some(Ok(Some("ops".to_string()))));
        assert_eq!(logs.take(), "", "an accepted client is no warning");

        // Node 1's certificate, presented by node 1's Raft client config (which accepts node
        // 2 as the server): refused, it is no client.
        let node1 = ca.tls_config(1).unwrap();
        let foreign = CertificateAuthority::generate("some other CA").unwrap();
        let theirs = foreign.issue_client("ops", valid).unwrap();
        let both = ca.issue(1, &[client_dns_name("ops")], valid).unwrap();
        let cases = [
            (
                "a node certificate",
                node1.client_config(2, TEST_ALPN).unwrap(),
                "AccessDenied",
                "a node certificate (node-1.raftwire) may not call the client API",
            ),
            (
                "a certificate naming a node and a client",
                raw_api_client(&ca, Some((&both.cert_pem, &both.key_pem))),
                "AccessDenied",
                "must name exactly one client",
            ),
            (
                "a client certificate from another CA",
                raw_api_client(&ca, Some((theirs.cert_pem(), theirs.key_pem()))),
                "UnknownCA",
                "UnknownIssuer",
            ),
        ];
        for (what, config, alert, logged) in cases {
            let answer = dial(config, addr).await;
            let err = answer.expect_err(what);
            assert!(err.contains(alert), "{what}: the client sees {err}");
            assert!(
                !err.contains("node-1") && !err.contains("exactly"),
                "{what}: the client learns details: {err}"
            );
            let server = seen.recv().await.unwrap();
            assert!(server.is_err(), "{what}: the server accepted it: {server:?}");
            let log = logs.take();
            assert!(
                log.contains("WARN")
                    && log.contains("refusing a client certificate: ")
                    && log.contains(logged),
                "{what}: the server logged: {log}"
            );
        }

        // No certificate at all: rustls refuses it before any verifier runs.
        let err = dial(raw_api_client(&ca, None), addr)
            .await
            .expect_err("no certificate");
        assert!(err.contains("CertificateRequired"), "no certificate: {err}");
        let server = seen.recv().await.unwrap();
        assert!(
            matches!(&server, Err(e) if e.contains("no certificates")),
            "no certificate: {server:?}"
        );
        task.abort();
    }

    /// A raw server presenting `cert_pem` / `key_pem`, asking no client certificate.
    fn raw_server(cert_pem: &str, key_pem: &str) -> rustls::ServerConfig {
        let mut config = rustls::ServerConfig::builder_with_provider(default_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![der(cert_pem)],
                PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap(),
            )
            .unwrap();
        config.alpn_protocols = vec![TEST_ALPN.to_vec()];
        config
    }

    /// A client API client accepts any node of its CA, whatever name it dialled, and nothing
    /// else.
    #[tokio::test]
    async fn a_client_accepts_any_node_of_its_ca_and_nothing_else() {
        let ca = CertificateAuthority::generate("tls unit test CA").unwrap();
        let valid = Validity::default();
        let ops = ca.client_tls("ops").unwrap();

        let node7 = ca.tls_config(7).unwrap();
        let (addr, _seen, task) = serve(node7.api_server_config(TEST_ALPN).unwrap()).await;
        let answer = dial(ops.client_config(TEST_ALPN).unwrap(), addr).await;
        assert_eq!(answer.as_deref(), Ok("hello"), "node 7");
        task.abort();

        let foreign = CertificateAuthority::generate("some other CA").unwrap();
        let theirs = foreign.issue(7, &[], valid).unwrap();
        let both = ca.issue(7, &[client_dns_name("svc")], valid).unwrap();
        let two = ca.issue(7, &[node_dns_name(8)], valid).unwrap();
        let cases = [
            ("a node of another CA", &theirs, "UnknownIssuer"),
            (
                "a certificate naming a node and a client",
                &both,
                "exactly one node",
            ),
            ("a certificate naming two nodes", &two, "exactly one node"),
        ];
        for (what, cert, reason) in cases {
            let (addr, _seen, task) = serve(raw_server(&cert.cert_pem, &cert.key_pem)).await;
            let err = dial(ops.client_config(TEST_ALPN).unwrap(), addr)
                .await
                .expect_err(what);
            assert!(err.contains(reason), "{what}: {err}");
            task.abort();
        }
        // A server presenting a client certificate: not a server certificate at all.
        let svc = ca.issue_client("svc", valid).unwrap();
        let (addr, _seen, task) = serve(raw_server(svc.cert_pem(), svc.key_pem())).await;
        let err = dial(ops.client_config(TEST_ALPN).unwrap(), addr)
            .await
            .expect_err("a client certificate as the server's");
        assert!(err.contains("invalid peer certificate"), "{err}");
        task.abort();
    }
}
