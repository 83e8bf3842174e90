//! Error surfaces over real sockets: unreachable peers, malformed and oversized requests.
#![cfg(feature = "app")]

mod common;

use std::time::Duration;

use common::loopback;
use openraft::RaftNetworkFactory;
use openraft::errors::RPCError;
use openraft::impls::BasicNode;
use openraft::network::RPCOption;
use openraft::network::RaftNetworkV2;
use openraft::raft::VoteRequest;
use raftwire::NetworkFactory;
use raftwire::kv::KvConfig;
use raftwire::kv::KvSnapshotData;

fn vote_request() -> VoteRequest<KvConfig> {
    VoteRequest::new(openraft::impls::Vote::new(1, 1), None)
}

/// A port nobody listens on: bound, then released.
async fn closed_port() -> String {
    let l = tokio::net::TcpListener::bind(loopback()).await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    addr.to_string()
}

#[tokio::test]
async fn unreachable_peer_is_reported_as_unreachable() {
    for transport in common::transports() {
        let config =
            common::Net::with(transport, |b| b.connect_timeout(Duration::from_millis(500))).config(1);
        let mut factory = NetworkFactory::<KvConfig, KvSnapshotData>::new(1, config).unwrap();
        let mut client = factory
            .new_client(
                2,
                &BasicNode {
                    addr: closed_port().await,
                },
            )
            .await;
        let err = client
            .vote(vote_request(), RPCOption::new(Duration::from_secs(2)))
            .await
            .unwrap_err();
        assert!(
            matches!(err, RPCError::Unreachable(_)),
            "{transport:?}: expected Unreachable, got {err:?}"
        );

        let mut bad = factory
            .new_client(
                3,
                &BasicNode {
                    addr: "not an address".into(),
                },
            )
            .await;
        let err = bad
            .vote(vote_request(), RPCOption::new(Duration::from_secs(2)))
            .await
            .unwrap_err();
        assert!(
            matches!(err, RPCError::Unreachable(_)),
            "{transport:?}: expected Unreachable, got {err:?}"
        );
    }
}

#[tokio::test]
async fn black_holed_peer_times_out() {
    // Accepts TCP connections but never speaks: a peer that stops answering.
    let l = tokio::net::TcpListener::bind(loopback()).await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    for transport in common::transports() {
        let config = common::Net::new(transport).config(1);
        let mut factory = NetworkFactory::<KvConfig, KvSnapshotData>::new(1, config).unwrap();
        let mut client = factory.new_client(2, &BasicNode { addr: addr.clone() }).await;
        let started = std::time::Instant::now();
        let err = client
            .vote(vote_request(), RPCOption::new(Duration::from_millis(400)))
            .await
            .unwrap_err();
        assert!(
            matches!(err, RPCError::Timeout(_) | RPCError::Unreachable(_)),
            "{transport:?}: expected a timeout, got {err:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{transport:?}: the deadline was not enforced"
        );
    }
    hold.abort();
}

/// A snapshot transfer stops as soon as openraft's cancel future fires, even while the
/// receiver is stuck, and the receiver keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_send_honours_cancel() {
    use openraft::errors::ReplicationClosed;
    use openraft::errors::StreamingError;
    for transport in common::transports() {
        let net = common::Net::new(transport);
        let stuck = || async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok::<_, std::io::Error>(KvSnapshotData::default())
        };
        let mut node = raftwire::kv::KvNode::start_with_sink(
            1,
            raftwire::demo::raft_config(),
            net.config(1),
            loopback(),
            stuck,
        )
        .await
        .unwrap();
        let mut factory = NetworkFactory::<KvConfig, KvSnapshotData>::new(2, net.config(2)).unwrap();
        let mut client = factory.new_snapshot_client(1, &node.node()).await;
        let leader = raftwire::WireLeaderId { term: 1, node_id: 2 };
        let log_id = openraft::LogId {
            leader_id: leader,
            index: 10,
        };
        let membership =
            openraft::Membership::new_with_defaults(vec![std::collections::BTreeSet::from([2])], [2]);
        let meta = openraft::SnapshotMeta {
            last_log_id: Some(log_id),
            last_membership: openraft::StoredMembership::new(Some(log_id), membership),
        };
        let data = KvSnapshotData::new(vec![7u8; 32 << 20]);
        let vote = openraft::impls::Vote {
            leader_id: leader,
            committed: true,
        };
        let cancel = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            ReplicationClosed::new("test cancels the transfer")
        };
        let started = std::time::Instant::now();
        let result = client
            .full_snapshot(
                vote,
                openraft::Snapshot { meta, snapshot: data },
                cancel,
                RPCOption::new(Duration::from_secs(60)),
            )
            .await;
        assert!(
            matches!(result, Err(StreamingError::Closed(_))),
            "{transport:?}: {result:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{transport:?}: cancel took {:?}",
            started.elapsed()
        );
        let mut voter = factory.new_client(1, &node.node()).await;
        let vote_req = VoteRequest::new(openraft::impls::Vote::new(0, 2), None);
        voter
            .vote(vote_req, RPCOption::new(Duration::from_secs(2)))
            .await
            .unwrap();
        node.stop().await.unwrap();
    }
}

/// Heartbeats are one-request replication sessions, ten a second per peer for as long as a
/// node runs: thousands of them must reuse one connection and close cleanly (a server that
/// sees too many abandoned streams closes the connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_heartbeat_sessions_share_one_connection() {
    use futures::StreamExt;
    for transport in common::transports() {
        let net = common::Net::new(transport);
        let mut node =
            raftwire::kv::KvNode::start(1, raftwire::demo::raft_config(), net.config(1), loopback())
                .await
                .unwrap();
        let mut factory = NetworkFactory::<KvConfig, KvSnapshotData>::new(2, net.config(2)).unwrap();
        let mut client = factory.new_heartbeat_client(1, &node.node()).await;
        let leader = raftwire::WireLeaderId { term: 1, node_id: 2 };
        for i in 0..2_500 {
            let beat = openraft::raft::AppendEntriesRequest::<KvConfig> {
                vote: openraft::impls::Vote {
                    leader_id: leader,
                    committed: true,
                },
                prev_log_id: None,
                entries: Vec::new(),
                leader_commit: None,
            };
            let mut out = client
                .stream_append(
                    futures::stream::iter([beat]),
                    RPCOption::new(Duration::from_secs(5)),
                )
                .await
                .unwrap();
            let first = out.next().await;
            assert!(
                matches!(first, Some(Ok(Ok(_)))),
                "{transport:?}: heartbeat {i}: {first:?}"
            );
            let end = out.next().await;
            assert!(
                end.is_none(),
                "{transport:?}: heartbeat {i}: the session did not end: {end:?}"
            );
        }
        assert_eq!(
            factory.stats().connects,
            1,
            "{transport:?}: heartbeats reconnected"
        );
        node.stop().await.unwrap();
    }
}

#[cfg(feature = "grpc")]
mod grpc {
    use raftwire::Transport;
    use raftwire::demo;
    use raftwire::kv::KvNode;
    use raftwire::pb;
    use raftwire::pb::raft_client::RaftClient;
    use tonic::Code;

    use super::common::loopback;

    async fn node_and_client(max_message: usize) -> (KvNode, RaftClient<tonic::transport::Channel>) {
        // The wire-level client below speaks plaintext gRPC: the explicit opt-in.
        let config = raftwire::Config::builder()
            .transport(Transport::Grpc)
            .insecure_plaintext()
            .max_message_size(max_message)
            .snapshot_chunk_size(max_message / 2)
            .build()
            .unwrap();
        let node = KvNode::start(1, demo::raft_config(), config, loopback())
            .await
            .unwrap();
        demo::initialize_alone(&node).await.unwrap();
        let client = RaftClient::connect(format!("http://{}", node.addr()))
            .await
            .unwrap();
        (node, client.max_encoding_message_size(usize::MAX))
    }

    /// A vote of node 2 (the plaintext server is node 1, and refuses requests that speak for
    /// itself).
    fn vote(term: u64) -> pb::Vote {
        pb::Vote {
            leader_id: Some(pb::LeaderId { term, node_id: 2 }),
            committed: true,
        }
    }

    #[tokio::test]
    async fn malformed_requests_get_invalid_argument_naming_the_field() {
        let (mut node, mut client) = node_and_client(1 << 20).await;

        let err = client
            .vote(pb::VoteRequest {
                vote: None,
                last_log_id: None,
                leadership_transfer: false,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains("`vote`"), "{}", err.message());

        let entry = pb::Entry {
            log_id: None,
            payload: Some(pb::entry::Payload::Blank(pb::Blank {})),
        };
        let req = pb::AppendEntriesRequest {
            vote: Some(vote(1)),
            prev_log_id: None,
            entries: vec![entry],
            leader_commit: None,
        };
        let err = client.append_entries(req.clone()).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains("entries[0].log_id"), "{}", err.message());

        // On a stream, the bad request is reported in the stream, naming its position.
        let mut replies = client
            .stream_append(futures::stream::iter([req]))
            .await
            .unwrap()
            .into_inner();
        let err = replies.message().await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(
            err.message().contains("request[0].entries[0].log_id"),
            "{}",
            err.message()
        );

        // An app payload that its WireMessage impl refuses.
        let bad_payload = pb::Entry {
            log_id: Some(pb::LogId {
                leader_id: Some(pb::LeaderId { term: 1, node_id: 1 }),
                index: 5,
            }),
            payload: Some(pb::entry::Payload::Normal(bytes::Bytes::from_static(&[9, 9]))),
        };
        let req = pb::AppendEntriesRequest {
            vote: Some(vote(1)),
            prev_log_id: None,
            entries: vec![bad_payload],
            leader_commit: None,
        };
        let err = client.append_entries(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(
            err.message().contains("entries[0].normal.kv_request"),
            "{}",
            err.message()
        );

        // A snapshot stream that does not start with a header.
        let chunk = pb::SnapshotChunk {
            kind: Some(pb::snapshot_chunk::Kind::Data(bytes::Bytes::from_static(b"x"))),
        };
        let err = client
            .install_snapshot(futures::stream::iter([chunk]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains("header"), "{}", err.message());

        // The server is still up and serves a well-formed request.
        let ok = client
            .vote(pb::VoteRequest {
                vote: Some(vote(0)),
                last_log_id: None,
                leadership_transfer: false,
            })
            .await;
        assert!(ok.is_ok(), "{ok:?}");
        node.stop().await.unwrap();
    }

    #[tokio::test]
    async fn oversized_message_gets_resource_exhausted() {
        let (mut node, mut client) = node_and_client(64 << 10).await;
        let entry = pb::Entry {
            log_id: Some(pb::LogId {
                leader_id: Some(pb::LeaderId { term: 1, node_id: 1 }),
                index: 1,
            }),
            payload: Some(pb::entry::Payload::Normal(bytes::Bytes::from(vec![
                0u8;
                128 << 10
            ]))),
        };
        let req = pb::AppendEntriesRequest {
            vote: Some(vote(1)),
            prev_log_id: None,
            entries: vec![entry],
            leader_commit: None,
        };
        let err = client.append_entries(req.clone()).await.unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
        let mut replies = client
            .stream_append(futures::stream::iter([req]))
            .await
            .unwrap()
            .into_inner();
        let err = replies.message().await.unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
        assert!(err.message().contains("request[0]"), "{}", err.message());
        let ok = client
            .vote(pb::VoteRequest {
                vote: Some(vote(0)),
                last_log_id: None,
                leadership_transfer: false,
            })
            .await;
        assert!(ok.is_ok(), "{ok:?}");
        node.stop().await.unwrap();
    }

    /// A snapshot whose data does not match its trailer, or that ends without one, is refused
    /// and nothing is installed; a matching one is installed.
    #[tokio::test]
    async fn corrupted_or_truncated_snapshot_is_refused() {
        let (mut node, mut client) = node_and_client(1 << 20).await;
        let data: Vec<u8> = [&3u32.to_be_bytes()[..], b"key", &5u32.to_be_bytes()[..], b"value"].concat();
        let header = pb::SnapshotHeader {
            vote: Some(vote(5)),
            meta: Some(pb::SnapshotMeta {
                last_log_id: Some(pb::LogId {
                    leader_id: Some(pb::LeaderId { term: 5, node_id: 2 }),
                    index: 100,
                }),
                last_membership_log_id: None,
                last_membership: Some(pb::Membership {
                    configs: vec![pb::VoterSet { ids: vec![1] }],
                    nodes: vec![pb::NodeEntry {
                        id: 1,
                        node: bytes::Bytes::from(node.addr().to_string()),
                    }],
                }),
            }),
        };
        let chunk = |kind| pb::SnapshotChunk { kind: Some(kind) };
        let header = chunk(pb::snapshot_chunk::Kind::Header(header));
        let body = chunk(pb::snapshot_chunk::Kind::Data(bytes::Bytes::from(data.clone())));
        let trailer = |length: u64, crc32c: u32| {
            chunk(pb::snapshot_chunk::Kind::Trailer(pb::SnapshotTrailer {
                length,
                crc32c,
            }))
        };
        let crc = crate::common::crc32c(&data);
        let len = data.len() as u64;
        let mut flipped = data.clone();
        flipped[4] ^= 0x20;
        let cases = [
            (
                "a flipped bit",
                vec![
                    header.clone(),
                    chunk(pb::snapshot_chunk::Kind::Data(flipped.into())),
                    trailer(len, crc),
                ],
                "checksum mismatch",
            ),
            (
                "a wrong length",
                vec![header.clone(), body.clone(), trailer(len + 1, crc)],
                "length mismatch",
            ),
            ("no trailer", vec![header.clone(), body.clone()], "truncated"),
            (
                "data after the trailer",
                vec![header.clone(), body.clone(), trailer(len, crc), body.clone()],
                "after the snapshot trailer",
            ),
        ];
        for (what, chunks, needle) in cases {
            let err = client
                .install_snapshot(futures::stream::iter(chunks))
                .await
                .unwrap_err();
            assert!(matches!(err.code(), Code::InvalidArgument), "{what}: {err:?}");
            assert!(err.message().contains(needle), "{what}: {}", err.message());
            assert_eq!(node.sm.snapshots_installed(), 0, "{what}: nothing installed");
        }
        client
            .install_snapshot(futures::stream::iter([
                header.clone(),
                body.clone(),
                trailer(len, crc),
            ]))
            .await
            .unwrap();
        assert_eq!(node.sm.snapshots_installed(), 1);
        assert_eq!(node.sm.get("key").as_deref(), Some(&b"value"[..]));

        // A snapshot "from" the receiving node itself would make openraft's engine panic
        // (it would become leader through the install path): refused before Raft sees it.
        let mut own = vote(9);
        own.leader_id = Some(pb::LeaderId { term: 9, node_id: 1 });
        let forged = chunk(pb::snapshot_chunk::Kind::Header(pb::SnapshotHeader {
            vote: Some(own),
            meta: match &header.kind {
                Some(pb::snapshot_chunk::Kind::Header(h)) => h.meta.clone(),
                _ => None,
            },
        }));
        let err = client
            .install_snapshot(futures::stream::iter([forged, body, trailer(len, crc)]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
        assert!(err.message().contains("itself"), "{}", err.message());
        let ok = client
            .vote(pb::VoteRequest {
                vote: Some(vote(10)),
                last_log_id: None,
                leadership_transfer: false,
            })
            .await;
        assert!(ok.is_ok(), "the node's Raft is alive: {ok:?}");
        node.stop().await.unwrap();
    }
}
