//! The gRPC client side: one lane (one HTTP/2 connection) per peer and purpose.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use openraft::alias::SnapshotMetaOf;
use openraft::alias::VoteOf;
use openraft::network::RPCTypes;
use openraft::raft::AppendEntriesRequest;
use openraft::raft::AppendEntriesResponse;
use openraft::raft::SnapshotResponse;
use openraft::raft::TransferLeaderRequest;
use openraft::raft::TransferLeaderResponse;
use openraft::raft::VoteRequest;
use openraft::raft::VoteResponse;
use prost::Message;
use tokio::sync::mpsc;
use tonic::Code;
use tonic::Status;
use tonic::transport::Channel;
use tonic::transport::Endpoint;

use super::ERROR_MARK;
use super::body;
use super::body::Chunks;
use super::body::Framer;
use super::body::RequestBody;
use super::convert;
use super::counted::Counted;
use super::pb;
use super::pb::raft_client::RaftClient;
use crate::config::Config;
use crate::connect::Dialer;
use crate::error::TransportError;
use crate::error::error_chain;
use crate::error::handshake_refusal;
use crate::link;
use crate::link::Link;
use crate::link::Purpose;
use crate::link::Replies;
use crate::link::SnapshotUpload;
use crate::pipeline;
use crate::pipeline::RequestSink;
use crate::pipeline::SendError;
use crate::snapshot::Trailer;
use crate::stats::Stats;
use crate::tls;
use crate::types::RaftWireConfig;

/// The replication stream's method.
const STREAM_APPEND: &str = "/raftwire.v1.Raft/StreamAppend";

/// The snapshot upload's method.
const INSTALL_SNAPSHOT: &str = "/raftwire.v1.Raft/InstallSnapshot";

/// A connection's byte stream, plain or under TLS.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Io for T {}

/// The gRPC client side of one factory.
pub(crate) struct Connector {
    config: Config,
}

impl Connector {
    pub(crate) fn new(config: &Config) -> Self {
        Connector {
            config: config.clone(),
        }
    }
}

impl<C: RaftWireConfig> link::Connector<C> for Connector {
    fn link(&self, addr: &str, target: u64, _purpose: Purpose, stats: Stats) -> Arc<dyn Link<C>> {
        Arc::new(Lane::new(addr, target, &self.config, stats))
    }

    fn shares_purposes(&self) -> bool {
        // HTTP/2 streams share one TCP connection's head-of-line blocking: heartbeats and
        // snapshots get connections of their own.
        false
    }
}

/// One HTTP/2 connection to a peer, dialled in the background on first use and again after
/// a failure.
pub(crate) struct Lane {
    addr: String,
    endpoint: Result<Endpoint, String>,
    tls: Option<tokio_rustls::TlsConnector>,
    target: u64,
    dialer: Dialer<Channel>,
    max_message_size: usize,
    max_in_flight_requests: usize,
    /// How replication and snapshot messages are written (see `body`).
    framer: Framer,
    stats: Stats,
}

impl Lane {
    /// Never fails and never connects: a bad address or TLS setup surfaces as `Connect` on
    /// first use.
    fn new(addr: &str, target: u64, config: &Config, stats: Stats) -> Self {
        let tls = config.tls.as_ref().map(|t| t.client_config(target, super::ALPN));
        let (tls, tls_error) = match tls {
            Some(Ok(c)) => (Some(tokio_rustls::TlsConnector::from(Arc::new(c))), None),
            Some(Err(e)) => (None, Some(format!("TLS setup failed: {e}"))),
            None => (None, None),
        };
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map(|e| {
                e.connect_timeout(config.connect_timeout)
                    .tcp_nodelay(true)
                    // Fixed windows sized for bulk replication: hyper's defaults (2 MiB stream)
                    // stall a pipeline of large batches on loopback and LANs alike.
                    .initial_stream_window_size(Some(8 << 20))
                    .initial_connection_window_size(Some(16 << 20))
                    .http2_keep_alive_interval(Duration::from_secs(10))
                    .keep_alive_timeout(Duration::from_secs(20))
                    .keep_alive_while_idle(true)
            })
            .map_err(|e| format!("invalid address `{addr}`: {e}"))
            .and_then(|e| match tls_error {
                Some(reason) => Err(reason),
                None => Ok(e),
            });
        Lane {
            addr: addr.to_string(),
            endpoint,
            tls,
            target,
            dialer: Dialer::new(addr, config.connect_timeout, stats.clone()),
            max_message_size: config.max_message_size,
            max_in_flight_requests: config.max_in_flight_requests,
            framer: Framer::new(config),
            stats,
        }
    }

    async fn client(&self) -> Result<RaftClient<Channel>, TransportError> {
        Ok(RaftClient::new(self.channel().await?)
            .max_decoding_message_size(self.max_message_size)
            .max_encoding_message_size(self.max_message_size))
    }

    /// The current connection, dialled if there is none. Its bytes are counted on the TCP
    /// stream, under TLS.
    async fn channel(&self) -> Result<Channel, TransportError> {
        let (endpoint, tls, addr, name, counters) = (
            self.endpoint.clone(),
            self.tls.clone(),
            self.addr.clone(),
            tls::server_name(self.target),
            self.stats.byte_counters(),
        );
        self.dialer
            .get(
                |_| true,
                move || async move {
                    let dial = tower::service_fn(move |_: http::Uri| {
                        let (tls, addr, name, counters) =
                            (tls.clone(), addr.clone(), name.clone(), counters.clone());
                        async move {
                            let tcp = tokio::net::TcpStream::connect(&addr).await?;
                            tcp.set_nodelay(true)?;
                            let tcp = Counted::new(tcp, counters);
                            let Some(connector) = tls else {
                                let plain: Box<dyn Io> = Box::new(tcp);
                                return Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(plain));
                            };
                            let stream = connector.connect(name, tcp).await?;
                            // A refusal of our certificate arrives as the server's first
                            // word: read it here, where it can be named.
                            let stream: Box<dyn Io> = Box::new(super::primed::prime(stream).await?);
                            Ok(hyper_util::rt::TokioIo::new(stream))
                        }
                    });
                    endpoint?
                        .connect_with_connector(dial)
                        .await
                        .map_err(|e| handshake_refusal(&e).unwrap_or_else(|| error_chain(&e)))
                },
            )
            .await
    }

    /// Maps a failed call and forgets a connection that may be dead, so the next call
    /// connects afresh (and reports `Connect` if the peer is gone).
    fn failed(&self, rpc: RPCTypes, status: Status) -> TransportError {
        let err = status_to_error(&self.addr, rpc, status);
        if matches!(
            err,
            TransportError::Broken { .. } | TransportError::Connect { .. }
        ) {
            self.dialer.forget();
        }
        err
    }

    /// A unary call's request: never compressed, but saying this node's compression setting
    /// (the server refuses a caller whose setting differs from its own).
    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        if self.framer.compressed() {
            req.metadata_mut().insert(
                super::COMPRESSION_HEADER,
                tonic::metadata::MetadataValue::from_static("zstd"),
            );
        }
        req
    }

    async fn unary<Resp, F, Fut>(
        &self,
        rpc: RPCTypes,
        deadline: Duration,
        call: F,
    ) -> Result<Resp, TransportError>
    where
        F: FnOnce(RaftClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
    {
        let work = async {
            let client = self.client().await?;
            call(client)
                .await
                .map(|r| r.into_inner())
                .map_err(|s| self.failed(rpc, s))
        };
        let outcome = tokio::time::timeout(deadline, work)
            .await
            .map_err(|_| TransportError::Timeout { rpc, after: deadline })
            .and_then(|r| r);
        self.dialer.observe(&outcome);
        outcome
    }
}

impl<C: RaftWireConfig> Link<C> for Lane {
    fn vote(
        &self,
        req: VoteRequest<C>,
        pre_vote: bool,
        deadline: Duration,
    ) -> BoxFuture<'_, Result<VoteResponse<C>, TransportError>> {
        Box::pin(async move {
            let msg = self.request(convert::vote_request_to_pb(&req));
            let resp = self
                .unary(RPCTypes::Vote, deadline, |mut c| async move {
                    if pre_vote {
                        c.pre_vote(msg).await
                    } else {
                        c.vote(msg).await
                    }
                })
                .await?;
            convert::vote_response_from_pb(resp).map_err(|source| TransportError::Decode {
                rpc: RPCTypes::Vote,
                source,
            })
        })
    }

    fn append(
        &self,
        req: AppendEntriesRequest<C>,
        deadline: Duration,
    ) -> BoxFuture<'_, Result<AppendEntriesResponse<C>, TransportError>> {
        Box::pin(async move {
            let msg = self.request(convert::append_request_to_pb(&req)?);
            let resp = self
                .unary(RPCTypes::AppendEntries, deadline, |mut c| async move {
                    c.append_entries(msg).await
                })
                .await?;
            convert::append_response_from_pb(resp).map_err(|source| TransportError::Decode {
                rpc: RPCTypes::AppendEntries,
                source,
            })
        })
    }

    fn transfer_leader(
        &self,
        req: TransferLeaderRequest<C>,
        deadline: Duration,
    ) -> BoxFuture<'_, Result<TransferLeaderResponse<C>, TransportError>> {
        Box::pin(async move {
            let msg = self.request(convert::transfer_request_to_pb(&req));
            let resp = self
                .unary(RPCTypes::TransferLeader, deadline, |mut c| async move {
                    c.transfer_leader(msg).await
                })
                .await?;
            convert::transfer_response_from_pb(resp).map_err(|source| TransportError::Decode {
                rpc: RPCTypes::TransferLeader,
                source,
            })
        })
    }

    fn stream_append<'s>(
        &'s self,
        input: BoxStream<'static, AppendEntriesRequest<C>>,
        config: &'s Config,
        deadline: Duration,
        purpose: Purpose,
    ) -> BoxFuture<'s, Result<Replies<'s, C>, TransportError>> {
        Box::pin(async move {
            let rpc = RPCTypes::AppendEntries;
            let channel = tokio::time::timeout(deadline, self.channel())
                .await
                .map_err(|_| TransportError::Timeout { rpc, after: deadline })??;
            // Sent but unanswered requests never exceed the window, so this channel never blocks.
            let (tx, rx) = mpsc::channel(self.max_in_flight_requests);
            // The call is opened lazily, when the pipeline first waits for a reply: by then the
            // first request is queued, so headers and data leave together and a one-request
            // session (a heartbeat) costs one round trip, not two.
            let call = body::open::<pb::StreamAppendReply>(
                channel,
                STREAM_APPEND,
                RequestBody::new(rx),
                self.framer.clone(),
            );
            let replies = futures::stream::once(call).flat_map(move |opened| match opened {
                Ok(replies) => replies
                    .map(move |r| match r {
                        Ok(reply) => convert::stream_reply_from_pb(reply)
                            .map_err(|source| TransportError::Decode { rpc, source }),
                        Err(status) => Err(self.failed(rpc, status)),
                    })
                    .left_stream(),
                Err(status) => futures::stream::iter([Err(self.failed(rpc, status))]).right_stream(),
            });
            let sink = ChannelSink {
                tx: Some(tx),
                framer: self.framer.clone(),
            };
            let session = pipeline::run(
                input,
                sink,
                Box::pin(replies),
                config.window(),
                deadline,
                self.stats.clone(),
                purpose.stream_kind(),
            );
            Ok(link::observed(session, &self.dialer))
        })
    }

    fn probe(&self, deadline: Duration) -> BoxFuture<'_, Result<(), TransportError>> {
        Box::pin(async move {
            let outcome = match tokio::time::timeout(deadline, self.channel()).await {
                Ok(r) => r.map(|_| ()),
                Err(_) => Err(TransportError::Connect {
                    addr: self.addr.clone(),
                    reason: format!("no connection within {deadline:?}"),
                }),
            };
            self.dialer.observe(&outcome);
            outcome
        })
    }

    fn open_snapshot<'s>(
        &'s self,
        vote: VoteOf<C>,
        meta: SnapshotMetaOf<C>,
    ) -> BoxFuture<'s, Result<Box<dyn SnapshotUpload<C> + 's>, TransportError>> {
        Box::pin(async move {
            let header = convert::snapshot_header_to_pb::<C>(&vote, &meta)?;
            let mut framer = self.framer.clone();
            let first = snapshot_message(&mut framer, pb::snapshot_chunk::Kind::Header(header))?;
            let channel = self.channel().await?;
            // Two chunks in flight, and a slot kept for the abort marker.
            let (tx, rx) = mpsc::channel::<Result<Chunks, Status>>(3);
            let abort = tx.clone().try_reserve_owned().ok();
            // The channel is empty and open: this cannot wait.
            let _ = tx.try_send(Ok(first));
            // The call runs as a task so chunks flow while we read the next one.
            let settings = framer.clone();
            let call = tokio::spawn(async move {
                let mut replies = body::open::<pb::SnapshotResponse>(
                    channel,
                    INSTALL_SNAPSHOT,
                    RequestBody::new(rx),
                    settings,
                )
                .await?;
                match replies.message().await? {
                    Some(resp) => Ok(resp),
                    None => Err(Status::internal("the receiver ended the call without an answer")),
                }
            });
            let upload: Box<dyn SnapshotUpload<C> + 's> = Box::new(Upload {
                lane: self,
                tx: Some(tx),
                framer,
                abort,
                call: Some(call),
            });
            Ok(upload)
        })
    }
}

/// One part of a snapshot upload as its gRPC message.
fn snapshot_message(framer: &mut Framer, kind: pb::snapshot_chunk::Kind) -> Result<Chunks, TransportError> {
    framer
        .snapshot(&pb::SnapshotChunk { kind: Some(kind) })
        .map_err(unframed(RPCTypes::InstallSnapshot))
}

/// A message our own framer refused to write (over the limit, or compression failed).
fn unframed(rpc: RPCTypes) -> impl FnOnce(Status) -> TransportError {
    move |status| TransportError::Broken {
        rpc,
        reason: status.message().to_string(),
    }
}

type UploadCall = tokio::task::JoinHandle<Result<pb::SnapshotResponse, Status>>;

/// A snapshot call in progress: chunks go through `tx`; the call's answer comes from `call`.
struct Upload<'a> {
    lane: &'a Lane,
    tx: Option<mpsc::Sender<Result<Chunks, Status>>>,
    framer: Framer,
    /// The channel slot for the marker that fails the request body if the upload is given up.
    abort: Option<mpsc::OwnedPermit<Result<Chunks, Status>>>,
    /// `None` only while being dropped.
    call: Option<UploadCall>,
}

impl Upload<'_> {
    /// The call's outcome once it has ended (early, with a refusal, or after the trailer).
    async fn answer(&mut self) -> Result<pb::SnapshotResponse, TransportError> {
        let rpc = RPCTypes::InstallSnapshot;
        let Some(call) = self.call.as_mut() else {
            return Err(TransportError::Broken {
                rpc,
                reason: "snapshot call already ended".into(),
            });
        };
        let outcome = call.await;
        // Done: `Drop` must not wait on a finished handle (polling it again panics).
        self.call = None;
        match outcome {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(status)) => Err(self.lane.failed(rpc, status)),
            Err(join) => Err(TransportError::Broken {
                rpc,
                reason: format!("snapshot call failed: {join}"),
            }),
        }
    }

    async fn push(&mut self, kind: pb::snapshot_chunk::Kind) -> Result<(), TransportError> {
        let chunks = snapshot_message(&mut self.framer, kind)?;
        let sent = match &self.tx {
            Some(tx) => tx.send(Ok(chunks)).await.is_ok(),
            None => false,
        };
        if sent {
            return Ok(());
        }
        // The call ended before taking every chunk: its answer says why.
        self.tx = None;
        match self.answer().await {
            Err(e) => Err(e),
            Ok(_) => Err(TransportError::Broken {
                rpc: RPCTypes::InstallSnapshot,
                reason: "the receiver answered before the snapshot was complete".into(),
            }),
        }
    }
}

impl<C: RaftWireConfig> SnapshotUpload<C> for Upload<'_> {
    fn send(&mut self, data: Bytes) -> BoxFuture<'_, Result<(), TransportError>> {
        Box::pin(self.push(pb::snapshot_chunk::Kind::Data(data)))
    }

    fn finish(&mut self, trailer: Trailer) -> BoxFuture<'_, Result<SnapshotResponse<C>, TransportError>> {
        Box::pin(async move {
            self.push(pb::snapshot_chunk::Kind::Trailer(pb::SnapshotTrailer {
                length: trailer.length,
                crc32c: trailer.crc32c,
            }))
            .await?;
            // The request stream ends here, cleanly: the receiver verifies and installs.
            self.tx = None;
            self.abort = None;
            let resp = self.answer().await?;
            convert::snapshot_response_from_pb(resp).map_err(|source| TransportError::Decode {
                rpc: RPCTypes::InstallSnapshot,
                source,
            })
        })
    }
}

impl Drop for Upload<'_> {
    fn drop(&mut self) {
        // Unfinished (an error, a timeout or a cancel on our side): the request body fails,
        // and hyper resets the HTTP/2 stream with INTERNAL_ERROR, which the receiver reads as
        // an error. Dropping the call instead would send CANCEL, which tonic's server reports
        // as a clean end of the request stream.
        self.tx = None;
        if let Some(permit) = self.abort.take() {
            permit.send(Err(Status::aborted("the sender abandoned the snapshot")));
        }
        let Some(mut call) = self.call.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            // The call ends once the reset is out (or the peer answers); bounded, in case the
            // peer stopped reading and the marker waits behind flow control.
            Ok(rt) => {
                rt.spawn(async move {
                    if tokio::time::timeout(Duration::from_secs(5), &mut call)
                        .await
                        .is_err()
                    {
                        call.abort();
                    }
                });
            }
            Err(_) => call.abort(),
        }
    }
}

/// The replication stream's request side: each request framed (payloads uncopied) and queued
/// for the request body.
struct ChannelSink {
    tx: Option<mpsc::Sender<Result<Chunks, Status>>>,
    framer: Framer,
}

impl<C: RaftWireConfig> RequestSink<C> for ChannelSink {
    async fn send(&mut self, req: AppendEntriesRequest<C>) -> Result<usize, SendError<C>> {
        let msg = convert::append_request_to_pb(&req)?;
        let (size, max) = (msg.encoded_len(), self.framer.max());
        if size > max {
            return Err(SendError::TooLarge { req, size, max });
        }
        let closed = || TransportError::Broken {
            rpc: RPCTypes::AppendEntries,
            reason: "request stream closed".into(),
        };
        let chunks = self
            .framer
            .append(&msg, size)
            .map_err(unframed(RPCTypes::AppendEntries))?;
        let tx = self.tx.as_ref().ok_or_else(closed)?;
        tx.send(Ok(chunks)).await.map_err(|_| closed())?;
        Ok(size)
    }

    async fn finish(&mut self) -> Result<(), TransportError> {
        self.tx = None;
        Ok(())
    }
}

/// A status the peer's raftwire server produced (marked) is the peer's own refusal; anything
/// else came from the connection. (A refusal of our certificate never gets this far: a
/// connection is handed to hyper only after the server's first bytes, see `primed`.)
fn status_to_error(addr: &str, rpc: RPCTypes, status: Status) -> TransportError {
    if status.metadata().get(ERROR_MARK).is_some() {
        // The server's refusal of the way this node talks (compression): no call can work.
        if status.code() == Code::FailedPrecondition {
            return TransportError::Connect {
                addr: addr.to_string(),
                reason: status.message().to_string(),
            };
        }
        return TransportError::Remote {
            rpc,
            reason: format!("{:?}: {}", status.code(), status.message()),
        };
    }
    if let Some(reason) = handshake_refusal(&status) {
        return TransportError::Connect {
            addr: addr.to_string(),
            reason,
        };
    }
    let reason = error_chain(&status);
    match status.code() {
        Code::DeadlineExceeded => TransportError::Timeout {
            rpc,
            after: Duration::ZERO,
        },
        _ => TransportError::Broken { rpc, reason },
    }
}
