//! `raftwire certs`: makes a cluster CA, node and client certificates on disk, and inspects
//! them.
//!
//! Every certificate issued here is checked before anything is written: a node certificate
//! must chain to the CA for both server and client authentication as the node it names, and
//! load as a TLS identity (key matches, exactly one node id); a client certificate must chain
//! to the CA for client authentication and load as a client identity (key matches, exactly
//! one client name, no node name).

use std::collections::BTreeSet;
use std::path::Path;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Subcommand;
use raftwire::CertificateAuthority;
use raftwire::CertificateInfo;
use raftwire::ClientCertificate;
use raftwire::ClientTls;
use raftwire::NodeCertificate;
use raftwire::TlsConfig;
use raftwire::Validity;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::ServerName;
use rustls::pki_types::UnixTime;
use rustls::pki_types::pem::PemObject;

const CERT_BEGIN: &str = "-----BEGIN CERTIFICATE-----";

#[derive(Subcommand)]
pub enum CertsCommand {
    /// Creates a cluster CA and a certificate per node in a directory.
    ///
    /// Writes ca.pem, ca.key, node-<id>.pem and node-<id>.key into DIR; keys get mode 0600.
    /// Refuses to overwrite an existing CA or node files unless --force is given.
    Init {
        /// The directory to write into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// The node ids to certify, comma-separated (e.g. 1,2,3).
        #[arg(long, value_name = "IDS", value_delimiter = ',', required = true)]
        nodes: Vec<u64>,
        /// Extra subject alternative names for every node certificate: DNS names or IP
        /// addresses, comma-separated. The node identity `node-<id>.raftwire` is always added.
        #[arg(long, value_name = "HOSTS", value_delimiter = ',')]
        hosts: Vec<String>,
        /// How many days the node certificates are valid (the CA is valid for ten years).
        #[arg(long, value_name = "N", default_value_t = 365, value_parser = days_parser())]
        days: u32,
        /// The common name of the CA certificate.
        #[arg(long, value_name = "NAME", default_value = "raftwire cluster CA")]
        ca_name: String,
        /// Replace an existing CA and node files in DIR (certificates signed by the old CA
        /// stop being trusted by nodes that load the new ca.pem).
        #[arg(long)]
        force: bool,
    },
    /// Issues one more node certificate from the CA in DIR (ca.pem, ca.key).
    AddNode {
        /// The directory holding the CA; node-<id>.pem and node-<id>.key are written there.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The node id to certify.
        #[arg(long, value_name = "ID")]
        node: u64,
        /// Extra subject alternative names: DNS names or IP addresses, comma-separated.
        #[arg(long, value_name = "HOSTS", value_delimiter = ',')]
        hosts: Vec<String>,
        /// How many days the certificate is valid.
        #[arg(long, value_name = "N", default_value_t = 365, value_parser = days_parser())]
        days: u32,
        /// Replace an existing certificate and key for this node.
        #[arg(long)]
        force: bool,
    },
    /// Issues a client certificate (for an operator tool such as `raftwire ctl`) from the CA
    /// in DIR (ca.pem, ca.key).
    ///
    /// The certificate names the client as DNS SAN client-<NAME>.raftwire and nothing else;
    /// nodes accept it on their client API only, never for Raft. Writes client-<NAME>.pem and
    /// client-<NAME>.key (mode 0600) into DIR.
    AddClient {
        /// The directory holding the CA; client-<NAME>.pem and client-<NAME>.key are written
        /// there.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The client's name: 1-63 characters of a-z, 0-9 and `-`, not starting or ending with
        /// `-` (e.g. ops).
        #[arg(long, value_name = "NAME")]
        name: String,
        /// How many days the certificate is valid.
        #[arg(long, value_name = "N", default_value_t = 365, value_parser = days_parser())]
        days: u32,
        /// Replace an existing certificate and key for this client.
        #[arg(long)]
        force: bool,
    },
    /// Shows a certificate: subject, issuer, role (node id or client name), SANs, validity,
    /// whether it is a CA.
    Inspect {
        /// A PEM file; its first certificate is shown.
        file: PathBuf,
        /// Print one JSON line instead of the table.
        #[arg(long)]
        json: bool,
    },
}

fn days_parser() -> clap::builder::RangedI64ValueParser<u32> {
    // A hundred years; far beyond that the validity end no longer fits an X.509 time.
    clap::value_parser!(u32).range(1..=36_500)
}

/// Runs one `raftwire certs` subcommand; a failure is printed as `error: ...`.
pub fn run(command: CertsCommand) -> ExitCode {
    let result = match command {
        CertsCommand::Init {
            out,
            nodes,
            hosts,
            days,
            ca_name,
            force,
        } => init(&out, &nodes, &hosts, days, &ca_name, force),
        CertsCommand::AddNode {
            dir,
            node,
            hosts,
            days,
            force,
        } => add_node(&dir, node, &hosts, days, force),
        CertsCommand::AddClient {
            dir,
            name,
            days,
            force,
        } => add_client(&dir, &name, days, force),
        CertsCommand::Inspect { file, json } => inspect(&file, json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn validity(days: u32) -> Validity {
    Validity {
        // An hour of tolerance for clocks that lag behind the machine that issued it.
        from: time::Duration::hours(-1),
        until: time::Duration::days(i64::from(days)),
    }
}

fn node_files(dir: &Path, id: u64) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("node-{id}.pem")),
        dir.join(format!("node-{id}.key")),
    )
}

/// Whether anything (a dangling link included) is at `path`.
fn occupied(path: &Path) -> bool {
    path.symlink_metadata().is_ok()
}

fn check_hosts(hosts: &[String]) -> Result<(), String> {
    for host in hosts {
        if host.trim().is_empty() {
            return Err("--hosts holds an empty name (check for a stray comma)".into());
        }
        let lower = host.to_ascii_lowercase();
        if lower.starts_with("node-") && lower.ends_with(".raftwire") {
            return Err(format!(
                "--hosts `{host}` looks like a node identity; identities are added per node and a \
                 certificate may name only one"
            ));
        }
        if lower.starts_with("client-") && lower.ends_with(".raftwire") {
            return Err(format!(
                "--hosts `{host}` looks like a client identity; a node certificate may not name a \
                 client (issue one with `raftwire certs add-client`)"
            ));
        }
    }
    Ok(())
}

/// Issues node `id`'s certificate and checks it against the CA before anyone relies on it.
fn issue(ca: &CertificateAuthority, id: u64, hosts: &[String], days: u32) -> Result<NodeCertificate, String> {
    let node = ca
        .issue(id, hosts, validity(days))
        .map_err(|e| format!("cannot issue a certificate for node {id}: {e}"))?;
    verify(ca, &node).map_err(|e| format!("the certificate issued for node {id} does not verify: {e}"))?;
    Ok(node)
}

fn verify(ca: &CertificateAuthority, node: &NodeCertificate) -> Result<(), String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let ca_der =
        CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).map_err(|e| format!("ca.pem: {e}"))?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_der).map_err(|e| format!("ca.pem: {e}"))?;
    let roots = Arc::new(roots);
    let cert = CertificateDer::from_pem_slice(node.cert_pem.as_bytes()).map_err(|e| e.to_string())?;
    let name = ServerName::try_from(raftwire::node_dns_name(node.node_id)).map_err(|e| e.to_string())?;
    let now = UnixTime::now();
    let hint = "(does ca.key belong to ca.pem?)";
    rustls::client::WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| e.to_string())?
        .verify_server_cert(&cert, &[], &name, &[], now)
        .map_err(|e| format!("as a server: {e} {hint}"))?;
    rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider)
        .build()
        .map_err(|e| e.to_string())?
        .verify_client_cert(&cert, &[], now)
        .map_err(|e| format!("as a client: {e} {hint}"))?;
    TlsConfig::from_pem(
        ca.cert_pem().as_bytes(),
        node.cert_pem.as_bytes(),
        node.key_pem.as_bytes(),
    )
    .map_err(|e| e.to_string())?;
    Ok(())
}

fn wrote(path: &Path, what: &str) {
    println!("wrote {}  ({what})", path.display());
}

fn describe_node(node: &NodeCertificate) -> String {
    match raftwire::inspect_certificate(&node.cert_pem) {
        Ok(info) => format!(
            "node {} certificate: {}; valid until {}",
            node.node_id,
            info.sans.join(", "),
            info.not_after
        ),
        Err(_) => format!("node {} certificate", node.node_id),
    }
}

fn write_node(dir: &Path, node: &NodeCertificate) -> Result<(), String> {
    node.write(dir)
        .map_err(|e| format!("cannot write node {}'s files: {e}", node.node_id))?;
    let (pem, key) = node_files(dir, node.node_id);
    wrote(&pem, &describe_node(node));
    wrote(&key, &format!("node {} private key, mode 0600", node.node_id));
    Ok(())
}

fn init(
    out: &Path,
    nodes: &[u64],
    hosts: &[String],
    days: u32,
    ca_name: &str,
    force: bool,
) -> Result<(), String> {
    let mut seen = BTreeSet::new();
    for &id in nodes {
        if !seen.insert(id) {
            return Err(format!("--nodes names node {id} twice"));
        }
    }
    check_hosts(hosts)?;
    if ca_name.trim().is_empty() {
        return Err("--ca-name must not be empty".into());
    }
    let ca_key = out.join("ca.key");
    if !force {
        if occupied(&ca_key) {
            return Err(format!(
                "{} already holds a CA key ({}); refusing to overwrite it. Issue more node \
                 certificates from it with `raftwire certs add-node --dir {}`, or pass --force to \
                 replace the CA and the node files",
                out.display(),
                ca_key.display(),
                out.display()
            ));
        }
        let mut targets = vec![out.join("ca.pem")];
        for &id in nodes {
            let (pem, key) = node_files(out, id);
            targets.extend([pem, key]);
        }
        let existing: Vec<String> = targets
            .iter()
            .filter(|p| occupied(p))
            .map(|p| p.display().to_string())
            .collect();
        if !existing.is_empty() {
            return Err(format!(
                "refusing to overwrite existing files (pass --force to replace them): {}",
                existing.join(", ")
            ));
        }
    }
    // Everything is made and checked in memory first: a failure leaves the directory alone.
    let ca = CertificateAuthority::generate(ca_name).map_err(|e| format!("cannot generate the CA: {e}"))?;
    let certs = nodes
        .iter()
        .map(|&id| issue(&ca, id, hosts, days))
        .collect::<Result<Vec<_>, _>>()?;
    std::fs::create_dir_all(out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    ca.write(out).map_err(|e| format!("cannot write the CA: {e}"))?;
    wrote(
        &out.join("ca.pem"),
        &format!("CA certificate \"{ca_name}\", valid for ten years"),
    );
    wrote(&ca_key, "CA private key, mode 0600: keep it off the nodes");
    for node in &certs {
        write_node(out, node)?;
    }
    if force {
        warn_stale(out, nodes);
    }
    Ok(())
}

/// After `--force`, node files of other ids are still signed by the replaced CA.
fn warn_stale(dir: &Path, fresh: &[u64]) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut stale: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| {
            let stale_node = name
                .strip_prefix("node-")
                .and_then(|rest| rest.strip_suffix(".pem"))
                .and_then(|id| id.parse::<u64>().ok())
                .is_some_and(|id| !fresh.contains(&id));
            let client = name.starts_with("client-") && name.ends_with(".pem");
            stale_node || client
        })
        .collect();
    stale.sort();
    if !stale.is_empty() {
        eprintln!(
            "warning: {} still holds certificates from the replaced CA: {} (reissue them with \
             `raftwire certs add-node --force` / `raftwire certs add-client --force`, or remove \
             them)",
            dir.display(),
            stale.join(", ")
        );
    }
}

fn add_node(dir: &Path, id: u64, hosts: &[String], days: u32, force: bool) -> Result<(), String> {
    check_hosts(hosts)?;
    if !dir.is_dir() {
        return Err(format!(
            "{} is not a directory; create a CA there first with `raftwire certs init --out {} --nodes ...`",
            dir.display(),
            dir.display()
        ));
    }
    let ca = CertificateAuthority::read(dir)
        .map_err(|e| format!("cannot load the CA from {}: {e}", dir.display()))?;
    let (pem, key) = node_files(dir, id);
    if !force {
        for path in [&pem, &key] {
            if occupied(path) {
                return Err(format!(
                    "{} already exists; refusing to overwrite it (pass --force to replace node {id}'s \
                     certificate and key)",
                    path.display()
                ));
            }
        }
    }
    let node = issue(&ca, id, hosts, days)?;
    write_node(dir, &node)
}

fn client_files(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (pem, key) = ClientCertificate::file_names(name);
    (dir.join(pem), dir.join(key))
}

fn add_client(dir: &Path, name: &str, days: u32, force: bool) -> Result<(), String> {
    // The name becomes part of the file names: check it before it touches a path.
    raftwire::validate_client_name(name).map_err(|e| format!("--name: {e}"))?;
    if !dir.is_dir() {
        return Err(format!(
            "{} is not a directory; create a CA there first with `raftwire certs init --out {} --nodes ...`",
            dir.display(),
            dir.display()
        ));
    }
    let ca = CertificateAuthority::read(dir)
        .map_err(|e| format!("cannot load the CA from {}: {e}", dir.display()))?;
    let (pem, key) = client_files(dir, name);
    if !force {
        for path in [&pem, &key] {
            if occupied(path) {
                return Err(format!(
                    "{} already exists; refusing to overwrite it (pass --force to replace client \
                     {name}'s certificate and key)",
                    path.display()
                ));
            }
        }
    }
    let client = ca
        .issue_client(name, validity(days))
        .map_err(|e| format!("cannot issue a certificate for client {name}: {e}"))?;
    verify_client(&ca, &client)
        .map_err(|e| format!("the certificate issued for client {name} does not verify: {e}"))?;
    client
        .write(dir)
        .map_err(|e| format!("cannot write client {name}'s files: {e}"))?;
    let described = match raftwire::inspect_certificate(client.cert_pem()) {
        Ok(info) => format!(
            "client {name} certificate: {}; valid until {}",
            info.sans.join(", "),
            info.not_after
        ),
        Err(_) => format!("client {name} certificate"),
    };
    wrote(&pem, &described);
    wrote(&key, &format!("client {name} private key, mode 0600"));
    Ok(())
}

/// A client certificate must chain to the CA as a client and load as a client identity.
fn verify_client(ca: &CertificateAuthority, client: &ClientCertificate) -> Result<(), String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let ca_der =
        CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).map_err(|e| format!("ca.pem: {e}"))?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_der).map_err(|e| format!("ca.pem: {e}"))?;
    let cert = CertificateDer::from_pem_slice(client.cert_pem().as_bytes()).map_err(|e| e.to_string())?;
    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| e.to_string())?
        .verify_client_cert(&cert, &[], UnixTime::now())
        .map_err(|e| format!("as a client: {e} (does ca.key belong to ca.pem?)"))?;
    ClientTls::from_pem(
        ca.cert_pem().as_bytes(),
        client.cert_pem().as_bytes(),
        client.key_pem().as_bytes(),
    )
    .map_err(|e| e.to_string())?;
    Ok(())
}

fn inspect(file: &Path, json: bool) -> Result<(), String> {
    let text = std::fs::read(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let text = String::from_utf8_lossy(&text);
    let Some(start) = text.find(CERT_BEGIN) else {
        return Err(if text.contains("PRIVATE KEY-----") {
            format!(
                "{} holds a private key, not a certificate (inspect the matching .pem file)",
                file.display()
            )
        } else {
            format!("{} holds no PEM certificate (`{CERT_BEGIN}`)", file.display())
        });
    };
    let info =
        raftwire::inspect_certificate(&text[start..]).map_err(|e| format!("{}: {e}", file.display()))?;
    if json {
        let line = serde_json::to_string(&info).map_err(|e| e.to_string())?;
        println!("{line}");
    } else {
        print_info(file, &info, status(&text[start..]));
    }
    Ok(())
}

/// Whether the certificate is valid now, in words.
fn status(pem: &str) -> String {
    let Ok((_, pem)) = x509_parser::pem::parse_x509_pem(pem.as_bytes()) else {
        return "unknown".into();
    };
    let Ok(cert) = pem.parse_x509() else {
        return "unknown".into();
    };
    let now = x509_parser::time::ASN1Time::now();
    let validity = cert.validity();
    if now < validity.not_before {
        "NOT YET VALID".into()
    } else if now > validity.not_after {
        "EXPIRED".into()
    } else {
        let days = validity.time_to_expiration().map_or(0, |d| d.whole_days());
        format!("valid ({days} days left)")
    }
}

fn print_info(file: &Path, info: &CertificateInfo, status: String) {
    let node = info
        .node_id
        .map_or_else(|| "none".to_string(), |id| id.to_string());
    let role = match (&info.client_name, info.node_id, info.is_ca) {
        (_, Some(id), _) => format!("node {id} (speaks Raft)"),
        (Some(name), None, _) => format!("client {name} (client API only, never Raft)"),
        (None, None, true) => "CA".to_string(),
        (None, None, false) => "none (names no single node or client)".to_string(),
    };
    let sans = if info.sans.is_empty() {
        "none".to_string()
    } else {
        info.sans.join(", ")
    };
    println!("file        {}", file.display());
    println!("subject     {}", info.subject);
    println!("issuer      {}", info.issuer);
    println!("role        {role}");
    println!("node id     {node}");
    println!("SANs        {sans}");
    println!("not before  {}", info.not_before);
    println!("not after   {}", info.not_after);
    println!("status      {status}");
    println!("CA          {}", if info.is_ca { "yes" } else { "no" });
}
