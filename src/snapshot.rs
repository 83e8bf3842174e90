//! What raftwire needs from the state machine's snapshot data to stream it in chunks, and the
//! transport-independent halves of a transfer: the sender's chunking and checksum, the
//! receiver's verification.
//!
//! A snapshot travels as a header (vote and meta), data chunks, and a closing trailer that
//! declares the total length and the CRC32C of the data. The receiver installs only data whose
//! length and checksum match the trailer; a transfer that ends any other way (an error, a
//! reset, a clean end without a trailer, a timeout) is aborted and the sink told so.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::AsyncRead;
use tokio::io::AsyncSeek;
use tokio::io::AsyncWrite;

/// Snapshot data raftwire can stream: read in chunks on the sender, written chunk by chunk on
/// the receiver, so neither side holds more than one chunk of it in transit.
///
/// Implemented for every seekable async reader/writer: `tokio::fs::File` (memory stays
/// bounded however large the snapshot) and `std::io::Cursor<Vec<u8>>` among them.
pub trait SnapshotData: AsyncRead + AsyncWrite + AsyncSeek + Unpin + Send + Sync + 'static {}

impl<T> SnapshotData for T where T: AsyncRead + AsyncWrite + AsyncSeek + Unpin + Send + Sync + 'static {}

/// Future returned by [`SnapshotSink::create`].
pub type SinkFuture<SD> = Pin<Box<dyn Future<Output = io::Result<SD>> + Send>>;

/// Future returned by [`SnapshotSink::abort`].
pub type AbortFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Creates the empty snapshot data a receiving server writes an incoming snapshot into, and
/// hears of transfers that failed.
///
/// Any `Fn() -> impl Future<Output = io::Result<SD>>` is a sink (its `abort` drops the data);
/// for data types with a `Default` (an in-memory cursor) the server uses `SD::default()`
/// unless told otherwise. A sink that writes files implements the trait itself so that
/// [`abort`](SnapshotSink::abort) deletes the partial file.
pub trait SnapshotSink<SD>: Send + Sync + 'static {
    /// Returns fresh, empty snapshot data positioned at its start.
    fn create(&self) -> SinkFuture<SD>;

    /// Called with the data of a transfer that will not be installed: the sender failed, was
    /// cancelled or timed out, the connection broke, or the data did not match its declared
    /// length or checksum. `reason` says which, in words (the same words the server logs).
    /// The default drops `data`.
    fn abort(&self, data: SD, reason: &str) -> AbortFuture {
        let _ = reason;
        drop(data);
        Box::pin(async {})
    }
}

impl<SD, F, Fut> SnapshotSink<SD> for F
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = io::Result<SD>> + Send + 'static,
{
    fn create(&self) -> SinkFuture<SD> {
        Box::pin(self())
    }
}

/// Reads the next chunk of up to `size` bytes of snapshot data (short only at the end);
/// `None` once the data is exhausted. Only this one chunk is ever buffered.
pub(crate) async fn next_chunk<SD: SnapshotData>(data: &mut SD, size: usize) -> io::Result<Option<Bytes>> {
    use tokio::io::AsyncReadExt;
    let mut buf = bytes::BytesMut::with_capacity(size);
    while buf.len() < size {
        if data.read_buf(&mut buf).await? == 0 {
            break;
        }
    }
    Ok((!buf.is_empty()).then(|| buf.freeze()))
}

/// The closing frame of a snapshot transfer: what the receiver must have got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Trailer {
    /// Total data bytes sent.
    pub(crate) length: u64,
    /// CRC32C (Castagnoli) of all data bytes, in order.
    pub(crate) crc32c: u32,
}

/// A running length and CRC32C over the data of one transfer.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Digest {
    length: u64,
    crc: u32,
}

impl Digest {
    pub(crate) fn update(&mut self, data: &[u8]) {
        self.crc = crc32c::crc32c_append(self.crc, data);
        self.length += data.len() as u64;
    }

    pub(crate) fn trailer(&self) -> Trailer {
        Trailer {
            length: self.length,
            crc32c: self.crc,
        }
    }

    /// Whether the data seen so far is what `trailer` declares; says what differs if not.
    pub(crate) fn verify(&self, trailer: &Trailer) -> Result<(), String> {
        if trailer.length != self.length {
            return Err(format!(
                "snapshot length mismatch: the sender declared {} bytes, {} arrived",
                trailer.length, self.length
            ));
        }
        if trailer.crc32c != self.crc {
            return Err(format!(
                "snapshot checksum mismatch: the sender declared CRC32C {:08x}, the data has {:08x}",
                trailer.crc32c, self.crc
            ));
        }
        Ok(())
    }
}

/// One piece of an incoming snapshot after its header.
#[derive(Debug)]
pub(crate) enum Part {
    /// Snapshot data, in order.
    Data(Bytes),
    /// The end of the transfer, as the sender declares it.
    End(Trailer),
}

/// Snapshot data being received: hands it back to the sink's `abort` unless it is taken for
/// installing, whichever way the transfer ends (a dropped handler included).
pub(crate) struct Receiving<SD: SnapshotData> {
    sink: Arc<dyn SnapshotSink<SD>>,
    data: Option<SD>,
}

impl<SD: SnapshotData> Receiving<SD> {
    pub(crate) async fn create(sink: Arc<dyn SnapshotSink<SD>>) -> io::Result<Self> {
        let data = sink.create().await?;
        Ok(Receiving {
            sink,
            data: Some(data),
        })
    }

    /// The data being written; `None` only after [`Receiving::complete`] or
    /// [`Receiving::abort`].
    pub(crate) fn data(&mut self) -> io::Result<&mut SD> {
        self.data
            .as_mut()
            .ok_or_else(|| io::Error::other("snapshot data already handed over"))
    }

    /// Takes the data for installing: the sink is no longer told of a failure.
    pub(crate) fn complete(mut self) -> io::Result<SD> {
        self.data
            .take()
            .ok_or_else(|| io::Error::other("snapshot data already handed over"))
    }

    /// Tells the sink the transfer failed (and why) and waits for it to clean up.
    pub(crate) async fn abort(mut self, reason: &str) {
        if let Some(data) = self.data.take() {
            self.sink.abort(data, reason).await;
        }
    }
}

impl<SD: SnapshotData> Drop for Receiving<SD> {
    fn drop(&mut self) {
        // Reached when the handler itself is dropped (connection gone, server shut down):
        // the sink still hears of it, in the background.
        if let Some(data) = self.data.take() {
            let abort = self.sink.abort(
                data,
                "the transfer was dropped unfinished (its connection or the server shut down)",
            );
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(abort);
            }
        }
    }
}
