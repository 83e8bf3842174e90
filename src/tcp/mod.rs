//! The TCP transport: raftwire's frame codec over TLS 1.3 on TCP.
//!
//! A connection carries one exchange at a time (a call, a replication session or a snapshot
//! transfer), each side ending its part with an `End` frame; a connection whose exchange
//! ends any other way is closed, so an abandoned exchange never looks complete. Clients keep
//! separate connections per peer for replication, for heartbeats and votes, and for
//! snapshots (none waits behind another), and reuse a connection once its exchange ended
//! cleanly. Frames go out with vectored writes: entry payloads and snapshot data are never
//! copied in user space (rustls encrypts them straight from their buffers).

mod client;
mod server;

use std::io;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::task::Context;
use std::task::Poll;

use bytes::Bytes;
use tokio::io::AsyncRead;
use tokio::io::AsyncWrite;
use tokio::io::AsyncWriteExt;
use tokio::io::ReadBuf;
use tokio::io::ReadHalf;
use tokio::io::WriteHalf;

pub(crate) use client::Connector;
pub(crate) use server::serve;

use crate::codec;
use crate::codec::ErrorCode;
use crate::config::Config;
use crate::framed::FrameReader;
use crate::framed::Framing;
use crate::framed::Outgoing;
use crate::framed::RecvHalf;
use crate::framed::SendHalf;

/// raftwire's ALPN protocol id on TCP (gRPC on the same port asks for `h2`).
pub(crate) const ALPN: &[u8] = b"raftwire-tcp/1";

/// The ALPN protocol id on TCP where large frames travel compressed (zstd).
pub(crate) const ALPN_ZSTD: &[u8] = b"raftwire-tcp/1+zstd";

/// The one ALPN protocol id `config` speaks on TCP, client and server alike.
pub(crate) fn alpn(config: &Config) -> &'static [u8] {
    Framing::of(config).alpn(ALPN, ALPN_ZSTD)
}

/// A byte stream a TLS connection gives: client or server side.
pub(crate) trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for S {}

/// An `End` frame: ends one side of an exchange, and is the server's greeting on a new
/// connection.
fn end_frame() -> Bytes {
    Bytes::from_static(&codec::END_FRAME)
}

/// Where the halves of a connection meet again after an exchange: once both sides ended
/// cleanly, the connection goes `home` (back to a client's pool, or to the server's loop for
/// the next exchange); otherwise it is dropped, which closes it.
struct Reunion<S: Stream> {
    read: Option<ReadHalf<S>>,
    write: Option<WriteHalf<S>>,
    spoiled: bool,
    home: Option<Box<dyn FnOnce(S) + Send>>,
}

impl<S: Stream> Reunion<S> {
    fn deposit(&mut self, read: Option<ReadHalf<S>>, write: Option<WriteHalf<S>>, clean: bool) {
        if !clean {
            self.spoiled = true;
        }
        if self.spoiled {
            // Dropped: once the other half goes too, the connection closes.
            self.read = None;
            self.write = None;
            return;
        }
        self.read = self.read.take().or(read);
        self.write = self.write.take().or(write);
        if let (Some(r), Some(w)) = (&self.read, &self.write)
            && r.is_pair_of(w)
            && let (Some(r), Some(w), Some(home)) = (self.read.take(), self.write.take(), self.home.take())
        {
            home(r.unsplit(w));
        }
    }
}

/// Splits `stream` for one exchange; it goes to `home` if the exchange ends cleanly on both
/// sides.
fn halves<S: Stream>(stream: S, home: impl FnOnce(S) + Send + 'static) -> (TcpSend<S>, TcpRecv<S>) {
    let (r, w) = tokio::io::split(stream);
    let reunion = Arc::new(Mutex::new(Reunion {
        read: None,
        write: None,
        spoiled: false,
        home: Some(Box::new(home)),
    }));
    (
        TcpSend {
            half: Some(w),
            clean: false,
            reunion: reunion.clone(),
        },
        TcpRecv {
            half: Some(r),
            clean: false,
            reunion,
        },
    )
}

/// The receiving half of an exchange on a TCP connection.
pub(crate) struct TcpRecv<S: Stream> {
    half: Option<ReadHalf<S>>,
    clean: bool,
    reunion: Arc<Mutex<Reunion<S>>>,
}

impl<S: Stream> AsyncRead for TcpRecv<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().half.as_mut() {
            Some(h) => Pin::new(h).poll_read(cx, buf),
            None => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }
}

impl<S: Stream> RecvHalf for TcpRecv<S> {
    const END_FRAMES: bool = true;

    fn stop(&mut self, _code: ErrorCode) {
        // The connection is closed after a refused exchange; nothing to tell here.
        self.clean = false;
    }

    fn ended(&mut self, leftover: usize) {
        // Exchanges alternate: nothing may follow the peer's end before our answer.
        self.clean = leftover == 0;
    }
}

impl<S: Stream> Drop for TcpRecv<S> {
    fn drop(&mut self) {
        let half = self.half.take();
        self.reunion
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .deposit(half, None, self.clean);
    }
}

/// The sending half of an exchange on a TCP connection.
pub(crate) struct TcpSend<S: Stream> {
    half: Option<WriteHalf<S>>,
    clean: bool,
    reunion: Arc<Mutex<Reunion<S>>>,
}

impl<S: Stream> TcpSend<S> {
    fn half(&mut self) -> io::Result<&mut WriteHalf<S>> {
        self.half
            .as_mut()
            .ok_or_else(|| io::ErrorKind::NotConnected.into())
    }
}

/// Writes every chunk with vectored writes (no copy before rustls encrypts), then flushes
/// (rustls holds encrypted records until then).
async fn write_all<W: AsyncWrite + Unpin>(w: &mut W, chunks: &[Bytes]) -> io::Result<()> {
    /// Slices handed to one `writev`; more wait for the next call.
    const MAX_SLICES: usize = 64;
    let (mut idx, mut offset) = (0, 0);
    while idx < chunks.len() {
        let slices: Vec<IoSlice<'_>> = chunks[idx..]
            .iter()
            .take(MAX_SLICES)
            .enumerate()
            .map(|(i, c)| IoSlice::new(if i == 0 { &c[offset..] } else { &c[..] }))
            .collect();
        let mut n = w.write_vectored(&slices).await?;
        if n == 0 && slices.iter().any(|s| !s.is_empty()) {
            return Err(io::ErrorKind::WriteZero.into());
        }
        // Advance past what was written.
        while idx < chunks.len() {
            let left = chunks[idx].len() - offset;
            if n < left {
                offset += n;
                break;
            }
            n -= left;
            idx += 1;
            offset = 0;
            if n == 0 && idx < chunks.len() && !chunks[idx].is_empty() {
                break;
            }
        }
    }
    w.flush().await
}

impl<S: Stream> SendHalf for TcpSend<S> {
    async fn write_chunks(&mut self, chunks: &mut [Bytes]) -> io::Result<()> {
        write_all(self.half()?, chunks).await
    }

    async fn finish(&mut self) -> io::Result<()> {
        write_all(self.half()?, &[end_frame()]).await?;
        self.clean = true;
        Ok(())
    }

    async fn write_last(&mut self, chunks: &mut Vec<Bytes>) -> io::Result<()> {
        chunks.push(end_frame());
        write_all(self.half()?, chunks).await?;
        self.clean = true;
        Ok(())
    }

    fn abort(&mut self) {
        self.clean = false;
    }
}

impl<S: Stream> Drop for TcpSend<S> {
    fn drop(&mut self) {
        let half = self.half.take();
        self.reunion
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .deposit(None, half, self.clean);
    }
}

/// The largest frame body a config allows.
fn max_frame(config: &Config) -> usize {
    config.max_message_size
}

/// Opens an exchange on `stream`: frames out, frames in.
fn exchange<S: Stream>(
    stream: S,
    (framing, max_len): (Framing, usize),
    home: impl FnOnce(S) + Send + 'static,
) -> (Outgoing<TcpSend<S>>, FrameReader<TcpRecv<S>>) {
    let (send, recv) = halves(stream, home);
    framing.open(send, recv, max_len)
}
