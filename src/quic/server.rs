//! The QUIC server side: accepts connections, reads each stream's frames and hands them to
//! the shared server core; nothing here decides what a request may do.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use futures::StreamExt;
use openraft::storage::RaftStateMachine;
use tokio::sync::OwnedSemaphorePermit;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::FrameReader;
use super::Outgoing;
use super::ReadError;
use crate::codec::ErrorCode;
use crate::codec::Message;
use crate::config::Config;
use crate::error::ServerError;
use crate::limits::Admission;
use crate::service::Caller;
use crate::service::Refusal;
use crate::service::RefusalKind;
use crate::service::Service;
use crate::service::refuse;
use crate::snapshot::Part;
use crate::snapshot::SnapshotData;
use crate::tls;
use crate::types::RaftWireConfig;

/// How long a new stream may take to deliver its first frame.
const FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(10);

struct Ctx<C: RaftWireConfig, SM: RaftStateMachine<C>> {
    service: Arc<Service<C, SM>>,
    max_len: usize,
    max_control: usize,
    admission: Arc<Admission>,
    handshake_timeout: Duration,
}

/// The wire code of a refusal.
fn error_code(kind: RefusalKind) -> ErrorCode {
    match kind {
        RefusalKind::BadRequest => ErrorCode::BadRequest,
        RefusalKind::TooLarge => ErrorCode::TooLarge,
        RefusalKind::Forbidden => ErrorCode::Forbidden,
        RefusalKind::UnexpectedKind => ErrorCode::UnexpectedKind,
        RefusalKind::Unavailable => ErrorCode::Refused,
        RefusalKind::Timeout => ErrorCode::Timeout,
        RefusalKind::Internal => ErrorCode::Internal,
        RefusalKind::Broken => ErrorCode::Aborted,
    }
}

/// A read error under a session already under way: a stream the peer reset or a connection
/// that went away is the session ending, not a bad request.
fn session_read_refusal(e: ReadError) -> Refusal {
    match e {
        ReadError::Stream(io) => Refusal::new(RefusalKind::Broken, format!("stream failed: {io}")),
        other => read_refusal(other),
    }
}

fn read_refusal(e: ReadError) -> Refusal {
    match &e {
        ReadError::Frame(f) if f.error_code() == ErrorCode::TooLarge => {
            Refusal::new(RefusalKind::TooLarge, e)
        }
        _ => Refusal::new(RefusalKind::BadRequest, e),
    }
}

/// Serves `service` over QUIC on `socket` until `shutdown` fires; then stops accepting, gives
/// open streams `grace` to finish and closes every connection.
pub(crate) async fn serve<C, SM>(
    service: Arc<Service<C, SM>>,
    config: Config,
    socket: std::net::UdpSocket,
    shutdown: watch::Receiver<bool>,
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
    let mut transport = super::transport_config(&config.quic);
    let streams = config
        .max_concurrent_streams
        .min(config.quic.max_concurrent_streams);
    transport.max_concurrent_bidi_streams(quinn::VarInt::from_u32(streams));
    server_config.transport_config(Arc::new(transport));
    let runtime = quinn::default_runtime().ok_or_else(|| serve_err(&"no async runtime"))?;
    let endpoint = quinn::Endpoint::new(
        super::endpoint_config(Some(tls)),
        Some(server_config),
        socket,
        runtime,
    )
    .map_err(|e| serve_err(&e))?;
    let ctx = Arc::new(Ctx {
        service,
        max_len: super::max_frame(&config),
        max_control: config.max_control_message_size,
        admission: Admission::new(&config),
        handshake_timeout: config.connect_timeout,
    });
    let mut connections = JoinSet::new();
    let mut stopping = shutdown.clone();
    loop {
        tokio::select! {
            _ = stopping.wait_for(|stop| *stop) => break,
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                match ctx.admission.handshake(incoming.remote_address()) {
                    Some(slot) => {
                        let stop = shutdown.clone();
                        connections.spawn(connection(incoming, slot, ctx.clone(), stop));
                    }
                    // Every handshake slot is busy. A Retry costs no state: a real client
                    // answers it (and comes back validated), a spoofed or abandoned one never
                    // does. An address already validated is refused outright.
                    None if !incoming.remote_address_validated() => {
                        let _ = incoming.retry();
                    }
                    None => incoming.refuse(),
                }
            }
        }
        while connections.try_join_next().is_some() {}
    }
    // Stop accepting: new connection attempts are refused from here on.
    endpoint.set_server_config(None);
    // Connections stop taking new streams; open ones get the grace period.
    let drained = tokio::time::timeout(config.shutdown_grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::info!(
            open = connections.len(),
            "QUIC connections still busy after the shutdown grace period; closing them"
        );
    }
    endpoint.close(quinn::VarInt::from_u32(0), b"server shutting down");
    connections.shutdown().await;
    // The socket is released once the endpoint has told its peers (bounded: peers that do
    // not answer are given up on).
    let _ = tokio::time::timeout(Duration::from_millis(500), endpoint.wait_idle()).await;
    Ok(())
}

async fn connection<C, SM>(
    incoming: quinn::Incoming,
    handshake_slot: OwnedSemaphorePermit,
    ctx: Arc<Ctx<C, SM>>,
    mut shutdown: watch::Receiver<bool>,
) where
    C: RaftWireConfig,
    SM: RaftStateMachine<C>,
    SM::SnapshotData: SnapshotData,
{
    let addr = incoming.remote_address();
    let handshake_timeout = ctx.handshake_timeout;
    let handshake = tokio::time::timeout(handshake_timeout, incoming).await;
    drop(handshake_slot);
    let conn = match handshake {
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
        conn.close(super::code(super::REFUSED), super::REFUSED_REASON);
        return tracing::warn!(%addr, "QUIC peer has no node identity; closed");
    };
    // Held while the connection lives; `admit` logs a refusal.
    let Some(_peer_slot) = ctx.admission.admit(node_id, addr) else {
        conn.close(
            quinn::VarInt::from_u32(ErrorCode::Refused as u32),
            b"too many connections from this node",
        );
        return;
    };
    let caller = Caller {
        node_id: Some(node_id),
        addr,
    };
    tracing::debug!(%addr, node_id, "QUIC connection accepted");
    // Dropping the set (when this task is aborted at the end of a shutdown) aborts every
    // stream.
    let mut streams = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => break,
            accepted = conn.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    streams.spawn(stream(
                        Outgoing::new(send),
                        FrameReader::new(recv, ctx.max_len).with_control_limit(ctx.max_control),
                        ctx.clone(),
                        caller,
                    ));
                }
                Err(e) => {
                    tracing::debug!(%addr, node_id, "QUIC connection ended: {e}");
                    return;
                }
            }
        }
        while streams.try_join_next().is_some() {}
    }
    // Shutting down: open streams may finish within the server's grace period.
    while streams.join_next().await.is_some() {}
}

/// Serves one stream: its first frame says what it is for.
async fn stream<C, SM>(mut send: Outgoing, mut reader: FrameReader, ctx: Arc<Ctx<C, SM>>, caller: Caller)
where
    C: RaftWireConfig,
    SM: RaftStateMachine<C>,
    SM::SnapshotData: SnapshotData,
{
    let outcome = match tokio::time::timeout(FIRST_FRAME_TIMEOUT, reader.next::<C>()).await {
        Err(_) => Err(refuse(
            &caller,
            "QUIC",
            RefusalKind::BadRequest,
            "no frame within 10 s",
        )),
        Ok(Ok(None)) => {
            send.finish();
            return;
        }
        Ok(Err(e)) => {
            // A bad or oversized first frame: the peer need not send the rest of it.
            if let ReadError::Frame(f) = &e {
                reader.stop(f.error_code());
            }
            let r = read_refusal(e);
            Err(refuse(&caller, "QUIC", r.kind, r.message))
        }
        Ok(Ok(Some((id, msg)))) => dispatch(id, msg, &mut send, reader, &ctx, caller).await,
    };
    if let Err(refusal) = outcome {
        // Logged where it was made (the core, or `refuse` above).
        let frame = Message::<C>::Error {
            code: error_code(refusal.kind),
            message: refusal.message,
        };
        let _ = send.write(0, &frame, ctx.max_len).await;
    }
    send.finish();
}

async fn dispatch<C, SM>(
    id: u64,
    msg: Message<C>,
    send: &mut Outgoing,
    mut reader: FrameReader,
    ctx: &Ctx<C, SM>,
    caller: Caller,
) -> Result<(), Refusal>
where
    C: RaftWireConfig,
    SM: RaftStateMachine<C>,
    SM::SnapshotData: SnapshotData,
{
    let svc = &ctx.service;
    let reply = match msg {
        Message::Vote(req) => Message::VoteReply(svc.vote(caller, req, false).await?),
        Message::PreVote(req) => Message::VoteReply(svc.vote(caller, req, true).await?),
        Message::Append(req) => Message::AppendReply(svc.append(caller, req).await?),
        Message::TransferLeader(req) => Message::TransferLeaderReply(svc.transfer_leader(caller, req).await?),
        Message::StreamAppend(req) => return stream_append(id, req, send, reader, ctx, caller).await,
        Message::SnapshotMeta { vote, meta } => {
            let parts = futures::stream::unfold(Some(reader), |reader| async move {
                let mut reader = reader?;
                let part = match reader.next::<C>().await {
                    Ok(None) => return None,
                    Ok(Some((_, Message::SnapshotChunk(bytes)))) => Ok(Part::Data(bytes)),
                    Ok(Some((_, Message::SnapshotEnd(trailer)))) => Ok(Part::End(trailer)),
                    Ok(Some((_, other))) => {
                        reader.stop(ErrorCode::UnexpectedKind);
                        Err(Refusal::new(
                            RefusalKind::UnexpectedKind,
                            format!("{:?} inside a snapshot", other.kind()),
                        ))
                    }
                    Err(e) => Err(session_read_refusal(e)),
                };
                // After an error nothing more is read from the stream.
                let go_on = part.is_ok();
                Some((part, go_on.then_some(reader)))
            });
            Message::SnapshotAck(svc.install_snapshot(caller, vote, meta, parts).await?)
        }
        other => {
            reader.stop(ErrorCode::UnexpectedKind);
            return Err(refuse(
                &caller,
                "QUIC",
                RefusalKind::UnexpectedKind,
                format!("a stream cannot start with {:?}", other.kind()),
            ));
        }
    };
    send.write(id, &reply, ctx.max_len)
        .await
        .map(|_| ())
        .map_err(|e| Refusal::new(RefusalKind::Internal, e))
}

/// Reads the stream's requests into the core's `stream_append` and writes each result back
/// under its request's id, in order. A bad frame ends the input; it is answered with an error
/// frame after the replies to every request before it.
async fn stream_append<C, SM>(
    first_id: u64,
    first: openraft::raft::AppendEntriesRequest<C>,
    send: &mut Outgoing,
    reader: FrameReader,
    ctx: &Ctx<C, SM>,
    caller: Caller,
) -> Result<(), Refusal>
where
    C: RaftWireConfig,
    SM: RaftStateMachine<C>,
    SM::SnapshotData: SnapshotData,
{
    let ids: Arc<Mutex<VecDeque<u64>>> = Arc::new(Mutex::new(VecDeque::from([first_id])));
    let input_ids = ids.clone();
    let rest = futures::stream::unfold(Some(reader), move |reader| {
        let ids = input_ids.clone();
        async move {
            let mut reader = reader?;
            let item = match reader.next::<C>().await {
                Ok(None) => return None,
                Ok(Some((id, Message::StreamAppend(req)))) => {
                    ids.lock().unwrap_or_else(|p| p.into_inner()).push_back(id);
                    Ok(req)
                }
                Ok(Some((_, other))) => {
                    reader.stop(ErrorCode::UnexpectedKind);
                    Err(Refusal::new(
                        RefusalKind::UnexpectedKind,
                        format!("{:?} on a replication stream", other.kind()),
                    ))
                }
                Err(e) => {
                    if let ReadError::Frame(_) = e {
                        reader.stop(ErrorCode::BadRequest);
                    }
                    Err(session_read_refusal(e))
                }
            };
            let go_on = item.is_ok();
            Some((item, go_on.then_some(reader)))
        }
    });
    let input = futures::stream::once(futures::future::ready(Ok(first))).chain(rest);
    let mut results = std::pin::pin!(ctx.service.stream_append(caller, input));
    while let Some(result) = results.next().await {
        let result = result?;
        let id = ids.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
        let id = id.ok_or_else(|| Refusal::new(RefusalKind::Internal, "more results than requests"))?;
        send.write(id, &Message::StreamAppendReply(result), ctx.max_len)
            .await
            .map_err(|e| Refusal::new(RefusalKind::Internal, e))?;
    }
    Ok(())
}
