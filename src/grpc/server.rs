//! The gRPC server side: decodes each RPC, hands it to the shared server core, encodes the
//! answer.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use futures::StreamExt;
use openraft::storage::RaftStateMachine;
use tonic::Code;
use tonic::Request;
use tonic::Response;
use tonic::Status;
use tonic::Streaming;

use super::ERROR_MARK;
use super::convert;
use super::marked;
use super::pb;
use super::serve::ConnInfo;
use crate::error::DecodeError;
use crate::service::Caller;
use crate::service::Refusal;
use crate::service::RefusalKind;
use crate::service::Service;
use crate::service::refuse;
use crate::snapshot::Part;
use crate::snapshot::SnapshotData;
use crate::snapshot::Trailer;
use crate::types::RaftWireConfig;

/// Serves the server core over gRPC: decodes, hands over, encodes.
pub(crate) struct RaftService<C: RaftWireConfig, SM: RaftStateMachine<C>> {
    service: Arc<Service<C, SM>>,
    /// Whether this node's peers must compress their messages (zstd), as it does.
    compressed: bool,
}

impl<C: RaftWireConfig, SM: RaftStateMachine<C>> RaftService<C, SM> {
    pub(crate) fn new(service: Arc<Service<C, SM>>, compressed: bool) -> Self {
        RaftService { service, compressed }
    }

    /// The calling node, from its TLS certificate (no node id on a plaintext server), once
    /// its messages are known to be compressed exactly when this node's are: a cluster agrees
    /// on compression, and a caller that differs is refused with `FailedPrecondition`.
    fn caller<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        let said = req
            .metadata()
            .get(super::COMPRESSION_HEADER)
            .map(|v| v.as_bytes());
        let zstd = said == Some(b"zstd".as_slice());
        if zstd != self.compressed {
            let (who, not) = match self.compressed {
                true => ("this node", "the caller"),
                false => ("the caller", "this node"),
            };
            return Err(marked(Status::failed_precondition(format!(
                "{who} compresses its Raft messages (zstd) and {not} does not: every node of a \
                 cluster needs the same compression setting"
            ))));
        }
        let conn = req.extensions().get::<ConnInfo>().copied();
        Ok(Caller {
            node_id: conn.and_then(|c| c.node_id),
            addr: conn.map_or_else(|| ([0, 0, 0, 0], 0).into(), |c| c.addr),
        })
    }
}

/// The gRPC status of a refusal.
fn status(r: Refusal) -> Status {
    let code = match r.kind {
        RefusalKind::BadRequest => Code::InvalidArgument,
        RefusalKind::TooLarge => Code::ResourceExhausted,
        RefusalKind::Forbidden => Code::PermissionDenied,
        RefusalKind::UnexpectedKind => Code::InvalidArgument,
        RefusalKind::Unavailable => Code::Unavailable,
        RefusalKind::Timeout => Code::DeadlineExceeded,
        RefusalKind::Internal => Code::Internal,
        RefusalKind::Broken => Code::Cancelled,
    };
    marked(Status::new(code, r.message))
}

/// A request that does not decode: logged, and answered with `InvalidArgument` naming the field.
fn bad_request(caller: &Caller, rpc: &str, e: DecodeError) -> Refusal {
    tracing::debug!(rpc, field = e.field(), "malformed request");
    refuse(caller, rpc, RefusalKind::BadRequest, format!("{rpc}: {e}"))
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

type ReplyStream = Pin<Box<dyn Stream<Item = Result<pb::StreamAppendReply, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl<C, SM> pb::raft_server::Raft for RaftService<C, SM>
where
    C: RaftWireConfig,
    SM: RaftStateMachine<C>,
    SM::SnapshotData: SnapshotData,
{
    async fn vote(&self, req: Request<pb::VoteRequest>) -> Result<Response<pb::VoteResponse>, Status> {
        let caller = self.caller(&req)?;
        let req = convert::vote_request_from_pb::<C>(req.into_inner())
            .map_err(|e| status(bad_request(&caller, "Vote", e)))?;
        let resp = self.service.vote(caller, req, false).await.map_err(status)?;
        Ok(Response::new(convert::vote_response_to_pb(&resp)))
    }

    async fn pre_vote(&self, req: Request<pb::VoteRequest>) -> Result<Response<pb::VoteResponse>, Status> {
        let caller = self.caller(&req)?;
        let req = convert::vote_request_from_pb::<C>(req.into_inner())
            .map_err(|e| status(bad_request(&caller, "PreVote", e)))?;
        let resp = self.service.vote(caller, req, true).await.map_err(status)?;
        Ok(Response::new(convert::vote_response_to_pb(&resp)))
    }

    async fn append_entries(
        &self,
        req: Request<pb::AppendEntriesRequest>,
    ) -> Result<Response<pb::AppendEntriesResponse>, Status> {
        let caller = self.caller(&req)?;
        let req = convert::append_request_from_pb::<C>(req.into_inner())
            .map_err(|e| status(bad_request(&caller, "AppendEntries", e)))?;
        let resp = self.service.append(caller, req).await.map_err(status)?;
        Ok(Response::new(convert::append_response_to_pb(&resp)))
    }

    type StreamAppendStream = ReplyStream;

    async fn stream_append(
        &self,
        req: Request<Streaming<pb::AppendEntriesRequest>>,
    ) -> Result<Response<Self::StreamAppendStream>, Status> {
        let caller = self.caller(&req)?;
        let input = req.into_inner().enumerate().map(move |(i, item)| match item {
            // The core logs the refusals of its input.
            Ok(msg) => convert::append_request_from_pb::<C>(msg).map_err(|e| {
                Refusal::new(
                    RefusalKind::BadRequest,
                    format!("StreamAppend: {}", e.within(&format!("request[{i}]"))),
                )
            }),
            Err(status) if is_oversize(status.code()) => Err(Refusal::new(
                RefusalKind::TooLarge,
                format!("request[{i}]: {}", status.message()),
            )),
            Err(status) => {
                tracing::debug!("StreamAppend: request stream ended with {status}");
                Err(Refusal::new(
                    RefusalKind::Broken,
                    format!("request stream broke: {}", status.message()),
                ))
            }
        });
        let replies = self.service.stream_append(caller, input).map(|r| {
            r.map(|result| convert::stream_reply_to_pb(&result))
                .map_err(status)
        });
        Ok(Response::new(Box::pin(replies)))
    }

    async fn install_snapshot(
        &self,
        req: Request<Streaming<pb::SnapshotChunk>>,
    ) -> Result<Response<pb::SnapshotResponse>, Status> {
        use pb::snapshot_chunk::Kind;
        let rpc = "InstallSnapshot";
        let caller = self.caller(&req)?;
        let mut chunks = req.into_inner();
        let header = match chunks.message().await? {
            Some(pb::SnapshotChunk {
                kind: Some(Kind::Header(h)),
            }) => h,
            Some(_) => {
                return Err(status(bad_request(
                    &caller,
                    rpc,
                    DecodeError::invalid("chunk[0]", "the first chunk must be a header"),
                )));
            }
            None => return Err(status(bad_request(&caller, rpc, DecodeError::missing("header")))),
        };
        let (vote, meta) = convert::snapshot_header_from_pb::<C>(header)
            .map_err(|e| status(bad_request(&caller, rpc, e)))?;
        let parts = chunks.enumerate().map(|(i, chunk)| {
            let index = i + 1;
            match chunk {
                Ok(pb::SnapshotChunk {
                    kind: Some(Kind::Data(bytes)),
                }) => Ok(Part::Data(bytes)),
                Ok(pb::SnapshotChunk {
                    kind: Some(Kind::Trailer(t)),
                }) => Ok(Part::End(Trailer {
                    length: t.length,
                    crc32c: t.crc32c,
                })),
                Ok(pb::SnapshotChunk {
                    kind: Some(Kind::Header(_)),
                }) => Err(Refusal::new(
                    RefusalKind::UnexpectedKind,
                    format!("chunk[{index}]: a second header"),
                )),
                Ok(pb::SnapshotChunk { kind: None }) => Err(Refusal::new(
                    RefusalKind::BadRequest,
                    format!("chunk[{index}].kind: missing"),
                )),
                Err(s) if is_oversize(s.code()) => Err(Refusal::new(
                    RefusalKind::TooLarge,
                    format!("chunk[{index}]: {}", s.message()),
                )),
                Err(s) => Err(Refusal::new(
                    RefusalKind::Broken,
                    format!("the snapshot stream broke at chunk[{index}]: {}", s.message()),
                )),
            }
        });
        let resp = self
            .service
            .install_snapshot(caller, vote, meta, parts)
            .await
            .map_err(status)?;
        Ok(Response::new(convert::snapshot_response_to_pb(&resp)))
    }

    async fn transfer_leader(
        &self,
        req: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::TransferLeaderResponse>, Status> {
        let caller = self.caller(&req)?;
        let req = convert::transfer_request_from_pb::<C>(req.into_inner())
            .map_err(|e| status(bad_request(&caller, "TransferLeader", e)))?;
        let resp = self.service.transfer_leader(caller, req).await.map_err(status)?;
        Ok(Response::new(convert::transfer_response_to_pb(&resp)))
    }
}
