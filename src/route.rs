//! Several transports toward one peer: the preference order, falling back when a transport
//! fails in a way the config's [`FallbackPolicy`] attributes to the transport, probing the
//! preferred one again in the background after a back-off, and replication sessions that stay
//! on the transport they started on.
//!
//! A [`Route`] is the per-peer state (shared by the peer's replication, heartbeat and
//! snapshot clients, so a peer is on one transport at a time); a [`Fallback`] is the `Link`
//! one client uses, holding one link per transport.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use openraft::alias::SnapshotMetaOf;
use openraft::alias::VoteOf;
use openraft::raft::AppendEntriesRequest;
use openraft::raft::AppendEntriesResponse;
use openraft::raft::TransferLeaderRequest;
use openraft::raft::TransferLeaderResponse;
use openraft::raft::VoteRequest;
use openraft::raft::VoteResponse;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::Config;
use crate::config::FallbackPolicy;
use crate::config::Transport;
use crate::error::TransportError;
use crate::link::Link;
use crate::link::Purpose;
use crate::link::Replies;
use crate::link::SnapshotUpload;
use crate::types::RaftWireConfig;

/// What is known about one transport toward the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reach {
    /// Never tried.
    Unknown,
    /// A background probe is connecting.
    Probing,
    /// Connected, or a call succeeded on it, since it last failed.
    Up,
    /// Failed (as the policy judges); not used for calls until `until`, then probed.
    Down { until: Instant },
}

struct State {
    reach: Vec<Reach>,
    /// The transport of the last call or reply that succeeded.
    on: Option<Transport>,
}

/// One peer's transports, most preferred first, and what is known about each.
pub(crate) struct Route {
    target: u64,
    transports: Vec<Transport>,
    state: Mutex<State>,
    /// Bumped whenever a transport's reach changes (a probe ends, a call fails).
    changed: watch::Sender<u64>,
    backoff: Duration,
    connect_timeout: Duration,
    policy: FallbackPolicy,
}

impl Route {
    /// A route to `target` over `transports` (the config's preference list, less what the
    /// peer is known not to serve).
    pub(crate) fn new(target: u64, transports: Vec<Transport>, config: &Config) -> Arc<Self> {
        let n = transports.len();
        Arc::new(Route {
            target,
            transports,
            state: Mutex::new(State {
                reach: vec![Reach::Unknown; n],
                on: None,
            }),
            changed: watch::Sender::new(0),
            backoff: config.fallback_backoff,
            connect_timeout: config.connect_timeout,
            policy: config.fallback.clone(),
        })
    }

    /// The transports of this route, in order.
    pub(crate) fn transports(&self) -> &[Transport] {
        &self.transports
    }

    /// The transport the last successful call or reply used.
    pub(crate) fn on(&self) -> Option<Transport> {
        self.lock().on
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Chooses the transport for a call: the most preferred one that is up. Transports never
    /// tried, or whose back-off has run out, are probed in the background meanwhile; while
    /// none is up but some probe is still running, waits (up to `wait`) for news. When every
    /// candidate is down, the most preferred of them is tried anyway (the call reports why it
    /// fails). Callers leave at least one transport untried.
    async fn pick<C: RaftWireConfig>(
        self: &Arc<Self>,
        links: &[Arc<dyn Link<C>>],
        tried: &[bool],
        wait: Duration,
    ) -> usize {
        let until = Instant::now() + wait;
        let mut changed = self.changed.subscribe();
        loop {
            changed.mark_unchanged();
            let mut pending = None;
            let mut down = None;
            {
                let mut st = self.lock();
                let now = Instant::now();
                for i in 0..self.transports.len() {
                    if tried[i] {
                        continue;
                    }
                    match st.reach[i] {
                        Reach::Up => return i,
                        Reach::Probing => {
                            pending.get_or_insert(i);
                        }
                        Reach::Down { until } if until > now => {
                            down.get_or_insert(i);
                        }
                        Reach::Unknown | Reach::Down { .. } => {
                            st.reach[i] = Reach::Probing;
                            self.probe(i, links[i].clone());
                            pending.get_or_insert(i);
                        }
                    }
                }
            }
            let Some(first_pending) = pending else {
                return down.unwrap_or(0);
            };
            // The sender lives in `self`: `changed` cannot fail while we wait.
            if tokio::time::timeout_at(until, changed.changed()).await.is_err() {
                // Out of patience: the most preferred candidate still being probed.
                return first_pending;
            }
        }
    }

    /// Probes transport `i` in the background (bounded by `connect_timeout`).
    fn probe<C: RaftWireConfig>(self: &Arc<Self>, i: usize, link: Arc<dyn Link<C>>) {
        let route = self.clone();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return self.set(i, Reach::Unknown);
        };
        runtime.spawn(async move {
            match link.probe(route.connect_timeout).await {
                Ok(()) => {
                    let was = route.lock().on;
                    route.set(i, Reach::Up);
                    if was.is_some_and(|t| t != route.transports[i]) {
                        tracing::info!(
                            target_node = route.target,
                            transport = %route.transports[i],
                            "preferred transport connects again; new calls and sessions use it"
                        );
                    }
                }
                Err(e) => {
                    tracing::debug!(
                        target_node = route.target,
                        transport = %route.transports[i],
                        "probe failed: {e}; not used for {:?}",
                        route.backoff
                    );
                    route.set(
                        i,
                        Reach::Down {
                            until: Instant::now() + route.backoff,
                        },
                    );
                }
            }
        });
    }

    fn set(&self, i: usize, reach: Reach) {
        self.lock().reach[i] = reach;
        self.changed.send_modify(|v| *v += 1);
    }

    /// Whether a transport preferred to `i` is up.
    fn better_than(&self, i: usize) -> Option<Transport> {
        let st = self.lock();
        (0..i)
            .find(|&j| st.reach[j] == Reach::Up)
            .map(|j| self.transports[j])
    }

    /// Records a success on transport `i`.
    fn succeeded(&self, i: usize) {
        let mut st = self.lock();
        st.on = Some(self.transports[i]);
        if st.reach[i] != Reach::Up {
            st.reach[i] = Reach::Up;
            drop(st);
            self.changed.send_modify(|v| *v += 1);
        }
    }

    /// Records a failure on transport `i`; whether the policy says to fall back.
    fn failed(&self, i: usize, error: &TransportError) -> bool {
        if !self.policy.falls_back(error) {
            return false;
        }
        let next = self
            .transports
            .get(i + 1)
            .map(|t| t.name())
            .unwrap_or("none left");
        tracing::info!(
            target_node = self.target,
            transport = %self.transports[i],
            next,
            "transport failed toward the peer ({error}); falling back for {:?}",
            self.backoff
        );
        self.set(
            i,
            Reach::Down {
                until: Instant::now() + self.backoff,
            },
        );
        true
    }
}

/// The link of one client of a peer reachable over several transports.
pub(crate) struct Fallback<C: RaftWireConfig> {
    route: Arc<Route>,
    /// One per transport of the route, in the same order.
    links: Vec<Arc<dyn Link<C>>>,
}

impl<C: RaftWireConfig> Fallback<C> {
    pub(crate) fn new(route: Arc<Route>, links: Vec<Arc<dyn Link<C>>>) -> Self {
        debug_assert_eq!(route.transports.len(), links.len());
        Fallback { route, links }
    }

    /// Runs a call on the chosen transport; when it fails in a way the policy attributes to
    /// the transport, runs it again on the next one, within the same deadline.
    async fn run<'s, T>(
        &'s self,
        deadline: Duration,
        mut attempt: impl FnMut(&'s dyn Link<C>, Duration) -> BoxFuture<'s, Result<T, TransportError>>,
    ) -> Result<T, TransportError> {
        let start = Instant::now();
        let mut tried = vec![false; self.links.len()];
        loop {
            let left = deadline.saturating_sub(start.elapsed());
            let i = self.route.pick(&self.links, &tried, left).await;
            tried[i] = true;
            let left = deadline.saturating_sub(start.elapsed());
            match attempt(self.links[i].as_ref(), left).await {
                Ok(v) => {
                    self.route.succeeded(i);
                    return Ok(v);
                }
                Err(e) => {
                    if self.route.failed(i, &e) && tried.iter().any(|t| !t) && start.elapsed() < deadline {
                        continue;
                    }
                    return Err(e);
                }
            }
        }
    }
}

impl<C: RaftWireConfig> Link<C> for Fallback<C> {
    fn vote(
        &self,
        req: VoteRequest<C>,
        pre_vote: bool,
        deadline: Duration,
    ) -> BoxFuture<'_, Result<VoteResponse<C>, TransportError>> {
        Box::pin(self.run(deadline, move |link, left| link.vote(req.clone(), pre_vote, left)))
    }

    fn append(
        &self,
        req: AppendEntriesRequest<C>,
        deadline: Duration,
    ) -> BoxFuture<'_, Result<AppendEntriesResponse<C>, TransportError>> {
        // Not retried on the next transport: an `AppendEntriesRequest` cannot be cloned in
        // general (`Entry` is `Clone` only for `Clone` application data). A failure still
        // moves the next call.
        Box::pin(async move {
            let start = Instant::now();
            let tried = vec![false; self.links.len()];
            let i = self.route.pick(&self.links, &tried, deadline).await;
            let left = deadline.saturating_sub(start.elapsed());
            let result = self.links[i].append(req, left).await;
            match &result {
                Ok(_) => self.route.succeeded(i),
                Err(e) => {
                    self.route.failed(i, e);
                }
            }
            result
        })
    }

    fn transfer_leader(
        &self,
        req: TransferLeaderRequest<C>,
        deadline: Duration,
    ) -> BoxFuture<'_, Result<TransferLeaderResponse<C>, TransportError>> {
        Box::pin(self.run(deadline, move |link, left| {
            link.transfer_leader(req.clone(), left)
        }))
    }

    /// A session runs on one transport from start to end: the transport is chosen when it
    /// opens, a failure only moves the next session, and a session on a fallback ends (see
    /// `session_on`) once a preferred transport is up again.
    fn stream_append<'s>(
        &'s self,
        input: BoxStream<'static, AppendEntriesRequest<C>>,
        config: &'s Config,
        deadline: Duration,
        purpose: Purpose,
    ) -> BoxFuture<'s, Result<Replies<'s, C>, TransportError>> {
        Box::pin(async move {
            let start = Instant::now();
            let tried = vec![false; self.links.len()];
            let i = self.route.pick(&self.links, &tried, deadline).await;
            let left = deadline.saturating_sub(start.elapsed());
            let replies = match self.links[i].stream_append(input, config, left, purpose).await {
                Ok(replies) => replies,
                Err(e) => {
                    self.route.failed(i, &e);
                    return Err(e);
                }
            };
            Ok(session_on(self.route.clone(), i, replies))
        })
    }

    fn probe(&self, deadline: Duration) -> BoxFuture<'_, Result<(), TransportError>> {
        Box::pin(self.run(deadline, |link, left| link.probe(left)))
    }

    fn open_snapshot<'s>(
        &'s self,
        vote: VoteOf<C>,
        meta: SnapshotMetaOf<C>,
    ) -> BoxFuture<'s, Result<Box<dyn SnapshotUpload<C> + 's>, TransportError>> {
        // Opening a transfer waits at most a connect timeout for a transport to come up.
        let deadline = self.route.connect_timeout;
        Box::pin(self.run(deadline, move |link, _| link.open_snapshot(vote, meta.clone())))
    }
}

/// The replies of a session on transport `i`, each recorded on the route. When a transport
/// preferred to `i` comes up, the stream ends (between replies): openraft then opens the next
/// session, which goes to the preferred transport and resends whatever this one had not had
/// acknowledged (appending an entry twice is harmless). A session is never moved while it runs.
fn session_on<'s, C: RaftWireConfig>(route: Arc<Route>, i: usize, replies: Replies<'s, C>) -> Replies<'s, C> {
    let changed = route.changed.subscribe();
    Box::pin(futures::stream::unfold(
        (route, replies, changed),
        move |(route, mut replies, mut changed)| async move {
            loop {
                if let Some(better) = route.better_than(i) {
                    tracing::info!(
                        target_node = route.target,
                        from = %route.transports[i],
                        to = %better,
                        "ending the replication session to move it to the preferred transport"
                    );
                    return None;
                }
                tokio::select! {
                    reply = replies.next() => {
                        let reply = reply?;
                        match &reply {
                            Ok(_) => route.succeeded(i),
                            Err(e) => {
                                route.failed(i, e);
                            }
                        }
                        return Some((reply, (route, replies, changed)));
                    }
                    // The sender lives in `route`, which this stream holds.
                    _ = changed.changed() => {}
                }
            }
        },
    ))
}
