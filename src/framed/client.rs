//! The client side of exchanges in frames, on whatever halves a transport opened: one-off
//! calls, pipelined replication sessions and snapshot uploads.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use openraft::network::RPCTypes;
use openraft::raft::AppendEntriesRequest;
use openraft::raft::AppendEntriesResponse;
use openraft::raft::SnapshotResponse;
use openraft::raft::StreamAppendResult;
use openraft::raft::TransferLeaderRequest;
use openraft::raft::TransferLeaderResponse;
use openraft::raft::VoteRequest;
use openraft::raft::VoteResponse;

use super::FrameReader;
use super::Outgoing;
use super::ReadError;
use super::RecvHalf;
use super::SendHalf;
use super::WriteError;
use crate::codec::FrameError;
use crate::codec::Message;
use crate::config::Config;
use crate::error::TransportError;
use crate::error::error_chain;
use crate::error::handshake_refusal;
use crate::link::Purpose;
use crate::link::SnapshotUpload;
use crate::pipeline;
use crate::pipeline::RequestSink;
use crate::pipeline::SendError;
use crate::snapshot::Trailer;
use crate::stats::Stats;
use crate::types::RaftWireConfig;

/// A transport's one-off calls: one request and its reply on an exchange of their own, within
/// `deadline`. The typed calls below follow from it.
pub(crate) trait Calls<C: RaftWireConfig>: Sync {
    fn exchange(
        &self,
        rpc: RPCTypes,
        deadline: Duration,
        msg: Message<C>,
    ) -> impl Future<Output = Result<Message<C>, TransportError>> + Send;
}

/// A vote or pre-vote round trip.
pub(crate) async fn vote<C: RaftWireConfig>(
    t: &impl Calls<C>,
    req: VoteRequest<C>,
    pre_vote: bool,
    deadline: Duration,
) -> Result<VoteResponse<C>, TransportError> {
    let msg = if pre_vote {
        Message::PreVote(req)
    } else {
        Message::Vote(req)
    };
    match t.exchange(RPCTypes::Vote, deadline, msg).await? {
        Message::VoteReply(r) => Ok(r),
        other => Err(unexpected(RPCTypes::Vote, &other)),
    }
}

/// One AppendEntries round trip outside a replication session.
pub(crate) async fn append<C: RaftWireConfig>(
    t: &impl Calls<C>,
    req: AppendEntriesRequest<C>,
    deadline: Duration,
) -> Result<AppendEntriesResponse<C>, TransportError> {
    let rpc = RPCTypes::AppendEntries;
    match t.exchange(rpc, deadline, Message::Append(req)).await? {
        Message::AppendReply(r) => Ok(r),
        other => Err(unexpected(rpc, &other)),
    }
}

/// A transfer-leader round trip.
pub(crate) async fn transfer_leader<C: RaftWireConfig>(
    t: &impl Calls<C>,
    req: TransferLeaderRequest<C>,
    deadline: Duration,
) -> Result<TransferLeaderResponse<C>, TransportError> {
    let rpc = RPCTypes::TransferLeader;
    match t.exchange(rpc, deadline, Message::TransferLeader(req)).await? {
        Message::TransferLeaderReply(r) => Ok(r),
        other => Err(unexpected(rpc, &other)),
    }
}

/// One request, one reply, on an exchange the transport just opened.
pub(crate) async fn call<C, W, R>(
    addr: &str,
    rpc: RPCTypes,
    mut send: Outgoing<W>,
    mut reader: FrameReader<R>,
    msg: Message<C>,
    max_len: usize,
) -> Result<Message<C>, TransportError>
where
    C: RaftWireConfig,
    W: SendHalf,
    R: RecvHalf,
{
    send.write_last(0, &msg, max_len)
        .await
        .map_err(|e| write_failed(addr, rpc, e))?;
    let answer = reply(addr, rpc, 0, reader.next::<C>().await)?;
    reader.end::<C>().await.map_err(|e| read_failed(addr, rpc, e))?;
    Ok(answer)
}

/// A pipelined replication session (see `pipeline::run`) on an exchange the transport just
/// opened: the n-th request carries id n, and so does its reply.
#[allow(clippy::too_many_arguments)]
pub(crate) fn stream_append<'s, C, W, R>(
    addr: &'s str,
    send: Outgoing<W>,
    reader: FrameReader<R>,
    input: BoxStream<'static, AppendEntriesRequest<C>>,
    config: &Config,
    deadline: Duration,
    purpose: Purpose,
    max_len: usize,
    stats: Stats,
) -> impl futures::Stream<Item = Result<StreamAppendResult<C>, TransportError>> + Send + 's
where
    C: RaftWireConfig,
    W: SendHalf + 's,
    R: RecvHalf + 's,
{
    let rpc = RPCTypes::AppendEntries;
    let replies = futures::stream::unfold((reader, 0u64), move |(mut reader, id)| async move {
        let item = match reader.next::<C>().await {
            Ok(None) => return None,
            next => reply(addr, rpc, id, next).and_then(|m| match m {
                Message::StreamAppendReply(r) => Ok(r),
                other => Err(unexpected(rpc, &other)),
            }),
        };
        Some((item, (reader, id + 1)))
    });
    let sink = StreamSink {
        addr,
        send,
        next_id: 0,
        max_len,
    };
    pipeline::run(
        input,
        sink,
        Box::pin(replies),
        config.window(),
        deadline,
        stats,
        purpose.stream_kind(),
    )
}

/// Starts a snapshot upload on an exchange the transport just opened: the header goes out
/// now, chunks and the trailer through the upload.
pub(crate) async fn open_snapshot<'s, C, W, R>(
    addr: &'s str,
    mut send: Outgoing<W>,
    reader: FrameReader<R>,
    vote: openraft::alias::VoteOf<C>,
    meta: openraft::alias::SnapshotMetaOf<C>,
    max_len: usize,
) -> Result<Box<dyn SnapshotUpload<C> + 's>, TransportError>
where
    C: RaftWireConfig,
    W: SendHalf + 's,
    R: RecvHalf + 's,
{
    send.write(0, &Message::<C>::SnapshotMeta { vote, meta }, max_len)
        .await
        .map_err(|e| write_failed(addr, RPCTypes::InstallSnapshot, e))?;
    Ok(Box::new(Upload {
        addr,
        send,
        reader,
        next_id: 1,
        max_len,
    }))
}

/// A snapshot upload: chunk frames, then the trailer. Dropped unfinished, the exchange is
/// aborted.
struct Upload<'a, W: SendHalf, R> {
    addr: &'a str,
    send: Outgoing<W>,
    reader: FrameReader<R>,
    next_id: u64,
    max_len: usize,
}

impl<C: RaftWireConfig, W: SendHalf, R: RecvHalf> SnapshotUpload<C> for Upload<'_, W, R> {
    fn send(&mut self, data: Bytes) -> BoxFuture<'_, Result<(), TransportError>> {
        Box::pin(async move {
            let id = self.next_id;
            self.next_id += 1;
            self.send
                .write(id, &Message::<C>::SnapshotChunk(data), self.max_len)
                .await
                .map(|_| ())
                .map_err(|e| write_failed(self.addr, RPCTypes::InstallSnapshot, e))
        })
    }

    fn finish(&mut self, trailer: Trailer) -> BoxFuture<'_, Result<SnapshotResponse<C>, TransportError>> {
        Box::pin(async move {
            let rpc = RPCTypes::InstallSnapshot;
            self.send
                .write_last(self.next_id, &Message::<C>::SnapshotEnd(trailer), self.max_len)
                .await
                .map_err(|e| write_failed(self.addr, rpc, e))?;
            // The receiver answers under the id of the exchange's first frame, the meta's: 0.
            let answer = match reply(self.addr, rpc, 0, self.reader.next::<C>().await)? {
                Message::SnapshotAck(r) => r,
                other => return Err(unexpected(rpc, &other)),
            };
            self.reader
                .end::<C>()
                .await
                .map_err(|e| read_failed(self.addr, rpc, e))?;
            Ok(answer)
        })
    }
}

struct StreamSink<'a, W: SendHalf> {
    addr: &'a str,
    send: Outgoing<W>,
    next_id: u64,
    max_len: usize,
}

impl<C: RaftWireConfig, W: SendHalf> RequestSink<C> for StreamSink<'_, W> {
    async fn send(&mut self, req: AppendEntriesRequest<C>) -> Result<usize, SendError<C>> {
        let msg = Message::StreamAppend(req);
        match self.send.write(self.next_id, &msg, self.max_len).await {
            Ok(size) => {
                self.next_id += 1;
                Ok(size)
            }
            // Refused by the encoder before a byte was written: the stream is intact.
            Err(WriteError::Frame(FrameError::TooLarge { len, max })) => {
                let size = usize::try_from(len).unwrap_or(usize::MAX);
                match msg {
                    Message::StreamAppend(req) => Err(SendError::TooLarge { req, size, max }),
                    _ => Err(SendError::Failed(TransportError::TooLarge { size, max })),
                }
            }
            Err(e) => Err(SendError::Failed(write_failed(
                self.addr,
                RPCTypes::AppendEntries,
                e,
            ))),
        }
    }

    async fn finish(&mut self) -> Result<(), TransportError> {
        self.send
            .finish()
            .await
            .map_err(|e| write_failed(self.addr, RPCTypes::AppendEntries, e))
    }
}

/// The reply frame to request `expected`, or the error the peer sent instead. A reply under
/// another request id is a protocol error; an error frame may carry id 0 (a refusal that
/// answers whatever the exchange was for).
pub(crate) fn reply<C: RaftWireConfig>(
    addr: &str,
    rpc: RPCTypes,
    expected: u64,
    next: Result<Option<(u64, Message<C>)>, ReadError>,
) -> Result<Message<C>, TransportError> {
    match next {
        Ok(Some((id, Message::Error { code, message }))) if id == 0 || id == expected => {
            Err(TransportError::Remote {
                rpc,
                reason: format!("{code:?}: {message}"),
            })
        }
        Ok(Some((id, msg))) if id != expected => Err(TransportError::Broken {
            rpc,
            reason: format!(
                "the peer answered request {expected} with a {:?} frame for request {id}",
                msg.kind()
            ),
        }),
        Ok(Some((_, msg))) => Ok(msg),
        Ok(None) => Err(TransportError::Broken {
            rpc,
            reason: "the peer ended the exchange without replying".into(),
        }),
        Err(e) => Err(read_failed(addr, rpc, e)),
    }
}

fn read_failed(addr: &str, rpc: RPCTypes, e: ReadError) -> TransportError {
    match e {
        ReadError::Frame(FrameError::Body { source, .. }) => TransportError::Decode { rpc, source },
        other => failed(addr, rpc, other),
    }
}

/// A frame of a kind the exchange does not expect here.
pub(crate) fn unexpected<C: RaftWireConfig>(rpc: RPCTypes, msg: &Message<C>) -> TransportError {
    TransportError::Broken {
        rpc,
        reason: format!("unexpected {:?} frame in reply", msg.kind()),
    }
}

/// An exchange that failed: `Connect` when the connection under it was refused (the server
/// checks our certificate only after our side of the handshake is done, so its refusal can
/// end the first exchange), `Broken` otherwise.
pub(crate) fn failed(addr: &str, rpc: RPCTypes, e: impl std::error::Error + 'static) -> TransportError {
    match handshake_refusal(&e) {
        Some(reason) => TransportError::Connect {
            addr: addr.to_string(),
            reason,
        },
        None => TransportError::Broken {
            rpc,
            reason: error_chain(&e),
        },
    }
}

fn write_failed(addr: &str, rpc: RPCTypes, e: WriteError) -> TransportError {
    match e {
        WriteError::Frame(FrameError::Encode(e)) => TransportError::Encode(e),
        other => failed(addr, rpc, other),
    }
}
