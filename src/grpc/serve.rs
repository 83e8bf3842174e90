//! The gRPC accept loop: plain TCP, or TLS with the caller's node identity attached to every
//! request.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::StreamExt;
use openraft::storage::RaftStateMachine;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::sync::watch;
use tokio_stream::wrappers::ReceiverStream;

use super::pb::raft_server::RaftServer;
use crate::accept::Accepted;
pub(crate) use crate::accept::Conn;
pub(crate) use crate::accept::ConnInfo;
use crate::config::Config;
use crate::error::ServerError;
use crate::service::Service;
use crate::snapshot::SnapshotData;
use crate::types::RaftWireConfig;

impl<IO> tonic::transport::server::Connected for Conn<IO> {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info
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
    let compressed = super::compressed(&config);
    let service = RaftServer::new(super::RaftService::new(service, compressed))
        .max_decoding_message_size(config.max_message_size)
        .max_encoding_message_size(config.max_message_size);
    // Only replication and snapshot messages travel compressed (written by the client's
    // `body::Framer`); replies and unary calls never do. A caller whose setting differs is
    // refused from its `raftwire-compression` header before any message is decoded
    // (`RaftService::caller`).
    #[cfg(feature = "compression")]
    let service = match compressed {
        true => service.accept_compressed(tonic::codec::CompressionEncoding::Zstd),
        false => service,
    };
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
