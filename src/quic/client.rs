//! The QUIC client side: one connection per peer, a stream per call or session.

use std::net::SocketAddr;
use std::time::Duration;

use futures::Stream;
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

use super::FrameReader;
use super::WriteError;
use super::write_frame;
use crate::codec::Message;
use crate::config::Config;
use crate::config::QuicTuning;
use crate::error::TransportError;
use crate::error::error_chain;
use crate::pipeline;
use crate::pipeline::RequestSink;
use crate::snapshot::SnapshotData;
use crate::stats::Stats;
use crate::tls;
use crate::types::RaftWireConfig;

/// Stream priority of heartbeats: ahead of replication and snapshot data when both wait.
pub(crate) const HEARTBEAT_PRIORITY: i32 = 10;

#[derive(Default)]
struct State {
    endpoint: Option<quinn::Endpoint>,
    conn: Option<quinn::Connection>,
}

/// The QUIC connection to one peer, shared by every client of that peer; made on first use
/// and made again once it is closed.
pub(crate) struct Lane {
    addr: String,
    target: u64,
    client_config: Result<quinn::ClientConfig, String>,
    tuning: QuicTuning,
    connect_timeout: Duration,
    max_len: usize,
    state: tokio::sync::Mutex<State>,
    stats: Stats,
}

impl Lane {
    /// Never fails and never connects: bad TLS setup surfaces as `Connect` on first use.
    pub(crate) fn new(addr: &str, target: u64, config: &Config, stats: Stats) -> Self {
        let client_config = match &config.tls {
            None => Err("QUIC needs a TLS identity".to_string()),
            Some(t) => t
                .client_config(target, super::ALPN)
                .map_err(|e| format!("TLS setup failed: {e}"))
                .and_then(|c| {
                    quinn::crypto::rustls::QuicClientConfig::try_from(c)
                        .map_err(|e| format!("TLS setup unusable for QUIC: {e}"))
                })
                .map(|c| {
                    let mut cc = quinn::ClientConfig::new(std::sync::Arc::new(c));
                    cc.transport_config(std::sync::Arc::new(super::transport_config(&config.quic)));
                    cc
                }),
        };
        Lane {
            addr: addr.to_string(),
            target,
            client_config,
            tuning: config.quic.clone(),
            connect_timeout: config.connect_timeout,
            max_len: super::max_frame(config),
            state: tokio::sync::Mutex::new(State::default()),
            stats,
        }
    }

    fn connect_error(&self, reason: impl ToString) -> TransportError {
        TransportError::Connect {
            addr: self.addr.clone(),
            reason: reason.to_string(),
        }
    }

    async fn connection(&self) -> Result<quinn::Connection, TransportError> {
        let mut st = self.state.lock().await;
        if let Some(c) = &st.conn {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        st.conn = None;
        let config = self.client_config.clone().map_err(|e| self.connect_error(e))?;
        let addr: SocketAddr = tokio::net::lookup_host(&self.addr)
            .await
            .map_err(|e| self.connect_error(format!("cannot resolve: {e}")))?
            .next()
            .ok_or_else(|| self.connect_error("the name resolves to no address"))?;
        if st.endpoint.is_none() {
            let local: SocketAddr = if addr.is_ipv4() {
                ([0, 0, 0, 0], 0).into()
            } else {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let socket = super::udp_socket(local, &self.tuning).map_err(|e| self.connect_error(e))?;
            let runtime = quinn::default_runtime().ok_or_else(|| self.connect_error("no async runtime"))?;
            let endpoint = quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, runtime)
                .map_err(|e| self.connect_error(e))?;
            st.endpoint = Some(endpoint);
        }
        let Some(endpoint) = st.endpoint.as_ref() else {
            return Err(self.connect_error("no endpoint"));
        };
        let name = tls::node_dns_name(self.target);
        let connecting = endpoint
            .connect_with(config, addr, &name)
            .map_err(|e| self.connect_error(e))?;
        let conn = tokio::time::timeout(self.connect_timeout, connecting)
            .await
            .map_err(|_| self.connect_error(format!("handshake timed out after {:?}", self.connect_timeout)))?
            .map_err(|e| self.connect_error(error_chain(&e)))?;
        self.stats.record_connect();
        st.conn = Some(conn.clone());
        Ok(conn)
    }

    async fn open(
        &self,
        rpc: RPCTypes,
        priority: i32,
    ) -> Result<(quinn::SendStream, FrameReader), TransportError> {
        let conn = self.connection().await?;
        let (send, recv) = conn.open_bi().await.map_err(|e| broken(rpc, e))?;
        let _ = send.set_priority(priority);
        Ok((send, FrameReader::new(recv, self.max_len)))
    }

    /// One request on a fresh stream, one reply.
    async fn call<C: RaftWireConfig>(
        &self,
        rpc: RPCTypes,
        deadline: Duration,
        msg: Message<C>,
    ) -> Result<Message<C>, TransportError> {
        let work = async {
            let (mut send, mut reader) = self.open(rpc, 0).await?;
            write_frame(&mut send, 0, &msg, self.max_len)
                .await
                .map_err(|e| write_failed(rpc, e))?;
            let _ = send.finish();
            reply(rpc, reader.next::<C>().await)
        };
        tokio::time::timeout(deadline, work)
            .await
            .map_err(|_| TransportError::Timeout { rpc, after: deadline })?
    }

    pub(crate) async fn vote<C: RaftWireConfig>(
        &self,
        req: VoteRequest<C>,
        pre_vote: bool,
        deadline: Duration,
    ) -> Result<VoteResponse<C>, TransportError> {
        let msg = if pre_vote {
            Message::PreVote(req)
        } else {
            Message::Vote(req)
        };
        match self.call(RPCTypes::Vote, deadline, msg).await? {
            Message::VoteReply(r) => Ok(r),
            other => Err(unexpected(RPCTypes::Vote, &other)),
        }
    }

    pub(crate) async fn append<C: RaftWireConfig>(
        &self,
        req: AppendEntriesRequest<C>,
        deadline: Duration,
    ) -> Result<AppendEntriesResponse<C>, TransportError> {
        match self
            .call(RPCTypes::AppendEntries, deadline, Message::Append(req))
            .await?
        {
            Message::AppendReply(r) => Ok(r),
            other => Err(unexpected(RPCTypes::AppendEntries, &other)),
        }
    }

    pub(crate) async fn transfer_leader<C: RaftWireConfig>(
        &self,
        req: TransferLeaderRequest<C>,
        deadline: Duration,
    ) -> Result<TransferLeaderResponse<C>, TransportError> {
        match self
            .call(RPCTypes::TransferLeader, deadline, Message::TransferLeader(req))
            .await?
        {
            Message::TransferLeaderReply(r) => Ok(r),
            other => Err(unexpected(RPCTypes::TransferLeader, &other)),
        }
    }

    /// Opens a stream for one replication session and pipelines `input` over it.
    pub(crate) async fn stream_append<'s, C, S>(
        &'s self,
        input: S,
        config: &Config,
        deadline: Duration,
        priority: i32,
    ) -> Result<impl Stream<Item = Result<StreamAppendResult<C>, TransportError>> + Send + 's, TransportError>
    where
        C: RaftWireConfig,
        S: Stream<Item = AppendEntriesRequest<C>> + Send + Unpin + 'static,
    {
        let rpc = RPCTypes::AppendEntries;
        let (send, reader) = tokio::time::timeout(deadline, self.open(rpc, priority))
            .await
            .map_err(|_| TransportError::Timeout { rpc, after: deadline })??;
        let replies = futures::stream::unfold(reader, move |mut reader| async move {
            let item = match reader.next::<C>().await {
                Ok(None) => return None,
                next => reply(rpc, next).and_then(|m| match m {
                    Message::StreamAppendReply(r) => Ok(r),
                    other => Err(unexpected(rpc, &other)),
                }),
            };
            Some((item, reader))
        });
        let window = pipeline::Window {
            requests: config.max_in_flight_requests,
            bytes: config.max_in_flight_bytes,
        };
        let sink = StreamSink {
            send,
            next_id: 0,
            max_len: self.max_len,
        };
        Ok(pipeline::run(
            input,
            sink,
            Box::pin(replies),
            window,
            deadline,
            self.stats.clone(),
        ))
    }

    /// Streams a snapshot as a meta frame and chunk frames on its own stream; `idle` bounds
    /// every step that must make progress.
    pub(crate) async fn send_snapshot<C, SD>(
        &self,
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
        let (mut send, mut reader) = tokio::time::timeout(idle, self.open(rpc, 0))
            .await
            .map_err(timeout)??;
        let max = self.max_len;
        write_frame(&mut send, 0, &Message::<C>::SnapshotMeta { vote, meta }, max)
            .await
            .map_err(|e| write_failed(rpc, e))?;
        data.seek(std::io::SeekFrom::Start(0))
            .await
            .map_err(TransportError::SnapshotRead)?;
        let mut id = 1;
        loop {
            let next = crate::snapshot::next_chunk(&mut data, chunk_size).await;
            let Some(buf) = next.map_err(TransportError::SnapshotRead)? else {
                break;
            };
            let n = buf.len();
            let chunk = Message::<C>::SnapshotChunk(buf);
            tokio::time::timeout(idle, write_frame(&mut send, id, &chunk, max))
                .await
                .map_err(timeout)?
                .map_err(|e| write_failed(rpc, e))?;
            self.stats.record_snapshot_bytes(n);
            id += 1;
        }
        let _ = send.finish();
        let resp = tokio::time::timeout(idle, reader.next::<C>())
            .await
            .map_err(timeout)?;
        match reply(rpc, resp)? {
            Message::SnapshotAck(r) => {
                self.stats.record_snapshot_sent();
                Ok(r)
            }
            other => Err(unexpected(rpc, &other)),
        }
    }
}

struct StreamSink {
    send: quinn::SendStream,
    next_id: u64,
    max_len: usize,
}

impl<C: RaftWireConfig> RequestSink<C> for StreamSink {
    async fn send(&mut self, req: AppendEntriesRequest<C>) -> Result<usize, TransportError> {
        let id = self.next_id;
        self.next_id += 1;
        write_frame(&mut self.send, id, &Message::StreamAppend(req), self.max_len)
            .await
            .map_err(|e| write_failed(RPCTypes::AppendEntries, e))
    }

    fn finish(&mut self) {
        let _ = self.send.finish();
    }
}

/// A reply frame, or the error the peer sent instead.
fn reply<C: RaftWireConfig>(
    rpc: RPCTypes,
    next: Result<Option<(u64, Message<C>)>, super::ReadError>,
) -> Result<Message<C>, TransportError> {
    match next {
        Ok(Some((_, Message::Error { code, message }))) => Err(TransportError::Remote {
            rpc,
            reason: format!("{code:?}: {message}"),
        }),
        Ok(Some((_, msg))) => Ok(msg),
        Ok(None) => Err(TransportError::Broken {
            rpc,
            reason: "the peer closed the stream without replying".into(),
        }),
        Err(super::ReadError::Frame(crate::codec::FrameError::Body { source, .. })) => {
            Err(TransportError::Decode { rpc, source })
        }
        Err(e) => Err(broken(rpc, e)),
    }
}

fn unexpected<C: RaftWireConfig>(rpc: RPCTypes, msg: &Message<C>) -> TransportError {
    TransportError::Broken {
        rpc,
        reason: format!("unexpected {:?} frame in reply", msg.kind()),
    }
}

fn broken(rpc: RPCTypes, e: impl std::error::Error + 'static) -> TransportError {
    TransportError::Broken {
        rpc,
        reason: error_chain(&e),
    }
}

fn write_failed(rpc: RPCTypes, e: WriteError) -> TransportError {
    match e {
        WriteError::Frame(crate::codec::FrameError::Encode(e)) => TransportError::Encode(e),
        other => broken(rpc, other),
    }
}
