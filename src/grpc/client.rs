//! The gRPC client side: one lane (one HTTP/2 connection) per peer and purpose.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
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
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::Status;
use tonic::transport::Channel;
use tonic::transport::Endpoint;

use super::ERROR_MARK;
use super::convert;
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

/// The gRPC client side of one factory.
pub(crate) struct Connector {
    config: Config,
    stats: Stats,
}

impl Connector {
    pub(crate) fn new(config: &Config, stats: Stats) -> Self {
        Connector {
            config: config.clone(),
            stats,
        }
    }
}

impl<C: RaftWireConfig> link::Connector<C> for Connector {
    fn link(&self, addr: &str, target: u64, _purpose: Purpose) -> Arc<dyn Link<C>> {
        Arc::new(Lane::new(addr, target, &self.config, self.stats.clone()))
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
    /// Whether the server answered anything on the current connection: until it has, a
    /// connection that dies took our certificate with it (TLS 1.3 servers check it only after
    /// our side of the handshake is done).
    answered: Arc<AtomicBool>,
    max_message_size: usize,
    max_in_flight_requests: usize,
    stats: Stats,
}

impl Lane {
    /// Never fails and never connects: a bad address or TLS setup surfaces as `Connect` on
    /// first use.
    fn new(addr: &str, target: u64, config: &Config, stats: Stats) -> Self {
        let tls = config.tls.as_ref().map(|t| t.client_config(target, b"h2"));
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
            answered: Arc::new(AtomicBool::new(false)),
            max_message_size: config.max_message_size,
            max_in_flight_requests: config.max_in_flight_requests,
            stats,
        }
    }

    async fn client(&self) -> Result<RaftClient<Channel>, TransportError> {
        let (endpoint, tls, addr, name, answered) = (
            self.endpoint.clone(),
            self.tls.clone(),
            self.addr.clone(),
            tls::server_name(self.target),
            self.answered.clone(),
        );
        let channel = self
            .dialer
            .get(
                |_| true,
                move || async move {
                    let endpoint = endpoint?;
                    let Some(connector) = tls else {
                        return endpoint.connect().await.map_err(|e| error_chain(&e));
                    };
                    let dial = tower::service_fn(move |_: http::Uri| {
                        let (connector, addr, name) = (connector.clone(), addr.clone(), name.clone());
                        async move {
                            let tcp = tokio::net::TcpStream::connect(&addr).await?;
                            tcp.set_nodelay(true)?;
                            let stream = connector.connect(name, tcp).await?;
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                        }
                    });
                    let channel = endpoint
                        .connect_with_connector(dial)
                        .await
                        .map_err(|e| handshake_refusal(&e).unwrap_or_else(|| error_chain(&e)))?;
                    answered.store(false, Ordering::Relaxed);
                    Ok(channel)
                },
            )
            .await?;
        Ok(RaftClient::new(channel)
            .max_decoding_message_size(self.max_message_size)
            .max_encoding_message_size(self.max_message_size))
    }

    /// Maps a failed call and forgets a connection that may be dead, so the next call
    /// connects afresh (and reports `Connect` if the peer is gone).
    fn failed(&self, rpc: RPCTypes, status: Status) -> TransportError {
        let fresh = self.tls.is_some() && !self.answered.load(Ordering::Relaxed);
        let err = status_to_error(&self.addr, rpc, status, fresh);
        if let TransportError::Remote { .. } = err {
            self.answered();
        }
        if matches!(
            err,
            TransportError::Broken { .. } | TransportError::Connect { .. }
        ) {
            self.dialer.forget();
        }
        err
    }

    /// Notes that the server answered on the current connection.
    fn answered(&self) {
        self.answered.store(true, Ordering::Relaxed);
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
                .map(|r| {
                    self.answered();
                    r.into_inner()
                })
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
            let msg = convert::vote_request_to_pb(&req);
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
            let msg = convert::append_request_to_pb(&req)?;
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
            let msg = convert::transfer_request_to_pb(&req);
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
        _purpose: Purpose,
    ) -> BoxFuture<'s, Result<Replies<'s, C>, TransportError>> {
        Box::pin(async move {
            let rpc = RPCTypes::AppendEntries;
            let mut client = tokio::time::timeout(deadline, self.client())
                .await
                .map_err(|_| TransportError::Timeout { rpc, after: deadline })??;
            // Sent but unanswered requests never exceed the window, so this channel never blocks.
            let (tx, rx) = mpsc::channel(self.max_in_flight_requests);
            // The call is opened lazily, when the pipeline first waits for a reply: by then the
            // first request is queued, so headers and data leave together and a one-request
            // session (a heartbeat) costs one round trip, not two.
            let call = async move { client.stream_append(ReceiverStream::new(rx)).await };
            let replies = futures::stream::once(call).flat_map(move |opened| match opened {
                Ok(response) => response
                    .into_inner()
                    .map(move |r| match r {
                        Ok(reply) => {
                            self.answered();
                            convert::stream_reply_from_pb(reply)
                                .map_err(|source| TransportError::Decode { rpc, source })
                        }
                        Err(status) => Err(self.failed(rpc, status)),
                    })
                    .left_stream(),
                Err(status) => futures::stream::iter([Err(self.failed(rpc, status))]).right_stream(),
            });
            let sink = ChannelSink {
                tx: Some(tx),
                max: self.max_message_size,
            };
            let session = pipeline::run(
                input,
                sink,
                Box::pin(replies),
                config.window(),
                deadline,
                self.stats.clone(),
            );
            Ok(link::observed(session, &self.dialer))
        })
    }

    fn open_snapshot<'s>(
        &'s self,
        vote: VoteOf<C>,
        meta: SnapshotMetaOf<C>,
    ) -> BoxFuture<'s, Result<Box<dyn SnapshotUpload<C> + 's>, TransportError>> {
        Box::pin(async move {
            let header = convert::snapshot_header_to_pb::<C>(&vote, &meta)?;
            let mut client = self.client().await?;
            let (tx, rx) = mpsc::channel::<pb::SnapshotChunk>(2);
            let first = pb::SnapshotChunk {
                kind: Some(pb::snapshot_chunk::Kind::Header(header)),
            };
            // The channel is empty and open: this cannot wait.
            let _ = tx.try_send(first);
            // The call runs as a task so chunks flow while we read the next one; dropping the
            // upload aborts it, which resets the HTTP/2 stream.
            let call = tokio::spawn(async move { client.install_snapshot(ReceiverStream::new(rx)).await });
            let upload: Box<dyn SnapshotUpload<C> + 's> = Box::new(Upload {
                lane: self,
                tx: Some(tx),
                call,
            });
            Ok(upload)
        })
    }
}

/// A snapshot call in progress: chunks go through `tx`; the call's answer comes from `call`.
struct Upload<'a> {
    lane: &'a Lane,
    tx: Option<mpsc::Sender<pb::SnapshotChunk>>,
    call: tokio::task::JoinHandle<Result<tonic::Response<pb::SnapshotResponse>, Status>>,
}

impl Upload<'_> {
    /// The call's outcome once it has ended (early, with a refusal, or after the trailer).
    async fn answer(&mut self) -> Result<pb::SnapshotResponse, TransportError> {
        let rpc = RPCTypes::InstallSnapshot;
        match (&mut self.call).await {
            Ok(Ok(resp)) => {
                self.lane.answered();
                Ok(resp.into_inner())
            }
            Ok(Err(status)) => Err(self.lane.failed(rpc, status)),
            Err(join) => Err(TransportError::Broken {
                rpc,
                reason: format!("snapshot call failed: {join}"),
            }),
        }
    }

    async fn push(&mut self, kind: pb::snapshot_chunk::Kind) -> Result<(), TransportError> {
        let chunk = pb::SnapshotChunk { kind: Some(kind) };
        let sent = match &self.tx {
            Some(tx) => tx.send(chunk).await.is_ok(),
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
            // The request stream ends here: the receiver verifies and installs.
            self.tx = None;
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
        // Unfinished: the call is dropped, and hyper resets the HTTP/2 stream (RST_STREAM
        // CANCEL) of a request whose response future is gone, unless the request body ended
        // first; so the body stays open until hyper lets go of it. (hyper's server reports a
        // CANCEL reset to the handler as the end of the body: the missing trailer is what
        // tells the receiver the transfer is unfinished, and it installs nothing.)
        self.call.abort();
        if let Some(tx) = self.tx.take() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = tokio::time::timeout(Duration::from_secs(10), tx.closed()).await;
                });
            }
        }
    }
}

struct ChannelSink {
    tx: Option<mpsc::Sender<pb::AppendEntriesRequest>>,
    max: usize,
}

impl<C: RaftWireConfig> RequestSink<C> for ChannelSink {
    async fn send(&mut self, req: AppendEntriesRequest<C>) -> Result<usize, SendError<C>> {
        let msg = convert::append_request_to_pb(&req)?;
        let size = msg.encoded_len();
        if size > self.max {
            return Err(SendError::TooLarge {
                req,
                size,
                max: self.max,
            });
        }
        let closed = || TransportError::Broken {
            rpc: RPCTypes::AppendEntries,
            reason: "request stream closed".into(),
        };
        let tx = self.tx.as_ref().ok_or_else(closed)?;
        tx.send(msg).await.map_err(|_| closed())?;
        Ok(size)
    }

    fn finish(&mut self) {
        self.tx = None;
    }
}

/// A status the peer's raftwire server produced (marked) is the peer's own refusal; anything
/// else came from the connection.
///
/// Under TLS 1.3 the server checks our certificate after our side of the handshake is done,
/// so its refusal arrives on the first call: as the TLS alert inside the HTTP/2 error, or, when
/// our first write races the alert, as a connection that simply closed. Both mean the
/// handshake failed: `Connect`. `fresh` says that the server never answered on this
/// connection, which is what tells a closed connection from a refusal.
fn status_to_error(addr: &str, rpc: RPCTypes, status: Status, fresh: bool) -> TransportError {
    if status.metadata().get(ERROR_MARK).is_some() {
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
    if fresh && connection_lost(&status) {
        return TransportError::Connect {
            addr: addr.to_string(),
            reason: format!(
                "the server closed the connection before answering (it may have refused our certificate): {reason}"
            ),
        };
    }
    match status.code() {
        Code::DeadlineExceeded => TransportError::Timeout {
            rpc,
            after: Duration::ZERO,
        },
        _ => TransportError::Broken { rpc, reason },
    }
}

/// Whether the connection under a failed call is gone (as opposed to one call failing).
fn connection_lost(status: &Status) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(status);
    while let Some(e) = cur {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            if h2.is_io() || h2.is_go_away() {
                return true;
            }
        }
        if let Some(hyper) = e.downcast_ref::<hyper::Error>() {
            if hyper.is_closed() || hyper.is_incomplete_message() || hyper.is_canceled() {
                return true;
            }
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind as K;
            if matches!(
                io.kind(),
                K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::UnexpectedEof
            ) {
                return true;
            }
        }
        cur = e.source();
    }
    false
}
