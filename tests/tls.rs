//! Mutual TLS over real sockets on 127.0.0.1, on every compiled transport: who is trusted,
//! who is refused and how the refusal reads; loading and redaction of TLS material; the
//! `raftwire certs` command.
#![cfg(feature = "app")]

mod common;

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use common::Cluster;
use common::loopback;
use openraft::RaftNetworkFactory;
use openraft::errors::RPCError;
use openraft::impls::BasicNode;
use openraft::network::RPCOption;
use openraft::network::RaftNetworkV2;
use openraft::raft::VoteRequest;
use openraft::raft::VoteResponse;
use raftwire::CertificateAuthority;
use raftwire::ClientTls;
use raftwire::Config;
use raftwire::NodeCertificate;
use raftwire::TlsConfig;
use raftwire::TlsError;
use raftwire::Transport;
use raftwire::Validity;
use raftwire::demo;
use raftwire::kv::KvConfig;
use raftwire::kv::KvNode;
use raftwire::kv::KvSnapshotData;

type NetworkFactory = raftwire::NetworkFactory<KvConfig, KvSnapshotData>;

fn ca() -> CertificateAuthority {
    named_ca("raftwire tls test CA")
}

fn named_ca(name: &str) -> CertificateAuthority {
    CertificateAuthority::generate(name).unwrap()
}

use common::logs::Logs;
use common::raw;
use common::raw::RAFT_RPCS;
use common::raw::alpn;
use common::raw::der_chain;
use common::raw::der_key;
use common::raw::provider;
use common::raw::raw_rpc;

/// Node `id`'s identity issued by `issuer`, trusting the CA `trust`.
fn identity(
    trust: &CertificateAuthority,
    issuer: &CertificateAuthority,
    id: u64,
    validity: Validity,
) -> TlsConfig {
    let node = issuer.issue(id, &[], validity).unwrap();
    TlsConfig::from_pem(
        trust.cert_pem().as_bytes(),
        node.cert_pem.as_bytes(),
        node.key_pem.as_bytes(),
    )
    .unwrap()
}

fn config(transport: Transport, tls: TlsConfig) -> Config {
    Config::builder().transport(transport).tls(tls).build().unwrap()
}

async fn start(id: u64, config: Config) -> KvNode {
    KvNode::start(id, demo::raft_config(), config, loopback())
        .await
        .unwrap()
}

/// One vote from node `local` (configured by `config`) to node `target` at `addr`, with
/// `candidate` named in the vote.
async fn vote_as(
    config: Config,
    local: u64,
    target: u64,
    addr: SocketAddr,
    candidate: u64,
    ttl: Duration,
) -> Result<VoteResponse<KvConfig>, RPCError<KvConfig>> {
    let mut factory = NetworkFactory::new(local, config).unwrap();
    let node = BasicNode {
        addr: addr.to_string(),
    };
    let mut client = factory.new_client(target, &node).await;
    let request = VoteRequest::new(openraft::impls::Vote::new(1, candidate), None);
    client.vote(request, RPCOption::new(ttl)).await
}

/// A vote from `local` to `target`, speaking for itself.
async fn vote(
    config: Config,
    local: u64,
    target: u64,
    addr: SocketAddr,
) -> Result<VoteResponse<KvConfig>, RPCError<KvConfig>> {
    vote_as(config, local, target, addr, local, Duration::from_secs(5)).await
}

/// The error of a call that must fail, as text (`Display` and `Debug` both, so that a check
/// finds the reason wherever the error keeps it).
fn refused(
    transport: Transport,
    what: &str,
    result: Result<VoteResponse<KvConfig>, RPCError<KvConfig>>,
) -> (RPCError<KvConfig>, String) {
    match result {
        Ok(resp) => panic!("{transport:?}: {what}: the call succeeded: {resp:?}"),
        Err(err) => {
            let text = format!("{err} | {err:?}");
            eprintln!("{transport:?}: {what}: {text}");
            (err, text)
        }
    }
}

/// A client the server refused during the handshake. The client's side of a TLS 1.3
/// handshake completes before the server has checked the client certificate; the client
/// waits for the server's first word, so the refusal is still a failed connect,
/// `Unreachable`, and the error names the server's alert.
fn assert_our_certificate_refused(
    transport: Transport,
    what: &str,
    err: &RPCError<KvConfig>,
    text: &str,
    alert: &str,
) {
    assert!(
        matches!(err, RPCError::Unreachable(_)),
        "{transport:?}: {what}: expected Unreachable, got {err:?}"
    );
    assert!(
        text.contains(&format!("the server refused our certificate: {alert}")),
        "{transport:?}: {what}: the error does not name the reason ({alert}): {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_cluster_replicates() {
    for transport in common::transports() {
        let c = Cluster::voters(transport, 3).await;
        assert!(
            c.net.config(1).tls().is_some(),
            "the test cluster runs without TLS"
        );
        let leader = c.node(1);
        for i in 0..5 {
            leader
                .write(format!("key{i}"), format!("value{i}"))
                .await
                .unwrap();
        }
        let target = leader.sm.last_applied().unwrap().index;
        for id in 2..=3 {
            c.await_applied(id, target).await;
        }
        let reference = leader.sm.dump();
        assert_eq!(reference.len(), 5, "{transport:?}");
        for id in 2..=3 {
            assert_eq!(
                c.node(id).sm.dump(),
                reference,
                "{transport:?}: node {id} differs"
            );
        }
        c.shutdown().await;
    }
}

// A server refusing a client: the client sees the handshake fail with the server's alert
// named, and the server logs the reason. These
// tests run on a current-thread runtime so that the server's log can be read (see `Logs`).
#[tokio::test]
async fn foreign_ca_is_refused_both_ways() {
    let (logs, _guard) = Logs::capture();
    for transport in common::transports() {
        let ours = named_ca("raftwire cluster CA");
        // Another CA, and an impostor that copies our CA's name (but not its key).
        let (theirs, impostor) = (named_ca("some other CA"), named_ca("raftwire cluster CA"));
        let valid = Validity::default();
        let mut server = start(2, config(transport, identity(&ours, &ours, 2, valid))).await;
        let addr = server.addr();

        // The control: a client of our CA is served.
        vote(config(transport, identity(&ours, &ours, 1, valid)), 1, 2, addr)
            .await
            .unwrap();

        // A client whose identity another CA signed (it trusts ours): the server refuses it.
        for (foreign, check, alert) in [
            (&theirs, "UnknownIssuer", "UnknownCA"),
            (&impostor, "BadSignature", "DecryptError"),
        ] {
            logs.clear();
            let client = config(transport, identity(&ours, foreign, 1, valid));
            let what = format!("client with an identity from a foreign CA ({check})");
            let (err, text) = refused(transport, &what, vote(client, 1, 2, addr).await);
            assert_our_certificate_refused(transport, &what, &err, &text, alert);
            let line = logs
                .line(&format!("{transport:?}"), &["refusing a client certificate"])
                .await;
            assert!(line.contains(check), "{transport:?}: {what}: {line}");
        }

        // A server whose identity another CA signed: the client refuses it.
        for (foreign, check) in [(&theirs, "UnknownIssuer"), (&impostor, "BadSignature")] {
            let mut bad = start(2, config(transport, identity(&ours, foreign, 2, valid))).await;
            let client = config(transport, identity(&ours, &ours, 1, valid));
            let what = format!("server with an identity from a foreign CA ({check})");
            let (err, text) = refused(transport, &what, vote(client, 1, 2, bad.addr()).await);
            assert!(
                matches!(err, RPCError::Unreachable(_)),
                "{transport:?}: {what}: expected Unreachable, got {err:?}"
            );
            assert!(text.contains(check), "{transport:?}: {what}: {text}");
            bad.stop().await.unwrap();
        }
        server.stop().await.unwrap();
    }
}

#[tokio::test]
async fn expired_and_not_yet_valid_certificates_are_refused() {
    let (logs, _guard) = Logs::capture();
    let days = time::Duration::days;
    let cases = [
        (
            "expired",
            Validity {
                from: days(-2),
                until: days(-1),
            },
            "certificate expired",
        ),
        (
            "not yet valid",
            Validity {
                from: days(1),
                until: days(2),
            },
            "certificate not valid yet",
        ),
    ];
    for transport in common::transports() {
        let ca = ca();
        let good = Validity::default();
        let mut server = start(2, config(transport, identity(&ca, &ca, 2, good))).await;
        vote(
            config(transport, identity(&ca, &ca, 1, good)),
            1,
            2,
            server.addr(),
        )
        .await
        .unwrap();
        for (name, validity, check) in cases {
            // As the server's identity: the client's own check names the reason.
            let mut bad_server = start(2, config(transport, identity(&ca, &ca, 2, validity))).await;
            let client = config(transport, identity(&ca, &ca, 1, good));
            let what = format!("{name} server certificate");
            let (err, text) = refused(transport, &what, vote(client, 1, 2, bad_server.addr()).await);
            assert!(
                matches!(err, RPCError::Unreachable(_)),
                "{transport:?}: {what}: expected Unreachable, got {err:?}"
            );
            assert!(text.contains(check), "{transport:?}: {what}: {text}");
            bad_server.stop().await.unwrap();

            // As the client's identity: the server refuses it and logs why.
            logs.clear();
            let client = config(transport, identity(&ca, &ca, 1, validity));
            let what = format!("{name} client certificate");
            let (err, text) = refused(transport, &what, vote(client, 1, 2, server.addr()).await);
            // rustls answers both an expired and a not yet valid certificate with this alert.
            assert_our_certificate_refused(transport, &what, &err, &text, "CertificateExpired");
            let line = logs
                .line(&format!("{transport:?}"), &["refusing a client certificate"])
                .await;
            assert!(line.contains(check), "{transport:?}: {what}: {line}");
        }
        server.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_with_another_nodes_certificate_is_refused() {
    for transport in common::transports() {
        let ca = ca();
        let good = Validity::default();
        // Node 3, reached by a client that means to reach node 2 there (a stale address).
        let mut server = start(3, config(transport, identity(&ca, &ca, 3, good))).await;
        let client = config(transport, identity(&ca, &ca, 1, good));

        // The control: a client that means to reach node 3 at that address is served.
        vote(client.clone(), 1, 3, server.addr()).await.unwrap();

        let what = "node 3's certificate where node 2 was expected";
        let (err, text) = refused(transport, what, vote(client, 1, 2, server.addr()).await);
        assert!(
            matches!(err, RPCError::Unreachable(_)),
            "{transport:?}: {what}: expected Unreachable, got {err:?}"
        );
        assert!(
            text.contains("refused the server's certificate")
                && text.contains("expected node 2")
                && text.contains("[3]"),
            "{transport:?}: {what}: {text}"
        );
        server.stop().await.unwrap();
    }
}

#[tokio::test]
async fn allow_peers_refuses_other_nodes() {
    let (logs, _guard) = Logs::capture();
    for transport in common::transports() {
        let ca = ca();
        let good = Validity::default();
        let tls = identity(&ca, &ca, 2, good).allow_peers([1]);
        let mut server = start(2, config(transport, tls)).await;

        vote(
            config(transport, identity(&ca, &ca, 1, good)),
            1,
            2,
            server.addr(),
        )
        .await
        .unwrap();

        logs.clear();
        let client = config(transport, identity(&ca, &ca, 3, good));
        let what = "node 3 calling a server that allows only node 1";
        let (err, text) = refused(transport, what, vote(client, 3, 2, server.addr()).await);
        assert_our_certificate_refused(transport, what, &err, &text, "AccessDenied");
        let line = logs.line(&format!("{transport:?}"), &["refusing a client"]).await;
        assert!(
            line.contains("node 3 is not among the peers this server accepts ({1})"),
            "{transport:?}: {what}: {line}"
        );
        server.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_may_not_speak_for_another() {
    for transport in common::transports() {
        let ca = ca();
        let good = Validity::default();
        let mut server = start(2, config(transport, identity(&ca, &ca, 2, good))).await;
        let client = config(transport, identity(&ca, &ca, 3, good));
        let ttl = Duration::from_secs(5);

        // The control: node 3 campaigning for itself is answered.
        vote_as(client.clone(), 3, 2, server.addr(), 3, ttl)
            .await
            .unwrap();

        let what = "node 3 asking votes for node 1";
        let result = vote_as(client, 3, 2, server.addr(), 1, ttl).await;
        let (err, text) = refused(transport, what, result);
        assert!(
            matches!(err, RPCError::Unreachable(_)),
            "{transport:?}: {what}: expected Unreachable, got {err:?}"
        );
        assert!(
            text.contains("belongs to node 3") && text.contains("speaks for node 1"),
            "{transport:?}: {what}: {text}"
        );
        server.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_and_tls_do_not_mix_and_fail_fast() {
    let ttl = Duration::from_secs(10);
    for transport in common::transports() {
        let plaintext = match Config::builder()
            .transport(transport)
            .insecure_plaintext()
            .build()
        {
            Ok(config) => config,
            Err(e) => {
                // QUIC always encrypts: no plaintext client to try.
                assert_ne!(
                    transport.name(),
                    "grpc",
                    "gRPC must allow the plaintext opt-in: {e}"
                );
                eprintln!("{transport:?}: no plaintext mode ({e})");
                continue;
            }
        };
        let ca = ca();
        let good = Validity::default();
        let mut tls_server = start(2, config(transport, identity(&ca, &ca, 2, good))).await;
        let started = Instant::now();
        let result = vote_as(plaintext.clone(), 1, 2, tls_server.addr(), 1, ttl).await;
        let what = "plaintext client, TLS server";
        let (err, _) = refused(transport, what, result);
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{transport:?}: {what}: failed only after {:?}: {err:?}",
            started.elapsed()
        );
        assert!(
            !matches!(err, RPCError::Timeout(_)),
            "{transport:?}: {what}: a timeout, not a clean failure: {err:?}"
        );
        tls_server.stop().await.unwrap();

        // And the other way round.
        let mut plain_server = start(2, plaintext).await;
        let started = Instant::now();
        let client = config(transport, identity(&ca, &ca, 1, good));
        let result = vote_as(client, 1, 2, plain_server.addr(), 1, ttl).await;
        let what = "TLS client, plaintext server";
        let (err, _) = refused(transport, what, result);
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{transport:?}: {what}: failed only after {:?}: {err:?}",
            started.elapsed()
        );
        assert!(
            !matches!(err, RPCError::Timeout(_)),
            "{transport:?}: {what}: a timeout, not a clean failure: {err:?}"
        );
        plain_server.stop().await.unwrap();
    }
}

#[test]
fn bad_tls_material_is_reported_at_load_time() {
    let ca = ca();
    let valid = Validity::default();
    let (one, two) = (ca.issue(1, &[], valid).unwrap(), ca.issue(2, &[], valid).unwrap());
    let ca_pem = ca.cert_pem().as_bytes();

    TlsConfig::from_pem(ca_pem, one.cert_pem.as_bytes(), one.key_pem.as_bytes()).unwrap();

    let err = TlsConfig::from_pem(ca_pem, one.cert_pem.as_bytes(), two.key_pem.as_bytes()).unwrap_err();
    assert!(matches!(err, TlsError::KeyMismatch(_)), "{err:?}");
    assert!(err.to_string().contains("does not match"), "{err}");

    // A key file that holds a certificate, not a key.
    let err = TlsConfig::from_pem(ca_pem, one.cert_pem.as_bytes(), one.cert_pem.as_bytes()).unwrap_err();
    assert!(
        matches!(err, TlsError::Pem { what, .. } if what.contains("key")),
        "{err:?}"
    );
    assert!(err.to_string().contains("private key"), "{err}");

    // A certificate file that holds a key, not a certificate.
    let err = TlsConfig::from_pem(ca_pem, one.key_pem.as_bytes(), one.key_pem.as_bytes()).unwrap_err();
    assert!(
        matches!(err, TlsError::Pem { what, .. } if what.contains("certificate")),
        "{err:?}"
    );
    assert!(err.to_string().contains("no certificate found"), "{err}");

    // A CA bundle that holds nothing.
    let err = TlsConfig::from_pem(b"", one.cert_pem.as_bytes(), one.key_pem.as_bytes()).unwrap_err();
    assert!(err.to_string().contains("CA bundle"), "{err}");

    // A certificate without a node identity (a CA certificate has none).
    let err = TlsConfig::from_pem(ca_pem, ca_pem, one.key_pem.as_bytes()).unwrap_err();
    assert!(
        matches!(err, TlsError::NodeId(ref ids) if ids.is_empty()),
        "{err:?}"
    );

    // A file that is not there names the path.
    let err = TlsConfig::from_pem_files("/nonexistent/ca.pem", "/nonexistent/n.pem", "/nonexistent/n.key")
        .unwrap_err();
    assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
}

/// The base64 lines of a PEM body, long enough to be unmistakable.
fn pem_body_lines(pem: &str) -> Vec<&str> {
    pem.lines()
        .filter(|l| !l.starts_with("-----") && l.len() >= 16)
        .collect()
}

fn assert_no_key(what: &str, debug: &str, key_pem: &str) {
    assert!(!debug.contains("PRIVATE KEY"), "{what} prints a PEM key: {debug}");
    let lines = pem_body_lines(key_pem);
    assert!(!lines.is_empty(), "the key PEM has no body: {key_pem}");
    for line in lines {
        assert!(!debug.contains(line), "{what} prints key material: {debug}");
        assert!(
            !debug.contains(&line[..16]),
            "{what} prints part of the key: {debug}"
        );
    }
}

#[test]
fn debug_output_never_contains_a_key() {
    let ca = ca();
    let node: NodeCertificate = ca.issue(1, &[], Validity::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    ca.write(dir.path()).unwrap();
    let ca_key = std::fs::read_to_string(dir.path().join("ca.key")).unwrap();

    let tls = TlsConfig::from_pem(
        ca.cert_pem().as_bytes(),
        node.cert_pem.as_bytes(),
        node.key_pem.as_bytes(),
    )
    .unwrap();
    let client_cert = ca.issue_client("ops", Validity::default()).unwrap();
    let client_key = client_cert.key_pem().to_string();
    let client = ClientTls::from_pem(
        ca.cert_pem().as_bytes(),
        client_cert.cert_pem().as_bytes(),
        client_key.as_bytes(),
    )
    .unwrap();
    let debugs = [
        ("TlsConfig", format!("{tls:?}"), &node.key_pem),
        ("TlsConfig (alternate)", format!("{tls:#?}"), &node.key_pem),
        ("NodeCertificate", format!("{node:?}"), &node.key_pem),
        ("NodeCertificate (alternate)", format!("{node:#?}"), &node.key_pem),
        ("CertificateAuthority", format!("{ca:?}"), &ca_key),
        ("CertificateAuthority (alternate)", format!("{ca:#?}"), &ca_key),
        ("ClientTls", format!("{client:?}"), &client_key),
        ("ClientTls (alternate)", format!("{client:#?}"), &client_key),
        ("ClientCertificate", format!("{client_cert:?}"), &client_key),
    ];
    for (what, debug, key) in &debugs {
        assert_no_key(what, debug, key);
    }
    // The redaction is visible rather than silent.
    assert!(debugs[0].1.contains("redacted"), "{}", debugs[0].1);
    assert!(debugs[2].1.contains("redacted"), "{}", debugs[2].1);

    // Nor does a Config that carries the identity, on any transport.
    for transport in common::transports() {
        let config = config(transport, tls.clone());
        assert_no_key(
            &format!("{transport:?} Config"),
            &format!("{config:?}"),
            &node.key_pem,
        );
    }
}

fn raftwire(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_raftwire"))
        .args(args)
        .env("RAFTWIRE_LOG", "error")
        .output()
        .unwrap()
}

/// Runs `raftwire` and returns its stdout; panics unless it succeeded.
fn raftwire_ok(args: &[&str]) -> String {
    let out = raftwire(args);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "raftwire {args:?} failed ({}): {stdout}{stderr}",
        out.status
    );
    stdout.into_owned()
}

/// Runs `raftwire` and returns its stderr; panics unless it failed.
fn raftwire_fails(args: &[&str]) -> String {
    let out = raftwire(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "raftwire {args:?} succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(stderr.contains("error"), "raftwire {args:?}: {stderr}");
    stderr
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn inspect_json(path: &Path) -> serde_json::Value {
    let line = raftwire_ok(&["certs", "inspect", path.to_str().unwrap(), "--json"]);
    assert_eq!(line.trim().lines().count(), 1, "not one line: {line}");
    serde_json::from_str(line.trim()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certs_command_makes_a_working_cluster() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("certs");
    let d = dir.to_str().unwrap();

    let stdout = raftwire_ok(&[
        "certs",
        "init",
        "--out",
        d,
        "--nodes",
        "1,2,3",
        "--hosts",
        "localhost,127.0.0.1",
        "--days",
        "30",
    ]);
    for file in ["ca.pem", "ca.key", "node-1.pem", "node-2.key", "node-3.pem"] {
        assert!(stdout.contains(file), "init does not report {file}: {stdout}");
    }
    for file in ["ca.key", "node-1.key", "node-2.key", "node-3.key"] {
        assert_eq!(mode(&dir.join(file)), 0o600, "{file}");
    }
    assert_eq!(
        mode(&dir.join("node-1.pem")) & 0o077,
        0o044,
        "certificates are readable"
    );

    // A second init refuses, and leaves the CA alone.
    let ca_before = std::fs::read(dir.join("ca.key")).unwrap();
    let stderr = raftwire_fails(&["certs", "init", "--out", d, "--nodes", "1"]);
    assert!(
        stderr.contains("ca.key") && stderr.contains("--force"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(dir.join("ca.key")).unwrap(), ca_before);

    let info = inspect_json(&dir.join("node-2.pem"));
    assert_eq!(info["node_id"], 2, "{info}");
    assert_eq!(info["is_ca"], false, "{info}");
    let sans: BTreeSet<&str> = info["sans"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(
        sans,
        BTreeSet::from(["DNS:node-2.raftwire", "DNS:localhost", "IP:127.0.0.1"]),
        "{info}"
    );
    let ca_info = inspect_json(&dir.join("ca.pem"));
    assert_eq!(ca_info["is_ca"], true, "{ca_info}");
    assert_eq!(ca_info["node_id"], serde_json::Value::Null, "{ca_info}");
    assert_eq!(info["issuer"], ca_info["subject"], "{info} {ca_info}");

    let table = raftwire_ok(&["certs", "inspect", dir.join("node-1.pem").to_str().unwrap()]);
    assert!(
        table.contains("node-1.raftwire") && table.contains("valid ("),
        "{table}"
    );
    let stderr = raftwire_fails(&["certs", "inspect", dir.join("node-1.key").to_str().unwrap()]);
    assert!(stderr.contains("private key"), "{stderr}");
    let stderr = raftwire_fails(&["certs", "inspect", dir.join("missing.pem").to_str().unwrap()]);
    assert!(stderr.contains("missing.pem"), "{stderr}");

    // One more node from the same CA; not twice.
    let stdout = raftwire_ok(&[
        "certs",
        "add-node",
        "--dir",
        d,
        "--node",
        "4",
        "--hosts",
        "127.0.0.1",
    ]);
    assert!(stdout.contains("node-4.pem"), "{stdout}");
    assert_eq!(mode(&dir.join("node-4.key")), 0o600);
    assert_eq!(inspect_json(&dir.join("node-4.pem"))["node_id"], 4);
    let stderr = raftwire_fails(&["certs", "add-node", "--dir", d, "--node", "4"]);
    assert!(
        stderr.contains("node-4.pem") && stderr.contains("--force"),
        "{stderr}"
    );
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let stderr = raftwire_fails(&[
        "certs",
        "add-node",
        "--dir",
        empty.to_str().unwrap(),
        "--node",
        "5",
    ]);
    assert!(stderr.contains("ca.pem"), "{stderr}");

    // Nodes 1, 2 (from init) and 4 (from add-node), loading their identities from the files.
    for transport in common::transports() {
        let ids = [1, 2, 4];
        let mut nodes = BTreeMap::new();
        for id in ids {
            let tls = TlsConfig::from_pem_files(
                dir.join("ca.pem"),
                dir.join(format!("node-{id}.pem")),
                dir.join(format!("node-{id}.key")),
            )
            .unwrap();
            assert_eq!(tls.node_id(), id);
            nodes.insert(id, start(id, config(transport, tls)).await);
        }
        let n1 = &nodes[&1];
        demo::initialize_alone(n1).await.unwrap();
        for id in [2, 4] {
            n1.raft.add_learner(id, nodes[&id].node(), true).await.unwrap();
        }
        n1.raft
            .change_membership(BTreeSet::from(ids), false)
            .await
            .unwrap();
        n1.write("from-files", "replicated").await.unwrap();
        let target = n1.sm.last_applied().unwrap().index;
        for id in [2, 4] {
            demo::await_applied(&nodes[&id], target).await.unwrap();
            assert_eq!(
                nodes[&id].sm.get("from-files").as_deref(),
                Some(&b"replicated"[..]),
                "{transport:?}: node {id}"
            );
        }
        for (_, mut node) in nodes {
            node.stop().await.unwrap();
        }
    }
}

// ---- Raw TLS peers, for certificates `TlsConfig` itself refuses to load. ----

/// A raw TLS server for `transport` presenting `cert` to anyone, keeping every connection
/// open for a while; its address.
async fn raw_server(
    transport: Transport,
    cert: &NodeCertificate,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let mut crypto = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(der_chain(&cert.cert_pem), der_key(&cert.key_pem))
        .unwrap();
    crypto.alpn_protocols = vec![alpn(transport)];
    if transport.name() != "quic" {
        let listener = tokio::net::TcpListener::bind(loopback()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(crypto));
        let task = tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let stream = acceptor.accept(tcp).await;
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    drop(stream);
                });
            }
        });
        (addr, task)
    } else {
        raw_quic_server(crypto)
    }
}

#[cfg(not(feature = "quic"))]
fn raw_quic_server(_: rustls::ServerConfig) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    panic!("QUIC is not compiled in")
}

#[cfg(feature = "quic")]
fn raw_quic_server(crypto: rustls::ServerConfig) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    {
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(crypto).unwrap();
        let endpoint =
            quinn::Endpoint::server(quinn::ServerConfig::with_crypto(Arc::new(crypto)), loopback()).unwrap();
        let addr = endpoint.local_addr().unwrap();
        let task = tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                tokio::spawn(async move {
                    let conn = incoming.await;
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    drop(conn);
                });
            }
        });
        (addr, task)
    }
}

fn raw_client_crypto(
    transport: Transport,
    ca: &CertificateAuthority,
    cert: &NodeCertificate,
) -> rustls::ClientConfig {
    raw_client_crypto_pem(transport, ca, Some((&cert.cert_pem, &cert.key_pem)))
}

fn raw_client_crypto_pem(
    transport: Transport,
    ca: &CertificateAuthority,
    identity: Option<(&str, &str)>,
) -> rustls::ClientConfig {
    raw::client_crypto_pem(transport, ca.cert_pem(), identity)
}

/// How a raw client presenting `cert` to node `target` at `addr` was refused: the TLS alert
/// (gRPC), or the QUIC connection error. Panics if it is not refused.
async fn raw_client_refused(
    transport: Transport,
    ca: &CertificateAuthority,
    cert: &NodeCertificate,
    addr: SocketAddr,
    target: u64,
) -> String {
    use tokio::io::AsyncReadExt;
    use tokio::io::AsyncWriteExt;
    let crypto = raw_client_crypto(transport, ca, cert);
    let name = raftwire::node_dns_name(target);
    let refusal = if transport.name() != "quic" {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(crypto));
        let server_name = rustls::pki_types::ServerName::try_from(name).unwrap();
        match connector.connect(server_name, tcp).await {
            // TLS 1.3: the server reads our certificate after our side is done.
            Ok(mut stream) => {
                let _ = stream.write_all(b"PRI * HTTP/2.0\r\n\r\n").await;
                let mut buf = [0u8; 64];
                match tokio::time::timeout(Duration::from_secs(3), stream.read(&mut buf)).await {
                    Ok(Err(e)) => format!("{e}"),
                    other => panic!("{transport:?}: the server did not refuse: {other:?}"),
                }
            }
            Err(e) => format!("{e}"),
        }
    } else {
        raw_quic_client_refused(crypto, addr, &name).await
    };
    eprintln!("{transport:?}: raw client refused: {refusal}");
    refusal
}

#[cfg(not(feature = "quic"))]
async fn raw_quic_client_refused(_: rustls::ClientConfig, _: SocketAddr, _: &str) -> String {
    panic!("QUIC is not compiled in")
}

/// The TLS alert and reason of the QUIC close that refused this client.
#[cfg(feature = "quic")]
async fn raw_quic_client_refused(crypto: rustls::ClientConfig, addr: SocketAddr, name: &str) -> String {
    let transport = Transport::Quic;
    {
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(crypto).unwrap();
        let endpoint = quinn::Endpoint::client(loopback()).unwrap();
        let connecting = endpoint
            .connect_with(quinn::ClientConfig::new(Arc::new(crypto)), addr, name)
            .unwrap();
        let error = match connecting.await {
            Ok(conn) => tokio::time::timeout(Duration::from_secs(3), conn.closed())
                .await
                .expect("the server did not refuse"),
            Err(e) => e,
        };
        match error {
            quinn::ConnectionError::ConnectionClosed(close) => {
                let code = u64::from(close.error_code);
                assert!(
                    (0x100..0x200).contains(&code),
                    "{transport:?}: not a TLS alert: {close:?}"
                );
                format!(
                    "alert {}: {}",
                    code - 0x100,
                    String::from_utf8_lossy(&close.reason)
                )
            }
            other => panic!("{transport:?}: not closed by the server's TLS stack: {other:?}"),
        }
    }
}

#[tokio::test]
async fn certificates_naming_several_nodes_or_a_wildcard_are_refused() {
    let (logs, _guard) = Logs::capture();
    let ca = ca();
    let valid = Validity::default();
    // Node 1's certificate that also names node 2, and one with a wildcard name.
    let cases = [
        (
            "two node names",
            ca.issue(1, &["node-2.raftwire".to_string()], valid).unwrap(),
        ),
        (
            "a wildcard name",
            ca.issue(1, &["*.raftwire".to_string()], valid).unwrap(),
        ),
    ];

    // As a node's own identity: refused at load time.
    let ca_pem = ca.cert_pem().as_bytes();
    let (two, wildcard) = (&cases[0].1, &cases[1].1);
    let err = TlsConfig::from_pem(ca_pem, two.cert_pem.as_bytes(), two.key_pem.as_bytes()).unwrap_err();
    assert!(
        matches!(err, TlsError::NodeId(ref ids) if ids == &[1, 2]),
        "{err:?}"
    );
    let err =
        TlsConfig::from_pem(ca_pem, wildcard.cert_pem.as_bytes(), wildcard.key_pem.as_bytes()).unwrap_err();
    assert!(
        matches!(err, TlsError::Wildcard(ref names) if names == &["*.raftwire"]),
        "{err:?}"
    );
    assert!(err.to_string().contains("wildcard"), "{err}");

    for transport in common::transports() {
        let mut server = start(2, config(transport, identity(&ca, &ca, 2, valid))).await;
        for (what, cert) in &cases {
            // Presented by a client: the server refuses it and logs why.
            logs.clear();
            raw_client_refused(transport, &ca, cert, server.addr(), 2).await;
            let line = logs.line(&format!("{transport:?}"), &["refusing a client"]).await;
            assert!(
                line.contains("exactly one node"),
                "{transport:?}: client with {what}: {line}"
            );

            // Presented by a server: a client that means to reach node 2 refuses it, though
            // the certificate passes the name check for node-2.raftwire.
            let (addr, raw) = raw_server(transport, cert).await;
            let client = config(transport, identity(&ca, &ca, 3, valid));
            let what = format!("server with {what}");
            let (err, text) = refused(transport, &what, vote(client, 3, 2, addr).await);
            assert!(
                matches!(err, RPCError::Unreachable(_)),
                "{transport:?}: {what}: expected Unreachable, got {err:?}"
            );
            assert!(
                text.contains("refused the server's certificate") && text.contains("exactly one node"),
                "{transport:?}: {what}: {text}"
            );
            raw.abort();
        }
        server.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_nodes_certificate_is_an_error_at_start_up() {
    let ca = ca();
    for transport in common::transports() {
        // Node 2 configured with node 3's identity.
        let wrong = config(transport, ca.tls_config(3).unwrap());
        let err = NetworkFactory::new(2, wrong.clone())
            .err()
            .expect("the factory starts");
        assert!(
            matches!(
                &err,
                raftwire::ConfigError::IdentityMismatch { node_id: 2, certificate_names }
                    if certificate_names == &["node-3.raftwire"]
            ),
            "{transport:?}: {err:?}"
        );
        assert!(
            err.to_string().contains("node-3.raftwire"),
            "{transport:?}: {err}"
        );

        // A Raft of node 2 (with a correct factory), served with node 3's identity.
        let network = NetworkFactory::new(2, config(transport, ca.tls_config(2).unwrap())).unwrap();
        let raft = openraft::Raft::new(
            2,
            demo::raft_config(),
            network,
            raftwire::kv::LogStore::default(),
            raftwire::kv::StateMachine::default(),
        )
        .await
        .unwrap();
        let err = raftwire::Server::builder(raft.clone(), wrong)
            .bind(loopback())
            .await
            .expect_err("the server starts");
        assert!(
            matches!(
                err,
                raftwire::ServerError::Config(raftwire::ConfigError::IdentityMismatch { node_id: 2, .. })
            ),
            "{transport:?}: {err:?}"
        );
        assert!(
            err.to_string().contains("node-3.raftwire"),
            "{transport:?}: {err}"
        );
        raft.shutdown().await.unwrap();
    }
}

#[cfg(feature = "quic")]
#[tokio::test]
async fn quic_refusals_do_not_disclose_the_allow_list_or_the_clock() {
    let (logs, _guard) = Logs::capture();
    let transport = Transport::Quic;
    let ca = ca();
    let valid = Validity::default();
    let tls = identity(&ca, &ca, 2, valid).allow_peers([4242, 5151]);
    let mut server = start(2, config(transport, tls)).await;
    // Digits of a Unix timestamp (or any long number) in a reason would be the server's clock.
    let long_number = regex::Regex::new(r"[0-9]{6,}").unwrap();

    let days = time::Duration::days;
    let cases = [
        ("a node outside the allow-list", 3, valid, "4242"),
        (
            "an expired certificate",
            4242,
            Validity {
                from: days(-2),
                until: days(-1),
            },
            "verification time",
        ),
        (
            "a certificate not yet valid",
            4242,
            Validity {
                from: days(1),
                until: days(2),
            },
            "verification time",
        ),
    ];
    for (what, id, validity, logged) in cases {
        logs.clear();
        let cert = ca.issue(id, &[], validity).unwrap();
        let reason = raw_client_refused(transport, &ca, &cert, server.addr(), 2).await;
        assert!(
            !reason.contains("4242") && !reason.contains("5151") && !long_number.is_match(&reason),
            "{what}: the close reason discloses details: {reason}"
        );
        assert!(
            reason.contains("certificate"),
            "{what}: the close reason says nothing: {reason}"
        );
        // The details are the server's to log.
        let line = logs.line("quic", &["refusing a client", logged]).await;
        assert!(line.contains("WARN"), "{what}: {line}");
    }
    server.stop().await.unwrap();
}

// ---- Client identities: client certificates speak no Raft. ----

/// A client certificate is refused on every Raft RPC on every transport, at the handshake,
/// and the server logs why; so is a client without a certificate. The control, a node
/// certificate making the same calls, is answered (if only with an error about the empty
/// message), so the refusal is the certificate's doing.
#[tokio::test]
async fn a_client_certificate_is_refused_on_every_raft_rpc() {
    let (logs, _guard) = Logs::capture();
    let ca = ca();
    let valid = Validity::default();
    let node = ca.issue(1, &[], valid).unwrap();
    let ops = ca.issue_client("ops", valid).unwrap();
    for transport in common::transports() {
        let mut server = start(2, config(transport, identity(&ca, &ca, 2, valid))).await;
        let addr = server.addr();
        for rpc in RAFT_RPCS {
            let what = format!("{transport:?} {}", rpc.0);
            let control = raw_client_crypto(transport, &ca, &node);
            let answer = raw_rpc(transport, control, addr, 2, rpc).await;
            assert!(answer.is_ok(), "{what}: node 1 is not answered: {answer:?}");

            logs.clear();
            let client = raw_client_crypto_pem(transport, &ca, Some((ops.cert_pem(), ops.key_pem())));
            let err = raw_rpc(transport, client, addr, 2, rpc)
                .await
                .expect_err(&format!("{what}: a client certificate is answered"));
            assert!(err.contains("AccessDenied"), "{what}: {err}");
            assert!(
                !err.contains("client-ops"),
                "{what}: the refusal discloses details: {err}"
            );
            let line = logs.line(&what, &["refusing a client"]).await;
            assert!(
                line.contains("WARN")
                    && line.contains("a client certificate (client-ops.raftwire) may not speak Raft"),
                "{what}: {line}"
            );

            let err = raw_rpc(
                transport,
                raw_client_crypto_pem(transport, &ca, None),
                addr,
                2,
                rpc,
            )
            .await
            .expect_err(&format!("{what}: a client without a certificate is answered"));
            assert!(err.contains("CertificateRequired"), "{what}: {err}");
        }
        server.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certs_add_client_issues_a_client_identity() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("certs");
    let d = dir.to_str().unwrap();
    raftwire_ok(&["certs", "init", "--out", d, "--nodes", "1"]);

    let stdout = raftwire_ok(&["certs", "add-client", "--dir", d, "--name", "ops", "--days", "30"]);
    let (pem, key) = (dir.join("client-ops.pem"), dir.join("client-ops.key"));
    assert!(
        stdout.contains("client-ops.pem") && stdout.contains("client-ops.key"),
        "{stdout}"
    );
    assert_eq!(mode(&key), 0o600);
    assert_eq!(mode(&pem) & 0o077, 0o044, "certificates are readable");

    let info = inspect_json(&pem);
    assert_eq!(info["client_name"], "ops", "{info}");
    assert_eq!(info["node_id"], serde_json::Value::Null, "{info}");
    assert_eq!(
        info["sans"],
        serde_json::json!(["DNS:client-ops.raftwire"]),
        "{info}"
    );
    assert_eq!(info["is_ca"], false, "{info}");
    assert_eq!(
        info["issuer"],
        inspect_json(&dir.join("ca.pem"))["subject"],
        "{info}"
    );
    let node_info = inspect_json(&dir.join("node-1.pem"));
    assert_eq!(node_info["client_name"], serde_json::Value::Null, "{node_info}");
    let table = raftwire_ok(&["certs", "inspect", pem.to_str().unwrap()]);
    assert!(table.contains("role        client ops"), "{table}");
    let table = raftwire_ok(&["certs", "inspect", dir.join("node-1.pem").to_str().unwrap()]);
    assert!(table.contains("role        node 1"), "{table}");

    // The files load as a client identity, and as no node identity.
    let client = ClientTls::from_pem_files(dir.join("ca.pem"), &pem, &key).unwrap();
    assert_eq!(client.name(), "ops");
    let err = TlsConfig::from_pem_files(dir.join("ca.pem"), &pem, &key).unwrap_err();
    assert!(matches!(err, TlsError::ClientNotNode(_)), "{err:?}");

    // Not twice, unless forced.
    let before = std::fs::read(&pem).unwrap();
    let stderr = raftwire_fails(&["certs", "add-client", "--dir", d, "--name", "ops"]);
    assert!(
        stderr.contains("client-ops.pem") && stderr.contains("--force"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&pem).unwrap(), before);
    raftwire_ok(&["certs", "add-client", "--dir", d, "--name", "ops", "--force"]);
    assert_ne!(std::fs::read(&pem).unwrap(), before, "--force reissues");
    assert_eq!(mode(&key), 0o600);

    // Bad names are refused before anything is written; so is a directory without a CA.
    let listing = || {
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let files = listing();
    for bad in ["Ops", "../ops", "-ops", "ops-", "", "a_b", &"a".repeat(64)] {
        let name = format!("--name={bad}");
        let stderr = raftwire_fails(&["certs", "add-client", "--dir", d, &name]);
        assert!(stderr.contains("invalid client name"), "{bad:?}: {stderr}");
    }
    assert_eq!(listing(), files);
    assert!(!tmp.path().join("client-ops.pem").exists());
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let stderr = raftwire_fails(&[
        "certs",
        "add-client",
        "--dir",
        empty.to_str().unwrap(),
        "--name",
        "ops",
    ]);
    assert!(stderr.contains("ca.pem"), "{stderr}");

    // A node certificate may not carry a client's name.
    let stderr = raftwire_fails(&[
        "certs",
        "add-node",
        "--dir",
        d,
        "--node",
        "2",
        "--hosts",
        "client-ops.raftwire",
    ]);
    assert!(stderr.contains("client identity"), "{stderr}");
}
