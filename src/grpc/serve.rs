//! The gRPC accept loop: plain TCP, or TLS with the caller's node identity attached to every
//! request.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Context;
use std::task::Poll;
use std::time::Duration;

use futures::FutureExt;
use futures::StreamExt;
use openraft::storage::RaftStateMachine;
use tokio::io::AsyncRead;
use tokio::io::AsyncWrite;
use tokio::io::ReadBuf;
use tokio::net::TcpListener;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;

use super::pb::raft_server::RaftServer;
use crate::config::Config;
use crate::error::ServerError;
use crate::limits::Admission;
use crate::limits::PeerSlot;
use crate::service::Service;
use crate::snapshot::SnapshotData;
use crate::tls;
use crate::types::RaftWireConfig;

/// Who is calling: attached to every request of a connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnInfo {
    /// The node id from the caller's verified certificate; `None` on a plaintext server.
    pub(crate) node_id: Option<u64>,
    /// The caller's address.
    pub(crate) addr: SocketAddr,
}

/// A server-side connection that knows its peer and dies when the server's kill switch
/// flips: once the shutdown grace period is over, every read and write fails, so hyper ends
/// the connection (and with it the streams a leader would otherwise keep open forever).
struct Conn<IO> {
    io: IO,
    info: ConnInfo,
    killed: Pin<Box<dyn Future<Output = ()> + Send>>,
    /// Counts this connection against its node's limit while it lives.
    _slot: Option<PeerSlot>,
}

impl<IO> Conn<IO> {
    fn new(io: IO, info: ConnInfo, mut kill: watch::Receiver<bool>, slot: Option<PeerSlot>) -> Self {
        let killed = Box::pin(async move {
            let _ = kill.wait_for(|k| *k).await;
        });
        Conn {
            io,
            info,
            killed,
            _slot: slot,
        }
    }

    /// `Err` once the kill switch has flipped; registers the waker otherwise.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.killed.as_mut().poll(cx) {
            Poll::Ready(()) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "server shut down",
            )),
            Poll::Pending => Ok(()),
        }
    }
}

impl<IO> tonic::transport::server::Connected for Conn<IO> {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Conn<IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Conn<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

type TlsStream = tokio_rustls::server::TlsStream<TcpStream>;

/// Accepts TCP connections and completes each TLS handshake in its own task (bounded by
/// `timeout`), so a slow or hostile client never holds up the others. At most
/// `max_concurrent_handshakes` run at once: a connection arriving while all are busy is
/// closed at once. A node over `max_connections_per_peer` has its new connection closed
/// after the handshake.
fn accept_tls(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    timeout: Duration,
    admission: Arc<Admission>,
    kill: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) -> (ReceiverStream<io::Result<Conn<TlsStream>>>, AbortOnDrop) {
    let (tx, rx) = mpsc::channel(64);
    let task = tokio::spawn(async move {
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
            let (acceptor, tx, kill, admission) =
                (acceptor.clone(), tx.clone(), kill.clone(), admission.clone());
            // Handshakes are tasks of this loop: stopping the loop stops them too.
            handshakes.spawn(async move {
                let _ = tcp.set_nodelay(true);
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
                // Logged by `admit`; dropping the stream closes the connection.
                let Some(slot) = admission.admit(node_id, addr) else {
                    return;
                };
                tracing::debug!(%addr, node_id, "TLS connection accepted");
                let info = ConnInfo {
                    node_id: Some(node_id),
                    addr,
                };
                let _ = tx.send(Ok(Conn::new(stream, info, kill, Some(slot)))).await;
            });
        }
        // Shutting down: no new connection is taken, and none is left half made.
        drop(listener);
        handshakes.shutdown().await;
    });
    (ReceiverStream::new(rx), AbortOnDrop(task))
}

/// Stops the accept loop (and so releases the listening port) however `serve` ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl AbortOnDrop {
    /// Waits for the loop to end by itself (it does once shutdown is signalled).
    async fn finished(&mut self) {
        let _ = (&mut self.0).await;
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serves `service` over gRPC on `listener` until `shutdown` fires; then stops accepting,
/// gives open calls the configured grace period and closes every connection.
pub(crate) async fn serve<C, SM>(
    service: Arc<Service<C, SM>>,
    config: Config,
    listener: TcpListener,
    shutdown: watch::Receiver<bool>,
) -> Result<(), ServerError>
where
    C: RaftWireConfig,
    SM: RaftStateMachine<C>,
    SM::SnapshotData: SnapshotData,
{
    let service = RaftServer::new(super::RaftService::new(service))
        .max_decoding_message_size(config.max_message_size)
        .max_encoding_message_size(config.max_message_size);
    let control_limit = config.max_control_message_size;
    let router = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(16 << 20))
        // tonic's own default (none) would override hyper's and leave streams unbounded.
        .max_concurrent_streams(Some(config.max_concurrent_streams))
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .layer(tower::util::MapResponseLayer::new(super::remap_oversize))
        .layer(tower::util::MapRequestLayer::new(move |req| {
            super::limit::limit_control(req, control_limit)
        }))
        .add_service(service);
    let (kill_tx, kill) = watch::channel(false);
    let mut stop = shutdown.clone();
    let stop = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    let (serving, mut accepting) = match &config.tls {
        None => {
            // Accepted sockets do not inherit the builder's nodelay: without it, small replies
            // wait on Nagle's algorithm and the peer's delayed ACK.
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(move |conn| {
                conn.map(|tcp| {
                    let _ = tcp.set_nodelay(true);
                    let addr = tcp.peer_addr().unwrap_or_else(|_| ([0, 0, 0, 0], 0).into());
                    Conn::new(tcp, ConnInfo { node_id: None, addr }, kill.clone(), None)
                })
            });
            (router.serve_with_incoming_shutdown(incoming, stop).boxed(), None)
        }
        Some(tls) => {
            let server_config = tls
                .server_config(b"h2")
                .map_err(|e| ServerError::Serve(e.to_string()))?;
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
            let admission = Admission::new(&config);
            let (incoming, accepting) = accept_tls(
                listener,
                acceptor,
                config.connect_timeout,
                admission,
                kill,
                shutdown.clone(),
            );
            (
                router.serve_with_incoming_shutdown(incoming, stop).boxed(),
                Some(accepting),
            )
        }
    };
    let mut serving = serving;
    let mut shutdown = shutdown;
    tokio::select! {
        result = &mut serving => return result.map_err(|e| ServerError::Serve(e.to_string())),
        _ = shutdown.wait_for(|s| *s) => {}
    }
    if let Some(accepting) = accepting.as_mut() {
        accepting.finished().await;
    }
    // tonic has stopped accepting and asked every connection to close (GOAWAY); calls in
    // flight get the grace period, then every connection is cut.
    let result = match tokio::time::timeout(config.shutdown_grace, &mut serving).await {
        Ok(result) => result,
        Err(_) => {
            tracing::info!(
                "gRPC calls still open after the shutdown grace period; closing their connections"
            );
            let _ = kill_tx.send(true);
            serving.await
        }
    };
    result.map_err(|e| ServerError::Serve(e.to_string()))
}
