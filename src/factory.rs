//! The `RaftNetworkFactory`: a per-peer connection cache and the `Network` it hands out.

use std::collections::HashMap;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::Weak;
use std::time::Duration;

use tokio::time::Instant;

use futures::Stream;
use futures::StreamExt;
use openraft::RaftNetworkFactory;
use openraft::alias::SnapshotOf;
use openraft::alias::VoteOf;
use openraft::base::BoxFuture;
use openraft::base::BoxStream;
use openraft::errors::RPCError;
use openraft::errors::ReplicationClosed;
use openraft::errors::StreamingError;
use openraft::network::RPCOption;
use openraft::network::RaftNetworkV2;
use openraft::raft::AppendEntriesRequest;
use openraft::raft::AppendEntriesResponse;
use openraft::raft::SnapshotResponse;
use openraft::raft::StreamAppendResult;
use openraft::raft::TransferLeaderRequest;
use openraft::raft::TransferLeaderResponse;
use openraft::raft::VoteRequest;
use openraft::raft::VoteResponse;

use crate::config::Config;
use crate::config::Transport;
use crate::error::ConfigError;
use crate::link;
use crate::link::Connector;
use crate::link::Link;
use crate::link::Metered;
use crate::link::Purpose;
use crate::route::Fallback;
use crate::route::Route;
use crate::snapshot::SnapshotData;
use crate::stats::NetworkStats;
use crate::stats::Stats;
use crate::types::PeerAddr;
use crate::types::RaftWireConfig;

#[cfg(feature = "grpc")]
use crate::grpc;
#[cfg(feature = "quic")]
use crate::quic;

struct Peer<C: RaftWireConfig> {
    addr: String,
    /// The link each purpose's clients use (a [`Fallback`] over `by_transport` when the
    /// factory has several transports).
    links: HashMap<Purpose, Arc<dyn Link<C>>>,
    /// With several transports: the peer's transport choice, and each transport's links.
    route: Option<Arc<Route>>,
    by_transport: HashMap<(Transport, Purpose), Arc<dyn Link<C>>>,
    /// Since when no `Network` holds any of the links (as first seen by a sweep); `None`
    /// while one does.
    idle_since: Option<Instant>,
}

impl<C: RaftWireConfig> Peer<C> {
    fn new(addr: &str) -> Self {
        Peer {
            addr: addr.to_string(),
            links: HashMap::new(),
            route: None,
            by_transport: HashMap::new(),
            idle_since: None,
        }
    }

    /// Whether a `Network` still holds one of the links: more strong references than the
    /// cache's own (a link shared across purposes is in the map once per purpose).
    fn in_use(&self) -> bool {
        self.links.values().any(|link| {
            let cached = self.links.values().filter(|l| Arc::ptr_eq(l, link)).count();
            Arc::strong_count(link) > cached
        })
    }

    /// The distinct transport links (a link shared across purposes counts once).
    fn distinct_links(&self) -> usize {
        let links: Vec<_> = if self.route.is_some() {
            self.by_transport.values().collect()
        } else {
            self.links.values().collect()
        };
        links
            .iter()
            .enumerate()
            .filter(|(i, l)| !links[..*i].iter().any(|o| Arc::ptr_eq(o, l)))
            .count()
    }
}

/// The factory's per-peer link cache.
struct Cache<C: RaftWireConfig> {
    peers: HashMap<u64, Peer<C>>,
    /// Whether the background sweep has been started.
    sweeping: bool,
}

impl<C: RaftWireConfig> Default for Cache<C> {
    fn default() -> Self {
        Cache {
            peers: HashMap::new(),
            sweeping: false,
        }
    }
}

impl<C: RaftWireConfig> Cache<C> {
    /// Takes out the peers whose links no `Network` has held for `idle` (the caller drops
    /// them, closing their connections, after releasing the lock).
    fn sweep(&mut self, idle: Duration, now: Instant) -> Vec<(u64, Peer<C>)> {
        let mut expired = Vec::new();
        for (id, peer) in self.peers.iter_mut() {
            if peer.in_use() {
                peer.idle_since = None;
                continue;
            }
            let since = *peer.idle_since.get_or_insert(now);
            if now.saturating_duration_since(since) >= idle {
                expired.push(*id);
            }
        }
        expired
            .into_iter()
            .filter_map(|id| self.peers.remove(&id).map(|p| (id, p)))
            .collect()
    }
}

/// Logs and drops the peers a sweep took out of the cache.
fn forget<C: RaftWireConfig>(expired: Vec<(u64, Peer<C>)>, idle: Duration) {
    for (id, peer) in expired {
        tracing::debug!(target = id, addr = %peer.addr, "no client used the peer for {idle:?}; closing its connections");
    }
}

/// Sweeps the cache every `period` until the factory (every clone of it) is gone.
async fn sweep_forever<C: RaftWireConfig>(cache: Weak<Mutex<Cache<C>>>, idle: Duration, period: Duration) {
    loop {
        tokio::time::sleep(period).await;
        let Some(cache) = cache.upgrade() else { return };
        let expired = cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .sweep(idle, Instant::now());
        drop(cache);
        forget(expired, idle);
    }
}

/// A transport and its client side.
type TransportConnector<C> = (Transport, Arc<dyn Connector<C>>);

/// openraft's network factory for raftwire: hands out [`Network`] clients that share one
/// cached connection per peer and purpose.
///
/// `new_client` (replication and elections), `new_heartbeat_client` and
/// `new_snapshot_client` each use their own connection to a peer. Connections are made on
/// first use, reused by every later client, and made again after a failure. A peer whose
/// address changes gets fresh connections. A peer none of whose connections any client has
/// held for [`idle_peer_timeout`](crate::ConfigBuilder::idle_peer_timeout) (a removed
/// member, a departed learner) is forgotten and its connections closed, by a sweep on every
/// `new_client` and by a background task that ends with the factory.
///
/// `SD` is the state machine's snapshot data type.
pub struct NetworkFactory<C: RaftWireConfig, SD> {
    local_id: u64,
    config: Arc<Config>,
    /// One per transport of the config, in preference order.
    connectors: Arc<[TransportConnector<C>]>,
    peers: Arc<Mutex<Cache<C>>>,
    stats: Stats,
    _types: PhantomData<fn() -> (C, SD)>,
}

impl<C: RaftWireConfig, SD> Clone for NetworkFactory<C, SD> {
    fn clone(&self) -> Self {
        NetworkFactory {
            local_id: self.local_id,
            config: self.config.clone(),
            connectors: self.connectors.clone(),
            peers: self.peers.clone(),
            stats: self.stats.clone(),
            _types: PhantomData,
        }
    }
}

impl<C, SD> NetworkFactory<C, SD>
where
    C: RaftWireConfig,
    SD: SnapshotData,
{
    /// A factory for the node `local_id` (used in timeout reports).
    ///
    /// Fails with [`ConfigError::IdentityMismatch`] when the configured TLS certificate is
    /// another node's: every peer would refuse this node's connections.
    pub fn new(local_id: u64, config: Config) -> Result<Self, ConfigError> {
        ConfigError::check_identity(local_id, config.tls.as_ref())?;
        if config.tls.is_none() {
            tracing::warn!(
                node = local_id,
                "raftwire client runs PLAINTEXT: peers are not authenticated, traffic is not encrypted"
            );
        }
        crate::stats::describe();
        let connectors = config
            .transports()
            .iter()
            .map(|&t| (t, connector::<C>(t, &config)))
            .collect();
        Ok(NetworkFactory {
            local_id,
            config: Arc::new(config),
            connectors,
            peers: Arc::default(),
            stats: Stats::default(),
            _types: PhantomData,
        })
    }

    /// Counters of the traffic of every client this factory made, and the size of its
    /// connection cache.
    pub fn stats(&self) -> NetworkStats {
        let mut stats = self.stats.snapshot();
        let cache = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        stats.peers_cached = cache.peers.len() as u64;
        stats.links_cached = cache.peers.values().map(|p| p.distinct_links() as u64).sum();
        stats.peer_transports = cache
            .peers
            .iter()
            .filter_map(|(&id, peer)| match &peer.route {
                Some(route) => route.on().map(|t| (id, t)),
                None => Some((id, self.connectors[0].0)),
            })
            .collect();
        stats
    }

    /// Starts the background sweep of idle peers once, on the runtime of the first caller.
    fn start_sweeping(&self, cache: &mut Cache<C>) {
        if cache.sweeping {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // Outside a runtime: `new_client` still sweeps.
            return;
        };
        cache.sweeping = true;
        let idle = self.config.idle_peer_timeout;
        // Often enough that a peer is forgotten within a quarter of the timeout after it.
        let period = (idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(15));
        runtime.spawn(sweep_forever(Arc::downgrade(&self.peers), idle, period));
    }

    fn client(&self, target: u64, node: &C::Node, purpose: Purpose) -> Network<C, SD> {
        let addr = node.peer_addr();
        let mut cache = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        self.start_sweeping(&mut cache);
        let expired = if purpose == Purpose::Replication {
            cache.sweep(self.config.idle_peer_timeout, Instant::now())
        } else {
            Vec::new()
        };
        let peer = cache.peers.entry(target).or_insert_with(|| Peer::new(addr));
        peer.idle_since = None;
        if peer.addr != addr {
            tracing::info!(target, old = %peer.addr, new = addr, "peer address changed; reconnecting");
            *peer = Peer::new(addr);
        }
        let link = match peer.links.get(&purpose) {
            Some(link) => link.clone(),
            None => {
                let link = self.new_link(peer, target, node, purpose);
                peer.links.insert(purpose, link.clone());
                link
            }
        };
        drop(cache);
        forget(expired, self.config.idle_peer_timeout);
        Network {
            local_id: self.local_id,
            target,
            purpose,
            config: self.config.clone(),
            link,
            _types: PhantomData,
        }
    }
}

impl<C, SD> NetworkFactory<C, SD>
where
    C: RaftWireConfig,
    SD: SnapshotData,
{
    /// The link `purpose`'s clients of `peer` use: the transport's own with one transport; a
    /// [`Fallback`] over one link per transport (those the peer is known to serve) with
    /// several.
    fn new_link(
        &self,
        peer: &mut Peer<C>,
        target: u64,
        node: &C::Node,
        purpose: Purpose,
    ) -> Arc<dyn Link<C>> {
        if let [(transport, connector)] = &self.connectors[..] {
            if connector.shares_purposes()
                && let Some(shared) = peer.links.values().next()
            {
                return shared.clone();
            }
            return self.metered(connector.as_ref(), *transport, node, target, purpose);
        }
        let route = peer
            .route
            .get_or_insert_with(|| {
                let served = node.transports();
                let mut preference: Vec<Transport> = self
                    .connectors
                    .iter()
                    .map(|(t, _)| *t)
                    .filter(|t| served.as_ref().is_none_or(|s| s.contains(t)))
                    .collect();
                if preference.is_empty() {
                    // The peer serves none of ours: try them all, so calls say why they fail.
                    preference = self.connectors.iter().map(|(t, _)| *t).collect();
                }
                Route::new(target, preference, &self.config)
            })
            .clone();
        // The route's transports are a subsequence of the connectors' (same order).
        let links = self
            .connectors
            .iter()
            .filter(|(t, _)| route.transports().contains(t))
            .map(|&(t, ref connector)| {
                let shared = connector
                    .shares_purposes()
                    .then(|| {
                        peer.by_transport
                            .iter()
                            .find(|((pt, _), _)| *pt == t)
                            .map(|(_, l)| l.clone())
                    })
                    .flatten();
                let link =
                    shared.unwrap_or_else(|| self.metered(connector.as_ref(), t, node, target, purpose));
                peer.by_transport.insert((t, purpose), link.clone());
                link
            })
            .collect();
        Arc::new(Fallback::new(route, links))
    }

    /// `connector`'s link to `target`, with its calls recorded under the peer and transport.
    fn metered(
        &self,
        connector: &dyn Connector<C>,
        transport: Transport,
        node: &C::Node,
        target: u64,
        purpose: Purpose,
    ) -> Arc<dyn Link<C>> {
        let stats = self.stats.for_peer(target, transport);
        let link = connector.link(node.transport_addr(transport), target, purpose, stats.clone());
        Arc::new(Metered::new(link, stats))
    }
}

impl<C, SD> RaftNetworkFactory<C> for NetworkFactory<C, SD>
where
    C: RaftWireConfig,
    SD: SnapshotData,
{
    type Network = Network<C, SD>;

    async fn new_client(&mut self, target: u64, node: &C::Node) -> Self::Network {
        self.client(target, node, Purpose::Replication)
    }

    async fn new_heartbeat_client(&mut self, target: u64, node: &C::Node) -> Self::Network {
        self.client(target, node, Purpose::Heartbeat)
    }

    async fn new_snapshot_client(&mut self, target: u64, node: &C::Node) -> Self::Network {
        self.client(target, node, Purpose::Snapshot)
    }
}

/// A client to one peer over one cached connection; see [`NetworkFactory`].
pub struct Network<C: RaftWireConfig, SD> {
    local_id: u64,
    target: u64,
    purpose: Purpose,
    config: Arc<Config>,
    link: Arc<dyn Link<C>>,
    _types: PhantomData<fn() -> (C, SD)>,
}

impl<C, SD> RaftNetworkV2<C> for Network<C, SD>
where
    C: RaftWireConfig,
    SD: SnapshotData,
{
    type SnapshotData = SD;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<C>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<C>, RPCError<C>> {
        let deadline = self.config.deadline(option.soft_ttl());
        let result = self.link.append(rpc, deadline).await;
        result.map_err(|e| e.into_rpc(self.local_id, self.target))
    }

    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<'s, Result<BoxStream<'s, Result<StreamAppendResult<C>, RPCError<C>>>, RPCError<C>>>
    where
        S: Stream<Item = AppendEntriesRequest<C>> + Send + Unpin + 'static,
    {
        Box::pin(async move {
            let (local, target) = (self.local_id, self.target);
            let deadline = self.config.deadline(option.soft_ttl());
            let replies = self
                .link
                .stream_append(Box::pin(input), &self.config, deadline, self.purpose)
                .await
                .map_err(|e| e.into_rpc(local, target))?;
            let out: BoxStream<'s, _> =
                Box::pin(replies.map(move |r| r.map_err(|e| e.into_rpc(local, target))));
            Ok(out)
        })
    }

    async fn vote(&mut self, rpc: VoteRequest<C>, option: RPCOption) -> Result<VoteResponse<C>, RPCError<C>> {
        self.vote_or_pre_vote(rpc, option, false).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<C>,
        option: RPCOption,
    ) -> Result<VoteResponse<C>, RPCError<C>> {
        self.vote_or_pre_vote(rpc, option, true).await
    }

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<C>,
        snapshot: SnapshotOf<C, SD>,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<C>, StreamingError<C>> {
        // openraft always sets a chunk size; ours is a cap (kept below max_message_size by
        // the config's validation), so no chunk can exceed what the receiver accepts.
        let chunk = option
            .snapshot_chunk_size()
            .unwrap_or(self.config.snapshot_chunk_size)
            .min(self.config.snapshot_chunk_size)
            .max(1);
        // A deadline on progress, never on the whole transfer: at least openraft's own.
        let idle = self.config.snapshot_idle_timeout.max(option.soft_ttl());
        let send = link::send_snapshot::<C, SD>(
            self.link.as_ref(),
            vote,
            snapshot.meta,
            snapshot.snapshot,
            chunk,
            idle,
        );
        // Cancelling drops the upload, which aborts the transfer at the receiver.
        tokio::select! {
            result = send => result.map_err(|e| e.into_streaming(self.local_id, self.target)),
            closed = cancel => Err(StreamingError::Closed(closed)),
        }
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<C>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<C>, RPCError<C>> {
        let deadline = self.config.deadline(option.soft_ttl());
        let result = self.link.transfer_leader(req, deadline).await;
        result.map_err(|e| e.into_rpc(self.local_id, self.target))
    }
}

impl<C, SD> Network<C, SD>
where
    C: RaftWireConfig,
    SD: SnapshotData,
{
    async fn vote_or_pre_vote(
        &mut self,
        rpc: VoteRequest<C>,
        option: RPCOption,
        pre_vote: bool,
    ) -> Result<VoteResponse<C>, RPCError<C>> {
        let deadline = self.config.deadline(option.soft_ttl());
        let result = self.link.vote(rpc, pre_vote, deadline).await;
        result.map_err(|e| e.into_rpc(self.local_id, self.target))
    }
}

/// The client side of `transport`: the one place the factory looks at which transports exist.
fn connector<C: RaftWireConfig>(transport: Transport, config: &Config) -> Arc<dyn Connector<C>> {
    match transport {
        #[cfg(feature = "grpc")]
        Transport::Grpc => Arc::new(grpc::Connector::new(config)),
        #[cfg(feature = "quic")]
        Transport::Quic => Arc::new(quic::Connector::new(config)),
        #[cfg(feature = "tcp")]
        Transport::Tcp => Arc::new(crate::tcp::Connector::new(config)),
    }
}
