//! Certificate tooling (rcgen): a cluster CA, node certificates that carry the node id,
//! client certificates that carry a client name, and inspection. Used by `raftwire certs`, the
//! demo (which makes a throw-away CA) and tests.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::Path;
use std::path::PathBuf;

use rcgen::BasicConstraints;
use rcgen::CertificateParams;
use rcgen::DnType;
use rcgen::ExtendedKeyUsagePurpose;
use rcgen::IsCa;
use rcgen::Issuer;
use rcgen::KeyPair;
use rcgen::KeyUsagePurpose;
use time::Duration;
use time::OffsetDateTime;

use crate::tls::ClientTls;
use crate::tls::TlsConfig;
use crate::tls::TlsError;
use crate::tls::client_dns_name;
use crate::tls::node_dns_name;
use crate::tls::validate_client_name;

/// Why certificates could not be made, read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// rcgen refused the parameters or input.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A certificate could not be parsed.
    #[error("cannot parse certificate: {0}")]
    Parse(String),
    /// The result could not be loaded as a TLS identity.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// A cluster certificate authority: signs node and client certificates.
pub struct CertificateAuthority {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("key", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// A node's certificate and private key, in PEM.
#[derive(Clone)]
pub struct NodeCertificate {
    /// The node id the certificate names.
    pub node_id: u64,
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PEM (PKCS#8).
    pub key_pem: String,
}

impl fmt::Debug for NodeCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeCertificate")
            .field("node_id", &self.node_id)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// A client's certificate and private key, in PEM: the identity of an operator tool such as
/// `raftwire ctl` ([`CertificateAuthority::issue_client`]). Load it with
/// [`ClientTls::from_pem`].
#[derive(Clone)]
pub struct ClientCertificate {
    name: String,
    cert_pem: String,
    key_pem: String,
}

impl fmt::Debug for ClientCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCertificate")
            .field("name", &self.name)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl ClientCertificate {
    /// The client name the certificate carries (`ops` for `client-ops.raftwire`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The private key, PEM (PKCS#8).
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The file names `raftwire certs add-client` gives client `name`'s certificate and key:
    /// `client-<name>.pem` and `client-<name>.key`.
    pub fn file_names(name: &str) -> (String, String) {
        (format!("client-{name}.pem"), format!("client-{name}.key"))
    }

    /// Writes `client-<name>.pem` and `client-<name>.key` (mode 0600) into `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), CertError> {
        let (pem, key) = Self::file_names(&self.name);
        write_file(&dir.join(pem), &self.cert_pem, false)?;
        write_file(&dir.join(key), &self.key_pem, true)
    }
}

/// When a certificate is valid, relative to now.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    /// Start, relative to now (negative: in the past).
    pub from: Duration,
    /// End, relative to now.
    pub until: Duration,
}

impl Default for Validity {
    /// From an hour ago (tolerates clock skew) to a year from now.
    fn default() -> Self {
        Validity {
            from: Duration::hours(-1),
            until: Duration::days(365),
        }
    }
}

impl CertificateAuthority {
    /// Generates a new CA (ECDSA P-256) valid for ten years.
    pub fn generate(name: &str) -> Result<Self, CertError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "raftwire");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(3650);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        Ok(CertificateAuthority {
            cert_pem: cert.pem(),
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads an existing CA from its certificate and key (PEM).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CertError> {
        let key = KeyPair::from_pem(key_pem)?;
        // rcgen signs with whatever key it is given: a key from another CA would issue
        // certificates nobody can verify, so check the pair belongs together first.
        let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
            .map_err(|e| CertError::Parse(e.to_string()))?;
        let cert = pem.parse_x509().map_err(|e| CertError::Parse(e.to_string()))?;
        if cert.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice() {
            return Err(CertError::Parse(
                "the CA key does not belong to the CA certificate".into(),
            ));
        }
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(CertificateAuthority {
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
            issuer,
        })
    }

    /// The CA certificate, PEM: the bundle every node trusts.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a certificate for node `id`: DNS SAN `node-<id>.raftwire` (its identity), plus
    /// `hosts` (DNS names or IP addresses) for operators; server and client authentication.
    pub fn issue(&self, id: u64, hosts: &[String], validity: Validity) -> Result<NodeCertificate, CertError> {
        let mut names = vec![node_dns_name(id)];
        names.extend(hosts.iter().cloned());
        let mut params = CertificateParams::new(names)?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("raftwire node {id}"));
        params
            .distinguished_name
            .push(DnType::OrganizationName, "raftwire");
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now + validity.from;
        params.not_after = now + validity.until;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(NodeCertificate {
            node_id: id,
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Issues a certificate for the client `name` (an operator tool): the single DNS SAN
    /// `client-<name>.raftwire` (its identity, and no other name), client authentication only.
    /// `name` must pass [`validate_client_name`](crate::validate_client_name).
    pub fn issue_client(&self, name: &str, validity: Validity) -> Result<ClientCertificate, CertError> {
        validate_client_name(name)?;
        let mut params = CertificateParams::new(vec![client_dns_name(name)])?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("raftwire client {name}"));
        params
            .distinguished_name
            .push(DnType::OrganizationName, "raftwire");
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now + validity.from;
        params.not_after = now + validity.until;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(ClientCertificate {
            name: name.to_string(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Issues a certificate for the client `name` (default validity) and loads it as a client
    /// identity trusting this CA.
    pub fn client_tls(&self, name: &str) -> Result<ClientTls, CertError> {
        let client = self.issue_client(name, Validity::default())?;
        Ok(ClientTls::from_pem(
            self.cert_pem.as_bytes(),
            client.cert_pem.as_bytes(),
            client.key_pem.as_bytes(),
        )?)
    }

    /// Issues a certificate for node `id` (default validity, no extra hosts) and loads it as a
    /// TLS identity trusting this CA.
    pub fn tls_config(&self, id: u64) -> Result<TlsConfig, CertError> {
        let node = self.issue(id, &[], Validity::default())?;
        Ok(TlsConfig::from_pem(
            self.cert_pem.as_bytes(),
            node.cert_pem.as_bytes(),
            node.key_pem.as_bytes(),
        )?)
    }

    /// Writes `ca.pem` and `ca.key` (mode 0600) into `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), CertError> {
        write_file(&dir.join("ca.pem"), &self.cert_pem, false)?;
        write_file(&dir.join("ca.key"), &self.key_pem, true)
    }

    /// Reads `ca.pem` and `ca.key` from `dir`.
    pub fn read(dir: &Path) -> Result<Self, CertError> {
        Self::from_pem(&read_file(&dir.join("ca.pem"))?, &read_file(&dir.join("ca.key"))?)
    }
}

impl NodeCertificate {
    /// Writes `node-<id>.pem` and `node-<id>.key` (mode 0600) into `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), CertError> {
        write_file(
            &dir.join(format!("node-{}.pem", self.node_id)),
            &self.cert_pem,
            false,
        )?;
        write_file(
            &dir.join(format!("node-{}.key", self.node_id)),
            &self.key_pem,
            true,
        )
    }
}

fn read_file(path: &Path) -> Result<String, CertError> {
    fs::read_to_string(path).map_err(|source| CertError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn write_file(path: &Path, contents: &str, secret: bool) -> Result<(), CertError> {
    let io = |source| CertError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    let mut file = options.open(path).map_err(io)?;
    // `mode` applies only to new files: make an existing key file private too.
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(io)?;
    }
    file.write_all(contents.as_bytes()).map_err(io)
}

/// What `raftwire certs inspect` shows of a certificate.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CertificateInfo {
    /// Subject distinguished name.
    pub subject: String,
    /// Issuer distinguished name.
    pub issuer: String,
    /// The node id (from the `node-<id>.raftwire` SAN), if the certificate names exactly one
    /// node, no client and no wildcard: only then is it usable as a node certificate.
    pub node_id: Option<u64>,
    /// The client name (from the `client-<name>.raftwire` SAN), if the certificate names
    /// exactly one client, no node and no wildcard: only then is it usable as a client
    /// certificate.
    pub client_name: Option<String>,
    /// Subject alternative names (DNS names and IP addresses).
    pub sans: Vec<String>,
    /// Start of validity (RFC 3339).
    pub not_before: String,
    /// End of validity (RFC 3339).
    pub not_after: String,
    /// Whether it is a CA certificate.
    pub is_ca: bool,
}

/// Parses the first certificate of a PEM file's contents.
pub fn inspect(pem: &str) -> Result<CertificateInfo, CertError> {
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| CertError::Parse(e.to_string()))?;
    let cert = pem.parse_x509().map_err(|e| CertError::Parse(e.to_string()))?;
    let mut sans = Vec::new();
    let names = crate::tls::node_names(&rustls::pki_types::CertificateDer::from(pem.contents.as_slice()));
    let (node_id, client_name) = (names.exact(), names.client().map(str::to_string));
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(dns) => {
                    sans.push(format!("DNS:{dns}"));
                }
                x509_parser::extensions::GeneralName::IPAddress(ip) => {
                    let ip = match ip.len() {
                        4 => <[u8; 4]>::try_from(*ip)
                            .map(|b| std::net::IpAddr::from(b).to_string())
                            .ok(),
                        16 => <[u8; 16]>::try_from(*ip)
                            .map(|b| std::net::IpAddr::from(b).to_string())
                            .ok(),
                        _ => None,
                    };
                    sans.push(format!("IP:{}", ip.unwrap_or_else(|| "?".into())));
                }
                other => sans.push(format!("{other:?}")),
            }
        }
    }
    let rfc3339 = |t: x509_parser::time::ASN1Time| {
        t.to_datetime()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| t.to_string())
    };
    Ok(CertificateInfo {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        node_id,
        client_name,
        sans,
        not_before: rfc3339(cert.validity().not_before),
        not_after: rfc3339(cert.validity().not_after),
        is_ca: cert.is_ca(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_certificate_names_one_client_for_client_authentication_only() {
        let ca = CertificateAuthority::generate("certs unit test CA").unwrap();
        let client = ca.issue_client("ops", Validity::default()).unwrap();
        assert_eq!(client.name(), "ops");
        assert_eq!(
            ClientCertificate::file_names("ops"),
            ("client-ops.pem".to_string(), "client-ops.key".to_string())
        );

        let info = inspect(client.cert_pem()).unwrap();
        assert_eq!(info.client_name.as_deref(), Some("ops"), "{info:?}");
        assert_eq!(info.node_id, None, "{info:?}");
        assert_eq!(info.sans, ["DNS:client-ops.raftwire"], "{info:?}");
        assert!(!info.is_ca, "{info:?}");
        assert_eq!(info.issuer, inspect(ca.cert_pem()).unwrap().subject);

        // Client authentication only: it cannot serve as a node's (server) certificate.
        let (_, pem) = x509_parser::pem::parse_x509_pem(client.cert_pem().as_bytes()).unwrap();
        let cert = pem.parse_x509().unwrap();
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth, "{eku:?}");
        assert!(eku.other.is_empty() && !eku.any, "{eku:?}");
        assert!(!cert.is_ca());

        // It loads as a client identity; the key is its own.
        let tls = ClientTls::from_pem(
            ca.cert_pem().as_bytes(),
            client.cert_pem().as_bytes(),
            client.key_pem().as_bytes(),
        )
        .unwrap();
        assert_eq!(tls.name(), "ops");
        assert_eq!(ca.client_tls("ci-2").unwrap().name(), "ci-2");

        // A node certificate inspects as a node, not a client.
        let node = ca.issue(3, &[], Validity::default()).unwrap();
        let info = inspect(&node.cert_pem).unwrap();
        assert_eq!((info.node_id, info.client_name), (Some(3), None));
    }

    #[test]
    fn client_names_are_checked_before_anything_is_issued() {
        let ca = CertificateAuthority::generate("certs unit test CA").unwrap();
        for bad in ["", "Ops", "-ops", "ops-", "a_b", "../etc", "ops.raftwire"] {
            let err = ca.issue_client(bad, Validity::default()).unwrap_err();
            assert!(
                matches!(err, CertError::Tls(TlsError::ClientName { .. })),
                "{bad:?}: {err:?}"
            );
            assert!(err.to_string().contains("invalid client name"), "{err}");
            assert!(ca.client_tls(bad).is_err(), "{bad:?}");
        }
    }
}
