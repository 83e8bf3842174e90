//! A client connection that has already heard from the server.
//!
//! Under TLS 1.3 a client's side of the handshake is done before the server has checked the
//! client's certificate; a server that refuses it answers with an alert. An HTTP/2 server
//! speaks first (its SETTINGS frame), so waiting for its first bytes before handing the
//! connection to hyper tells the two apart: the first read returns either data (we were
//! accepted) or the alert, as a rustls error that names the reason. Without the wait, hyper's
//! first write races the alert and often sees only a broken pipe.

use std::io;
use std::pin::Pin;
use std::task::Context;
use std::task::Poll;

use bytes::Buf;
use bytes::Bytes;
use tokio::io::AsyncRead;
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWrite;
use tokio::io::ReadBuf;

/// A stream whose first bytes were read ahead; reads return those before the rest.
pub(crate) struct Primed<IO> {
    head: Bytes,
    io: IO,
}

/// Waits for the server's first bytes on `io` (the caller bounds the wait). A server that
/// closes the connection without a word is an error, as is the alert of a refusal.
pub(crate) async fn prime<IO: AsyncRead + Unpin>(mut io: IO) -> io::Result<Primed<IO>> {
    let mut buf = vec![0u8; 4096];
    let n = io.read(&mut buf).await?;
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the server closed the connection before sending anything (a refused \
             certificate or a connection over the server's limits)",
        ));
    }
    buf.truncate(n);
    Ok(Primed {
        head: Bytes::from(buf),
        io,
    })
}

impl<IO: AsyncRead + Unpin> AsyncRead for Primed<IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.head.has_remaining() {
            let n = this.head.len().min(buf.remaining());
            buf.put_slice(&this.head[..n]);
            this.head.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Primed<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    #[tokio::test]
    async fn the_bytes_read_ahead_come_first_then_the_rest() {
        let (mut server, client) = tokio::io::duplex(64);
        server.write_all(b"hello ").await.unwrap();
        let mut primed = prime(client).await.unwrap();
        server.write_all(b"world").await.unwrap();
        drop(server);
        let mut all = String::new();
        primed.read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "hello world");
    }

    #[tokio::test]
    async fn a_server_that_closes_without_a_word_is_an_error() {
        let (server, client) = tokio::io::duplex(64);
        drop(server);
        let err = prime(client).await.err().expect("an error");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
