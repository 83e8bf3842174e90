//! The TCP client side: per peer and purpose, a small pool of TLS connections, each carrying
//! one exchange at a time.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use openraft::alias::SnapshotMetaOf;
use openraft::alias::VoteOf;
use openraft::network::RPCTypes;
use openraft::raft::AppendEntriesRequest;
use openraft::raft::AppendEntriesResponse;
use openraft::raft::TransferLeaderRequest;
use openraft::raft::TransferLeaderResponse;
use openraft::raft::VoteRequest;
use openraft::raft::VoteResponse;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::TcpRecv;
use super::TcpSend;
use crate::codec::Message;
use crate::config::Config;
use crate::connect::Dialer;
use crate::error::TransportError;
use crate::error::error_chain;
use crate::error::handshake_refusal;
use crate::framed;
use crate::framed::FrameReader;
use crate::framed::Framing;
use crate::framed::Outgoing;
use crate::link;
use crate::link::Link;
use crate::link::Purpose;
use crate::link::Replies;
use crate::link::SnapshotUpload;
use crate::stats::Stats;
use crate::tls;
use crate::types::RaftWireConfig;

/// A client-side TLS connection.
type Conn = tokio_rustls::client::TlsStream<TcpStream>;

/// The TCP client side of one factory.
pub(crate) struct Connector {
    tls: Option<crate::tls::TlsConfig>,
    connect_timeout: Duration,
    max_len: usize,
    framing: Framing,
    alpn: &'static [u8],
    /// Idle connections older than this are closed instead of reused (the server closes
    /// them after `idle_peer_timeout`; half of it leaves room for clocks and delays).
    idle_reuse: Duration,
    /// Idle connections kept per link; those beyond are closed when their exchange ends.
    max_idle: usize,
}

impl Connector {
    pub(crate) fn new(config: &Config) -> Self {
        Connector {
            tls: config.tls.clone(),
            connect_timeout: config.connect_timeout,
            max_len: super::max_frame(config),
            framing: Framing::of(config),
            alpn: super::alpn(config),
            idle_reuse: config.idle_peer_timeout / 2,
            max_idle: config.max_idle_connections,
        }
    }
}

impl<C: RaftWireConfig> link::Connector<C> for Connector {
    fn link(&self, addr: &str, target: u64, _purpose: Purpose, stats: Stats) -> Arc<dyn Link<C>> {
        Arc::new(Lane::new(addr, target, self, stats))
    }

    fn shares_purposes(&self) -> bool {
        // One exchange at a time per connection: heartbeats must not queue behind a
        // replication session or a snapshot.
        false
    }
}

/// A freshly dialled connection and when it was made, until a call takes it.
type Fresh = Arc<Mutex<Option<(Conn, Instant)>>>;

/// Connections of one peer and purpose.
pub(crate) struct Lane {
    addr: String,
    target: u64,
    client_config: Result<Arc<rustls::ClientConfig>, String>,
    dialer: Dialer<Fresh>,
    /// Connections whose last exchange ended cleanly, with when it ended.
    idle: Arc<Mutex<Vec<(Conn, Instant)>>>,
    max_len: usize,
    framing: Framing,
    idle_reuse: Duration,
    max_idle: usize,
    stats: Stats,
}

impl Lane {
    /// Never fails and never connects: bad TLS setup surfaces as `Connect` on first use.
    fn new(addr: &str, target: u64, connector: &Connector, stats: Stats) -> Self {
        let client_config = match &connector.tls {
            None => Err("the TCP transport needs a TLS identity".to_string()),
            Some(t) => t
                .client_config(target, connector.alpn)
                .map(Arc::new)
                .map_err(|e| format!("TLS setup failed: {e}")),
        };
        Lane {
            addr: addr.to_string(),
            target,
            client_config,
            dialer: Dialer::new(addr, connector.connect_timeout, stats.clone()),
            idle: Arc::default(),
            max_len: connector.max_len,
            framing: connector.framing,
            idle_reuse: connector.idle_reuse,
            max_idle: connector.max_idle,
            stats,
        }
    }

    /// A connection for one exchange: an idle one, else a new one (dialled in the
    /// background, see `connect`).
    async fn checkout(&self) -> Result<Conn, TransportError> {
        loop {
            if let Some(conn) = self.reuse() {
                return Ok(conn);
            }
            let fresh = self.dial().await?;
            let taken = fresh.lock().unwrap_or_else(|p| p.into_inner()).take();
            // A connection nobody claimed for long (its caller gave up during the dial) may
            // have been closed by the server since; so may one the server went away from.
            if let Some((conn, since)) = taken
                && since.elapsed() < self.idle_reuse
                && still_open(&conn)
            {
                return Ok(conn);
            }
            // Another call took that one, or it was stale; the dialer makes the next.
        }
    }

    /// An idle connection that is still open, the most recently used first.
    fn reuse(&self) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        idle.retain(|(_, since)| now.duration_since(*since) < self.idle_reuse);
        while let Some((conn, _)) = idle.pop() {
            if still_open(&conn) {
                return Some(conn);
            }
        }
        None
    }

    async fn dial(&self) -> Result<Fresh, TransportError> {
        let (config, addr, target) = (self.client_config.clone(), self.addr.clone(), self.target);
        self.dialer
            .get(
                |fresh: &Fresh| fresh.lock().unwrap_or_else(|p| p.into_inner()).is_some(),
                move || async move {
                    let config = config?;
                    let tcp = TcpStream::connect(&addr)
                        .await
                        .map_err(|e| format!("cannot connect: {e}"))?;
                    let _ = tcp.set_nodelay(true);
                    crate::accept::keepalive(&tcp);
                    let connector = tokio_rustls::TlsConnector::from(config);
                    let mut conn = connector
                        .connect(tls::server_name(target), tcp)
                        .await
                        .map_err(|e| handshake_refusal(&e).unwrap_or_else(|| error_chain(&e)))?;
                    greeting(&mut conn).await?;
                    Ok(Arc::new(Mutex::new(Some((conn, Instant::now())))))
                },
            )
            .await
    }

    /// Opens an exchange on a connection, which returns to the pool if the exchange ends
    /// cleanly on both sides.
    async fn open(&self) -> Result<(Outgoing<TcpSend<Conn>>, FrameReader<TcpRecv<Conn>>), TransportError> {
        let conn = self.checkout().await?;
        let (idle, max_idle) = (self.idle.clone(), self.max_idle);
        let (send, reader) = super::exchange(conn, (self.framing, self.max_len), move |conn| {
            let mut idle = idle.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() < max_idle {
                idle.push((conn, Instant::now()));
            }
        });
        let (sent, received) = self.stats.byte_counters();
        Ok((send.counted(sent), reader.counted(received)))
    }

    /// Learns from an outcome: a timeout may mean the peer died silently, so idle connections
    /// to it are not trusted either.
    fn observe<T>(&self, outcome: &Result<T, TransportError>) {
        self.dialer.observe(outcome);
        if let Err(TransportError::Timeout { .. }) = outcome {
            self.idle.lock().unwrap_or_else(|p| p.into_inner()).clear();
        }
    }
}

impl<C: RaftWireConfig> framed::client::Calls<C> for Lane {
    /// One request, one reply, on a pooled or new connection.
    async fn exchange(
        &self,
        rpc: RPCTypes,
        deadline: Duration,
        msg: Message<C>,
    ) -> Result<Message<C>, TransportError> {
        let work = async {
            let (send, reader) = self.open().await?;
            framed::client::call(&self.addr, rpc, send, reader, msg, self.max_len).await
        };
        let outcome = tokio::time::timeout(deadline, work)
            .await
            .map_err(|_| TransportError::Timeout { rpc, after: deadline })
            .and_then(|r| r);
        self.observe(&outcome);
        outcome
    }
}

/// Whether an idle connection can carry an exchange: between exchanges the server sends
/// nothing, so anything readable (the end of the stream, a TLS alert or close) means the
/// server closed it. Looks without reading and without waiting.
fn still_open(conn: &Conn) -> bool {
    let mut byte = [0u8; 1];
    let peeked = futures::FutureExt::now_or_never(conn.get_ref().0.peek(&mut byte));
    // Nothing to read yet: open. Anything else (data, end, an error): not reusable.
    peeked.is_none()
}

/// Waits for the server's greeting, an `End` frame it sends once it has accepted our
/// certificate: a refusal (with the server's TLS alert) surfaces here, at connect, and not
/// in the middle of the first call.
async fn greeting(conn: &mut Conn) -> Result<(), String> {
    let mut head = [0u8; crate::codec::HEADER_LEN];
    match conn.read_exact(&mut head).await {
        Ok(_) if head == crate::codec::END_FRAME => Ok(()),
        Ok(_) => Err(format!("the server is not a raftwire TCP server (greeted with {head:02x?})")),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(
            "the server closed the connection before greeting (it refused our certificate, or we are over its connection limit)"
                .into(),
        ),
        Err(e) => Err(handshake_refusal(&e).unwrap_or_else(|| error_chain(&e))),
    }
}

impl<C: RaftWireConfig> Link<C> for Lane {
    fn vote(
        &self,
        req: VoteRequest<C>,
        pre_vote: bool,
        deadline: Duration,
    ) -> BoxFuture<'_, Result<VoteResponse<C>, TransportError>> {
        Box::pin(framed::client::vote(self, req, pre_vote, deadline))
    }

    fn append(
        &self,
        req: AppendEntriesRequest<C>,
        deadline: Duration,
    ) -> BoxFuture<'_, Result<AppendEntriesResponse<C>, TransportError>> {
        Box::pin(framed::client::append(self, req, deadline))
    }

    fn transfer_leader(
        &self,
        req: TransferLeaderRequest<C>,
        deadline: Duration,
    ) -> BoxFuture<'_, Result<TransferLeaderResponse<C>, TransportError>> {
        Box::pin(framed::client::transfer_leader(self, req, deadline))
    }

    fn stream_append<'s>(
        &'s self,
        input: BoxStream<'static, AppendEntriesRequest<C>>,
        config: &'s Config,
        deadline: Duration,
        purpose: Purpose,
    ) -> BoxFuture<'s, Result<Replies<'s, C>, TransportError>> {
        Box::pin(async move {
            let rpc = RPCTypes::AppendEntries;
            let opened = tokio::time::timeout(deadline, self.open())
                .await
                .map_err(|_| TransportError::Timeout { rpc, after: deadline })
                .and_then(|r| r);
            if opened.is_err() {
                self.observe(&opened);
            }
            let (send, reader) = opened?;
            let session = framed::client::stream_append(
                &self.addr,
                send,
                reader,
                input,
                config,
                deadline,
                purpose,
                self.max_len,
                self.stats.clone(),
            );
            let idle = &self.idle;
            let session = futures::StreamExt::inspect(session, move |r| {
                if let Err(TransportError::Timeout { .. }) = r {
                    idle.lock().unwrap_or_else(|p| p.into_inner()).clear();
                }
            });
            Ok(link::observed(session, &self.dialer))
        })
    }

    fn probe(&self, deadline: Duration) -> BoxFuture<'_, Result<(), TransportError>> {
        Box::pin(async move {
            match tokio::time::timeout(deadline, self.checkout()).await {
                Ok(conn) => {
                    let conn = conn?;
                    let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
                    if idle.len() < self.max_idle {
                        idle.push((conn, Instant::now()));
                    }
                    Ok(())
                }
                Err(_) => Err(TransportError::Connect {
                    addr: self.addr.clone(),
                    reason: format!("no connection within {deadline:?}"),
                }),
            }
        })
    }

    fn open_snapshot<'s>(
        &'s self,
        vote: VoteOf<C>,
        meta: SnapshotMetaOf<C>,
    ) -> BoxFuture<'s, Result<Box<dyn SnapshotUpload<C> + 's>, TransportError>> {
        Box::pin(async move {
            let (send, reader) = self.open().await?;
            framed::client::open_snapshot(&self.addr, send, reader, vote, meta, self.max_len).await
        })
    }
}
