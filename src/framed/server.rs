//! The server side of one exchange in frames: its first frame says what it is for; the
//! request is handed to the shared server core and the answer written back. Nothing here
//! decides what a request may do.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::FutureExt;
use futures::StreamExt;
use openraft::storage::RaftStateMachine;
use tokio::task::JoinSet;

use super::FrameReader;
use super::Outgoing;
use super::ReadError;
use super::RecvHalf;
use super::SendHalf;
use crate::codec::ErrorCode;
use crate::codec::Message;
use crate::service::Caller;
use crate::service::Refusal;
use crate::service::RefusalKind;
use crate::service::Service;
use crate::service::refuse;
use crate::snapshot::Part;
use crate::snapshot::SnapshotData;
use crate::types::RaftWireConfig;

/// What a transport tells [`exchange`] about itself.
pub(crate) struct Served<'a, C: RaftWireConfig, SM: RaftStateMachine<C>> {
    pub(crate) service: &'a Service<C, SM>,
    /// The largest frame body accepted and sent.
    pub(crate) max_len: usize,
    /// How long the exchange's first frame may take to arrive.
    pub(crate) first_frame: Duration,
    /// The transport's name in the logs.
    pub(crate) transport: &'static str,
}

/// Waits up to `grace` for every connection task to end by itself, and logs how many were
/// still busy; the caller then closes those.
pub(crate) async fn drain(connections: &mut JoinSet<()>, grace: Duration, transport: &str) {
    let drained =
        tokio::time::timeout(grace, async { while connections.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::info!(
            open = connections.len(),
            "{transport} connections still busy after the shutdown grace period; closing them"
        );
    }
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
        ReadError::Stream(_) | ReadError::Closed => Refusal::new(RefusalKind::Broken, e),
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

/// Serves one exchange. Returns whether it ended cleanly on both sides, so the connection
/// under it (on TCP) may carry the next one; after a refusal it never does.
pub(crate) async fn exchange<C, SM, W, R>(
    mut send: Outgoing<W>,
    mut reader: FrameReader<R>,
    served: &Served<'_, C, SM>,
    caller: Caller,
) -> bool
where
    C: RaftWireConfig,
    SM: RaftStateMachine<C>,
    SM::SnapshotData: SnapshotData,
    W: SendHalf,
    R: RecvHalf + 'static,
{
    let transport = served.transport;
    let outcome = match tokio::time::timeout(served.first_frame, reader.next::<C>()).await {
        Err(_) => Err(refuse(
            &caller,
            transport,
            RefusalKind::BadRequest,
            format!("no frame within {:?}", served.first_frame),
        )),
        Ok(Ok(None)) => return send.finish().await.is_ok(),
        // The peer closed an idle connection between exchanges: nothing to answer.
        Ok(Err(ReadError::Closed)) => return false,
        Ok(Err(e)) => {
            // A bad or oversized first frame: the peer need not send the rest of it.
            if let ReadError::Frame(f) = &e {
                reader.stop(f.error_code());
            }
            let r = read_refusal(e);
            Err(refuse(&caller, transport, r.kind, r.message))
        }
        Ok(Ok(Some((id, msg)))) => dispatch(id, msg, &mut send, reader, served, caller).await,
    };
    match outcome {
        Ok(read_all) => send.finish().await.is_ok() && read_all,
        Err(refusal) => {
            // Logged where it was made (the core, or `refuse` above).
            let frame = Message::<C>::Error {
                code: error_code(refusal.kind),
                message: refusal.message,
            };
            if send.write(0, &frame, served.max_len).await.is_ok() {
                let _ = send.finish().await;
            }
            false
        }
    }
}

async fn dispatch<C, SM, W, R>(
    id: u64,
    msg: Message<C>,
    send: &mut Outgoing<W>,
    mut reader: FrameReader<R>,
    served: &Served<'_, C, SM>,
    caller: Caller,
) -> Result<bool, Refusal>
where
    C: RaftWireConfig,
    SM: RaftStateMachine<C>,
    SM::SnapshotData: SnapshotData,
    W: SendHalf,
    R: RecvHalf + 'static,
{
    let svc = served.service;
    let reply = match msg {
        Message::Vote(req) => {
            request_end::<C, R>(&mut reader).await?;
            Message::VoteReply(svc.vote(caller, req, false).await?)
        }
        Message::PreVote(req) => {
            request_end::<C, R>(&mut reader).await?;
            Message::VoteReply(svc.vote(caller, req, true).await?)
        }
        Message::Append(req) => {
            request_end::<C, R>(&mut reader).await?;
            Message::AppendReply(svc.append(caller, req).await?)
        }
        Message::TransferLeader(req) => {
            request_end::<C, R>(&mut reader).await?;
            Message::TransferLeaderReply(svc.transfer_leader(caller, req).await?)
        }
        Message::StreamAppend(req) => return stream_append(id, req, send, reader, served, caller).await,
        Message::SnapshotMeta { vote, meta } => {
            let parts = futures::stream::unfold(Some(reader), |reader| async move {
                let mut reader = reader?;
                let part = match reader.next::<C>().await {
                    Ok(None) => return None,
                    Ok(Some((_, Message::SnapshotChunk(bytes)))) => Ok(Part::Data(bytes)),
                    // The trailer is the last frame. With end frames, the caller's part must
                    // end right after it; on a stream, the core's next read must find its end
                    // (anything after the trailer is refused there).
                    Ok(Some((_, Message::SnapshotEnd(trailer)))) if R::END_FRAMES => {
                        match reader.end::<C>().await {
                            Ok(()) => Ok(Part::End(trailer)),
                            Err(e) => Err(session_read_refusal(e)),
                        }
                    }
                    Ok(Some((_, Message::SnapshotEnd(trailer)))) => {
                        return Some((Ok(Part::End(trailer)), Some(reader)));
                    }
                    Ok(Some((_, other))) => {
                        reader.stop(ErrorCode::UnexpectedKind);
                        Err(Refusal::new(
                            RefusalKind::UnexpectedKind,
                            format!("{:?} inside a snapshot", other.kind()),
                        ))
                    }
                    Err(e) => Err(session_read_refusal(e)),
                };
                // After an error or the trailer nothing more is read.
                let go_on = matches!(part, Ok(Part::Data(_)));
                Some((part, go_on.then_some(reader)))
            });
            Message::SnapshotAck(svc.install_snapshot(caller, vote, meta, parts).await?)
        }
        other => {
            reader.stop(ErrorCode::UnexpectedKind);
            return Err(refuse(
                &caller,
                served.transport,
                RefusalKind::UnexpectedKind,
                format!("an exchange cannot start with {:?}", other.kind()),
            ));
        }
    };
    // Every request kind above has read the caller's whole part by now.
    send.write_last(id, &reply, served.max_len)
        .await
        .map(|_| true)
        .map_err(|e| Refusal::new(RefusalKind::Internal, e))
}

/// A single request is followed by the end of the caller's part.
async fn request_end<C: RaftWireConfig, R: RecvHalf>(reader: &mut FrameReader<R>) -> Result<(), Refusal> {
    reader.end::<C>().await.map_err(session_read_refusal)
}

/// Reads the exchange's requests into the core's `stream_append` and writes each result back
/// under its request's id, in order. A bad frame ends the input; it is answered with an error
/// frame after the replies to every request before it. `Ok(true)` when the caller's part was
/// read to its end (openraft may end the results early, after a rejection).
async fn stream_append<C, SM, W, R>(
    first_id: u64,
    first: openraft::raft::AppendEntriesRequest<C>,
    send: &mut Outgoing<W>,
    reader: FrameReader<R>,
    served: &Served<'_, C, SM>,
    caller: Caller,
) -> Result<bool, Refusal>
where
    C: RaftWireConfig,
    SM: RaftStateMachine<C>,
    SM::SnapshotData: SnapshotData,
    W: SendHalf,
    R: RecvHalf + 'static,
{
    let ids: Arc<Mutex<VecDeque<u64>>> = Arc::new(Mutex::new(VecDeque::from([first_id])));
    let input_ids = ids.clone();
    let ended = Arc::new(AtomicBool::new(false));
    let input_ended = ended.clone();
    let rest = futures::stream::unfold(Some(reader), move |reader| {
        let (ids, ended) = (input_ids.clone(), input_ended.clone());
        async move {
            let mut reader = reader?;
            let item = match reader.next::<C>().await {
                Ok(None) => {
                    ended.store(true, Ordering::Relaxed);
                    return None;
                }
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
    let mut results = std::pin::pin!(served.service.stream_append(caller, input));
    // Replies that are ready together leave in one write (one syscall and TLS record on
    // TCP, fewer packets on QUIC), up to this many.
    const MAX_BATCH: usize = 64;
    let mut batch: Vec<(u64, Message<C>)> = Vec::with_capacity(MAX_BATCH);
    while let Some(result) = results.next().await {
        let mut next = Some(result);
        // A failure that ends the session goes out after the replies before it.
        let mut failed = None;
        while let Some(result) = next.take() {
            let id = ids.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
            match (result, id) {
                (Ok(result), Some(id)) => batch.push((id, Message::StreamAppendReply(result))),
                (Ok(_), None) => {
                    failed = Some(Refusal::new(RefusalKind::Internal, "more results than requests"))
                }
                (Err(refusal), _) => failed = Some(refusal),
            }
            if failed.is_none() && batch.len() < MAX_BATCH {
                next = results.next().now_or_never().flatten();
            }
        }
        if !batch.is_empty() {
            send.write_batch(&batch, served.max_len)
                .await
                .map_err(|e| Refusal::new(RefusalKind::Internal, e))?;
            batch.clear();
        }
        if let Some(refusal) = failed {
            return Err(refusal);
        }
    }
    Ok(ended.load(Ordering::Relaxed))
}
