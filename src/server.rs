//! Serves a `Raft` to its peers on every configured transport.

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
/// It serves every transport of its config's preference list
/// ([`ConfigBuilder::transports`](crate::ConfigBuilder::transports)), all through one server
/// core: the same identity checks and limits on each.
///
/// Dropping it without [`Server::shutdown`] stops it abruptly.
pub struct Server {
    /// Where each transport listens, in the config's order.
    addrs: Vec<(Transport, SocketAddr)>,
    shutdown: watch::Sender<bool>,
    grace: Duration,
    /// One per transport.
    tasks: Vec<JoinHandle<Result<(), ServerError>>>,
    /// Held by every connection and request handler; the count tells when all are gone.
    service: Arc<dyn std::any::Any + Send + Sync>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("addrs", &self.addrs)
            .field("grace", &self.grace)
            .finish_non_exhaustive()
    }
}

/// Configures and starts a [`Server`].
pub struct ServerBuilder<C: RaftWireConfig, SM: RaftStateMachine<C>> {
    raft: Raft<C, SM>,
    config: Config,
    sink: Arc<dyn SnapshotSink<SM::SnapshotData>>,
    /// Transports that listen somewhere else than the address given to `bind`.
    listen: Vec<(Transport, SocketAddr)>,
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
            listen: Vec::new(),
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
            listen: Vec::new(),
        }
    }

    /// The address the server listens on (with the real port when bound to port 0); with
    /// several transports, the most preferred one's.
    pub fn local_addr(&self) -> SocketAddr {
        self.addrs[0].1
    }

    /// Where `transport` listens, if this server serves it.
    pub fn transport_addr(&self, transport: Transport) -> Option<SocketAddr> {
        self.addrs.iter().find(|(t, _)| *t == transport).map(|(_, a)| *a)
    }

    /// Every transport this server serves, with its address, most preferred first.
    pub fn transport_addrs(&self) -> &[(Transport, SocketAddr)] {
        &self.addrs
    }

    /// Stops accepting, lets open calls finish for the configured grace period
    /// ([`ConfigBuilder::shutdown_grace`](crate::ConfigBuilder::shutdown_grace)), then closes
    /// every connection. When it returns, no connection or task of this server is left and
    /// no request reaches the `Raft` through it any more.
    pub async fn shutdown(mut self) -> Result<(), ServerError> {
        let _ = self.shutdown.send(true);
        // The transports close side by side, each with the same grace.
        let closing = self.tasks.iter_mut().map(|task| async move {
            match tokio::time::timeout(self.grace + CLOSE_TIMEOUT, &mut *task).await {
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
            }
        });
        let result = futures::future::join_all(closing)
            .await
            .into_iter()
            .find(|r| r.is_err())
            .unwrap_or(Ok(()));
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
        for task in &self.tasks {
            task.abort();
        }
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

    /// Serves `transport` on `addr` instead of the address given to [`ServerBuilder::bind`]
    /// (peers then need to know it: see [`PeerAddr::transport_addr`](crate::PeerAddr::transport_addr)).
    pub fn listen(mut self, transport: Transport, addr: SocketAddr) -> Self {
        self.listen.retain(|(t, _)| *t != transport);
        self.listen.push((transport, addr));
        self
    }

    /// Binds every transport of the config and starts serving each in a background task:
    /// the first at `addr` (port 0 picks a free port), the others on the same IP and port
    /// number (TCP for gRPC, UDP for QUIC) unless [`ServerBuilder::listen`] moved them. With
    /// port 0 and several transports, a port free for all of them is found. Fails with
    /// [`ServerError::Config`] when the configured TLS certificate names another node than
    /// the `Raft`'s.
    pub async fn bind(self, addr: SocketAddr) -> Result<Server, ServerError> {
        // A server presenting another node's certificate would be refused by every peer.
        let node_id = {
            use openraft::async_runtime::watch::WatchReceiver;
            self.raft.metrics().borrow_watched().id
        };
        ConfigError::check_identity(node_id, self.config.tls.as_ref())?;
        let transport_is_plaintext = self.config.tls.is_none();
        let transports = self.config.transports().to_vec();
        // With port 0, the first transport's port may be taken for another's protocol: try
        // a few ports before giving up.
        let mut attempts = 0;
        let (addrs, sockets) = loop {
            match bind_all(&transports, addr, &self.listen, &self.config) {
                Ok(bound) => break bound,
                Err(ServerError::Bind { source, .. })
                    if addr.port() == 0
                        && transports.len() > 1
                        && source.kind() == std::io::ErrorKind::AddrInUse
                        && attempts < 16 =>
                {
                    attempts += 1;
                }
                Err(e) => return Err(e),
            }
        };
        let (tx, rx) = watch::channel(false);
        let grace = self.config.shutdown_grace;
        let service = Arc::new(Service::new(self.raft, self.sink, &self.config));
        let mut tasks = Vec::new();
        for socket in sockets {
            match socket {
                #[cfg(any(feature = "grpc", feature = "tcp"))]
                Socket::Tcp { listener, transports } => {
                    serve_tcp(listener, &transports, &service, &self.config, &rx, &mut tasks)?
                }
                #[cfg(feature = "quic")]
                Socket::Udp(socket) => tasks.push(tokio::spawn(crate::quic::serve(
                    service.clone(),
                    self.config.clone(),
                    socket,
                    rx.clone(),
                ))),
            }
        }
        for (transport, local_addr) in &addrs {
            if transport_is_plaintext {
                tracing::warn!(%local_addr, "raftwire server runs PLAINTEXT: callers are not authenticated, traffic is not encrypted");
            }
            tracing::info!(%local_addr, transport = transport.name(), "raftwire server listening");
        }
        Ok(Server {
            addrs,
            shutdown: tx,
            grace,
            tasks,
            service,
        })
    }
}

/// A bound, not yet served, socket.
enum Socket {
    /// A TCP listener and the transports sharing it (told apart by ALPN).
    #[cfg(any(feature = "grpc", feature = "tcp"))]
    Tcp {
        listener: tokio::net::TcpListener,
        transports: Vec<Transport>,
    },
    #[cfg(feature = "quic")]
    Udp(std::net::UdpSocket),
}

/// Whether `transport` listens on TCP.
#[cfg(any(feature = "grpc", feature = "tcp"))]
fn on_tcp(transport: Transport) -> bool {
    match transport {
        #[cfg(feature = "grpc")]
        Transport::Grpc => true,
        #[cfg(feature = "tcp")]
        Transport::Tcp => true,
        #[allow(unreachable_patterns)]
        _ => false,
    }
}

/// Serves the transports sharing one TCP listener: plaintext gRPC on it directly, or one TLS
/// accept loop handing each connection to the transport its ALPN names.
#[cfg(any(feature = "grpc", feature = "tcp"))]
fn serve_tcp<C, SM>(
    listener: tokio::net::TcpListener,
    transports: &[Transport],
    service: &Arc<Service<C, SM>>,
    config: &Config,
    stop: &watch::Receiver<bool>,
    tasks: &mut Vec<JoinHandle<Result<(), ServerError>>>,
) -> Result<(), ServerError>
where
    C: RaftWireConfig,
    SM: RaftStateMachine<C>,
    SM::SnapshotData: SnapshotData,
{
    let Some(tls) = &config.tls else {
        // Only gRPC runs without TLS (the config refuses the others).
        #[cfg(feature = "grpc")]
        tasks.push(tokio::spawn(crate::grpc::serve(
            service.clone(),
            config.clone(),
            crate::grpc::Incoming::Plain(listener),
            stop.clone(),
        )));
        return Ok(());
    };
    let mut routes = Vec::new();
    for &transport in transports {
        let (to, from) = tokio::sync::mpsc::channel(64);
        match transport {
            #[cfg(feature = "grpc")]
            Transport::Grpc => {
                routes.push(crate::accept::Route {
                    alpn: crate::grpc::ALPN,
                    default: true,
                    to,
                });
                tasks.push(tokio::spawn(crate::grpc::serve(
                    service.clone(),
                    config.clone(),
                    crate::grpc::Incoming::Tls(from),
                    stop.clone(),
                )));
            }
            #[cfg(feature = "tcp")]
            Transport::Tcp => {
                routes.push(crate::accept::Route {
                    alpn: crate::tcp::alpn(config),
                    default: false,
                    to,
                });
                tasks.push(tokio::spawn(crate::tcp::serve(
                    service.clone(),
                    config.clone(),
                    from,
                    stop.clone(),
                )));
            }
            #[allow(unreachable_patterns)]
            _ => {}
        }
    }
    let alpns: Vec<&[u8]> = routes.iter().map(|r| r.alpn).collect();
    let server_config = tls
        .server_config_for(&alpns)
        .map_err(|e| ServerError::Serve(e.to_string()))?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
    let admission = crate::limits::Admission::new(config);
    let accepting = crate::accept::accept(
        listener,
        acceptor,
        config.connect_timeout,
        admission,
        Arc::new(routes),
        stop.clone(),
    );
    tasks.push(tokio::spawn(async move {
        accepting.await;
        Ok(())
    }));
    Ok(())
}

/// Where each transport listens, and the sockets to serve. The first transport binds at its
/// `listen` address or `addr`, the others at theirs or at `addr`'s IP with the first one's
/// port; TCP transports at the same address share one listener.
type Bound = (Vec<(Transport, SocketAddr)>, Vec<Socket>);

#[cfg_attr(not(feature = "quic"), allow(unused_variables))]
fn bind_all(
    transports: &[Transport],
    addr: SocketAddr,
    listen: &[(Transport, SocketAddr)],
    config: &Config,
) -> Result<Bound, ServerError> {
    let mut addrs: Vec<(Transport, SocketAddr)> = Vec::new();
    let mut sockets: Vec<Socket> = Vec::new();
    for &transport in transports {
        let moved = listen.iter().find(|(t, _)| *t == transport).map(|(_, a)| *a);
        let at = match moved {
            Some(a) => a,
            None => match addrs.iter().find(|(t, _)| !listen.iter().any(|(l, _)| l == t)) {
                // The port the first transport on `addr` got.
                Some((_, first)) => SocketAddr::new(addr.ip(), first.port()),
                None => addr,
            },
        };
        let bind_err = |source| ServerError::Bind {
            addr: at.to_string(),
            source,
        };
        #[cfg(any(feature = "grpc", feature = "tcp"))]
        if on_tcp(transport) {
            // Another TCP transport already listens there: share its listener.
            let shared = sockets.iter_mut().find_map(|s| match s {
                Socket::Tcp { listener, transports }
                    if at.port() != 0 && listener.local_addr().ok() == Some(at) =>
                {
                    Some(transports)
                }
                #[allow(unreachable_patterns)]
                _ => None,
            });
            if let Some(sharing) = shared {
                sharing.push(transport);
                addrs.push((transport, at));
                continue;
            }
            let std = std::net::TcpListener::bind(at).map_err(bind_err)?;
            std.set_nonblocking(true).map_err(bind_err)?;
            let listener = tokio::net::TcpListener::from_std(std).map_err(bind_err)?;
            addrs.push((transport, listener.local_addr().map_err(bind_err)?));
            sockets.push(Socket::Tcp {
                listener,
                transports: vec![transport],
            });
            continue;
        }
        #[cfg(feature = "quic")]
        if transport == Transport::Quic {
            let socket = crate::quic::udp_socket(at, &config.quic).map_err(bind_err)?;
            addrs.push((transport, socket.local_addr().map_err(bind_err)?));
            sockets.push(Socket::Udp(socket));
        }
    }
    Ok((addrs, sockets))
}
