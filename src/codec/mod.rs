//! Framing for the QUIC and TCP transports: turns openraft messages into length-prefixed
//! frames and back, without doing any I/O.
//!
//! A frame is an 18-byte [`Header`] followed by a body whose layout depends on the
//! [`Kind`]. All integers are big-endian:
//!
//! | bytes | field |
//! |---|---|
//! | 2 | magic `b"RW"` |
//! | 1 | version (`1`) |
//! | 1 | kind ([`Kind`]) |
//! | 2 | flags (bit 0: body compressed with zstd, only where negotiated; others must be zero) |
//! | 4 | body length |
//! | 8 | request id |
//!
//! Sending: [`encode`] appends a frame to a list of chunks for a vectored write. Application
//! payloads (entry data, snapshot chunks) travel as chunks of their own and are never copied.
//!
//! Receiving: a [`FrameDecoder`] cuts whole frames out of the receive buffer and [`decode`]
//! rebuilds the message by slicing the body, so an entry payload handed to
//! [`WireMessage::decode`](crate::wire::WireMessage::decode) is a view of the receive
//! buffer.
//!
//! Any [`FrameError`] leaves the byte stream out of step: the connection or stream that
//! produced it is answered with an [`Kind::Error`] frame (see [`FrameError::error_code`])
//! and closed.

mod body;
#[cfg(feature = "compression")]
mod compress;
#[cfg(test)]
mod tests;

#[cfg(feature = "compression")]
pub(crate) use compress::Compressor;
#[cfg(feature = "compression")]
pub(crate) use compress::FLAG_ZSTD;

use bytes::Buf;
use bytes::Bytes;
use bytes::BytesMut;
use openraft::alias::SnapshotMetaOf;
use openraft::alias::VoteOf;
use openraft::raft::AppendEntriesRequest;
use openraft::raft::AppendEntriesResponse;
use openraft::raft::SnapshotResponse;
use openraft::raft::StreamAppendResult;
use openraft::raft::TransferLeaderRequest;
use openraft::raft::TransferLeaderResponse;
use openraft::raft::VoteRequest;
use openraft::raft::VoteResponse;

use crate::error::DecodeError;
use crate::error::EncodeError;
use crate::snapshot::Trailer;
use crate::types::RaftWireConfig;

/// The first two bytes of every frame.
pub(crate) const MAGIC: [u8; 2] = *b"RW";

/// The only frame format version so far.
pub(crate) const VERSION: u8 = 1;

/// Size of the frame header in bytes.
pub(crate) const HEADER_LEN: usize = 18;

/// An `End` frame (request id 0, empty body), whole.
#[cfg(feature = "tcp")]
pub(crate) const END_FRAME: [u8; HEADER_LEN] = [
    MAGIC[0],
    MAGIC[1],
    VERSION,
    Kind::End as u8,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
];

/// How much of an announced body is reserved before any of it arrives.
const EAGER_RESERVE: usize = 1 << 20;

/// What a frame carries; the body layout follows from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub(crate) enum Kind {
    /// A [`VoteRequest`] for a real election.
    Vote = 1,
    /// A [`VoteRequest`] for a pre-vote.
    PreVote = 2,
    /// A [`VoteResponse`], answering `Vote` or `PreVote`.
    VoteReply = 3,
    /// An [`AppendEntriesRequest`] sent on its own (heartbeats, one-off appends).
    Append = 4,
    /// An [`AppendEntriesResponse`].
    AppendReply = 5,
    /// An [`AppendEntriesRequest`] on a pipelined replication stream.
    StreamAppend = 6,
    /// A [`StreamAppendResult`], in request order on the same stream.
    StreamAppendReply = 7,
    /// The first frame of a snapshot transfer: the leader's vote and the snapshot's meta.
    SnapshotMeta = 8,
    /// Raw snapshot data following a `SnapshotMeta`.
    SnapshotChunk = 9,
    /// The receiver's [`SnapshotResponse`] once the snapshot is installed.
    SnapshotAck = 10,
    /// A [`TransferLeaderRequest`].
    TransferLeader = 11,
    /// A [`TransferLeaderResponse`].
    TransferLeaderReply = 12,
    /// The last frame of a snapshot transfer: the total data length (8 bytes) and the CRC32C
    /// of the data (4 bytes). A receiver installs nothing without it.
    SnapshotEnd = 13,
    /// The end of one side of an exchange (empty body). A TCP connection carries exchanges
    /// one after another, so each side ends its part with this frame where a QUIC stream
    /// would end; a connection that closes anywhere else was abandoned.
    End = 14,
    /// The peer could not handle a request: an [`ErrorCode`] and an explanation.
    Error = 15,
}

impl Kind {
    /// Whether this is a small control request, held to the control-message limit.
    pub(crate) fn is_control(self) -> bool {
        matches!(self, Kind::Vote | Kind::PreVote | Kind::TransferLeader)
    }
}

impl TryFrom<u8> for Kind {
    /// The unknown value.
    type Error = u8;

    fn try_from(v: u8) -> Result<Self, u8> {
        Ok(match v {
            1 => Kind::Vote,
            2 => Kind::PreVote,
            3 => Kind::VoteReply,
            4 => Kind::Append,
            5 => Kind::AppendReply,
            6 => Kind::StreamAppend,
            7 => Kind::StreamAppendReply,
            8 => Kind::SnapshotMeta,
            9 => Kind::SnapshotChunk,
            10 => Kind::SnapshotAck,
            11 => Kind::TransferLeader,
            12 => Kind::TransferLeaderReply,
            13 => Kind::SnapshotEnd,
            14 => Kind::End,
            15 => Kind::Error,
            other => return Err(other),
        })
    }
}

/// Why a peer answered with an [`Kind::Error`] frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub(crate) enum ErrorCode {
    /// The request did not parse or decode.
    BadRequest = 1,
    /// The request exceeded the receiver's frame size limit.
    TooLarge = 2,
    /// The local Raft refused the request or has stopped.
    Refused = 3,
    /// A frame of a kind that is not valid at this point of the exchange.
    UnexpectedKind = 4,
    /// The receiver failed on its own (for example encoding its reply).
    Internal = 5,
    /// The sender abandoned the stream before finishing it (used as a QUIC reset code).
    Aborted = 6,
    /// The peer made no progress within the receiver's deadline.
    Timeout = 7,
    /// The caller may not make this request.
    Forbidden = 8,
}

impl TryFrom<u16> for ErrorCode {
    /// The unknown value.
    type Error = u16;

    fn try_from(v: u16) -> Result<Self, u16> {
        Ok(match v {
            1 => ErrorCode::BadRequest,
            2 => ErrorCode::TooLarge,
            3 => ErrorCode::Refused,
            4 => ErrorCode::UnexpectedKind,
            5 => ErrorCode::Internal,
            6 => ErrorCode::Aborted,
            7 => ErrorCode::Timeout,
            8 => ErrorCode::Forbidden,
            other => return Err(other),
        })
    }
}

/// A frame that cannot be parsed, decoded or built.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FrameError {
    /// The frame does not start with `b"RW"`: not a raftwire peer, or the stream is out of
    /// step.
    #[error("frame does not start with the magic bytes \"RW\" (got {0:02x?})")]
    BadMagic([u8; 2]),
    /// A frame format version this build does not speak.
    #[error("unsupported frame version {0} (this build speaks version {VERSION})")]
    UnsupportedVersion(u8),
    /// A kind byte outside [`Kind`].
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// Flag bits set that are not defined, or not negotiated on this connection.
    #[error("reserved frame flags set: {0:#06x}")]
    ReservedFlags(u16),
    /// A frame body that could not be compressed.
    #[cfg(feature = "compression")]
    #[error("{kind:?} frame: {reason}")]
    Compression {
        /// The frame's kind.
        kind: Kind,
        /// What the compressor said.
        reason: String,
    },
    /// A body longer than the limit.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// The body length announced or produced.
        len: u64,
        /// The limit in force.
        max: usize,
    },
    /// A body that does not decode as its kind.
    #[error("{kind:?} frame does not decode: {source}")]
    Body {
        /// The frame's kind.
        kind: Kind,
        /// The field that failed and why.
        source: DecodeError,
    },
    /// An application value that could not be encoded.
    #[error(transparent)]
    Encode(#[from] EncodeError),
}

impl FrameError {
    /// The code a receiver answers with when this error is in a frame it got.
    pub(crate) fn error_code(&self) -> ErrorCode {
        match self {
            FrameError::TooLarge { .. } => ErrorCode::TooLarge,
            FrameError::Encode(_) => ErrorCode::Internal,
            #[cfg(feature = "compression")]
            FrameError::Compression { .. } => ErrorCode::Internal,
            FrameError::BadMagic(_)
            | FrameError::UnsupportedVersion(_)
            | FrameError::UnknownKind(_)
            | FrameError::ReservedFlags(_)
            | FrameError::Body { .. } => ErrorCode::BadRequest,
        }
    }
}

/// The fixed-size start of every frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    /// What the body holds.
    pub(crate) kind: Kind,
    /// Flag bits: `FLAG_ZSTD` (feature `compression`) or none.
    pub(crate) flags: u16,
    /// Body length in bytes, header excluded.
    pub(crate) len: u32,
    /// Pairs a reply with its request.
    pub(crate) request_id: u64,
}

impl Header {
    /// The header's 18 bytes.
    fn to_bytes(self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..2].copy_from_slice(&MAGIC);
        b[2] = VERSION;
        b[3] = self.kind as u8;
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..10].copy_from_slice(&self.len.to_be_bytes());
        b[10..18].copy_from_slice(&self.request_id.to_be_bytes());
        b
    }

    /// Appends the header's 18 bytes to `out` (tests build frames by hand with it).
    #[cfg(test)]
    pub(crate) fn encode(&self, out: &mut BytesMut) {
        bytes::BufMut::put_slice(out, &self.to_bytes());
    }

    /// Parses a header from the start of `buf` without consuming it.
    ///
    /// `Ok(None)` when fewer than 18 bytes are buffered. A body longer than `max_len` is
    /// refused here, before anyone reserves memory for it, and so are flags outside `allowed`.
    pub(crate) fn parse(buf: &[u8], max_len: usize, allowed: u16) -> Result<Option<Header>, FrameError> {
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let mut b = &buf[..HEADER_LEN];
        let magic = [b.get_u8(), b.get_u8()];
        if magic != MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        let version = b.get_u8();
        if version != VERSION {
            return Err(FrameError::UnsupportedVersion(version));
        }
        let kind = Kind::try_from(b.get_u8()).map_err(FrameError::UnknownKind)?;
        let flags = b.get_u16();
        if flags & !allowed != 0 {
            return Err(FrameError::ReservedFlags(flags));
        }
        let len = b.get_u32();
        if u64::from(len) > max_len as u64 {
            return Err(FrameError::TooLarge {
                len: u64::from(len),
                max: max_len,
            });
        }
        let request_id = b.get_u64();
        Ok(Some(Header {
            kind,
            flags,
            len,
            request_id,
        }))
    }
}

/// Where a [`FrameDecoder`] is within the current frame.
#[derive(Debug, Clone, Copy)]
enum DecodeState {
    /// Waiting for a header.
    Head,
    /// Header consumed; waiting for its body.
    Data(Header),
}

/// Cuts whole frames out of a receive buffer, one header parse per frame.
///
/// After an error the stream is out of step and must be dropped.
#[derive(Debug)]
pub(crate) struct FrameDecoder {
    max_len: usize,
    /// The limit on control requests (votes, pre-votes, transfer-leader), at most `max_len`.
    max_control: usize,
    state: DecodeState,
    /// Set where compression was negotiated: compressed frames are accepted and inflated.
    #[cfg(feature = "compression")]
    inflate: Option<compress::Decompressor>,
}

impl FrameDecoder {
    /// A decoder refusing bodies longer than `max_len`.
    pub(crate) fn new(max_len: usize) -> Self {
        FrameDecoder {
            max_len,
            max_control: max_len,
            state: DecodeState::Head,
            #[cfg(feature = "compression")]
            inflate: None,
        }
    }

    /// Also accepts compressed frames (see [`FLAG_ZSTD`]) and hands out their bodies
    /// decompressed, each at most `max_len` bytes.
    #[cfg(feature = "compression")]
    pub(crate) fn with_compression(mut self) -> Self {
        self.inflate = Some(compress::Decompressor::default());
        self
    }

    /// The header flags this decoder accepts.
    fn allowed_flags(&self) -> u16 {
        #[cfg(feature = "compression")]
        if self.inflate.is_some() {
            return FLAG_ZSTD;
        }
        0
    }

    /// Also refuses control requests (votes, pre-votes, transfer-leader) longer than `max`,
    /// from their header, before any of the body is read.
    pub(crate) fn with_control_limit(mut self, max: usize) -> Self {
        self.max_control = max.min(self.max_len);
        self
    }

    /// The next whole frame in `buf`, consuming it; `Ok(None)` if more bytes are needed.
    ///
    /// The body is split off `buf` without copying; a compressed one is decompressed, and the
    /// header returned describes the body returned (no flags, its length).
    pub(crate) fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<(Header, Bytes)>, FrameError> {
        let header = match self.state {
            DecodeState::Data(header) => header,
            DecodeState::Head => {
                let Some(header) = Header::parse(buf, self.max_len, self.allowed_flags())? else {
                    return Ok(None);
                };
                if header.kind.is_control() && header.len as usize > self.max_control {
                    return Err(FrameError::TooLarge {
                        len: u64::from(header.len),
                        max: self.max_control,
                    });
                }
                buf.advance(HEADER_LEN);
                // The length passed the limit check. Reserve room for this frame only, and
                // for a large one only a first part: a peer that announces 64 MiB and sends
                // nothing must not make us hold 64 MiB.
                let body_len = header.len as usize;
                buf.reserve(body_len.min(EAGER_RESERVE).saturating_sub(buf.len()));
                self.state = DecodeState::Data(header);
                header
            }
        };
        let body_len = header.len as usize;
        if buf.len() < body_len {
            // Once the peer has really sent a good part, make room for the rest in one step
            // (one copy of what is buffered, instead of repeated doubling).
            if buf.len() >= EAGER_RESERVE && buf.capacity() < body_len {
                buf.reserve(body_len - buf.len());
            }
            return Ok(None);
        }
        let body = buf.split_to(body_len).freeze();
        self.state = DecodeState::Head;
        #[cfg(feature = "compression")]
        if let Some(inflate) = &mut self.inflate
            && header.flags & FLAG_ZSTD != 0
        {
            let body = inflate.body(header.kind, &body, self.max_len)?;
            let header = Header {
                flags: 0,
                len: body.len() as u32,
                ..header
            };
            return Ok(Some((header, body)));
        }
        Ok(Some((header, body)))
    }
}

/// Every message that travels in a frame.
#[derive(Debug)]
pub(crate) enum Message<C: RaftWireConfig> {
    /// See [`Kind::Vote`].
    Vote(VoteRequest<C>),
    /// See [`Kind::PreVote`].
    PreVote(VoteRequest<C>),
    /// See [`Kind::VoteReply`].
    VoteReply(VoteResponse<C>),
    /// See [`Kind::Append`].
    Append(AppendEntriesRequest<C>),
    /// See [`Kind::AppendReply`].
    AppendReply(AppendEntriesResponse<C>),
    /// See [`Kind::StreamAppend`].
    StreamAppend(AppendEntriesRequest<C>),
    /// See [`Kind::StreamAppendReply`].
    StreamAppendReply(StreamAppendResult<C>),
    /// See [`Kind::SnapshotMeta`].
    SnapshotMeta {
        /// The sending leader's vote.
        vote: VoteOf<C>,
        /// What the snapshot covers.
        meta: SnapshotMetaOf<C>,
    },
    /// See [`Kind::SnapshotChunk`].
    SnapshotChunk(Bytes),
    /// See [`Kind::SnapshotEnd`].
    SnapshotEnd(Trailer),
    /// See [`Kind::SnapshotAck`].
    SnapshotAck(SnapshotResponse<C>),
    /// See [`Kind::TransferLeader`].
    TransferLeader(TransferLeaderRequest<C>),
    /// See [`Kind::TransferLeaderReply`].
    TransferLeaderReply(TransferLeaderResponse<C>),
    /// See [`Kind::End`].
    End,
    /// See [`Kind::Error`].
    Error {
        /// The class of failure.
        code: ErrorCode,
        /// A human-readable explanation.
        message: String,
    },
}

impl<C: RaftWireConfig> Message<C> {
    /// The frame kind this message travels as.
    pub(crate) fn kind(&self) -> Kind {
        match self {
            Message::Vote(_) => Kind::Vote,
            Message::PreVote(_) => Kind::PreVote,
            Message::VoteReply(_) => Kind::VoteReply,
            Message::Append(_) => Kind::Append,
            Message::AppendReply(_) => Kind::AppendReply,
            Message::StreamAppend(_) => Kind::StreamAppend,
            Message::StreamAppendReply(_) => Kind::StreamAppendReply,
            Message::SnapshotMeta { .. } => Kind::SnapshotMeta,
            Message::SnapshotChunk(_) => Kind::SnapshotChunk,
            Message::SnapshotEnd(_) => Kind::SnapshotEnd,
            Message::SnapshotAck(_) => Kind::SnapshotAck,
            Message::TransferLeader(_) => Kind::TransferLeader,
            Message::TransferLeaderReply(_) => Kind::TransferLeaderReply,
            Message::End => Kind::End,
            Message::Error { .. } => Kind::Error,
        }
    }
}

/// Appends `msg` as one frame to `out`, as chunks for a vectored write, and returns the
/// frame's size, header included.
///
/// Fixed fields accumulate in one buffer; entry payloads and snapshot data are pushed as
/// chunks of their own, uncopied. On error (a body over `max_len`, an application value
/// that does not encode) `out` is left as it was.
pub(crate) fn encode<C: RaftWireConfig>(
    request_id: u64,
    msg: &Message<C>,
    max_len: usize,
    out: &mut Vec<Bytes>,
) -> Result<usize, FrameError> {
    let start = out.len();
    let result = body::encode_frame(request_id, msg, max_len, out);
    if result.is_err() {
        out.truncate(start);
    }
    result
}

/// Rebuilds the message a frame carries.
///
/// Byte fields (entry payloads, node descriptions, snapshot data) are slices of `body`:
/// nothing is copied before it reaches [`WireMessage::decode`](crate::wire::WireMessage).
pub(crate) fn decode<C: RaftWireConfig>(header: &Header, body: Bytes) -> Result<Message<C>, FrameError> {
    if body.len() != header.len as usize {
        return Err(FrameError::Body {
            kind: header.kind,
            source: DecodeError::invalid(
                "body",
                format!("header announces {} bytes, got {}", header.len, body.len()),
            ),
        });
    }
    body::decode_body(header.kind, body).map_err(|source| FrameError::Body {
        kind: header.kind,
        source,
    })
}
