//! zstd compression of frame bodies (cargo feature `compression`).
//!
//! A compressed frame has [`FLAG_ZSTD`] set in its header and its length field counts the
//! compressed body: one zstd frame that declares its decompressed size. Only the bulk kinds
//! ([`compressible`]) may travel compressed, and only between peers that negotiated it
//! (their ALPN protocol says so); a receiver that did not refuses the flag as reserved.

use bytes::Bytes;
use zstd::zstd_safe;
use zstd::zstd_safe::CCtx;
use zstd::zstd_safe::CParameter;
use zstd::zstd_safe::DCtx;
use zstd::zstd_safe::InBuffer;
use zstd::zstd_safe::OutBuffer;
use zstd::zstd_safe::zstd_sys::ZSTD_EndDirective;

use super::FrameError;
use super::HEADER_LEN;
use super::Header;
use super::Kind;
use crate::config::Compression;
use crate::error::DecodeError;

/// The largest zstd window a receiver accepts (2^23 = 8 MiB, level 19's).
const WINDOW_LOG_MAX: u32 = 23;

/// How much output a decompression reserves before any of it is produced.
const FIRST_RESERVE: usize = 64 << 10;

/// Header flag: the body is one zstd frame.
pub(crate) const FLAG_ZSTD: u16 = 0x0001;

/// Whether frames of this kind may travel compressed: append batches and snapshot data.
pub(crate) fn compressible(kind: Kind) -> bool {
    matches!(kind, Kind::Append | Kind::StreamAppend | Kind::SnapshotChunk)
}

/// Compresses the large bulk frames one sender writes (its zstd context made on first use).
pub(crate) struct Compressor {
    level: i32,
    min_size: usize,
    cctx: Option<CCtx<'static>>,
}

impl std::fmt::Debug for Compressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compressor")
            .field("level", &self.level)
            .field("min_size", &self.min_size)
            .field("context", &self.cctx.is_some())
            .finish()
    }
}

impl Compressor {
    /// `None` when `setting` compresses nothing.
    pub(crate) fn new(setting: Compression) -> Option<Self> {
        match setting {
            Compression::Off => None,
            Compression::Zstd { level, min_size } => Some(Compressor {
                level,
                min_size,
                cctx: None,
            }),
        }
    }

    /// Replaces the frame that `out[start..]` holds (its header first, `size` bytes in all)
    /// with its compressed form, when its kind is [`compressible`], its body has at least
    /// `min_size` bytes and compressing makes it smaller. Returns the frame's size as sent.
    pub(crate) fn frame(
        &mut self,
        out: &mut Vec<Bytes>,
        start: usize,
        size: usize,
    ) -> Result<usize, FrameError> {
        let body_len = size - HEADER_LEN;
        let Some(first) = out.get(start) else {
            return Ok(size);
        };
        let header = match Header::parse(first, usize::MAX, 0) {
            Ok(Some(h)) if body_len >= self.min_size && compressible(h.kind) => h,
            _ => return Ok(size),
        };
        let compressed = self
            .compress(&out[start..], HEADER_LEN, body_len)
            .map_err(|code| FrameError::Compression {
                kind: header.kind,
                reason: format!("zstd compression failed: {}", zstd_safe::get_error_name(code)),
            })?;
        let Some(mut frame) = compressed else {
            return Ok(size);
        };
        let len = frame.len() - HEADER_LEN;
        let header = Header {
            flags: FLAG_ZSTD,
            len: len as u32,
            ..header
        };
        frame[..HEADER_LEN].copy_from_slice(&header.to_bytes());
        out.truncate(start);
        out.push(Bytes::from(frame));
        Ok(HEADER_LEN + len)
    }

    /// Bodies shorter than this are sent as they are.
    pub(crate) fn min_size(&self) -> usize {
        self.min_size
    }

    /// The `body_len` bytes of `chunks` after their first `gap` bytes (a header the caller
    /// rewrites) compressed into one buffer that starts with a `gap`-byte hole for that
    /// header; `None` when that is no smaller. The chunks are read in place, never joined.
    pub(crate) fn compress(
        &mut self,
        chunks: &[Bytes],
        gap: usize,
        body_len: usize,
    ) -> Result<Option<Vec<u8>>, usize> {
        let level = self.level;
        let cctx = match &mut self.cctx {
            Some(c) => c,
            none => {
                let mut c = CCtx::create();
                c.set_parameter(CParameter::CompressionLevel(level))?;
                none.insert(c)
            }
        };
        // A context left mid-frame by an earlier failure starts over.
        cctx.reset(zstd_safe::ResetDirective::SessionOnly)?;
        cctx.set_pledged_src_size(Some(body_len as u64))?;
        let mut dst = vec![0u8; gap];
        dst.reserve(zstd_safe::compress_bound(body_len));
        let mut output = OutBuffer::around_pos(&mut dst, gap);
        let mut skip = gap;
        for chunk in chunks {
            let src = &chunk[skip.min(chunk.len())..];
            skip -= skip.min(chunk.len());
            let mut input = InBuffer::around(src);
            while input.pos() < src.len() {
                cctx.compress_stream2(&mut output, &mut input, ZSTD_EndDirective::ZSTD_e_continue)?;
            }
        }
        let mut empty = InBuffer::around(&[]);
        loop {
            let before = output.pos();
            if cctx.compress_stream2(&mut output, &mut empty, ZSTD_EndDirective::ZSTD_e_end)? == 0 {
                break;
            }
            if output.pos() == before {
                // No room left (compress_bound rules it out): not smaller, send it as it is.
                return Ok(None);
            }
        }
        let written = output.pos();
        Ok((written - gap < body_len).then(|| {
            dst.truncate(written);
            dst
        }))
    }
}

/// Decompresses the compressed frames one receiver reads (its zstd context made on first
/// use).
#[derive(Default)]
pub(crate) struct Decompressor {
    dctx: Option<DCtx<'static>>,
}

impl std::fmt::Debug for Decompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decompressor").finish_non_exhaustive()
    }
}

impl Decompressor {
    /// The body of a frame with [`FLAG_ZSTD`] set, decompressed. The zstd frame must declare
    /// its size, which may not exceed `max_len`; the output grows as it is produced (from
    /// [`FIRST_RESERVE`], doubling), so a frame that declares much and inflates to little never
    /// makes the receiver hold what it declared, and none may inflate past it.
    pub(crate) fn body(&mut self, kind: Kind, body: &[u8], max_len: usize) -> Result<Bytes, FrameError> {
        let bad = |reason: String| FrameError::Body {
            kind,
            source: DecodeError::invalid("body", reason),
        };
        if !compressible(kind) {
            return Err(bad(format!("{kind:?} frames are never compressed")));
        }
        let declared = match zstd_safe::get_frame_content_size(body) {
            Ok(Some(n)) => n,
            Ok(None) => return Err(bad("compressed body does not declare its size".into())),
            Err(_) => return Err(bad("compressed body is not a zstd frame".into())),
        };
        if declared > max_len as u64 {
            return Err(FrameError::TooLarge {
                len: declared,
                max: max_len,
            });
        }
        let declared = declared as usize;
        let zstd = |code: usize| bad(format!("zstd: {}", zstd_safe::get_error_name(code)));
        let dctx = match &mut self.dctx {
            Some(d) => d,
            none => {
                let mut d = DCtx::create();
                // zstd's own buffer follows the frame's window: at most 8 MiB (what level 19,
                // the highest allowed, uses), not what a hostile frame might declare.
                d.set_parameter(zstd_safe::DParameter::WindowLogMax(WINDOW_LOG_MAX))
                    .map_err(zstd)?;
                none.insert(d)
            }
        };
        // A context left mid-frame by an earlier error starts over.
        dctx.reset(zstd_safe::ResetDirective::SessionOnly).map_err(zstd)?;
        // One byte of room past the declared size: a frame that fills it says more than it
        // declared.
        let limit = declared + 1;
        let mut out: Vec<u8> = Vec::with_capacity(limit.min(FIRST_RESERVE));
        let mut input = InBuffer::around(body);
        loop {
            if out.len() == out.capacity() {
                if out.len() >= limit {
                    return Err(bad(format!("inflates past the {declared} bytes it declared")));
                }
                out.reserve_exact(out.len().max(FIRST_RESERVE).min(limit - out.len()));
            }
            let (pos, consumed) = (out.len(), input.pos());
            let mut output = OutBuffer::around_pos(&mut out, pos);
            let more = dctx.decompress_stream(&mut output, &mut input).map_err(zstd)?;
            let produced = output.pos() - pos;
            if more == 0 {
                break;
            }
            if produced == 0 && input.pos() == consumed {
                return Err(bad("compressed body ends inside its zstd frame".into()));
            }
        }
        if input.pos() != body.len() {
            return Err(bad(format!(
                "{} bytes after the zstd frame",
                body.len() - input.pos()
            )));
        }
        if out.len() != declared {
            return Err(bad(format!(
                "declared {declared} decompressed bytes, got {}",
                out.len()
            )));
        }
        Ok(Bytes::from(out))
    }
}
