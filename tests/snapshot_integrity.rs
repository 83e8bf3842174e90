//! A snapshot is installed only when it arrived whole: every way a transfer can end early
//! leaves the follower as it was, tells its snapshot sink to discard the partial data, and a
//! later attempt succeeds. On every transport, over real sockets.
#![cfg(feature = "app")]

mod common;

use std::io;
use std::io::Cursor;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::task::Context;
use std::task::Poll;
use std::time::Duration;

use common::Net;
use common::loopback;
use common::relay::Relay;
use openraft::RaftNetworkFactory;
use openraft::errors::ReplicationClosed;
use openraft::errors::StreamingError;
use openraft::impls::BasicNode;
use openraft::network::RPCOption;
use openraft::network::RaftNetworkV2;
use raftwire::AbortFuture;
use raftwire::NetworkFactory;
use raftwire::SinkFuture;
use raftwire::SnapshotSink;
use raftwire::Transport;
use raftwire::kv::KvConfig;
use raftwire::kv::KvNode;
use raftwire::kv::KvSnapshotData;
use tokio::io::AsyncRead;
use tokio::io::AsyncSeek;
use tokio::io::AsyncWrite;
use tokio::io::ReadBuf;

on_every_transport!(
    sender_read_error_installs_nothing,
    cancel_mid_snapshot_installs_nothing,
    sender_idle_timeout_installs_nothing,
    connection_killed_mid_snapshot_installs_nothing,
);

const CHUNK: usize = 64 << 10;
const ENTRIES: usize = 600;
const VALUE: usize = 1000;

/// Counts what the follower's snapshot sink was asked to do.
#[derive(Clone, Default)]
struct TrackingSink {
    created: Arc<AtomicU64>,
    aborted: Arc<AtomicU64>,
    /// Why each transfer was aborted, as the follower told its sink.
    reasons: Arc<std::sync::Mutex<Vec<String>>>,
}

impl SnapshotSink<KvSnapshotData> for TrackingSink {
    fn create(&self) -> SinkFuture<KvSnapshotData> {
        self.created.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Ok(KvSnapshotData::default()) })
    }

    fn abort(&self, data: KvSnapshotData, reason: &str) -> AbortFuture {
        drop(data);
        self.reasons.lock().unwrap().push(reason.to_string());
        self.aborted.fetch_add(1, Ordering::SeqCst);
        Box::pin(async {})
    }
}

/// What goes wrong with the sender's data once `after` bytes are read.
#[derive(Clone, Copy)]
enum Fault {
    None,
    Fail { after: u64 },
    Stall { after: u64 },
}

/// Snapshot data that fails or stalls mid-read, as a broken disk or a hung reader would.
/// The fault strikes only once the follower has started receiving (`started` > 0), so every
/// test exercises an unfinished transfer at the receiver.
struct FaultyData {
    inner: Cursor<Vec<u8>>,
    fault: Fault,
    started: Arc<AtomicU64>,
}

impl AsyncRead for FaultyData {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let at_fault = match this.fault {
            Fault::Fail { after } | Fault::Stall { after } => this.inner.position() >= after,
            Fault::None => false,
        };
        if at_fault && this.started.load(Ordering::SeqCst) == 0 {
            // Not yet: come back soon.
            let waker = cx.waker().clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(2)).await;
                waker.wake();
            });
            return Poll::Pending;
        }
        match this.fault {
            Fault::Fail { after } if this.inner.position() >= after => {
                return Poll::Ready(Err(io::Error::other("disk read failed (injected)")));
            }
            Fault::Stall { after } if this.inner.position() >= after => return Poll::Pending,
            _ => {}
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for FaultyData {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl AsyncSeek for FaultyData {
    fn start_seek(self: Pin<&mut Self>, pos: io::SeekFrom) -> io::Result<()> {
        Pin::new(&mut self.get_mut().inner).start_seek(pos)
    }

    fn poll_complete(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        Pin::new(&mut self.get_mut().inner).poll_complete(cx)
    }
}

/// The demo store's snapshot format: (u32 key length, key, u32 value length, value)*.
fn kv_snapshot_bytes() -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..ENTRIES {
        let key = format!("snap-{i:04}");
        out.extend_from_slice(&(key.len() as u32).to_be_bytes());
        out.extend_from_slice(key.as_bytes());
        out.extend_from_slice(&(VALUE as u32).to_be_bytes());
        out.extend(std::iter::repeat_n((i % 251) as u8, VALUE));
    }
    out
}

/// A follower (node 1) receiving snapshots through a tracking sink, and a leader-side
/// factory (node 2) that sends them.
struct Bed {
    follower: KvNode,
    sink: TrackingSink,
    factory: NetworkFactory<KvConfig, FaultyData>,
}

impl Bed {
    async fn new(transport: Transport) -> Bed {
        let net = Net::with(transport, |b| {
            b.snapshot_chunk_size(CHUNK)
                .snapshot_idle_timeout(Duration::from_millis(600))
        });
        let sink = TrackingSink::default();
        let follower = KvNode::start_with_sink(
            1,
            raftwire::demo::raft_config(),
            net.config(1),
            loopback(),
            sink.clone(),
        )
        .await
        .unwrap();
        let factory = NetworkFactory::new(2, net.config(2)).unwrap();
        Bed {
            follower,
            sink,
            factory,
        }
    }

    /// Sends a snapshot of [`kv_snapshot_bytes`] to `to` (the follower, or a relay in front
    /// of it) with `fault` injected and `cancel` as openraft's cancel signal.
    async fn send(
        &mut self,
        to: BasicNode,
        fault: Fault,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
    ) -> Result<openraft::raft::SnapshotResponse<KvConfig>, StreamingError<KvConfig>> {
        let mut client = self.factory.new_snapshot_client(1, &to).await;
        let leader = raftwire::WireLeaderId { term: 1, node_id: 2 };
        let log_id = openraft::LogId {
            leader_id: leader,
            index: 10,
        };
        let membership =
            openraft::Membership::new_with_defaults(vec![std::collections::BTreeSet::from([1, 2])], [1, 2]);
        let meta = openraft::SnapshotMeta {
            last_log_id: Some(log_id),
            last_membership: openraft::StoredMembership::new(Some(log_id), membership),
        };
        let vote = openraft::impls::Vote {
            leader_id: leader,
            committed: true,
        };
        let data = FaultyData {
            inner: Cursor::new(kv_snapshot_bytes()),
            fault,
            started: self.sink.created.clone(),
        };
        client
            .full_snapshot(
                vote,
                openraft::Snapshot { meta, snapshot: data },
                cancel,
                RPCOption::new(Duration::from_secs(5)),
            )
            .await
    }

    /// Nothing reached the follower's state machine, and every transfer it started was
    /// handed back to the sink's `abort`.
    async fn assert_nothing_installed(&self, what: &str) {
        let created = self.sink.created.load(Ordering::SeqCst);
        assert!(created >= 1, "{what}: the transfer reached the follower");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while self.sink.aborted.load(Ordering::SeqCst) < created {
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: {created} transfers started, {} aborted",
                self.sink.aborted.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            self.follower.sm.snapshots_installed(),
            0,
            "{what}: nothing installed"
        );
        assert!(
            self.follower.sm.dump().is_empty(),
            "{what}: the state machine is unchanged"
        );
        assert_eq!(self.follower.sm.last_applied(), None, "{what}");
    }

    /// A clean transfer after the failure installs the whole snapshot.
    async fn assert_next_attempt_succeeds(&mut self, what: &str) {
        let aborted = self.sink.aborted.load(Ordering::SeqCst);
        let to = self.follower.node();
        let mut last = None;
        // The follower may still be tearing down the failed transfer's connection.
        for _ in 0..20 {
            match self.send(to.clone(), Fault::None, never()).await {
                Ok(_) => {
                    last = None;
                    break;
                }
                Err(e) => last = Some(e.to_string()),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(last, None, "{what}: the next attempt failed");
        assert_eq!(self.follower.sm.snapshots_installed(), 1, "{what}");
        let dump = self.follower.sm.dump();
        assert_eq!(dump.len(), ENTRIES, "{what}: the whole snapshot is installed");
        assert_eq!(dump["snap-0007"].len(), VALUE);
        assert_eq!(
            self.sink.aborted.load(Ordering::SeqCst),
            aborted,
            "{what}: it was not aborted"
        );
    }

    async fn stop(mut self) {
        self.follower.stop().await.unwrap();
    }
}

fn never() -> impl Future<Output = ReplicationClosed> + Send + 'static {
    std::future::pending()
}

/// The sender's data fails or hangs three chunks in, once the follower is receiving.
const FAIL: Fault = Fault::Fail {
    after: 3 * CHUNK as u64,
};
const STALL: Fault = Fault::Stall {
    after: 3 * CHUNK as u64,
};

impl Bed {
    /// A transfer to `to` that must fail: nothing is installed, the sink hears of it.
    async fn failed(
        &mut self,
        what: &str,
        to: BasicNode,
        fault: Fault,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
    ) -> StreamingError<KvConfig> {
        let err = self.send(to, fault, cancel).await.unwrap_err();
        self.assert_nothing_installed(what).await;
        err
    }

    /// The follower learnt that the sender gave up (QUIC: a reset stream; gRPC: an error on
    /// the request stream), rather than seeing the stream end cleanly without its trailer.
    fn assert_sender_aborted(&self, what: &str) {
        let reasons = self.sink.reasons.lock().unwrap().clone();
        assert!(!reasons.is_empty(), "{what}: no abort reason");
        eprintln!("{what}: the follower aborted: {reasons:?}");
        for reason in &reasons {
            assert!(
                !reason.contains("truncated"),
                "{what}: the unfinished stream ended cleanly: {reason}"
            );
        }
    }
}

async fn sender_read_error_installs_nothing(transport: Transport) {
    let mut bed = Bed::new(transport).await;
    let err = bed.failed("read error", bed.follower.node(), FAIL, never()).await;
    assert!(err.to_string().contains("injected"), "{err}");
    bed.assert_sender_aborted("read error");
    bed.assert_next_attempt_succeeds("read error").await;
    bed.stop().await;
}

async fn cancel_mid_snapshot_installs_nothing(transport: Transport) {
    let mut bed = Bed::new(transport).await;
    let cancel = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        ReplicationClosed::new("test cancels the transfer")
    };
    let err = bed.failed("cancel", bed.follower.node(), STALL, cancel).await;
    assert!(matches!(err, StreamingError::Closed(_)), "{err}");
    bed.assert_sender_aborted("cancel");
    bed.assert_next_attempt_succeeds("cancel").await;
    bed.stop().await;
}

async fn sender_idle_timeout_installs_nothing(transport: Transport) {
    let mut bed = Bed::new(transport).await;
    let started = std::time::Instant::now();
    let err = bed
        .failed("idle timeout", bed.follower.node(), STALL, never())
        .await;
    assert!(matches!(err, StreamingError::Timeout(_)), "{err}");
    bed.assert_sender_aborted("idle timeout");
    // The sender's progress deadline is 600 ms; the follower's abort may take as long again.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    bed.assert_next_attempt_succeeds("idle timeout").await;
    bed.stop().await;
}

/// The link dies mid-transfer without a word to either side; the follower's own progress
/// deadline ends the transfer.
async fn connection_killed_mid_snapshot_installs_nothing(transport: Transport) {
    let mut bed = Bed::new(transport).await;
    let target = bed.follower.addr();
    let relay = match transport {
        #[cfg(feature = "grpc")]
        Transport::Grpc => Relay::tcp(target, Duration::ZERO).await,
        #[cfg(feature = "tcp")]
        Transport::Tcp => Relay::tcp(target, Duration::ZERO).await,
        _ => Relay::udp(target, Duration::ZERO).await,
    };
    let to = BasicNode::new(relay.addr.to_string());
    let relay = Arc::new(relay);
    let cutter = relay.clone();
    let sink = bed.sink.clone();
    // Cut once the follower is receiving.
    tokio::spawn(async move {
        while sink.created.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        cutter.cut();
    });
    // The sender stalls after a few chunks so the transfer is surely unfinished at the cut.
    let err = bed.failed("connection killed", to, STALL, never()).await;
    assert!(
        matches!(err, StreamingError::Timeout(_) | StreamingError::Network(_)),
        "{err}"
    );
    drop(relay);
    bed.assert_next_attempt_succeeds("connection killed").await;
    bed.stop().await;
}
