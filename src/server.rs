//! Serves a `Raft` to its peers on the configured transport.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use openraft::Raft;
use openraft::storage::RaftStateMachine;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::config::Transport;
use crate::error::ServerError;
use crate::snapshot::SnapshotData;
use crate::snapshot::SnapshotSink;
use crate::types::RaftWireConfig;

/// How long [`Server::shutdown`] lets open calls finish before closing their connections.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// A running raftwire server; see [`Server::builder`].
///
/// Dropping it without [`Server::shutdown`] stops it abruptly.
#[derive(Debug)]
pub struct Server {
    local_addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ServerError>>,
}

/// Configures and starts a [`Server`].
pub struct ServerBuilder<C: RaftWireConfig, SM: RaftStateMachine<C>> {
    raft: Raft<C, SM>,
    config: Config,
    sink: Arc<dyn SnapshotSink<SM::SnapshotData>>,
}

impl Server {
    /// Starts configuring a server for `raft`. Incoming snapshots are received into
    /// `SnapshotData::default()`; see [`ServerBuilder::snapshot_sink`] for other data types.
    pub fn builder<C, SM>(raft: Raft<C, SM>) -> ServerBuilder<C, SM>
    where
        C: RaftWireConfig,
        SM: RaftStateMachine<C>,
        SM::SnapshotData: SnapshotData + Default,
    {
        let sink = || async { Ok(SM::SnapshotData::default()) };
        ServerBuilder {
            raft,
            config: Config::default(),
            sink: Arc::new(sink),
        }
    }

    /// The address the server listens on (with the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, lets open calls finish for a short grace period, then closes every
    /// connection.
    pub async fn shutdown(mut self) -> Result<(), ServerError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match tokio::time::timeout(SHUTDOWN_GRACE, &mut self.task).await {
            Ok(Ok(result)) => result,
            Ok(Err(join)) => Err(ServerError::Serve(join.to_string())),
            Err(_) => {
                // Long-lived replication streams from peers never end by themselves.
                self.task.abort();
                Ok(())
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl<C, SM> ServerBuilder<C, SM>
where
    C: RaftWireConfig,
    SM: RaftStateMachine<C>,
    SM::SnapshotData: SnapshotData,
{
    /// The transport and limits to serve with; use the same config as the factory.
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// Where incoming snapshots are written: called once per received snapshot.
    pub fn snapshot_sink(mut self, sink: impl SnapshotSink<SM::SnapshotData>) -> Self {
        self.sink = Arc::new(sink);
        self
    }

    /// Binds `addr` (port 0 picks a free port) and starts serving in a background task.
    pub async fn bind(self, addr: SocketAddr) -> Result<Server, ServerError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind {
                addr: addr.to_string(),
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| ServerError::Bind {
            addr: addr.to_string(),
            source,
        })?;
        let (tx, rx) = oneshot::channel::<()>();
        let transport = self.config.transport;
        let task = match self.config.transport {
            #[cfg(feature = "grpc")]
            Transport::Grpc => {
                tokio::spawn(serve_grpc(self.raft, self.sink, self.config, listener, rx))
            }
        };
        tracing::info!(%local_addr, transport = transport.name(), "raftwire server listening");
        Ok(Server {
            local_addr,
            shutdown: Some(tx),
            task,
        })
    }
}

#[cfg(feature = "grpc")]
async fn serve_grpc<C, SM>(
    raft: Raft<C, SM>,
    sink: Arc<dyn SnapshotSink<SM::SnapshotData>>,
    config: Config,
    listener: tokio::net::TcpListener,
    shutdown: oneshot::Receiver<()>,
) -> Result<(), ServerError>
where
    C: RaftWireConfig,
    SM: RaftStateMachine<C>,
    SM::SnapshotData: SnapshotData,
{
    use crate::grpc::pb::raft_server::RaftServer;
    let service = RaftServer::new(crate::grpc::RaftService::new(raft, sink))
        .max_decoding_message_size(config.max_message_size)
        .max_encoding_message_size(config.max_message_size);
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(16 << 20))
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .layer(tower::util::MapResponseLayer::new(
            crate::grpc::remap_oversize,
        ))
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, async {
            let _ = shutdown.await;
        })
        .await
        .map_err(|e| ServerError::Serve(e.to_string()))
}
