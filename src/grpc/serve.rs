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
use tokio::sync::mpsc;
use tokio::sync::watch;
use tokio_stream::wrappers::ReceiverStream;

use super::pb::raft_server::RaftServer;
use crate::accept::Accepted;
use crate::config::Config;
use crate::error::ServerError;
use crate::limits::PeerSlot;
use crate::service::Service;
use crate::snapshot::SnapshotData;
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

/// Where the gRPC server's connections come from.
pub(crate) enum Incoming {
    /// Plain TCP (an explicit opt-in): every connection of this listener.
    Plain(TcpListener),
    /// TLS connections the shared accept loop handed over (see `accept`).
    Tls(mpsc::Receiver<Accepted>),
}

/// Serves `service` over gRPC on `incoming` until `shutdown` fires; then stops accepting,
/// gives open calls the configured grace period and closes every connection.
pub(crate) async fn serve<C, SM>(
    service: Arc<Service<C, SM>>,
    config: Config,
    incoming: Incoming,
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
    let serving = match incoming {
        Incoming::Plain(listener) => {
            // Accepted sockets do not inherit the builder's nodelay: without it, small replies
            // wait on Nagle's algorithm and the peer's delayed ACK.
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(move |conn| {
                conn.map(|tcp| {
                    let _ = tcp.set_nodelay(true);
                    let addr = tcp.peer_addr().unwrap_or_else(|_| ([0, 0, 0, 0], 0).into());
                    Conn::new(tcp, ConnInfo { node_id: None, addr }, kill.clone(), None)
                })
            });
            router.serve_with_incoming_shutdown(incoming, stop).boxed()
        }
        Incoming::Tls(accepted) => {
            let incoming = ReceiverStream::new(accepted).map(move |a| {
                let info = ConnInfo {
                    node_id: Some(a.node_id),
                    addr: a.addr,
                };
                Ok::<_, io::Error>(Conn::new(a.stream, info, kill.clone(), Some(a.slot)))
            });
            router.serve_with_incoming_shutdown(incoming, stop).boxed()
        }
    };
    let mut serving = serving;
    let mut shutdown = shutdown;
    tokio::select! {
        result = &mut serving => return result.map_err(|e| ServerError::Serve(e.to_string())),
        _ = shutdown.wait_for(|s| *s) => {}
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
