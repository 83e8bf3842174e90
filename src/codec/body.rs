//! Body layouts: the binary counterpart of the protobuf conversions in `grpc/convert.rs`.
//!
//! Encoding writes through a [`Writer`] that batches fixed fields and passes application
//! bytes through as chunks of their own. Decoding reads through a [`Reader`] that slices
//! the body. Leaf reads name their own field; each enclosing level prefixes its name with
//! [`DecodeError::within`], building the path (`entries[3].log_id.index`) only on failure.

use std::collections::BTreeMap;
use std::collections::BTreeSet;

use bytes::Buf;
use bytes::BufMut;
use bytes::Bytes;
use bytes::BytesMut;
use openraft::EntryPayload;
use openraft::LogId;
use openraft::Membership;
use openraft::StoredMembership;
use openraft::alias::SnapshotMetaOf;
use openraft::alias::VoteOf;
use openraft::impls::Entry;
use openraft::impls::Vote;
use openraft::raft::AppendEntriesRequest;
use openraft::raft::AppendEntriesResponse;
use openraft::raft::SnapshotResponse;
use openraft::raft::StreamAppendError;
use openraft::raft::StreamAppendResult;
use openraft::raft::TransferLeaderError;
use openraft::raft::TransferLeaderRequest;
use openraft::raft::TransferLeaderResponse;
use openraft::raft::VoteRequest;
use openraft::raft::VoteResponse;

use super::ErrorCode;
use super::FrameError;
use super::HEADER_LEN;
use super::Header;
use super::Kind;
use super::Message;
use crate::error::DecodeError;
use crate::error::EncodeError;
use crate::types::RaftWireConfig;
use crate::types::WireLeaderId;
use crate::wire::WireMessage;

type WireLogId = LogId<WireLeaderId>;
type WireVote = Vote<WireLeaderId>;
type MembershipOf<C> = Membership<u64, <C as openraft::RaftTypeConfig>::Node>;

/// Encoded size of a [`WireLogId`].
const LOG_ID_LEN: usize = 24;
/// Smallest encoded entry: a log id and a blank payload tag.
const MIN_ENTRY_LEN: usize = LOG_ID_LEN + 1;
/// Smallest encoded voter set: an empty id list.
const MIN_VOTER_SET_LEN: usize = 4;
/// Smallest encoded node: an id and an empty description.
const MIN_NODE_LEN: usize = 8 + 4;

// ---- writing ----

/// Payloads shorter than this are copied next to the fixed fields rather than sent as chunks of
/// their own: on QUIC each chunk costs a write descriptor and a reference count, which for
/// small entries is more than the copy (measured: 64-byte entries, see BENCHMARKS.md).
const INLINE_MAX: usize = 4096;

/// Builds one frame as a run of chunks appended to `out`.
///
/// `buf` starts with an 18-byte slot for the header, written by [`Writer::finish`] once the
/// body length is known. Fixed fields go into `buf`; [`Writer::chunk`] splits what `buf`
/// holds off as a chunk and then appends the given bytes as a chunk of their own. The first
/// piece split off (the one holding the header slot) stays mutable in `head` until
/// `finish` and then fills the placeholder at `out[slot]`.
struct Writer<'a> {
    out: &'a mut Vec<Bytes>,
    slot: usize,
    head: Option<BytesMut>,
    buf: BytesMut,
    /// Bytes of this frame already moved out of `buf`, header slot included.
    flushed: usize,
    max_len: usize,
}

impl<'a> Writer<'a> {
    fn new(out: &'a mut Vec<Bytes>, max_len: usize, capacity_hint: usize) -> Self {
        let slot = out.len();
        out.push(Bytes::new());
        let mut buf = BytesMut::with_capacity(HEADER_LEN + capacity_hint);
        buf.put_bytes(0, HEADER_LEN);
        Writer {
            out,
            slot,
            head: None,
            buf,
            flushed: 0,
            max_len,
        }
    }

    fn body_len(&self) -> usize {
        self.flushed + self.buf.len() - HEADER_LEN
    }

    /// Fails as soon as the body outgrows the limit, so a huge message stops early.
    fn check_len(&self) -> Result<(), FrameError> {
        let len = self.body_len();
        let max = self.max_len.min(u32::MAX as usize);
        if len > max {
            return Err(FrameError::TooLarge {
                len: len as u64,
                max: self.max_len,
            });
        }
        Ok(())
    }

    fn u8(&mut self, v: u8) {
        self.buf.put_u8(v);
    }

    fn u16(&mut self, v: u16) {
        self.buf.put_u16(v);
    }

    fn u32(&mut self, v: u32) {
        self.buf.put_u32(v);
    }

    fn u64(&mut self, v: u64) {
        self.buf.put_u64(v);
    }

    fn bool(&mut self, v: bool) {
        self.buf.put_u8(u8::from(v));
    }

    /// A count or length as `u32`.
    fn len_u32(&mut self, n: usize, what: &str) -> Result<(), FrameError> {
        let n = u32::try_from(n).map_err(|_| EncodeError(format!("{what}: {n} does not fit in 32 bits")))?;
        self.buf.put_u32(n);
        Ok(())
    }

    /// Copies small bytes into the fixed-field buffer.
    fn slice(&mut self, b: &[u8]) {
        self.buf.put_slice(b);
    }

    /// Moves what `buf` holds out as a chunk (the first one becomes `head`).
    fn flush(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let part = self.buf.split();
        self.flushed += part.len();
        if self.head.is_none() {
            self.head = Some(part);
        } else {
            self.out.push(part.freeze());
        }
    }

    /// Appends `b` as a chunk of its own, uncopied; bytes shorter than [`INLINE_MAX`] are
    /// copied in with the fixed fields instead.
    fn chunk(&mut self, b: Bytes) -> Result<(), FrameError> {
        if b.is_empty() {
            return Ok(());
        }
        if b.len() < INLINE_MAX {
            self.buf.put_slice(&b);
            return self.check_len();
        }
        self.flush();
        self.flushed += b.len();
        self.out.push(b);
        self.check_len()
    }

    /// Writes the header into its slot and returns the frame size.
    fn finish(mut self, kind: Kind, request_id: u64) -> Result<usize, FrameError> {
        self.check_len()?;
        let len = self.body_len() as u32;
        self.flush();
        let header = Header {
            kind,
            flags: 0,
            len,
            request_id,
        };
        let mut head = self.head.take().expect("the header slot is always flushed");
        head[..HEADER_LEN].copy_from_slice(&header.to_bytes());
        self.out[self.slot] = head.freeze();
        Ok(self.flushed)
    }
}

fn put_vote(w: &mut Writer<'_>, v: &WireVote) {
    w.u64(v.leader_id.term);
    w.u64(v.leader_id.node_id);
    w.bool(v.committed);
}

fn put_log_id(w: &mut Writer<'_>, l: &WireLogId) {
    w.u64(l.leader_id.term);
    w.u64(l.leader_id.node_id);
    w.u64(l.index);
}

fn put_opt_log_id(w: &mut Writer<'_>, l: &Option<WireLogId>) {
    match l {
        None => w.u8(0),
        Some(l) => {
            w.u8(1);
            put_log_id(w, l);
        }
    }
}

fn put_membership<C: RaftWireConfig>(w: &mut Writer<'_>, m: &MembershipOf<C>) -> Result<(), FrameError> {
    let configs = m.get_joint_config();
    w.len_u32(configs.len(), "membership configs")?;
    for set in configs {
        w.len_u32(set.len(), "membership voter set")?;
        for id in set {
            w.u64(*id);
        }
    }
    w.len_u32(m.nodes().count(), "membership nodes")?;
    for (id, node) in m.nodes() {
        w.u64(*id);
        let b = node.encode()?;
        w.len_u32(b.len(), "membership node")?;
        w.slice(&b);
    }
    w.check_len()
}

fn put_entry<C: RaftWireConfig>(w: &mut Writer<'_>, e: &C::Entry) -> Result<(), FrameError> {
    put_log_id(w, &e.log_id);
    match &e.payload {
        EntryPayload::Blank => w.u8(0),
        EntryPayload::Normal(d) => {
            w.u8(1);
            let b = d.encode()?;
            w.len_u32(b.len(), "entry payload")?;
            w.chunk(b)?;
        }
        EntryPayload::Membership(m) => {
            w.u8(2);
            put_membership::<C>(w, m)?;
        }
    }
    Ok(())
}

fn put_vote_request<C: RaftWireConfig>(w: &mut Writer<'_>, r: &VoteRequest<C>) {
    put_vote(w, &r.vote);
    put_opt_log_id(w, &r.last_log_id);
    w.bool(r.leadership_transfer);
}

fn put_append_request<C: RaftWireConfig>(
    w: &mut Writer<'_>,
    r: &AppendEntriesRequest<C>,
) -> Result<(), FrameError> {
    put_vote(w, &r.vote);
    put_opt_log_id(w, &r.prev_log_id);
    put_opt_log_id(w, &r.leader_commit);
    w.len_u32(r.entries.len(), "entries")?;
    for e in &r.entries {
        put_entry::<C>(w, e)?;
    }
    Ok(())
}

/// Room for the fixed fields, so the common messages need one allocation.
fn capacity_hint<C: RaftWireConfig>(msg: &Message<C>) -> usize {
    match msg {
        Message::Append(r) | Message::StreamAppend(r) => 64 + r.entries.len() * (MIN_ENTRY_LEN + 4),
        Message::SnapshotMeta { .. } => 256,
        Message::Error { message, .. } => 2 + message.len(),
        _ => 64,
    }
}

/// Encodes `msg` as one frame onto `out`; on error the caller truncates `out`.
pub(super) fn encode_frame<C: RaftWireConfig>(
    request_id: u64,
    msg: &Message<C>,
    max_len: usize,
    out: &mut Vec<Bytes>,
) -> Result<usize, FrameError> {
    let mut w = Writer::new(out, max_len, capacity_hint(msg));
    match msg {
        Message::Vote(r) | Message::PreVote(r) => put_vote_request(&mut w, r),
        Message::VoteReply(r) => {
            put_vote(&mut w, &r.vote);
            w.bool(r.vote_granted);
            put_opt_log_id(&mut w, &r.last_log_id);
        }
        Message::Append(r) | Message::StreamAppend(r) => put_append_request(&mut w, r)?,
        Message::AppendReply(r) => match r {
            AppendEntriesResponse::Success => w.u8(0),
            AppendEntriesResponse::PartialSuccess(m) => {
                w.u8(1);
                put_opt_log_id(&mut w, m);
            }
            AppendEntriesResponse::Conflict => w.u8(2),
            AppendEntriesResponse::HigherVote(v) => {
                w.u8(3);
                put_vote(&mut w, v);
            }
        },
        Message::StreamAppendReply(r) => match r {
            Ok(m) => {
                w.u8(0);
                put_opt_log_id(&mut w, m);
            }
            Err(StreamAppendError::Conflict(l)) => {
                w.u8(1);
                put_log_id(&mut w, l);
            }
            Err(StreamAppendError::HigherVote(v)) => {
                w.u8(2);
                put_vote(&mut w, v);
            }
        },
        Message::SnapshotMeta { vote, meta } => {
            put_vote(&mut w, vote);
            put_opt_log_id(&mut w, &meta.last_log_id);
            put_opt_log_id(&mut w, meta.last_membership.log_id());
            put_membership::<C>(&mut w, meta.last_membership.membership())?;
        }
        Message::SnapshotChunk(data) => w.chunk(data.clone())?,
        Message::SnapshotEnd(t) => {
            w.u64(t.length);
            w.u32(t.crc32c);
        }
        Message::SnapshotAck(r) => put_vote(&mut w, &r.vote),
        Message::TransferLeader(r) => {
            put_vote(&mut w, r.from_leader());
            w.u64(*r.to_node_id());
            put_opt_log_id(&mut w, &r.last_log_id().cloned());
        }
        Message::TransferLeaderReply(r) => match r {
            Ok(()) => w.u8(0),
            Err(TransferLeaderError::VoteChanged { expected, actual }) => {
                w.u8(1);
                put_vote(&mut w, expected);
                put_vote(&mut w, actual);
            }
            Err(TransferLeaderError::LogNotFlushed { expected, actual }) => {
                w.u8(2);
                put_opt_log_id(&mut w, expected);
                put_opt_log_id(&mut w, actual);
            }
        },
        Message::End => {}
        Message::Error { code, message } => {
            w.u16(*code as u16);
            w.slice(message.as_bytes());
        }
    }
    w.finish(msg.kind(), request_id)
}

// ---- reading ----

/// Reads fields off the front of a body, slicing rather than copying.
struct Reader {
    buf: Bytes,
}

impl Reader {
    fn need(&self, n: usize, field: &str) -> Result<(), DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::invalid(
                field,
                format!("body ends early: needs {n} bytes, {} left", self.buf.len()),
            ));
        }
        Ok(())
    }

    fn u8(&mut self, field: &str) -> Result<u8, DecodeError> {
        self.need(1, field)?;
        Ok(self.buf.get_u8())
    }

    fn u16(&mut self, field: &str) -> Result<u16, DecodeError> {
        self.need(2, field)?;
        Ok(self.buf.get_u16())
    }

    fn u32(&mut self, field: &str) -> Result<u32, DecodeError> {
        self.need(4, field)?;
        Ok(self.buf.get_u32())
    }

    fn u64(&mut self, field: &str) -> Result<u64, DecodeError> {
        self.need(8, field)?;
        Ok(self.buf.get_u64())
    }

    fn bool(&mut self, field: &str) -> Result<bool, DecodeError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(DecodeError::invalid(field, format!("expected 0 or 1, got {v}"))),
        }
    }

    /// A `u32` count of items at least `min_item_len` bytes each; refuses counts the rest of
    /// the body cannot hold, so callers may reserve `count` items.
    fn count(&mut self, field: &str, min_item_len: usize) -> Result<usize, DecodeError> {
        let n = self.u32(field)? as usize;
        let left = self.buf.len();
        if n.saturating_mul(min_item_len) > left {
            return Err(DecodeError::invalid(
                field,
                format!("{n} items cannot fit in the {left} bytes left"),
            ));
        }
        Ok(n)
    }

    /// A `u32` length, then that many bytes as a slice of the body.
    fn len_prefixed(&mut self, field: &str) -> Result<Bytes, DecodeError> {
        let n = self.u32("len").map_err(|e| e.within(field))? as usize;
        self.need(n, field)?;
        Ok(self.buf.split_to(n))
    }

    /// Everything left.
    fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }

    fn finish(self) -> Result<(), DecodeError> {
        if !self.buf.is_empty() {
            return Err(DecodeError::invalid(
                "body",
                format!("{} bytes left over after the last field", self.buf.len()),
            ));
        }
        Ok(())
    }
}

/// A `tag` of 0 or 1 (absent / present).
fn get_presence(r: &mut Reader) -> Result<bool, DecodeError> {
    match r.u8("tag")? {
        0 => Ok(false),
        1 => Ok(true),
        v => Err(DecodeError::invalid(
            "tag",
            format!("expected 0 (none) or 1 (some), got {v}"),
        )),
    }
}

fn get_vote(r: &mut Reader, field: &str) -> Result<WireVote, DecodeError> {
    let read = |r: &mut Reader| {
        Ok(Vote {
            leader_id: WireLeaderId {
                term: r.u64("term")?,
                node_id: r.u64("node_id")?,
            },
            committed: r.bool("committed")?,
        })
    };
    read(r).map_err(|e: DecodeError| e.within(field))
}

fn read_log_id(r: &mut Reader) -> Result<WireLogId, DecodeError> {
    Ok(LogId {
        leader_id: WireLeaderId {
            term: r.u64("term")?,
            node_id: r.u64("node_id")?,
        },
        index: r.u64("index")?,
    })
}

fn get_log_id(r: &mut Reader, field: &str) -> Result<WireLogId, DecodeError> {
    read_log_id(r).map_err(|e| e.within(field))
}

fn get_opt_log_id(r: &mut Reader, field: &str) -> Result<Option<WireLogId>, DecodeError> {
    let read = |r: &mut Reader| {
        if get_presence(r)? {
            read_log_id(r).map(Some)
        } else {
            Ok(None)
        }
    };
    read(r).map_err(|e| e.within(field))
}

fn read_membership<C: RaftWireConfig>(r: &mut Reader) -> Result<MembershipOf<C>, DecodeError> {
    let n_configs = r.count("configs", MIN_VOTER_SET_LEN)?;
    let mut configs = Vec::with_capacity(n_configs);
    for i in 0..n_configs {
        let read_set = |r: &mut Reader| {
            let n_ids = r.count("ids", 8)?;
            let mut set = BTreeSet::new();
            for j in 0..n_ids {
                let id = r.u64("").map_err(|e| e.within(&format!("ids[{j}]")))?;
                if !set.insert(id) {
                    return Err(DecodeError::invalid(
                        &format!("ids[{j}]"),
                        format!("voter {id} listed twice"),
                    ));
                }
            }
            Ok(set)
        };
        configs.push(read_set(r).map_err(|e| e.within(&format!("configs[{i}]")))?);
    }

    let n_nodes = r.count("nodes", MIN_NODE_LEN)?;
    let mut nodes = BTreeMap::new();
    for i in 0..n_nodes {
        let read_node = |r: &mut Reader| {
            let id = r.u64("id")?;
            let bytes = r.len_prefixed("node")?;
            let node = C::Node::decode(bytes).map_err(|e| e.within("node"))?;
            Ok((id, node))
        };
        let (id, node) = read_node(r).map_err(|e: DecodeError| e.within(&format!("nodes[{i}]")))?;
        if nodes.insert(id, node).is_some() {
            return Err(DecodeError::invalid(
                &format!("nodes[{i}].id"),
                format!("node {id} listed twice"),
            ));
        }
    }
    Membership::new(configs, nodes).map_err(|e| DecodeError::invalid("", e))
}

fn get_membership<C: RaftWireConfig>(r: &mut Reader, field: &str) -> Result<MembershipOf<C>, DecodeError> {
    read_membership::<C>(r).map_err(|e| e.within(field))
}

fn read_entry<C: RaftWireConfig>(r: &mut Reader) -> Result<C::Entry, DecodeError> {
    let log_id = get_log_id(r, "log_id")?;
    let payload = match r.u8("payload")? {
        0 => EntryPayload::Blank,
        1 => {
            let bytes = r.len_prefixed("normal")?;
            EntryPayload::Normal(C::D::decode(bytes).map_err(|e| e.within("normal"))?)
        }
        2 => EntryPayload::Membership(get_membership::<C>(r, "membership")?),
        v => {
            return Err(DecodeError::invalid(
                "payload",
                format!("unknown payload tag {v} (0 blank, 1 normal, 2 membership)"),
            ));
        }
    };
    Ok(Entry { log_id, payload })
}

fn get_vote_request<C: RaftWireConfig>(r: &mut Reader) -> Result<VoteRequest<C>, DecodeError> {
    Ok(VoteRequest {
        vote: get_vote(r, "vote")?,
        last_log_id: get_opt_log_id(r, "last_log_id")?,
        leadership_transfer: r.bool("leadership_transfer")?,
    })
}

fn get_vote_response<C: RaftWireConfig>(r: &mut Reader) -> Result<VoteResponse<C>, DecodeError> {
    Ok(VoteResponse {
        vote: get_vote(r, "vote")?,
        vote_granted: r.bool("vote_granted")?,
        last_log_id: get_opt_log_id(r, "last_log_id")?,
    })
}

fn get_append_request<C: RaftWireConfig>(r: &mut Reader) -> Result<AppendEntriesRequest<C>, DecodeError> {
    let vote = get_vote(r, "vote")?;
    let prev_log_id = get_opt_log_id(r, "prev_log_id")?;
    let leader_commit = get_opt_log_id(r, "leader_commit")?;
    let n = r.count("entries", MIN_ENTRY_LEN)?;
    let mut entries = Vec::with_capacity(n);
    for i in 0..n {
        entries.push(read_entry::<C>(r).map_err(|e| e.within(&format!("entries[{i}]")))?);
    }
    Ok(AppendEntriesRequest {
        vote,
        prev_log_id,
        entries,
        leader_commit,
    })
}

fn unknown_tag(field: &str, v: u8, known: &str) -> DecodeError {
    DecodeError::invalid(field, format!("unknown tag {v} ({known})"))
}

fn get_append_response<C: RaftWireConfig>(r: &mut Reader) -> Result<AppendEntriesResponse<C>, DecodeError> {
    Ok(match r.u8("result")? {
        0 => AppendEntriesResponse::Success,
        1 => AppendEntriesResponse::PartialSuccess(get_opt_log_id(r, "partial_success")?),
        2 => AppendEntriesResponse::Conflict,
        3 => AppendEntriesResponse::HigherVote(get_vote(r, "higher_vote")?),
        v => {
            return Err(unknown_tag(
                "result",
                v,
                "0 success, 1 partial success, 2 conflict, 3 higher vote",
            ));
        }
    })
}

fn get_stream_reply<C: RaftWireConfig>(r: &mut Reader) -> Result<StreamAppendResult<C>, DecodeError> {
    Ok(match r.u8("result")? {
        0 => Ok(get_opt_log_id(r, "matched")?),
        1 => Err(StreamAppendError::Conflict(get_log_id(r, "conflict")?)),
        2 => Err(StreamAppendError::HigherVote(get_vote(r, "higher_vote")?)),
        v => {
            return Err(unknown_tag("result", v, "0 matched, 1 conflict, 2 higher vote"));
        }
    })
}

fn get_snapshot_meta<C: RaftWireConfig>(
    r: &mut Reader,
) -> Result<(VoteOf<C>, SnapshotMetaOf<C>), DecodeError> {
    let vote = get_vote(r, "vote")?;
    let last_log_id = get_opt_log_id(r, "last_log_id")?;
    let last_membership_log_id = get_opt_log_id(r, "last_membership_log_id")?;
    let membership = get_membership::<C>(r, "last_membership")?;
    let meta = openraft::SnapshotMeta {
        last_log_id,
        last_membership: StoredMembership::new(last_membership_log_id, membership),
    };
    Ok((vote, meta))
}

fn get_transfer_request<C: RaftWireConfig>(r: &mut Reader) -> Result<TransferLeaderRequest<C>, DecodeError> {
    Ok(TransferLeaderRequest::new(
        get_vote(r, "from_leader")?,
        r.u64("to_node_id")?,
        get_opt_log_id(r, "last_log_id")?,
    ))
}

fn get_transfer_response<C: RaftWireConfig>(
    r: &mut Reader,
) -> Result<TransferLeaderResponse<C>, DecodeError> {
    Ok(match r.u8("result")? {
        0 => Ok(()),
        1 => Err(TransferLeaderError::VoteChanged {
            expected: get_vote(r, "vote_changed.expected")?,
            actual: get_vote(r, "vote_changed.actual")?,
        }),
        2 => Err(TransferLeaderError::LogNotFlushed {
            expected: get_opt_log_id(r, "log_not_flushed.expected")?,
            actual: get_opt_log_id(r, "log_not_flushed.actual")?,
        }),
        v => {
            return Err(unknown_tag(
                "result",
                v,
                "0 ok, 1 vote changed, 2 log not flushed",
            ));
        }
    })
}

fn get_error(r: &mut Reader) -> Result<(ErrorCode, String), DecodeError> {
    let code = r.u16("code")?;
    let code = ErrorCode::try_from(code)
        .map_err(|v| DecodeError::invalid("code", format!("unknown error code {v}")))?;
    let message = String::from_utf8(r.rest().to_vec()).map_err(|e| DecodeError::invalid("message", e))?;
    Ok((code, message))
}

/// Decodes a body of `kind`, refusing bytes left over.
pub(super) fn decode_body<C: RaftWireConfig>(kind: Kind, body: Bytes) -> Result<Message<C>, DecodeError> {
    let mut reader = Reader { buf: body };
    let r = &mut reader;
    let msg = match kind {
        Kind::Vote => Message::Vote(get_vote_request(r)?),
        Kind::PreVote => Message::PreVote(get_vote_request(r)?),
        Kind::VoteReply => Message::VoteReply(get_vote_response(r)?),
        Kind::Append => Message::Append(get_append_request(r)?),
        Kind::AppendReply => Message::AppendReply(get_append_response(r)?),
        Kind::StreamAppend => Message::StreamAppend(get_append_request(r)?),
        Kind::StreamAppendReply => Message::StreamAppendReply(get_stream_reply(r)?),
        Kind::SnapshotMeta => {
            let (vote, meta) = get_snapshot_meta::<C>(r)?;
            Message::SnapshotMeta { vote, meta }
        }
        Kind::SnapshotChunk => Message::SnapshotChunk(r.rest()),
        Kind::SnapshotEnd => Message::SnapshotEnd(crate::snapshot::Trailer {
            length: r.u64("length")?,
            crc32c: r.u32("crc32c")?,
        }),
        Kind::SnapshotAck => Message::SnapshotAck(SnapshotResponse {
            vote: get_vote(r, "vote")?,
        }),
        Kind::TransferLeader => Message::TransferLeader(get_transfer_request(r)?),
        Kind::TransferLeaderReply => Message::TransferLeaderReply(get_transfer_response(r)?),
        Kind::End => Message::End,
        Kind::Error => {
            let (code, message) = get_error(r)?;
            Message::Error { code, message }
        }
    };
    reader.finish()?;
    Ok(msg)
}
