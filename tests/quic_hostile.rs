//! Hostile input on the QUIC port. The attacker is a raw quinn client holding a valid node
//! certificate from the cluster CA (node 9), so it gets past mutual TLS and speaks bytes
//! straight to the framing layer. Every bad stream must be answered with an error frame and
//! closed, logged, and must leave both the server and the attacker's connection usable.
#![cfg(all(feature = "app", feature = "quic"))]

mod common;

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use common::Net;
use common::loopback;
use openraft::RaftNetworkFactory;
use openraft::impls::BasicNode;
use openraft::network::RPCOption;
use openraft::network::RaftNetworkV2;
use openraft::raft::VoteRequest;
use quinn::VarInt;
use raftwire::Transport;
use raftwire::demo;
use raftwire::kv::KvConfig;
use raftwire::kv::KvNode;
use raftwire::kv::KvSnapshotData;

const HEADER_LEN: usize = 18;
const KIND_VOTE: u8 = 1;
const KIND_VOTE_REPLY: u8 = 3;
const KIND_SNAPSHOT_CHUNK: u8 = 9;
const KIND_ERROR: u8 = 15;
const BAD_REQUEST: u16 = 1;
const TOO_LARGE: u16 = 2;
const FORBIDDEN: u16 = 8;
const UNEXPECTED_KIND: u16 = 4;
/// The server's default cap on concurrent bidirectional streams per connection.
const MAX_STREAMS: usize = 256;

/// How long any single answer from the server may take.
const ANSWER: Duration = Duration::from_secs(3);

/// A frame header: magic, `version`, `kind`, `flags`, body length `len`, request `id`.
fn header(version: u8, kind: u8, flags: u16, len: u32, id: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN);
    h.extend_from_slice(b"RW");
    h.push(version);
    h.push(kind);
    h.extend_from_slice(&flags.to_be_bytes());
    h.extend_from_slice(&len.to_be_bytes());
    h.extend_from_slice(&id.to_be_bytes());
    h
}

/// A whole version-1 frame of `kind` around `body`.
fn frame(kind: u8, id: u64, body: &[u8]) -> Vec<u8> {
    let mut f = header(1, kind, 0, body.len() as u32, id);
    f.extend_from_slice(body);
    f
}

/// A vote body: vote (term, node id, committed), no last log id, no leadership transfer.
fn vote_body(term: u64, node_id: u64) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&term.to_be_bytes());
    b.extend_from_slice(&node_id.to_be_bytes());
    b.extend_from_slice(&[0, 0, 0]);
    b
}

/// `n` pseudo-random bytes (xorshift, fixed seed) that do not start with the magic.
fn noise(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out: Vec<u8> = (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    out[0] = 0xde;
    out[1] = 0xad;
    out
}

/// One frame as the server sent it, parsed by hand.
#[derive(Debug)]
struct Frame {
    kind: u8,
    request_id: u64,
    body: Vec<u8>,
}

/// Parses `bytes` as exactly one well-formed frame.
fn parse_frame(bytes: &[u8]) -> Frame {
    assert!(
        bytes.len() >= HEADER_LEN,
        "the server sent {} bytes, less than a header: {bytes:02x?}",
        bytes.len()
    );
    assert_eq!(&bytes[0..2], b"RW", "reply magic: {bytes:02x?}");
    assert_eq!(bytes[2], 1, "reply version");
    let flags = u16::from_be_bytes([bytes[4], bytes[5]]);
    assert_eq!(flags, 0, "reply flags");
    let len = u32::from_be_bytes(bytes[6..10].try_into().unwrap()) as usize;
    assert_eq!(
        bytes.len(),
        HEADER_LEN + len,
        "the reply holds exactly one frame of the announced length"
    );
    Frame {
        kind: bytes[3],
        request_id: u64::from_be_bytes(bytes[10..18].try_into().unwrap()),
        body: bytes[HEADER_LEN..].to_vec(),
    }
}

/// The (code, message) of the error frame in `bytes`.
fn error_frame(bytes: &[u8]) -> (u16, String) {
    let f = parse_frame(bytes);
    assert_eq!(f.kind, KIND_ERROR, "expected an error frame, got {f:?}");
    assert_eq!(f.request_id, 0, "refusals carry request id 0");
    assert!(f.body.len() >= 2, "error body too short: {f:?}");
    let code = u16::from_be_bytes([f.body[0], f.body[1]]);
    let message = String::from_utf8(f.body[2..].to_vec()).expect("error message is UTF-8");
    eprintln!("error frame: code {code}: {message}");
    (code, message)
}

/// The rustls client config of a raw peer: node 9's certificate from the cluster CA.
fn hostile_crypto(net: &Net) -> rustls::ClientConfig {
    common::raw_client_crypto(&net.ca, 9, b"raftwire/1")
}

/// A node under attack, the attacker's connection and a well-behaved peer.
struct Arena {
    node: KvNode,
    /// The attacker's endpoint (its address is what the server logs).
    endpoint: quinn::Endpoint,
    hostile: quinn::Connection,
    honest: raftwire::Network<KvConfig, KvSnapshotData>,
}

impl Arena {
    async fn new() -> Arena {
        let net = Net::new(Transport::Quic);
        let node = KvNode::start(1, demo::raft_config(), net.config(1), loopback())
            .await
            .unwrap();
        demo::initialize_alone(&node).await.unwrap();
        let addr = node.addr();

        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(hostile_crypto(&net)).unwrap();
        let client_config = quinn::ClientConfig::new(Arc::new(crypto));
        let endpoint = quinn::Endpoint::client(loopback()).unwrap();
        let hostile = tokio::time::timeout(
            ANSWER,
            endpoint
                .connect_with(client_config, addr, "node-1.raftwire")
                .unwrap(),
        )
        .await
        .expect("QUIC handshake timed out")
        .expect("a node certificate from the cluster CA is accepted");

        let mut factory =
            raftwire::NetworkFactory::<KvConfig, KvSnapshotData>::new(2, net.config(2)).unwrap();
        let honest = factory
            .new_client(
                1,
                &BasicNode {
                    addr: addr.to_string(),
                },
            )
            .await;
        Arena {
            node,
            endpoint,
            hostile,
            honest,
        }
    }

    /// A well-behaved vote from node 2 still gets its answer.
    async fn assert_serving(&mut self, after: &str) {
        let request = VoteRequest::new(openraft::impls::Vote::new(1, 2), None);
        let started = Instant::now();
        let result = self
            .honest
            .vote(request, RPCOption::new(Duration::from_secs(2)))
            .await;
        match result {
            Ok(resp) => assert_eq!(
                resp.vote.leader_id.node_id, 1,
                "after {after}: the vote is answered by node 1's own vote"
            ),
            Err(e) => panic!(
                "after {after}: the server no longer serves a well-behaved peer ({:?}): {e:?}",
                started.elapsed()
            ),
        }
    }

    /// Opens a stream on the hostile connection, writes `bytes` (then finishes if `finish`)
    /// and returns everything the server sends back before it finishes its side.
    async fn exchange(&self, bytes: &[u8], finish: bool) -> Vec<u8> {
        exchange(&self.hostile, bytes, finish).await
    }

    async fn stop(mut self) {
        self.hostile.close(VarInt::from_u32(0), b"done");
        self.node.stop().await.unwrap();
    }
}

async fn exchange(conn: &quinn::Connection, bytes: &[u8], finish: bool) -> Vec<u8> {
    let (mut send, mut recv) = tokio::time::timeout(ANSWER, conn.open_bi())
        .await
        .expect("no stream credit: the server keeps refused streams open")
        .expect("the hostile connection is still up");
    send.write_all(bytes).await.unwrap();
    if finish {
        // The server may already have refused the stream and stopped reading; a finish that
        // loses that race changes nothing here.
        let _ = send.finish();
    }
    let reply = tokio::time::timeout(ANSWER, recv.read_to_end(64 << 10))
        .await
        .expect("the server did not answer a hostile stream in time")
        .expect("the server answers with a frame and a clean finish, not a reset");
    drop(send);
    reply
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bytes_are_refused_and_the_connection_survives() {
    let mut arena = Arena::new().await;

    let reply = arena.exchange(&noise(300), true).await;
    let (code, message) = error_frame(&reply);
    assert_eq!(code, BAD_REQUEST, "{message}");
    assert!(
        message.contains("magic") && message.contains("de, ad"),
        "the refusal names the bad magic: {message}"
    );
    arena.assert_serving("random bytes").await;

    // A refused stream is a stream-level error: the same connection still carries a real
    // request. A vote from node 9 for itself at term 0 is well-formed and answered (and
    // rejected by Raft: node 1 is at a later term).
    let reply = arena
        .exchange(&frame(KIND_VOTE, 77, &vote_body(0, 9)), true)
        .await;
    let f = parse_frame(&reply);
    assert_eq!(f.kind, KIND_VOTE_REPLY, "{f:?}");
    assert_eq!(f.request_id, 77, "the reply echoes the request id");
    assert_eq!(f.body[17], 0, "a stale vote is not granted: {f:?}");

    arena.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_length_is_refused_without_waiting_for_the_body() {
    let mut arena = Arena::new().await;

    // Header only, stream left open: the answer must come from the header alone.
    let started = Instant::now();
    let reply = arena.exchange(&header(1, KIND_VOTE, 0, u32::MAX, 5), false).await;
    let (code, message) = error_frame(&reply);
    assert_eq!(code, TOO_LARGE, "{message}");
    assert!(
        message.contains(&u32::MAX.to_string()) && message.contains("exceeds the limit"),
        "the refusal names the length: {message}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused after {:?}",
        started.elapsed()
    );
    arena.assert_serving("a u32::MAX body length").await;

    // Just over the configured limit (64 MiB) is refused the same way.
    let reply = arena
        .exchange(&header(1, KIND_VOTE, 0, (64 << 20) + 1, 6), false)
        .await;
    let (code, message) = error_frame(&reply);
    assert_eq!(code, TOO_LARGE, "{message}");
    arena.assert_serving("a body length just over the limit").await;

    arena.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_kinds_versions_flags_and_bodies_are_refused() {
    let mut arena = Arena::new().await;

    let cases: [(&str, Vec<u8>, &str); 5] = [
        (
            "an unknown kind",
            header(1, 200, 0, 0, 1),
            "unknown frame kind 200",
        ),
        (
            "an unknown version",
            header(9, KIND_VOTE, 0, 0, 1),
            "unsupported frame version 9",
        ),
        (
            "reserved flags",
            header(1, KIND_VOTE, 0x0100, 0, 1),
            "reserved frame flags set: 0x0100",
        ),
        (
            "a vote body that does not decode",
            frame(KIND_VOTE, 1, &[1, 2, 3]),
            "Vote frame does not decode",
        ),
        (
            "a vote body with bytes left over",
            frame(KIND_VOTE, 1, &[vote_body(0, 9), vec![0xff; 4]].concat()),
            "left over",
        ),
    ];
    for (what, bytes, needle) in cases {
        let reply = arena.exchange(&bytes, true).await;
        let (code, message) = error_frame(&reply);
        assert_eq!(code, BAD_REQUEST, "{what}: {message}");
        assert!(
            message.contains(needle),
            "{what}: the refusal {message:?} lacks {needle:?}"
        );
        arena.assert_serving(what).await;
    }

    // A certificate speaks for one node only: node 9 may not vote as node 2.
    let reply = arena.exchange(&frame(KIND_VOTE, 3, &vote_body(5, 2)), true).await;
    let (code, message) = error_frame(&reply);
    assert_eq!(code, FORBIDDEN, "{message}");
    arena.assert_serving("a vote for another node").await;

    arena.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_cut_off_mid_frame_are_survived() {
    let mut arena = Arena::new().await;

    // A header for a 1000-byte vote, 10 bytes of it, then a reset.
    let (mut send, mut recv) = arena.hostile.open_bi().await.unwrap();
    let mut partial = header(1, KIND_VOTE, 0, 1000, 1);
    partial.extend_from_slice(&[0; 10]);
    send.write_all(&partial).await.unwrap();
    send.reset(VarInt::from_u32(7)).unwrap();
    let reply = tokio::time::timeout(ANSWER, recv.read_to_end(64 << 10))
        .await
        .expect("the server did not answer a reset stream in time");
    match reply {
        // The server's answer to a stream it can no longer read: an error frame naming the
        // reset (the receive side is gone, the send side still works).
        Ok(bytes) => {
            let (code, message) = error_frame(&bytes);
            assert_eq!(code, BAD_REQUEST, "{message}");
            assert!(message.contains("reset"), "{message}");
        }
        Err(e) => panic!("the reset stream's reply side failed: {e}"),
    }
    arena.assert_serving("a stream reset mid-frame").await;

    // The same, but finished cleanly inside the frame.
    let reply = arena.exchange(&partial, true).await;
    let (code, message) = error_frame(&reply);
    assert_eq!(code, BAD_REQUEST, "{message}");
    assert!(message.contains("ended inside a frame"), "{message}");
    arena.assert_serving("a stream finished mid-frame").await;

    // Half a header, finished.
    let reply = arena.exchange(b"RW\x01", true).await;
    let (code, message) = error_frame(&reply);
    assert_eq!(code, BAD_REQUEST, "{message}");
    assert!(message.contains("3 bytes"), "{message}");

    // An empty stream is no request: it is finished without an answer.
    let reply = arena.exchange(b"", true).await;
    assert!(reply.is_empty(), "an empty stream got {reply:02x?}");
    arena.assert_serving("an empty stream").await;

    arena.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_flood_is_capped_and_survived() {
    let mut arena = Arena::new().await;

    // 2000 streams at once, one byte each, each held open waiting for an answer that only
    // comes when the server gives up on the stream. QUIC's stream limit lets the attacker
    // hold at most MAX_STREAMS of them; the rest wait for credit.
    let opened = AtomicUsize::new(0);
    let attacker = arena.hostile.clone();
    let flood = {
        let (conn, opened) = (&attacker, &opened);
        futures::future::join_all((0..2000).map(|_| async move {
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            send.write_all(b"R").await.unwrap();
            opened.fetch_add(1, Ordering::SeqCst);
            let _ = recv.read_to_end(64 << 10).await;
        }))
    };
    let flooded = tokio::time::timeout(Duration::from_secs(3), flood);
    let honest = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        arena.assert_serving("(during) a flood of 2000 streams").await;
    };
    let (flooded, ()) = tokio::join!(flooded, honest);
    assert!(
        flooded.is_err(),
        "the flood finished: the server answered half-headers early"
    );
    assert_eq!(
        opened.load(Ordering::SeqCst),
        MAX_STREAMS,
        "the attacker held more (or fewer) streams than the server's cap"
    );

    // Dropping the flood finished its streams inside the first header: the server refuses
    // each, which frees the credit, and the attacker's connection works again.
    let reply = arena.exchange(&noise(64), true).await;
    let (code, message) = error_frame(&reply);
    assert_eq!(code, BAD_REQUEST, "{message}");
    arena.assert_serving("a flood of 2000 streams").await;

    arena.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_kinds_cannot_start_a_stream() {
    let mut arena = Arena::new().await;

    // A well-formed VoteReply: vote (term 1, node 9, not committed), not granted, no log id.
    let mut vote_reply = vote_body(1, 9);
    vote_reply.truncate(17);
    vote_reply.extend_from_slice(&[0, 0]);
    let mut error_body = 3u16.to_be_bytes().to_vec();
    error_body.extend_from_slice(b"no");
    let cases: [(&str, Vec<u8>, &str); 3] = [
        (
            "a vote reply",
            frame(KIND_VOTE_REPLY, 1, &vote_reply),
            "VoteReply",
        ),
        ("an error frame", frame(KIND_ERROR, 1, &error_body), "Error"),
        (
            "a stray snapshot chunk",
            frame(KIND_SNAPSHOT_CHUNK, 1, b"data"),
            "SnapshotChunk",
        ),
    ];
    for (what, bytes, kind) in cases {
        let reply = arena.exchange(&bytes, true).await;
        let (code, message) = error_frame(&reply);
        assert_eq!(code, UNEXPECTED_KIND, "{what}: {message}");
        assert!(
            message.contains(&format!("cannot start with {kind}")),
            "{what}: {message}"
        );
        arena.assert_serving(what).await;
    }

    arena.stop().await;
}

use common::logs::Logs;

#[tokio::test]
async fn refusals_are_logged_with_the_peer_and_the_reason() {
    let (logs, _guard) = Logs::capture();
    let mut arena = Arena::new().await;

    let reply = arena.exchange(&noise(300), true).await;
    assert_eq!(error_frame(&reply).0, BAD_REQUEST);
    let line = logs
        .line("quic", &["refusing a request", "magic", "kind=BadRequest"])
        .await;
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("node=9"), "the line names the peer's node: {line}");
    let port = arena.endpoint.local_addr().unwrap().port();
    assert!(
        line.contains(&format!("addr=127.0.0.1:{port}")),
        "the line names the peer's address: {line}"
    );

    let (mut send, mut recv) = arena.hostile.open_bi().await.unwrap();
    send.write_all(&header(1, KIND_VOTE, 0, 1000, 1)).await.unwrap();
    send.reset(VarInt::from_u32(7)).unwrap();
    let _ = tokio::time::timeout(ANSWER, recv.read_to_end(64 << 10)).await;
    let line = logs.line("quic", &["refusing a request", "reset", "7"]).await;
    assert!(line.contains("node=9"), "{line}");

    let reply = arena.exchange(&header(1, KIND_VOTE, 0, u32::MAX, 1), false).await;
    assert_eq!(error_frame(&reply).0, TOO_LARGE);
    logs.line(
        "quic",
        &["refusing a request", "kind=TooLarge", "exceeds the limit"],
    )
    .await;

    arena.assert_serving("logged refusals").await;
    arena.stop().await;
}

/// A snapshot meta body from node 9: its committed vote at `term`, a last log id, and a
/// one-voter membership {9}.
fn snapshot_meta_body(term: u64) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&term.to_be_bytes());
    b.extend_from_slice(&9u64.to_be_bytes());
    b.push(1);
    // last_log_id: Some((term, 9), 50); last membership log id: None.
    b.push(1);
    for v in [term, 9, 50] {
        b.extend_from_slice(&v.to_be_bytes());
    }
    b.push(0);
    // One voter set {9}, and node 9's address.
    b.extend_from_slice(&1u32.to_be_bytes());
    b.extend_from_slice(&1u32.to_be_bytes());
    b.extend_from_slice(&9u64.to_be_bytes());
    b.extend_from_slice(&1u32.to_be_bytes());
    b.extend_from_slice(&9u64.to_be_bytes());
    let addr = b"127.0.0.1:9";
    b.extend_from_slice(&(addr.len() as u32).to_be_bytes());
    b.extend_from_slice(addr);
    b
}

/// The snapshot trailer body: total length and CRC32C.
fn trailer_body(length: u64, crc32c: u32) -> Vec<u8> {
    [&length.to_be_bytes()[..], &crc32c.to_be_bytes()[..]].concat()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_that_do_not_match_their_trailer_are_refused() {
    const KIND_SNAPSHOT_META: u8 = 8;
    const KIND_SNAPSHOT_END: u8 = 13;
    let mut arena = Arena::new().await;
    let data = b"0123456789abcdef".repeat(100);
    let crc = common::crc32c(&data);
    let meta = frame(KIND_SNAPSHOT_META, 0, &snapshot_meta_body(7));
    let chunk = |d: &[u8]| frame(KIND_SNAPSHOT_CHUNK, 1, d);
    let mut flipped = data.clone();
    flipped[100] ^= 1;
    let len = data.len() as u64;
    let cases = [
        (
            "a flipped bit",
            [
                meta.clone(),
                chunk(&flipped),
                frame(KIND_SNAPSHOT_END, 2, &trailer_body(len, crc)),
            ]
            .concat(),
            BAD_REQUEST,
            "checksum mismatch",
        ),
        (
            "a short transfer",
            [
                meta.clone(),
                chunk(&data[..800]),
                frame(KIND_SNAPSHOT_END, 2, &trailer_body(len, crc)),
            ]
            .concat(),
            BAD_REQUEST,
            "length mismatch",
        ),
        (
            "no trailer",
            [meta.clone(), chunk(&data)].concat(),
            BAD_REQUEST,
            "truncated",
        ),
        (
            "a second meta inside",
            [meta.clone(), chunk(&data), meta.clone()].concat(),
            UNEXPECTED_KIND,
            "inside a snapshot",
        ),
    ];
    for (what, bytes, code, needle) in cases {
        let reply = arena.exchange(&bytes, true).await;
        let (got, message) = error_frame(&reply);
        assert_eq!(got, code, "{what}: {message}");
        assert!(message.contains(needle), "{what}: {message:?} lacks {needle:?}");
        assert_eq!(
            arena.node.sm.snapshots_installed(),
            0,
            "{what}: nothing installed"
        );
        arena.assert_serving(what).await;
    }
    arena.stop().await;
}

/// A raw QUIC server holding node 1's certificate: it reads each stream's first frame and
/// answers with what `answer` makes of that frame's request id.
async fn raw_server(
    net: &Net,
    answer: fn(u64) -> Vec<u8>,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let crypto = common::raw_server_crypto(&net.ca, 1, b"raftwire/1");
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(crypto).unwrap();
    let endpoint =
        quinn::Endpoint::server(quinn::ServerConfig::with_crypto(Arc::new(crypto)), loopback()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    tokio::spawn(async move {
                        let mut head = [0u8; HEADER_LEN];
                        if recv.read_exact(&mut head).await.is_err() {
                            return;
                        }
                        let id = u64::from_be_bytes(head[10..18].try_into().unwrap());
                        let _ = send.write_all(&answer(id)).await;
                        let _ = send.finish();
                        let _ = recv.read_to_end(64 << 10).await;
                    });
                }
            });
        }
    });
    (addr, task)
}

async fn vote(
    client: &mut raftwire::Network<KvConfig, KvSnapshotData>,
) -> Result<openraft::raft::VoteResponse<KvConfig>, openraft::errors::RPCError<KvConfig>> {
    let request = VoteRequest::new(openraft::impls::Vote::new(1, 2), None);
    client.vote(request, RPCOption::new(ANSWER)).await
}

/// Node 1's vote reply at term 1, not granted.
fn vote_reply(id: u64) -> Vec<u8> {
    let mut body = vote_body(1, 1);
    body.truncate(17);
    body.extend_from_slice(&[0, 0]);
    frame(KIND_VOTE_REPLY, id, &body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_must_carry_the_request_id() {
    let net = Net::new(Transport::Quic);
    let client_of = |addr: std::net::SocketAddr| {
        let net = net.clone();
        async move {
            let mut factory =
                raftwire::NetworkFactory::<KvConfig, KvSnapshotData>::new(2, net.config(2)).unwrap();
            factory
                .new_client(
                    1,
                    &BasicNode {
                        addr: addr.to_string(),
                    },
                )
                .await
        }
    };

    // The control: the reply under the request's id (0 for a call) is taken.
    let (addr, server) = raw_server(&net, vote_reply).await;
    let mut client = client_of(addr).await;
    let resp = vote(&mut client).await.expect("a reply under the request id");
    assert_eq!(resp.vote.leader_id.node_id, 1);
    server.abort();

    // A reply under another id is a protocol error naming both ids.
    let (addr, server) = raw_server(&net, |id| vote_reply(id + 5)).await;
    let mut client = client_of(addr).await;
    let err = vote(&mut client)
        .await
        .expect_err("a reply under another id is taken");
    let text = format!("{err} | {err:?}");
    eprintln!("wrong reply id: {text}");
    assert!(
        matches!(err, openraft::errors::RPCError::Network(_)),
        "a protocol error, not {err:?}"
    );
    assert!(
        text.contains("request 0") && text.contains("request 5"),
        "the error names both ids: {text}"
    );
    server.abort();

    // An error frame may carry id 0 whatever it answers: it is the peer's refusal.
    let (addr, server) = raw_server(&net, |_| {
        let mut body = 3u16.to_be_bytes().to_vec();
        body.extend_from_slice(b"not now");
        frame(KIND_ERROR, 0, &body)
    })
    .await;
    let mut client = client_of(addr).await;
    let err = vote(&mut client).await.expect_err("an error frame is no reply");
    let text = format!("{err}");
    assert!(
        matches!(err, openraft::errors::RPCError::Unreachable(_)) && text.contains("not now"),
        "the peer's refusal: {err:?}"
    );
    server.abort();
}
