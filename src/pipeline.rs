//! Transport-independent pipelining of openraft's `stream_append`.
//!
//! openraft hands the network a pull-based stream of AppendEntries requests and sets no
//! in-flight window: how far we read ahead *is* the pipeline depth. This module reads ahead
//! up to a window (requests and bytes), pairs each reply with the oldest unanswered request
//! (the follower answers in order, one reply per request), and enforces an idle deadline:
//! while anything is in flight, a reply must arrive within it.

use std::collections::VecDeque;
use std::future::Future;
use std::time::Duration;

use futures::Stream;
use futures::StreamExt;
use openraft::network::RPCTypes;
use openraft::raft::AppendEntriesRequest;
use openraft::raft::StreamAppendResult;
use tokio::time::Instant;

use crate::error::TransportError;
use crate::stats::Stats;
use crate::types::RaftWireConfig;

/// The in-flight limits of one replication stream.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Window {
    pub(crate) requests: usize,
    pub(crate) bytes: usize,
}

/// The sending half of a replication stream.
pub(crate) trait RequestSink<C: RaftWireConfig>: Send {
    /// Encodes and sends one request; returns its encoded size. Must not wait for a reply.
    fn send(
        &mut self,
        req: AppendEntriesRequest<C>,
    ) -> impl Future<Output = Result<usize, TransportError>> + Send;

    /// Half-closes the stream: no more requests follow.
    fn finish(&mut self);
}

struct State<C: RaftWireConfig, S, K, R> {
    input: S,
    sink: K,
    replies: R,
    /// Encoded sizes of the requests awaiting a reply, oldest first.
    in_flight: VecDeque<usize>,
    in_flight_bytes: usize,
    input_done: bool,
    window: Window,
    idle: Duration,
    last_progress: Instant,
    stats: Stats,
    _c: std::marker::PhantomData<fn() -> C>,
}

impl<C, S, K, R> State<C, S, K, R>
where
    C: RaftWireConfig,
    S: Stream<Item = AppendEntriesRequest<C>> + Send + Unpin,
    K: RequestSink<C>,
    R: Stream<Item = Result<StreamAppendResult<C>, TransportError>> + Send + Unpin,
{
    fn may_send(&self) -> bool {
        !self.input_done
            && (self.in_flight.is_empty()
                || (self.in_flight.len() < self.window.requests && self.in_flight_bytes < self.window.bytes))
    }

    /// The next output item; `None` ends the stream.
    async fn next(&mut self) -> Option<Result<StreamAppendResult<C>, TransportError>> {
        loop {
            if self.input_done && self.in_flight.is_empty() {
                return self.drain().await;
            }
            let may_send = self.may_send();
            let waiting = !self.in_flight.is_empty();
            let deadline = self.last_progress + self.idle;
            tokio::select! {
                biased;
                reply = self.replies.next(), if waiting => {
                    return Some(self.on_reply(reply));
                }
                req = self.input.next(), if may_send => {
                    let Some(req) = req else {
                        self.input_done = true;
                        self.sink.finish();
                        continue;
                    };
                    let size = match self.sink.send(req).await {
                        Ok(size) => size,
                        Err(e) => return Some(Err(e)),
                    };
                    if self.in_flight.is_empty() {
                        self.last_progress = Instant::now();
                    }
                    self.in_flight.push_back(size);
                    self.in_flight_bytes += size;
                    self.stats.record_in_flight(self.in_flight.len());
                }
                _ = tokio::time::sleep_until(deadline), if waiting => {
                    return Some(Err(TransportError::Timeout { rpc: RPCTypes::AppendEntries, after: self.idle }));
                }
            }
        }
    }

    /// Every request is answered: wait for the peer to end the reply stream too, so the call
    /// closes cleanly (an abandoned HTTP/2 stream is reset, and a server counts resets against
    /// the connection). A reply beyond the requests is a protocol error; a peer that never
    /// ends the stream is given up on after the idle deadline.
    async fn drain(&mut self) -> Option<Result<StreamAppendResult<C>, TransportError>> {
        match tokio::time::timeout(self.idle, self.replies.next()).await {
            Ok(None) | Err(_) => None,
            Ok(Some(Err(e))) => Some(Err(e)),
            Ok(Some(Ok(_))) => Some(Err(TransportError::Broken {
                rpc: RPCTypes::AppendEntries,
                reason: "the peer sent more replies than there were requests".into(),
            })),
        }
    }

    fn on_reply(
        &mut self,
        reply: Option<Result<StreamAppendResult<C>, TransportError>>,
    ) -> Result<StreamAppendResult<C>, TransportError> {
        let reply = reply.unwrap_or_else(|| {
            Err(TransportError::Broken {
                rpc: RPCTypes::AppendEntries,
                reason: format!("stream ended with {} requests unanswered", self.in_flight.len()),
            })
        })?;
        if let Some(size) = self.in_flight.pop_front() {
            self.in_flight_bytes -= size;
        }
        self.last_progress = Instant::now();
        Ok(reply)
    }
}

/// Runs a pipelined replication session over `sink`/`replies`.
///
/// The returned stream yields results in input order and ends after the input ends and every
/// request is answered, or right after the first error or rejection (`Conflict`/`HigherVote`),
/// which ends the session as openraft expects. Dropping it abandons the session.
pub(crate) fn run<'s, C, S, K, R>(
    input: S,
    sink: K,
    replies: R,
    window: Window,
    idle: Duration,
    stats: Stats,
) -> impl Stream<Item = Result<StreamAppendResult<C>, TransportError>> + Send + 's
where
    C: RaftWireConfig,
    S: Stream<Item = AppendEntriesRequest<C>> + Send + Unpin + 's,
    K: RequestSink<C> + 's,
    R: Stream<Item = Result<StreamAppendResult<C>, TransportError>> + Send + Unpin + 's,
{
    let state = State {
        input,
        sink,
        replies,
        in_flight: VecDeque::with_capacity(window.requests),
        in_flight_bytes: 0,
        input_done: false,
        window,
        idle,
        last_progress: Instant::now(),
        stats,
        _c: std::marker::PhantomData,
    };
    futures::stream::unfold(Some(state), |state| async move {
        let mut state = state?;
        let item = state.next().await?;
        // An error or a rejection ends the session; openraft opens a new one.
        let go_on = matches!(item, Ok(Ok(_)));
        Some((item, go_on.then_some(state)))
    })
}
