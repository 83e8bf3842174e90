//! The gRPC client side: one lane (one HTTP/2 connection) per peer and purpose.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use futures::Stream;
use futures::StreamExt;
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
use prost::Message;
use tokio::io::AsyncSeekExt;
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
use crate::error::TransportError;
use crate::error::error_chain;
use crate::pipeline;
use crate::pipeline::RequestSink;
use crate::snapshot::SnapshotData;
use crate::stats::Stats;
use crate::tls;
use crate::types::RaftWireConfig;

/// One HTTP/2 connection to a peer, made on first use and made again after a failure.
pub(crate) struct Lane {
    addr: String,
    endpoint: Result<Endpoint, String>,
    tls: Option<tokio_rustls::TlsConnector>,
    target: u64,
    channel: Mutex<Option<Channel>>,
    max_message_size: usize,
    stats: Stats,
}

impl Lane {
    /// Never fails and never connects: a bad address or TLS setup surfaces as `Connect` on
    /// first use.
    pub(crate) fn new(addr: &str, target: u64, config: &Config, stats: Stats) -> Self {
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
            channel: Mutex::new(None),
            max_message_size: config.max_message_size,
            stats,
        }
    }

    async fn connect(&self, endpoint: &Endpoint) -> Result<Channel, tonic::transport::Error> {
        let Some(connector) = self.tls.clone() else {
            return endpoint.connect().await;
        };
        let addr = self.addr.clone();
        let name = tls::server_name(self.target);
        let dial = tower::service_fn(move |_: http::Uri| {
            let (connector, addr, name) = (connector.clone(), addr.clone(), name.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(&addr).await?;
                tcp.set_nodelay(true)?;
                let stream = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        });
        endpoint.connect_with_connector(dial).await
    }

    async fn client(&self) -> Result<RaftClient<Channel>, TransportError> {
        let cached = self.channel.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let channel = match cached {
            Some(c) => c,
            None => {
                let endpoint = self.endpoint.as_ref().map_err(|reason| TransportError::Connect {
                    addr: self.addr.clone(),
                    reason: reason.clone(),
                })?;
                let channel = self
                    .connect(endpoint)
                    .await
                    .map_err(|e| TransportError::Connect {
                        addr: self.addr.clone(),
                        reason: error_chain(&e),
                    })?;
                self.stats.record_connect();
                *self.channel.lock().unwrap_or_else(|p| p.into_inner()) = Some(channel.clone());
                channel
            }
        };
        Ok(RaftClient::new(channel)
            .max_decoding_message_size(self.max_message_size)
            .max_encoding_message_size(self.max_message_size))
    }

    /// Maps a failed call and forgets a connection that may be dead, so the next call
    /// connects afresh (and reports `Connect` if the peer is gone).
    fn failed(&self, rpc: RPCTypes, status: Status) -> TransportError {
        let err = status_to_error(&self.addr, rpc, status);
        if matches!(
            err,
            TransportError::Broken { .. } | TransportError::Connect { .. }
        ) {
            self.channel.lock().unwrap_or_else(|p| p.into_inner()).take();
        }
        err
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
        tokio::time::timeout(deadline, work)
            .await
            .map_err(|_| TransportError::Timeout { rpc, after: deadline })?
    }

    pub(crate) async fn vote<C: RaftWireConfig>(
        &self,
        req: &VoteRequest<C>,
        pre_vote: bool,
        deadline: Duration,
    ) -> Result<VoteResponse<C>, TransportError> {
        let msg = convert::vote_request_to_pb(req);
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
    }

    pub(crate) async fn append<C: RaftWireConfig>(
        &self,
        req: &AppendEntriesRequest<C>,
        deadline: Duration,
    ) -> Result<AppendEntriesResponse<C>, TransportError> {
        let msg = convert::append_request_to_pb(req)?;
        let resp = self
            .unary(RPCTypes::AppendEntries, deadline, |mut c| async move {
                c.append_entries(msg).await
            })
            .await?;
        convert::append_response_from_pb(resp).map_err(|source| TransportError::Decode {
            rpc: RPCTypes::AppendEntries,
            source,
        })
    }

    pub(crate) async fn transfer_leader<C: RaftWireConfig>(
        &self,
        req: &TransferLeaderRequest<C>,
        deadline: Duration,
    ) -> Result<TransferLeaderResponse<C>, TransportError> {
        let msg = convert::transfer_request_to_pb(req);
        let resp = self
            .unary(RPCTypes::TransferLeader, deadline, |mut c| async move {
                c.transfer_leader(msg).await
            })
            .await?;
        convert::transfer_response_from_pb(resp).map_err(|source| TransportError::Decode {
            rpc: RPCTypes::TransferLeader,
            source,
        })
    }

    /// Opens a bidirectional StreamAppend call and pipelines `input` over it.
    pub(crate) async fn stream_append<'s, C, S>(
        &'s self,
        input: S,
        config: &Config,
        deadline: Duration,
    ) -> Result<impl Stream<Item = Result<StreamAppendResult<C>, TransportError>> + Send + 's, TransportError>
    where
        C: RaftWireConfig,
        S: Stream<Item = AppendEntriesRequest<C>> + Send + Unpin + 'static,
    {
        let rpc = RPCTypes::AppendEntries;
        let mut client = tokio::time::timeout(deadline, self.client())
            .await
            .map_err(|_| TransportError::Timeout { rpc, after: deadline })??;
        // Sent but unanswered requests never exceed the window, so this channel never blocks.
        let (tx, rx) = mpsc::channel(config.max_in_flight_requests);
        // The call is opened lazily, when the pipeline first waits for a reply: by then the
        // first request is queued, so headers and data leave together and a one-request
        // session (a heartbeat) costs one round trip, not two.
        let call = async move { client.stream_append(ReceiverStream::new(rx)).await };
        let replies = futures::stream::once(call).flat_map(move |opened| match opened {
            Ok(response) => response
                .into_inner()
                .map(move |r| match r {
                    Ok(reply) => convert::stream_reply_from_pb(reply)
                        .map_err(|source| TransportError::Decode { rpc, source }),
                    Err(status) => Err(self.failed(rpc, status)),
                })
                .left_stream(),
            Err(status) => futures::stream::iter([Err(self.failed(rpc, status))]).right_stream(),
        });
        let replies = Box::pin(replies);
        let window = pipeline::Window {
            requests: config.max_in_flight_requests,
            bytes: config.max_in_flight_bytes,
        };
        let sink = ChannelSink { tx: Some(tx) };
        Ok(pipeline::run(
            input,
            sink,
            replies,
            window,
            deadline,
            self.stats.clone(),
        ))
    }

    /// Streams a snapshot as a header and chunks of `chunk_size`, reading the data lazily so
    /// at most a couple of chunks are in memory. `idle` bounds every step that must make
    /// progress: handing a chunk to the connection, and the final reply.
    pub(crate) async fn send_snapshot<C, SD>(
        &self,
        vote: &VoteOf<C>,
        meta: &SnapshotMetaOf<C>,
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
        let header = convert::snapshot_header_to_pb::<C>(vote, meta)?;
        let mut client = tokio::time::timeout(idle, self.client())
            .await
            .map_err(timeout)??;
        let (tx, rx) = mpsc::channel::<pb::SnapshotChunk>(2);
        let first = pb::SnapshotChunk {
            kind: Some(pb::snapshot_chunk::Kind::Header(header)),
        };
        tx.send(first).await.map_err(|_| TransportError::Broken {
            rpc,
            reason: "request stream closed".into(),
        })?;

        let call = client.install_snapshot(ReceiverStream::new(rx));
        let stats = self.stats.clone();
        let produce = async move {
            data.seek(std::io::SeekFrom::Start(0))
                .await
                .map_err(TransportError::SnapshotRead)?;
            loop {
                let next = crate::snapshot::next_chunk(&mut data, chunk_size).await;
                let Some(buf) = next.map_err(TransportError::SnapshotRead)? else {
                    return Ok::<_, TransportError>(());
                };
                let n = buf.len();
                let chunk = pb::SnapshotChunk {
                    kind: Some(pb::snapshot_chunk::Kind::Data(buf)),
                };
                tokio::time::timeout(idle, tx.send(chunk))
                    .await
                    .map_err(timeout)?
                    .map_err(|_| TransportError::Broken {
                        rpc,
                        reason: "receiver closed the stream".into(),
                    })?;
                stats.record_snapshot_bytes(n);
            }
            // `tx` drops here: the request stream ends and the receiver installs.
        };
        tokio::pin!(call);
        tokio::pin!(produce);
        let answered = tokio::select! {
            produced = &mut produce => { produced?; None }
            early = &mut call => Some(early),
        };
        let resp = match answered {
            // The receiver answered before taking all chunks: that answer is an error.
            Some(early) => early,
            None => tokio::time::timeout(idle, call).await.map_err(timeout)?,
        }
        .map_err(|s| self.failed(rpc, s))?
        .into_inner();
        self.stats.record_snapshot_sent();
        convert::snapshot_response_from_pb(resp).map_err(|source| TransportError::Decode { rpc, source })
    }
}

struct ChannelSink {
    tx: Option<mpsc::Sender<pb::AppendEntriesRequest>>,
}

impl<C: RaftWireConfig> RequestSink<C> for ChannelSink {
    async fn send(&mut self, req: AppendEntriesRequest<C>) -> Result<usize, TransportError> {
        let msg = convert::append_request_to_pb(&req)?;
        let size = msg.encoded_len();
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
fn status_to_error(addr: &str, rpc: RPCTypes, status: Status) -> TransportError {
    if status.metadata().get(ERROR_MARK).is_some() {
        return TransportError::Remote {
            rpc,
            reason: format!("{:?}: {}", status.code(), status.message()),
        };
    }
    let reason = error_chain(&status);
    // Under TLS 1.3 the server checks our certificate after our side of the handshake is
    // done, so its refusal arrives as an alert on the first call: still a failed handshake.
    if reason.contains("received fatal alert") {
        return TransportError::Connect {
            addr: addr.to_string(),
            reason,
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
