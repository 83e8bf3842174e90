//! Raw Raft RPCs over hand-made TLS clients: what a peer that is not raftwire (or holds the
//! wrong certificate) can make a node do. Shared by the TLS tests and the multi-host test.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use raftwire::Transport;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;

/// The certificates of a PEM text.
pub fn der_chain(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}

/// The private key of a PEM text.
pub fn der_key(pem: &str) -> PrivateKeyDer<'static> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).unwrap()
}

/// The crypto provider raftwire uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The ALPN protocol a transport's connections carry.
pub fn alpn(transport: Transport) -> Vec<u8> {
    match transport.name() {
        "grpc" => b"h2".to_vec(),
        "tcp" => b"raftwire-tcp/1".to_vec(),
        _ => b"raftwire/1".to_vec(),
    }
}

/// A raw client trusting the CA certificate `ca_pem` and presenting the certificate and key
/// `identity` (PEM), or no certificate at all.
pub fn client_crypto_pem(
    transport: Transport,
    ca_pem: &str,
    identity: Option<(&str, &str)>,
) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for c in der_chain(ca_pem) {
        roots.add(c).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let mut crypto = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(der_chain(cert), der_key(key))
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    crypto.alpn_protocols = vec![alpn(transport)];
    crypto
}

/// Every Raft RPC: its gRPC method and the QUIC frame kind that opens its stream.
pub const RAFT_RPCS: [(&str, u8); 6] = [
    ("Vote", 1),
    ("PreVote", 2),
    ("AppendEntries", 4),
    ("StreamAppend", 6),
    ("InstallSnapshot", 8),
    ("TransferLeader", 11),
];

/// One raw Raft RPC `rpc` to node `target` at `addr` over `crypto`, with an empty message:
/// `Ok` with what the server answered (any answer, an error included), or `Err` with how the
/// connection was refused (the TLS alert). Panics if neither comes within 3 s.
pub async fn raw_rpc(
    transport: Transport,
    crypto: rustls::ClientConfig,
    addr: SocketAddr,
    target: u64,
    rpc: (&str, u8),
) -> Result<String, String> {
    let attempt = async {
        match transport.name() {
            "grpc" => grpc_rpc(crypto, addr, target, rpc.0).await,
            "tcp" => tcp_rpc(crypto, addr, target, rpc.1).await,
            _ => quic_rpc(crypto, addr, target, rpc.1).await,
        }
    };
    let outcome = tokio::time::timeout(Duration::from_secs(3), attempt)
        .await
        .unwrap_or_else(|_| panic!("{transport:?} {}: neither an answer nor a refusal", rpc.0));
    eprintln!("{transport:?} {}: {outcome:?}", rpc.0);
    outcome
}

#[cfg(not(feature = "grpc"))]
async fn grpc_rpc(_: rustls::ClientConfig, _: SocketAddr, _: u64, _: &str) -> Result<String, String> {
    panic!("gRPC is not compiled in")
}

/// A gRPC call of `method` carrying one empty message, over HTTP/2 on a raw TLS connection.
#[cfg(feature = "grpc")]
async fn grpc_rpc(
    crypto: rustls::ClientConfig,
    addr: SocketAddr,
    target: u64,
    method: &str,
) -> Result<String, String> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(crypto));
    let name = rustls::pki_types::ServerName::try_from(raftwire::node_dns_name(target)).unwrap();
    let tls = connector.connect(name, tcp).await.map_err(|e| e.to_string())?;
    let (mut send, conn) = h2::client::handshake(tls).await.map_err(|e| e.to_string())?;
    let conn = tokio::spawn(conn);
    let request = http::Request::builder()
        .method("POST")
        .uri(format!(
            "https://{}/raftwire.v1.Raft/{method}",
            raftwire::node_dns_name(target)
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let call = async {
        let (response, mut body) = send.send_request(request, false)?;
        // One gRPC message of length 0: not compressed, a u32 length.
        body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true)?;
        response.await
    };
    match call.await {
        Ok(response) => Ok(format!(
            "HTTP {}, grpc-status {:?}",
            response.status(),
            response.headers().get("grpc-status")
        )),
        // The connection's own error carries the server's alert.
        Err(e) => Err(match conn.await {
            Ok(Err(conn)) => format!("{e}; connection: {conn}"),
            _ => e.to_string(),
        }),
    }
}

#[cfg(not(feature = "quic"))]
async fn quic_rpc(_: rustls::ClientConfig, _: SocketAddr, _: u64, _: u8) -> Result<String, String> {
    panic!("QUIC is not compiled in")
}

/// A QUIC stream opened with an empty frame of `kind`, over a raw QUIC connection.
#[cfg(feature = "quic")]
async fn quic_rpc(
    crypto: rustls::ClientConfig,
    addr: SocketAddr,
    target: u64,
    kind: u8,
) -> Result<String, String> {
    // How a connection closed: a TLS alert by name, anything else as quinn says it.
    fn closed(e: quinn::ConnectionError) -> String {
        match e {
            quinn::ConnectionError::ConnectionClosed(close)
                if (0x100..0x200).contains(&u64::from(close.error_code)) =>
            {
                let alert = rustls::AlertDescription::from((u64::from(close.error_code) - 0x100) as u8);
                format!("TLS alert {alert:?}: {}", String::from_utf8_lossy(&close.reason))
            }
            other => other.to_string(),
        }
    }
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(crypto).unwrap();
    // Any local address of the peer's family (the tests reach loopback and namespaced hosts).
    let local: SocketAddr = if addr.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let endpoint = quinn::Endpoint::client(local).unwrap();
    let connecting = endpoint
        .connect_with(
            quinn::ClientConfig::new(Arc::new(crypto)),
            addr,
            &raftwire::node_dns_name(target),
        )
        .unwrap();
    let conn = connecting.await.map_err(closed)?;
    // An 18-byte header: magic, version 1, kind, no flags, body length 0, request id 0.
    let mut frame = b"RW\x01".to_vec();
    frame.push(kind);
    frame.extend_from_slice(&[0; 14]);
    let call = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        send.write_all(&frame).await.map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        recv.read_to_end(1 << 20).await.map_err(|e| e.to_string())
    };
    match call.await {
        Ok(answer) if !answer.is_empty() => Ok(format!("{} bytes", answer.len())),
        Ok(_) => Err("the stream ended without an answer".into()),
        Err(e) => Err(format!("{e}; connection: {}", closed(conn.closed().await))),
    }
}

/// An exchange opened with an empty frame of `kind` (then the end of the exchange), over a
/// raw TLS connection to the TCP transport.
async fn tcp_rpc(
    crypto: rustls::ClientConfig,
    addr: SocketAddr,
    target: u64,
    kind: u8,
) -> Result<String, String> {
    use tokio::io::AsyncReadExt;
    use tokio::io::AsyncWriteExt;
    // How the connection failed: the server's TLS alert by name where it sent one.
    fn failed(e: std::io::Error) -> String {
        match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            Some(rustls::Error::AlertReceived(alert)) => format!("TLS alert {alert:?}"),
            _ => e.to_string(),
        }
    }
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(crypto));
    let name = rustls::pki_types::ServerName::try_from(raftwire::node_dns_name(target)).unwrap();
    let mut tls = connector.connect(name, tcp).await.map_err(failed)?;
    // The server greets an accepted client with an End frame (kind 14).
    let mut greeting = [0u8; 18];
    tls.read_exact(&mut greeting).await.map_err(failed)?;
    assert_eq!(&greeting[..4], b"RW\x01\x0e", "the greeting is an End frame");
    // An 18-byte header: magic, version 1, kind, no flags, body length 0, request id 0.
    let mut frame = b"RW\x01".to_vec();
    frame.push(kind);
    frame.extend_from_slice(&[0; 14]);
    frame.extend_from_slice(&greeting);
    tls.write_all(&frame).await.map_err(failed)?;
    tls.flush().await.map_err(failed)?;
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer).await;
    if answer.is_empty() {
        return Err("the connection ended without an answer".into());
    }
    Ok(format!("{} bytes", answer.len()))
}
