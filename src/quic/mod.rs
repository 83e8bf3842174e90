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
use bytes::BytesMut;
use quinn::VarInt;
use tokio::io::AsyncReadExt;

pub(crate) use client::Connector;
pub(crate) use server::serve;

use crate::codec;
use crate::codec::ErrorCode;
use crate::codec::FrameDecoder;
use crate::codec::FrameError;
use crate::codec::Message;
use crate::config::Config;
use crate::config::CongestionControl;
use crate::config::QuicTuning;
use crate::types::RaftWireConfig;

/// raftwire's ALPN protocol id on QUIC.
pub(crate) const ALPN: &[u8] = b"raftwire/1";

/// The transport parameters both sides use.
fn transport_config(t: &QuicTuning) -> quinn::TransportConfig {
    let mut tc = quinn::TransportConfig::default();
    let varint = |v: u64| VarInt::from_u64(v).unwrap_or(VarInt::MAX);
    tc.stream_receive_window(varint(t.stream_receive_window))
        .receive_window(varint(t.receive_window))
        .send_window(t.send_window)
        .initial_mtu(t.initial_mtu.max(1200))
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
    Ok(socket.into())
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

/// Why reading a frame from a stream failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    #[error("stream failed: {0}")]
    Stream(#[from] std::io::Error),
    #[error("stream ended inside a frame ({0} bytes buffered)")]
    Truncated(usize),
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// Reads whole frames from a receive stream into one buffer; a frame's body is split off that
/// buffer without copying, and only the current frame's size is ever reserved.
pub(crate) struct FrameReader {
    recv: quinn::RecvStream,
    buf: BytesMut,
    decoder: FrameDecoder,
    /// Bytes read are added here (a client's, per peer; a no-op otherwise).
    received: metrics::Counter,
}

impl FrameReader {
    pub(crate) fn new(recv: quinn::RecvStream, max_len: usize) -> Self {
        FrameReader {
            recv,
            buf: BytesMut::with_capacity(4096),
            decoder: FrameDecoder::new(max_len),
            received: metrics::Counter::noop(),
        }
    }

    /// Adds every byte read to `received`.
    pub(crate) fn counted(mut self, received: metrics::Counter) -> Self {
        self.received = received;
        self
    }

    /// The next frame as (request id, message); `None` when the peer finished the stream at a
    /// frame boundary.
    pub(crate) async fn next<C: RaftWireConfig>(&mut self) -> Result<Option<(u64, Message<C>)>, ReadError> {
        loop {
            if let Some((header, body)) = self.decoder.decode(&mut self.buf)? {
                return Ok(Some((header.request_id, codec::decode::<C>(&header, body)?)));
            }
            if self.buf.capacity() == self.buf.len() {
                self.buf.reserve(4096);
            }
            match self.recv.read_buf(&mut self.buf).await? {
                0 => {
                    return match self.buf.len() {
                        0 => Ok(None),
                        n => Err(ReadError::Truncated(n)),
                    };
                }
                n => self.received.increment(n as u64),
            }
        }
    }

    /// Also refuses control requests longer than `max` from their frame header (see
    /// [`FrameDecoder::with_control_limit`]).
    pub(crate) fn with_control_limit(mut self, max: usize) -> Self {
        self.decoder = std::mem::replace(&mut self.decoder, FrameDecoder::new(0)).with_control_limit(max);
        self
    }

    /// Tells the peer to stop sending on this stream, with `code`.
    pub(crate) fn stop(&mut self, c: ErrorCode) {
        let _ = self.recv.stop(code(c));
    }
}

/// The sending half of a stream, reset (never finished) when dropped unfinished.
///
/// quinn finishes a dropped `SendStream`, so the peer would see a clean end after whatever
/// frames made it: a cancelled or failed sender must not look like a complete one.
pub(crate) struct Outgoing {
    send: quinn::SendStream,
    finished: bool,
    /// Bytes written are added here (a client's, per peer; a no-op otherwise).
    sent: metrics::Counter,
}

impl Outgoing {
    pub(crate) fn new(send: quinn::SendStream) -> Self {
        Outgoing {
            send,
            finished: false,
            sent: metrics::Counter::noop(),
        }
    }

    /// Adds every byte written to `sent`.
    pub(crate) fn counted(mut self, sent: metrics::Counter) -> Self {
        self.sent = sent;
        self
    }

    /// Encodes `msg` and writes it as one vectored write of its chunks (entry payloads and
    /// snapshot data go out as the `Bytes` they are, uncopied). Not cancel-safe: a write
    /// dropped halfway leaves a partial frame, so the stream must then be abandoned.
    pub(crate) async fn write<C: RaftWireConfig>(
        &mut self,
        request_id: u64,
        msg: &Message<C>,
        max_len: usize,
    ) -> Result<usize, WriteError> {
        let mut chunks: Vec<Bytes> = Vec::with_capacity(4);
        let size = codec::encode(request_id, msg, max_len, &mut chunks)?;
        self.send.write_all_chunks(&mut chunks).await?;
        self.sent.increment(size as u64);
        Ok(size)
    }

    /// Ends the stream cleanly: everything written is complete.
    pub(crate) fn finish(&mut self) {
        self.finished = true;
        let _ = self.send.finish();
    }
}

impl Drop for Outgoing {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.send.reset(code(ErrorCode::Aborted));
        }
    }
}

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

/// Why writing a frame failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WriteError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("stream write failed: {0}")]
    Stream(#[from] quinn::WriteError),
}

/// The largest frame body a config allows (the codec's limit), with room for the header.
fn max_frame(config: &Config) -> usize {
    config.max_message_size
}
