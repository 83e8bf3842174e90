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
    /// Starts configuring a server for `raft` with the same [`Config`] as the node's
    /// [`NetworkFactory`](crate::NetworkFactory). Incoming snapshots are received into
    /// `SnapshotData::default()`; [`Server::builder_with_sink`] serves data types without a
    /// default (a file per snapshot, say).
    pub fn builder<C, SM>(raft: Raft<C, SM>, config: Config) -> ServerBuilder<C, SM>
    where
        C: RaftWireConfig,
        SM: RaftStateMachine<C>,
        SM::SnapshotData: SnapshotData + Default,
    {
        let sink = || async { Ok(SM::SnapshotData::default()) };
        ServerBuilder {
            raft,
            config,
            sink: Arc::new(sink),
        }
    }

    /// Like [`Server::builder`], receiving incoming snapshots into what `sink` creates.
    pub fn builder_with_sink<C, SM>(
        raft: Raft<C, SM>,
        config: Config,
        sink: impl SnapshotSink<SM::SnapshotData>,
    ) -> ServerBuilder<C, SM>
    where
        C: RaftWireConfig,
        SM: RaftStateMachine<C>,
        SM::SnapshotData: SnapshotData,
    {
        ServerBuilder {
            raft,
            config,
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
    /// Where incoming snapshots are written: called once per received snapshot.
    pub fn snapshot_sink(mut self, sink: impl SnapshotSink<SM::SnapshotData>) -> Self {
        self.sink = Arc::new(sink);
        self
    }

    /// Binds `addr` (port 0 picks a free port: TCP for gRPC, UDP for QUIC) and starts serving
    /// in a background task.
    pub async fn bind(self, addr: SocketAddr) -> Result<Server, ServerError> {
        let transport_is_plaintext = self.config.tls.is_none();
        let bind_err = |source| ServerError::Bind {
            addr: addr.to_string(),
            source,
        };
        let (tx, rx) = oneshot::channel::<()>();
        let transport = self.config.transport;
        let (local_addr, task) = match transport {
            #[cfg(feature = "grpc")]
            Transport::Grpc => {
                let listener = tokio::net::TcpListener::bind(addr).await.map_err(bind_err)?;
                let local_addr = listener.local_addr().map_err(bind_err)?;
                (
                    local_addr,
                    tokio::spawn(crate::grpc::serve(
                        self.raft,
                        self.sink,
                        self.config,
                        listener,
                        rx,
                    )),
                )
            }
            #[cfg(feature = "quic")]
            Transport::Quic => {
                let socket = crate::quic::udp_socket(addr, &self.config.quic).map_err(bind_err)?;
                let local_addr = socket.local_addr().map_err(bind_err)?;
                (
                    local_addr,
                    tokio::spawn(crate::quic::serve(self.raft, self.sink, self.config, socket, rx)),
                )
            }
        };
        if transport_is_plaintext {
            tracing::warn!(%local_addr, "raftwire server runs PLAINTEXT: callers are not authenticated, traffic is not encrypted");
        }
        tracing::info!(%local_addr, transport = transport.name(), "raftwire server listening");
        Ok(Server {
            local_addr,
            shutdown: Some(tx),
            task,
        })
    }
}
