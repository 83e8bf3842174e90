//! Transport-independent pipelining of openraft's `stream_append`.
//!
//! openraft hands the network a pull-based stream of AppendEntries requests and sets no
//! in-flight window: how far we read ahead *is* the pipeline depth. This module reads ahead
//! up to a window (requests and bytes), pairs each reply with the oldest unanswered request
//! (the follower answers in order, one reply per request), and enforces an idle deadline:
//! while anything is outstanding, the peer must make progress within it. Outstanding is a
//! request awaiting its reply, or a send that transport flow control holds back because the
//! peer stopped reading; the send is polled next to the replies and the deadline, so neither
//! waits behind it.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use futures::StreamExt;
use futures::future::OptionFuture;
use openraft::network::RPCTypes;
use openraft::raft::AppendEntriesRequest;
use openraft::raft::StreamAppendResult;
use tokio::time::Instant;

use crate::error::TransportError;
use crate::stats::RpcKind;
use crate::stats::Stats;
use crate::types::RaftWireConfig;

/// The in-flight limits of one replication stream.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Window {
    pub(crate) requests: usize,
    pub(crate) bytes: usize,
}

/// Why a sink did not send a request.
pub(crate) enum SendError<C: RaftWireConfig> {
    /// The request encodes to more than the peer accepts: nothing was sent, and the request
    /// comes back so the pipeline can split it.
    TooLarge {
        req: AppendEntriesRequest<C>,
        size: usize,
        max: usize,
    },
    /// The stream failed.
    Failed(TransportError),
}

impl<C: RaftWireConfig> From<TransportError> for SendError<C> {
    fn from(e: TransportError) -> Self {
        SendError::Failed(e)
    }
}

impl<C: RaftWireConfig> From<crate::error::EncodeError> for SendError<C> {
    fn from(e: crate::error::EncodeError) -> Self {
        SendError::Failed(e.into())
    }
}

/// The sending half of a replication stream.
pub(crate) trait RequestSink<C: RaftWireConfig>: Send {
    /// Encodes and sends one request; returns its encoded size. Must not wait for a reply.
    /// A request over the peer's message limit is handed back unsent
    /// ([`SendError::TooLarge`]).
    ///
    /// The pipeline never drops this future before it completes while the session lives (a
    /// half-written frame would corrupt the stream), but it may take long: transport flow
    /// control holds it while the peer does not read.
    fn send(
        &mut self,
        req: AppendEntriesRequest<C>,
    ) -> impl Future<Output = Result<usize, SendError<C>>> + Send;

    /// Half-closes the stream: no more requests follow. Like a send, it may wait on flow
    /// control, and the pipeline polls it next to the replies and the deadline.
    fn finish(&mut self) -> impl Future<Output = Result<(), TransportError>> + Send;
}

/// A send in progress. It owns the sink, so it can live in the state across `select!` rounds
/// and be polled next to the replies and the deadline instead of blocking them; it hands the
/// sink back when it completes.
type Sending<'s, C, K> = Pin<Box<dyn Future<Output = (K, Sent<C>)> + Send + 's>>;

/// What the sink did: sent a request (its outcome, and whether the reply to it is to be
/// yielded), or ended the stream.
enum Sent<C: RaftWireConfig> {
    Request(Result<usize, SendError<C>>, bool),
    Finished(Result<(), TransportError>),
}

struct State<'s, C: RaftWireConfig, S, K, R> {
    input: S,
    /// The sink while no send is in progress; `sending` owns it otherwise.
    sink: Option<K>,
    sending: Option<Sending<'s, C, K>>,
    /// Parts of a request that was too large to send whole, next in line before the input.
    /// The flag says whether the part's reply is yielded (only the last part's is: openraft
    /// sent one request and expects at most one reply to it).
    split: VecDeque<(AppendEntriesRequest<C>, bool)>,
    replies: R,
    /// Encoded sizes of the requests awaiting a reply, oldest first, whether each reply is
    /// yielded, and when the transport took each.
    in_flight: VecDeque<(usize, bool, Instant)>,
    in_flight_bytes: usize,
    input_done: bool,
    window: Window,
    idle: Duration,
    /// When the peer last made progress: it answered, or we started waiting on it (a send
    /// with nothing outstanding, a reply with nothing else in flight).
    last_progress: Instant,
    stats: Stats,
    /// What the metrics call this stream's requests (appends or heartbeats).
    kind: RpcKind,
    _c: std::marker::PhantomData<fn() -> C>,
}

impl<C: RaftWireConfig, S, K, R> Drop for State<'_, C, S, K, R> {
    fn drop(&mut self) {
        // Requests still unanswered when the session ends are in flight no more.
        self.stats.record_answered(self.in_flight.len());
    }
}

impl<'s, C, S, K, R> State<'s, C, S, K, R>
where
    C: RaftWireConfig,
    S: Stream<Item = AppendEntriesRequest<C>> + Send + Unpin + 's,
    K: RequestSink<C> + 's,
    R: Stream<Item = Result<StreamAppendResult<C>, TransportError>> + Send + Unpin + 's,
{
    /// Whether to read another request: the sink is free (one send at a time, and no reading
    /// ahead of a blocked send) and the window has room (one request is always allowed).
    fn may_send(&self) -> bool {
        (!self.input_done || !self.split.is_empty())
            && self.sending.is_none()
            && (self.in_flight.is_empty()
                || (self.in_flight.len() < self.window.requests && self.in_flight_bytes < self.window.bytes))
    }

    /// The next output item; `None` ends the stream.
    async fn next(&mut self) -> Option<Result<StreamAppendResult<C>, TransportError>> {
        loop {
            if self.input_done && self.in_flight.is_empty() && self.sending.is_none() && self.split.is_empty()
            {
                return self.drain().await;
            }
            let may_send = self.may_send();
            let waiting = !self.in_flight.is_empty();
            let busy = self.sending.is_some();
            // A request in flight waits for a reply, a send in progress for the peer to take
            // it: either way the peer owes progress, so the deadline runs.
            let outstanding = waiting || busy;
            let deadline = self.last_progress + self.idle;
            let from_split = !self.split.is_empty();
            tokio::select! {
                biased;
                // Only while a request is in flight, so every reply pairs with one; a reply to
                // the request still being sent waits until that send completes.
                reply = self.replies.next(), if waiting => {
                    match self.on_reply(reply) {
                        // The reply to a leading part of a split request: progress, not news.
                        (Ok(Ok(_)), false) => continue,
                        (item, _) => return Some(item),
                    }
                }
                Some((sink, sent)) = OptionFuture::from(self.sending.as_mut()), if busy => {
                    self.sending = None;
                    self.sink = Some(sink);
                    let (sent, yielded) = match sent {
                        Sent::Request(sent, yielded) => (sent, yielded),
                        Sent::Finished(Ok(())) => continue,
                        Sent::Finished(Err(e)) => return Some(Err(e)),
                    };
                    let size = match sent {
                        Ok(size) => size,
                        Err(SendError::TooLarge { req, size, max }) => match split(req) {
                            Some((first, second)) => {
                                tracing::debug!(size, max, "an AppendEntries batch is over the message limit; sending it in two parts");
                                self.split.push_front((second, yielded));
                                self.split.push_front((first, false));
                                continue;
                            }
                            None => return Some(Err(TransportError::TooLarge { size, max })),
                        },
                        Err(SendError::Failed(e)) => return Some(Err(e)),
                    };
                    // One clock read per send, shared by the deadline and the round trip.
                    let now = Instant::now();
                    if self.in_flight.is_empty() {
                        // The peer took the whole request: its reply is now what it owes.
                        self.last_progress = now;
                    }
                    self.in_flight.push_back((size, yielded, now));
                    self.in_flight_bytes += size;
                    self.stats.record_in_flight(self.in_flight.len());
                }
                (req, yielded) = async {
                    if from_split {
                        let (req, yielded) = self.split.pop_front().unzip();
                        (req, yielded.unwrap_or(true))
                    } else {
                        (self.input.next().await, true)
                    }
                }, if may_send => {
                    let Some(mut sink) = self.sink.take() else {
                        // `may_send` holds only while no send owns the sink.
                        return Some(Err(TransportError::Broken {
                            rpc: RPCTypes::AppendEntries,
                            reason: "request sink lost".into(),
                        }));
                    };
                    let Some(req) = req else {
                        self.input_done = true;
                        if !outstanding {
                            self.last_progress = Instant::now();
                        }
                        self.sending = Some(Box::pin(async move {
                            let finished = sink.finish().await;
                            (sink, Sent::Finished(finished))
                        }));
                        continue;
                    };
                    if !outstanding {
                        self.last_progress = Instant::now();
                    }
                    self.sending = Some(Box::pin(async move {
                        let sent = sink.send(req).await;
                        (sink, Sent::Request(sent, yielded))
                    }));
                }
                _ = tokio::time::sleep_until(deadline), if outstanding => {
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

    /// Pairs a reply with the oldest request in flight; also says whether it is yielded.
    fn on_reply(
        &mut self,
        reply: Option<Result<StreamAppendResult<C>, TransportError>>,
    ) -> (Result<StreamAppendResult<C>, TransportError>, bool) {
        let Some(reply) = reply else {
            let e = TransportError::Broken {
                rpc: RPCTypes::AppendEntries,
                reason: format!("stream ended with {} requests unanswered", self.in_flight.len()),
            };
            return (Err(e), true);
        };
        let mut yielded = true;
        // One clock read per reply, shared by the deadline and the round trip.
        let now = Instant::now();
        if let Some((size, y, sent)) = self.in_flight.pop_front() {
            self.in_flight_bytes -= size;
            yielded = y;
            self.stats.record_answered(1);
            if y && matches!(reply, Ok(Ok(_))) {
                self.stats.record_ok(self.kind, now.duration_since(sent));
            }
        }
        self.last_progress = now;
        (reply, yielded)
    }
}

/// Splits a request's entries in two consecutive requests (the second continues where the
/// first ends); `None` for a request of one entry or none, which cannot be split.
fn split<C: RaftWireConfig>(
    mut req: AppendEntriesRequest<C>,
) -> Option<(AppendEntriesRequest<C>, AppendEntriesRequest<C>)> {
    if req.entries.len() < 2 {
        return None;
    }
    let tail = req.entries.split_off(req.entries.len() / 2);
    let first_last = req.entries.last().map(|e| e.log_id);
    let second = AppendEntriesRequest {
        vote: req.vote,
        prev_log_id: first_last,
        entries: tail,
        leader_commit: req.leader_commit,
    };
    // The first part must not claim a commit beyond what it carries.
    req.leader_commit = req.leader_commit.min(first_last);
    Some((req, second))
}

/// Runs a pipelined replication session over `sink`/`replies`.
///
/// A request whose encoding exceeds the peer's message limit is sent as consecutive parts
/// (halving until each fits); only the last part's reply is yielded, as the reply to the
/// request (acks are cumulative). A single entry over the limit fails the session with
/// [`TransportError::TooLarge`].
///
/// The returned stream yields results in input order and ends after the input ends and every
/// request is answered, or right after the first error or rejection (`Conflict`/`HigherVote`),
/// which ends the session as openraft expects. Dropping it abandons the session, a send in
/// progress included: the only time a send is cut short, since the stream dies with it.
pub(crate) fn run<'s, C, S, K, R>(
    input: S,
    sink: K,
    replies: R,
    window: Window,
    idle: Duration,
    stats: Stats,
    kind: RpcKind,
) -> impl Stream<Item = Result<StreamAppendResult<C>, TransportError>> + Send + 's
where
    C: RaftWireConfig,
    S: Stream<Item = AppendEntriesRequest<C>> + Send + Unpin + 's,
    K: RequestSink<C> + 's,
    R: Stream<Item = Result<StreamAppendResult<C>, TransportError>> + Send + Unpin + 's,
{
    let state = State {
        input,
        sink: Some(sink),
        sending: None,
        split: VecDeque::new(),
        replies,
        in_flight: VecDeque::with_capacity(window.requests),
        in_flight_bytes: 0,
        input_done: false,
        window,
        idle,
        last_progress: Instant::now(),
        stats,
        kind,
        _c: std::marker::PhantomData,
    };
    futures::stream::unfold(Some(state), |state| async move {
        let mut state = state?;
        let item = state.next().await?;
        // Answered requests were counted as they paired with their request; what is left
        // is a rejection, or a failure that ends the session.
        match &item {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => state.stats.record_rejected(state.kind),
            Err(e) => state.stats.record_error(state.kind, e),
        }
        // An error or a rejection ends the session; openraft opens a new one.
        let go_on = matches!(item, Ok(Ok(_)));
        Some((item, go_on.then_some(state)))
    })
}

#[cfg(test)]
mod tests {
    //! The pipeline over a fake sink whose sends complete only when the test lets them (as a
    //! transport's flow control would), and a reply stream the test feeds by hand. Time is
    //! paused: deadlines are exact and cost no wall time.

    use std::fmt::Debug;
    use std::sync::Arc;
    use std::sync::Mutex;

    use openraft::LogId;
    use openraft::impls::Vote;
    use tokio::sync::Semaphore;
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::UnboundedReceiverStream;

    use super::*;
    use crate::Json;
    use crate::WireLeaderId;

    openraft::declare_raft_types!(
        KvConfig:
            D = Json<String>,
            R = Json<String>,
            Node = openraft::impls::BasicNode,
    );

    const IDLE: Duration = Duration::from_secs(1);
    /// How late past the deadline a timeout may come: the deadline is a timer, not a poll.
    const SLACK: Duration = Duration::from_millis(10);
    /// The encoded size the fake sink reports for every request.
    const SIZE: usize = 100;

    type Reply = Result<StreamAppendResult<KvConfig>, TransportError>;

    fn log_id(index: u64) -> LogId<WireLeaderId> {
        LogId {
            leader_id: WireLeaderId { term: 1, node_id: 1 },
            index,
        }
    }

    /// Request `n`, tagged by its `prev_log_id` index so the sink can tell them apart.
    fn request(n: u64) -> AppendEntriesRequest<KvConfig> {
        AppendEntriesRequest {
            vote: Vote {
                leader_id: WireLeaderId { term: 1, node_id: 1 },
                committed: true,
            },
            prev_log_id: Some(log_id(n)),
            entries: vec![],
            leader_commit: None,
        }
    }

    /// The reply to request `n`: accepted up to `n`.
    fn ok(n: u64) -> Reply {
        Ok(Ok(Some(log_id(n))))
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Event {
        Started(u64),
        Sent(u64),
        /// A send dropped before it completed: a torn frame on a real transport.
        Torn(u64),
        Finished,
    }

    /// What the fake sink did, shared with the test.
    #[derive(Clone, Default)]
    struct Log(Arc<Mutex<Vec<Event>>>);

    impl Log {
        fn push(&self, e: Event) {
            self.0.lock().unwrap_or_else(|p| p.into_inner()).push(e);
        }

        fn events(&self) -> Vec<Event> {
            self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
        }

        fn started(&self) -> usize {
            self.events()
                .iter()
                .filter(|e| matches!(e, Event::Started(_)))
                .count()
        }
    }

    /// A sink whose every send waits for one permit: no permits is a peer that stopped reading.
    struct FakeSink {
        permits: Arc<Semaphore>,
        log: Log,
    }

    /// Records a torn send if dropped before it is disarmed.
    struct TearGuard(Option<(Log, u64)>);

    impl Drop for TearGuard {
        fn drop(&mut self) {
            if let Some((log, n)) = self.0.take() {
                log.push(Event::Torn(n));
            }
        }
    }

    impl RequestSink<KvConfig> for FakeSink {
        async fn send(&mut self, req: AppendEntriesRequest<KvConfig>) -> Result<usize, SendError<KvConfig>> {
            let n = req.prev_log_id.map_or(0, |l| l.index);
            self.log.push(Event::Started(n));
            let mut guard = TearGuard(Some((self.log.clone(), n)));
            let permit = self
                .permits
                .acquire()
                .await
                .expect("the test never closes the semaphore");
            permit.forget();
            guard.0 = None;
            self.log.push(Event::Sent(n));
            Ok(SIZE)
        }

        async fn finish(&mut self) -> Result<(), TransportError> {
            self.log.push(Event::Finished);
            Ok(())
        }
    }

    /// The test's handles on one session.
    struct Harness {
        input: Option<mpsc::UnboundedSender<AppendEntriesRequest<KvConfig>>>,
        replies: Option<mpsc::UnboundedSender<Reply>>,
        permits: Arc<Semaphore>,
        log: Log,
    }

    impl Harness {
        fn push(&self, n: u64) {
            if let Some(input) = &self.input {
                input.send(request(n)).expect("the session reads its input");
            }
        }

        fn reply(&self, reply: Reply) {
            if let Some(replies) = &self.replies {
                replies.send(reply).expect("the session reads its replies");
            }
        }
    }

    /// A session whose sink starts with `permits` sends allowed.
    fn session(
        window: Window,
        permits: usize,
    ) -> (Harness, Pin<Box<impl Stream<Item = Reply> + Send + 'static>>) {
        let (input_tx, input_rx) = mpsc::unbounded_channel();
        let (reply_tx, reply_rx) = mpsc::unbounded_channel();
        let permits = Arc::new(Semaphore::new(permits));
        let log = Log::default();
        let sink = FakeSink {
            permits: permits.clone(),
            log: log.clone(),
        };
        let out = run(
            UnboundedReceiverStream::new(input_rx),
            sink,
            UnboundedReceiverStream::new(reply_rx),
            window,
            IDLE,
            Stats::default(),
            RpcKind::Append,
        );
        let harness = Harness {
            input: Some(input_tx),
            replies: Some(reply_tx),
            permits,
            log,
        };
        (harness, Box::pin(out))
    }

    fn window(requests: usize) -> Window {
        Window {
            requests,
            bytes: usize::MAX,
        }
    }

    /// Drives `fut` until `cond` holds, failing if it completes first: the session's own work
    /// (reading input, sending) happens only while its stream is polled.
    async fn until<F: Future<Output = T>, T: Debug>(
        mut fut: Pin<&mut F>,
        what: &str,
        cond: impl Fn() -> bool,
    ) {
        for _ in 0..1000 {
            if cond() {
                return;
            }
            tokio::select! {
                biased;
                out = fut.as_mut() => panic!("the stream yielded {out:?} before {what}"),
                _ = tokio::task::yield_now() => {}
            }
        }
        panic!("never reached: {what}");
    }

    /// Polls `fut` for up to `within` (virtual time), expecting it to complete.
    async fn expect<F: Future<Output = T>, T>(fut: F, what: &str, within: Duration) -> T {
        match tokio::time::timeout(within, fut).await {
            Ok(out) => out,
            Err(_) => panic!("{what}: nothing within {within:?}"),
        }
    }

    fn is_timeout(item: &Option<Reply>) -> bool {
        matches!(
            item,
            Some(Err(TransportError::Timeout {
                rpc: RPCTypes::AppendEntries,
                ..
            }))
        )
    }

    /// (a) A reply that arrives while a later send is held by flow control is yielded at once,
    /// and the held send is neither torn nor followed by more input reads.
    #[tokio::test(start_paused = true)]
    async fn reply_flows_while_a_send_is_blocked() {
        let (h, mut out) = session(window(8), 1);
        for n in 1..=4 {
            h.push(n);
        }
        {
            let next = out.next();
            tokio::pin!(next);
            until(next.as_mut(), "the second send blocks", || h.log.started() == 2).await;
            h.reply(ok(1));
            let item = expect(next, "the reply to request 1", IDLE / 2).await;
            assert!(
                matches!(item, Some(Ok(Ok(Some(l)))) if l == log_id(1)),
                "{item:?}"
            );
        }
        // One send at a time: requests 3 and 4 stay unread while 2 is held.
        assert_eq!(
            h.log.events(),
            [Event::Started(1), Event::Sent(1), Event::Started(2)]
        );

        // The held send completes in place once the peer reads again, and the session goes on.
        h.permits.add_permits(1);
        {
            let next = out.next();
            tokio::pin!(next);
            until(next.as_mut(), "request 3 starts", || h.log.started() == 3).await;
            h.reply(ok(2));
            let item = expect(next, "the reply to request 2", IDLE / 2).await;
            assert!(
                matches!(item, Some(Ok(Ok(Some(l)))) if l == log_id(2)),
                "{item:?}"
            );
        }
        assert_eq!(
            h.log.events(),
            [
                Event::Started(1),
                Event::Sent(1),
                Event::Started(2),
                Event::Sent(2),
                Event::Started(3),
            ]
        );
    }

    /// (b) A peer that never takes a request fails the session after the idle deadline, both
    /// with nothing in flight and right after a reply freed the window.
    #[tokio::test(start_paused = true)]
    async fn blocked_send_times_out() {
        let (h, mut out) = session(window(8), 0);
        h.push(1);
        let start = Instant::now();
        let item = expect(out.next(), "a timeout", IDLE * 3).await;
        assert!(is_timeout(&item), "{item:?}");
        let took = start.elapsed();
        assert!(took >= IDLE && took <= IDLE + SLACK, "timed out after {took:?}");
        // The session is over; the abandoned send is dropped with it.
        assert!(out.next().await.is_none());
        drop(out);
        assert_eq!(h.log.events(), [Event::Started(1), Event::Torn(1)]);

        // The deadline runs from the last reply while a send is held.
        let (h, mut out) = session(window(8), 1);
        h.push(1);
        h.push(2);
        {
            let next = out.next();
            tokio::pin!(next);
            until(next.as_mut(), "the second send blocks", || h.log.started() == 2).await;
            tokio::time::sleep(IDLE / 2).await;
            h.reply(ok(1));
            let item = expect(next, "the reply to request 1", IDLE / 4).await;
            assert!(matches!(item, Some(Ok(Ok(_)))), "{item:?}");
        }
        let replied = Instant::now();
        let item = expect(out.next(), "a timeout", IDLE * 3).await;
        assert!(is_timeout(&item), "{item:?}");
        let took = replied.elapsed();
        assert!(
            took >= IDLE && took <= IDLE + SLACK,
            "timed out {took:?} after the reply"
        );
    }

    /// (c) The window bounds the requests in flight; a reply frees one slot, and a held send
    /// counts as one more request that is not yet in flight.
    #[tokio::test(start_paused = true)]
    async fn window_bounds_in_flight() {
        let (h, mut out) = session(window(2), 2);
        for n in 1..=5 {
            h.push(n);
        }
        {
            let next = out.next();
            tokio::pin!(next);
            until(next.as_mut(), "two sends complete", || h.log.events().len() == 4).await;
            // Plenty of time to read more, were the window not full.
            for _ in 0..100 {
                tokio::task::yield_now().await;
            }
            assert_eq!(h.log.started(), 2);
            h.reply(ok(1));
            let item = expect(next, "the reply to request 1", IDLE / 2).await;
            assert!(
                matches!(item, Some(Ok(Ok(Some(l)))) if l == log_id(1)),
                "{item:?}"
            );
        }
        {
            // The freed slot lets request 3 out; the sink holds it.
            let next = out.next();
            tokio::pin!(next);
            until(next.as_mut(), "request 3 starts", || h.log.started() == 3).await;
            h.reply(ok(2));
            let item = expect(next, "the reply to request 2", IDLE / 2).await;
            assert!(
                matches!(item, Some(Ok(Ok(Some(l)))) if l == log_id(2)),
                "{item:?}"
            );
        }
        // The byte window: 100-byte requests, 250 bytes allowed, so three go out.
        let (h, mut out) = session(
            Window {
                requests: 8,
                bytes: 250,
            },
            8,
        );
        for n in 1..=5 {
            h.push(n);
        }
        let next = out.next();
        tokio::pin!(next);
        until(next.as_mut(), "three sends complete", || {
            h.log.events().len() == 6
        })
        .await;
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert_eq!(h.log.started(), 3);
    }

    /// (d) Replies come out in order, and the first error or rejection ends the session even
    /// while a send is held.
    #[tokio::test(start_paused = true)]
    async fn replies_in_order_and_first_error_ends() {
        let (h, mut out) = session(window(8), 3);
        for n in 1..=5 {
            h.push(n);
        }
        {
            let next = out.next();
            tokio::pin!(next);
            until(next.as_mut(), "the fourth send blocks", || h.log.started() == 4).await;
            h.reply(ok(1));
            h.reply(ok(2));
            h.reply(Ok(Err(openraft::raft::StreamAppendError::Conflict(log_id(3)))));
            h.reply(ok(4));
            let item = expect(next, "the reply to request 1", IDLE / 2).await;
            assert!(
                matches!(item, Some(Ok(Ok(Some(l)))) if l == log_id(1)),
                "{item:?}"
            );
        }
        let item = expect(out.next(), "the reply to request 2", IDLE / 2).await;
        assert!(
            matches!(item, Some(Ok(Ok(Some(l)))) if l == log_id(2)),
            "{item:?}"
        );
        let item = expect(out.next(), "the conflict", IDLE / 2).await;
        assert!(
            matches!(item, Some(Ok(Err(openraft::raft::StreamAppendError::Conflict(l)))) if l == log_id(3)),
            "{item:?}"
        );
        assert!(expect(out.next(), "the end", IDLE / 2).await.is_none());

        // A transport error ends it the same way.
        let (h, mut out) = session(window(8), 1);
        h.push(1);
        h.push(2);
        {
            let next = out.next();
            tokio::pin!(next);
            until(next.as_mut(), "the second send blocks", || h.log.started() == 2).await;
            h.reply(Err(TransportError::Broken {
                rpc: RPCTypes::AppendEntries,
                reason: "test".into(),
            }));
            let item = expect(next, "the error", IDLE / 2).await;
            assert!(
                matches!(item, Some(Err(TransportError::Broken { .. }))),
                "{item:?}"
            );
        }
        assert!(expect(out.next(), "the end", IDLE / 2).await.is_none());
    }

    /// The input ending while a send is held: the sink is finished only after that send
    /// completes, and the session ends cleanly once it is answered.
    #[tokio::test(start_paused = true)]
    async fn input_end_waits_for_the_held_send() {
        let (mut h, mut out) = session(window(8), 0);
        h.push(1);
        h.input = None;
        {
            let next = out.next();
            tokio::pin!(next);
            until(next.as_mut(), "the send blocks", || h.log.started() == 1).await;
            tokio::time::sleep(IDLE / 2).await;
            h.permits.add_permits(1);
            until(next.as_mut(), "the sink is finished", || {
                h.log.events().contains(&Event::Finished)
            })
            .await;
            h.reply(ok(1));
            h.replies = None;
            let item = expect(next, "the reply", IDLE / 2).await;
            assert!(
                matches!(item, Some(Ok(Ok(Some(l)))) if l == log_id(1)),
                "{item:?}"
            );
        }
        assert!(expect(out.next(), "the end", IDLE / 2).await.is_none());
        assert_eq!(
            h.log.events(),
            [Event::Started(1), Event::Sent(1), Event::Finished]
        );
    }

    /// Accepts requests of at most two entries (as a peer with a small message limit would)
    /// and answers each sent request, in order, with its last log id.
    /// What a part carried: previous index, entry indexes, commit index.
    type Part = (Option<u64>, Vec<u64>, Option<u64>);

    struct SmallSink {
        sent: Arc<Mutex<Vec<Part>>>,
        replies: mpsc::UnboundedSender<Reply>,
    }

    impl RequestSink<KvConfig> for SmallSink {
        async fn send(&mut self, req: AppendEntriesRequest<KvConfig>) -> Result<usize, SendError<KvConfig>> {
            if req.entries.len() > 2 {
                let size = req.entries.len() * 100;
                return Err(SendError::TooLarge { req, size, max: 200 });
            }
            let indexes: Vec<u64> = req.entries.iter().map(|e| e.log_id.index).collect();
            self.sent.lock().unwrap().push((
                req.prev_log_id.map(|l| l.index),
                indexes,
                req.leader_commit.map(|l| l.index),
            ));
            let last = req.entries.last().map(|e| e.log_id).or(req.prev_log_id);
            let _ = self.replies.send(Ok(Ok(last)));
            Ok(req.entries.len() * 100)
        }

        async fn finish(&mut self) -> Result<(), TransportError> {
            Ok(())
        }
    }

    fn batch(prev: u64, n: u64, commit: u64) -> AppendEntriesRequest<KvConfig> {
        AppendEntriesRequest {
            vote: Vote::new_committed(1, 1),
            prev_log_id: Some(log_id(prev)),
            entries: (prev + 1..=prev + n)
                .map(|i| openraft::impls::Entry {
                    log_id: log_id(i),
                    payload: openraft::EntryPayload::Blank,
                })
                .collect(),
            leader_commit: Some(log_id(commit)),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn oversized_batches_are_split_and_answered_once() {
        let (reply_tx, reply_rx) = mpsc::unbounded_channel();
        let sent = Arc::new(Mutex::new(Vec::new()));
        let sink = SmallSink {
            sent: sent.clone(),
            replies: reply_tx,
        };
        let input = futures::stream::iter([batch(0, 7, 7), batch(7, 1, 8)]);
        let out: Vec<Reply> = run(
            input,
            sink,
            UnboundedReceiverStream::new(reply_rx),
            window(64),
            Duration::from_secs(1),
            Stats::default(),
            RpcKind::Append,
        )
        .collect()
        .await;
        // One reply per request openraft sent, each acking its last entry.
        let acked: Vec<Option<u64>> = out
            .iter()
            .map(|r| match r {
                Ok(Ok(l)) => l.map(|l| l.index),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(acked, vec![Some(7), Some(8)]);
        // 7 entries went out as 1+2, 2+2 (halving until each part fits), in order, each part
        // continuing where the previous ended and claiming no commit beyond what it carries.
        let sent = sent.lock().unwrap().clone();
        assert_eq!(
            sent,
            vec![
                (Some(0), vec![1], Some(1)),
                (Some(1), vec![2, 3], Some(3)),
                (Some(3), vec![4, 5], Some(5)),
                (Some(5), vec![6, 7], Some(7)),
                (Some(7), vec![8], Some(8)),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_single_entry_over_the_limit_fails_the_session() {
        let (reply_tx, reply_rx) = mpsc::unbounded_channel();
        let sink = SmallSink {
            sent: Arc::default(),
            replies: reply_tx,
        };
        // A sink that refuses everything: the batch is halved down to single entries, and a
        // single entry that does not fit ends the session.
        let out: Vec<Reply> = run(
            futures::stream::iter([batch(0, 3, 3)]),
            RejectAll(sink),
            UnboundedReceiverStream::new(reply_rx),
            window(64),
            Duration::from_secs(1),
            Stats::default(),
            RpcKind::Append,
        )
        .collect()
        .await;
        assert_eq!(out.len(), 1);
        assert!(
            matches!(&out[0], Err(TransportError::TooLarge { max: 1, .. })),
            "{:?}",
            out[0]
        );
    }

    /// Refuses every request as too large.
    struct RejectAll(SmallSink);

    impl RequestSink<KvConfig> for RejectAll {
        async fn send(&mut self, req: AppendEntriesRequest<KvConfig>) -> Result<usize, SendError<KvConfig>> {
            Err(SendError::TooLarge {
                req,
                size: 10,
                max: 1,
            })
        }

        async fn finish(&mut self) -> Result<(), TransportError> {
            self.0.finish().await
        }
    }
}
