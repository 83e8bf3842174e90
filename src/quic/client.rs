//! The QUIC client side: one connection per peer, a stream per call or session.

use std::net::SocketAddr;
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

use super::FrameReader;
use super::Outgoing;
use crate::codec::Message;
use crate::config::Config;
use crate::config::QuicTuning;
use crate::connect::Dialer;
use crate::error::TransportError;
use crate::error::error_chain;
use crate::error::handshake_refusal;
use crate::framed;
use crate::framed::Framing;
use crate::framed::client::failed;
use crate::link;
use crate::link::Link;
use crate::link::Purpose;
use crate::link::Replies;
use crate::link::SnapshotUpload;
use crate::stats::Stats;
use crate::tls;
use crate::types::RaftWireConfig;

/// How long the first handshake attempt of a dial may take before a fresh one starts; each
/// next attempt gets twice as long. Ample for a LAN handshake (one round trip plus the
/// certificate checks); on slower paths the later, longer attempts succeed.
const FIRST_DIAL_ATTEMPT: Duration = Duration::from_millis(250);

/// Stream priority of heartbeats: ahead of replication and snapshot data when both wait.
const HEARTBEAT_PRIORITY: i32 = 10;

/// The QUIC client side of one factory: one endpoint (one UDP socket) per address family,
/// shared by the connections to every peer.
pub(crate) struct Connector {
    shared: Arc<Shared>,
}

struct Shared {
    tls: Option<crate::tls::TlsConfig>,
    tuning: QuicTuning,
    connect_timeout: Duration,
    max_len: usize,
    framing: Framing,
    alpn: &'static [u8],
    /// IPv4 and IPv6 endpoints, made on first use.
    endpoints: Mutex<[Option<quinn::Endpoint>; 2]>,
}

impl Connector {
    pub(crate) fn new(config: &Config) -> Self {
        Connector {
            shared: Arc::new(Shared {
                tls: config.tls.clone(),
                tuning: config.quic.clone(),
                connect_timeout: config.connect_timeout,
                max_len: super::max_frame(config),
                framing: Framing::of(config),
                alpn: super::alpn(config),
                endpoints: Mutex::new([None, None]),
            }),
        }
    }
}

impl<C: RaftWireConfig> link::Connector<C> for Connector {
    fn link(&self, addr: &str, target: u64, _purpose: Purpose, stats: Stats) -> Arc<dyn Link<C>> {
        Arc::new(Lane::new(addr, target, self.shared.clone(), stats))
    }

    fn shares_purposes(&self) -> bool {
        // Streams on one connection are flow-controlled apart: no head-of-line blocking.
        true
    }
}

impl Shared {
    /// The factory's endpoint for `peer`'s address family, bound on first use.
    fn endpoint(&self, peer: SocketAddr) -> Result<quinn::Endpoint, String> {
        let mut endpoints = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        let slot = &mut endpoints[usize::from(peer.is_ipv6())];
        if let Some(e) = slot {
            return Ok(e.clone());
        }
        let local: SocketAddr = if peer.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = super::udp_socket(local, &self.tuning).map_err(|e| e.to_string())?;
        let runtime = quinn::default_runtime().ok_or("no async runtime")?;
        let endpoint_config = super::endpoint_config(self.tls.as_ref());
        let endpoint =
            quinn::Endpoint::new(endpoint_config, None, socket, runtime).map_err(|e| e.to_string())?;
        *slot = Some(endpoint.clone());
        Ok(endpoint)
    }
}

/// The QUIC connection to one peer, shared by every client of that peer; dialled in the
/// background on first use and again once it is closed.
pub(crate) struct Lane {
    addr: String,
    target: u64,
    client_config: Result<quinn::ClientConfig, String>,
    shared: Arc<Shared>,
    dialer: Dialer<quinn::Connection>,
    /// This peer's counters and metrics on QUIC.
    stats: Stats,
}

impl Lane {
    /// Never fails and never connects: bad TLS setup surfaces as `Connect` on first use.
    fn new(addr: &str, target: u64, shared: Arc<Shared>, stats: Stats) -> Self {
        let client_config = match &shared.tls {
            None => Err("QUIC needs a TLS identity".to_string()),
            Some(t) => t
                .client_config(target, shared.alpn)
                .map_err(|e| format!("TLS setup failed: {e}"))
                .and_then(|c| {
                    quinn::crypto::rustls::QuicClientConfig::try_from(c)
                        .map_err(|e| format!("TLS setup unusable for QUIC: {e}"))
                })
                .map(|c| {
                    let mut cc = quinn::ClientConfig::new(Arc::new(c));
                    cc.transport_config(Arc::new(super::transport_config(&shared.tuning)));
                    cc
                }),
        };
        Lane {
            addr: addr.to_string(),
            target,
            client_config,
            dialer: Dialer::new(addr, shared.connect_timeout, stats.clone()),
            shared,
            stats,
        }
    }

    async fn connection(&self) -> Result<quinn::Connection, TransportError> {
        let (config, addr, shared, target) = (
            self.client_config.clone(),
            self.addr.clone(),
            self.shared.clone(),
            self.target,
        );
        self.dialer
            .get(
                |c: &quinn::Connection| c.close_reason().is_none(),
                move || async move {
                    let config = config?;
                    let addr: SocketAddr = tokio::net::lookup_host(&addr)
                        .await
                        .map_err(|e| format!("cannot resolve: {e}"))?
                        .next()
                        .ok_or("the name resolves to no address")?;
                    let endpoint = shared.endpoint(addr)?;
                    let name = tls::node_dns_name(target);
                    // A lost Initial is resent only after the probe timeout, which doubles
                    // each time: a peer that comes back while a dial waits would be found
                    // late. Fresh attempts (short at first, longer after) start over at once;
                    // the dialer bounds the whole by `connect_timeout`.
                    let mut attempt = FIRST_DIAL_ATTEMPT;
                    loop {
                        let connecting = endpoint
                            .connect_with(config.clone(), addr, &name)
                            .map_err(|e| e.to_string())?;
                        match tokio::time::timeout(attempt, connecting).await {
                            Ok(done) => {
                                return done
                                    .map_err(|e| handshake_refusal(&e).unwrap_or_else(|| error_chain(&e)));
                            }
                            Err(_) => attempt *= 2,
                        }
                    }
                },
            )
            .await
    }

    async fn open(&self, rpc: RPCTypes, priority: i32) -> Result<(Outgoing, FrameReader), TransportError> {
        let conn = self.connection().await?;
        let (send, recv) = conn.open_bi().await.map_err(|e| failed(&self.addr, rpc, e))?;
        let _ = send.set_priority(priority);
        let (sent, received) = self.stats.byte_counters();
        let (send, recv) = self.shared.framing.open(send, recv, self.shared.max_len);
        Ok((send.counted(sent), recv.counted(received)))
    }
}

impl<C: RaftWireConfig> framed::client::Calls<C> for Lane {
    /// One request on a fresh stream, one reply. Votes go ahead of replication and snapshot
    /// data when both wait: elections must not wait behind bulk bytes either.
    async fn exchange(
        &self,
        rpc: RPCTypes,
        deadline: Duration,
        msg: Message<C>,
    ) -> Result<Message<C>, TransportError> {
        let priority = if rpc == RPCTypes::Vote {
            HEARTBEAT_PRIORITY
        } else {
            0
        };
        let work = async {
            let (send, reader) = self.open(rpc, priority).await?;
            framed::client::call(&self.addr, rpc, send, reader, msg, self.shared.max_len).await
        };
        let outcome = tokio::time::timeout(deadline, work)
            .await
            .map_err(|_| TransportError::Timeout { rpc, after: deadline })
            .and_then(|r| r);
        self.dialer.observe(&outcome);
        outcome
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
            // Heartbeats go ahead of replication and snapshot data when both wait.
            let priority = if purpose == Purpose::Heartbeat {
                HEARTBEAT_PRIORITY
            } else {
                0
            };
            let (send, reader) = tokio::time::timeout(deadline, self.open(rpc, priority))
                .await
                .map_err(|_| TransportError::Timeout { rpc, after: deadline })??;
            let session = framed::client::stream_append(
                &self.addr,
                send,
                reader,
                input,
                config,
                deadline,
                purpose,
                self.shared.max_len,
                self.stats.clone(),
            );
            Ok(link::observed(session, &self.dialer))
        })
    }

    fn probe(&self, deadline: Duration) -> BoxFuture<'_, Result<(), TransportError>> {
        Box::pin(async move {
            match tokio::time::timeout(deadline, self.connection()).await {
                Ok(r) => r.map(|_| ()),
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
            let rpc = RPCTypes::InstallSnapshot;
            let (send, reader) = self.open(rpc, 0).await?;
            framed::client::open_snapshot(&self.addr, send, reader, vote, meta, self.shared.max_len).await
        })
    }
}
