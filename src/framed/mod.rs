//! raftwire's frame codec over a byte stream: what the QUIC and TCP transports share.
//!
//! Both carry *exchanges*: a call (vote, append, transfer-leader), a replication session, or a
//! snapshot transfer, each a sequence of frames each way. QUIC gives every exchange a stream
//! of its own, ended by the stream's FIN; a TCP connection carries exchanges one after
//! another, each side ending its part with an [`Kind::End`](crate::codec::Kind::End) frame
//! (a connection that closes anywhere else was abandoned). A transport supplies the two
//! halves of an exchange ([`RecvHalf`], [`SendHalf`]); the reading and writing of frames
//! ([`FrameReader`], [`Outgoing`]), the client's calls ([`client`]) and the server's handling
//! of every request kind ([`server`]) live here once.

pub(crate) mod client;
pub(crate) mod server;

use std::future::Future;
use std::io;

use bytes::Bytes;
use bytes::BytesMut;
use tokio::io::AsyncRead;
use tokio::io::AsyncReadExt;

use crate::codec;
use crate::codec::ErrorCode;
use crate::codec::FrameDecoder;
use crate::codec::FrameError;
use crate::codec::Message;
use crate::types::RaftWireConfig;

/// What the two ends of a connection agreed on beyond the frame format (their ALPN protocol
/// says it): whether large frames travel compressed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Framing {
    #[cfg(feature = "compression")]
    compression: crate::config::Compression,
}

impl Framing {
    /// The framing `config` asks for.
    pub(crate) fn of(config: &crate::config::Config) -> Self {
        let _ = config;
        Framing {
            #[cfg(feature = "compression")]
            compression: config.compression,
        }
    }

    /// The ALPN protocol id for this framing: `plain`, or `zstd` where frames are compressed.
    /// Peers whose settings differ share no protocol, so their TLS handshake fails.
    pub(crate) fn alpn(self, plain: &'static [u8], zstd: &'static [u8]) -> &'static [u8] {
        let _ = zstd;
        #[cfg(feature = "compression")]
        if self.compression.is_on() {
            return zstd;
        }
        plain
    }

    /// One exchange's frame writer and reader over `send` and `recv`.
    pub(crate) fn open<W: SendHalf, R: RecvHalf>(
        self,
        send: W,
        recv: R,
        max_len: usize,
    ) -> (Outgoing<W>, FrameReader<R>) {
        let (send, recv) = (Outgoing::new(send), FrameReader::new(recv, max_len));
        #[cfg(feature = "compression")]
        let (send, recv) = (
            send.compressed(self.compression),
            recv.compressed(self.compression.is_on()),
        );
        (send, recv)
    }
}

/// The receiving half of one exchange.
pub(crate) trait RecvHalf: AsyncRead + Unpin + Send {
    /// Whether the peer ends its part of an exchange with an `End` frame (TCP) rather than
    /// by ending the stream (QUIC). With end frames, the stream ending is never clean.
    const END_FRAMES: bool;

    /// Tells the peer to stop sending, with `code` (QUIC: `STOP_SENDING`; TCP: nothing, the
    /// connection is closed after the exchange).
    fn stop(&mut self, code: ErrorCode);

    /// The peer ended its part cleanly (and nothing followed in `leftover` bytes).
    fn ended(&mut self, leftover: usize) {
        let _ = leftover;
    }
}

/// The sending half of one exchange.
pub(crate) trait SendHalf: Send {
    /// Writes every chunk, in order, without copying them (vectored writes).
    fn write_chunks<'a>(
        &'a mut self,
        chunks: &'a mut [Bytes],
    ) -> impl Future<Output = io::Result<()>> + Send + 'a;

    /// Ends this side of the exchange cleanly: everything written is complete.
    fn finish(&mut self) -> impl Future<Output = io::Result<()>> + Send;

    /// Writes every chunk, then ends this side cleanly (on TCP in one write).
    fn write_last<'a>(
        &'a mut self,
        chunks: &'a mut Vec<Bytes>,
    ) -> impl Future<Output = io::Result<()>> + Send + 'a;

    /// Abandons the exchange, so the peer cannot take what it got for complete (QUIC: reset
    /// the stream; TCP: the connection is closed).
    fn abort(&mut self);
}

/// Why reading a frame failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    #[error("stream failed: {0}")]
    Stream(#[from] io::Error),
    #[error("stream ended inside a frame ({0} bytes buffered)")]
    Truncated(usize),
    #[error("the connection closed in the middle of an exchange")]
    Closed,
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// Why writing a frame failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WriteError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("stream write failed: {0}")]
    Stream(#[from] io::Error),
}

/// Reads whole frames from a receive half into one buffer; a frame's body is split off that
/// buffer without copying, and only the current frame's size is ever reserved.
pub(crate) struct FrameReader<R> {
    recv: R,
    buf: BytesMut,
    decoder: FrameDecoder,
    /// Bytes read are added here (a client's, per peer; a no-op otherwise).
    received: metrics::Counter,
}

impl<R: RecvHalf> FrameReader<R> {
    pub(crate) fn new(recv: R, max_len: usize) -> Self {
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

    /// Also accepts compressed frames when `on` (both ends negotiated compression).
    #[cfg(feature = "compression")]
    pub(crate) fn compressed(mut self, on: bool) -> Self {
        if on {
            self.decoder = std::mem::replace(&mut self.decoder, FrameDecoder::new(0)).with_compression();
        }
        self
    }

    /// Also refuses control requests longer than `max` from their frame header (see
    /// [`FrameDecoder::with_control_limit`]).
    pub(crate) fn with_control_limit(mut self, max: usize) -> Self {
        self.decoder = std::mem::replace(&mut self.decoder, FrameDecoder::new(0)).with_control_limit(max);
        self
    }

    /// The next frame as (request id, message); `None` when the peer ended its part of the
    /// exchange cleanly (an `End` frame, or the stream finished at a frame boundary, as the
    /// half says).
    pub(crate) async fn next<C: RaftWireConfig>(&mut self) -> Result<Option<(u64, Message<C>)>, ReadError> {
        loop {
            if let Some((header, body)) = self.decoder.decode(&mut self.buf)? {
                let msg = codec::decode::<C>(&header, body)?;
                if R::END_FRAMES && matches!(msg, Message::End) {
                    self.recv.ended(self.buf.len());
                    return Ok(None);
                }
                return Ok(Some((header.request_id, msg)));
            }
            if self.buf.capacity() == self.buf.len() {
                self.buf.reserve(4096);
            }
            match self.recv.read_buf(&mut self.buf).await? {
                0 => {
                    return match self.buf.len() {
                        0 if R::END_FRAMES => Err(ReadError::Closed),
                        0 => Ok(None),
                        n => Err(ReadError::Truncated(n)),
                    };
                }
                n => self.received.increment(n as u64),
            }
        }
    }

    /// After the last frame an exchange expects from the peer: reads the end of its part
    /// (with end frames; a finished QUIC stream needs no read). Anything else is an error.
    pub(crate) async fn end<C: RaftWireConfig>(&mut self) -> Result<(), ReadError> {
        if !R::END_FRAMES {
            return Ok(());
        }
        match self.next::<C>().await? {
            None => Ok(()),
            Some((_, msg)) => Err(ReadError::Frame(FrameError::Body {
                kind: msg.kind(),
                source: crate::error::DecodeError::invalid("frame", "expected the end of the exchange"),
            })),
        }
    }

    /// Tells the peer to stop sending on this half, with `code`.
    pub(crate) fn stop(&mut self, c: ErrorCode) {
        self.recv.stop(c);
    }
}

/// The sending half of an exchange, aborted (never ended cleanly) when dropped unfinished: a
/// cancelled or failed sender must not look like a complete one.
pub(crate) struct Outgoing<W: SendHalf> {
    send: W,
    finished: bool,
    /// Bytes written are added here (a client's, per peer; a no-op otherwise).
    sent: metrics::Counter,
    /// Set where compression was negotiated.
    #[cfg(feature = "compression")]
    compressor: Option<codec::Compressor>,
}

impl<W: SendHalf> Outgoing<W> {
    pub(crate) fn new(send: W) -> Self {
        Outgoing {
            send,
            finished: false,
            sent: metrics::Counter::noop(),
            #[cfg(feature = "compression")]
            compressor: None,
        }
    }

    /// Compresses large bulk frames as `setting` says (both ends negotiated it).
    #[cfg(feature = "compression")]
    pub(crate) fn compressed(mut self, setting: crate::config::Compression) -> Self {
        self.compressor = codec::Compressor::new(setting);
        self
    }

    /// Appends `msg` as one frame to `chunks` (compressed where that was negotiated and
    /// pays) and returns its sizes: encoded (what the receiver will hold, which the callers'
    /// byte windows count) and as sent (what the byte counters count).
    fn encode<C: RaftWireConfig>(
        &mut self,
        request_id: u64,
        msg: &Message<C>,
        max_len: usize,
        chunks: &mut Vec<Bytes>,
    ) -> Result<(usize, usize), FrameError> {
        #[cfg(feature = "compression")]
        let start = chunks.len();
        let size = codec::encode(request_id, msg, max_len, chunks)?;
        #[cfg(feature = "compression")]
        if let Some(c) = &mut self.compressor {
            return Ok((size, c.frame(chunks, start, size)?));
        }
        Ok((size, size))
    }

    /// Adds every byte written to `sent`.
    pub(crate) fn counted(mut self, sent: metrics::Counter) -> Self {
        self.sent = sent;
        self
    }

    /// Encodes `msg` and writes it as one vectored write of its chunks (entry payloads and
    /// snapshot data go out as the `Bytes` they are, uncopied). Not cancel-safe: a write
    /// dropped halfway leaves a partial frame, so the exchange must then be abandoned.
    pub(crate) async fn write<C: RaftWireConfig>(
        &mut self,
        request_id: u64,
        msg: &Message<C>,
        max_len: usize,
    ) -> Result<usize, WriteError> {
        let mut chunks: Vec<Bytes> = Vec::with_capacity(4);
        let (size, wire) = self.encode(request_id, msg, max_len, &mut chunks)?;
        self.send.write_chunks(&mut chunks).await?;
        self.sent.increment(wire as u64);
        Ok(size)
    }

    /// Writes every message of `batch` (request id, message) in one vectored write.
    pub(crate) async fn write_batch<C: RaftWireConfig>(
        &mut self,
        batch: &[(u64, Message<C>)],
        max_len: usize,
    ) -> Result<usize, WriteError> {
        let mut chunks: Vec<Bytes> = Vec::with_capacity(batch.len() * 2);
        let (mut size, mut wire) = (0, 0);
        for (id, msg) in batch {
            let (s, w) = self.encode(*id, msg, max_len, &mut chunks)?;
            size += s;
            wire += w;
        }
        self.send.write_chunks(&mut chunks).await?;
        self.sent.increment(wire as u64);
        Ok(size)
    }

    /// Writes `msg` like [`Outgoing::write`] as the last frame of this side, which it ends.
    pub(crate) async fn write_last<C: RaftWireConfig>(
        &mut self,
        request_id: u64,
        msg: &Message<C>,
        max_len: usize,
    ) -> Result<usize, WriteError> {
        let mut chunks: Vec<Bytes> = Vec::with_capacity(5);
        let (size, wire) = self.encode(request_id, msg, max_len, &mut chunks)?;
        self.send.write_last(&mut chunks).await?;
        self.finished = true;
        self.sent.increment(wire as u64);
        Ok(size)
    }

    /// Ends this side cleanly: everything written is complete.
    pub(crate) async fn finish(&mut self) -> Result<(), WriteError> {
        if self.finished {
            return Ok(());
        }
        self.send.finish().await?;
        self.finished = true;
        Ok(())
    }
}

impl<W: SendHalf> Drop for Outgoing<W> {
    fn drop(&mut self) {
        if !self.finished {
            self.send.abort();
        }
    }
}
