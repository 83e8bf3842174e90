//! The one client interface every transport implements, and the transport-independent parts
//! of calls made through it (snapshot chunking and checksums).
//!
//! A transport supplies a [`Connector`] (one per factory: shared client state such as a QUIC
//! endpoint) that hands out a [`Link`] per peer and purpose. [`Network`](crate::Network)
//! dispatches every openraft call through `Link` and never looks at which transport is behind
//! it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use openraft::alias::SnapshotMetaOf;
use openraft::alias::VoteOf;
use openraft::network::RPCTypes;
use openraft::raft::AppendEntriesRequest;
use openraft::raft::AppendEntriesResponse;
use openraft::raft::SnapshotResponse;
use openraft::raft::StreamAppendResult;
use openraft::raft::TransferLeaderRequest;
use openraft::raft::TransferLeaderResponse;
use openraft::raft::VoteRequest;
use openraft::raft::VoteResponse;
use tokio::io::AsyncSeekExt;

use crate::config::Config;
use crate::connect::Dialer;
use crate::error::TransportError;
use crate::snapshot::Digest;
use crate::snapshot::SnapshotData;
use crate::snapshot::Trailer;
use crate::stats::RpcKind;
use crate::stats::Stats;
use crate::types::RaftWireConfig;

/// Which connection of a peer a client uses. Heartbeats and snapshots get their own so that
/// neither waits behind bulk replication (on transports whose connections would otherwise
/// share head-of-line blocking).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Purpose {
    Replication,
    Heartbeat,
    Snapshot,
}

impl Purpose {
    /// What the metrics call the requests of a replication stream for this purpose.
    pub(crate) fn stream_kind(self) -> RpcKind {
        match self {
            Purpose::Heartbeat => RpcKind::Heartbeat,
            Purpose::Replication | Purpose::Snapshot => RpcKind::Append,
        }
    }
}

/// The replies of one pipelined replication session.
pub(crate) type Replies<'s, C> = BoxStream<'s, Result<StreamAppendResult<C>, TransportError>>;

/// A replication session's replies, each also told to the connection's dialer (timeouts in
/// a row evict a connection that went silent).
pub(crate) fn observed<'s, C, S, T>(session: S, dialer: &'s Dialer<T>) -> Replies<'s, C>
where
    C: RaftWireConfig,
    S: futures::Stream<Item = Result<StreamAppendResult<C>, TransportError>> + Send + 's,
    T: Clone + Send + Sync + 'static,
{
    use futures::StreamExt;
    Box::pin(session.inspect(move |r| dialer.observe(r)))
}

/// A transport's client side, made once per factory.
pub(crate) trait Connector<C: RaftWireConfig>: Send + Sync + 'static {
    /// A link to `target` at `addr` for `purpose`, recording through `stats` (made for this
    /// peer and transport). Must not connect: connections are made on first use.
    fn link(&self, addr: &str, target: u64, purpose: Purpose, stats: Stats) -> Arc<dyn Link<C>>;

    /// Whether one link carries every purpose (so the factory shares it across purposes).
    fn shares_purposes(&self) -> bool;
}

/// A connection (made lazily, remade after failures) to one peer, through which every call
/// goes. Every method enforces its own deadline.
pub(crate) trait Link<C: RaftWireConfig>: Send + Sync + 'static {
    /// A vote or pre-vote round trip.
    fn vote(
        &self,
        req: VoteRequest<C>,
        pre_vote: bool,
        deadline: Duration,
    ) -> BoxFuture<'_, Result<VoteResponse<C>, TransportError>>;

    /// One AppendEntries round trip outside a replication stream.
    fn append(
        &self,
        req: AppendEntriesRequest<C>,
        deadline: Duration,
    ) -> BoxFuture<'_, Result<AppendEntriesResponse<C>, TransportError>>;

    /// A transfer-leader round trip.
    fn transfer_leader(
        &self,
        req: TransferLeaderRequest<C>,
        deadline: Duration,
    ) -> BoxFuture<'_, Result<TransferLeaderResponse<C>, TransportError>>;

    /// Opens a replication stream and pipelines `input` over it (see `pipeline::run`).
    /// `deadline` bounds the opening and every wait for a reply; `purpose` tells heartbeats
    /// (which may be prioritized) from replication.
    fn stream_append<'s>(
        &'s self,
        input: BoxStream<'static, AppendEntriesRequest<C>>,
        config: &'s Config,
        deadline: Duration,
        purpose: Purpose,
    ) -> BoxFuture<'s, Result<Replies<'s, C>, TransportError>>;

    /// Makes sure a connection is up (dialling one if needed), within `deadline`: how the
    /// factory probes a transport in the background before moving calls onto it.
    fn probe(&self, deadline: Duration) -> BoxFuture<'_, Result<(), TransportError>>;

    /// Opens a snapshot transfer: the header is sent, data follows through the upload.
    fn open_snapshot<'s>(
        &'s self,
        vote: VoteOf<C>,
        meta: SnapshotMetaOf<C>,
    ) -> BoxFuture<'s, Result<Box<dyn SnapshotUpload<C> + 's>, TransportError>>;
}

/// The sending half of one snapshot transfer.
///
/// Dropping it before [`SnapshotUpload::finish`] returns must abort the transfer so the
/// receiver can tell it from a complete one (QUIC: reset the stream; gRPC: reset the call),
/// never end it cleanly.
pub(crate) trait SnapshotUpload<C: RaftWireConfig>: Send {
    /// Sends one chunk of data; resolves once the transport has taken it.
    fn send(&mut self, data: Bytes) -> BoxFuture<'_, Result<(), TransportError>>;

    /// Sends the trailer, ends the stream and waits for the receiver's answer.
    fn finish(&mut self, trailer: Trailer) -> BoxFuture<'_, Result<SnapshotResponse<C>, TransportError>>;
}

/// Streams `data` through `link` in chunks of `chunk_size`, then the trailer with its length
/// and CRC32C. `idle` bounds every step that must make progress (opening, reading and sending
/// each chunk, the answer after the last); a read error or a missed deadline drops the upload, which aborts
/// the transfer at the receiver.
pub(crate) async fn send_snapshot<C, SD>(
    link: &dyn Link<C>,
    vote: VoteOf<C>,
    meta: SnapshotMetaOf<C>,
    mut data: SD,
    chunk_size: usize,
    idle: Duration,
) -> Result<SnapshotResponse<C>, TransportError>
where
    C: RaftWireConfig,
    SD: SnapshotData,
{
    let rpc = RPCTypes::InstallSnapshot;
    let timeout = |_| TransportError::Timeout { rpc, after: idle };
    let mut upload = tokio::time::timeout(idle, link.open_snapshot(vote, meta))
        .await
        .map_err(timeout)??;
    data.seek(std::io::SeekFrom::Start(0))
        .await
        .map_err(TransportError::SnapshotRead)?;
    let mut digest = Digest::default();
    loop {
        // A data source that hangs is no progress either.
        let next = tokio::time::timeout(idle, crate::snapshot::next_chunk(&mut data, chunk_size))
            .await
            .map_err(timeout)?;
        let Some(chunk) = next.map_err(TransportError::SnapshotRead)? else {
            break;
        };
        digest.update(&chunk);
        tokio::time::timeout(idle, upload.send(chunk))
            .await
            .map_err(timeout)??;
    }
    tokio::time::timeout(idle, upload.finish(digest.trailer()))
        .await
        .map_err(timeout)?
}

/// A transport's link, with every call's outcome and round trip recorded in `stats` (made for
/// its peer and transport): the one place that records unary calls and snapshot transfers
/// (replication streams are recorded by the pipeline, which sees each reply).
pub(crate) struct Metered<C: RaftWireConfig> {
    inner: Arc<dyn Link<C>>,
    stats: Stats,
}

impl<C: RaftWireConfig> Metered<C> {
    pub(crate) fn new(inner: Arc<dyn Link<C>>, stats: Stats) -> Self {
        Metered { inner, stats }
    }

    async fn timed<T>(
        &self,
        kind: RpcKind,
        call: BoxFuture<'_, Result<T, TransportError>>,
    ) -> Result<T, TransportError> {
        let started = std::time::Instant::now();
        let outcome = call.await;
        self.stats.record_rpc(kind, &outcome, started.elapsed());
        outcome
    }
}

impl<C: RaftWireConfig> Link<C> for Metered<C> {
    fn vote(
        &self,
        req: VoteRequest<C>,
        pre_vote: bool,
        deadline: Duration,
    ) -> BoxFuture<'_, Result<VoteResponse<C>, TransportError>> {
        let kind = if pre_vote { RpcKind::PreVote } else { RpcKind::Vote };
        Box::pin(self.timed(kind, self.inner.vote(req, pre_vote, deadline)))
    }

    fn append(
        &self,
        req: AppendEntriesRequest<C>,
        deadline: Duration,
    ) -> BoxFuture<'_, Result<AppendEntriesResponse<C>, TransportError>> {
        Box::pin(self.timed(RpcKind::Append, self.inner.append(req, deadline)))
    }

    fn transfer_leader(
        &self,
        req: TransferLeaderRequest<C>,
        deadline: Duration,
    ) -> BoxFuture<'_, Result<TransferLeaderResponse<C>, TransportError>> {
        Box::pin(self.timed(RpcKind::TransferLeader, self.inner.transfer_leader(req, deadline)))
    }

    fn stream_append<'s>(
        &'s self,
        input: BoxStream<'static, AppendEntriesRequest<C>>,
        config: &'s Config,
        deadline: Duration,
        purpose: Purpose,
    ) -> BoxFuture<'s, Result<Replies<'s, C>, TransportError>> {
        Box::pin(async move {
            let opened = self.inner.stream_append(input, config, deadline, purpose).await;
            if let Err(e) = &opened {
                self.stats.record_error(purpose.stream_kind(), e);
            }
            opened
        })
    }

    fn probe(&self, deadline: Duration) -> BoxFuture<'_, Result<(), TransportError>> {
        self.inner.probe(deadline)
    }

    fn open_snapshot<'s>(
        &'s self,
        vote: VoteOf<C>,
        meta: SnapshotMetaOf<C>,
    ) -> BoxFuture<'s, Result<Box<dyn SnapshotUpload<C> + 's>, TransportError>> {
        Box::pin(async move {
            let started = std::time::Instant::now();
            match self.inner.open_snapshot(vote, meta).await {
                Ok(inner) => {
                    let upload: Box<dyn SnapshotUpload<C> + 's> = Box::new(MeteredUpload {
                        inner,
                        stats: &self.stats,
                        started,
                        done: false,
                    });
                    Ok(upload)
                }
                Err(e) => {
                    self.stats.record_error(RpcKind::Snapshot, &e);
                    Err(e)
                }
            }
        })
    }
}

/// A snapshot upload that records the bytes it sends and how the transfer ended: completed,
/// failed, or abandoned (dropped before its answer: cancelled or timed out by the caller).
struct MeteredUpload<'s, C: RaftWireConfig> {
    inner: Box<dyn SnapshotUpload<C> + 's>,
    stats: &'s Stats,
    started: std::time::Instant,
    /// Whether the outcome is recorded.
    done: bool,
}

impl<C: RaftWireConfig> SnapshotUpload<C> for MeteredUpload<'_, C> {
    fn send(&mut self, data: Bytes) -> BoxFuture<'_, Result<(), TransportError>> {
        Box::pin(async move {
            let n = data.len();
            let sent = self.inner.send(data).await;
            match &sent {
                Ok(()) => self.stats.record_snapshot_bytes(n),
                Err(e) if !self.done => {
                    self.done = true;
                    self.stats.record_error(RpcKind::Snapshot, e);
                }
                Err(_) => {}
            }
            sent
        })
    }

    fn finish(&mut self, trailer: Trailer) -> BoxFuture<'_, Result<SnapshotResponse<C>, TransportError>> {
        Box::pin(async move {
            let answer = self.inner.finish(trailer).await;
            if !self.done {
                self.done = true;
                let took = self.started.elapsed();
                self.stats.record_rpc(RpcKind::Snapshot, &answer, took);
                if answer.is_ok() {
                    self.stats.record_snapshot_sent(took);
                }
            }
            answer
        })
    }
}

impl<C: RaftWireConfig> Drop for MeteredUpload<'_, C> {
    fn drop(&mut self) {
        if !self.done {
            self.stats.record_failure(RpcKind::Snapshot, "abandoned");
        }
    }
}
