//! The client side of the client API: what `raftwire ctl` does, as a library.
//!
//! A [`Ctl`] knows a list of endpoints (client API addresses). Requests only a leader serves
//! go to the node the endpoints report as leader; a refusal naming another leader is followed
//! (among the endpoints given), and a failed write is retried with the same key and value, so
//! a leader change never loses nor duplicates an acknowledged write.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use bytes::Bytes;
use tonic::Code;
use tonic::Status;
use tonic::transport::Channel;
use tonic::transport::Endpoint;

use super::LEADER_KEY;
use super::pb;
use super::pb::client_client::ClientClient;
use crate::tls::ClientTls;

/// How long one request may take before it counts as failed (and a write is retried).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a membership change or a snapshot may take (a learner catching up included).
const SLOW_REQUEST_TIMEOUT: Duration = Duration::from_secs(45);
/// How long a request keeps looking for a leader (elections, restarts) before giving up.
const LEADER_PATIENCE: Duration = Duration::from_secs(30);

/// Why a `ctl` operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// No endpoints were given, or one does not parse.
    #[error("bad endpoint `{endpoint}`: {reason}")]
    Endpoint {
        /// The endpoint as given.
        endpoint: String,
        /// Why it is unusable.
        reason: String,
    },
    /// The client identity could not be used.
    #[error("client TLS: {0}")]
    Tls(String),
    /// No endpoint answered as the leader within the patience window.
    #[error("no leader among {endpoints:?} after {waited:?}: {last}")]
    NoLeader {
        /// The endpoints tried.
        endpoints: Vec<String>,
        /// How long it kept trying.
        waited: Duration,
        /// The last failure seen.
        last: String,
    },
    /// A node refused the request.
    #[error("{endpoint} refused: {code:?}: {message}")]
    Refused {
        /// Which node.
        endpoint: String,
        /// The gRPC status code.
        code: Code,
        /// Its message.
        message: String,
    },
    /// A node could not be reached.
    #[error("{endpoint} unreachable: {reason}")]
    Unreachable {
        /// Which node.
        endpoint: String,
        /// Why.
        reason: String,
    },
    /// Writing the `--keys-out` file failed.
    #[error("writing {path}: {source}")]
    KeysOut {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// A client of a cluster's client API.
#[derive(Clone)]
pub struct Ctl {
    endpoints: Vec<String>,
    connector: tokio_rustls::TlsConnector,
    /// Open channels per endpoint.
    channels: Arc<Mutex<BTreeMap<String, Channel>>>,
    /// Node id of each endpoint, as its status said.
    ids: Arc<Mutex<BTreeMap<u64, String>>>,
    /// The endpoint that last served a leader-only request.
    leader: Arc<Mutex<Option<String>>>,
}

impl std::fmt::Debug for Ctl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctl")
            .field("endpoints", &self.endpoints)
            .finish_non_exhaustive()
    }
}

/// One endpoint's answer to `status`.
#[derive(Debug)]
pub struct EndpointStatus {
    /// The endpoint asked.
    pub endpoint: String,
    /// Its status, or why it did not answer.
    pub status: Result<pb::StatusReply, CtlError>,
}

/// What a `load` run did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoadReport {
    /// Writes acknowledged by a leader.
    pub acknowledged: u64,
    /// Writes that failed even after retries.
    pub failed: u64,
    /// Acknowledged writes per second of the run.
    pub writes_per_sec: f64,
    /// Median latency of an acknowledged write (retries included), in milliseconds.
    pub p50_ms: f64,
    /// 99th percentile latency, in milliseconds.
    pub p99_ms: f64,
    /// Writes that had to be retried (a leader change, a timeout).
    pub retried: u64,
}

impl Ctl {
    /// A client of `endpoints` (client API addresses, `host:port`) with identity `tls`.
    pub fn new(endpoints: Vec<String>, tls: &ClientTls) -> Result<Ctl, CtlError> {
        if endpoints.is_empty() {
            return Err(CtlError::Endpoint {
                endpoint: String::new(),
                reason: "no endpoints given".into(),
            });
        }
        for e in &endpoints {
            Endpoint::from_shared(format!("http://{e}")).map_err(|err| CtlError::Endpoint {
                endpoint: e.clone(),
                reason: err.to_string(),
            })?;
        }
        let config = tls
            .client_config(b"h2")
            .map_err(|e| CtlError::Tls(e.to_string()))?;
        Ok(Ctl {
            endpoints,
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            channels: Arc::default(),
            ids: Arc::default(),
            leader: Arc::default(),
        })
    }

    /// The endpoints this client was given.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    async fn client(&self, endpoint: &str) -> Result<ClientClient<Channel>, CtlError> {
        if let Some(ch) = self
            .channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(endpoint)
        {
            return Ok(ClientClient::new(ch.clone()));
        }
        let unreachable = |reason: String| CtlError::Unreachable {
            endpoint: endpoint.to_string(),
            reason,
        };
        let ep = Endpoint::from_shared(format!("http://{endpoint}"))
            .map_err(|e| unreachable(e.to_string()))?
            .connect_timeout(Duration::from_secs(3))
            .tcp_nodelay(true);
        let (connector, addr) = (self.connector.clone(), endpoint.to_string());
        let dial = tower::service_fn(move |_: http::Uri| {
            let (connector, addr) = (connector.clone(), addr.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(&addr).await?;
                tcp.set_nodelay(true)?;
                let tls = connector.connect(ClientTls::server_name(), tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        });
        let channel = ep.connect_with_connector(dial).await.map_err(|e| {
            unreachable(crate::error::handshake_refusal(&e).unwrap_or_else(|| crate::error::error_chain(&e)))
        })?;
        self.channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(endpoint.to_string(), channel.clone());
        Ok(ClientClient::new(channel))
    }

    fn forget(&self, endpoint: &str) {
        self.channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(endpoint);
    }

    fn refused(&self, endpoint: &str, status: Status) -> CtlError {
        if matches!(status.code(), Code::Unavailable | Code::Unknown) {
            self.forget(endpoint);
            return CtlError::Unreachable {
                endpoint: endpoint.to_string(),
                reason: status.message().to_string(),
            };
        }
        CtlError::Refused {
            endpoint: endpoint.to_string(),
            code: status.code(),
            message: status.message().to_string(),
        }
    }

    /// Every endpoint's status (asked in parallel); also learns which node each one is.
    pub async fn status(&self) -> Vec<EndpointStatus> {
        let asks = self.endpoints.iter().map(|e| async move {
            let status = async {
                let mut c = self.client(e).await?;
                let reply = tokio::time::timeout(REQUEST_TIMEOUT, c.status(pb::StatusRequest {}))
                    .await
                    .map_err(|_| CtlError::Unreachable {
                        endpoint: e.clone(),
                        reason: format!("no answer within {REQUEST_TIMEOUT:?}"),
                    })?
                    .map_err(|s| self.refused(e, s))?
                    .into_inner();
                self.ids
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(reply.id, e.clone());
                Ok(reply)
            }
            .await;
            EndpointStatus {
                endpoint: e.clone(),
                status,
            }
        });
        futures::future::join_all(asks).await
    }

    /// The endpoint of the node the endpoints currently report as leader.
    async fn leader_endpoint(&self) -> Result<String, String> {
        let statuses = self.status().await;
        let mut last = String::from("no endpoint answered");
        // The leader named at the highest term: a leader cut off from the others still
        // names itself, at its old term.
        let leader = statuses
            .iter()
            .filter_map(|s| s.status.as_ref().ok())
            .filter_map(|s| s.leader.map(|l| (s.term, l)))
            .max()
            .map(|(_, l)| l);
        for s in &statuses {
            if let Err(e) = &s.status {
                last = e.to_string();
            }
        }
        let Some(leader) = leader else {
            return Err(format!("no node knows a leader ({last})"));
        };
        self.ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&leader)
            .cloned()
            .ok_or_else(|| format!("the leader, node {leader}, is not among the endpoints"))
    }

    /// Runs `op` on the leader; follows redirects and waits out elections for up to
    /// `LEADER_PATIENCE`. Any other refusal is returned at once.
    async fn on_leader<T, F, Fut>(&self, op: F) -> Result<T, CtlError>
    where
        F: FnMut(ClientClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.on_leader_within(REQUEST_TIMEOUT, op).await
    }

    /// Like `on_leader`, each attempt bounded by `timeout`.
    async fn on_leader_within<T, F, Fut>(&self, timeout: Duration, mut op: F) -> Result<T, CtlError>
    where
        F: FnMut(ClientClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let start = Instant::now();
        let mut target: Option<String> = self.leader.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut last = String::new();
        while start.elapsed() < LEADER_PATIENCE {
            let endpoint = match target.take() {
                Some(e) => e,
                None => match self.leader_endpoint().await {
                    Ok(e) => e,
                    Err(reason) => {
                        last = reason;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                },
            };
            let client = match self.client(&endpoint).await {
                Ok(c) => c,
                Err(e) => {
                    last = e.to_string();
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let outcome = tokio::time::timeout(timeout, op(client)).await;
            if !matches!(outcome, Ok(Ok(_))) {
                // Ask the endpoints again unless a redirect names the leader.
                *self.leader.lock().unwrap_or_else(|p| p.into_inner()) = None;
            }
            match outcome {
                Ok(Ok(reply)) => {
                    *self.leader.lock().unwrap_or_else(|p| p.into_inner()) = Some(endpoint);
                    return Ok(reply.into_inner());
                }
                Ok(Err(status)) if status.code() == Code::FailedPrecondition => {
                    let leader = status
                        .metadata()
                        .get(LEADER_KEY)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok());
                    last = format!("{endpoint}: {}", status.message());
                    let Some(leader) = leader else {
                        // No leader yet (an election): ask again shortly.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    };
                    // Redirected: the leader's endpoint, if we know it.
                    target = self
                        .ids
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get(&leader)
                        .cloned();
                    if target.is_none() {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                Ok(Err(status)) => {
                    let err = self.refused(&endpoint, status);
                    if let CtlError::Refused { .. } = err {
                        return Err(err);
                    }
                    last = err.to_string();
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(_) => {
                    self.forget(&endpoint);
                    last = format!("{endpoint}: no answer within {timeout:?}");
                }
            }
        }
        Err(CtlError::NoLeader {
            endpoints: self.endpoints.clone(),
            waited: start.elapsed(),
            last,
        })
    }

    /// Makes the first endpoint's node a one-voter cluster.
    pub async fn init(&self) -> Result<pb::MembershipReply, CtlError> {
        let endpoint = &self.endpoints[0];
        let mut c = self.client(endpoint).await?;
        c.init(pb::InitRequest {})
            .await
            .map(|r| r.into_inner())
            .map_err(|s| self.refused(endpoint, s))
    }

    /// Adds node `id` at `addr` (its Raft address) as a learner; returns once it caught up.
    pub async fn add_learner(&self, id: u64, addr: &str) -> Result<pb::MembershipReply, CtlError> {
        self.on_leader_within(SLOW_REQUEST_TIMEOUT, |mut c| {
            let req = pb::AddLearnerRequest {
                id,
                addr: addr.to_string(),
            };
            async move { c.add_learner(req).await }
        })
        .await
    }

    /// Makes the learners `ids` voters.
    pub async fn promote(&self, ids: &[u64]) -> Result<pb::MembershipReply, CtlError> {
        self.on_leader_within(SLOW_REQUEST_TIMEOUT, |mut c| {
            let req = pb::PromoteRequest { ids: ids.to_vec() };
            async move { c.promote(req).await }
        })
        .await
    }

    /// Removes node `id` from the membership.
    pub async fn remove(&self, id: u64) -> Result<pb::MembershipReply, CtlError> {
        self.on_leader(|mut c| async move { c.remove(pb::RemoveRequest { id }).await })
            .await
    }

    /// Hands leadership to node `to`.
    pub async fn transfer_leader(&self, to: u64) -> Result<(), CtlError> {
        self.on_leader(|mut c| async move { c.transfer_leader(pb::TransferLeaderRequest { to }).await })
            .await
            .map(|_| ())
    }

    /// Builds a snapshot on the leader and purges its log; the index it covers.
    pub async fn snapshot(&self) -> Result<Option<u64>, CtlError> {
        self.on_leader_within(SLOW_REQUEST_TIMEOUT, |mut c| async move {
            c.snapshot(pb::SnapshotRequest {}).await
        })
        .await
        .map(|r| r.index)
    }

    /// Writes `key = value`; the log index of the write. Retried (same key and value) across
    /// leader changes.
    pub async fn put(&self, key: &str, value: Bytes) -> Result<u64, CtlError> {
        self.on_leader(|mut c| {
            let req = pb::PutRequest {
                key: key.to_string(),
                value: value.clone(),
            };
            async move { c.put(req).await }
        })
        .await
        .map(|r| r.index)
    }

    /// A linearizable read of `key`.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>, CtlError> {
        self.on_leader(|mut c| {
            let req = pb::GetRequest { key: key.to_string() };
            async move { c.get(req).await }
        })
        .await
        .map(|r| r.value)
    }

    /// Writes `writes` keys (`load-<run>-<i>`, values of `value_size` bytes) with
    /// `concurrency` writers; `progress` is called after each acknowledged write. Every
    /// acknowledged key and value is written to `keys_out` when given (see [`write_keys`]).
    pub async fn load(
        &self,
        writes: u64,
        concurrency: usize,
        value_size: usize,
        keys_out: Option<&std::path::Path>,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<LoadReport, CtlError> {
        let run = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let acked = Arc::new(Mutex::new(Vec::<(String, Bytes, Duration)>::new()));
        let failed = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let retried = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let start = Instant::now();
        let workers = (0..concurrency.max(1)).map(|_| {
            let (next, acked, failed, retried) =
                (next.clone(), acked.clone(), failed.clone(), retried.clone());
            async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= writes {
                        return;
                    }
                    let key = format!("load-{run}-{i:08}");
                    let value = load_value(&key, value_size);
                    let t = Instant::now();
                    // A write whose outcome is unknown is retried with the same key and
                    // value: `Set` is idempotent, so a retry never duplicates.
                    let mut attempts = 0;
                    let outcome = loop {
                        attempts += 1;
                        match self.put(&key, value.clone()).await {
                            Ok(_) => break true,
                            // The request itself is refused: retrying cannot help.
                            Err(CtlError::Refused { .. }) => break false,
                            Err(_) if attempts >= 3 => break false,
                            Err(_) => {
                                retried.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                        }
                    };
                    if outcome {
                        let mut a = acked.lock().unwrap_or_else(|p| p.into_inner());
                        a.push((key, value, t.elapsed()));
                        progress(a.len() as u64);
                    } else {
                        failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
        });
        futures::future::join_all(workers).await;
        let elapsed = start.elapsed();
        let acked = std::mem::take(&mut *acked.lock().unwrap_or_else(|p| p.into_inner()));
        if let Some(path) = keys_out {
            write_keys(path, &acked).map_err(|source| CtlError::KeysOut {
                path: path.display().to_string(),
                source,
            })?;
        }
        let mut lat: Vec<Duration> = acked.iter().map(|(_, _, d)| *d).collect();
        lat.sort();
        let pct = |p: f64| {
            if lat.is_empty() {
                0.0
            } else {
                let i = ((lat.len() as f64 - 1.0) * p).round() as usize;
                lat[i].as_secs_f64() * 1000.0
            }
        };
        Ok(LoadReport {
            acknowledged: acked.len() as u64,
            failed: failed.load(std::sync::atomic::Ordering::Relaxed),
            writes_per_sec: acked.len() as f64 / elapsed.as_secs_f64().max(1e-9),
            p50_ms: pct(0.5),
            p99_ms: pct(0.99),
            retried: retried.load(std::sync::atomic::Ordering::Relaxed),
        })
    }
}

/// The value `load` writes under `key`: derived from the key, so a checker can recompute it.
pub fn load_value(key: &str, size: usize) -> Bytes {
    let seed = key.as_bytes();
    (0..size)
        .map(|i| seed[i % seed.len().max(1)] ^ (i as u8))
        .collect()
}

/// Writes one line per acknowledged write: `key<TAB>value-size<TAB>hex of the value`.
pub fn write_keys(path: &std::path::Path, acked: &[(String, Bytes, Duration)]) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for (key, value, _) in acked {
        let hex: String = value.iter().map(|b| format!("{b:02x}")).collect();
        writeln!(out, "{key}\t{}\t{hex}", value.len())?;
    }
    out.flush()?;
    out.into_inner().map_err(|e| e.into_error())?.sync_all()
}
