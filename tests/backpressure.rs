//! Back-pressure from a follower that stops reading its replication stream, over real sockets.
//!
//! The leader's pipeline must not wedge behind transport flow control: the session fails with a
//! timeout within its deadline, so openraft can retry or give up on the follower.
//!
//! - QUIC: the "follower" is a raw quinn server with a node certificate from the cluster CA. It
//!   accepts the connection and the replication stream but never reads the stream, and grants
//!   a small receive window, so the leader's write blocks on stream flow control after 64 KiB.
//! - gRPC and TCP: a TCP proxy in front of a real node. Once the connection is up (a vote went
//!   through), it stops reading from the leader: the leader's bytes pile up in socket buffers
//!   and the node never sees the requests. (gRPC's request sink queues into a channel as deep
//!   as the window, so its sends never block and its reply deadline caught this before; the
//!   QUIC sink writes to the stream and did block, wedging the session with no error.)
#![cfg(feature = "app")]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use bytes::Bytes;
use common::Net;
use common::loopback;
use futures::StreamExt;
use openraft::LogId;
use openraft::RaftNetworkFactory;
use openraft::errors::RPCError;
use openraft::impls::BasicNode;
use openraft::impls::Entry;
use openraft::impls::EntryPayload;
use openraft::impls::Vote;
use openraft::network::RPCOption;
use openraft::network::RaftNetworkV2;
use openraft::raft::AppendEntriesRequest;
use openraft::raft::VoteRequest;
use raftwire::Transport;
use raftwire::WireLeaderId;
use raftwire::kv::KvConfig;
use raftwire::kv::KvNode;
use raftwire::kv::KvRequest;
use raftwire::kv::KvSnapshotData;

/// openraft's hard TTL for the session; raftwire's deadline is its soft TTL, 3/4 of it.
const HARD_TTL: Duration = Duration::from_millis(1000);
const DEADLINE: Duration = Duration::from_millis(750);
/// Room for connecting and scheduling on a loaded test machine.
const SLACK: Duration = Duration::from_millis(750);
/// Payload bytes per request: several times the stalled peer's stream window.
const ENTRY: usize = 256 << 10;

/// The follower the leader replicates to; it stops reading once `stall` says so.
struct Stalled {
    addr: SocketAddr,
    /// Evidence the leader really sent on the replication stream: streams accepted (QUIC) or
    /// bytes withheld from the node (gRPC).
    seen: Arc<AtomicUsize>,
    stall: Arc<AtomicBool>,
    /// The real node behind the gRPC proxy.
    node: Option<KvNode>,
}

/// A raw QUIC peer that accepts streams and never reads them.
#[cfg(feature = "quic")]
async fn quic_follower(net: &Net) -> Stalled {
    let crypto = common::raw_server_crypto(&net.ca, 1, b"raftwire/1");
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(crypto).unwrap();
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    // Small windows: the leader's first request already overruns them.
    transport.stream_receive_window(quinn::VarInt::from_u32(64 << 10));
    transport.receive_window(quinn::VarInt::from_u32(256 << 10));
    server.transport_config(Arc::new(transport));
    let endpoint = quinn::Endpoint::server(server, loopback()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let accepted = seen.clone();
    tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            let accepted = accepted.clone();
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                // Held, never read: dropping a receive stream would stop the sender instead.
                let mut held = Vec::new();
                while let Ok(stream) = conn.accept_bi().await {
                    accepted.fetch_add(1, Ordering::SeqCst);
                    held.push(stream);
                }
            });
        }
    });
    Stalled {
        addr,
        seen,
        stall: Arc::new(AtomicBool::new(true)),
        node: None,
    }
}

/// A real node behind a TCP proxy that stops reading from the leader when told to.
async fn grpc_follower(net: &Net) -> Stalled {
    let node = KvNode::start(1, raftwire::demo::raft_config(), net.config(1), loopback())
        .await
        .unwrap();
    let target = node.addr();
    let listener = tokio::net::TcpListener::bind(loopback()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let stall = Arc::new(AtomicBool::new(false));
    let (withheld, stalled) = (seen.clone(), stall.clone());
    tokio::spawn(async move {
        while let Ok((leader, _)) = listener.accept().await {
            let (withheld, stalled) = (withheld.clone(), stalled.clone());
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                use tokio::io::AsyncWriteExt;
                let Ok(follower) = tokio::net::TcpStream::connect(target).await else {
                    return;
                };
                let (mut from_leader, mut to_leader) = leader.into_split();
                let (mut from_follower, mut to_follower) = follower.into_split();
                // Replies flow as usual; only the leader's bytes are held back.
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut from_follower, &mut to_leader).await;
                });
                let mut buf = vec![0; 64 << 10];
                loop {
                    let n = match from_leader.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if stalled.load(Ordering::SeqCst) {
                        withheld.fetch_add(n, Ordering::SeqCst);
                        // Stop reading, keep both sockets open.
                        std::future::pending::<()>().await;
                    }
                    if to_follower.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Stalled {
        addr,
        seen,
        stall,
        node: Some(node),
    }
}

fn request(index: u64) -> AppendEntriesRequest<KvConfig> {
    let leader_id = WireLeaderId { term: 1, node_id: 2 };
    AppendEntriesRequest {
        vote: Vote {
            leader_id,
            committed: true,
        },
        prev_log_id: None,
        entries: vec![Entry {
            log_id: LogId { leader_id, index },
            payload: EntryPayload::Normal(KvRequest::Set {
                key: format!("k{index}"),
                value: Bytes::from(vec![7; ENTRY]),
            }),
        }],
        leader_commit: None,
    }
}

async fn stalled_follower_times_out(transport: Transport) {
    let net = Net::new(transport);
    let mut follower = match transport {
        #[cfg(feature = "quic")]
        Transport::Quic => quic_follower(&net).await,
        _ => grpc_follower(&net).await,
    };
    let mut factory = raftwire::NetworkFactory::<KvConfig, KvSnapshotData>::new(2, net.config(2)).unwrap();
    let peer = BasicNode {
        addr: follower.addr.to_string(),
    };
    let mut leader = factory.new_client(1, &peer).await;
    if !follower.stall.load(Ordering::SeqCst) {
        // Connect first, so what stalls below is the replication stream, not the handshake.
        let vote = VoteRequest::new(Vote::new(1, 2), None);
        leader
            .vote(vote, RPCOption::new(Duration::from_secs(5)))
            .await
            .expect("a vote through the proxy before it stalls");
        follower.stall.store(true, Ordering::SeqCst);
    }

    // Like openraft's input: more requests than fit, then open but idle.
    let input = futures::stream::iter((1..=16).map(request)).chain(futures::stream::pending());
    let start = Instant::now();
    let session = async {
        let mut replies = leader
            .stream_append(input, RPCOption::new(HARD_TTL))
            .await
            .expect("the replication stream opens");
        replies.next().await
    };
    // Bounded so a wedged session fails the test instead of hanging it.
    let first = tokio::time::timeout(DEADLINE * 10, session)
        .await
        .expect("the session wedged behind flow control");
    let took = start.elapsed();
    assert!(
        matches!(first, Some(Err(RPCError::Timeout(_)))),
        "expected a timeout, got {first:?}"
    );
    assert!(
        took >= DEADLINE && took <= DEADLINE + SLACK,
        "timed out after {took:?}, deadline {DEADLINE:?}"
    );
    assert!(
        follower.seen.load(Ordering::SeqCst) > 0,
        "the leader never reached the replication stream"
    );
    if let Some(mut node) = follower.node.take() {
        node.stop().await.unwrap();
    }
}

on_every_transport!(stalled_follower_times_out);
