//! Durable storage for the demo key-value store: the Raft log, the vote, the committed log id,
//! the state machine and its snapshots, all under one data directory, on
//! [redb](https://docs.rs/redb) (an embedded, pure-Rust, ACID B-tree store).
//!
//! ```text
//! DIR/log.redb        the log, the vote, the committed and last purged log ids
//! DIR/sm.redb         the key-value pairs, the applied log id and membership, the snapshot record
//! DIR/snapshots/      the current snapshot's file; partial files of snapshots being built or
//!                     received (removed when a transfer fails and when the store is opened)
//! ```
//!
//! It serves the same type config as the in-memory store, [`KvConfig`](crate::kv::KvConfig):
//! in openraft 0.10 the snapshot data type belongs to the state machine, so only
//! [`DurableStateMachine`] differs (its snapshot data is a [`DurableSnapshotFile`]). A node on
//! durable storage uses `NetworkFactory<KvConfig, DurableSnapshotFile>` and gives its server
//! the store's [`DurableSnapshotSink`] (`Server::builder_with_sink`), so that incoming
//! snapshots are written to files.
//!
//! # Durability
//!
//! - **Log appends** return as soon as the entries are readable (they are kept in memory until
//!   written) and are written by one writer thread: it takes every write queued since its last
//!   commit (appends, truncations, purges, the vote, the committed log id), writes them in one
//!   redb transaction with one `fsync`, and only then tells openraft the appends are flushed
//!   (`IOFlushed`). Appends that arrive during an `fsync` share the next one (group commit), so
//!   openraft's core never waits for the disk on an append. The writer falls behind by at most
//!   [`MAX_UNFLUSHED_BYTES`] of entries before `append` waits for it.
//! - **The vote** is written the same way, and `save_vote` returns once it is on disk.
//! - **The committed log id** rides along with the next durable commit (it needs no `fsync`
//!   of its own: the state machine below is durable).
//! - **Applying** works the same way: `apply` computes the answers against the state as
//!   applied so far, queues the changes and returns; the state machine's writer thread
//!   commits everything queued (the key-value changes, the applied log id and membership) in
//!   one transaction with one `fsync`, and only then are the answers sent, so no client hears
//!   of a write that is not on disk. (openraft calls `apply` with what was committed since its
//!   last call, often one entry, and not again until it returns: a durable transaction per
//!   call would apply one entry per `fsync`.)
//! - **Snapshots** are files: built by streaming the key-value table (read in one consistent
//!   read transaction while applying goes on) into a new file, received by writing each chunk
//!   to a new file, never held whole in memory. A snapshot file is `fsync`ed and renamed into
//!   place, and becomes the current snapshot in the same durable transaction that installs its
//!   contents, so a crash leaves either the old snapshot and state or the new ones.
//!
//! After `kill -9` at any instant, a reopened store has every append openraft was told was
//! flushed, the last saved vote, and a state machine at least as new as every answer a client
//! got. redb commits are atomic, so what is on disk is always the state after some prefix of
//! the writes, never a torn one.
//!
//! Both writer threads stop when the last clone of their store is dropped, after writing what
//! was queued; until then the data directory is in use ([`DurableError::InUse`]). openraft's
//! tasks may hold clones for a moment after `Raft::shutdown` returns: a node restarted in the
//! same process retries opening briefly.
//!
//! # Snapshot file format
//!
//! An 8-byte magic `RWKVSNP1`, then per key-value pair a `u32` key length, the key (UTF-8), a
//! `u32` value length and the value; then a `u32` `0xFFFF_FFFF` end mark, the number of pairs
//! (`u64`) and the CRC32C of every byte before the end mark (`u32`). All integers are
//! big-endian. A file whose end does not match is refused.

mod codec;
mod log;
mod sm;
mod snapshot;

use std::fs;
use std::io;
use std::path::Path;
use std::path::PathBuf;

pub use log::DurableLogStore;
pub use log::MAX_UNFLUSHED_BYTES;
pub use sm::DurableStateMachine;
pub use snapshot::DurableSnapshotFile;
pub use snapshot::DurableSnapshotSink;

use super::KvEntry;
use super::KvLogId;
use super::KvMembership;
use super::KvSnapshotMeta;
use super::KvVote;
use crate::DecodeError;

/// The Raft handle of a node on durable storage.
pub type DurableRaft = openraft::Raft<crate::kv::KvConfig, DurableStateMachine>;

const LOG_FILE: &str = "log.redb";
const SM_FILE: &str = "sm.redb";
const SNAPSHOT_DIR: &str = "snapshots";

/// Opening a durable store failed, or a stored record is unreadable.
#[derive(Debug, thiserror::Error)]
pub enum DurableError {
    /// A file or directory of the store could not be created, opened or read.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// Another store, in this process or another, has the database open: a data directory
    /// serves one store at a time.
    #[error("{} is in use by another store or process", path.display())]
    InUse {
        /// The database file.
        path: PathBuf,
    },
    /// The database engine failed.
    #[error("{what} {}: {source}", path.display())]
    Database {
        /// What was being done.
        what: &'static str,
        /// The database file.
        path: PathBuf,
        /// The engine's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A record in the store does not decode: the store is corrupt, or was written by
    /// something else.
    #[error("{} holds an unreadable {what}: {source}", path.display())]
    Corrupt {
        /// Which record.
        what: &'static str,
        /// The database file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: DecodeError,
    },
    /// The store was written in another on-disk format version.
    #[error("{} is in storage format {found}; this build reads format {expected}", path.display())]
    Format {
        /// The database file.
        path: PathBuf,
        /// The version found.
        found: u64,
        /// The version this build writes.
        expected: u64,
    },
}

impl DurableError {
    fn io(what: &'static str, path: &Path, source: io::Error) -> Self {
        DurableError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    }

    fn db(what: &'static str, path: &Path, source: impl Into<redb::Error>) -> Self {
        DurableError::Database {
            what,
            path: path.to_path_buf(),
            source: Box::new(source.into()),
        }
    }

    /// Opening a database file: one that is open elsewhere is [`DurableError::InUse`].
    fn open(path: &Path, source: redb::DatabaseError) -> Self {
        match source {
            redb::DatabaseError::DatabaseAlreadyOpen => DurableError::InUse {
                path: path.to_path_buf(),
            },
            other => DurableError::db("cannot open", path, other),
        }
    }
}

/// The storage traits speak `io::Error`; openraft turns it into its `StorageError` with the
/// subject (log, vote, state machine, snapshot) of the call that failed.
impl From<DurableError> for io::Error {
    fn from(e: DurableError) -> Self {
        let kind = match &e {
            DurableError::Io { source, .. } => source.kind(),
            DurableError::Corrupt { .. } | DurableError::Format { .. } => io::ErrorKind::InvalidData,
            DurableError::InUse { .. } => io::ErrorKind::ResourceBusy,
            DurableError::Database { .. } => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}

/// A log store and state machine on one data directory.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use raftwire::kv::durable::DurableStore;
///
/// let store = DurableStore::open("data/node-1")?;
/// let (log, sm) = (store.log_store(), store.state_machine());
/// // openraft::Raft::new(1, config, network, log, sm).await?, then
/// // Server::builder_with_sink(raft, net_config, store.snapshot_sink()).bind(addr).await?
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct DurableStore {
    dir: PathBuf,
    log: DurableLogStore,
    sm: DurableStateMachine,
}

impl DurableStore {
    /// Opens the store in `dir`, creating the directory and an empty store if needed. A store
    /// that was there before resumes: its vote, log, committed log id, applied state and
    /// current snapshot are back. Partial snapshot files left by a crash are removed.
    ///
    /// Blocking: it opens and reads files (a few milliseconds).
    pub fn open(dir: impl AsRef<Path>) -> Result<DurableStore, DurableError> {
        let dir = dir.as_ref().to_path_buf();
        let snapshots = dir.join(SNAPSHOT_DIR);
        fs::create_dir_all(&snapshots).map_err(|e| DurableError::io("cannot create", &snapshots, e))?;
        let log = DurableLogStore::open(&dir.join(LOG_FILE))?;
        let sm = DurableStateMachine::open(&dir.join(SM_FILE), &snapshots)?;
        // New files and directories are on disk only once their directory entries are.
        sync_dir(&dir).map_err(|e| DurableError::io("cannot sync", &dir, e))?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent).map_err(|e| DurableError::io("cannot sync", parent, e))?;
        }
        Ok(DurableStore { dir, log, sm })
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The log store (clones share it).
    pub fn log_store(&self) -> DurableLogStore {
        self.log.clone()
    }

    /// The state machine (clones share it).
    pub fn state_machine(&self) -> DurableStateMachine {
        self.sm.clone()
    }

    /// The sink a raftwire server writes incoming snapshots to: each into a new file in this
    /// store's snapshot directory, deleted if the transfer fails.
    pub fn snapshot_sink(&self) -> DurableSnapshotSink {
        self.sm.snapshot_sink()
    }
}

/// `fsync`s a directory, so that the entries created or renamed in it are durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// A name no other file of this store has: a prefix, the time in nanoseconds and a counter.
fn unique_name(prefix: &str, suffix: &str) -> String {
    use std::sync::atomic::AtomicU64;
    use std::sync::atomic::Ordering;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{nanos:x}-{n}{suffix}")
}

/// Runs blocking work off the async runtime's worker threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> io::Result<T> + Send + 'static) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io::Error::other(format!("storage task failed: {e}")))?
}
