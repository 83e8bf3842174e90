//! The gRPC server side: forwards every RPC to the local `Raft`.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;

use futures::Stream;
use futures::StreamExt;
use openraft::Raft;
use openraft::Snapshot;
use openraft::storage::RaftStateMachine;
use tokio::io::AsyncSeekExt;
use tokio::io::AsyncWriteExt;
use tonic::Code;
use tonic::Request;
use tonic::Response;
use tonic::Status;
use tonic::Streaming;

use super::ERROR_MARK;
use super::convert;
use super::pb;
use super::serve::Caller;
use crate::error::DecodeError;
use crate::snapshot::SnapshotData;
use crate::snapshot::SnapshotSink;
use crate::tls;
use crate::types::RaftWireConfig;

/// Serves one `Raft` over gRPC.
pub(crate) struct RaftService<C: RaftWireConfig, SM: RaftStateMachine<C>> {
    raft: Raft<C, SM>,
    sink: Arc<dyn SnapshotSink<SM::SnapshotData>>,
}

impl<C: RaftWireConfig, SM: RaftStateMachine<C>> RaftService<C, SM> {
    pub(crate) fn new(raft: Raft<C, SM>, sink: Arc<dyn SnapshotSink<SM::SnapshotData>>) -> Self {
        RaftService { raft, sink }
    }
}

/// Marks a status as raftwire's own answer, so the client tells it from a broken connection.
fn marked(mut status: Status) -> Status {
    status
        .metadata_mut()
        .insert(ERROR_MARK, tonic::metadata::MetadataValue::from_static("1"));
    status
}

/// A request that does not decode: logged, and answered with `InvalidArgument` naming the field.
fn bad_request(rpc: &str, e: DecodeError) -> Status {
    tracing::warn!(rpc, field = e.field(), "refusing malformed request: {e}");
    marked(Status::invalid_argument(format!("{rpc}: {e}")))
}

fn raft_failed(rpc: &str, e: impl std::fmt::Display) -> Status {
    tracing::warn!(rpc, "local raft failed the request: {e}");
    marked(Status::unavailable(format!("{rpc}: raft: {e}")))
}

/// tonic refuses a message over the decoding limit with `OutOfRange` (the only source of that
/// code here: no handler returns it); raftwire's contract is `ResourceExhausted`, the gRPC code
/// for "larger than the server accepts".
fn is_oversize(code: Code) -> bool {
    code == Code::OutOfRange
}

/// Rewrites tonic's oversize refusal of a request to `ResourceExhausted`, marked as raftwire's
/// own answer, and logs it. tonic reports the status in the response headers or, once it has
/// started the response, in the trailers; both are covered.
pub(crate) fn remap_oversize(resp: http::Response<tonic::body::Body>) -> http::Response<tonic::body::Body> {
    let (mut parts, body) = resp.into_parts();
    remap_status(&mut parts.headers);
    http::Response::from_parts(parts, tonic::body::Body::new(RemapTrailers(body)))
}

fn remap_status(h: &mut http::HeaderMap) {
    let code = h
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok());
    let message = h.get("grpc-message").and_then(|v| v.to_str().ok()).unwrap_or("");
    if code.is_some_and(|c| is_oversize(Code::from(c))) {
        tracing::warn!("refusing oversized request: {message}");
        h.insert(
            "grpc-status",
            http::HeaderValue::from(Code::ResourceExhausted as i32),
        );
        h.insert(ERROR_MARK, http::HeaderValue::from_static("1"));
    }
}

/// A response body whose trailers go through [`remap_status`].
struct RemapTrailers(tonic::body::Body);

impl http_body::Body for RemapTrailers {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.0).poll_frame(cx).map(|frame| {
            frame.map(|f| {
                f.map(|frame| match frame.into_trailers() {
                    Ok(mut trailers) => {
                        remap_status(&mut trailers);
                        http_body::Frame::trailers(trailers)
                    }
                    Err(frame) => frame,
                })
            })
        })
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.0.size_hint()
    }
}

/// The calling node's id, from its TLS certificate (`None` on a plaintext server).
fn caller<T>(req: &Request<T>) -> Option<Caller> {
    req.extensions().get::<Caller>().copied()
}

/// Refuses a request made on behalf of a node other than the caller (see [`tls::speaks_for`]).
fn check_caller(rpc: &str, caller: Option<Caller>, claimed: u64) -> Result<(), Status> {
    tls::speaks_for(caller.map(|c| c.node_id), claimed).map_err(|e| {
        let addr = caller.map(|c| c.addr.to_string()).unwrap_or_default();
        tracing::warn!(rpc, %addr, "refusing a request: {e}");
        marked(Status::permission_denied(format!("{rpc}: {e}")))
    })
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<pb::StreamAppendReply, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl<C, SM> pb::raft_server::Raft for RaftService<C, SM>
where
    C: RaftWireConfig,
    SM: RaftStateMachine<C>,
    SM::SnapshotData: SnapshotData,
{
    async fn vote(&self, req: Request<pb::VoteRequest>) -> Result<Response<pb::VoteResponse>, Status> {
        let caller = caller(&req);
        let req = convert::vote_request_from_pb::<C>(req.into_inner()).map_err(|e| bad_request("Vote", e))?;
        check_caller("Vote", caller, req.vote.leader_id.node_id)?;
        let resp = self.raft.vote(req).await.map_err(|e| raft_failed("Vote", e))?;
        Ok(Response::new(convert::vote_response_to_pb(&resp)))
    }

    async fn pre_vote(&self, req: Request<pb::VoteRequest>) -> Result<Response<pb::VoteResponse>, Status> {
        let caller = caller(&req);
        let req =
            convert::vote_request_from_pb::<C>(req.into_inner()).map_err(|e| bad_request("PreVote", e))?;
        check_caller("PreVote", caller, req.vote.leader_id.node_id)?;
        let resp = self
            .raft
            .pre_vote(req)
            .await
            .map_err(|e| raft_failed("PreVote", e))?;
        Ok(Response::new(convert::vote_response_to_pb(&resp)))
    }

    async fn append_entries(
        &self,
        req: Request<pb::AppendEntriesRequest>,
    ) -> Result<Response<pb::AppendEntriesResponse>, Status> {
        let caller = caller(&req);
        let req = convert::append_request_from_pb::<C>(req.into_inner())
            .map_err(|e| bad_request("AppendEntries", e))?;
        check_caller("AppendEntries", caller, req.vote.leader_id.node_id)?;
        let resp = self
            .raft
            .append_entries(req)
            .await
            .map_err(|e| raft_failed("AppendEntries", e))?;
        Ok(Response::new(convert::append_response_to_pb(&resp)))
    }

    type StreamAppendStream = ReplyStream;

    async fn stream_append(
        &self,
        req: Request<Streaming<pb::AppendEntriesRequest>>,
    ) -> Result<Response<Self::StreamAppendStream>, Status> {
        // Requests are decoded as they arrive and fed straight to Raft. The first one that
        // does not decode (or a broken stream) ends the input; its error is reported after the
        // replies to every earlier request, so nothing accepted goes unanswered.
        let failure: Arc<Mutex<Option<Status>>> = Arc::default();
        let input_failure = failure.clone();
        let caller = caller(&req);
        let input = req.into_inner().scan(0usize, move |seq, item| {
            let i = *seq;
            *seq += 1;
            let decoded = match item {
                Ok(msg) => convert::append_request_from_pb::<C>(msg)
                    .map_err(|e| bad_request("StreamAppend", e.within(&format!("request[{i}]"))))
                    .and_then(|req| {
                        check_caller("StreamAppend", caller, req.vote.leader_id.node_id).map(|()| req)
                    }),
                Err(status) if is_oversize(status.code()) => {
                    tracing::warn!(
                        "StreamAppend: refusing oversized request[{i}]: {}",
                        status.message()
                    );
                    Err(marked(Status::resource_exhausted(format!(
                        "request[{i}]: {}",
                        status.message()
                    ))))
                }
                Err(status) => {
                    tracing::debug!("StreamAppend: request stream ended with {status}");
                    Err(status)
                }
            };
            let next = match decoded {
                Ok(req) => Some(req),
                Err(status) => {
                    *input_failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(status);
                    None
                }
            };
            futures::future::ready(next)
        });
        let replies = self.raft.stream_append(input).map(|r| match r {
            Ok(result) => Ok(convert::stream_reply_to_pb(&result)),
            Err(fatal) => Err(raft_failed("StreamAppend", fatal)),
        });
        let trailer =
            futures::stream::once(async move { failure.lock().unwrap_or_else(|p| p.into_inner()).take() })
                .filter_map(|f| futures::future::ready(f.map(Err)));
        Ok(Response::new(Box::pin(replies.chain(trailer))))
    }

    async fn install_snapshot(
        &self,
        req: Request<Streaming<pb::SnapshotChunk>>,
    ) -> Result<Response<pb::SnapshotResponse>, Status> {
        use pb::snapshot_chunk::Kind;
        let rpc = "InstallSnapshot";
        let caller = caller(&req);
        let mut chunks = req.into_inner();
        let header = match chunks.message().await? {
            Some(pb::SnapshotChunk {
                kind: Some(Kind::Header(h)),
            }) => h,
            Some(_) => {
                return Err(bad_request(
                    rpc,
                    DecodeError::invalid("chunk[0]", "the first chunk must be a header"),
                ));
            }
            None => return Err(bad_request(rpc, DecodeError::missing("header"))),
        };
        let (vote, meta) = convert::snapshot_header_from_pb::<C>(header).map_err(|e| bad_request(rpc, e))?;
        check_caller(rpc, caller, vote.leader_id.node_id)?;
        let mut data = self
            .sink
            .create()
            .await
            .map_err(|e| raft_failed(rpc, format!("cannot create snapshot data: {e}")))?;
        let mut received = 0u64;
        let mut index = 1usize;
        while let Some(chunk) = chunks.message().await? {
            match chunk.kind {
                Some(Kind::Data(bytes)) => {
                    data.write_all(&bytes)
                        .await
                        .map_err(|e| raft_failed(rpc, format!("writing snapshot data failed: {e}")))?;
                    received += bytes.len() as u64;
                }
                Some(Kind::Header(_)) => {
                    return Err(bad_request(
                        rpc,
                        DecodeError::invalid(&format!("chunk[{index}]"), "a second header"),
                    ));
                }
                None => {
                    return Err(bad_request(
                        rpc,
                        DecodeError::missing(&format!("chunk[{index}].kind")),
                    ));
                }
            }
            index += 1;
        }
        data.flush()
            .await
            .map_err(|e| raft_failed(rpc, format!("flushing snapshot data failed: {e}")))?;
        data.seek(std::io::SeekFrom::Start(0))
            .await
            .map_err(|e| raft_failed(rpc, format!("rewinding snapshot data failed: {e}")))?;
        tracing::info!(
            bytes = received,
            chunks = index - 1,
            "snapshot received, installing"
        );
        let resp = self
            .raft
            .install_full_snapshot(vote, Snapshot { meta, snapshot: data })
            .await
            .map_err(|e| raft_failed(rpc, e))?;
        Ok(Response::new(convert::snapshot_response_to_pb(&resp)))
    }

    async fn transfer_leader(
        &self,
        req: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::TransferLeaderResponse>, Status> {
        let caller = caller(&req);
        let req = convert::transfer_request_from_pb::<C>(req.into_inner())
            .map_err(|e| bad_request("TransferLeader", e))?;
        check_caller("TransferLeader", caller, req.from_leader().leader_id.node_id)?;
        let resp = self
            .raft
            .handle_transfer_leader(req)
            .await
            .map_err(|e| raft_failed("TransferLeader", e))?;
        Ok(Response::new(convert::transfer_response_to_pb(&resp)))
    }
}
