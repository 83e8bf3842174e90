//! The TLS-over-TCP accept loop every TCP transport shares. Transports listening on the same
//! port (gRPC and the framed TCP transport) are told apart by the protocol the client asked
//! for in its TLS handshake (ALPN); each gets its accepted connections through a channel.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Context;
use std::task::Poll;
use std::time::Duration;

use tokio::io::AsyncRead;
use tokio::io::AsyncWrite;
use tokio::io::ReadBuf;

use tokio::net::TcpListener;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::limits::Admission;
use crate::limits::PeerSlot;
use crate::tls;

/// A server-side TLS stream over TCP.
pub(crate) type TlsStream = tokio_rustls::server::TlsStream<TcpStream>;

/// A connection whose handshake succeeded: a certified node, counted against its limit.
pub(crate) struct Accepted {
    pub(crate) stream: TlsStream,
    pub(crate) node_id: u64,
    pub(crate) addr: SocketAddr,
    /// Counts this connection against its node's limit while it lives.
    pub(crate) slot: PeerSlot,
}

/// Where connections go, by the ALPN protocol their handshake settled on. A client that asked
/// for none goes to the route marked as the default (gRPC clients that do not send ALPN).
pub(crate) struct Route {
    pub(crate) alpn: &'static [u8],
    pub(crate) default: bool,
    pub(crate) to: mpsc::Sender<Accepted>,
}

/// Accepts TCP connections until `stop` fires and completes each TLS handshake in its own
/// task (bounded by `timeout`), so a slow or hostile client never holds up the others. At most
/// `max_concurrent_handshakes` run at once: a connection arriving while all are busy is
/// closed at once. A node over `max_connections_per_peer` has its new connection closed
/// after the handshake. When it returns, no handshake is left half made.
pub(crate) async fn accept(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    timeout: Duration,
    admission: Arc<Admission>,
    routes: Arc<Vec<Route>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut handshakes = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|s| *s) => break,
        };
        let (tcp, addr) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        while handshakes.try_join_next().is_some() {}
        let Some(permit) = admission.handshake(addr) else {
            // Dropping the socket closes it: nothing is held for this peer.
            drop(tcp);
            continue;
        };
        let (acceptor, admission, routes) = (acceptor.clone(), admission.clone(), routes.clone());
        // Handshakes are tasks of this loop: stopping the loop stops them too.
        handshakes.spawn(async move {
            let _ = tcp.set_nodelay(true);
            keepalive(&tcp);
            let handshake = tokio::time::timeout(timeout, acceptor.accept(tcp)).await;
            drop(permit);
            let stream = match handshake {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => return tracing::warn!(%addr, "TLS handshake refused: {e}"),
                Err(_) => return tracing::warn!(%addr, "TLS handshake timed out after {timeout:?}"),
            };
            let Some(node_id) = tls::peer_node_id(stream.get_ref().1.peer_certificates()) else {
                // The verifier already refuses certificates without a node id.
                return tracing::warn!(%addr, "TLS peer has no node identity; closing");
            };
            let alpn = stream.get_ref().1.alpn_protocol();
            let Some(route) = routes
                .iter()
                .find(|r| Some(r.alpn) == alpn || (alpn.is_none() && r.default))
            else {
                // rustls refuses a protocol it does not offer; only a client naming none
                // gets here, with no default route.
                return tracing::warn!(%addr, node_id, "TLS client named no protocol (ALPN); closing");
            };
            // Logged by `admit`; dropping the stream closes the connection.
            let Some(slot) = admission.admit(node_id, addr) else {
                return;
            };
            tracing::debug!(%addr, node_id, "TLS connection accepted");
            let _ = route
                .to
                .send(Accepted {
                    stream,
                    node_id,
                    addr,
                    slot,
                })
                .await;
        });
    }
    // Shutting down: no new connection is taken, and none is left half made.
    drop(listener);
    handshakes.shutdown().await;
}

/// Who is calling: attached to every request of a connection.
#[derive(Debug, Clone, Copy)]
// Read by gRPC's request handlers; the TCP transport keeps the caller in its own loop.
#[cfg_attr(not(feature = "grpc"), allow(dead_code))]
pub(crate) struct ConnInfo {
    /// The node id from the caller's verified certificate; `None` on a plaintext server.
    pub(crate) node_id: Option<u64>,
    /// The caller's address.
    pub(crate) addr: SocketAddr,
}

/// A server-side connection that knows its peer and dies when the server's kill switch
/// flips: once the shutdown grace period is over, every read and write fails, so hyper ends
/// the connection (and with it the streams a leader would otherwise keep open forever).
pub(crate) struct Conn<IO> {
    io: IO,
    #[cfg_attr(not(feature = "grpc"), allow(dead_code))]
    pub(crate) info: ConnInfo,
    /// Resolve when the kill switch flips; `None` once they have. One per direction: after a
    /// split, reads and writes are polled by different tasks, and a future wakes only the
    /// task that polled it last.
    killed: [Option<Killed>; 2],
    /// Counts this connection against its node's limit while it lives.
    _slot: Option<PeerSlot>,
}

/// Resolves when a kill switch flips.
type Killed = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The direction a [`Conn`] is polled in.
const READ: usize = 0;
const WRITE: usize = 1;

impl<IO> Conn<IO> {
    pub(crate) fn new(io: IO, info: ConnInfo, kill: watch::Receiver<bool>, slot: Option<PeerSlot>) -> Self {
        let killed = |mut kill: watch::Receiver<bool>| -> Option<Killed> {
            Some(Box::pin(async move {
                let _ = kill.wait_for(|k| *k).await;
            }))
        };
        Conn {
            io,
            info,
            killed: [killed(kill.clone()), killed(kill)],
            _slot: slot,
        }
    }

    /// The connection inside.
    #[cfg_attr(not(feature = "tcp"), allow(dead_code))]
    pub(crate) fn get_ref(&self) -> &IO {
        &self.io
    }

    /// `Err` once the kill switch has flipped; registers the waker of the task polling in
    /// `direction` otherwise.
    fn check(&mut self, cx: &mut Context<'_>, direction: usize) -> io::Result<()> {
        let dead = || io::Error::new(io::ErrorKind::ConnectionAborted, "server shut down");
        let Some(killed) = self.killed[direction].as_mut() else {
            return Err(dead());
        };
        match killed.as_mut().poll(cx) {
            Poll::Ready(()) => {
                // Never polled again once done; the connection stays dead.
                self.killed = [None, None];
                Err(dead())
            }
            Poll::Pending => Ok(()),
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Conn<IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx, READ)?;
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Conn<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx, WRITE)?;
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx, WRITE)?;
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx, WRITE)?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// How long a TCP connection may be silent before the kernel probes it, how often it probes,
/// and how many unanswered probes end it: a peer that vanished without closing (a crashed
/// host, a partition) is noticed within about 25 s even inside a long replication session,
/// which no request deadline covers on the server's side.
const KEEPALIVE: (Duration, Duration, u32) = (Duration::from_secs(10), Duration::from_secs(5), 3);

/// Turns on TCP keepalive probes on `tcp` (see [`KEEPALIVE`]); a socket that refuses them
/// still works, only without the probes.
pub(crate) fn keepalive(tcp: &TcpStream) {
    let (time, interval, retries) = KEEPALIVE;
    let probes = socket2::TcpKeepalive::new()
        .with_time(time)
        .with_interval(interval)
        .with_retries(retries);
    if let Err(e) = socket2::SockRef::from(tcp).set_tcp_keepalive(&probes) {
        tracing::debug!("cannot enable TCP keepalive: {e}");
    }
}
