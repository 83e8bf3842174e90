//! The durable state machine: key-value pairs, the applied log id and membership, and the
//! record of the current snapshot in `sm.redb`; snapshot files in the snapshot directory.
//!
//! Applying works like appending to the log: `apply` computes the answers against the state
//! as applied so far (the database plus the changes not yet written, kept in memory), queues
//! the changes and returns; one writer thread commits everything queued in one transaction
//! with one `fsync`, and only then sends the answers. openraft hands `apply` whatever was
//! committed since its last call, often a single entry: were each call to wait for its own
//! `fsync`, a busy node would apply one entry per `fsync`. Reads (`get`, `dump`, the applied
//! state) see the changes at once; snapshots are built and installed after the writer has
//! written everything queued before them.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io;
use std::io::BufReader;
use std::io::BufWriter;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::MutexGuard;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::thread::JoinHandle;

use bytes::Bytes;
use futures::Stream;
use futures::TryStreamExt;
use openraft::EntryPayload;
use openraft::OptionalSend;
use openraft::RaftSnapshotBuilder;
use openraft::Snapshot;
use openraft::StoredMembership;
use openraft::impls::BasicNode;
use openraft::storage::ApplyResponder;
use openraft::storage::EntryResponder;
use openraft::storage::RaftStateMachine;
use redb::Database;
use redb::ReadableDatabase;
use redb::ReadableTable;
use redb::TableDefinition;
use tokio::sync::Notify;

use super::DurableError;
use super::DurableSnapshotFile;
use super::DurableSnapshotSink;
use super::KvEntry;
use super::KvLogId;
use super::KvMembership;
use super::KvSnapshotMeta;
use super::blocking;
use super::codec;
use super::snapshot;
use super::snapshot::SnapshotReader;
use super::snapshot::SnapshotWriter;
use crate::WireLeaderId;
use crate::kv::KvConfig;
use crate::kv::KvRequest;
use crate::kv::KvResponse;

/// The key-value pairs.
const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
/// The applied log id and membership, the current snapshot's record, the format version.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const KEY_FORMAT: &str = "format";
const KEY_APPLIED: &str = "applied";
const KEY_MEMBERSHIP: &str = "membership";
const KEY_SNAPSHOT: &str = "snapshot";

/// How many bytes of applied changes may wait for the writer before `apply` waits for it.
const MAX_UNWRITTEN_BYTES: usize = 64 << 20;
/// The most the writer puts in one transaction (it takes at least one batch, however large).
const MAX_BATCH_BYTES: usize = 16 << 20;

/// The state machine of [`DurableStore`](super::DurableStore). Clones share it.
#[derive(Clone)]
pub struct DurableStateMachine {
    shared: Arc<Shared>,
}

struct Shared {
    path: PathBuf,
    snapshots: PathBuf,
    db: Arc<Database>,
    view: Arc<Mutex<View>>,
    /// Signalled after every transaction the writer finished.
    written: Arc<Notify>,
    queue: Option<mpsc::Sender<Write>>,
    writer: Option<JoinHandle<()>>,
    installed: AtomicU64,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // The writer stops once it has written what is queued; waiting for it releases the
        // database file, so the store can be opened again at once.
        self.queue.take();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// The state as applied so far.
#[derive(Default)]
struct View {
    applied: Option<KvLogId>,
    membership: KvMembership,
    /// Changes applied but not yet written: the latest per key (`None`: deleted), with the
    /// number of the change that made it.
    unwritten: HashMap<String, (u64, Option<Bytes>)>,
    unwritten_bytes: usize,
    changes: u64,
    /// Set when a write failed: the state machine refuses everything after it.
    failed: Option<String>,
}

impl View {
    fn check(&self) -> io::Result<()> {
        match &self.failed {
            None => Ok(()),
            Some(e) => Err(io::Error::other(format!(
                "the state machine failed earlier and applies nothing more: {e}"
            ))),
        }
    }
}

fn weight(key: &str, value: &Option<Bytes>) -> usize {
    key.len() + value.as_ref().map_or(0, |v| v.len()) + 32
}

fn lock(view: &Mutex<View>) -> MutexGuard<'_, View> {
    // Nothing panics while holding the lock; a poisoned one still holds a consistent view.
    view.lock().unwrap_or_else(|p| p.into_inner())
}

/// A key's value as applied so far: unwritten changes first, then the database.
fn current(
    view: &View,
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
    path: &Path,
) -> io::Result<Option<Bytes>> {
    if let Some((_, value)) = view.unwritten.get(key) {
        return Ok(value.clone());
    }
    let value = table.get(key).map_err(|e| db_err("cannot read", path, e))?;
    Ok(value.map(|v| Bytes::copy_from_slice(v.value())))
}

/// One key's new value (`None`: deleted), numbered in the order applied.
struct Change {
    number: u64,
    key: String,
    value: Option<Bytes>,
}

/// Work for the writer.
enum Write {
    /// The changes of one `apply` call, the state they leave, and the answers to send once
    /// they are on disk.
    Apply {
        changes: Vec<Change>,
        applied: KvLogId,
        membership: Option<KvMembership>,
        answers: Vec<(ApplyResponder<KvConfig>, KvResponse)>,
    },
    /// Answered once everything queued before it is on disk.
    Sync(tokio::sync::oneshot::Sender<io::Result<()>>),
}

impl Write {
    fn size(&self) -> usize {
        match self {
            Write::Apply { changes, .. } => {
                changes.iter().map(|c| weight(&c.key, &c.value)).sum::<usize>() + 64
            }
            Write::Sync(_) => 0,
        }
    }
}

/// The writer thread: takes every queued batch, commits them in one durable transaction,
/// then sends their answers.
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
            Some(e) => Err(io::Error::other(format!("the state machine failed earlier: {e}"))),
            None => write_batch(db, path, &batch),
        };
        {
            let mut v = lock(view);
            match &result {
                Ok(()) => {
                    // Written changes read from the database now, unless the key changed again.
                    for w in &batch {
                        if let Write::Apply { changes, .. } = w {
                            for c in changes {
                                let same = v.unwritten.get(&c.key).is_some_and(|(n, _)| *n == c.number);
                                if same && let Some((_, value)) = v.unwritten.remove(&c.key) {
                                    v.unwritten_bytes =
                                        v.unwritten_bytes.saturating_sub(weight(&c.key, &value));
                                }
                            }
                        }
                    }
                }
                Err(e) => {
                    if v.failed.is_none() {
                        tracing::error!(path = %path.display(), error = %e, "writing the state machine failed; it stops applying");
                        v.failed = Some(e.to_string());
                    }
                }
            }
        }
        written.notify_waiters();
        for w in batch {
            match w {
                // Not on disk: no answer (the clients' writes fail; openraft stops at the
                // state machine's next call, which returns the error).
                Write::Apply { answers, .. } => {
                    if result.is_ok() {
                        for (responder, response) in answers {
                            responder.send(response);
                        }
                    }
                }
                Write::Sync(done) => {
                    let outcome = match &result {
                        Ok(()) => Ok(()),
                        Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
                    };
                    let _ = done.send(outcome);
                }
            }
        }
    }
}

/// Writes the changes of `batch` and the state they leave in one durable transaction.
fn write_batch(db: &Database, path: &Path, batch: &[Write]) -> io::Result<()> {
    if !batch.iter().any(|w| matches!(w, Write::Apply { .. })) {
        // Only syncs: every earlier batch was committed durably already.
        return Ok(());
    }
    let tx = db.begin_write().map_err(|e| db_err("cannot write", path, e))?;
    {
        let mut kv = tx.open_table(KV).map_err(|e| db_err("cannot write", path, e))?;
        let mut meta = tx.open_table(META).map_err(|e| db_err("cannot write", path, e))?;
        let mut last_applied = None;
        let mut last_membership = None;
        for w in batch {
            let Write::Apply {
                changes,
                applied,
                membership,
                ..
            } = w
            else {
                continue;
            };
            for c in changes {
                match &c.value {
                    Some(v) => kv.insert(c.key.as_str(), v.as_ref()).map(|_| ()),
                    None => kv.remove(c.key.as_str()).map(|_| ()),
                }
                .map_err(|e| db_err("cannot apply to", path, e))?;
            }
            last_applied = Some(*applied);
            if membership.is_some() {
                last_membership = membership.as_ref();
            }
        }
        meta.insert(
            KEY_APPLIED,
            codec::encode_opt_log_id(last_applied.as_ref()).as_slice(),
        )
        .map_err(|e| db_err("cannot apply to", path, e))?;
        if let Some(m) = last_membership {
            let bytes = codec::encode_stored_membership(m)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            meta.insert(KEY_MEMBERSHIP, bytes.as_slice())
                .map_err(|e| db_err("cannot apply to", path, e))?;
        }
    }
    tx.commit().map_err(|e| db_err("cannot commit to", path, e))
}

impl fmt::Debug for DurableStateMachine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DurableStateMachine")
            .field("path", &self.shared.path)
            .field("snapshots", &self.shared.snapshots)
            .finish()
    }
}

fn db_err(what: &'static str, path: &Path, e: impl Into<redb::Error>) -> io::Error {
    DurableError::db(what, path, e).into()
}

fn corrupt(what: &'static str, path: &Path, source: crate::DecodeError) -> io::Error {
    DurableError::Corrupt {
        what,
        path: path.to_path_buf(),
        source,
    }
    .into()
}

/// The applied state and snapshot record, read in whichever transaction is at hand.
struct Applied {
    last_applied: Option<KvLogId>,
    membership: KvMembership,
    snapshot: Option<(KvSnapshotMeta, String)>,
}

fn read_applied(meta: &impl ReadableTable<&'static str, &'static [u8]>, path: &Path) -> io::Result<Applied> {
    let get = |key: &str| -> io::Result<Option<Vec<u8>>> {
        meta.get(key)
            .map(|v| v.map(|v| v.value().to_vec()))
            .map_err(|e| db_err("cannot read", path, e))
    };
    let last_applied = match get(KEY_APPLIED)? {
        Some(v) => codec::decode(&v, "applied", |r| r.opt_log_id("applied"))
            .map_err(|e| corrupt("applied log id", path, e))?,
        None => None,
    };
    let membership = match get(KEY_MEMBERSHIP)? {
        Some(v) => codec::decode(&v, "membership", |r| r.stored_membership())
            .map_err(|e| corrupt("membership", path, e))?,
        None => StoredMembership::default(),
    };
    let snapshot = match get(KEY_SNAPSHOT)? {
        Some(v) => Some(
            codec::decode(&v, "snapshot", |r| r.snapshot_record())
                .map_err(|e| corrupt("snapshot record", path, e))?,
        ),
        None => None,
    };
    Ok(Applied {
        last_applied,
        membership,
        snapshot,
    })
}

impl DurableStateMachine {
    /// Opens (or creates) the state machine at `path` with its snapshots in `snapshots`, and
    /// removes every file there that is not the current snapshot's.
    pub(super) fn open(path: &Path, snapshots: &Path) -> Result<Self, DurableError> {
        let db = Database::create(path).map_err(|e| DurableError::open(path, e))?;
        let tx = db
            .begin_write()
            .map_err(|e| DurableError::db("cannot write", path, e))?;
        let (current, applied) = {
            tx.open_table(KV)
                .map_err(|e| DurableError::db("cannot open the key-value table of", path, e))?;
            let mut meta = tx
                .open_table(META)
                .map_err(|e| DurableError::db("cannot open the metadata table of", path, e))?;
            let format = meta
                .get(KEY_FORMAT)
                .map(|v| v.map(|v| v.value().to_vec()))
                .map_err(|e| DurableError::db("cannot read", path, e))?;
            match format {
                None => {
                    meta.insert(KEY_FORMAT, codec::FORMAT_VERSION.to_be_bytes().as_slice())
                        .map_err(|e| DurableError::db("cannot write", path, e))?;
                }
                Some(v) => super::log::check_format(&v, path)?,
            }
            let applied = read_applied(&meta, path).map_err(|e| DurableError::io("cannot read", path, e))?;
            (applied.snapshot.as_ref().map(|(_, name)| name.clone()), applied)
        };
        tx.commit()
            .map_err(|e| DurableError::db("cannot write", path, e))?;

        // Files of snapshots a crash interrupted (being built or received), and a replaced
        // snapshot whose deletion a crash prevented.
        let entries = fs::read_dir(snapshots).map_err(|e| DurableError::io("cannot list", snapshots, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| DurableError::io("cannot list", snapshots, e))?;
            let name = entry.file_name();
            if Some(name.to_string_lossy().as_ref()) != current.as_deref() {
                tracing::info!(file = %entry.path().display(), "removing a stale snapshot file");
                snapshot::remove_quietly(&entry.path());
            }
        }
        if let Some(name) = &current
            && !snapshots.join(name).is_file()
        {
            return Err(DurableError::io(
                "the current snapshot's file is missing:",
                &snapshots.join(name),
                io::Error::from(io::ErrorKind::NotFound),
            ));
        }

        let db = Arc::new(db);
        let view = Arc::new(Mutex::new(View {
            applied: applied.last_applied,
            membership: applied.membership,
            ..View::default()
        }));
        let written = Arc::new(Notify::new());
        let (tx, rx) = mpsc::channel();
        let writer = {
            let (db, view, written, file) = (db.clone(), view.clone(), written.clone(), path.to_path_buf());
            std::thread::Builder::new()
                .name("raftwire-sm-writer".into())
                .spawn(move || run_writer(&db, &view, &written, &file, rx))
                .map_err(|e| DurableError::io("cannot start the writer thread for", path, e))?
        };
        Ok(DurableStateMachine {
            shared: Arc::new(Shared {
                path: path.to_path_buf(),
                snapshots: snapshots.to_path_buf(),
                db,
                view,
                written,
                queue: Some(tx),
                writer: Some(writer),
                installed: AtomicU64::new(0),
            }),
        })
    }

    /// The sink for snapshots received from a leader; see [`DurableSnapshotSink`].
    pub fn snapshot_sink(&self) -> DurableSnapshotSink {
        DurableSnapshotSink::new(self.shared.snapshots.clone())
    }

    fn read_tx(&self) -> io::Result<redb::ReadTransaction> {
        self.shared
            .db
            .begin_read()
            .map_err(|e| db_err("cannot read", &self.shared.path, e))
    }

    /// The value of `key` as applied on this node (not linearizable by itself).
    pub fn get(&self, key: &str) -> io::Result<Option<Bytes>> {
        let path = &self.shared.path;
        // Read under the view's lock: a change the writer takes out of memory is in the
        // database by then.
        let v = lock(&self.shared.view);
        let tx = self.read_tx()?;
        let table = tx.open_table(KV).map_err(|e| db_err("cannot read", path, e))?;
        current(&v, &table, key, path)
    }

    /// A copy of every key and value applied on this node (for tests and small stores: it is
    /// read into memory).
    pub fn dump(&self) -> io::Result<BTreeMap<String, Bytes>> {
        let path = &self.shared.path;
        let v = lock(&self.shared.view);
        let tx = self.read_tx()?;
        let table = tx.open_table(KV).map_err(|e| db_err("cannot read", path, e))?;
        let mut out = BTreeMap::new();
        for pair in table.iter().map_err(|e| db_err("cannot read", path, e))? {
            let (k, v) = pair.map_err(|e| db_err("cannot read", path, e))?;
            out.insert(k.value().to_string(), Bytes::copy_from_slice(v.value()));
        }
        for (key, (_, value)) in &v.unwritten {
            match value {
                Some(value) => out.insert(key.clone(), value.clone()),
                None => out.remove(key),
            };
        }
        Ok(out)
    }

    /// The log id of the last applied entry.
    pub fn last_applied(&self) -> Option<KvLogId> {
        lock(&self.shared.view).applied
    }

    /// Waits until everything applied so far is on disk. (Answers to clients wait for that
    /// by themselves; this is for callers that apply without answering anyone.)
    pub async fn sync(&self) -> io::Result<()> {
        let (done, on_disk) = tokio::sync::oneshot::channel();
        {
            let v = lock(&self.shared.view);
            v.check()?;
            self.shared.queue(Write::Sync(done))?;
        }
        on_disk
            .await
            .map_err(|_| io::Error::other("the state machine's writer stopped"))?
    }

    /// Waits until fewer than `MAX_UNWRITTEN_BYTES` of applied changes wait for the writer.
    async fn wait_for_room(&self) {
        loop {
            let written = self.shared.written.notified();
            let mut written = std::pin::pin!(written);
            written.as_mut().enable();
            {
                let v = lock(&self.shared.view);
                if v.unwritten_bytes < MAX_UNWRITTEN_BYTES || v.failed.is_some() {
                    return;
                }
            }
            written.await;
        }
    }

    /// How many snapshots this state machine installed since it was opened (from a leader,
    /// or its own when openraft restores it at start-up).
    pub fn snapshots_installed(&self) -> u64 {
        self.shared.installed.load(Ordering::Relaxed)
    }
}

impl Shared {
    fn queue(&self, write: Write) -> io::Result<()> {
        let queue = self
            .queue
            .as_ref()
            .ok_or_else(|| io::Error::other("the state machine's writer has stopped"))?;
        queue
            .send(write)
            .map_err(|_| io::Error::other("the state machine's writer has stopped"))
    }

    /// Applies `entries` to the view and queues the changes (and the answers) for the writer.
    fn stage(
        &self,
        entries: Vec<KvEntry>,
        responders: Vec<Option<ApplyResponder<KvConfig>>>,
    ) -> io::Result<()> {
        let path = &self.path;
        let Some(applied) = entries.last().map(|e| e.log_id) else {
            return Ok(());
        };
        let mut v = lock(&self.view);
        v.check()?;
        let tx = self.db.begin_read().map_err(|e| db_err("cannot read", path, e))?;
        let table = tx.open_table(KV).map_err(|e| db_err("cannot read", path, e))?;
        let mut changes = Vec::new();
        let mut membership = None;
        let mut answers = Vec::new();
        for (entry, responder) in entries.into_iter().zip(responders) {
            let (key, value) = match entry.payload {
                EntryPayload::Blank => (None, None),
                EntryPayload::Normal(KvRequest::Set { key, value }) => (Some(key), Some(value)),
                EntryPayload::Normal(KvRequest::Delete { key }) => (Some(key), None),
                EntryPayload::Membership(m) => {
                    let m = StoredMembership::new(Some(entry.log_id), m);
                    v.membership = m.clone();
                    membership = Some(m);
                    (None, None)
                }
            };
            let previous = match key {
                None => None,
                Some(key) => {
                    let previous = current(&v, &table, &key, path)?;
                    v.changes += 1;
                    let number = v.changes;
                    v.unwritten_bytes += weight(&key, &value);
                    if let Some((_, old)) = v.unwritten.insert(key.clone(), (number, value.clone())) {
                        v.unwritten_bytes = v.unwritten_bytes.saturating_sub(weight(&key, &old));
                    }
                    changes.push(Change { number, key, value });
                    previous
                }
            };
            if let Some(responder) = responder {
                answers.push((responder, KvResponse { previous }));
            }
        }
        v.applied = Some(applied);
        self.queue(Write::Apply {
            changes,
            applied,
            membership,
            answers,
        })
    }

    /// Writes the state as of one read transaction to a new snapshot file and makes it the
    /// current snapshot, unless a newer one became current meanwhile (then the file is not
    /// kept: `false`).
    fn build(&self) -> io::Result<(KvSnapshotMeta, PathBuf, bool)> {
        let path = &self.path;
        let tx = self.db.begin_read().map_err(|e| db_err("cannot read", path, e))?;
        let meta_table = tx.open_table(META).map_err(|e| db_err("cannot read", path, e))?;
        let applied = read_applied(&meta_table, path)?;
        let meta = KvSnapshotMeta {
            last_log_id: applied.last_applied,
            last_membership: applied.membership,
        };
        let (file, partial) = snapshot::create_partial(&self.snapshots)?;
        let written = (|| {
            let table = tx.open_table(KV).map_err(|e| db_err("cannot read", path, e))?;
            let mut out = SnapshotWriter::new(BufWriter::with_capacity(1 << 20, file))?;
            for pair in table.iter().map_err(|e| db_err("cannot read", path, e))? {
                let (k, v) = pair.map_err(|e| db_err("cannot read", path, e))?;
                out.pair(k.value(), v.value())?;
            }
            let file = out.finish()?.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            drop(file);
            snapshot::finish_partial(&partial, &self.snapshots)
        })();
        drop(meta_table);
        drop(tx);
        let name = match written {
            Ok(name) => name,
            Err(e) => {
                snapshot::remove_quietly(&partial);
                return Err(e);
            }
        };
        let file = self.snapshots.join(&name);
        // Make it current in a durable transaction (a concurrent install may have made a
        // newer snapshot current meanwhile; it stays).
        let tx = self
            .db
            .begin_write()
            .map_err(|e| db_err("cannot write", path, e))?;
        let replaced = {
            let mut meta_table = tx.open_table(META).map_err(|e| db_err("cannot write", path, e))?;
            let current = read_applied(&meta_table, path)?.snapshot;
            let newer_exists = current
                .as_ref()
                .is_some_and(|(m, _)| m.last_log_id > meta.last_log_id);
            if newer_exists {
                None
            } else {
                let record = codec::encode_snapshot_record(&meta, &name)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                meta_table
                    .insert(KEY_SNAPSHOT, record.as_slice())
                    .map_err(|e| db_err("cannot write", path, e))?;
                Some(current.map(|(_, old)| old))
            }
        };
        tx.commit().map_err(|e| db_err("cannot commit to", path, e))?;
        if let Some(Some(old)) = &replaced
            && *old != name
        {
            snapshot::remove_quietly(&self.snapshots.join(old));
        }
        Ok((meta, file, replaced.is_some()))
    }

    /// Makes the snapshot file at `source` this state machine's contents and current snapshot.
    fn install(&self, meta: &KvSnapshotMeta, source: &Path) -> io::Result<()> {
        let path = &self.path;
        let current = {
            let tx = self.db.begin_read().map_err(|e| db_err("cannot read", path, e))?;
            let meta_table = tx.open_table(META).map_err(|e| db_err("cannot read", path, e))?;
            read_applied(&meta_table, path)?.snapshot.map(|(_, name)| name)
        };
        let is_current = current
            .as_ref()
            .is_some_and(|name| self.snapshots.join(name) == source);
        // The file to keep: the current one as is (openraft restoring it at start-up), a file
        // of ours (a received or built one) renamed, anything else copied in.
        let (name, created) = if let Some(name) = current.filter(|_| is_current) {
            (name, None)
        } else if source.parent() == Some(self.snapshots.as_path()) {
            let name = snapshot::finish_partial(source, &self.snapshots)?;
            let file = self.snapshots.join(&name);
            (name, Some(file))
        } else {
            let (mut file, partial) = snapshot::create_partial(&self.snapshots)?;
            let copied = fs::File::open(source)
                .and_then(|mut src| io::copy(&mut src, &mut file))
                .and_then(|_| snapshot::finish_partial(&partial, &self.snapshots));
            match copied {
                Ok(name) => {
                    let file = self.snapshots.join(&name);
                    (name, Some(file))
                }
                Err(e) => {
                    snapshot::remove_quietly(&partial);
                    return Err(e);
                }
            }
        };
        let file = self.snapshots.join(&name);
        match self.load(meta, &file, &name) {
            Ok(replaced) => {
                {
                    let mut v = lock(&self.view);
                    v.applied = meta.last_log_id;
                    v.membership = meta.last_membership.clone();
                    // Empty already (the caller synced, and openraft applies nothing while it
                    // installs); whatever it held, the snapshot replaced.
                    v.unwritten.clear();
                    v.unwritten_bytes = 0;
                }
                if let Some(old) = replaced.filter(|old| *old != name) {
                    snapshot::remove_quietly(&self.snapshots.join(old));
                }
                Ok(())
            }
            Err(e) => {
                if let Some(created) = created {
                    snapshot::remove_quietly(&created);
                }
                Err(e)
            }
        }
    }

    /// Replaces the key-value pairs with the file's, and records the applied state and the
    /// snapshot, in one durable transaction: committed only if the whole file verified.
    /// Returns the file name of the snapshot it replaced.
    fn load(&self, meta: &KvSnapshotMeta, file: &Path, name: &str) -> io::Result<Option<String>> {
        let path = &self.path;
        let input = BufReader::with_capacity(1 << 20, fs::File::open(file)?);
        let mut reader = SnapshotReader::new(input, file)?;
        let tx = self
            .db
            .begin_write()
            .map_err(|e| db_err("cannot write", path, e))?;
        tx.delete_table(KV).map_err(|e| db_err("cannot write", path, e))?;
        let replaced = {
            let mut kv = tx.open_table(KV).map_err(|e| db_err("cannot write", path, e))?;
            while let Some((key, value)) = reader.pair()? {
                kv.insert(key.as_str(), value.as_slice())
                    .map_err(|e| db_err("cannot install a snapshot to", path, e))?;
            }
            let mut meta_table = tx.open_table(META).map_err(|e| db_err("cannot write", path, e))?;
            let replaced = read_applied(&meta_table, path)?.snapshot.map(|(_, old)| old);
            let put = |t: &mut redb::Table<&str, &[u8]>, key: &str, v: &[u8]| {
                t.insert(key, v)
                    .map(|_| ())
                    .map_err(|e| db_err("cannot install a snapshot to", path, e))
            };
            let invalid = |e| io::Error::new(io::ErrorKind::InvalidInput, e);
            put(
                &mut meta_table,
                KEY_APPLIED,
                &codec::encode_opt_log_id(meta.last_log_id.as_ref()),
            )?;
            put(
                &mut meta_table,
                KEY_MEMBERSHIP,
                &codec::encode_stored_membership(&meta.last_membership).map_err(invalid)?,
            )?;
            put(
                &mut meta_table,
                KEY_SNAPSHOT,
                &codec::encode_snapshot_record(meta, name).map_err(invalid)?,
            )?;
            replaced
        };
        tx.commit().map_err(|e| db_err("cannot commit to", path, e))?;
        Ok(replaced)
    }

    fn current_snapshot(&self) -> io::Result<Option<(KvSnapshotMeta, PathBuf)>> {
        let tx = self
            .db
            .begin_read()
            .map_err(|e| db_err("cannot read", &self.path, e))?;
        let meta = tx
            .open_table(META)
            .map_err(|e| db_err("cannot read", &self.path, e))?;
        Ok(read_applied(&meta, &self.path)?
            .snapshot
            .map(|(meta, name)| (meta, self.snapshots.join(name))))
    }
}

impl RaftSnapshotBuilder<KvConfig> for DurableStateMachine {
    type SnapshotData = DurableSnapshotFile;

    async fn build_snapshot(
        &mut self,
    ) -> Result<Snapshot<WireLeaderId, u64, BasicNode, DurableSnapshotFile>, io::Error> {
        // The snapshot is read from the database: everything applied before goes in first.
        self.sync().await?;
        let shared = self.shared.clone();
        let (meta, file, current) = blocking(move || shared.build()).await?;
        let snapshot = DurableSnapshotFile::open(file).await?;
        if !current {
            // A newer snapshot was installed meanwhile: hand this one out through the open
            // handle, keep no file of it.
            snapshot::remove_quietly(snapshot.path());
        }
        Ok(Snapshot { meta, snapshot })
    }
}

impl RaftStateMachine<KvConfig> for DurableStateMachine {
    type SnapshotData = DurableSnapshotFile;
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<KvLogId>, KvMembership), io::Error> {
        let v = lock(&self.shared.view);
        Ok((v.applied, v.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<KvConfig>, io::Error>> + Unpin + OptionalSend,
    {
        let mut batch = Vec::new();
        let mut responders = Vec::new();
        while let Some((entry, responder)) = entries.try_next().await? {
            batch.push(entry);
            responders.push(responder);
        }
        self.wait_for_room().await;
        // The answers go out once the writer has the changes on disk.
        self.shared.stage(batch, responders)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &KvSnapshotMeta,
        snapshot: DurableSnapshotFile,
    ) -> Result<(), io::Error> {
        let source = snapshot.close().await?;
        // What was applied before is written first: the snapshot replaces it whole.
        self.sync().await?;
        let (shared, meta) = (self.shared.clone(), meta.clone());
        blocking(move || shared.install(&meta, &source)).await?;
        self.shared.installed.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<WireLeaderId, u64, BasicNode, DurableSnapshotFile>>, io::Error> {
        // A snapshot installed between reading the record and opening its file replaces
        // (deletes) that file: read the record again then.
        let mut tries = 0;
        loop {
            let Some((meta, file)) = self.shared.current_snapshot()? else {
                return Ok(None);
            };
            match DurableSnapshotFile::open(file).await {
                Ok(snapshot) => return Ok(Some(Snapshot { meta, snapshot })),
                Err(e) if e.kind() == io::ErrorKind::NotFound && tries < 3 => tries += 1,
                Err(e) => return Err(e),
            }
        }
    }
}
