//! Entry points for the cargo-fuzz targets in `fuzz/` (feature `fuzzing`, off by default; not a
//! stable API).
//!
//! Thin wrappers that hand arbitrary bytes to raftwire's private decoders (the QUIC frame
//! decoder and body decoders, the protobuf conversions, the shipped [`WireMessage`] impls and the
//! certificate parsing), all with the demo type config [`KvConfig`]. A wrapper never panics on
//! its own account: a panic under one is a bug in the code it calls. Each also checks
//! properties that must hold for every input (what decodes re-encodes and decodes again, the
//! same stream cut anywhere gives the same frames, ...): a broken one comes back as a
//! [`Violation`], which the fuzz target turns into a crash.
//!
//! The `run_*` functions take a whole fuzz input and split it into the wrappers' arguments;
//! the layout is documented on each. [`seed_corpus`] builds inputs in those layouts from real
//! messages (`cargo test --features fuzzing --lib write_seed_corpus -- --ignored` writes them to
//! `fuzz/corpus/`).

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::fmt;

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
use prost::Message as _;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::certs::CertificateAuthority;
use crate::codec;
use crate::codec::ErrorCode;
use crate::codec::FrameDecoder;
use crate::codec::HEADER_LEN;
use crate::codec::Header;
use crate::codec::Kind;
use crate::codec::Message;
use crate::error::DecodeError;
use crate::error::EncodeError;
use crate::grpc::convert;
use crate::grpc::pb;
use crate::kv::KvConfig;
use crate::kv::KvRequest;
use crate::kv::KvResponse;
use crate::tls;
use crate::tls::TlsConfig;
use crate::types::WireLeaderId;
use crate::wire::Json;
use crate::wire::WireMessage;

type C = KvConfig;

/// A property that must hold for every input did not: a bug in the code under test.
#[derive(Clone, PartialEq, Eq)]
pub struct Violation(pub String);

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Violation {}

/// What every wrapper returns: `Ok(true)` when the input was accepted (decoded, parsed),
/// `Ok(false)` when it was refused with an error, `Err` when a property broke.
pub type Checked = Result<bool, Violation>;

fn violation(what: impl fmt::Display) -> Violation {
    Violation(what.to_string())
}

/// Splits a `u16` (big-endian) length-prefixed part off the front of `data`; the length is
/// clamped to what is there.
fn take_part(data: &[u8]) -> (&[u8], &[u8]) {
    let (len, rest) = match data {
        [a, b, rest @ ..] => (usize::from(u16::from_be_bytes([*a, *b])), rest),
        _ => (0, &[][..]),
    };
    rest.split_at(len.min(rest.len()))
}

/// Prefixes `part` with its `u16` length, the inverse of [`take_part`].
fn put_part(out: &mut Vec<u8>, part: &[u8]) {
    let len = u16::try_from(part.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&part[..usize::from(len)]);
}

// ---- QUIC frames ----

/// One frame as a [`FrameDecoder`] cut it.
#[derive(Debug, PartialEq, Eq)]
struct CutFrame {
    kind: u8,
    request_id: u64,
    body: Bytes,
    /// Whether the body decoded as its kind.
    decoded: bool,
}

/// Feeds `data` to a fresh decoder in pieces whose sizes cycle through `chunks` (`0`: all that
/// is left; no sizes: everything at once), cutting frames after every piece as the QUIC
/// receive loops do. Returns the frames and the error that stopped the decoder, if any.
fn cut_frames(data: &[u8], max_len: usize, chunks: &[u8]) -> (Vec<CutFrame>, Option<String>) {
    let mut decoder = FrameDecoder::new(max_len).with_compression();
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut sizes = chunks.iter().cycle();
    let mut rest = data;
    loop {
        let take = match sizes.next() {
            None | Some(0) => rest.len(),
            Some(&n) => usize::from(n).min(rest.len()),
        };
        let (piece, tail) = rest.split_at(take);
        buf.extend_from_slice(piece);
        rest = tail;
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some((header, body))) => {
                    let decoded = codec::decode::<C>(&header, body.clone()).is_ok();
                    frames.push(CutFrame {
                        kind: header.kind as u8,
                        request_id: header.request_id,
                        body,
                        decoded,
                    });
                }
                Ok(None) => break,
                Err(e) => return (frames, Some(e.to_string())),
            }
        }
        if rest.is_empty() {
            return (frames, None);
        }
    }
}

/// Cuts frames out of `data` with a [`FrameDecoder`] refusing bodies over `max_len`, feeding it
/// in pieces whose sizes cycle through `chunks` (a `0` size: all that is left), and decodes
/// each frame's body with `codec::decode`.
///
/// Checks that the frames (and the error that ends the stream, if any) are the same as when
/// `data` arrives all at once, and that no body exceeds `max_len`. Returns `Ok(true)` if the
/// stream ended without a framing error.
pub fn decode_frames(data: &[u8], max_len: usize, chunks: &[u8]) -> Checked {
    let (whole, whole_err) = cut_frames(data, max_len, &[]);
    let (split, split_err) = cut_frames(data, max_len, chunks);
    if whole != split || whole_err != split_err {
        return Err(violation(format_args!(
            "fed in pieces of {chunks:?}, the decoder cut {} frames (error {split_err:?}); \
             fed at once, {} frames (error {whole_err:?})",
            split.len(),
            whole.len()
        )));
    }
    if let Some(f) = whole.iter().find(|f| f.body.len() > max_len) {
        return Err(violation(format_args!(
            "a frame body of {} bytes passed the limit of {max_len}",
            f.body.len()
        )));
    }
    Ok(whole_err.is_none())
}

/// Fuzz input layout for [`decode_frames`]: byte 0 = how many chunk sizes follow (mod 8),
/// bytes 1..5 = `max_len` (`u32`, big-endian), then the chunk sizes (one byte each), then the
/// byte stream.
pub fn run_frame_decoder(input: &[u8]) -> Checked {
    let Some((&n, rest)) = input.split_first() else {
        return Ok(false);
    };
    let Some((max_len, rest)) = rest.split_first_chunk::<4>() else {
        return Ok(false);
    };
    let n = usize::from(n % 8).min(rest.len());
    let (chunks, stream) = rest.split_at(n);
    // At most 16 MiB: a compressed frame may inflate to the limit, and a larger one would only
    // measure the fuzzer's memory.
    let max_len = (u32::from_be_bytes(*max_len) as usize).min(16 << 20);
    decode_frames(stream, max_len, chunks)
}

// ---- QUIC bodies ----

/// Whether re-encoding `msg` may reorder (sort) parts of it: voter sets and node maps.
fn has_membership(msg: &Message<C>) -> bool {
    match msg {
        Message::Append(r) | Message::StreamAppend(r) => r
            .entries
            .iter()
            .any(|e| matches!(e.payload, EntryPayload::Membership(_))),
        Message::SnapshotMeta { .. } => true,
        _ => false,
    }
}

/// Encodes `msg` as one frame and returns its body, checking the header the encoder wrote.
fn encode_body(msg: &Message<C>) -> Result<Vec<u8>, Violation> {
    let mut chunks = Vec::new();
    let size = codec::encode(7, msg, usize::MAX, &mut chunks)
        .map_err(|e| violation(format_args!("a decoded {:?} does not re-encode: {e}", msg.kind())))?;
    let frame: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
    if frame.len() != size {
        return Err(violation(format_args!(
            "encode reported {size} bytes, wrote {}",
            frame.len()
        )));
    }
    match Header::parse(&frame, usize::MAX, 0) {
        Ok(Some(h)) if h.kind == msg.kind() && h.request_id == 7 && h.len as usize + HEADER_LEN == size => {
            Ok(frame[HEADER_LEN..].to_vec())
        }
        other => Err(violation(format_args!(
            "the header written for a {:?} of {size} bytes reads back as {other:?}",
            msg.kind()
        ))),
    }
}

/// Decodes `body` as a frame body of kind `kind` with `codec::decode`.
///
/// Checks that whatever decodes re-encodes to a body of the same length (byte for byte the
/// same unless it holds a membership, whose voter sets and nodes are re-encoded sorted), and
/// that the re-encoded body decodes and encodes again to the same bytes.
pub fn decode_body(kind: u8, body: &[u8]) -> Checked {
    let Ok(kind) = Kind::try_from(kind) else {
        return Ok(false);
    };
    let Ok(len) = u32::try_from(body.len()) else {
        return Ok(false);
    };
    let header = Header {
        kind,
        flags: 0,
        len,
        request_id: 0,
    };
    let Ok(msg) = codec::decode::<C>(&header, Bytes::copy_from_slice(body)) else {
        return Ok(false);
    };
    if msg.kind() != kind {
        return Err(violation(format_args!(
            "a {kind:?} body decoded as a {:?}",
            msg.kind()
        )));
    }
    let first = encode_body(&msg)?;
    if first.len() != body.len() || (!has_membership(&msg) && first != body) {
        return Err(violation(format_args!(
            "a {kind:?} body of {} bytes re-encodes as {} different bytes",
            body.len(),
            first.len()
        )));
    }
    let header = Header { len, ..header };
    let again = codec::decode::<C>(&header, Bytes::from(first.clone()))
        .map_err(|e| violation(format_args!("a re-encoded {kind:?} does not decode: {e}")))?;
    if encode_body(&again)? != first {
        return Err(violation(format_args!(
            "a {kind:?} changes on its second trip through encode and decode"
        )));
    }
    Ok(true)
}

/// Fuzz input layout for [`decode_body`]: byte 0 = the kind, the rest = the body.
pub fn run_body_decoder(input: &[u8]) -> Checked {
    match input.split_first() {
        Some((&kind, body)) => decode_body(kind, body),
        None => Ok(false),
    }
}

// ---- protobuf conversions ----

/// The protobuf messages [`decode_pb`] decodes, by `which % PB_TYPES.len()`.
pub const PB_TYPES: [&str; 9] = [
    "VoteRequest",
    "VoteResponse",
    "AppendEntriesRequest",
    "AppendEntriesResponse",
    "StreamAppendReply",
    "SnapshotChunk",
    "SnapshotResponse",
    "TransferLeaderRequest",
    "TransferLeaderResponse",
];

/// Decodes `data` as `M`, converts it with `from`; on success converts back with `to`, and
/// checks the result survives prost and a second conversion unchanged.
fn pb_trip<M, T>(
    data: &[u8],
    from: impl Fn(M) -> Result<T, DecodeError>,
    to: impl Fn(&T) -> Result<M, EncodeError>,
) -> Checked
where
    M: prost::Message + Default + PartialEq,
{
    let name = std::any::type_name::<M>();
    let Ok(m) = M::decode(data) else {
        return Ok(false);
    };
    let Ok(v) = from(m) else {
        return Ok(false);
    };
    let m1 = to(&v).map_err(|e| violation(format_args!("a converted {name} does not convert back: {e}")))?;
    let m2 = M::decode(m1.encode_to_vec().as_slice())
        .map_err(|e| violation(format_args!("{name} does not survive prost: {e}")))?;
    if m2 != m1 {
        return Err(violation(format_args!("{name} changes through prost")));
    }
    let v2 = from(m2).map_err(|e| violation(format_args!("a re-encoded {name} does not convert: {e}")))?;
    let m3 = to(&v2).map_err(|e| violation(format_args!("{name} does not convert back twice: {e}")))?;
    if m3 != m1 {
        return Err(violation(format_args!(
            "{name} changes on its second trip through the conversions"
        )));
    }
    Ok(true)
}

/// Decodes `data` as the protobuf message `PB_TYPES[which % PB_TYPES.len()]` and runs its
/// `*_from_pb` conversion (for a `SnapshotChunk`, the header's); what converts must convert
/// back and survive a second round trip unchanged.
pub fn decode_pb(which: u8, data: &[u8]) -> Checked {
    match usize::from(which) % PB_TYPES.len() {
        0 => pb_trip(data, convert::vote_request_from_pb::<C>, |v| {
            Ok(convert::vote_request_to_pb(v))
        }),
        1 => pb_trip(data, convert::vote_response_from_pb::<C>, |v| {
            Ok(convert::vote_response_to_pb(v))
        }),
        2 => pb_trip(
            data,
            convert::append_request_from_pb::<C>,
            convert::append_request_to_pb::<C>,
        ),
        3 => pb_trip(data, convert::append_response_from_pb::<C>, |v| {
            Ok(convert::append_response_to_pb(v))
        }),
        4 => pb_trip(data, convert::stream_reply_from_pb::<C>, |v| {
            Ok(convert::stream_reply_to_pb(v))
        }),
        5 => pb_trip(
            data,
            |chunk: pb::SnapshotChunk| match chunk.kind {
                Some(pb::snapshot_chunk::Kind::Header(h)) => convert::snapshot_header_from_pb::<C>(h),
                _ => Err(DecodeError::missing("header")),
            },
            |(vote, meta)| {
                Ok(pb::SnapshotChunk {
                    kind: Some(pb::snapshot_chunk::Kind::Header(
                        convert::snapshot_header_to_pb::<C>(vote, meta)?,
                    )),
                })
            },
        ),
        6 => pb_trip(data, convert::snapshot_response_from_pb::<C>, |v| {
            Ok(convert::snapshot_response_to_pb(v))
        }),
        7 => pb_trip(data, convert::transfer_request_from_pb::<C>, |v| {
            Ok(convert::transfer_request_to_pb(v))
        }),
        _ => pb_trip(data, convert::transfer_response_from_pb::<C>, |v| {
            Ok(convert::transfer_response_to_pb(v))
        }),
    }
}

/// Fuzz input layout for [`decode_pb`]: byte 0 = `which`, the rest = the protobuf bytes.
pub fn run_pb_convert(input: &[u8]) -> Checked {
    match input.split_first() {
        Some((&which, data)) => decode_pb(which, data),
        None => Ok(false),
    }
}

// ---- application values ----

/// A typed value for [`Json`]: every field round-trips exactly (no floats).
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Record {
    key: String,
    values: Vec<u64>,
    flag: Option<bool>,
    nested: BTreeMap<String, i64>,
    kind: RecordKind,
}

#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
enum RecordKind {
    Plain,
    Tagged(u32),
    Named { name: String },
}

/// The [`WireMessage`] types [`decode_wire`] decodes, by `which % WIRE_TYPES.len()`.
pub const WIRE_TYPES: [&str; 5] = [
    "KvRequest",
    "KvResponse",
    "BasicNode",
    "Json<serde_json::Value>",
    "Json<Record>",
];

/// Decodes `data` as `T`; what decodes must encode back to exactly `data`.
fn wire_exact<T: WireMessage>(data: &[u8]) -> Checked {
    let Ok(v) = T::decode(Bytes::copy_from_slice(data)) else {
        return Ok(false);
    };
    let name = std::any::type_name::<T>();
    match v.encode() {
        Ok(b) if b == data => Ok(true),
        Ok(b) => Err(violation(format_args!(
            "a decoded {name} of {} bytes encodes as {} different bytes",
            data.len(),
            b.len()
        ))),
        Err(e) => Err(violation(format_args!("a decoded {name} does not encode: {e}"))),
    }
}

/// Decodes `data` as `T`; what decodes must encode, and decode again to an equal value when
/// `T: PartialEq` (`same` compares).
fn wire_trip<T: WireMessage>(data: &[u8], same: impl Fn(&T, &T) -> bool) -> Checked {
    let Ok(v) = T::decode(Bytes::copy_from_slice(data)) else {
        return Ok(false);
    };
    let name = std::any::type_name::<T>();
    let b = v
        .encode()
        .map_err(|e| violation(format_args!("a decoded {name} does not encode: {e}")))?;
    let again =
        T::decode(b).map_err(|e| violation(format_args!("an encoded {name} does not decode: {e}")))?;
    if !same(&v, &again) {
        return Err(violation(format_args!(
            "{name} changes through encode and decode"
        )));
    }
    Ok(true)
}

/// Decodes `data` with the [`WireMessage`] impl of `WIRE_TYPES[which % WIRE_TYPES.len()]`.
///
/// The binary formats (`KvRequest`, `KvResponse`, `BasicNode`) must re-encode byte for byte;
/// `Json` values must re-encode and decode again (to an equal value for the float-free
/// record type).
pub fn decode_wire(which: u8, data: &[u8]) -> Checked {
    match usize::from(which) % WIRE_TYPES.len() {
        0 => wire_exact::<KvRequest>(data),
        1 => wire_exact::<KvResponse>(data),
        2 => wire_exact::<BasicNode>(data),
        // Without serde_json's `float_roundtrip` a float may move by an ulp: no equality.
        3 => wire_trip::<Json<serde_json::Value>>(data, |_, _| true),
        _ => wire_trip::<Json<Record>>(data, |a, b| a == b),
    }
}

/// Fuzz input layout for [`decode_wire`]: byte 0 = `which`, the rest = the encoded value.
pub fn run_wire_message(input: &[u8]) -> Checked {
    match input.split_first() {
        Some((&which, data)) => decode_wire(which, data),
        None => Ok(false),
    }
}

// ---- certificates ----

/// Standard base64 with padding, to wrap DER in PEM.
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for group in data.chunks(3) {
        let b = [group[0], *group.get(1).unwrap_or(&0), *group.get(2).unwrap_or(&0)];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= group.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `der` as a PEM certificate block.
fn der_to_pem(der: &[u8]) -> String {
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    let b64 = base64(der);
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

/// Runs `inspect_certificate` on `pem` (invalid UTF-8 replaced, as `raftwire certs inspect`
/// does). A node id it reports must be one a DNS SAN names as `node-<id>.raftwire` (compared
/// as DNS compares names, and as webpki matches them: ignoring ASCII case).
pub fn inspect_pem(pem: &[u8]) -> Checked {
    let Ok(info) = crate::certs::inspect(&String::from_utf8_lossy(pem)) else {
        return Ok(false);
    };
    if let Some(id) = info.node_id {
        let san = format!("DNS:{}", tls::node_dns_name(id));
        if !info.sans.iter().any(|s| s.eq_ignore_ascii_case(&san)) {
            return Err(violation(format_args!(
                "inspect reports node id {id}, but no SAN is {san} (SANs: {:?})",
                info.sans
            )));
        }
    }
    Ok(true)
}

/// Extracts node ids and client names from `der` as a TLS peer's certificate
/// (`peer_node_id`, `peer_client_name`, the name lists behind them) and inspects it wrapped in
/// PEM. Both must agree on the node id and the client name, a certificate is never both a
/// node's and a client's, and every id must be named exactly as `node-<id>.raftwire`.
pub fn inspect_der(der: &[u8]) -> Checked {
    let cert = CertificateDer::from(der);
    let names = tls::node_names(&cert);
    let ids = names.ids.clone();
    let peer = tls::peer_node_id(Some(std::slice::from_ref(&cert)));
    if peer != names.exact() {
        return Err(violation(format_args!(
            "peer_node_id says {peer:?}, the certificate names {names}"
        )));
    }
    let client = tls::peer_client_name(Some(std::slice::from_ref(&cert)));
    if client.as_deref() != names.client() || (client.is_some() && peer.is_some()) {
        return Err(violation(format_args!(
            "peer_client_name says {client:?} and peer_node_id {peer:?}, the certificate names {names}"
        )));
    }
    let Ok(info) = crate::certs::inspect(&der_to_pem(der)) else {
        if !ids.is_empty() {
            return Err(violation(format_args!(
                "a certificate naming nodes {ids:?} does not inspect"
            )));
        }
        return Ok(false);
    };
    if info.node_id != peer {
        return Err(violation(format_args!(
            "inspect says node {:?}, the TLS layer node {peer:?}",
            info.node_id
        )));
    }
    if info.client_name != client {
        return Err(violation(format_args!(
            "inspect says client {:?}, the TLS layer client {client:?}",
            info.client_name
        )));
    }
    for id in ids {
        let san = format!("DNS:{}", tls::node_dns_name(id));
        // Names compare as DNS does: case-insensitively.
        if !info.sans.iter().any(|s| s.eq_ignore_ascii_case(&san)) {
            return Err(violation(format_args!(
                "the TLS layer takes the certificate for node {id}, but no SAN is {san} (SANs: {:?})",
                info.sans
            )));
        }
    }
    Ok(true)
}

/// Parses `name` (invalid UTF-8 replaced) as a node identity DNS name: a node id `n` must come
/// only from exactly `node-<n>.raftwire`.
pub fn parse_dns_name(name: &[u8]) -> Checked {
    let name = String::from_utf8_lossy(name);
    let Some(id) = tls::parse_node_dns_name(&name) else {
        return Ok(false);
    };
    if !tls::node_dns_name(id).eq_ignore_ascii_case(&name) {
        return Err(violation(format_args!(
            "{name:?} is taken for node {id}, whose name is {:?}",
            tls::node_dns_name(id)
        )));
    }
    Ok(true)
}

/// Loads a TLS identity with `TlsConfig::from_pem`; one that loads must name its node id.
pub fn load_tls(ca_pem: &[u8], cert_pem: &[u8], key_pem: &[u8]) -> Checked {
    let Ok(config) = TlsConfig::from_pem(ca_pem, cert_pem, key_pem) else {
        return Ok(false);
    };
    let id = config.node_id();
    let named = CertificateDer::pem_slice_iter(cert_pem)
        .next()
        .and_then(Result::ok)
        .map(|c| tls::node_names(&c).exact());
    if named != Some(Some(id)) {
        return Err(violation(format_args!(
            "a TLS identity for node {id} loaded from a certificate naming {named:?}"
        )));
    }
    Ok(true)
}

/// Loads a CA with `CertificateAuthority::from_pem` (invalid UTF-8 replaced).
pub fn load_ca(cert_pem: &[u8], key_pem: &[u8]) -> Checked {
    Ok(CertificateAuthority::from_pem(
        &String::from_utf8_lossy(cert_pem),
        &String::from_utf8_lossy(key_pem),
    )
    .is_ok())
}

/// Fuzz input layout for the certificate wrappers: byte 0 picks one (mod 5), the rest is its
/// input: 0 [`inspect_pem`], 1 [`inspect_der`], 2 [`parse_dns_name`], 3 [`load_tls`] (three
/// parts, each prefixed with a `u16` big-endian length), 4 [`load_ca`] (two such parts).
pub fn run_certificates(input: &[u8]) -> Checked {
    let Some((&mode, data)) = input.split_first() else {
        return Ok(false);
    };
    match mode % 5 {
        0 => inspect_pem(data),
        1 => inspect_der(data),
        2 => parse_dns_name(data),
        3 => {
            let (ca, rest) = take_part(data);
            let (cert, rest) = take_part(rest);
            let (key, _) = take_part(rest);
            load_tls(ca, cert, key)
        }
        _ => {
            let (cert, rest) = take_part(data);
            let (key, _) = take_part(rest);
            load_ca(cert, key)
        }
    }
}

// ---- seed corpus ----

fn leader(term: u64, node_id: u64) -> WireLeaderId {
    WireLeaderId { term, node_id }
}

fn vote(term: u64, node_id: u64, committed: bool) -> Vote<WireLeaderId> {
    Vote {
        leader_id: leader(term, node_id),
        committed,
    }
}

fn log_id(term: u64, node_id: u64, index: u64) -> LogId<WireLeaderId> {
    LogId {
        leader_id: leader(term, node_id),
        index,
    }
}

fn membership(configs: &[&[u64]], learners: &[u64]) -> Membership<u64, BasicNode> {
    let configs: Vec<BTreeSet<u64>> = configs.iter().map(|c| c.iter().copied().collect()).collect();
    let nodes: BTreeMap<u64, BasicNode> = configs
        .iter()
        .flatten()
        .chain(learners)
        .map(|id| (*id, BasicNode::new(format!("10.0.0.{id}:500{id}"))))
        .collect();
    Membership::new(configs, nodes).unwrap_or_default()
}

fn entry(
    index: u64,
    payload: EntryPayload<KvRequest, u64, BasicNode>,
) -> Entry<WireLeaderId, EntryPayload<KvRequest, u64, BasicNode>> {
    Entry {
        log_id: log_id(2, 1, index),
        payload,
    }
}

fn set(key: &str, value: &[u8]) -> KvRequest {
    KvRequest::Set {
        key: key.into(),
        value: Bytes::copy_from_slice(value),
    }
}

fn append(
    entries: Vec<Entry<WireLeaderId, EntryPayload<KvRequest, u64, BasicNode>>>,
) -> AppendEntriesRequest<C> {
    AppendEntriesRequest {
        vote: vote(2, 1, true),
        prev_log_id: Some(log_id(2, 1, 9)),
        entries,
        leader_commit: Some(log_id(1, 1, 8)),
    }
}

/// Real messages of every frame kind, named.
fn sample_messages() -> Vec<(&'static str, Message<C>)> {
    let snapshot_meta = || openraft::SnapshotMeta {
        last_log_id: Some(log_id(2, 1, 40)),
        last_membership: StoredMembership::new(Some(log_id(1, 1, 3)), membership(&[&[1, 2, 3]], &[4])),
    };
    vec![
        (
            "vote",
            Message::Vote(VoteRequest {
                vote: vote(3, 2, false),
                last_log_id: Some(log_id(2, 1, 17)),
                leadership_transfer: false,
            }),
        ),
        (
            "vote-empty-log",
            Message::Vote(VoteRequest {
                vote: vote(1, 1, false),
                last_log_id: None,
                leadership_transfer: true,
            }),
        ),
        (
            "pre-vote",
            Message::PreVote(VoteRequest {
                vote: vote(4, 3, false),
                last_log_id: Some(log_id(3, 2, 21)),
                leadership_transfer: false,
            }),
        ),
        (
            "vote-reply",
            Message::VoteReply(VoteResponse {
                vote: vote(3, 2, false),
                vote_granted: true,
                last_log_id: Some(log_id(2, 1, 17)),
            }),
        ),
        ("heartbeat", Message::Append(append(Vec::new()))),
        (
            "append-entries",
            Message::Append(append(vec![
                entry(10, EntryPayload::Blank),
                entry(11, EntryPayload::Normal(set("alpha", b"one"))),
                entry(12, EntryPayload::Normal(KvRequest::Delete { key: "beta".into() })),
            ])),
        ),
        (
            "append-membership",
            Message::Append(append(vec![
                entry(10, EntryPayload::Membership(membership(&[&[1, 2, 3]], &[]))),
                entry(
                    11,
                    EntryPayload::Membership(membership(&[&[1, 2, 3], &[2, 3, 4]], &[5])),
                ),
            ])),
        ),
        (
            "append-reply-success",
            Message::AppendReply(AppendEntriesResponse::Success),
        ),
        (
            "append-reply-partial",
            Message::AppendReply(AppendEntriesResponse::PartialSuccess(Some(log_id(2, 1, 11)))),
        ),
        (
            "append-reply-conflict",
            Message::AppendReply(AppendEntriesResponse::Conflict),
        ),
        (
            "append-reply-higher-vote",
            Message::AppendReply(AppendEntriesResponse::HigherVote(vote(5, 3, true))),
        ),
        (
            "stream-append",
            Message::StreamAppend(append(vec![
                entry(10, EntryPayload::Normal(set("k1", &[0u8; 64]))),
                entry(11, EntryPayload::Normal(set("k2", b""))),
            ])),
        ),
        (
            "stream-append-reply",
            Message::StreamAppendReply(Ok(Some(log_id(2, 1, 11)))),
        ),
        ("stream-append-reply-none", Message::StreamAppendReply(Ok(None))),
        (
            "stream-append-conflict",
            Message::StreamAppendReply(Err(StreamAppendError::Conflict(log_id(2, 1, 9)))),
        ),
        (
            "stream-append-higher-vote",
            Message::StreamAppendReply(Err(StreamAppendError::HigherVote(vote(6, 2, false)))),
        ),
        (
            "snapshot-meta",
            Message::SnapshotMeta {
                vote: vote(2, 1, true),
                meta: snapshot_meta(),
            },
        ),
        (
            "snapshot-chunk",
            Message::SnapshotChunk(Bytes::from_static(b"{\"alpha\":\"one\"}")),
        ),
        (
            "snapshot-ack",
            Message::SnapshotAck(SnapshotResponse {
                vote: vote(2, 1, true),
            }),
        ),
        (
            "transfer-leader",
            Message::TransferLeader(TransferLeaderRequest::new(
                vote(2, 1, true),
                3,
                Some(log_id(2, 1, 40)),
            )),
        ),
        ("transfer-leader-ok", Message::TransferLeaderReply(Ok(()))),
        (
            "transfer-leader-vote-changed",
            Message::TransferLeaderReply(Err(TransferLeaderError::VoteChanged {
                expected: vote(2, 1, true),
                actual: vote(3, 2, true),
            })),
        ),
        (
            "transfer-leader-not-flushed",
            Message::TransferLeaderReply(Err(TransferLeaderError::LogNotFlushed {
                expected: Some(log_id(2, 1, 40)),
                actual: None,
            })),
        ),
        (
            "error-bad-request",
            Message::Error {
                code: ErrorCode::BadRequest,
                message: "Append frame does not decode: entries[3].log_id.index: body ends early".into(),
            },
        ),
        (
            "error-too-large",
            Message::Error {
                code: ErrorCode::TooLarge,
                message: "frame of 70000000 bytes exceeds the limit of 67108864".into(),
            },
        ),
    ]
}

/// `msg` as one frame's bytes.
fn frame_bytes(request_id: u64, msg: &Message<C>) -> Result<Vec<u8>, String> {
    let mut chunks = Vec::new();
    codec::encode(request_id, msg, 64 << 20, &mut chunks).map_err(|e| e.to_string())?;
    Ok(chunks.iter().flat_map(|c| c.iter().copied()).collect())
}

/// The protobuf form of `msg` as a [`decode_pb`] input, where it has one.
fn pb_input(msg: &Message<C>) -> Result<Option<Vec<u8>>, String> {
    let e = |e: EncodeError| e.0;
    let (which, bytes) = match msg {
        Message::Vote(r) | Message::PreVote(r) => (0, convert::vote_request_to_pb(r).encode_to_vec()),
        Message::VoteReply(r) => (1, convert::vote_response_to_pb(r).encode_to_vec()),
        Message::Append(r) | Message::StreamAppend(r) => {
            (2, convert::append_request_to_pb(r).map_err(e)?.encode_to_vec())
        }
        Message::AppendReply(r) => (3, convert::append_response_to_pb(r).encode_to_vec()),
        Message::StreamAppendReply(r) => (4, convert::stream_reply_to_pb(r).encode_to_vec()),
        Message::SnapshotMeta { vote, meta } => {
            let header = convert::snapshot_header_to_pb::<C>(vote, meta).map_err(e)?;
            let chunk = pb::SnapshotChunk {
                kind: Some(pb::snapshot_chunk::Kind::Header(header)),
            };
            (5, chunk.encode_to_vec())
        }
        Message::SnapshotChunk(data) => {
            let chunk = pb::SnapshotChunk {
                kind: Some(pb::snapshot_chunk::Kind::Data(data.clone())),
            };
            (5, chunk.encode_to_vec())
        }
        Message::SnapshotEnd(t) => {
            let chunk = pb::SnapshotChunk {
                kind: Some(pb::snapshot_chunk::Kind::Trailer(pb::SnapshotTrailer {
                    length: t.length,
                    crc32c: t.crc32c,
                })),
            };
            (5, chunk.encode_to_vec())
        }
        Message::SnapshotAck(r) => (6, convert::snapshot_response_to_pb(r).encode_to_vec()),
        Message::TransferLeader(r) => (7, convert::transfer_request_to_pb(r).encode_to_vec()),
        Message::TransferLeaderReply(r) => (8, convert::transfer_response_to_pb(r).encode_to_vec()),
        Message::Error { .. } | Message::End => return Ok(None),
    };
    let mut input = vec![which];
    input.extend_from_slice(&bytes);
    Ok(Some(input))
}

/// One seed input: `(target, file name, bytes)`.
pub type Seed = (&'static str, String, Vec<u8>);

/// Seed inputs for every fuzz target, built from real messages (every frame kind, their
/// protobuf forms, application values) and from certificates made by a fresh
/// [`CertificateAuthority`].
pub fn seed_corpus() -> Result<Vec<Seed>, String> {
    let mut seeds = Vec::new();
    let messages = sample_messages();

    // Bodies and protobuf forms, one per message.
    for (name, msg) in &messages {
        let frame = frame_bytes(1, msg)?;
        let mut body = vec![msg.kind() as u8];
        body.extend_from_slice(&frame[HEADER_LEN..]);
        seeds.push(("body_decoder", (*name).to_string(), body));
        if let Some(input) = pb_input(msg)? {
            seeds.push(("pb_convert", (*name).to_string(), input));
        }
    }

    // Frame streams: each message alone, then conversations, under various piece sizes.
    let frame_input = |chunks: &[u8], max_len: u32, frames: &[Vec<u8>]| {
        let mut input = vec![chunks.len() as u8];
        input.extend_from_slice(&max_len.to_be_bytes());
        input.extend_from_slice(chunks);
        for f in frames {
            input.extend_from_slice(f);
        }
        input
    };
    for (i, (name, msg)) in messages.iter().enumerate() {
        let chunks: &[u8] = match i % 4 {
            0 => &[],
            1 => &[1],
            2 => &[7, 0],
            _ => &[18, 3, 200],
        };
        let frame = frame_bytes(i as u64 + 1, msg)?;
        seeds.push((
            "frame_decoder",
            (*name).to_string(),
            frame_input(chunks, 64 << 20, &[frame]),
        ));
    }
    let by_name = |n: &str| messages.iter().find(|(name, _)| *name == n).map(|(_, m)| m);
    let conversation = |names: &[&str]| -> Result<Vec<Vec<u8>>, String> {
        let mut frames = Vec::new();
        for (i, n) in names.iter().enumerate() {
            let msg = by_name(n).ok_or_else(|| format!("no sample {n}"))?;
            frames.push(frame_bytes(i as u64 + 1, msg)?);
        }
        Ok(frames)
    };
    let stream = conversation(&["stream-append", "stream-append", "heartbeat", "append-entries"])?;
    let replies = conversation(&[
        "stream-append-reply",
        "stream-append-reply",
        "stream-append-conflict",
    ])?;
    let snapshot = conversation(&[
        "snapshot-meta",
        "snapshot-chunk",
        "snapshot-chunk",
        "snapshot-ack",
    ])?;
    let error = conversation(&["vote", "error-bad-request"])?;
    seeds.push((
        "frame_decoder",
        "stream-whole".into(),
        frame_input(&[], 64 << 20, &stream),
    ));
    seeds.push((
        "frame_decoder",
        "stream-bytewise".into(),
        frame_input(&[1], 64 << 20, &stream),
    ));
    seeds.push((
        "frame_decoder",
        "replies-split".into(),
        frame_input(&[5, 40, 0], 64 << 20, &replies),
    ));
    seeds.push((
        "frame_decoder",
        "snapshot-split".into(),
        frame_input(&[17, 19, 255], 64 << 20, &snapshot),
    ));
    seeds.push((
        "frame_decoder",
        "snapshot-small-limit".into(),
        frame_input(&[9], 64, &snapshot),
    ));
    seeds.push((
        "frame_decoder",
        "vote-then-error".into(),
        frame_input(&[2, 3], 1 << 16, &error),
    ));
    let mut truncated = frame_input(&[4], 64 << 20, &stream);
    truncated.truncate(truncated.len() - 5);
    seeds.push(("frame_decoder", "stream-truncated".into(), truncated));

    // Protobuf: a vote request with an unknown field.
    let vote = by_name("vote").ok_or("no vote sample")?;
    let mut unknown = pb_input(vote)?.ok_or("no protobuf vote")?;
    unknown.extend_from_slice(&[0x78, 0x05]); // field 15, varint 5
    seeds.push(("pb_convert", "unknown-fields".into(), unknown));

    // Application values.
    let wire = |which: u8, b: Result<Bytes, EncodeError>| -> Result<Vec<u8>, String> {
        let mut input = vec![which];
        input.extend_from_slice(&b.map_err(|e| e.0)?);
        Ok(input)
    };
    seeds.push((
        "wire_message",
        "kv-set".into(),
        wire(0, set("alpha", b"one").encode())?,
    ));
    seeds.push((
        "wire_message",
        "kv-set-empty".into(),
        wire(0, set("", b"").encode())?,
    ));
    seeds.push((
        "wire_message",
        "kv-set-binary".into(),
        wire(0, set("k\u{e9}y", &[0, 0xff, 7]).encode())?,
    ));
    seeds.push((
        "wire_message",
        "kv-delete".into(),
        wire(0, KvRequest::Delete { key: "beta".into() }.encode())?,
    ));
    seeds.push((
        "wire_message",
        "kv-response-none".into(),
        wire(1, KvResponse { previous: None }.encode())?,
    ));
    seeds.push((
        "wire_message",
        "kv-response-some".into(),
        wire(
            1,
            KvResponse {
                previous: Some(Bytes::from_static(b"one")),
            }
            .encode(),
        )?,
    ));
    seeds.push((
        "wire_message",
        "basic-node".into(),
        wire(2, BasicNode::new("10.0.0.1:5001").encode())?,
    ));
    let json_values = [
        r#"{"key":"alpha","n":7}"#,
        r#"[1,-2,3.5e10,null,true,"x\u00e9\n"]"#,
        r#"{"nested":{"a":[{"b":{}}],"c":1.0e-7}}"#,
        r#""just a string""#,
        "18446744073709551615",
    ];
    for (i, v) in json_values.iter().enumerate() {
        let value: serde_json::Value = serde_json::from_str(v).map_err(|e| e.to_string())?;
        seeds.push((
            "wire_message",
            format!("json-value-{i}"),
            wire(3, Json(value).encode())?,
        ));
    }
    let records = [
        Record {
            key: "alpha".into(),
            values: vec![1, 2, u64::MAX],
            flag: Some(true),
            nested: [("x".to_string(), -5i64)].into_iter().collect(),
            kind: RecordKind::Plain,
        },
        Record {
            key: String::new(),
            values: Vec::new(),
            flag: None,
            nested: BTreeMap::new(),
            kind: RecordKind::Tagged(9),
        },
        Record {
            key: "\u{2603}".into(),
            values: vec![0],
            flag: Some(false),
            nested: BTreeMap::new(),
            kind: RecordKind::Named { name: "n".into() },
        },
    ];
    for (i, r) in records.into_iter().enumerate() {
        seeds.push((
            "wire_message",
            format!("json-record-{i}"),
            wire(4, Json(r).encode())?,
        ));
    }

    // Certificates.
    let ca = CertificateAuthority::generate("raftwire fuzz seed CA").map_err(|e| e.to_string())?;
    let node = ca
        .issue(
            1,
            &["localhost".into(), "10.0.0.1".into(), "::1".into()],
            Default::default(),
        )
        .map_err(|e| e.to_string())?;
    let node7 = ca.issue(7, &[], Default::default()).map_err(|e| e.to_string())?;
    let with_mode = |mode: u8, data: &[u8]| {
        let mut input = vec![mode];
        input.extend_from_slice(data);
        input
    };
    let der = |pem: &str| -> Result<Vec<u8>, String> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| e.to_string())?;
        Ok(pem.contents)
    };
    seeds.push((
        "certificates",
        "pem-ca".into(),
        with_mode(0, ca.cert_pem().as_bytes()),
    ));
    seeds.push((
        "certificates",
        "pem-node-1".into(),
        with_mode(0, node.cert_pem.as_bytes()),
    ));
    seeds.push((
        "certificates",
        "pem-node-7".into(),
        with_mode(0, node7.cert_pem.as_bytes()),
    ));
    seeds.push((
        "certificates",
        "der-ca".into(),
        with_mode(1, &der(ca.cert_pem())?),
    ));
    seeds.push((
        "certificates",
        "der-node-1".into(),
        with_mode(1, &der(&node.cert_pem)?),
    ));
    seeds.push((
        "certificates",
        "der-node-7".into(),
        with_mode(1, &der(&node7.cert_pem)?),
    ));
    for (i, name) in [
        "node-1.raftwire",
        "node-18446744073709551615.raftwire",
        "node-.raftwire",
        "localhost",
    ]
    .iter()
    .enumerate()
    {
        seeds.push((
            "certificates",
            format!("dns-name-{i}"),
            with_mode(2, name.as_bytes()),
        ));
    }
    let mut tls_input = vec![3];
    put_part(&mut tls_input, ca.cert_pem().as_bytes());
    put_part(&mut tls_input, node.cert_pem.as_bytes());
    put_part(&mut tls_input, node.key_pem.as_bytes());
    seeds.push(("certificates", "tls-node-1".into(), tls_input));
    // The CA key is only handed out through the files `write` makes.
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    ca.write(dir.path()).map_err(|e| e.to_string())?;
    let ca_key = std::fs::read(dir.path().join("ca.key")).map_err(|e| e.to_string())?;
    let mut ca_input = vec![4];
    put_part(&mut ca_input, ca.cert_pem().as_bytes());
    put_part(&mut ca_input, &ca_key);
    seeds.push(("certificates", "ca-pair".into(), ca_input));
    Ok(seeds)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes [`seed_corpus`] to `fuzz/corpus/<target>/<name>`:
    /// `cargo test --features fuzzing --lib write_seed_corpus -- --ignored`.
    #[test]
    #[ignore = "writes fuzz/corpus; run by hand"]
    fn write_seed_corpus() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
        for (target, name, bytes) in seed_corpus().unwrap() {
            let dir = root.join(target);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }

    /// Every seed passes its target's checks, and the real messages are all accepted.
    #[test]
    fn seeds_pass_their_targets() {
        for (target, name, bytes) in seed_corpus().unwrap() {
            let run = match target {
                "frame_decoder" => run_frame_decoder,
                "body_decoder" => run_body_decoder,
                "pb_convert" => run_pb_convert,
                "wire_message" => run_wire_message,
                "certificates" => run_certificates,
                other => panic!("unknown target {other}"),
            };
            let accepted = run(&bytes).unwrap_or_else(|v| panic!("{target}/{name}: {v}"));
            let refused_on_purpose = [
                ("frame_decoder", "stream-truncated"),
                ("frame_decoder", "snapshot-small-limit"),
                ("pb_convert", "snapshot-chunk"),
                ("certificates", "dns-name-2"),
                ("certificates", "dns-name-3"),
            ];
            assert!(
                accepted || refused_on_purpose.contains(&(target, name.as_str())),
                "{target}/{name} was refused"
            );
        }
    }

    #[test]
    fn base64_matches_known_vectors() {
        for (input, b64) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), b64);
        }
    }

    #[test]
    fn parts_round_trip() {
        let mut input = Vec::new();
        put_part(&mut input, b"abc");
        put_part(&mut input, b"");
        let (a, rest) = take_part(&input);
        let (b, rest) = take_part(rest);
        assert_eq!((a, b, rest), (&b"abc"[..], &b""[..], &b""[..]));
        assert_eq!(take_part(&[0, 9, 1]), (&[1u8][..], &[][..]));
    }
}
