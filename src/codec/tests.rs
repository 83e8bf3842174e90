//! Codec tests: round trips of every kind, malformed frames, a deterministic property test
//! and a proof that entry payloads are neither copied on encode nor on decode.

use std::alloc::GlobalAlloc;
use std::alloc::Layout;
use std::alloc::System;
use std::cell::Cell;
use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::fmt;

use bytes::BufMut;
use bytes::Bytes;
use bytes::BytesMut;
use openraft::EntryPayload;
use openraft::LogId;
use openraft::Membership;
use openraft::StoredMembership;
use openraft::impls::BasicNode;
use openraft::impls::Entry;
use openraft::impls::Vote;
use openraft::raft::AppendEntriesRequest;
use openraft::raft::AppendEntriesResponse;
use openraft::raft::SnapshotResponse;
use openraft::raft::StreamAppendError;
use openraft::raft::TransferLeaderError;
use openraft::raft::TransferLeaderRequest;
use openraft::raft::VoteRequest;
use openraft::raft::VoteResponse;

use super::ErrorCode;
use super::FrameDecoder;
use super::FrameError;
use super::HEADER_LEN;
use super::Header;
use super::Kind;
use super::Message;
use super::decode;
use super::encode;
use crate::error::DecodeError;
use crate::error::EncodeError;
use crate::types::WireLeaderId;
use crate::wire::WireMessage;

// ---- allocation counting (this thread only, so parallel tests do not interfere) ----

struct CountingAlloc;

thread_local! {
    static ALLOCATED: Cell<u64> = const { Cell::new(0) };
}

fn note_allocation(size: usize) {
    // `try_with`: allocations during thread teardown must not panic.
    let _ = ALLOCATED.try_with(|c| c.set(c.get() + size as u64));
}

// SAFETY: every call is forwarded unchanged to `System`; counting has no effect on memory.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_allocation(layout.size());
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, passed on as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_allocation(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` through this allocator, with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_allocation(new_size);
        // SAFETY: as for `dealloc`; the caller upholds `realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static COUNTING_ALLOC: CountingAlloc = CountingAlloc;

/// Runs `f` and returns its result with the bytes allocated on this thread meanwhile.
fn allocated_during<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let before = ALLOCATED.with(Cell::get);
    let out = f();
    let after = ALLOCATED.with(Cell::get);
    (out, after - before)
}

// ---- a test type config whose payload is a zero-copy `Bytes` ----

/// Application data that is its own wire encoding. The content `b"unencodable"` fails to
/// encode, to exercise encode errors.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Payload(Bytes);

impl fmt::Display for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "payload of {} bytes", self.0.len())
    }
}

impl WireMessage for Payload {
    fn encode(&self) -> Result<Bytes, EncodeError> {
        if self.0.as_ref() == b"unencodable" {
            return Err(EncodeError("refused by the test".to_string()));
        }
        Ok(self.0.clone())
    }

    fn decode(bytes: Bytes) -> Result<Self, DecodeError> {
        Ok(Payload(bytes))
    }
}

openraft::declare_raft_types!(
    TestConfig:
        D = Payload,
        R = Payload,
        Node = BasicNode,
);

type Msg = Message<TestConfig>;
type TestEntry = Entry<WireLeaderId, EntryPayload<Payload, u64, BasicNode>>;

const MAX: usize = 16 << 20;

// ---- builders ----

fn leader(term: u64, node_id: u64) -> WireLeaderId {
    WireLeaderId { term, node_id }
}

fn log_id(term: u64, node_id: u64, index: u64) -> LogId<WireLeaderId> {
    LogId {
        leader_id: leader(term, node_id),
        index,
    }
}

fn vote(term: u64, node_id: u64, committed: bool) -> Vote<WireLeaderId> {
    Vote {
        leader_id: leader(term, node_id),
        committed,
    }
}

fn node(id: u64) -> BasicNode {
    BasicNode {
        addr: format!("10.0.0.{id}:5001"),
    }
}

fn membership(configs: &[&[u64]], learners: &[u64]) -> Membership<u64, BasicNode> {
    let configs: Vec<BTreeSet<u64>> = configs.iter().map(|c| c.iter().copied().collect()).collect();
    let nodes: BTreeMap<u64, BasicNode> = configs
        .iter()
        .flatten()
        .chain(learners)
        .map(|id| (*id, node(*id)))
        .collect();
    Membership::new(configs, nodes).expect("valid membership")
}

fn normal(index: u64, data: &'static [u8]) -> TestEntry {
    Entry {
        log_id: log_id(2, 1, index),
        payload: EntryPayload::Normal(Payload(Bytes::from_static(data))),
    }
}

fn append(entries: Vec<TestEntry>) -> AppendEntriesRequest<TestConfig> {
    AppendEntriesRequest {
        vote: vote(2, 1, true),
        prev_log_id: Some(log_id(1, 1, 9)),
        entries,
        leader_commit: Some(log_id(1, 1, 8)),
    }
}

/// At least one message of every kind, and every reply variant.
fn samples() -> Vec<Msg> {
    let entries = || {
        vec![
            Entry {
                log_id: log_id(2, 1, 10),
                payload: EntryPayload::Blank,
            },
            normal(11, b"set x = 1"),
            normal(12, b""),
            Entry {
                log_id: log_id(2, 1, 13),
                payload: EntryPayload::Membership(membership(&[&[1, 2], &[1, 2, 3]], &[7])),
            },
        ]
    };
    let vote_request = VoteRequest {
        vote: vote(3, 2, false),
        last_log_id: Some(log_id(2, 1, 13)),
        leadership_transfer: true,
    };
    vec![
        Message::Vote(vote_request.clone()),
        Message::PreVote(VoteRequest {
            last_log_id: None,
            leadership_transfer: false,
            ..vote_request
        }),
        Message::VoteReply(VoteResponse {
            vote: vote(3, 2, false),
            vote_granted: true,
            last_log_id: Some(log_id(2, 1, 12)),
        }),
        Message::VoteReply(VoteResponse {
            vote: vote(4, 3, true),
            vote_granted: false,
            last_log_id: None,
        }),
        Message::Append(append(entries())),
        Message::Append(AppendEntriesRequest {
            vote: vote(1, 1, true),
            prev_log_id: None,
            entries: vec![],
            leader_commit: None,
        }),
        Message::AppendReply(AppendEntriesResponse::Success),
        Message::AppendReply(AppendEntriesResponse::PartialSuccess(Some(log_id(2, 1, 11)))),
        Message::AppendReply(AppendEntriesResponse::PartialSuccess(None)),
        Message::AppendReply(AppendEntriesResponse::Conflict),
        Message::AppendReply(AppendEntriesResponse::HigherVote(vote(5, 3, true))),
        Message::StreamAppend(append(entries())),
        Message::StreamAppendReply(Ok(Some(log_id(2, 1, 13)))),
        Message::StreamAppendReply(Ok(None)),
        Message::StreamAppendReply(Err(StreamAppendError::Conflict(log_id(1, 1, 9)))),
        Message::StreamAppendReply(Err(StreamAppendError::HigherVote(vote(6, 2, false)))),
        Message::SnapshotMeta {
            vote: vote(2, 1, true),
            meta: openraft::SnapshotMeta {
                last_log_id: Some(log_id(2, 1, 100)),
                last_membership: StoredMembership::new(
                    Some(log_id(2, 1, 13)),
                    membership(&[&[1, 2, 3]], &[4]),
                ),
            },
        },
        Message::SnapshotMeta {
            vote: vote(1, 1, true),
            meta: openraft::SnapshotMeta {
                last_log_id: None,
                last_membership: StoredMembership::default(),
            },
        },
        Message::SnapshotChunk(Bytes::from_static(b"snapshot bytes")),
        Message::SnapshotChunk(Bytes::new()),
        Message::SnapshotEnd(crate::snapshot::Trailer {
            length: 1 << 40,
            crc32c: 0xdead_beef,
        }),
        Message::SnapshotAck(SnapshotResponse {
            vote: vote(2, 1, true),
        }),
        Message::TransferLeader(TransferLeaderRequest::new(
            vote(2, 1, true),
            3,
            Some(log_id(2, 1, 13)),
        )),
        Message::TransferLeader(TransferLeaderRequest::new(vote(2, 1, true), 2, None)),
        Message::TransferLeaderReply(Ok(())),
        Message::TransferLeaderReply(Err(TransferLeaderError::VoteChanged {
            expected: vote(2, 1, true),
            actual: vote(3, 2, false),
        })),
        Message::TransferLeaderReply(Err(TransferLeaderError::LogNotFlushed {
            expected: Some(log_id(2, 1, 13)),
            actual: None,
        })),
        Message::Error {
            code: ErrorCode::Refused,
            message: "raft stopped: ünïcode is fine".to_string(),
        },
        Message::Error {
            code: ErrorCode::BadRequest,
            message: String::new(),
        },
        Message::End,
    ]
}

/// Compares two messages; `AppendEntriesRequest` has no `PartialEq`, so field by field.
fn assert_same(got: &Msg, want: &Msg) {
    let same_append = |a: &AppendEntriesRequest<TestConfig>, b: &AppendEntriesRequest<TestConfig>| {
        assert_eq!(a.vote, b.vote);
        assert_eq!(a.prev_log_id, b.prev_log_id);
        assert_eq!(a.leader_commit, b.leader_commit);
        assert_eq!(a.entries, b.entries);
    };
    match (got, want) {
        (Message::Vote(a), Message::Vote(b)) | (Message::PreVote(a), Message::PreVote(b)) => {
            assert_eq!(a, b)
        }
        (Message::VoteReply(a), Message::VoteReply(b)) => assert_eq!(a, b),
        (Message::Append(a), Message::Append(b)) | (Message::StreamAppend(a), Message::StreamAppend(b)) => {
            same_append(a, b)
        }
        (Message::AppendReply(a), Message::AppendReply(b)) => assert_eq!(a, b),
        (Message::StreamAppendReply(a), Message::StreamAppendReply(b)) => assert_eq!(a, b),
        (Message::SnapshotMeta { vote: va, meta: ma }, Message::SnapshotMeta { vote: vb, meta: mb }) => {
            assert_eq!(va, vb);
            assert_eq!(ma, mb);
        }
        (Message::SnapshotChunk(a), Message::SnapshotChunk(b)) => assert_eq!(a, b),
        (Message::SnapshotAck(a), Message::SnapshotAck(b)) => assert_eq!(a, b),
        (Message::SnapshotEnd(a), Message::SnapshotEnd(b)) => assert_eq!(a, b),
        (Message::TransferLeader(a), Message::TransferLeader(b)) => assert_eq!(a, b),
        (Message::TransferLeaderReply(a), Message::TransferLeaderReply(b)) => assert_eq!(a, b),
        (Message::End, Message::End) => {}
        (
            Message::Error {
                code: ca,
                message: ma,
            },
            Message::Error {
                code: cb,
                message: mb,
            },
        ) => {
            assert_eq!(ca, cb);
            assert_eq!(ma, mb);
        }
        _ => panic!("got {got:?}, want {want:?}"),
    }
}

fn encode_to_chunks(request_id: u64, msg: &Msg) -> (Vec<Bytes>, usize) {
    let mut chunks = Vec::new();
    let size = encode(request_id, msg, MAX, &mut chunks).expect("encodes");
    (chunks, size)
}

fn concat(chunks: &[Bytes]) -> BytesMut {
    let mut buf = BytesMut::new();
    for c in chunks {
        buf.extend_from_slice(c);
    }
    buf
}

/// Encodes, concatenates, cuts the frame out and decodes it.
fn round_trip(request_id: u64, msg: &Msg) -> Msg {
    let (chunks, size) = encode_to_chunks(request_id, msg);
    let mut buf = concat(&chunks);
    assert_eq!(buf.len(), size, "reported size of {msg:?}");
    let (header, body) = FrameDecoder::new(MAX)
        .decode(&mut buf)
        .expect("valid frame")
        .expect("whole frame");
    assert!(buf.is_empty(), "one frame, nothing left");
    assert_eq!(header.kind, msg.kind());
    assert_eq!(header.flags, 0);
    assert_eq!(header.request_id, request_id);
    assert_eq!(header.len as usize + HEADER_LEN, size);
    decode::<TestConfig>(&header, body).expect("decodes")
}

/// The 18 header bytes, any field chosen.
fn raw_header(magic: [u8; 2], version: u8, kind: u8, flags: u16, len: u32) -> BytesMut {
    let mut b = BytesMut::new();
    b.put_slice(&magic);
    b.put_u8(version);
    b.put_u8(kind);
    b.put_u16(flags);
    b.put_u32(len);
    b.put_u64(42);
    b
}

/// Decodes `body` as `kind`, expecting a body error; returns its field path.
fn body_error(kind: Kind, body: Bytes) -> DecodeError {
    let header = Header {
        kind,
        flags: 0,
        len: body.len() as u32,
        request_id: 1,
    };
    match decode::<TestConfig>(&header, body) {
        Err(FrameError::Body { kind: k, source }) => {
            assert_eq!(k, kind);
            assert_eq!(
                FrameError::Body {
                    kind: k,
                    source: source.clone()
                }
                .error_code(),
                ErrorCode::BadRequest
            );
            source
        }
        other => panic!("expected a body error, got {other:?}"),
    }
}

/// The body of `msg` alone.
fn body_of(msg: &Msg) -> BytesMut {
    let (chunks, _) = encode_to_chunks(1, msg);
    let mut buf = concat(&chunks);
    let _ = buf.split_to(HEADER_LEN);
    buf
}

// ---- round trips ----

#[test]
fn round_trip_every_kind() {
    let samples = samples();
    let kinds: BTreeSet<u8> = samples.iter().map(|m| m.kind() as u8).collect();
    assert_eq!(kinds.len(), 15, "every kind is sampled: {kinds:?}");
    for (i, msg) in samples.iter().enumerate() {
        let got = round_trip(i as u64 * 1_000_003, msg);
        assert_same(&got, msg);
    }
}

#[test]
fn header_round_trip() {
    for v in 0..=u8::MAX {
        let Ok(kind) = Kind::try_from(v) else { continue };
        assert_eq!(kind as u8, v);
        let header = Header {
            kind,
            flags: 0,
            len: 0x0102_0304,
            request_id: u64::MAX - u64::from(v),
        };
        let mut buf = BytesMut::new();
        header.encode(&mut buf);
        assert_eq!(buf.len(), HEADER_LEN);
        assert_eq!(&buf[..4], &[b'R', b'W', 1, v]);
        assert_eq!(Header::parse(&buf, u32::MAX as usize, 0).unwrap(), Some(header));
    }
}

#[test]
fn decoder_fed_one_byte_at_a_time() {
    let samples = samples();
    let mut stream = Vec::new();
    for (i, msg) in samples.iter().enumerate() {
        stream.extend_from_slice(&concat(&encode_to_chunks(i as u64, msg).0));
    }
    let mut decoder = FrameDecoder::new(MAX);
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    for byte in stream {
        buf.put_u8(byte);
        while let Some((header, body)) = decoder.decode(&mut buf).expect("valid stream") {
            got.push((header, decode::<TestConfig>(&header, body).expect("decodes")));
        }
    }
    assert!(buf.is_empty());
    assert_eq!(got.len(), samples.len());
    for (i, ((header, msg), want)) in got.iter().zip(&samples).enumerate() {
        assert_eq!(header.request_id, i as u64);
        assert_same(msg, want);
    }
}

#[test]
fn payloads_travel_as_their_own_chunks() {
    let a = Bytes::from(vec![0xAA; 5000]);
    let b = Bytes::from(vec![0xBB; 9000]);
    let msg = Message::Append(append(vec![
        Entry {
            log_id: log_id(2, 1, 10),
            payload: EntryPayload::Normal(Payload(a.clone())),
        },
        Entry {
            log_id: log_id(2, 1, 11),
            payload: EntryPayload::Normal(Payload(b.clone())),
        },
    ]));
    let (chunks, size) = encode_to_chunks(5, &msg);
    // header + fixed fields, payload a, entry 2's fixed fields, payload b.
    assert_eq!(chunks.len(), 4, "{chunks:?}");
    assert_eq!(chunks[1].as_ptr(), a.as_ptr());
    assert_eq!(chunks[3].as_ptr(), b.as_ptr());
    assert_eq!(chunks.iter().map(Bytes::len).sum::<usize>(), size);

    let data = Bytes::from(vec![7u8; 5000]);
    let (chunks, _) = encode_to_chunks(6, &Message::SnapshotChunk(data.clone()));
    assert_eq!(chunks.len(), 2);
    assert_eq!(chunks[0].len(), HEADER_LEN);
    assert_eq!(chunks[1].as_ptr(), data.as_ptr());
}

#[test]
fn small_payloads_are_copied_in_line() {
    let small = Bytes::from(vec![0xCC; 64]);
    let msg = Message::Append(append(vec![Entry {
        log_id: log_id(2, 1, 10),
        payload: EntryPayload::Normal(Payload(small.clone())),
    }]));
    let (chunks, size) = encode_to_chunks(5, &msg);
    assert_eq!(
        chunks.len(),
        1,
        "a 64-byte payload rides with the fixed fields: {chunks:?}"
    );
    assert_eq!(chunks[0].len(), size);
    let mut buf = BytesMut::from(&chunks[0][..]);
    let (header, body) = FrameDecoder::new(MAX).decode(&mut buf).unwrap().unwrap();
    let Message::Append(back) = decode::<TestConfig>(&header, body).unwrap() else {
        panic!("not an append")
    };
    assert!(matches!(&back.entries[0].payload, EntryPayload::Normal(p) if p.0 == small));
}

// ---- malformed input ----

#[test]
fn read_incomplete_head() {
    let (chunks, _) = encode_to_chunks(9, &Message::SnapshotChunk(Bytes::from_static(b"0123456789")));
    let frame = concat(&chunks);
    for n in 0..HEADER_LEN {
        assert_eq!(Header::parse(&frame[..n], MAX, 0).unwrap(), None);
        let mut buf = BytesMut::from(&frame[..n]);
        assert!(FrameDecoder::new(MAX).decode(&mut buf).unwrap().is_none());
        assert_eq!(buf.len(), n, "nothing consumed");
    }
}

#[test]
fn read_incomplete_body() {
    let (chunks, _) = encode_to_chunks(9, &Message::SnapshotChunk(Bytes::from_static(b"0123456789")));
    let frame = concat(&chunks);
    let mut decoder = FrameDecoder::new(MAX);
    let mut buf = BytesMut::from(&frame[..HEADER_LEN + 4]);
    assert!(decoder.decode(&mut buf).unwrap().is_none());
    // The header was consumed once; only body bytes remain buffered.
    assert_eq!(&buf[..], b"0123");
    assert!(decoder.decode(&mut buf).unwrap().is_none());
    buf.extend_from_slice(&frame[HEADER_LEN + 4..]);
    let (header, body) = decoder.decode(&mut buf).unwrap().unwrap();
    assert_eq!(header.kind, Kind::SnapshotChunk);
    assert_eq!(header.request_id, 9);
    assert_eq!(&body[..], b"0123456789");
    assert!(buf.is_empty());
}

#[test]
fn oversized_length_is_refused_before_reserving() {
    let max = 1 << 20;
    let mut buf = raw_header(*b"RW", 1, Kind::SnapshotChunk as u8, 0, 5_000_000);
    let capacity = buf.capacity();
    let mut decoder = FrameDecoder::new(max);
    let (result, allocated) = allocated_during(|| decoder.decode(&mut buf));
    let err = result.unwrap_err();
    assert!(
        matches!(
            err,
            FrameError::TooLarge {
                len: 5_000_000,
                max: 1_048_576
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "frame of 5000000 bytes exceeds the limit of 1048576"
    );
    assert_eq!(err.error_code(), ErrorCode::TooLarge);
    assert_eq!(buf.capacity(), capacity, "nothing reserved");
    assert!(allocated < 4096, "allocated {allocated} bytes");
}

#[test]
fn reserves_only_the_current_frame() {
    let mut buf = raw_header(*b"RW", 1, Kind::SnapshotChunk as u8, 0, 100_000);
    let mut decoder = FrameDecoder::new(1 << 20);
    assert!(decoder.decode(&mut buf).unwrap().is_none());
    assert!(buf.capacity() >= 100_000);
    assert!(buf.capacity() < 1 << 20, "capacity {}", buf.capacity());
}

#[test]
fn a_large_announced_body_is_reserved_only_as_it_arrives() {
    let max = 64 << 20;
    let mut buf = raw_header(*b"RW", 1, Kind::SnapshotChunk as u8, 0, max as u32);
    let mut decoder = FrameDecoder::new(max);
    assert!(decoder.decode(&mut buf).unwrap().is_none());
    assert!(
        buf.capacity() <= 2 << 20,
        "reserved {} bytes for nothing sent",
        buf.capacity()
    );
    buf.extend_from_slice(&vec![0u8; 2 << 20]);
    assert!(decoder.decode(&mut buf).unwrap().is_none());
    assert!(
        buf.capacity() >= max,
        "the rest of a frame in progress is reserved at once"
    );
}

#[test]
fn unknown_kind() {
    for kind in [0u8, 16, 17, 255] {
        let buf = raw_header(*b"RW", 1, kind, 0, 0);
        let err = Header::parse(&buf, MAX, 0).unwrap_err();
        assert!(matches!(err, FrameError::UnknownKind(k) if k == kind), "{err:?}");
        assert_eq!(err.error_code(), ErrorCode::BadRequest);
        assert_eq!(Kind::try_from(kind), Err(kind));
    }
}

#[test]
fn unknown_version() {
    let mut buf = raw_header(*b"RW", 2, Kind::Vote as u8, 0, 0);
    let err = FrameDecoder::new(MAX).decode(&mut buf).unwrap_err();
    assert!(matches!(err, FrameError::UnsupportedVersion(2)), "{err:?}");
    assert_eq!(err.error_code(), ErrorCode::BadRequest);
}

#[test]
fn bad_magic() {
    let mut buf = raw_header(*b"GE", 1, Kind::Vote as u8, 0, 0);
    let err = FrameDecoder::new(MAX).decode(&mut buf).unwrap_err();
    assert!(matches!(err, FrameError::BadMagic([b'G', b'E'])), "{err:?}");
    assert_eq!(err.error_code(), ErrorCode::BadRequest);
}

#[test]
fn reserved_flags() {
    let mut buf = raw_header(*b"RW", 1, Kind::Vote as u8, 0x0001, 0);
    let err = FrameDecoder::new(MAX).decode(&mut buf).unwrap_err();
    assert!(matches!(err, FrameError::ReservedFlags(1)), "{err:?}");
    assert_eq!(err.error_code(), ErrorCode::BadRequest);
}

#[test]
fn trailing_bytes() {
    let ack = Message::SnapshotAck(SnapshotResponse {
        vote: vote(2, 1, true),
    });
    let mut body = body_of(&ack);
    body.put_u8(0);
    let err = body_error(Kind::SnapshotAck, body.freeze());
    assert_eq!(err.field(), "body");
    assert!(err.to_string().contains("1 bytes left over"), "{err}");
}

#[test]
fn body_length_must_match_the_header() {
    let header = Header {
        kind: Kind::SnapshotChunk,
        flags: 0,
        len: 5,
        request_id: 1,
    };
    let err = decode::<TestConfig>(&header, Bytes::from_static(b"abc")).unwrap_err();
    assert!(matches!(err, FrameError::Body { .. }), "{err:?}");
}

#[test]
fn truncated_body_names_the_field() {
    let blank = Entry {
        log_id: log_id(2, 1, 13),
        payload: EntryPayload::Blank,
    };
    let entries = vec![
        normal(10, b"0123456789"),
        normal(11, b"0123456789"),
        normal(12, b"0123456789"),
        blank,
    ];
    let body = body_of(&Message::Append(append(entries))).freeze();
    // vote 17, prev_log_id 25, leader_commit 25, count 4; a normal entry with 10 bytes of
    // data is 24 + 1 + 4 + 10 = 39 bytes, a blank one 25.
    assert_eq!(body.len(), 71 + 3 * 39 + 25);
    let entry2 = 71 + 2 * 39;
    let entry3 = 71 + 3 * 39;
    let cases = [
        (0, "vote.term"),
        (10, "vote.node_id"),
        (16, "vote.committed"),
        (17, "prev_log_id.tag"),
        (30, "prev_log_id.node_id"),
        (42, "leader_commit.tag"),
        (67, "entries"),
        (entry2 + 26, "entries[2].normal.len"),
        (entry2 + 31, "entries[2].normal"),
        (entry3 + 20, "entries[3].log_id.index"),
        (entry3 + 24, "entries[3].payload"),
    ];
    for (cut, field) in cases {
        let err = body_error(Kind::Append, body.slice(..cut));
        assert_eq!(err.field(), field, "cut at {cut}: {err}");
    }
    // The entry count promises more entries than the bytes left can hold.
    let err = body_error(Kind::Append, body.slice(..71 + 50));
    assert_eq!(err.field(), "entries");
    assert!(
        err.to_string()
            .contains("4 items cannot fit in the 50 bytes left"),
        "{err}"
    );
}

#[test]
fn invalid_values_name_the_field() {
    let msg = Message::Append(append(vec![normal(10, b"abc")]));
    let body = body_of(&msg);
    let patched = |offset: usize, value: u8| {
        let mut b = body.clone();
        b[offset] = value;
        b.freeze()
    };
    let err = body_error(Kind::Append, patched(16, 2));
    assert_eq!(err.field(), "vote.committed");
    let err = body_error(Kind::Append, patched(17, 7));
    assert_eq!(err.field(), "prev_log_id.tag");
    let err = body_error(Kind::Append, patched(71 + 24, 9));
    assert_eq!(err.field(), "entries[0].payload");
    // Payload length larger than what is left.
    let err = body_error(Kind::Append, patched(71 + 25 + 3, 200));
    assert_eq!(err.field(), "entries[0].normal");

    let reply = body_error(Kind::StreamAppendReply, Bytes::from_static(&[3]));
    assert_eq!(reply.field(), "result");
    let reply = body_error(Kind::AppendReply, Bytes::from_static(&[4]));
    assert_eq!(reply.field(), "result");
    let reply = body_error(Kind::TransferLeaderReply, Bytes::from_static(&[1, 0, 0]));
    assert_eq!(reply.field(), "vote_changed.expected.term");
}

/// A snapshot meta body with the given membership part.
fn snapshot_meta_body(membership: impl FnOnce(&mut BytesMut)) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u64(2);
    b.put_u64(1);
    b.put_u8(1);
    b.put_u8(0);
    b.put_u8(0);
    membership(&mut b);
    b.freeze()
}

fn put_node(b: &mut BytesMut, id: u64, addr: &str) {
    b.put_u64(id);
    b.put_u32(addr.len() as u32);
    b.put_slice(addr.as_bytes());
}

#[test]
fn invalid_membership_is_refused() {
    // A voter without a node.
    let body = snapshot_meta_body(|b| {
        b.put_u32(1);
        b.put_u32(2);
        b.put_u64(1);
        b.put_u64(2);
        b.put_u32(1);
        put_node(b, 1, "a:1");
    });
    let err = body_error(Kind::SnapshotMeta, body);
    assert_eq!(err.field(), "last_membership");

    // A node listed twice.
    let body = snapshot_meta_body(|b| {
        b.put_u32(1);
        b.put_u32(1);
        b.put_u64(1);
        b.put_u32(2);
        put_node(b, 1, "a:1");
        put_node(b, 1, "b:1");
    });
    let err = body_error(Kind::SnapshotMeta, body);
    assert_eq!(err.field(), "last_membership.nodes[1].id");

    // A voter listed twice in one set.
    let body = snapshot_meta_body(|b| {
        b.put_u32(1);
        b.put_u32(2);
        b.put_u64(1);
        b.put_u64(1);
        b.put_u32(1);
        put_node(b, 1, "a:1");
    });
    let err = body_error(Kind::SnapshotMeta, body);
    assert_eq!(err.field(), "last_membership.configs[0].ids[1]");

    // A node description that is not UTF-8.
    let body = snapshot_meta_body(|b| {
        b.put_u32(0);
        b.put_u32(1);
        b.put_u64(1);
        b.put_u32(1);
        b.put_u8(0xFF);
    });
    let err = body_error(Kind::SnapshotMeta, body);
    assert_eq!(err.field(), "last_membership.nodes[0].node.addr.string");

    // Counts the body cannot hold.
    let body = snapshot_meta_body(|b| b.put_u32(u32::MAX));
    let err = body_error(Kind::SnapshotMeta, body);
    assert_eq!(err.field(), "last_membership.configs");
}

#[test]
fn error_frames_and_codes() {
    for v in 0..=u16::MAX {
        if let Ok(code) = ErrorCode::try_from(v) {
            assert_eq!(code as u16, v);
        }
    }
    assert_eq!(ErrorCode::try_from(9), Err(9));

    let err = body_error(Kind::Error, Bytes::from_static(&[0, 99, b'x']));
    assert_eq!(err.field(), "code");
    let err = body_error(Kind::Error, Bytes::from_static(&[0, 1, 0xC3]));
    assert_eq!(err.field(), "message");

    let encode_err = FrameError::from(EncodeError("nope".to_string()));
    assert_eq!(encode_err.error_code(), ErrorCode::Internal);
}

#[test]
fn encode_too_large_emits_nothing() {
    let mut out = vec![Bytes::from_static(b"earlier frame")];
    let msg: Msg = Message::SnapshotChunk(Bytes::from(vec![0u8; 20_000]));
    let err = encode(1, &msg, 10_000, &mut out).unwrap_err();
    assert!(
        matches!(
            err,
            FrameError::TooLarge {
                len: 20_000,
                max: 10_000
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.error_code(), ErrorCode::TooLarge);
    assert_eq!(out, vec![Bytes::from_static(b"earlier frame")]);

    // Exactly at the limit is fine.
    let msg: Msg = Message::SnapshotChunk(Bytes::from(vec![0u8; 10_000]));
    assert_eq!(encode(1, &msg, 10_000, &mut out).unwrap(), 10_000 + HEADER_LEN);
    assert_eq!(out.len(), 3);

    // Many entries: refused once the body passes the limit.
    let msg = Message::Append(append((0..100).map(|i| normal(i, &[1u8; 100])).collect()));
    let mut out = Vec::new();
    let err = encode(1, &msg, 5000, &mut out).unwrap_err();
    assert!(matches!(err, FrameError::TooLarge { max: 5000, .. }), "{err:?}");
    assert!(out.is_empty());
}

#[test]
fn encode_error_emits_nothing() {
    let msg = Message::StreamAppend(append(vec![normal(10, b"fine"), normal(11, b"unencodable")]));
    let mut out = Vec::new();
    let err = encode(1, &msg, MAX, &mut out).unwrap_err();
    assert!(matches!(err, FrameError::Encode(_)), "{err:?}");
    assert_eq!(err.error_code(), ErrorCode::Internal);
    assert!(out.is_empty());
}

// ---- deterministic property test ----

/// xorshift64*: tiny, deterministic, good enough to pick shapes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bool(&mut self) -> bool {
        self.next() & 1 == 1
    }

    fn u64(&mut self) -> u64 {
        // Mix small and extreme values.
        match self.below(4) {
            0 => 0,
            1 => u64::MAX,
            2 => self.below(100),
            _ => self.next(),
        }
    }

    fn bytes(&mut self, max: u64) -> Bytes {
        let n = self.below(max + 1);
        (0..n).map(|_| self.next() as u8).collect::<Vec<u8>>().into()
    }

    fn log_id(&mut self) -> LogId<WireLeaderId> {
        log_id(self.u64(), self.u64(), self.u64())
    }

    fn opt_log_id(&mut self) -> Option<LogId<WireLeaderId>> {
        self.bool().then(|| self.log_id())
    }

    fn vote(&mut self) -> Vote<WireLeaderId> {
        vote(self.u64(), self.u64(), self.bool())
    }

    fn membership(&mut self) -> Membership<u64, BasicNode> {
        if self.below(8) == 0 {
            return Membership::default();
        }
        let mut configs = Vec::new();
        let mut nodes = BTreeMap::new();
        for _ in 0..=self.below(2) {
            let mut set = BTreeSet::new();
            for _ in 0..=self.below(4) {
                set.insert(self.below(8));
            }
            configs.push(set);
        }
        let learners: Vec<u64> = (0..self.below(3)).map(|_| self.u64()).collect();
        for id in configs.iter().flatten().copied().chain(learners) {
            let addr = format!("host-{}:{}", self.below(1000), self.below(65536));
            nodes.insert(id, BasicNode { addr });
        }
        Membership::new(configs, nodes).expect("valid membership")
    }

    fn entry(&mut self) -> TestEntry {
        let payload = match self.below(4) {
            0 => EntryPayload::Blank,
            1 => EntryPayload::Membership(self.membership()),
            _ => EntryPayload::Normal(Payload(self.bytes(300))),
        };
        Entry {
            log_id: self.log_id(),
            payload,
        }
    }

    fn append(&mut self) -> AppendEntriesRequest<TestConfig> {
        let n = self.below(12);
        AppendEntriesRequest {
            vote: self.vote(),
            prev_log_id: self.opt_log_id(),
            entries: (0..n).map(|_| self.entry()).collect(),
            leader_commit: self.opt_log_id(),
        }
    }

    fn message(&mut self) -> Msg {
        match self.below(13) {
            0 | 1 => {
                let r = VoteRequest {
                    vote: self.vote(),
                    last_log_id: self.opt_log_id(),
                    leadership_transfer: self.bool(),
                };
                if self.bool() {
                    Message::Vote(r)
                } else {
                    Message::PreVote(r)
                }
            }
            2 => Message::VoteReply(VoteResponse {
                vote: self.vote(),
                vote_granted: self.bool(),
                last_log_id: self.opt_log_id(),
            }),
            3 => Message::Append(self.append()),
            4 => Message::AppendReply(match self.below(4) {
                0 => AppendEntriesResponse::Success,
                1 => AppendEntriesResponse::PartialSuccess(self.opt_log_id()),
                2 => AppendEntriesResponse::Conflict,
                _ => AppendEntriesResponse::HigherVote(self.vote()),
            }),
            5 => Message::StreamAppend(self.append()),
            6 => Message::StreamAppendReply(match self.below(3) {
                0 => Ok(self.opt_log_id()),
                1 => Err(StreamAppendError::Conflict(self.log_id())),
                _ => Err(StreamAppendError::HigherVote(self.vote())),
            }),
            7 => Message::SnapshotMeta {
                vote: self.vote(),
                meta: openraft::SnapshotMeta {
                    last_log_id: self.opt_log_id(),
                    last_membership: StoredMembership::new(self.opt_log_id(), self.membership()),
                },
            },
            8 => Message::SnapshotChunk(self.bytes(2000)),
            9 => Message::SnapshotAck(SnapshotResponse { vote: self.vote() }),
            10 => Message::TransferLeader(TransferLeaderRequest::new(
                self.vote(),
                self.u64(),
                self.opt_log_id(),
            )),
            11 => Message::TransferLeaderReply(match self.below(3) {
                0 => Ok(()),
                1 => Err(TransferLeaderError::VoteChanged {
                    expected: self.vote(),
                    actual: self.vote(),
                }),
                _ => Err(TransferLeaderError::LogNotFlushed {
                    expected: self.opt_log_id(),
                    actual: self.opt_log_id(),
                }),
            }),
            _ => {
                let code = ErrorCode::try_from(1 + self.below(5) as u16).unwrap();
                let message = (0..self.below(40))
                    .map(|_| char::from_u32(0x20 + self.below(0x3000) as u32).unwrap_or('?'))
                    .collect();
                Message::Error { code, message }
            }
        }
    }
}

#[test]
fn property_random_frames_round_trip() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let messages: Vec<(u64, Msg)> = (0..500).map(|_| (rng.next(), rng.message())).collect();

    // One frame at a time.
    let mut stream = Vec::new();
    for (request_id, msg) in &messages {
        let got = round_trip(*request_id, msg);
        assert_same(&got, msg);
        stream.extend_from_slice(&concat(&encode_to_chunks(*request_id, msg).0));
    }

    // All of them as one stream, arriving in pieces of random size.
    let mut decoder = FrameDecoder::new(MAX);
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    let mut rest = &stream[..];
    while !rest.is_empty() {
        let n = (1 + rng.below(700) as usize).min(rest.len());
        buf.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        while let Some((header, body)) = decoder.decode(&mut buf).expect("valid stream") {
            got.push((
                header.request_id,
                decode::<TestConfig>(&header, body).expect("decodes"),
            ));
        }
    }
    assert!(buf.is_empty());
    assert_eq!(got.len(), messages.len());
    for ((id, msg), (want_id, want)) in got.iter().zip(&messages) {
        assert_eq!(id, want_id);
        assert_same(msg, want);
    }
}

// ---- zero copy ----

#[test]
fn zero_copy_append_of_32_entries_of_64_kib() {
    const ENTRIES: usize = 32;
    const SIZE: usize = 64 << 10;
    const BUDGET: u64 = 64 << 10;
    let payloads: Vec<Bytes> = (0..ENTRIES).map(|i| Bytes::from(vec![i as u8; SIZE])).collect();
    let entries = payloads
        .iter()
        .enumerate()
        .map(|(i, p)| Entry {
            log_id: log_id(3, 1, 100 + i as u64),
            payload: EntryPayload::Normal(Payload(p.clone())),
        })
        .collect();
    let msg: Msg = Message::Append(append(entries));

    // The counter sees this thread's allocations.
    let (copy, counted) = allocated_during(|| payloads[0].to_vec());
    assert!(
        counted >= SIZE as u64,
        "counted {counted} bytes for a {}-byte copy",
        copy.len()
    );

    let mut chunks = Vec::new();
    let (size, allocated) = allocated_during(|| encode(77, &msg, MAX, &mut chunks));
    let size = size.expect("encodes");
    assert!(size > ENTRIES * SIZE);
    eprintln!("encode allocated {allocated} bytes");
    assert!(allocated < BUDGET, "encode allocated {allocated} bytes");
    for p in &payloads {
        assert!(
            chunks
                .iter()
                .any(|c| c.as_ptr() == p.as_ptr() && c.len() == p.len()),
            "payload copied"
        );
    }

    let mut rx = concat(&chunks);
    let rx_start = rx.as_ptr() as usize;
    let rx_range = rx_start..rx_start + rx.len();
    let mut decoder = FrameDecoder::new(MAX);
    let (decoded, allocated) = allocated_during(|| {
        let (header, body) = decoder.decode(&mut rx).expect("valid").expect("whole frame");
        decode::<TestConfig>(&header, body)
    });
    let decoded = decoded.expect("decodes");
    eprintln!("decode allocated {allocated} bytes");
    assert!(allocated < BUDGET, "decode allocated {allocated} bytes");

    let Message::Append(req) = &decoded else {
        panic!("got {decoded:?}")
    };
    assert_eq!(req.entries.len(), ENTRIES);
    for (entry, want) in req.entries.iter().zip(&payloads) {
        let EntryPayload::Normal(Payload(data)) = &entry.payload else {
            panic!("not a normal entry: {entry:?}")
        };
        assert_eq!(data, want);
        let ptr = data.as_ptr() as usize;
        assert!(
            rx_range.contains(&ptr) && rx_range.contains(&(ptr + data.len() - 1)),
            "payload is not a slice of the receive buffer"
        );
    }
    assert_same(&decoded, &msg);
}

// ---- compression (feature `compression`) ----

#[cfg(feature = "compression")]
mod compression {
    use super::*;
    use crate::codec::Compressor;
    use crate::codec::FLAG_ZSTD;
    use crate::config::Compression;

    fn zstd(min_size: usize) -> Compressor {
        Compressor::new(Compression::Zstd { level: 1, min_size }).expect("compression on")
    }

    /// `msg` encoded and passed through `compressor`: the frame's bytes and size as sent.
    fn compressed(compressor: &mut Compressor, msg: &Msg) -> (BytesMut, usize) {
        let (mut chunks, size) = encode_to_chunks(5, msg);
        let size = compressor.frame(&mut chunks, 0, size).expect("compresses");
        let buf = concat(&chunks);
        assert_eq!(buf.len(), size);
        (buf, size)
    }

    /// A 64 KiB payload of repeated JSON-like text.
    fn text() -> &'static [u8] {
        let line = b"{\"user\":1234,\"name\":\"raftwire\",\"tags\":[\"a\",\"b\"]},";
        let text: Vec<u8> = line.iter().copied().cycle().take(64 << 10).collect();
        Box::leak(text.into_boxed_slice())
    }

    #[test]
    fn large_appends_and_snapshot_chunks_shrink_and_decode_the_same() {
        let mut compressor = zstd(4096);
        for msg in [
            Message::StreamAppend(append(vec![normal(11, text()), normal(12, text())])),
            Message::Append(append(vec![normal(11, text())])),
            Message::SnapshotChunk(Bytes::from_static(text())),
        ] {
            let plain = encode_to_chunks(5, &msg).1;
            let (mut buf, size) = compressed(&mut compressor, &msg);
            assert!(size < plain / 10, "{:?}: {size} of {plain} bytes", msg.kind());
            assert_eq!(
                Header::parse(&buf, MAX, FLAG_ZSTD).unwrap().unwrap().flags,
                FLAG_ZSTD
            );
            let (header, body) = FrameDecoder::new(MAX)
                .with_compression()
                .decode(&mut buf)
                .expect("valid frame")
                .expect("whole frame");
            assert_eq!((header.flags, header.len as usize), (0, plain - HEADER_LEN));
            assert_same(&decode::<TestConfig>(&header, body).expect("decodes"), &msg);
        }
    }

    #[test]
    fn small_incompressible_and_control_frames_travel_as_they_are() {
        let mut compressor = zstd(4096);
        // Pseudo-random bytes: zstd cannot shrink them.
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        let noise: Vec<u8> = (0..64 << 10)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let noise: &'static [u8] = Box::leak(noise.into_boxed_slice());
        for msg in [
            Message::StreamAppend(append(vec![normal(11, &text()[..1000])])),
            Message::SnapshotChunk(Bytes::from_static(noise)),
            Message::Vote(VoteRequest::new(vote(3, 1, false), None)),
        ] {
            let (want, plain) = encode_to_chunks(5, &msg);
            let (buf, size) = compressed(&mut compressor, &msg);
            assert_eq!((size, &buf[..]), (plain, &concat(&want)[..]), "{:?}", msg.kind());
        }
    }

    #[test]
    fn compressed_frames_are_refused_where_not_negotiated() {
        let (mut buf, _) = compressed(&mut zstd(1), &Message::SnapshotChunk(Bytes::from_static(text())));
        let err = FrameDecoder::new(MAX).decode(&mut buf).unwrap_err();
        assert!(matches!(err, FrameError::ReservedFlags(FLAG_ZSTD)), "{err}");
    }

    /// A compressed frame whose flag, kind, size or data lies.
    #[test]
    fn hostile_compressed_frames_are_refused() {
        let zeros = zstd::bulk::compress(&vec![0u8; 1 << 20], 1).unwrap();
        let frame = |kind: Kind, body: &[u8]| {
            let mut buf = raw_header(super::super::MAGIC, 1, kind as u8, FLAG_ZSTD, body.len() as u32);
            buf.extend_from_slice(body);
            buf
        };
        // A small body that inflates past the limit: refused from the size it declares.
        let err = FrameDecoder::new(64 << 10)
            .with_compression()
            .decode(&mut frame(Kind::SnapshotChunk, &zeros))
            .unwrap_err();
        assert!(
            matches!(err, FrameError::TooLarge { len, max } if len == 1 << 20 && max == 64 << 10),
            "{err}"
        );
        assert_eq!(err.error_code(), ErrorCode::TooLarge);
        let small = zstd::bulk::compress(&[5u8; 10_000], 1).unwrap();
        let cases: [(Kind, Vec<u8>); 6] = [
            // Control and reply kinds are never compressed.
            (Kind::Vote, zeros.clone()),
            // Bytes after the zstd frame, or a second frame.
            (Kind::StreamAppend, [&small[..], b"junk"].concat()),
            (Kind::StreamAppend, [&small[..], &small[..]].concat()),
            // Not zstd at all.
            (Kind::StreamAppend, b"not a zstd frame at all".to_vec()),
            // Cut short.
            (Kind::SnapshotChunk, zeros[..zeros.len() / 2].to_vec()),
            // A zstd frame that does not declare its size.
            (Kind::SnapshotChunk, {
                let mut e = zstd::stream::Encoder::new(Vec::new(), 1).unwrap();
                std::io::Write::write_all(&mut e, &[1u8; 5000]).unwrap();
                e.finish().unwrap()
            }),
        ];
        for (kind, body) in cases {
            let err = FrameDecoder::new(MAX)
                .with_compression()
                .decode(&mut frame(kind, &body))
                .unwrap_err();
            assert_eq!(err.error_code(), ErrorCode::BadRequest, "{kind:?}: {err}");
        }
    }
}
