//! Serves a `Raft` to its peers on the configured transport.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use openraft::Raft;
use openraft::storage::RaftStateMachine;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::config::Transport;
use crate::error::ConfigError;
use crate::error::ServerError;
use crate::service::Service;
use crate::snapshot::SnapshotData;
use crate::snapshot::SnapshotSink;
use crate::types::RaftWireConfig;

/// How long [`Server::shutdown`] waits, after the grace period, for the transport to close
/// its connections and for every request handler to let go of the `Raft`.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// A running raftwire server; see [`Server::builder`].
///
/// Dropping it without [`Server::shutdown`] stops it abruptly.
pub struct Server {
    local_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    grace: Duration,
    task: JoinHandle<Result<(), ServerError>>,
    /// Held by every connection and request handler; the count tells when all are gone.
    service: Arc<dyn std::any::Any + Send + Sync>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("local_addr", &self.local_addr)
            .field("grace", &self.grace)
            .finish_non_exhaustive()
    }
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

    /// Stops accepting, lets open calls finish for the configured grace period
    /// ([`ConfigBuilder::shutdown_grace`](crate::ConfigBuilder::shutdown_grace)), then closes
    /// every connection. When it returns, no connection or task of this server is left and
    /// no request reaches the `Raft` through it any more.
    pub async fn shutdown(mut self) -> Result<(), ServerError> {
        let _ = self.shutdown.send(true);
        let task = &mut self.task;
        let result = match tokio::time::timeout(self.grace + CLOSE_TIMEOUT, &mut *task).await {
            Ok(Ok(result)) => result,
            Ok(Err(join)) => Err(ServerError::Serve(join.to_string())),
            Err(_) => {
                task.abort();
                let _ = task.await;
                Err(ServerError::Serve(format!(
                    "the transport did not close within {:?} of the grace period; aborted",
                    CLOSE_TIMEOUT
                )))
            }
        };
        // Handlers the transport ran as tasks of their own end as their connections close.
        let deadline = tokio::time::Instant::now() + CLOSE_TIMEOUT;
        while Arc::strong_count(&self.service) > 1 {
            if tokio::time::Instant::now() >= deadline {
                return Err(ServerError::Serve(format!(
                    "{} request handlers still hold the Raft {CLOSE_TIMEOUT:?} after closing",
                    Arc::strong_count(&self.service) - 1
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        result
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
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

    /// Like [`ServerBuilder::snapshot_sink`], with a sink shared with other servers (a node
    /// restarted on the same storage keeps its sink).
    pub fn shared_snapshot_sink(mut self, sink: Arc<dyn SnapshotSink<SM::SnapshotData>>) -> Self {
        self.sink = sink;
        self
    }

    /// Binds `addr` (port 0 picks a free port: TCP for gRPC, UDP for QUIC) and starts serving
    /// in a background task. Fails with [`ServerError::Config`] when the configured TLS
    /// certificate names another node than the `Raft`'s.
    pub async fn bind(self, addr: SocketAddr) -> Result<Server, ServerError> {
        // A server presenting another node's certificate would be refused by every peer.
        let node_id = {
            use openraft::async_runtime::watch::WatchReceiver;
            self.raft.metrics().borrow_watched().id
        };
        ConfigError::check_identity(node_id, self.config.tls.as_ref())?;
        let transport_is_plaintext = self.config.tls.is_none();
        let bind_err = |source| ServerError::Bind {
            addr: addr.to_string(),
            source,
        };
        let (tx, rx) = watch::channel(false);
        let transport = self.config.transport;
        let grace = self.config.shutdown_grace;
        let service = Arc::new(Service::new(self.raft, self.sink, &self.config));
        let (local_addr, task) = match transport {
            #[cfg(feature = "grpc")]
            Transport::Grpc => {
                let listener = tokio::net::TcpListener::bind(addr).await.map_err(bind_err)?;
                let local_addr = listener.local_addr().map_err(bind_err)?;
                let serve = crate::grpc::serve(service.clone(), self.config, listener, rx);
                (local_addr, tokio::spawn(serve))
            }
            #[cfg(feature = "quic")]
            Transport::Quic => {
                let socket = crate::quic::udp_socket(addr, &self.config.quic).map_err(bind_err)?;
                let local_addr = socket.local_addr().map_err(bind_err)?;
                let serve = crate::quic::serve(service.clone(), self.config, socket, rx);
                (local_addr, tokio::spawn(serve))
            }
        };
        if transport_is_plaintext {
            tracing::warn!(%local_addr, "raftwire server runs PLAINTEXT: callers are not authenticated, traffic is not encrypted");
        }
        tracing::info!(%local_addr, transport = transport.name(), "raftwire server listening");
        Ok(Server {
            local_addr,
            shutdown: tx,
            grace,
            task,
            service,
        })
    }
}
