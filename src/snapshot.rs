//! What raftwire needs from the state machine's snapshot data to stream it in chunks.

use std::future::Future;
use std::io;
use std::pin::Pin;

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

/// Future returned by a [`SnapshotSink`].
pub type SinkFuture<SD> = Pin<Box<dyn Future<Output = io::Result<SD>> + Send>>;

/// Creates the empty snapshot data a receiving server writes an incoming snapshot into.
///
/// Any `Fn() -> impl Future<Output = io::Result<SD>>` is a sink; for data types with a
/// `Default` (an in-memory cursor) the server uses `SD::default()` unless told otherwise.
pub trait SnapshotSink<SD>: Send + Sync + 'static {
    /// Returns fresh, empty snapshot data positioned at its start.
    fn create(&self) -> SinkFuture<SD>;
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
pub(crate) async fn next_chunk<SD: SnapshotData>(
    data: &mut SD,
    size: usize,
) -> io::Result<Option<bytes::Bytes>> {
    use tokio::io::AsyncReadExt;
    let mut buf = bytes::BytesMut::with_capacity(size);
    while buf.len() < size {
        if data.read_buf(&mut buf).await? == 0 {
            break;
        }
    }
    Ok((!buf.is_empty()).then(|| buf.freeze()))
}
