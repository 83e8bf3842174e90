//! The QUIC server side: accepts connections, then serves every stream on its own task.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use futures::StreamExt;
use openraft::Raft;
use openraft::Snapshot;
use openraft::storage::RaftStateMachine;
use tokio::io::AsyncSeekExt;
use tokio::io::AsyncWriteExt;
use tokio::sync::oneshot;
use tokio::task::JoinSet;

use super::FrameReader;
use super::ReadError;
use super::write_frame;
use crate::codec::ErrorCode;
use crate::codec::Message;
use crate::config::Config;
use crate::error::ServerError;
use crate::snapshot::SnapshotData;
use crate::snapshot::SnapshotSink;
use crate::tls;
use crate::types::RaftWireConfig;

/// How long a new stream may take to deliver its first frame.
const FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(10);

struct Ctx<C: RaftWireConfig, SM: RaftStateMachine<C>> {
    raft: Raft<C, SM>,
    sink: Arc<dyn SnapshotSink<SM::SnapshotData>>,
    max_len: usize,
}

/// Why a stream was refused: sent to the peer as an error frame, and logged.
struct Refusal {
    code: ErrorCode,
    message: String,
}

impl Refusal {
    fn new(code: ErrorCode, message: impl ToString) -> Self {
        Refusal {
            code,
            message: message.to_string(),
        }
    }
}

impl From<ReadError> for Refusal {
    fn from(e: ReadError) -> Self {
        match &e {
            ReadError::Frame(f) => Refusal::new(f.error_code(), f),
            _ => Refusal::new(ErrorCode::BadRequest, e),
        }
    }
}

/// The calling node, known from its certificate.
#[derive(Debug, Clone, Copy)]
struct Caller {
    node_id: u64,
    addr: std::net::SocketAddr,
}

impl Caller {
    fn check(&self, claimed: u64) -> Result<(), Refusal> {
        tls::speaks_for(Some(self.node_id), claimed).map_err(|e| Refusal::new(ErrorCode::Refused, e))
    }
}

/// Serves `raft` over QUIC on `socket` until `shutdown` fires.
pub(crate) async fn serve<C, SM>(
    raft: Raft<C, SM>,
    sink: Arc<dyn SnapshotSink<SM::SnapshotData>>,
    config: Config,
    socket: std::net::UdpSocket,
    mut shutdown: oneshot::Receiver<()>,
) -> Result<(), ServerError>
where
    C: RaftWireConfig,
    SM: RaftStateMachine<C>,
    SM::SnapshotData: SnapshotData,
{
    let serve_err = |e: &dyn std::fmt::Display| ServerError::Serve(e.to_string());
    let tls = config
        .tls
        .as_ref()
        .ok_or_else(|| serve_err(&"QUIC needs a TLS identity"))?;
    let crypto = tls.server_config(super::ALPN).map_err(|e| serve_err(&e))?;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(crypto).map_err(|e| serve_err(&e))?;
    let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server_config.transport_config(Arc::new(super::transport_config(&config.quic)));
    let runtime = quinn::default_runtime().ok_or_else(|| serve_err(&"no async runtime"))?;
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server_config),
        socket,
        runtime,
    )
    .map_err(|e| serve_err(&e))?;
    let ctx = Arc::new(Ctx {
        raft,
        sink,
        max_len: super::max_frame(&config),
    });
    // Dropping the set (on shutdown, or when this task is aborted) aborts every connection.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                connections.spawn(connection(incoming, ctx.clone(), config.connect_timeout));
            }
        }
        while connections.try_join_next().is_some() {}
    }
    endpoint.close(quinn::VarInt::from_u32(0), b"server shutting down");
    drop(connections);
    // The socket is released once the endpoint has told its peers (bounded: peers that do
    // not answer are given up on).
    let _ = tokio::time::timeout(Duration::from_millis(900), endpoint.wait_idle()).await;
    Ok(())
}

async fn connection<C, SM>(incoming: quinn::Incoming, ctx: Arc<Ctx<C, SM>>, handshake_timeout: Duration)
where
    C: RaftWireConfig,
    SM: RaftStateMachine<C>,
    SM::SnapshotData: SnapshotData,
{
    let addr = incoming.remote_address();
    let conn = match tokio::time::timeout(handshake_timeout, incoming).await {
        Ok(Ok(conn)) => conn,
        // A client that gave up (shutting down, timed out) is no refusal worth a warning.
        Ok(Err(e @ quinn::ConnectionError::ApplicationClosed(_))) => {
            return tracing::debug!(%addr, "QUIC handshake abandoned by the client: {e}");
        }
        Ok(Err(e)) => return tracing::warn!(%addr, "QUIC handshake refused: {e}"),
        Err(_) => return tracing::warn!(%addr, "QUIC handshake timed out after {handshake_timeout:?}"),
    };
    let certs = conn.peer_identity().and_then(|id| {
        id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
            .ok()
    });
    let Some(node_id) = tls::peer_node_id(certs.as_deref().map(|c| c.as_slice())) else {
        // The verifier already refuses certificates without a node id.
        conn.close(
            quinn::VarInt::from_u32(ErrorCode::Refused as u32),
            b"no node identity",
        );
        return tracing::warn!(%addr, "QUIC peer has no node identity; closed");
    };
    let caller = Caller { node_id, addr };
    tracing::debug!(%addr, node_id, "QUIC connection accepted");
    let mut streams = JoinSet::new();
    loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                streams.spawn(stream(
                    send,
                    FrameReader::new(recv, ctx.max_len),
                    ctx.clone(),
                    caller,
                ));
            }
            Err(e) => {
                tracing::debug!(%addr, node_id, "QUIC connection ended: {e}");
                break;
            }
        }
        while streams.try_join_next().is_some() {}
    }
}

/// Serves one stream: its first frame says what it is for.
async fn stream<C, SM>(
    mut send: quinn::SendStream,
    mut reader: FrameReader,
    ctx: Arc<Ctx<C, SM>>,
    caller: Caller,
) where
    C: RaftWireConfig,
    SM: RaftStateMachine<C>,
    SM::SnapshotData: SnapshotData,
{
    let outcome = match tokio::time::timeout(FIRST_FRAME_TIMEOUT, reader.next::<C>()).await {
        Err(_) => Err(Refusal::new(ErrorCode::BadRequest, "no frame within 10 s")),
        Ok(Ok(None)) => return,
        Ok(Err(e)) => Err(Refusal::from(e)),
        Ok(Ok(Some((id, msg)))) => dispatch(id, msg, &mut send, reader, &ctx, caller).await,
    };
    match outcome {
        Ok(()) => {
            let _ = send.finish();
        }
        Err(refusal) => {
            tracing::warn!(node = caller.node_id, addr = %caller.addr, code = ?refusal.code, "refusing a QUIC stream: {}", refusal.message);
            let frame = Message::<C>::Error {
                code: refusal.code,
                message: refusal.message,
            };
            let _ = write_frame(&mut send, 0, &frame, ctx.max_len).await;
            let _ = send.finish();
        }
    }
}

async fn dispatch<C, SM>(
    id: u64,
    msg: Message<C>,
    send: &mut quinn::SendStream,
    mut reader: FrameReader,
    ctx: &Ctx<C, SM>,
    caller: Caller,
) -> Result<(), Refusal>
where
    C: RaftWireConfig,
    SM: RaftStateMachine<C>,
    SM::SnapshotData: SnapshotData,
{
    let refused = |e: &dyn std::fmt::Display| Refusal::new(ErrorCode::Refused, format!("raft: {e}"));
    let reply = match msg {
        Message::Vote(req) => {
            caller.check(req.vote.leader_id.node_id)?;
            Message::VoteReply(ctx.raft.vote(req).await.map_err(|e| refused(&e))?)
        }
        Message::PreVote(req) => {
            caller.check(req.vote.leader_id.node_id)?;
            Message::VoteReply(ctx.raft.pre_vote(req).await.map_err(|e| refused(&e))?)
        }
        Message::Append(req) => {
            caller.check(req.vote.leader_id.node_id)?;
            Message::AppendReply(ctx.raft.append_entries(req).await.map_err(|e| refused(&e))?)
        }
        Message::TransferLeader(req) => {
            caller.check(req.from_leader().leader_id.node_id)?;
            Message::TransferLeaderReply(
                ctx.raft
                    .handle_transfer_leader(req)
                    .await
                    .map_err(|e| refused(&e))?,
            )
        }
        Message::StreamAppend(req) => return stream_append(id, req, send, reader, ctx, caller).await,
        Message::SnapshotMeta { vote, meta } => {
            caller.check(vote.leader_id.node_id)?;
            let mut data = ctx
                .sink
                .create()
                .await
                .map_err(|e| refused(&format!("cannot create snapshot data: {e}")))?;
            let mut received = 0u64;
            while let Some((_, msg)) = reader.next::<C>().await? {
                let Message::SnapshotChunk(bytes) = msg else {
                    reader.stop(ErrorCode::UnexpectedKind);
                    return Err(Refusal::new(
                        ErrorCode::UnexpectedKind,
                        format!("{:?} inside a snapshot", msg.kind()),
                    ));
                };
                data.write_all(&bytes)
                    .await
                    .map_err(|e| refused(&format!("writing snapshot data: {e}")))?;
                received += bytes.len() as u64;
            }
            data.flush()
                .await
                .map_err(|e| refused(&format!("flushing snapshot data: {e}")))?;
            data.seek(std::io::SeekFrom::Start(0))
                .await
                .map_err(|e| refused(&format!("rewinding snapshot data: {e}")))?;
            tracing::info!(
                bytes = received,
                from = caller.node_id,
                "snapshot received over QUIC, installing"
            );
            let snapshot = Snapshot { meta, snapshot: data };
            Message::SnapshotAck(
                ctx.raft
                    .install_full_snapshot(vote, snapshot)
                    .await
                    .map_err(|e| refused(&e))?,
            )
        }
        other => {
            reader.stop(ErrorCode::UnexpectedKind);
            return Err(Refusal::new(
                ErrorCode::UnexpectedKind,
                format!("a stream cannot start with {:?}", other.kind()),
            ));
        }
    };
    write_frame(send, id, &reply, ctx.max_len)
        .await
        .map(|_| ())
        .map_err(|e| Refusal::new(ErrorCode::Internal, e))
}

/// Feeds the stream's requests to `Raft::stream_append` as they arrive and writes each result
/// back under its request's id, in order. A bad frame ends the input; it is answered with an
/// error frame after the replies to every request before it.
async fn stream_append<C, SM>(
    first_id: u64,
    first: openraft::raft::AppendEntriesRequest<C>,
    send: &mut quinn::SendStream,
    reader: FrameReader,
    ctx: &Ctx<C, SM>,
    caller: Caller,
) -> Result<(), Refusal>
where
    C: RaftWireConfig,
    SM: RaftStateMachine<C>,
    SM::SnapshotData: SnapshotData,
{
    caller.check(first.vote.leader_id.node_id)?;
    let ids: Arc<Mutex<VecDeque<u64>>> = Arc::new(Mutex::new(VecDeque::from([first_id])));
    let failure: Arc<Mutex<Option<Refusal>>> = Arc::default();
    let (input_ids, input_failure) = (ids.clone(), failure.clone());
    let rest = futures::stream::unfold(Some(reader), move |reader| {
        let (ids, failure) = (input_ids.clone(), input_failure.clone());
        async move {
            let mut reader = reader?;
            let fail = |r: Refusal| {
                *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
                None
            };
            match reader.next::<C>().await {
                Ok(None) => None,
                Ok(Some((id, Message::StreamAppend(req)))) => {
                    match caller.check(req.vote.leader_id.node_id) {
                        Ok(()) => {
                            ids.lock().unwrap_or_else(|p| p.into_inner()).push_back(id);
                            Some((req, Some(reader)))
                        }
                        Err(r) => fail(r),
                    }
                }
                Ok(Some((_, other))) => {
                    reader.stop(ErrorCode::UnexpectedKind);
                    fail(Refusal::new(
                        ErrorCode::UnexpectedKind,
                        format!("{:?} on a replication stream", other.kind()),
                    ))
                }
                Err(e) => {
                    if let ReadError::Frame(_) = e {
                        reader.stop(ErrorCode::BadRequest);
                    }
                    fail(Refusal::from(e))
                }
            }
        }
    });
    let input = futures::stream::once(futures::future::ready(first)).chain(rest);
    let mut results = std::pin::pin!(ctx.raft.stream_append(input));
    while let Some(result) = results.next().await {
        let result = result.map_err(|e| Refusal::new(ErrorCode::Refused, format!("raft: {e}")))?;
        let id = ids.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
        let id = id.ok_or_else(|| Refusal::new(ErrorCode::Internal, "more results than requests"))?;
        write_frame(send, id, &Message::StreamAppendReply(result), ctx.max_len)
            .await
            .map_err(|e| Refusal::new(ErrorCode::Internal, e))?;
    }
    match failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
        Some(refusal) => Err(refusal),
        None => Ok(()),
    }
}
