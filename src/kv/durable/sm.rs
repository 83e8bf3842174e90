//! The durable state machine: key-value pairs, the applied log id and membership, and the
//! record of the current snapshot in `sm.redb`; snapshot files in the snapshot directory.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io;
use std::io::BufReader;
use std::io::BufWriter;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use futures::Stream;
use futures::TryStreamExt;
use openraft::EntryPayload;
use openraft::OptionalSend;
use openraft::RaftSnapshotBuilder;
use openraft::Snapshot;
use openraft::StoredMembership;
use openraft::impls::BasicNode;
use openraft::storage::EntryResponder;
use openraft::storage::RaftStateMachine;
use redb::Database;
use redb::ReadableDatabase;
use redb::ReadableTable;
use redb::TableDefinition;

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

/// The state machine of [`DurableStore`](super::DurableStore). Clones share it.
#[derive(Clone)]
pub struct DurableStateMachine {
    shared: Arc<Shared>,
}

struct Shared {
    path: PathBuf,
    snapshots: PathBuf,
    db: Database,
    installed: AtomicU64,
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
        let current = {
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
            let record = meta
                .get(KEY_SNAPSHOT)
                .map(|v| v.map(|v| v.value().to_vec()))
                .map_err(|e| DurableError::db("cannot read", path, e))?;
            match record {
                Some(v) => Some(
                    codec::decode(&v, "snapshot", |r| r.snapshot_record())
                        .map_err(|source| DurableError::Corrupt {
                            what: "snapshot record",
                            path: path.to_path_buf(),
                            source,
                        })?
                        .1,
                ),
                None => None,
            }
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

        Ok(DurableStateMachine {
            shared: Arc::new(Shared {
                path: path.to_path_buf(),
                snapshots: snapshots.to_path_buf(),
                db,
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
        let tx = self.read_tx()?;
        let table = tx.open_table(KV).map_err(|e| db_err("cannot read", path, e))?;
        let value = table.get(key).map_err(|e| db_err("cannot read", path, e))?;
        Ok(value.map(|v| Bytes::copy_from_slice(v.value())))
    }

    /// A copy of every key and value applied on this node (for tests and small stores: it is
    /// read into memory).
    pub fn dump(&self) -> io::Result<BTreeMap<String, Bytes>> {
        let path = &self.shared.path;
        let tx = self.read_tx()?;
        let table = tx.open_table(KV).map_err(|e| db_err("cannot read", path, e))?;
        let mut out = BTreeMap::new();
        for pair in table.iter().map_err(|e| db_err("cannot read", path, e))? {
            let (k, v) = pair.map_err(|e| db_err("cannot read", path, e))?;
            out.insert(k.value().to_string(), Bytes::copy_from_slice(v.value()));
        }
        Ok(out)
    }

    /// The log id of the last applied entry.
    pub fn last_applied(&self) -> io::Result<Option<KvLogId>> {
        let tx = self.read_tx()?;
        let meta = tx
            .open_table(META)
            .map_err(|e| db_err("cannot read", &self.shared.path, e))?;
        Ok(read_applied(&meta, &self.shared.path)?.last_applied)
    }

    /// How many snapshots this state machine installed since it was opened (from a leader,
    /// or its own when openraft restores it at start-up).
    pub fn snapshots_installed(&self) -> u64 {
        self.shared.installed.load(Ordering::Relaxed)
    }
}

impl Shared {
    /// Applies `entries` in one durable transaction; the answers, in order.
    fn apply(&self, entries: Vec<KvEntry>) -> io::Result<Vec<KvResponse>> {
        let path = &self.path;
        let Some(last) = entries.last().map(|e| e.log_id) else {
            return Ok(Vec::new());
        };
        let tx = self
            .db
            .begin_write()
            .map_err(|e| db_err("cannot write", path, e))?;
        let mut responses = Vec::with_capacity(entries.len());
        {
            let mut kv = tx.open_table(KV).map_err(|e| db_err("cannot write", path, e))?;
            let mut meta = tx.open_table(META).map_err(|e| db_err("cannot write", path, e))?;
            let mut membership = None;
            for entry in entries {
                let previous = match entry.payload {
                    EntryPayload::Blank => None,
                    EntryPayload::Normal(KvRequest::Set { key, value }) => kv
                        .insert(key.as_str(), value.as_ref())
                        .map_err(|e| db_err("cannot apply to", path, e))?
                        .map(|old| Bytes::copy_from_slice(old.value())),
                    EntryPayload::Normal(KvRequest::Delete { key }) => kv
                        .remove(key.as_str())
                        .map_err(|e| db_err("cannot apply to", path, e))?
                        .map(|old| Bytes::copy_from_slice(old.value())),
                    EntryPayload::Membership(m) => {
                        membership = Some(StoredMembership::new(Some(entry.log_id), m));
                        None
                    }
                };
                responses.push(KvResponse { previous });
            }
            meta.insert(KEY_APPLIED, codec::encode_opt_log_id(Some(&last)).as_slice())
                .map_err(|e| db_err("cannot apply to", path, e))?;
            if let Some(m) = membership {
                let bytes = codec::encode_stored_membership(&m)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                meta.insert(KEY_MEMBERSHIP, bytes.as_slice())
                    .map_err(|e| db_err("cannot apply to", path, e))?;
            }
        }
        tx.commit().map_err(|e| db_err("cannot commit to", path, e))?;
        Ok(responses)
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
        let tx = self.read_tx()?;
        let meta = tx
            .open_table(META)
            .map_err(|e| db_err("cannot read", &self.shared.path, e))?;
        let applied = read_applied(&meta, &self.shared.path)?;
        Ok((applied.last_applied, applied.membership))
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
        let shared = self.shared.clone();
        let responses = blocking(move || shared.apply(batch)).await?;
        // Answers go out once the batch is on disk.
        for (responder, response) in responders.into_iter().zip(responses) {
            if let Some(responder) = responder {
                responder.send(response);
            }
        }
        Ok(())
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
