//! The server core every transport serves through.
//!
//! A transport decodes requests off its wire and hands them here with the caller's identity;
//! this module makes every check a server owes its peers (the caller speaks only for itself,
//! snapshots are installed only when whole and verified) and bridges into the local `Raft`.
//! What comes back is either openraft's answer or a [`Refusal`] the transport encodes in its
//! own way (a gRPC status, an error frame). Nothing here knows about sockets or framing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use futures::Stream;
use futures::StreamExt;
use openraft::Raft;
use openraft::Snapshot;
use openraft::alias::SnapshotMetaOf;
use openraft::alias::VoteOf;
use openraft::raft::AppendEntriesRequest;
use openraft::raft::AppendEntriesResponse;
use openraft::raft::SnapshotResponse;
use openraft::raft::StreamAppendResult;
use openraft::raft::TransferLeaderRequest;
use openraft::raft::TransferLeaderResponse;
use openraft::raft::VoteRequest;
use openraft::raft::VoteResponse;
use openraft::storage::RaftStateMachine;
use tokio::io::AsyncSeekExt;
use tokio::io::AsyncWriteExt;

use crate::config::Config;
use crate::snapshot::Digest;
use crate::snapshot::Part;
use crate::snapshot::Receiving;
use crate::snapshot::SnapshotData;
use crate::snapshot::SnapshotSink;
use crate::tls;
use crate::types::RaftWireConfig;

/// The class of a refusal; each transport maps it onto its own error vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RefusalKind {
    /// The request did not parse, decode or verify.
    BadRequest,
    /// The request exceeded a size limit.
    TooLarge,
    /// The caller may not make this request (it speaks for another node).
    Forbidden,
    /// A message of a kind that is not valid at this point of the exchange.
    UnexpectedKind,
    /// The local Raft refused the request or has stopped.
    Unavailable,
    /// The peer made no progress within the deadline.
    Timeout,
    /// The server failed on its own (storage, encoding its reply).
    Internal,
    /// The stream or connection broke under a session already under way (the peer abandoned
    /// it, reset it, or went away): no misbehaviour, and nobody left to answer.
    Broken,
}

/// Why the server did not serve a request: sent to the caller, and logged once here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub(crate) struct Refusal {
    pub(crate) kind: RefusalKind,
    pub(crate) message: String,
}

impl Refusal {
    pub(crate) fn new(kind: RefusalKind, message: impl ToString) -> Self {
        Refusal {
            kind,
            message: message.to_string(),
        }
    }
}

/// Who is calling: the node id from its verified certificate (`None` on a plaintext server)
/// and its address.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Caller {
    pub(crate) node_id: Option<u64>,
    pub(crate) addr: SocketAddr,
}

impl Caller {
    /// Refuses a request made on behalf of a node other than the caller, or on behalf of the
    /// receiving node itself (`local`): no peer ever speaks for us, and openraft's engine
    /// panics on some requests carrying its own committed vote (a snapshot install makes it
    /// "follow" itself while it leads).
    fn check(&self, rpc: &str, local: u64, claimed: u64) -> Result<(), Refusal> {
        let refused = if claimed == local {
            Err(format!("the request speaks for node {claimed}, this node itself"))
        } else {
            tls::speaks_for(self.node_id, claimed)
        };
        refused
            .map_err(|e| Refusal::new(RefusalKind::Forbidden, e))
            .inspect_err(|r| self.log(rpc, r))
    }

    fn log(&self, rpc: &str, r: &Refusal) {
        let node = self
            .node_id
            .map_or_else(|| "unauthenticated".to_string(), |n| n.to_string());
        match r.kind {
            // The local Raft said no (it is stopping, say), or a session ended with its
            // stream: the caller did nothing wrong.
            RefusalKind::Unavailable | RefusalKind::Broken => {
                tracing::info!(rpc, node = %node, addr = %self.addr, "not served: {}", r.message)
            }
            _ => {
                tracing::warn!(rpc, node = %node, addr = %self.addr, kind = ?r.kind, "refusing a request: {}", r.message)
            }
        }
    }
}

/// A refusal the transport makes itself (a request that does not decode), logged like the
/// core's own.
pub(crate) fn refuse(caller: &Caller, rpc: &str, kind: RefusalKind, message: impl ToString) -> Refusal {
    let r = Refusal::new(kind, message);
    caller.log(rpc, &r);
    r
}

/// Serves one `Raft` to every transport.
pub(crate) struct Service<C: RaftWireConfig, SM: RaftStateMachine<C>> {
    raft: Raft<C, SM>,
    /// This node's id: no request may speak for it.
    local_id: u64,
    sink: Arc<dyn SnapshotSink<SM::SnapshotData>>,
    /// How long an incoming snapshot may make no progress.
    snapshot_idle: Duration,
}

impl<C, SM> Service<C, SM>
where
    C: RaftWireConfig,
    SM: RaftStateMachine<C>,
    SM::SnapshotData: SnapshotData,
{
    pub(crate) fn new(
        raft: Raft<C, SM>,
        sink: Arc<dyn SnapshotSink<SM::SnapshotData>>,
        config: &Config,
    ) -> Self {
        let local_id = {
            use openraft::async_runtime::watch::WatchReceiver;
            raft.metrics().borrow_watched().id
        };
        Service {
            raft,
            local_id,
            sink,
            snapshot_idle: config.snapshot_idle_timeout,
        }
    }

    fn raft_failed(caller: &Caller, rpc: &str, e: impl std::fmt::Display) -> Refusal {
        let r = Refusal::new(RefusalKind::Unavailable, format!("raft: {e}"));
        caller.log(rpc, &r);
        r
    }

    pub(crate) async fn vote(
        &self,
        caller: Caller,
        req: VoteRequest<C>,
        pre_vote: bool,
    ) -> Result<VoteResponse<C>, Refusal> {
        let rpc = if pre_vote { "PreVote" } else { "Vote" };
        caller.check(rpc, self.local_id, req.vote.leader_id.node_id)?;
        let resp = if pre_vote {
            self.raft.pre_vote(req).await
        } else {
            self.raft.vote(req).await
        };
        resp.map_err(|e| Self::raft_failed(&caller, rpc, e))
    }

    pub(crate) async fn append(
        &self,
        caller: Caller,
        req: AppendEntriesRequest<C>,
    ) -> Result<AppendEntriesResponse<C>, Refusal> {
        caller.check("AppendEntries", self.local_id, req.vote.leader_id.node_id)?;
        self.raft
            .append_entries(req)
            .await
            .map_err(|e| Self::raft_failed(&caller, "AppendEntries", e))
    }

    pub(crate) async fn transfer_leader(
        &self,
        caller: Caller,
        req: TransferLeaderRequest<C>,
    ) -> Result<TransferLeaderResponse<C>, Refusal> {
        caller.check(
            "TransferLeader",
            self.local_id,
            req.from_leader().leader_id.node_id,
        )?;
        self.raft
            .handle_transfer_leader(req)
            .await
            .map_err(|e| Self::raft_failed(&caller, "TransferLeader", e))
    }

    /// Bridges an incoming replication stream into `Raft::stream_append`.
    ///
    /// Requests are fed to Raft as they arrive. The first input error (a request that does
    /// not decode, a broken stream) or a request speaking for another node ends the input;
    /// that refusal is yielded after the replies to every earlier request, so nothing
    /// accepted goes unanswered. Replies come in request order, one per request.
    pub(crate) fn stream_append<S>(
        &self,
        caller: Caller,
        input: S,
    ) -> impl Stream<Item = Result<StreamAppendResult<C>, Refusal>> + Send + 'static
    where
        S: Stream<Item = Result<AppendEntriesRequest<C>, Refusal>> + Send + 'static,
    {
        let failure: Arc<Mutex<Option<Refusal>>> = Arc::default();
        let input_failure = failure.clone();
        let local = self.local_id;
        let input = input.scan((), move |_, item| {
            let checked = item.and_then(|req| {
                caller
                    .check("StreamAppend", local, req.vote.leader_id.node_id)
                    .map(|()| req)
            });
            let next = match checked {
                Ok(req) => Some(req),
                Err(refusal) => {
                    if refusal.kind != RefusalKind::Forbidden {
                        // `check` logged its own refusal; input errors are logged here.
                        caller.log("StreamAppend", &refusal);
                    }
                    *input_failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(refusal);
                    None
                }
            };
            futures::future::ready(next)
        });
        let replies = self
            .raft
            .stream_append(Box::pin(input))
            .map(move |r| r.map_err(|e| Self::raft_failed(&caller, "StreamAppend", e)));
        let trailer =
            futures::stream::once(async move { failure.lock().unwrap_or_else(|p| p.into_inner()).take() })
                .filter_map(|f| futures::future::ready(f.map(Err)));
        replies.chain(trailer)
    }

    /// Receives a snapshot's data, verifies it against the sender's trailer and installs it.
    ///
    /// `parts` yields the data chunks and then the trailer. The data is installed only when
    /// the trailer arrived and the length and CRC32C match; on every other outcome (an input
    /// error, a clean end without a trailer, anything after the trailer, no progress within
    /// the idle deadline, a local write failure) the sink's `abort` is called and nothing
    /// reaches Raft.
    pub(crate) async fn install_snapshot<S>(
        &self,
        caller: Caller,
        vote: VoteOf<C>,
        meta: SnapshotMetaOf<C>,
        parts: S,
    ) -> Result<SnapshotResponse<C>, Refusal>
    where
        S: Stream<Item = Result<Part, Refusal>> + Send,
    {
        let rpc = "InstallSnapshot";
        caller.check(rpc, self.local_id, vote.leader_id.node_id)?;
        let mut receiving = Receiving::create(self.sink.clone()).await.map_err(|e| {
            refuse(
                &caller,
                rpc,
                RefusalKind::Internal,
                format!("cannot create snapshot data: {e}"),
            )
        })?;
        match self.receive(&mut receiving, parts).await {
            Ok(digest) => {
                let data = receiving
                    .complete()
                    .map_err(|e| refuse(&caller, rpc, RefusalKind::Internal, e))?;
                let trailer = digest.trailer();
                tracing::info!(
                    bytes = trailer.length,
                    crc32c = format_args!("{:08x}", trailer.crc32c),
                    from = ?caller.node_id,
                    "snapshot received and verified, installing"
                );
                self.raft
                    .install_full_snapshot(vote, Snapshot { meta, snapshot: data })
                    .await
                    .map_err(|e| Self::raft_failed(&caller, rpc, e))
            }
            Err(refusal) => {
                caller.log(rpc, &refusal);
                receiving.abort(&refusal.to_string()).await;
                Err(refusal)
            }
        }
    }

    /// Writes every data part and checks the trailer; the digest of what was written.
    async fn receive<S>(
        &self,
        receiving: &mut Receiving<SM::SnapshotData>,
        parts: S,
    ) -> Result<Digest, Refusal>
    where
        S: Stream<Item = Result<Part, Refusal>> + Send,
    {
        let internal = |what: &str, e: std::io::Error| {
            Refusal::new(RefusalKind::Internal, format!("{what} snapshot data failed: {e}"))
        };
        let mut parts = std::pin::pin!(parts);
        let mut digest = Digest::default();
        loop {
            let next = tokio::time::timeout(self.snapshot_idle, parts.next())
                .await
                .map_err(|_| {
                    Refusal::new(
                        RefusalKind::Timeout,
                        format!("snapshot transfer made no progress for {:?}", self.snapshot_idle),
                    )
                })?;
            match next {
                Some(Ok(Part::Data(bytes))) => {
                    let data = receiving.data().map_err(|e| internal("writing", e))?;
                    data.write_all(&bytes).await.map_err(|e| internal("writing", e))?;
                    digest.update(&bytes);
                }
                Some(Ok(Part::End(trailer))) => {
                    digest
                        .verify(&trailer)
                        .map_err(|e| Refusal::new(RefusalKind::BadRequest, e))?;
                    break;
                }
                Some(Err(refusal)) => return Err(refusal),
                None => {
                    return Err(Refusal::new(
                        RefusalKind::BadRequest,
                        format!(
                            "snapshot truncated: the stream ended after {} bytes without the closing trailer",
                            digest.trailer().length
                        ),
                    ));
                }
            }
        }
        // Whatever follows the trailer would be data outside the verified snapshot.
        if let Ok(Some(extra)) = tokio::time::timeout(self.snapshot_idle, parts.next()).await {
            let what = match extra {
                Ok(Part::Data(_)) => "data".to_string(),
                Ok(Part::End(_)) => "a second trailer".to_string(),
                Err(e) => return Err(e),
            };
            return Err(Refusal::new(
                RefusalKind::UnexpectedKind,
                format!("{what} after the snapshot trailer"),
            ));
        }
        let data = receiving.data().map_err(|e| internal("flushing", e))?;
        data.flush().await.map_err(|e| internal("flushing", e))?;
        data.seek(std::io::SeekFrom::Start(0))
            .await
            .map_err(|e| internal("rewinding", e))?;
        Ok(digest)
    }
}
