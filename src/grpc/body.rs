//! The request bodies of replication streams and snapshot uploads, written by raftwire rather
//! than by a tonic codec: tonic encodes each message into one buffer, copying every entry
//! payload and snapshot chunk into it; here a message is a list of chunks in which payloads of
//! [`INLINE_MAX`] bytes or more are the `Bytes` they already are, handed to HTTP/2 uncopied.
//! The bytes on the wire are exactly prost's encoding of the same message (fields in tag
//! order), behind gRPC's 5-byte message prefix, so any gRPC server reads them; where the
//! cluster compresses, a message of at least `min_size` bytes is sent zstd-compressed with the
//! prefix's compressed flag set (gRPC's own message compression, `grpc-encoding: zstd`).

use std::pin::Pin;
use std::task::Context;
use std::task::Poll;

use bytes::BufMut;
use bytes::Bytes;
use bytes::BytesMut;
use http_body::Frame;
use prost::Message;
use prost::encoding::WireType;
use prost::encoding::encode_key;
use prost::encoding::encode_varint;
use tokio::sync::mpsc;
use tonic::Status;
use tonic::codec::Streaming;
use tonic::transport::Channel;
use tower::Service;
use tower::ServiceExt;

use super::pb;

/// Payloads shorter than this are copied next to the message's other fields: each chunk of its
/// own costs HTTP/2 a DATA frame and the body a poll, which for small payloads is more than
/// the copy.
const INLINE_MAX: usize = 4096;

/// gRPC's message prefix: a compressed flag and a 4-byte big-endian length.
const PREFIX_LEN: usize = 5;

/// One gRPC message as chunks, ready for the body.
pub(crate) type Chunks = Vec<Bytes>;

/// How one stream's messages are written: the size limit and, where the cluster compresses,
/// the stream's own zstd compressor (its context made on first use, kept for the stream).
/// A clone has the same settings and a compressor of its own.
#[derive(Debug)]
pub(crate) struct Framer {
    max: usize,
    #[cfg(feature = "compression")]
    compression: crate::config::Compression,
    #[cfg(feature = "compression")]
    zstd: Option<crate::codec::Compressor>,
}

impl Clone for Framer {
    fn clone(&self) -> Self {
        Framer {
            max: self.max,
            #[cfg(feature = "compression")]
            compression: self.compression,
            #[cfg(feature = "compression")]
            zstd: crate::codec::Compressor::new(self.compression),
        }
    }
}

impl Framer {
    pub(crate) fn new(config: &crate::config::Config) -> Self {
        Framer {
            max: config.max_message_size,
            #[cfg(feature = "compression")]
            compression: config.compression,
            #[cfg(feature = "compression")]
            zstd: crate::codec::Compressor::new(config.compression),
        }
    }

    /// The largest message (before compression) this framer writes.
    pub(crate) fn max(&self) -> usize {
        self.max
    }

    /// Whether messages may be sent compressed (and the requests say `grpc-encoding: zstd`).
    pub(crate) fn compressed(&self) -> bool {
        #[cfg(feature = "compression")]
        return self.compression.is_on();
        #[cfg(not(feature = "compression"))]
        false
    }

    /// `msg`, whose encoded length is `len`, as one gRPC message, its entry payloads uncopied.
    pub(crate) fn append(&mut self, msg: &pb::AppendEntriesRequest, len: usize) -> Result<Chunks, Status> {
        debug_assert_eq!(len, msg.encoded_len(), "the caller's encoded length");
        let mut w = Writer::new(self.check(len)?);
        // Fields 1 and 2, then the entries (3), then field 4: prost's order.
        let head = pb::AppendEntriesRequest {
            vote: msg.vote,
            prev_log_id: msg.prev_log_id,
            entries: Vec::new(),
            leader_commit: None,
        };
        w.message(&head);
        for entry in &msg.entries {
            match &entry.payload {
                Some(pb::entry::Payload::Normal(data)) if data.len() >= INLINE_MAX => {
                    w.key_len(3, entry.encoded_len());
                    let log_id = pb::Entry {
                        log_id: entry.log_id,
                        payload: None,
                    };
                    w.message(&log_id);
                    w.key_len(3, data.len());
                    w.chunk(data);
                }
                _ => {
                    w.key_len(3, entry.encoded_len());
                    w.message(entry);
                }
            }
        }
        let tail = pb::AppendEntriesRequest {
            leader_commit: msg.leader_commit,
            ..Default::default()
        };
        w.message(&tail);
        self.finish(w)
    }

    /// `chunk` as one gRPC message, its snapshot data uncopied.
    pub(crate) fn snapshot(&mut self, chunk: &pb::SnapshotChunk) -> Result<Chunks, Status> {
        let mut w = Writer::new(self.check(chunk.encoded_len())?);
        match &chunk.kind {
            Some(pb::snapshot_chunk::Kind::Data(data)) if data.len() >= INLINE_MAX => {
                w.key_len(2, data.len());
                w.chunk(data);
            }
            _ => w.message(chunk),
        }
        self.finish(w)
    }

    /// The message's length, if within the limit.
    fn check(&self, len: usize) -> Result<usize, Status> {
        if len > self.max {
            return Err(Status::out_of_range(format!(
                "a message of {len} bytes exceeds the limit of {}",
                self.max
            )));
        }
        Ok(len)
    }

    fn finish(&mut self, w: Writer) -> Result<Chunks, Status> {
        let chunks = w.finish();
        #[cfg(feature = "compression")]
        if let Some(zstd) = &mut self.zstd {
            return compress(zstd, chunks);
        }
        Ok(chunks)
    }
}

/// The message behind `chunks` (its prefix first) compressed with zstd, when it has at least
/// the compressor's minimum size and compressing makes it smaller; else `chunks` as they are.
#[cfg(feature = "compression")]
fn compress(zstd: &mut crate::codec::Compressor, chunks: Chunks) -> Result<Chunks, Status> {
    let len: usize = chunks.iter().map(Bytes::len).sum::<usize>() - PREFIX_LEN;
    if len < zstd.min_size() {
        return Ok(chunks);
    }
    match zstd.compress(&chunks, PREFIX_LEN, len) {
        Err(code) => Err(Status::internal(format!(
            "zstd compression failed: {}",
            zstd::zstd_safe::get_error_name(code)
        ))),
        Ok(None) => Ok(chunks),
        Ok(Some(mut packed)) => {
            let packed_len = (packed.len() - PREFIX_LEN) as u32;
            packed[0] = 1;
            packed[1..PREFIX_LEN].copy_from_slice(&packed_len.to_be_bytes());
            Ok(vec![Bytes::from(packed)])
        }
    }
}

/// Writes one message: fixed fields accumulate in a buffer, large payloads become chunks.
struct Writer {
    out: Chunks,
    buf: BytesMut,
}

impl Writer {
    /// Starts a message of `len` bytes (its prefix written).
    fn new(len: usize) -> Self {
        let mut buf = BytesMut::with_capacity(PREFIX_LEN + len.min(INLINE_MAX));
        buf.put_u8(0);
        buf.put_u32(len as u32);
        Writer { out: Vec::new(), buf }
    }

    fn message<M: Message>(&mut self, m: &M) {
        // Writing into a BytesMut grows it: encoding cannot run out of room.
        m.encode_raw(&mut self.buf);
    }

    /// A length-delimited field's key and length.
    fn key_len(&mut self, tag: u32, len: usize) {
        encode_key(tag, WireType::LengthDelimited, &mut self.buf);
        encode_varint(len as u64, &mut self.buf);
    }

    /// `data` as a chunk of its own, after what is buffered.
    fn chunk(&mut self, data: &Bytes) {
        if !self.buf.is_empty() {
            self.out.push(self.buf.split().freeze());
        }
        self.out.push(data.clone());
    }

    fn finish(mut self) -> Chunks {
        if !self.buf.is_empty() {
            self.out.push(self.buf.freeze());
        }
        self.out
    }
}

/// A request body fed message by message through a channel; an `Err` item fails the body
/// (hyper then resets the stream, which the server reads as an error, never as a clean end).
pub(crate) struct RequestBody {
    rx: mpsc::Receiver<Result<Chunks, Status>>,
    queue: std::vec::IntoIter<Bytes>,
}

impl RequestBody {
    pub(crate) fn new(rx: mpsc::Receiver<Result<Chunks, Status>>) -> Self {
        RequestBody {
            rx,
            queue: Vec::new().into_iter(),
        }
    }
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        loop {
            if let Some(chunk) = this.queue.next() {
                return Poll::Ready(Some(Ok(Frame::data(chunk))));
            }
            match std::task::ready!(this.rx.poll_recv(cx)) {
                Some(Ok(chunks)) => this.queue = chunks.into_iter(),
                Some(Err(status)) => return Poll::Ready(Some(Err(status))),
                None => return Poll::Ready(None),
            }
        }
    }
}

/// Opens the streaming call `path` on `channel` with `body` as its request, and returns the
/// stream of `R` replies (what tonic's `Grpc::streaming` does, with our body).
pub(crate) async fn open<R>(
    channel: Channel,
    path: &'static str,
    body: RequestBody,
    framer: Framer,
) -> Result<Streaming<R>, Status>
where
    R: Message + Default + Send + 'static,
{
    let mut request = http::Request::builder()
        .method(http::Method::POST)
        .version(http::Version::HTTP_2)
        .uri(path)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers");
    if framer.compressed() {
        request = request
            .header("grpc-encoding", "zstd")
            .header(super::COMPRESSION_HEADER, "zstd");
    }
    let request = request
        .body(tonic::body::Body::new(body))
        .map_err(|e| Status::internal(format!("building the request: {e}")))?;
    let mut channel = channel;
    let response = channel
        .ready()
        .await
        .map_err(|e| Status::from_error(Box::new(e)))?
        .call(request)
        .await
        .map_err(|e| Status::from_error(Box::new(e)))?;
    // A call refused at once carries its status in the headers (trailers-only).
    if let Some(status) = Status::from_header_map(response.headers())
        && status.code() != tonic::Code::Ok
    {
        return Err(status);
    }
    let encoding = response_encoding(response.headers())?;
    let status = response.status();
    Ok(Streaming::new_response(
        tonic_prost::ProstDecoder::<R>::default(),
        response.into_body(),
        status,
        encoding,
        Some(framer.max),
    ))
}

/// The compression of the reply messages, from the response's `grpc-encoding`.
fn response_encoding(headers: &http::HeaderMap) -> Result<Option<tonic::codec::CompressionEncoding>, Status> {
    match headers.get("grpc-encoding").map(|v| v.as_bytes()) {
        None | Some(b"identity") => Ok(None),
        #[cfg(feature = "compression")]
        Some(b"zstd") => Ok(Some(tonic::codec::CompressionEncoding::Zstd)),
        Some(other) => Err(Status::internal(format!(
            "the server answered in an encoding we did not offer: {}",
            String::from_utf8_lossy(other)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn concat(chunks: &[Bytes]) -> Vec<u8> {
        chunks.iter().flat_map(|c| c.iter().copied()).collect()
    }

    fn entry(index: u64, payload: Option<pb::entry::Payload>) -> pb::Entry {
        pb::Entry {
            log_id: Some(pb::LogId {
                leader_id: Some(pb::LeaderId { term: 2, node_id: 1 }),
                index,
            }),
            payload,
        }
    }

    fn framer() -> Framer {
        Framer {
            max: 64 << 20,
            #[cfg(feature = "compression")]
            compression: crate::config::Compression::Off,
            #[cfg(feature = "compression")]
            zstd: None,
        }
    }

    /// The chunks are prost's encoding byte for byte, large payloads are the caller's own
    /// buffers (same pointer), small ones are copied in line.
    #[test]
    fn messages_are_prost_s_bytes_with_large_payloads_uncopied() {
        let big = Bytes::from(vec![7u8; 20_000]);
        let msg = pb::AppendEntriesRequest {
            vote: Some(pb::Vote {
                leader_id: Some(pb::LeaderId { term: 2, node_id: 1 }),
                committed: true,
            }),
            prev_log_id: None,
            entries: vec![
                entry(10, Some(pb::entry::Payload::Blank(pb::Blank {}))),
                entry(11, Some(pb::entry::Payload::Normal(big.clone()))),
                entry(12, Some(pb::entry::Payload::Normal(Bytes::from_static(b"small")))),
                entry(13, Some(pb::entry::Payload::Normal(big.clone()))),
            ],
            leader_commit: Some(pb::LogId {
                leader_id: Some(pb::LeaderId { term: 2, node_id: 1 }),
                index: 9,
            }),
        };
        let chunks = framer().append(&msg, msg.encoded_len()).unwrap();
        let wire = concat(&chunks);
        let len = msg.encoded_len();
        assert_eq!(&wire[..PREFIX_LEN], &[0, 0, 0, (len >> 8) as u8, len as u8][..]);
        assert_eq!(&wire[PREFIX_LEN..], &msg.encode_to_vec()[..]);
        let uncopied = chunks.iter().filter(|c| c.as_ptr() == big.as_ptr()).count();
        assert_eq!(uncopied, 2);

        let data = Bytes::from(vec![3u8; 1 << 20]);
        let chunk = pb::SnapshotChunk {
            kind: Some(pb::snapshot_chunk::Kind::Data(data.clone())),
        };
        let chunks = framer().snapshot(&chunk).unwrap();
        assert_eq!(&concat(&chunks)[PREFIX_LEN..], &chunk.encode_to_vec()[..]);
        assert!(chunks.iter().any(|c| c.as_ptr() == data.as_ptr()));
    }

    #[test]
    fn messages_over_the_limit_are_refused() {
        let mut framer = framer();
        framer.max = 1000;
        let chunk = pb::SnapshotChunk {
            kind: Some(pb::snapshot_chunk::Kind::Data(Bytes::from(vec![0u8; 5000]))),
        };
        assert_eq!(
            framer.snapshot(&chunk).unwrap_err().code(),
            tonic::Code::OutOfRange
        );
    }

    #[cfg(feature = "compression")]
    #[test]
    fn large_compressible_messages_are_compressed_and_small_ones_not() {
        let compression = crate::config::Compression::Zstd {
            level: 1,
            min_size: 4096,
        };
        let mut framer = Framer {
            compression,
            zstd: crate::codec::Compressor::new(compression),
            ..framer()
        };
        let chunk = |n: usize| pb::SnapshotChunk {
            kind: Some(pb::snapshot_chunk::Kind::Data(Bytes::from(vec![9u8; n]))),
        };
        // Several messages through one context, and through a clone's own.
        let mut twin = framer.clone();
        for own in [true, false, true] {
            let framer = if own { &mut framer } else { &mut twin };
            let packed = framer.snapshot(&chunk(100_000)).unwrap();
            let wire = concat(&packed);
            assert_eq!(wire[0], 1, "compressed flag");
            let declared = u32::from_be_bytes(wire[1..PREFIX_LEN].try_into().unwrap()) as usize;
            assert_eq!(declared, wire.len() - PREFIX_LEN);
            let unpacked = zstd::bulk::decompress(&wire[PREFIX_LEN..], 200_000).unwrap();
            assert_eq!(unpacked, chunk(100_000).encode_to_vec());
        }
        let small = concat(&framer.snapshot(&chunk(100)).unwrap());
        assert_eq!(small[0], 0);
        assert_eq!(&small[PREFIX_LEN..], &chunk(100).encode_to_vec()[..]);
    }
}
