//! Snapshot files: the snapshot data type of the durable state machine, the sink a server
//! writes incoming snapshots to, and the file format (see the parent module's doc).

use std::fmt;
use std::fs;
use std::io;
use std::io::BufRead;
use std::io::Read;
use std::io::Write;
use std::path::Path;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::Context;
use std::task::Poll;

use tokio::io::AsyncRead;
use tokio::io::AsyncSeek;
use tokio::io::AsyncWrite;
use tokio::io::ReadBuf;

use super::unique_name;
use crate::AbortFuture;
use crate::SinkFuture;
use crate::SnapshotSink;

/// The first bytes of every snapshot file.
const MAGIC: &[u8; 8] = b"RWKVSNP1";
/// Stands where the next key's length would: the pairs are over.
const END_MARK: u32 = u32::MAX;

/// Snapshot data of the durable state machine: a file, read or written through tokio, that
/// knows its path. raftwire streams it in chunks to a peer, and a raftwire server writes an
/// incoming snapshot into one, so no snapshot is ever held whole in memory.
///
/// A file the [`DurableSnapshotSink`] created is deleted when dropped, unless the state
/// machine installed it: a received snapshot openraft decides not to install leaves nothing.
pub struct DurableSnapshotFile {
    file: tokio::fs::File,
    path: PathBuf,
    remove_on_drop: bool,
}

impl Drop for DurableSnapshotFile {
    fn drop(&mut self) {
        if self.remove_on_drop {
            remove_quietly(&self.path);
        }
    }
}

impl fmt::Debug for DurableSnapshotFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DurableSnapshotFile")
            .field("path", &self.path)
            .finish()
    }
}

impl DurableSnapshotFile {
    /// Opens an existing snapshot file for reading.
    pub(super) async fn open(path: PathBuf) -> io::Result<Self> {
        let file = tokio::fs::File::open(&path).await?;
        Ok(DurableSnapshotFile {
            file,
            path,
            remove_on_drop: false,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Closes the file, waiting for writes still in flight, and returns its path: the file
    /// is the caller's now (it is not deleted on drop any more).
    pub(super) async fn close(mut self) -> io::Result<PathBuf> {
        use tokio::io::AsyncWriteExt;
        self.remove_on_drop = false;
        self.file.flush().await?;
        Ok(self.path.clone())
    }
}

impl AsyncRead for DurableSnapshotFile {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.file).poll_read(cx, buf)
    }
}

impl AsyncWrite for DurableSnapshotFile {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.file).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.file).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.file).poll_shutdown(cx)
    }
}

impl AsyncSeek for DurableSnapshotFile {
    fn start_seek(mut self: Pin<&mut Self>, position: io::SeekFrom) -> io::Result<()> {
        Pin::new(&mut self.file).start_seek(position)
    }

    fn poll_complete(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        Pin::new(&mut self.file).poll_complete(cx)
    }
}

/// Creates the files incoming snapshots are written to, in a store's snapshot directory
/// (`partial-*.part`), and deletes the file of a transfer that failed. Give it to the server:
/// `Server::builder_with_sink(raft, config, store.snapshot_sink())`.
///
/// A received file becomes the current snapshot when openraft installs it (it is renamed
/// then); the partial files of transfers a crash interrupted are removed when the store is
/// opened.
#[derive(Debug, Clone)]
pub struct DurableSnapshotSink {
    dir: PathBuf,
}

impl DurableSnapshotSink {
    pub(super) fn new(dir: PathBuf) -> Self {
        DurableSnapshotSink { dir }
    }
}

impl SnapshotSink<DurableSnapshotFile> for DurableSnapshotSink {
    fn create(&self) -> SinkFuture<DurableSnapshotFile> {
        let path = self.dir.join(unique_name(PARTIAL_PREFIX, ".part"));
        Box::pin(async move {
            let file = tokio::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .await
                .map_err(|e| io::Error::new(e.kind(), format!("cannot create {}: {e}", path.display())))?;
            Ok(DurableSnapshotFile {
                file,
                path,
                remove_on_drop: true,
            })
        })
    }

    fn abort(&self, mut data: DurableSnapshotFile, reason: &str) -> AbortFuture {
        tracing::info!(path = %data.path.display(), reason, "deleting the file of a failed snapshot transfer");
        // Deleted here, off the runtime's threads, rather than by the drop.
        data.remove_on_drop = false;
        Box::pin(async move {
            let path = data.path.clone();
            drop(data);
            match tokio::fs::remove_file(&path).await {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot delete a partial snapshot file")
                }
            }
        })
    }
}

/// Prefix of files being built or received; every such file is removed when a store opens.
pub(super) const PARTIAL_PREFIX: &str = "partial";
/// Prefix of finished snapshot files.
pub(super) const SNAPSHOT_PREFIX: &str = "snapshot";

/// Writes key-value pairs in the snapshot format, counting them and checksumming the bytes.
pub(super) struct SnapshotWriter<W: Write> {
    out: W,
    pairs: u64,
    crc: u32,
}

impl<W: Write> SnapshotWriter<W> {
    pub(super) fn new(mut out: W) -> io::Result<Self> {
        out.write_all(MAGIC)?;
        Ok(SnapshotWriter {
            out,
            pairs: 0,
            crc: crc32c::crc32c(MAGIC),
        })
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.crc = crc32c::crc32c_append(self.crc, bytes);
        self.out.write_all(bytes)
    }

    fn put_field(&mut self, bytes: &[u8], what: &str) -> io::Result<()> {
        let len = u32::try_from(bytes.len())
            .ok()
            .filter(|l| *l != END_MARK)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{what} too long for a snapshot"),
                )
            })?;
        self.put(&len.to_be_bytes())?;
        self.put(bytes)
    }

    pub(super) fn pair(&mut self, key: &str, value: &[u8]) -> io::Result<()> {
        self.put_field(key.as_bytes(), "key")?;
        self.put_field(value, "value")?;
        self.pairs += 1;
        Ok(())
    }

    /// Writes the end mark, the count and the checksum; returns the writer.
    pub(super) fn finish(mut self) -> io::Result<W> {
        self.out.write_all(&END_MARK.to_be_bytes())?;
        self.out.write_all(&self.pairs.to_be_bytes())?;
        self.out.write_all(&self.crc.to_be_bytes())?;
        Ok(self.out)
    }
}

fn invalid(path: &Path, why: impl fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("snapshot file {} is corrupt: {why}", path.display()),
    )
}

/// Reads a snapshot file pair by pair, checking its end mark, count and checksum at the end:
/// `pair` returns `None` only after the end was verified.
pub(super) struct SnapshotReader<R: BufRead> {
    input: R,
    path: PathBuf,
    pairs: u64,
    crc: u32,
}

impl<R: BufRead> SnapshotReader<R> {
    pub(super) fn new(mut input: R, path: &Path) -> io::Result<Self> {
        let mut magic = [0u8; 8];
        input
            .read_exact(&mut magic)
            .map_err(|e| invalid(path, format!("cannot read its header: {e}")))?;
        if &magic != MAGIC {
            return Err(invalid(path, "it does not start with the snapshot magic"));
        }
        Ok(SnapshotReader {
            input,
            path: path.to_path_buf(),
            pairs: 0,
            crc: crc32c::crc32c(MAGIC),
        })
    }

    fn exact<const N: usize>(&mut self, what: &str) -> io::Result<[u8; N]> {
        let mut buf = [0u8; N];
        self.input
            .read_exact(&mut buf)
            .map_err(|e| invalid(&self.path, format!("cannot read {what}: {e}")))?;
        Ok(buf)
    }

    fn field(&mut self, len: u32, what: &str) -> io::Result<Vec<u8>> {
        // Read through `take`, so a corrupt length cannot make us reserve memory up front.
        let mut buf = Vec::new();
        let n = (&mut self.input).take(u64::from(len)).read_to_end(&mut buf)?;
        if n != len as usize {
            return Err(invalid(&self.path, format!("{what} ends early")));
        }
        self.crc = crc32c::crc32c_append(self.crc, &buf);
        Ok(buf)
    }

    /// The next pair, or `None` at a verified end.
    pub(super) fn pair(&mut self) -> io::Result<Option<(String, Vec<u8>)>> {
        let len = u32::from_be_bytes(self.exact::<4>("a key length")?);
        if len == END_MARK {
            let pairs = u64::from_be_bytes(self.exact::<8>("the pair count")?);
            let crc = u32::from_be_bytes(self.exact::<4>("the checksum")?);
            if pairs != self.pairs {
                return Err(invalid(
                    &self.path,
                    format!("it declares {pairs} pairs, {} were read", self.pairs),
                ));
            }
            if crc != self.crc {
                return Err(invalid(
                    &self.path,
                    format!("CRC32C {crc:08x} declared, {:08x} read", self.crc),
                ));
            }
            if !self.input.fill_buf()?.is_empty() {
                return Err(invalid(&self.path, "bytes follow its end"));
            }
            return Ok(None);
        }
        self.crc = crc32c::crc32c_append(self.crc, &len.to_be_bytes());
        let key = self.field(len, "a key")?;
        let key = String::from_utf8(key).map_err(|_| invalid(&self.path, "a key is not UTF-8"))?;
        let vlen = u32::from_be_bytes(self.exact::<4>("a value length")?);
        self.crc = crc32c::crc32c_append(self.crc, &vlen.to_be_bytes());
        let value = self.field(vlen, "a value")?;
        self.pairs += 1;
        Ok(Some((key, value)))
    }
}

/// Creates a new partial file in `dir` for building or copying a snapshot into.
pub(super) fn create_partial(dir: &Path) -> io::Result<(fs::File, PathBuf)> {
    let path = dir.join(unique_name(PARTIAL_PREFIX, ".part"));
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot create {}: {e}", path.display())))?;
    Ok((file, path))
}

/// Makes a written partial file a finished snapshot file: `fsync`s it, renames it and
/// `fsync`s the directory. Returns the new file name.
pub(super) fn finish_partial(partial: &Path, dir: &Path) -> io::Result<String> {
    fs::File::open(partial)?.sync_all()?;
    let name = unique_name(SNAPSHOT_PREFIX, ".snap");
    fs::rename(partial, dir.join(&name))?;
    super::sync_dir(dir)?;
    Ok(name)
}

/// Deletes a file, ignoring one already gone; other failures are logged (a leftover file is
/// removed the next time the store opens).
pub(super) fn remove_quietly(path: &Path) {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot delete a snapshot file"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(pairs: &[(&str, &[u8])]) -> Vec<u8> {
        let mut w = SnapshotWriter::new(Vec::new()).expect("header");
        for (k, v) in pairs {
            w.pair(k, v).expect("pair");
        }
        w.finish().expect("finish")
    }

    fn read(bytes: &[u8]) -> io::Result<Vec<(String, Vec<u8>)>> {
        let mut r = SnapshotReader::new(bytes, Path::new("test"))?;
        let mut out = Vec::new();
        while let Some(p) = r.pair()? {
            out.push(p);
        }
        Ok(out)
    }

    #[test]
    fn snapshot_file_round_trips() {
        let bytes = write(&[("a", b"1"), ("b", b""), ("", b"xyz")]);
        let pairs = read(&bytes).expect("reads");
        assert_eq!(pairs.len(), 3);
        assert_eq!(pairs[2], (String::new(), b"xyz".to_vec()));
        assert!(read(&write(&[])).expect("empty").is_empty());
    }

    #[test]
    fn damaged_snapshot_files_are_refused() {
        let bytes = write(&[("a", b"1"), ("b", b"22")]);
        // Truncated anywhere.
        for cut in 0..bytes.len() {
            assert!(read(&bytes[..cut]).is_err(), "cut at {cut} accepted");
        }
        // A flipped bit anywhere.
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            assert!(read(&bad).is_err(), "flip at {i} accepted");
        }
        // Trailing bytes.
        let mut long = bytes.clone();
        long.push(0);
        assert!(read(&long).is_err());
    }
}
