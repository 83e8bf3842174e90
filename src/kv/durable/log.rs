//! The durable Raft log: entries, vote, committed and last purged log ids in `log.redb`, written
//! by one writer thread that commits whatever is queued in one transaction with one `fsync`.
//!
//! The store keeps a *view* in memory: the vote, the committed and last purged log ids, the
//! last log id, and the entries appended but not yet written. Every write changes the view at
//! once (so readers see it as soon as the call returns) and queues the change for the writer,
//! in call order. A read takes the view's lock and reads the database under it: entries still
//! in memory win, entries outside `(last_purged, last]` are ignored (a truncation or purge the
//! writer has not reached yet), so a read sees exactly the log as the calls so far left it.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::ops::Bound;
use std::ops::RangeBounds;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::MutexGuard;
use std::sync::mpsc;
use std::thread::JoinHandle;

use openraft::LogState;
use openraft::OptionalSend;
use openraft::RaftLogReader;
use openraft::storage::IOFlushed;
use openraft::storage::RaftLogStorage;
use redb::Database;
use redb::Durability;
use redb::ReadableDatabase;
use redb::ReadableTable;
use redb::TableDefinition;
use tokio::sync::Notify;

use super::DurableError;
use super::KvEntry;
use super::KvLogId;
use super::KvVote;
use super::codec;
use crate::kv::KvConfig;

/// Log entries by index.
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
/// The vote, the committed and last purged log ids, the format version.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const KEY_FORMAT: &str = "format";
const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_LAST_PURGED: &str = "last_purged";

/// How many bytes of appended entries may wait for the writer before `append` waits for it.
pub const MAX_UNFLUSHED_BYTES: usize = 64 << 20;

/// The most the writer puts in one transaction (it takes at least one write, however large).
const MAX_BATCH_BYTES: usize = 16 << 20;

/// The durable Raft log of [`DurableStore`](super::DurableStore). Clones share it (openraft
/// uses clones as log readers); the writer thread stops when the last clone is dropped, after
/// writing what was queued.
#[derive(Clone)]
pub struct DurableLogStore {
    shared: Arc<Shared>,
}

impl fmt::Debug for DurableLogStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DurableLogStore")
            .field("path", &self.shared.path)
            .finish()
    }
}

struct Shared {
    path: PathBuf,
    db: Arc<Database>,
    view: Arc<Mutex<View>>,
    /// Signalled after every transaction the writer finished.
    written: Arc<Notify>,
    queue: Option<mpsc::Sender<Write>>,
    writer: Option<JoinHandle<()>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Closing the queue stops the writer once it has written what is queued; waiting for
        // it releases the database file, so the store can be opened again at once.
        self.queue.take();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// The log as the calls so far left it.
#[derive(Default)]
struct View {
    vote: Option<KvVote>,
    committed: Option<KvLogId>,
    last_purged: Option<KvLogId>,
    /// The last log id: of the last entry, or the last purged one when there is no entry.
    last: Option<KvLogId>,
    /// Entries appended but not yet written, with their encoded size.
    unwritten: BTreeMap<u64, (KvEntry, usize)>,
    unwritten_bytes: usize,
    /// Set when a write failed: the store refuses everything after it.
    failed: Option<String>,
}

impl View {
    fn check(&self) -> io::Result<()> {
        match &self.failed {
            None => Ok(()),
            Some(e) => Err(io::Error::other(format!(
                "the log store failed earlier and accepts no more writes: {e}"
            ))),
        }
    }

    fn forget_unwritten(&mut self, keep: impl Fn(u64) -> bool) {
        let gone: Vec<u64> = self.unwritten.keys().copied().filter(|i| !keep(*i)).collect();
        for i in gone {
            if let Some((_, size)) = self.unwritten.remove(&i) {
                self.unwritten_bytes = self.unwritten_bytes.saturating_sub(size);
            }
        }
    }
}

/// A change queued for the writer.
enum Write {
    Append {
        entries: Vec<(KvLogId, Vec<u8>)>,
        callback: IOFlushed<KvConfig>,
    },
    /// Removes the entries from this index on.
    Truncate {
        from: u64,
    },
    Purge {
        upto: KvLogId,
    },
    Vote {
        vote: KvVote,
        done: tokio::sync::oneshot::Sender<io::Result<()>>,
    },
    Committed(Option<KvLogId>),
}

impl Write {
    fn size(&self) -> usize {
        match self {
            Write::Append { entries, .. } => entries.iter().map(|(_, b)| b.len() + 8).sum(),
            _ => 32,
        }
    }

    /// Whether someone waits for this write to be on disk (a committed log id does not).
    fn needs_sync(&self) -> bool {
        !matches!(self, Write::Committed(_))
    }
}

fn lock(view: &Mutex<View>) -> MutexGuard<'_, View> {
    // Nothing panics while holding the lock; a poisoned one still holds a consistent view.
    view.lock().unwrap_or_else(|p| p.into_inner())
}

fn db_err(what: &'static str, path: &Path, e: impl Into<redb::Error>) -> io::Error {
    DurableError::db(what, path, e).into()
}

fn corrupt(what: &'static str, path: &Path, source: crate::DecodeError) -> DurableError {
    DurableError::Corrupt {
        what,
        path: path.to_path_buf(),
        source,
    }
}

impl DurableLogStore {
    /// Opens (or creates) the log at `path` and starts its writer thread.
    pub(super) fn open(path: &Path) -> Result<Self, DurableError> {
        let db = Database::create(path).map_err(|e| DurableError::open(path, e))?;
        let view = load(&db, path)?;
        let db = Arc::new(db);
        let view = Arc::new(Mutex::new(view));
        let written = Arc::new(Notify::new());
        let (tx, rx) = mpsc::channel();
        let writer = {
            let (db, view, written, file) = (db.clone(), view.clone(), written.clone(), path.to_path_buf());
            std::thread::Builder::new()
                .name("raftwire-log-writer".into())
                .spawn(move || run_writer(&db, &view, &written, &file, rx))
                .map_err(|e| DurableError::io("cannot start the writer thread for", path, e))?
        };
        Ok(DurableLogStore {
            shared: Arc::new(Shared {
                path: path.to_path_buf(),
                db,
                view,
                written,
                queue: Some(tx),
                writer: Some(writer),
            }),
        })
    }

    fn view(&self) -> MutexGuard<'_, View> {
        lock(&self.shared.view)
    }

    /// Queues a write; the caller holds the view's lock, so writes queue in call order.
    fn queue(&self, _view: &MutexGuard<'_, View>, write: Write) -> io::Result<()> {
        let queue = self
            .shared
            .queue
            .as_ref()
            .ok_or_else(|| io::Error::other("the log writer has stopped"))?;
        queue
            .send(write)
            .map_err(|_| io::Error::other("the log writer has stopped"))
    }

    /// Waits until fewer than [`MAX_UNFLUSHED_BYTES`] of appended entries wait for the writer.
    async fn wait_for_room(&self) {
        loop {
            let written = self.shared.written.notified();
            let mut written = std::pin::pin!(written);
            written.as_mut().enable();
            {
                let v = self.view();
                if v.unwritten_bytes < MAX_UNFLUSHED_BYTES || v.failed.is_some() {
                    return;
                }
            }
            written.await;
        }
    }
}

/// Reads the stored vote, committed and last purged log ids and the last entry's log id.
fn load(db: &Database, path: &Path) -> Result<View, DurableError> {
    let tx = db
        .begin_write()
        .map_err(|e| DurableError::db("cannot write", path, e))?;
    let mut view = View::default();
    {
        let log = tx
            .open_table(LOG)
            .map_err(|e| DurableError::db("cannot open the log table of", path, e))?;
        let mut meta = tx
            .open_table(META)
            .map_err(|e| DurableError::db("cannot open the metadata table of", path, e))?;
        let read = |meta: &redb::Table<&str, &[u8]>, key: &str| -> Result<Option<Vec<u8>>, DurableError> {
            meta.get(key)
                .map(|v| v.map(|v| v.value().to_vec()))
                .map_err(|e| DurableError::db("cannot read", path, e))
        };
        match read(&meta, KEY_FORMAT)? {
            None => {
                meta.insert(KEY_FORMAT, codec::FORMAT_VERSION.to_be_bytes().as_slice())
                    .map_err(|e| DurableError::db("cannot write", path, e))?;
            }
            Some(v) => check_format(&v, path)?,
        }
        if let Some(v) = read(&meta, KEY_VOTE)? {
            view.vote = Some(codec::decode(&v, "vote", |r| r.vote()).map_err(|e| corrupt("vote", path, e))?);
        }
        if let Some(v) = read(&meta, KEY_COMMITTED)? {
            view.committed = codec::decode(&v, "committed", |r| r.opt_log_id("committed"))
                .map_err(|e| corrupt("committed log id", path, e))?;
        }
        if let Some(v) = read(&meta, KEY_LAST_PURGED)? {
            view.last_purged = codec::decode(&v, "last_purged", |r| r.opt_log_id("last_purged"))
                .map_err(|e| corrupt("last purged log id", path, e))?;
        }
        let last = log.last().map_err(|e| DurableError::db("cannot read", path, e))?;
        view.last = match last {
            Some((_, v)) => {
                let entry = codec::decode(v.value(), "entry", |r| r.entry())
                    .map_err(|e| corrupt("log entry", path, e))?;
                Some(entry.log_id)
            }
            None => view.last_purged,
        };
    }
    tx.commit()
        .map_err(|e| DurableError::db("cannot write", path, e))?;
    Ok(view)
}

pub(super) fn check_format(v: &[u8], path: &Path) -> Result<(), DurableError> {
    let found = <[u8; 8]>::try_from(v).map(u64::from_be_bytes).map_err(|_| {
        corrupt(
            "format version",
            path,
            crate::DecodeError::invalid("format", format!("{} bytes, expected 8", v.len())),
        )
    })?;
    if found != codec::FORMAT_VERSION {
        return Err(DurableError::Format {
            path: path.to_path_buf(),
            found,
            expected: codec::FORMAT_VERSION,
        });
    }
    Ok(())
}

/// The writer thread: takes every queued write, commits them in one transaction (one `fsync`
/// when any of them is waited for), then tells the waiters.
fn run_writer(
    db: &Database,
    view: &Mutex<View>,
    written: &Notify,
    path: &Path,
    queue: mpsc::Receiver<Write>,
) {
    while let Ok(first) = queue.recv() {
        let mut size = first.size();
        let mut batch = vec![first];
        while size < MAX_BATCH_BYTES {
            match queue.try_recv() {
                Ok(w) => {
                    size += w.size();
                    batch.push(w);
                }
                Err(_) => break,
            }
        }
        let failed = lock(view).failed.clone();
        let result = match failed {
            Some(e) => Err(io::Error::other(format!("the log store failed earlier: {e}"))),
            None => write_batch(db, path, &batch),
        };
        {
            let mut v = lock(view);
            match &result {
                Ok(()) => {
                    // What is on disk now reads from the database; an entry appended again
                    // at the same index since (after a truncation) stays in memory.
                    for w in &batch {
                        if let Write::Append { entries, .. } = w {
                            for (log_id, _) in entries {
                                let same = v
                                    .unwritten
                                    .get(&log_id.index)
                                    .is_some_and(|(e, _)| e.log_id == *log_id);
                                if same && let Some((_, size)) = v.unwritten.remove(&log_id.index) {
                                    v.unwritten_bytes = v.unwritten_bytes.saturating_sub(size);
                                }
                            }
                        }
                    }
                }
                Err(e) => {
                    if v.failed.is_none() {
                        tracing::error!(path = %path.display(), error = %e, "writing the Raft log failed; the log store stops accepting writes");
                        v.failed = Some(e.to_string());
                    }
                }
            }
        }
        written.notify_waiters();
        for w in batch {
            let outcome = match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
            };
            match w {
                Write::Append { callback, .. } => callback.io_completed(outcome),
                Write::Vote { done, .. } => {
                    let _ = done.send(outcome);
                }
                Write::Truncate { .. } | Write::Purge { .. } | Write::Committed(_) => {}
            }
        }
    }
}

/// Applies `batch` in one transaction, durable if anything in it is waited for.
fn write_batch(db: &Database, path: &Path, batch: &[Write]) -> io::Result<()> {
    let mut tx = db.begin_write().map_err(|e| db_err("cannot write", path, e))?;
    if !batch.iter().any(Write::needs_sync) {
        tx.set_durability(Durability::None)
            .map_err(|e| db_err("cannot write", path, e))?;
    }
    {
        let mut log = tx.open_table(LOG).map_err(|e| db_err("cannot write", path, e))?;
        let mut meta = tx.open_table(META).map_err(|e| db_err("cannot write", path, e))?;
        for w in batch {
            match w {
                Write::Append { entries, .. } => {
                    for (log_id, bytes) in entries {
                        log.insert(log_id.index, bytes.as_slice())
                            .map_err(|e| db_err("cannot append to", path, e))?;
                    }
                }
                Write::Truncate { from } => {
                    log.retain_in(*from.., |_, _| false)
                        .map_err(|e| db_err("cannot truncate", path, e))?;
                }
                Write::Purge { upto } => {
                    log.retain_in(..=upto.index, |_, _| false)
                        .map_err(|e| db_err("cannot purge", path, e))?;
                    meta.insert(KEY_LAST_PURGED, codec::encode_opt_log_id(Some(upto)).as_slice())
                        .map_err(|e| db_err("cannot purge", path, e))?;
                }
                Write::Vote { vote, .. } => {
                    meta.insert(KEY_VOTE, codec::encode_vote(vote).as_slice())
                        .map_err(|e| db_err("cannot save the vote to", path, e))?;
                }
                Write::Committed(c) => {
                    meta.insert(KEY_COMMITTED, codec::encode_opt_log_id(c.as_ref()).as_slice())
                        .map_err(|e| db_err("cannot save the committed log id to", path, e))?;
                }
            }
        }
    }
    tx.commit().map_err(|e| db_err("cannot commit to", path, e))
}

/// The half-open index range `[start, end)` of `range`.
fn index_range(range: &impl RangeBounds<u64>) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e.saturating_add(1),
        Bound::Excluded(&e) => e,
        Bound::Unbounded => u64::MAX,
    };
    (start, end)
}

impl RaftLogReader<KvConfig> for DurableLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + fmt::Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<KvEntry>, io::Error> {
        let path = &self.shared.path;
        // The lock is held for the whole read: no write can be queued meanwhile, so the
        // view and what the writer may commit during the read agree (see the module doc).
        let v = self.view();
        let (start, end) = index_range(&range);
        let start = start.max(v.last_purged.map_or(0, |l| l.index + 1));
        let end = end.min(v.last.map_or(0, |l| l.index + 1));
        if start >= end {
            return Ok(Vec::new());
        }
        let tx = self
            .shared
            .db
            .begin_read()
            .map_err(|e| db_err("cannot read", path, e))?;
        let table = tx.open_table(LOG).map_err(|e| db_err("cannot read", path, e))?;
        let mut stored = table
            .range(start..end)
            .map_err(|e| db_err("cannot read", path, e))?
            .peekable();
        let mut out = Vec::with_capacity(usize::try_from(end - start).unwrap_or(0).min(4096));
        let mut index = start;
        while index < end {
            if let Some((entry, _)) = v.unwritten.get(&index) {
                out.push(entry.clone());
                index += 1;
                continue;
            }
            // Stored entries below `index` are stale: entries in memory replaced them.
            while let Some(Ok((k, _))) = stored.peek() {
                if k.value() >= index {
                    break;
                }
                stored.next();
            }
            let next_stored = match stored.peek() {
                Some(Ok((k, _))) => Some(k.value()),
                // Taken (and reported) by `next` below.
                Some(Err(_)) => Some(index),
                None => None,
            };
            if next_stored != Some(index) {
                if out.is_empty() {
                    // Nothing read yet: the log does not start until later (a log that was
                    // never purged starts at its first entry, 0 or 1). Jump there.
                    let next_unwritten = v.unwritten.range(index..end).next().map(|(i, _)| *i);
                    match [next_stored, next_unwritten].into_iter().flatten().min() {
                        Some(next) => {
                            index = next;
                            continue;
                        }
                        None => break,
                    }
                } else {
                    // A hole inside the log: never valid.
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("log entry {index} is missing from {}", path.display()),
                    ));
                }
            }
            let entry = match stored.next() {
                Some(Ok((_, val))) => codec::decode(val.value(), "entry", |r| r.entry())
                    .map_err(|e| io::Error::from(corrupt("log entry", path, e)))?,
                Some(Err(e)) => return Err(db_err("cannot read", path, e)),
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("log entry {index} is missing from {}", path.display()),
                    ));
                }
            };
            if entry.log_id.index != index {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "log entry stored at index {index} names index {} in {}",
                        entry.log_id.index,
                        path.display()
                    ),
                ));
            }
            out.push(entry);
            index += 1;
        }
        Ok(out)
    }

    async fn read_vote(&mut self) -> Result<Option<KvVote>, io::Error> {
        Ok(self.view().vote)
    }
}

impl RaftLogStorage<KvConfig> for DurableLogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<KvConfig>, io::Error> {
        let v = self.view();
        Ok(LogState {
            last_purged_log_id: v.last_purged,
            last_log_id: v.last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &KvVote) -> Result<(), io::Error> {
        let (done, on_disk) = tokio::sync::oneshot::channel();
        {
            let v = self.view();
            v.check()?;
            self.queue(&v, Write::Vote { vote: *vote, done })?;
        }
        on_disk
            .await
            .map_err(|_| io::Error::other("the log writer stopped before saving the vote"))??;
        self.view().vote = Some(*vote);
        Ok(())
    }

    async fn save_committed(&mut self, committed: Option<KvLogId>) -> Result<(), io::Error> {
        let mut v = self.view();
        v.check()?;
        v.committed = committed;
        self.queue(&v, Write::Committed(committed))
    }

    async fn read_committed(&mut self) -> Result<Option<KvLogId>, io::Error> {
        Ok(self.view().committed)
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<KvConfig>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = KvEntry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<KvEntry> = entries.into_iter().collect();
        let mut encoded = Vec::with_capacity(entries.len());
        for e in &entries {
            let bytes = codec::encode_entry(e).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            encoded.push((e.log_id, bytes));
        }
        self.wait_for_room().await;
        let mut v = self.view();
        v.check()?;
        for (entry, (_, bytes)) in entries.into_iter().zip(&encoded) {
            v.last = Some(entry.log_id);
            v.unwritten_bytes += bytes.len();
            if let Some((_, old)) = v.unwritten.insert(entry.log_id.index, (entry, bytes.len())) {
                v.unwritten_bytes = v.unwritten_bytes.saturating_sub(old);
            }
        }
        self.queue(
            &v,
            Write::Append {
                entries: encoded,
                callback,
            },
        )
    }

    async fn truncate_after(&mut self, last_log_id: Option<KvLogId>) -> Result<(), io::Error> {
        let mut v = self.view();
        v.check()?;
        let from = last_log_id.map_or(0, |l| l.index + 1);
        v.forget_unwritten(|i| i < from);
        // Truncating past the end removes nothing; otherwise `last_log_id` is the last entry
        // left (none left: the log ends where it was purged).
        if v.last.is_some_and(|last| last.index >= from) {
            v.last = last_log_id.or(v.last_purged);
        }
        self.queue(&v, Write::Truncate { from })
    }

    async fn purge(&mut self, log_id: KvLogId) -> Result<(), io::Error> {
        let mut v = self.view();
        v.check()?;
        v.forget_unwritten(|i| i > log_id.index);
        v.last_purged = Some(log_id);
        if v.last < Some(log_id) {
            v.last = Some(log_id);
        }
        self.queue(&v, Write::Purge { upto: log_id })
    }
}
