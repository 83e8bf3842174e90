//! `raftwire node --metrics-listen`: Prometheus text at `/metrics`, over plain HTTP/1.1.
//!
//! Two sources make one page: what the library records through the `metrics` facade (the
//! recorder installed here aggregates it), and openraft's own metrics, read from the Raft's
//! metrics channel at the moment of the scrape (so a follower that left, or a leader that
//! stepped down, leaves no stale series behind).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusBuilder;
use metrics_exporter_prometheus::PrometheusHandle;
use openraft::RaftMetrics;
use openraft::ServerState;
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::kv::KvConfig;

/// The longest request head (request line and headers) the endpoint reads; a longer one is
/// answered 431.
pub(crate) const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// How long a connection may take to send its request head; then it is closed (408).
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Scrapes served at once; a connection beyond them is answered 503 and closed.
pub(crate) const MAX_CONNECTIONS: usize = 16;

/// Histogram buckets (seconds) for round trips and snapshot transfers: 100 µs to a minute.
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0,
];

/// The limits of one endpoint.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) head: usize,
    pub(crate) timeout: Duration,
    pub(crate) connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            head: MAX_REQUEST_HEAD,
            timeout: REQUEST_TIMEOUT,
            connections: MAX_CONNECTIONS,
        }
    }
}

/// Installs the process's Prometheus recorder (once; later calls get the same handle) and a
/// task that keeps its histograms drained between scrapes. Must run before the network
/// factory is made: metric handles are registered when links are.
pub(crate) fn install() -> Result<PrometheusHandle, String> {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let recorder = PrometheusBuilder::new()
        .set_buckets(BUCKETS)
        .map_err(|e| format!("metrics buckets: {e}"))?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder)
        .map_err(|_| "another metrics recorder is already installed in this process".to_string())?;
    let handle = HANDLE.get_or_init(|| handle).clone();
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

/// openraft's metrics of this node as Prometheus text: term, leader, log, commit, applied,
/// snapshot and purge indexes, and on a leader each follower's matched index and lag.
pub(crate) fn raft_text(m: &RaftMetrics<KvConfig>) -> String {
    let node = m.id;
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, samples: &[(Option<u64>, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (follower, value) in samples {
            match follower {
                Some(f) => {
                    let _ = writeln!(out, "{name}{{node=\"{node}\",follower=\"{f}\"}} {value}");
                }
                None => {
                    let _ = writeln!(out, "{name}{{node=\"{node}\"}} {value}");
                }
            }
        }
    };
    let one = |v: Option<u64>| v.map(|v| (None, v)).into_iter().collect::<Vec<_>>();
    gauge(
        "raftwire_raft_term",
        "The node's current term",
        &one(Some(m.current_term)),
    );
    gauge(
        "raftwire_raft_leader",
        "The leader this node knows of (absent when none)",
        &one(m.current_leader),
    );
    gauge(
        "raftwire_raft_is_leader",
        "1 while this node is the leader",
        &one(Some(u64::from(m.state == ServerState::Leader))),
    );
    gauge(
        "raftwire_raft_last_log_index",
        "The index of the last entry in this node's log",
        &one(m.last_log_index),
    );
    gauge(
        "raftwire_raft_committed_index",
        "The last index this node knows to be committed and may apply",
        &one(m.local_committed.map(|l| l.index)),
    );
    gauge(
        "raftwire_raft_cluster_committed_index",
        "The last index a quorum holds, as the leader last reported it",
        &one(m.cluster_committed.map(|l| l.index)),
    );
    gauge(
        "raftwire_raft_applied_index",
        "The highest index applied to this node's state machine",
        &one(m.last_applied.map(|l| l.index)),
    );
    gauge(
        "raftwire_raft_snapshot_index",
        "The last index this node's snapshot covers",
        &one(m.snapshot.map(|l| l.index)),
    );
    gauge(
        "raftwire_raft_purged_index",
        "The last index purged from this node's log",
        &one(m.purged.map(|l| l.index)),
    );
    let followers: Vec<(u64, Option<u64>)> = m
        .replication
        .as_ref()
        .map(|r| {
            r.iter()
                .filter(|(id, _)| **id != node)
                .map(|(id, matched)| (*id, matched.map(|l| l.index)))
                .collect()
        })
        .unwrap_or_default();
    let matched: Vec<_> = followers
        .iter()
        .filter_map(|(f, i)| i.map(|i| (Some(*f), i)))
        .collect();
    gauge(
        "raftwire_raft_follower_matched_index",
        "On the leader: the last index each follower is known to hold",
        &matched,
    );
    let last = m.last_log_index.unwrap_or(0);
    let lag: Vec<_> = followers
        .iter()
        .map(|(f, i)| (Some(*f), last.saturating_sub(i.unwrap_or(0))))
        .collect();
    gauge(
        "raftwire_raft_follower_lag",
        "On the leader: entries of its log each follower does not yet hold",
        &lag,
    );
    out
}

/// Serves `render()` at `GET /metrics` on `listener` until `stop` turns true.
pub(crate) async fn serve(
    listener: TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) {
    let mut scrapes = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => break,
        };
        while scrapes.try_join_next().is_some() {}
        let (mut tcp, addr) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!("metrics accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if scrapes.len() >= limits.connections {
            tracing::warn!(%addr, limit = limits.connections, "metrics: too many connections");
            scrapes.spawn(async move {
                let _ = respond(&mut tcp, "503 Service Unavailable", "too many connections\n").await;
            });
            continue;
        }
        let render = render.clone();
        scrapes.spawn(async move {
            if let Err(e) = scrape(tcp, addr, render.as_ref(), limits).await {
                tracing::debug!(%addr, "metrics connection: {e}");
            }
        });
    }
    scrapes.shutdown().await;
}

/// Answers one request, then closes the connection.
async fn scrape(
    mut tcp: TcpStream,
    addr: SocketAddr,
    render: &(dyn Fn() -> String + Send + Sync),
    limits: Limits,
) -> std::io::Result<()> {
    let head = match tokio::time::timeout(limits.timeout, read_head(&mut tcp, limits.head)).await {
        Err(_) => return respond(&mut tcp, "408 Request Timeout", "no request in time\n").await,
        Ok(Err(e)) => return Err(e),
        Ok(Ok(None)) => {
            return respond(
                &mut tcp,
                "431 Request Header Fields Too Large",
                "request head too large\n",
            )
            .await;
        }
        Ok(Ok(Some(head))) => head,
    };
    let line = head.lines().next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next(), parts.next(), parts.next());
    if !version.is_some_and(|v| v.starts_with("HTTP/1.")) {
        tracing::debug!(%addr, line, "metrics: not an HTTP/1 request");
        return respond(&mut tcp, "400 Bad Request", "not an HTTP/1 request\n").await;
    }
    let path = target.unwrap_or_default().split('?').next().unwrap_or_default();
    match (method, path) {
        (Some("GET"), "/metrics") => respond(&mut tcp, "200 OK", &render()).await,
        (Some("GET"), _) => respond(&mut tcp, "404 Not Found", "metrics are at /metrics\n").await,
        _ => respond(&mut tcp, "405 Method Not Allowed", "only GET\n").await,
    }
}

/// Reads up to the end of the request head; `None` if it exceeds `max` bytes.
async fn read_head(tcp: &mut TcpStream, max: usize) -> std::io::Result<Option<String>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.truncate(end);
            return Ok(Some(String::from_utf8_lossy(&buf).into_owned()));
        }
        if buf.len() > max {
            return Ok(None);
        }
        let n = tcp.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the connection closed before its request head ended",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn respond(tcp: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await?;
    tcp.write_all(body.as_bytes()).await?;
    tcp.shutdown().await
}

#[cfg(test)]
mod tests {
    //! The endpoint over real sockets, with a fixed page and small limits.

    use super::*;

    async fn endpoint(limits: Limits) -> (SocketAddr, watch::Sender<bool>, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(serve(listener, Arc::new(|| "page 1\n".to_string()), limits, rx));
        (addr, stop, task)
    }

    async fn ask(addr: SocketAddr, request: &[u8]) -> String {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(request).await.unwrap();
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(5), tcp.read_to_string(&mut answer))
            .await
            .expect("answered in time")
            .unwrap();
        answer
    }

    #[tokio::test]
    async fn serves_the_page_and_refuses_everything_else_clearly() {
        let (addr, stop, task) = endpoint(Limits::default()).await;
        let ok = ask(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(
            ok.contains("Content-Length: 7\r\n") && ok.ends_with("\r\n\r\npage 1\n"),
            "{ok}"
        );
        let query = ask(addr, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n").await;
        assert!(query.starts_with("HTTP/1.1 200 OK\r\n"), "{query}");
        for (request, status) in [
            (&b"GET / HTTP/1.1\r\n\r\n"[..], "404"),
            (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", "405"),
            (b"\x16\x03\x01 garbage\r\n\r\n", "400"),
            (b"GET /metrics\r\n\r\n", "400"),
        ] {
            let answer = ask(addr, request).await;
            assert!(answer.starts_with(&format!("HTTP/1.1 {status} ")), "{answer}");
        }
        stop.send(true).unwrap();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_request_head_over_the_limit_is_refused() {
        let (addr, stop, task) = endpoint(Limits {
            head: 1024,
            ..Limits::default()
        })
        .await;
        let mut request = b"GET /metrics HTTP/1.1\r\nX-Pad: ".to_vec();
        request.extend(std::iter::repeat_n(b'a', 2048));
        let answer = ask(addr, &request).await;
        assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
        // The endpoint still serves.
        let ok = ask(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 "), "{ok}");
        stop.send(true).unwrap();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_silent_connection_is_closed_after_the_timeout() {
        let (addr, stop, task) = endpoint(Limits {
            timeout: Duration::from_millis(200),
            ..Limits::default()
        })
        .await;
        let answer = ask(addr, b"GET /metr").await;
        assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
        stop.send(true).unwrap();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn connections_over_the_limit_are_turned_away_and_the_rest_served() {
        let (addr, stop, task) = endpoint(Limits {
            connections: 2,
            ..Limits::default()
        })
        .await;
        // Two connections that send nothing hold both places.
        let _held = [
            TcpStream::connect(addr).await.unwrap(),
            TcpStream::connect(addr).await.unwrap(),
        ];
        tokio::time::sleep(Duration::from_millis(100)).await;
        let answer = ask(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
        drop(_held);
        // Their places free up when they close (the server sees EOF).
        let ok = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let answer = ask(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await;
                if answer.starts_with("HTTP/1.1 200 ") {
                    return answer;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("served again once the held connections closed");
        assert!(ok.ends_with("page 1\n"));
        stop.send(true).unwrap();
        task.await.unwrap();
    }
}
