//! QUIC transport (quinn) with raftwire's framing codec.
//!
//! One connection per peer carries every kind of traffic, each on its own stream: a
//! long-lived bidirectional stream per replication session (pipelined `stream_append`), a
//! short stream per heartbeat, vote or transfer-leader call, and one per snapshot. QUIC
//! streams are flow-controlled independently, so a snapshot or a large batch never delays
//! a heartbeat (heartbeat streams are also sent with a higher priority).

mod client;
mod server;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use quinn::VarInt;

pub(crate) use client::Connector;
pub(crate) use server::serve;

use crate::codec::ErrorCode;
use crate::config::Config;
use crate::config::CongestionControl;
use crate::config::QuicTuning;

/// raftwire's ALPN protocol id on QUIC.
pub(crate) const ALPN: &[u8] = b"raftwire/1";

/// The ALPN protocol id on QUIC where large frames travel compressed (zstd).
pub(crate) const ALPN_ZSTD: &[u8] = b"raftwire/1+zstd";

/// The one ALPN protocol id `config` speaks on QUIC, client and server alike.
fn alpn(config: &Config) -> &'static [u8] {
    crate::framed::Framing::of(config).alpn(ALPN, ALPN_ZSTD)
}

/// The transport parameters both sides use.
fn transport_config(t: &QuicTuning) -> quinn::TransportConfig {
    let mut tc = quinn::TransportConfig::default();
    let varint = |v: u64| VarInt::from_u64(v).unwrap_or(VarInt::MAX);
    tc.stream_receive_window(varint(t.stream_receive_window))
        .receive_window(varint(t.receive_window))
        .send_window(t.send_window)
        .initial_mtu(t.initial_mtu.max(1200))
        .mtu_discovery_config(Some(mtu_discovery(t)))
        .initial_rtt(t.initial_rtt)
        .keep_alive_interval(Some(t.keep_alive_interval))
        .max_idle_timeout(quinn::IdleTimeout::try_from(t.idle_timeout).ok())
        .max_concurrent_bidi_streams(VarInt::from_u32(t.max_concurrent_streams))
        .max_concurrent_uni_streams(VarInt::from_u32(0));
    match t.congestion {
        CongestionControl::Cubic => {
            tc.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()))
        }
        CongestionControl::NewReno => {
            tc.congestion_controller_factory(Arc::new(quinn::congestion::NewRenoConfig::default()))
        }
        CongestionControl::Bbr => {
            tc.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()))
        }
    };
    tc
}

/// Path MTU discovery up to the configured bound (at least the initial MTU).
fn mtu_discovery(t: &QuicTuning) -> quinn::MtuDiscoveryConfig {
    let mut mtud = quinn::MtuDiscoveryConfig::default();
    mtud.upper_bound(t.max_mtu.max(t.initial_mtu).max(1200));
    mtud
}

/// A UDP socket with the requested buffer sizes, bound to `addr`. A smaller size granted by
/// the OS is logged, not fatal.
pub(crate) fn udp_socket(addr: SocketAddr, tuning: &QuicTuning) -> std::io::Result<std::net::UdpSocket> {
    use socket2::Domain;
    use socket2::Protocol;
    use socket2::Socket;
    use socket2::Type;
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    let want = tuning.udp_buffer;
    if let Err(e) = socket.set_recv_buffer_size(want) {
        tracing::warn!("cannot set the UDP receive buffer to {want} bytes: {e}");
    }
    if let Err(e) = socket.set_send_buffer_size(want) {
        tracing::warn!("cannot set the UDP send buffer to {want} bytes: {e}");
    }
    // Linux reports twice the usable size; anything below the request means a sysctl cap.
    for (what, got) in [
        ("receive", socket.recv_buffer_size()?),
        ("send", socket.send_buffer_size()?),
    ] {
        if got < want {
            tracing::warn!(
                "UDP {what} buffer is {got} bytes, below the requested {want} (raise net.core.{}mem_max)",
                if what == "receive" { "r" } else { "w" }
            );
        }
    }
    socket.bind(&addr.into())?;
    let socket: std::net::UdpSocket = socket.into();
    // What the kernel offers for batching datagrams: segmentation offload on send (one
    // syscall for many packets) and coalescing on receive.
    if let Ok(state) = quinn::udp::UdpSocketState::new((&socket).into()) {
        tracing::debug!(
            gso_segments = state.max_gso_segments(),
            gro_segments = state.gro_segments(),
            "QUIC socket bound at {addr}"
        );
    }
    Ok(socket)
}

/// A stream error code: the codec's error codes, plus "done" for a clean stop.
fn code(c: ErrorCode) -> VarInt {
    VarInt::from_u32(c as u32)
}

/// The application close code of a connection the server refuses after the handshake (a
/// peer without a node identity).
pub(crate) const REFUSED: ErrorCode = ErrorCode::Forbidden;

/// The reason a refused connection gives its peer: the details stay in the server's log.
pub(crate) const REFUSED_REASON: &[u8] = b"certificate refused";

/// The TLS alert of a QUIC crypto error code (0x100 + alert), if it is one.
fn tls_alert(code: u64) -> Option<rustls::AlertDescription> {
    (0x100..0x200)
        .contains(&code)
        .then(|| rustls::AlertDescription::from((code - 0x100) as u8))
}

/// Why a connection was refused during or right after its handshake, as the client reads
/// it; `None` for any other way a connection ends.
pub(crate) fn refusal(e: &quinn::ConnectionError) -> Option<String> {
    let reason = |r: &[u8]| match String::from_utf8_lossy(r).trim() {
        "" => String::new(),
        r => format!(" ({r})"),
    };
    match e {
        // Our own TLS stack gave up: we refused the server (its certificate, say).
        quinn::ConnectionError::TransportError(t) => {
            let alert = tls_alert(u64::from(t.code))?;
            Some(if crate::error::is_certificate_alert(alert) {
                format!("we refused the server's certificate: {}", t.reason)
            } else {
                format!("TLS handshake failed ({alert:?}): {}", t.reason)
            })
        }
        // The server's TLS stack sent an alert.
        quinn::ConnectionError::ConnectionClosed(c) => {
            let alert = tls_alert(u64::from(c.error_code))?;
            Some(format!(
                "{}{}",
                crate::error::alert_refusal(alert),
                reason(&c.reason)
            ))
        }
        quinn::ConnectionError::ApplicationClosed(c) if c.error_code == code(REFUSED) => {
            Some(format!("the server refused our certificate{}", reason(&c.reason)))
        }
        _ => None,
    }
}

/// A QUIC stream ends an exchange with its FIN.
impl crate::framed::RecvHalf for quinn::RecvStream {
    const END_FRAMES: bool = false;

    fn stop(&mut self, c: ErrorCode) {
        let _ = quinn::RecvStream::stop(self, code(c));
    }
}

impl crate::framed::SendHalf for quinn::SendStream {
    async fn write_chunks(&mut self, chunks: &mut [Bytes]) -> std::io::Result<()> {
        self.write_all_chunks(chunks).await.map_err(std::io::Error::from)
    }

    async fn finish(&mut self) -> std::io::Result<()> {
        quinn::SendStream::finish(self).map_err(|e| std::io::Error::new(std::io::ErrorKind::BrokenPipe, e))
    }

    async fn write_last(&mut self, chunks: &mut Vec<Bytes>) -> std::io::Result<()> {
        crate::framed::SendHalf::write_chunks(self, chunks).await?;
        crate::framed::SendHalf::finish(self).await
    }

    /// quinn finishes a dropped `SendStream`, so the peer would see a clean end after
    /// whatever frames made it: an abandoned stream is reset instead.
    fn abort(&mut self) {
        let _ = self.reset(code(ErrorCode::Aborted));
    }
}

/// Frames off one QUIC receive stream.
pub(crate) type FrameReader = crate::framed::FrameReader<quinn::RecvStream>;

/// Frames onto one QUIC send stream, reset when dropped unfinished.
pub(crate) type Outgoing = crate::framed::Outgoing<quinn::SendStream>;

/// The endpoint settings both sides use. The stateless-reset key is derived from this node's
/// private key, so it survives a restart: a peer that crashed and came back on the same
/// address answers packets of the old connection with a reset the other side recognizes, and
/// the dead connection is dropped at once instead of after the idle timeout.
pub(crate) fn endpoint_config(tls: Option<&crate::tls::TlsConfig>) -> quinn::EndpointConfig {
    match tls {
        Some(tls) => {
            let key = aws_lc_rs::hmac::Key::new(
                aws_lc_rs::hmac::HMAC_SHA256,
                &tls.derive_secret(b"raftwire quic stateless reset v1"),
            );
            quinn::EndpointConfig::new(Arc::new(key))
        }
        None => quinn::EndpointConfig::default(),
    }
}

/// The largest frame body a config allows (the codec's limit), with room for the header.
fn max_frame(config: &Config) -> usize {
    config.max_message_size
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// The path MTU a connection reaches on loopback (which carries 65535-byte packets) while
    /// streaming data, with `max_mtu` as the discovery bound.
    async fn mtu_reached(max_mtu: u16) -> u16 {
        let ca = crate::certs::CertificateAuthority::generate("mtu test CA").unwrap();
        let tuning = QuicTuning {
            max_mtu,
            ..QuicTuning::default()
        };
        let server_tls = ca.tls_config(1).unwrap();
        let crypto =
            quinn::crypto::rustls::QuicServerConfig::try_from(server_tls.server_config(ALPN).unwrap())
                .unwrap();
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server_config.transport_config(Arc::new(transport_config(&tuning)));
        let socket = udp_socket(([127, 0, 0, 1], 0).into(), &tuning).unwrap();
        let runtime = quinn::default_runtime().unwrap();
        let server = quinn::Endpoint::new(
            endpoint_config(Some(&server_tls)),
            Some(server_config),
            socket,
            runtime.clone(),
        )
        .unwrap();
        let addr = server.local_addr().unwrap();
        let sink = tokio::spawn(async move {
            let conn = server.accept().await.unwrap().await.unwrap();
            let (_send, mut recv) = conn.accept_bi().await.unwrap();
            let _ = recv.read_to_end(usize::MAX).await;
            conn
        });
        let client_tls = ca.tls_config(2).unwrap();
        let crypto =
            quinn::crypto::rustls::QuicClientConfig::try_from(client_tls.client_config(1, ALPN).unwrap())
                .unwrap();
        let mut client_config = quinn::ClientConfig::new(Arc::new(crypto));
        client_config.transport_config(Arc::new(transport_config(&tuning)));
        let socket = udp_socket(([127, 0, 0, 1], 0).into(), &tuning).unwrap();
        let client = quinn::Endpoint::new(endpoint_config(Some(&client_tls)), None, socket, runtime).unwrap();
        let conn = client
            .connect_with(client_config, addr, &crate::tls::node_dns_name(1))
            .unwrap()
            .await
            .unwrap();
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        // Stream data until discovery settles (it probes right after the handshake).
        let chunk = Bytes::from(vec![7u8; 64 << 10]);
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_millis(1500) {
            send.write_all(&chunk).await.unwrap();
            if conn.stats().path.current_mtu >= max_mtu {
                break;
            }
        }
        let reached = conn.stats().path.current_mtu;
        send.finish().unwrap();
        conn.close(0u32.into(), b"done");
        sink.abort();
        reached
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn path_mtu_discovery_stops_at_the_configured_bound() {
        assert_eq!(mtu_reached(QuicTuning::default().max_mtu).await, 1452);
        let jumbo = mtu_reached(8952).await;
        assert!(jumbo > 1452 && jumbo <= 8952, "reached {jumbo}");
    }
}
