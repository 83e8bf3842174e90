//! Connection upkeep shared by every transport's client: one connection per peer and purpose,
//! dialled in the background, one attempt at a time, with backoff after failures.
//!
//! A call never owns a connect. openraft cuts each call at its deadline (a heartbeat's is ¾ of
//! the heartbeat interval), and a connect that ran inside the call would be abandoned halfway
//! on every slow link, so no connection ever completes. Here the dial runs as its own task to
//! `connect_timeout`; calls wait for it only up to their own deadlines, and later calls find
//! the connection made.

use std::future::Future;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicU32;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::TransportError;
use crate::stats::Stats;

/// The first wait after a failed dial; doubled per consecutive failure up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(50);

/// Consecutive call timeouts after which a cached connection is dropped and redialled: a
/// peer that died without closing (a crash, a pulled cable) leaves a connection that never
/// fails on its own, only stays silent.
const EVICT_AFTER_TIMEOUTS: u32 = 3;

/// The longest wait between dials of an unreachable peer. Short enough that a restarted peer
/// is reconnected well within a second of listening again; each dial is one attempt at a
/// time per peer, so even this pace costs an unreachable peer little.
const MAX_BACKOFF: Duration = Duration::from_millis(400);

type Outcome<T> = Option<Result<T, String>>;

/// What a caller of [`Dialer::get`] does next.
enum Next<T> {
    Ready(T),
    Wait(watch::Receiver<Outcome<T>>),
}

enum State<T> {
    /// No connection. After failures, no new dial before `retry_at`.
    Idle {
        failures: u32,
        retry_at: Option<Instant>,
        last_error: String,
    },
    /// A dial is running; its outcome is published here.
    Dialing(watch::Receiver<Outcome<T>>),
    /// Connected.
    Ready(T),
}

/// One peer's connection (of some transport), kept up as described in the module docs.
pub(crate) struct Dialer<T> {
    addr: String,
    connect_timeout: Duration,
    stats: Stats,
    state: Arc<Mutex<State<T>>>,
    /// Calls timed out in a row on the current connection.
    timeouts: AtomicU32,
}

impl<T: Clone + Send + Sync + 'static> Dialer<T> {
    pub(crate) fn new(addr: &str, connect_timeout: Duration, stats: Stats) -> Self {
        Dialer {
            addr: addr.to_string(),
            connect_timeout,
            stats,
            state: Arc::new(Mutex::new(State::Idle {
                failures: 0,
                retry_at: None,
                last_error: String::new(),
            })),
            timeouts: AtomicU32::new(0),
        }
    }

    fn error(&self, reason: impl ToString) -> TransportError {
        TransportError::Connect {
            addr: self.addr.clone(),
            reason: reason.to_string(),
        }
    }

    /// The connection: the cached one while `alive` says so, else the outcome of a dial
    /// (started by `dial` unless one is running or the peer is in backoff). Cancel-safe:
    /// dropping the returned future never cancels the dial.
    pub(crate) async fn get<F, Fut>(&self, alive: impl Fn(&T) -> bool, dial: F) -> Result<T, TransportError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, String>> + Send + 'static,
    {
        let rx = self.start(alive, dial)?;
        self.wait(rx).await
    }

    /// The connection if it is up, else a receiver for the outcome of the dial in progress
    /// (started here if none is running and the peer is not in backoff).
    fn start<F, Fut>(&self, alive: impl Fn(&T) -> bool, dial: F) -> Result<Next<T>, TransportError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, String>> + Send + 'static,
    {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let failures = match &*st {
            State::Ready(conn) if alive(conn) => return Ok(Next::Ready(conn.clone())),
            State::Ready(_) => 0,
            State::Dialing(rx) => return Ok(Next::Wait(rx.clone())),
            State::Idle {
                failures,
                retry_at,
                last_error,
            } => {
                if let Some(at) = retry_at {
                    let now = Instant::now();
                    if now < *at {
                        return Err(self.error(format!("{last_error} (next attempt in {:?})", *at - now)));
                    }
                }
                *failures
            }
        };
        let (tx, rx) = watch::channel(None);
        *st = State::Dialing(rx.clone());
        let fut = dial();
        let (state, timeout, stats) = (self.state.clone(), self.connect_timeout, self.stats.clone());
        tokio::spawn(async move {
            let outcome = match tokio::time::timeout(timeout, fut).await {
                Ok(outcome) => outcome,
                Err(_) => Err(format!("connect timed out after {timeout:?}")),
            };
            let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
            *st = match &outcome {
                Ok(conn) => {
                    stats.record_connect();
                    State::Ready(conn.clone())
                }
                Err(e) => {
                    let backoff = MIN_BACKOFF.saturating_mul(1 << failures.min(10)).min(MAX_BACKOFF);
                    State::Idle {
                        failures: failures.saturating_add(1),
                        retry_at: Some(Instant::now() + backoff),
                        last_error: e.clone(),
                    }
                }
            };
            drop(st);
            let _ = tx.send(Some(outcome));
        });
        Ok(Next::Wait(rx))
    }

    async fn wait(&self, rx: Next<T>) -> Result<T, TransportError> {
        let mut rx = match rx {
            Next::Ready(conn) => return Ok(conn),
            Next::Wait(rx) => rx,
        };
        loop {
            if let Some(outcome) = rx.borrow_and_update().clone() {
                return outcome.map_err(|e| self.error(e));
            }
            if rx.changed().await.is_err() {
                // The dialling task ended without publishing: only if it was aborted.
                return Err(self.error("connect abandoned"));
            }
        }
    }

    /// Learns from a call's outcome: a success clears the count of timeouts; the
    /// [`EVICT_AFTER_TIMEOUTS`]th timeout in a row forgets the connection, so the next call
    /// dials afresh (and finds a restarted peer).
    pub(crate) fn observe<R>(&self, outcome: &Result<R, TransportError>) {
        match outcome {
            Ok(_) => self.timeouts.store(0, Ordering::Relaxed),
            Err(TransportError::Timeout { .. }) => {
                if self.timeouts.fetch_add(1, Ordering::Relaxed) + 1 >= EVICT_AFTER_TIMEOUTS {
                    tracing::info!(
                        addr = %self.addr,
                        "{EVICT_AFTER_TIMEOUTS} calls in a row timed out; dropping the connection"
                    );
                    self.forget();
                }
            }
            Err(_) => {}
        }
    }

    /// Forgets a connection that failed, so the next call dials afresh.
    pub(crate) fn forget(&self) {
        self.timeouts.store(0, Ordering::Relaxed);
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let State::Ready(_) = &*st {
            *st = State::Idle {
                failures: 0,
                retry_at: None,
                last_error: String::new(),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dialer() -> Dialer<u32> {
        Dialer::new("peer:1", Duration::from_secs(1), Stats::default())
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_that_gives_up_does_not_cancel_the_dial() {
        let d = dialer();
        let dials = Arc::new(AtomicU32::new(0));
        let slow = |dials: Arc<AtomicU32>| {
            move || {
                dials.fetch_add(1, Ordering::SeqCst);
                async {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    Ok(7)
                }
            }
        };
        // The call's own deadline is shorter than the dial.
        let first =
            tokio::time::timeout(Duration::from_millis(100), d.get(|_| true, slow(dials.clone()))).await;
        assert!(first.is_err(), "the call timed out");
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(d.get(|_| true, slow(dials.clone())).await.unwrap(), 7);
        assert_eq!(dials.load(Ordering::SeqCst), 1, "one dial served both calls");
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_calls_share_one_dial() {
        let d = Arc::new(dialer());
        let dials = Arc::new(AtomicU32::new(0));
        let mut calls = Vec::new();
        for _ in 0..10 {
            let (d, dials) = (d.clone(), dials.clone());
            calls.push(tokio::spawn(async move {
                d.get(
                    |_| true,
                    move || {
                        dials.fetch_add(1, Ordering::SeqCst);
                        async {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            Ok(1)
                        }
                    },
                )
                .await
            }));
        }
        for c in calls {
            assert_eq!(c.await.unwrap().unwrap(), 1);
        }
        assert_eq!(dials.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_and_recover() {
        let d = dialer();
        let fail = || async { Err::<u32, _>("refused".to_string()) };
        let err = d.get(|_| true, fail).await.unwrap_err();
        assert!(matches!(err, TransportError::Connect { .. }), "{err}");
        // Within the backoff no dial happens.
        let dials = AtomicU32::new(0);
        let err = d
            .get(
                |_| true,
                || {
                    dials.fetch_add(1, Ordering::SeqCst);
                    async { Ok(9) }
                },
            )
            .await
            .unwrap_err();
        assert!(err.to_string().contains("next attempt"), "{err}");
        assert_eq!(dials.load(Ordering::SeqCst), 0);
        tokio::time::sleep(MAX_BACKOFF).await;
        assert_eq!(d.get(|_| true, || async { Ok(5) }).await.unwrap(), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn dead_connections_are_redialled() {
        let d = dialer();
        assert_eq!(d.get(|_| true, || async { Ok(1) }).await.unwrap(), 1);
        assert_eq!(d.get(|c| *c != 1, || async { Ok(2) }).await.unwrap(), 2);
        d.forget();
        assert_eq!(d.get(|_| true, || async { Ok(3) }).await.unwrap(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn repeated_timeouts_evict_the_connection() {
        let d = dialer();
        assert_eq!(d.get(|_| true, || async { Ok(1) }).await.unwrap(), 1);
        let timeout = || -> Result<(), TransportError> {
            Err(TransportError::Timeout {
                rpc: openraft::network::RPCTypes::AppendEntries,
                after: Duration::from_millis(10),
            })
        };
        d.observe(&timeout());
        d.observe(&timeout());
        d.observe(&Ok(()));
        d.observe(&timeout());
        d.observe(&timeout());
        // A success in between reset the count: still the same connection.
        assert_eq!(d.get(|_| true, || async { Ok(2) }).await.unwrap(), 1);
        d.observe(&timeout());
        assert_eq!(d.get(|_| true, || async { Ok(2) }).await.unwrap(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dial_that_hangs_times_out() {
        let d = dialer();
        let err = d
            .get(|_| true, std::future::pending::<Result<u32, String>>)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("timed out"), "{err}");
    }
}
