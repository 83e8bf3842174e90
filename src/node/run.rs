//! `raftwire node`: one node of the key-value store on durable storage, serving Raft to its
//! peers (on every configured transport) and the client API to operators, both under mutual
//! TLS, until told to stop.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Context;
use std::task::Poll;
use std::time::Duration;

use openraft::ServerState;
use openraft::async_runtime::watch::WatchReceiver;
use tokio::io::AsyncRead;
use tokio::io::AsyncWrite;
use tokio::io::ReadBuf;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::Api;
use super::exporter;
use crate::Config;
use crate::NetworkFactory;
use crate::Server;
use crate::TlsConfig;
use crate::Transport;
use crate::kv::durable::DurableSnapshotFile;
use crate::kv::durable::DurableStore;

/// How a node runs: the flags of `raftwire node`.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// This node's id (its certificate must name it).
    pub id: u64,
    /// Where Raft traffic is served (every transport on this port number).
    pub listen: SocketAddr,
    /// The Raft address peers reach this node at (`host:port`), recorded in the membership.
    pub advertise: String,
    /// Where the client API is served.
    pub api_listen: SocketAddr,
    /// Log, vote, state machine and snapshots live here.
    pub data_dir: PathBuf,
    /// `ca.pem`, `node-<id>.pem` and `node-<id>.key`.
    pub certs: PathBuf,
    /// Transports, most preferred first.
    pub transports: Vec<Transport>,
    /// Where to serve Prometheus metrics at `/metrics` (plain HTTP); none if absent.
    pub metrics_listen: Option<SocketAddr>,
}

/// Where a running node serves, as told to `run`'s `ready`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Serving {
    /// Raft traffic, per transport.
    pub raft: Vec<(Transport, SocketAddr)>,
    /// The client API.
    pub api: SocketAddr,
    /// Prometheus metrics, if asked for.
    pub metrics: Option<SocketAddr>,
}

/// Why a node could not start or stopped uncleanly: one line naming the problem.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RunError(String);

/// The file in a data directory that records whose it is.
const OWNER_FILE: &str = "node-id";

/// The demo's Raft timing, for nodes on separate hosts of a LAN.
fn raft_config() -> Result<Arc<openraft::Config>, RunError> {
    let config = openraft::Config {
        cluster_name: "raftwire".into(),
        heartbeat_interval: 100,
        election_timeout_min: 600,
        election_timeout_max: 1200,
        install_snapshot_timeout: 5000,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(50_000),
        max_in_snapshot_log_to_keep: 1000,
        ..Default::default()
    };
    config
        .validate()
        .map(Arc::new)
        .map_err(|e| RunError(format!("raft config: {e}")))
}

/// Loads this node's identity from `certs`, refusing one that names another node.
fn load_tls(certs: &Path, id: u64) -> Result<TlsConfig, RunError> {
    let (ca, cert, key) = (
        certs.join("ca.pem"),
        certs.join(format!("node-{id}.pem")),
        certs.join(format!("node-{id}.key")),
    );
    let tls = TlsConfig::from_pem_files(&ca, &cert, &key)
        .map_err(|e| RunError(format!("certificates in {}: {e}", certs.display())))?;
    if tls.node_id() != id {
        return Err(RunError(format!(
            "{} names node {}, not node {id}",
            cert.display(),
            tls.node_id()
        )));
    }
    Ok(tls)
}

/// Creates `dir` if needed and checks that it belongs to node `id` (claiming it if new).
fn claim_data_dir(dir: &Path, id: u64) -> Result<(), RunError> {
    std::fs::create_dir_all(dir).map_err(|e| RunError(format!("data directory {}: {e}", dir.display())))?;
    let owner = dir.join(OWNER_FILE);
    match std::fs::read_to_string(&owner) {
        Ok(text) => {
            let theirs: u64 = text.trim().parse().map_err(|_| {
                RunError(format!(
                    "data directory {}: {} is not a node id: {text:?}",
                    dir.display(),
                    owner.display()
                ))
            })?;
            if theirs != id {
                return Err(RunError(format!(
                    "data directory {} belongs to node {theirs}, not node {id}",
                    dir.display()
                )));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let write = || -> std::io::Result<()> {
                use std::io::Write;
                let mut f = std::fs::File::create(&owner)?;
                writeln!(f, "{id}")?;
                f.sync_all()
            };
            write().map_err(|e| RunError(format!("data directory {}: {e}", dir.display())))
        }
        Err(e) => Err(RunError(format!("data directory {}: {e}", dir.display()))),
    }
}

/// Runs a node until `stop` resolves, then shuts it down cleanly: a leader hands leadership
/// to another voter first. `ready` is told where it serves once it does.
pub async fn run(
    opts: NodeOptions,
    stop: impl Future<Output = ()>,
    ready: impl FnOnce(&Serving),
) -> Result<(), RunError> {
    let id = opts.id;
    let tls = load_tls(&opts.certs, id)?;
    claim_data_dir(&opts.data_dir, id)?;
    // The recorder goes in before the network factory registers its metric handles.
    let metrics = match opts.metrics_listen {
        None => None,
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| RunError(format!("cannot serve metrics on {addr}: {e}")))?;
            let handle = exporter::install().map_err(|e| RunError(format!("metrics: {e}")))?;
            Some((listener, handle))
        }
    };
    let store = DurableStore::open(&opts.data_dir)
        .map_err(|e| RunError(format!("data directory {}: {e}", opts.data_dir.display())))?;
    let config = Config::builder()
        .transports(opts.transports.iter().copied())
        .tls(tls.clone())
        .build()
        .map_err(|e| RunError(format!("config: {e}")))?;
    let network = NetworkFactory::<crate::kv::KvConfig, DurableSnapshotFile>::new(id, config.clone())
        .map_err(|e| RunError(format!("network: {e}")))?;
    let sm = store.state_machine();
    let raft = openraft::Raft::new(id, raft_config()?, network, store.log_store(), sm.clone())
        .await
        .map_err(|e| RunError(format!("starting raft: {e}")))?;
    let server = Server::builder_with_sink(raft.clone(), config, store.snapshot_sink())
        .bind(opts.listen)
        .await
        .map_err(|e| RunError(format!("cannot serve raft on {}: {e}", opts.listen)))?;

    // The client API: its own listener, admitting client certificates only.
    let api_listener = tokio::net::TcpListener::bind(opts.api_listen)
        .await
        .map_err(|e| RunError(format!("cannot serve the client API on {}: {e}", opts.api_listen)))?;
    let api_addr = api_listener
        .local_addr()
        .map_err(|e| RunError(format!("client API listener: {e}")))?;
    let api_tls = tls
        .api_server_config(b"h2")
        .map_err(|e| RunError(format!("client API TLS: {e}")))?;
    let transports = opts
        .transports
        .iter()
        .map(|t| t.name())
        .collect::<Vec<_>>()
        .join(",");
    let api = Api::new(raft.clone(), sm, opts.advertise.clone(), transports).into_service();
    let (api_stop_tx, mut api_stop) = tokio::sync::watch::channel(false);
    let incoming = accept_api(
        api_listener,
        tokio_rustls::TlsAcceptor::from(Arc::new(api_tls)),
        api_stop.clone(),
    );
    let api_task = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(api)
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = api_stop.wait_for(|s| *s).await;
            }),
    );
    let metrics_addr = match metrics {
        None => None,
        Some((listener, handle)) => {
            let addr = listener
                .local_addr()
                .map_err(|e| RunError(format!("metrics listener: {e}")))?;
            let raft = raft.clone();
            let render = Arc::new(move || {
                let mut page = handle.render();
                page.push_str(&exporter::raft_text(&raft.metrics().borrow_watched()));
                page
            });
            tokio::spawn(exporter::serve(
                listener,
                render,
                exporter::Limits::default(),
                api_stop_tx.subscribe(),
            ));
            Some(addr)
        }
    };
    tracing::info!(node = id, raft = %server.local_addr(), api = %api_addr, metrics = ?metrics_addr, advertise = %opts.advertise, "node serving");
    ready(&Serving {
        raft: server.transport_addrs().to_vec(),
        api: api_addr,
        metrics: metrics_addr,
    });

    stop.await;
    tracing::info!(node = id, "stopping");
    hand_over_leadership(&raft).await;
    let _ = api_stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(3), api_task).await;
    let served = server.shutdown().await;
    let stopped = raft.shutdown().await;
    served.map_err(|e| RunError(format!("stopping the raft server: {e}")))?;
    stopped.map_err(|e| RunError(format!("stopping raft: {e}")))?;
    tracing::info!(node = id, "stopped");
    Ok(())
}

/// A leader about to stop hands leadership to the voter furthest along, so the cluster does
/// not wait out an election timeout. Best effort, bounded.
async fn hand_over_leadership<SM: openraft::storage::RaftStateMachine<crate::kv::KvConfig>>(
    raft: &openraft::Raft<crate::kv::KvConfig, SM>,
) {
    let m = raft.metrics().borrow_watched().clone();
    if m.state != ServerState::Leader {
        return;
    }
    let voters: Vec<u64> = m
        .membership_config
        .membership()
        .voter_ids()
        .filter(|v| *v != m.id)
        .collect();
    let best = voters.iter().copied().max_by_key(|v| {
        m.replication
            .as_ref()
            .and_then(|r| r.get(v).copied().flatten())
            .map(|l| l.index)
    });
    let Some(to) = best else {
        return;
    };
    tracing::info!(node = m.id, to, "leader stopping: handing leadership over");
    if raft.trigger().transfer_leader(to).await.is_err() {
        return;
    }
    let _ = raft
        .wait(Some(Duration::from_secs(3)))
        .metrics(
            |m| m.current_leader.is_some_and(|l| l != m.id),
            "leadership handed over",
        )
        .await;
}

/// A client API connection: TLS, with the client's name attached to every request.
pub(crate) struct ApiConn {
    io: tokio_rustls::server::TlsStream<TcpStream>,
    client: String,
}

impl tonic::transport::server::Connected for ApiConn {
    type ConnectInfo = String;

    fn connect_info(&self) -> String {
        self.client.clone()
    }
}

impl AsyncRead for ApiConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for ApiConn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Accepts client API connections, each TLS handshake in a task of its own (bounded to 5 s),
/// until `stop`.
fn accept_api(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> ReceiverStream<std::io::Result<ApiConn>> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let mut handshakes = tokio::task::JoinSet::new();
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = stop.wait_for(|s| *s) => break,
            };
            while handshakes.try_join_next().is_some() {}
            let (tcp, addr) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("client API accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if handshakes.len() >= 64 {
                continue;
            }
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            handshakes.spawn(async move {
                let _ = tcp.set_nodelay(true);
                let io = match tokio::time::timeout(Duration::from_secs(5), acceptor.accept(tcp)).await {
                    Ok(Ok(io)) => io,
                    Ok(Err(e)) => return tracing::warn!(%addr, "client API: TLS handshake refused: {e}"),
                    Err(_) => return tracing::warn!(%addr, "client API: TLS handshake timed out"),
                };
                let Some(client) = crate::tls::peer_client_name(io.get_ref().1.peer_certificates()) else {
                    return tracing::warn!(%addr, "client API: the peer has no client identity");
                };
                tracing::debug!(%addr, client, "client API connection");
                let _ = tx.send(Ok(ApiConn { io, client })).await;
            });
        }
        handshakes.shutdown().await;
    });
    ReceiverStream::new(rx)
}
