//! The gRPC accept loop: plain TCP, or TLS with the caller's node identity attached to every
//! request.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Context;
use std::task::Poll;
use std::time::Duration;

use futures::StreamExt;
use openraft::Raft;
use openraft::storage::RaftStateMachine;
use tokio::io::AsyncRead;
use tokio::io::AsyncWrite;
use tokio::io::ReadBuf;
use tokio::net::TcpListener;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::sync::oneshot;
use tokio_stream::wrappers::ReceiverStream;

use super::pb::raft_server::RaftServer;
use crate::config::Config;
use crate::error::ServerError;
use crate::snapshot::SnapshotData;
use crate::snapshot::SnapshotSink;
use crate::tls;
use crate::types::RaftWireConfig;

/// Who is calling: attached to every request of a TLS connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Caller {
    /// The node id from the caller's verified certificate.
    pub(crate) node_id: u64,
    /// The caller's address.
    pub(crate) addr: SocketAddr,
}

/// A server-side TLS connection that knows its peer.
struct TlsConn {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    caller: Caller,
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = Caller;

    fn connect_info(&self) -> Caller {
        self.caller
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Accepts TCP connections and completes each TLS handshake in its own task (bounded by
/// `timeout`), so a slow or hostile client never holds up the others.
fn accept_tls(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    timeout: Duration,
) -> (ReceiverStream<io::Result<TlsConn>>, AbortOnDrop) {
    let (tx, rx) = mpsc::channel(64);
    let task = tokio::spawn(async move {
        loop {
            let (tcp, addr) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let stream = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => return tracing::warn!(%addr, "TLS handshake refused: {e}"),
                    Err(_) => return tracing::warn!(%addr, "TLS handshake timed out after {timeout:?}"),
                };
                let Some(node_id) = tls::peer_node_id(stream.get_ref().1.peer_certificates()) else {
                    // The verifier already refuses certificates without a node id.
                    return tracing::warn!(%addr, "TLS peer has no node identity; closing");
                };
                tracing::debug!(%addr, node_id, "TLS connection accepted");
                let _ = tx
                    .send(Ok(TlsConn {
                        stream,
                        caller: Caller { node_id, addr },
                    }))
                    .await;
            });
        }
    });
    (ReceiverStream::new(rx), AbortOnDrop(task))
}

/// Stops the accept loop (and so releases the listening port) however `serve` ends, aborted
/// by [`Server::shutdown`](crate::Server::shutdown) included.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serves `raft` over gRPC on `listener` until `shutdown` fires.
pub(crate) async fn serve<C, SM>(
    raft: Raft<C, SM>,
    sink: Arc<dyn SnapshotSink<SM::SnapshotData>>,
    config: Config,
    listener: TcpListener,
    shutdown: oneshot::Receiver<()>,
) -> Result<(), ServerError>
where
    C: RaftWireConfig,
    SM: RaftStateMachine<C>,
    SM::SnapshotData: SnapshotData,
{
    let service = RaftServer::new(super::RaftService::new(raft, sink))
        .max_decoding_message_size(config.max_message_size)
        .max_encoding_message_size(config.max_message_size);
    let router = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(16 << 20))
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .layer(tower::util::MapResponseLayer::new(super::remap_oversize))
        .add_service(service);
    let stop = async {
        let _ = shutdown.await;
    };
    let result = match &config.tls {
        None => {
            // Accepted sockets do not inherit the builder's nodelay: without it, small replies
            // wait on Nagle's algorithm and the peer's delayed ACK.
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|conn| {
                conn.inspect(|tcp| {
                    let _ = tcp.set_nodelay(true);
                })
            });
            router.serve_with_incoming_shutdown(incoming, stop).await
        }
        Some(tls) => {
            let server_config = tls
                .server_config(b"h2")
                .map_err(|e| ServerError::Serve(e.to_string()))?;
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
            let (incoming, _accepting) = accept_tls(listener, acceptor, config.connect_timeout);
            router.serve_with_incoming_shutdown(incoming, stop).await
        }
    };
    result.map_err(|e| ServerError::Serve(e.to_string()))
}
