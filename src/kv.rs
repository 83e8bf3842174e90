//! The demo application: an in-memory key-value store on openraft, used by `raftwire demo`,
//! the tests and the benches. It passes openraft's storage test suite.
//!
//! [`KvNode`] runs one node: its `Raft`, a raftwire [`Server`] and [`NetworkFactory`].
//! [`durable`] keeps the same store on disk.

pub mod durable;

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::io::Cursor;
use std::net::SocketAddr;
use std::ops::RangeBounds;
use std::sync::Arc;
use std::sync::Mutex;

use bytes::Buf;
use bytes::BufMut;
use bytes::Bytes;
use bytes::BytesMut;
use futures::Stream;
use futures::TryStreamExt;
use openraft::EntryPayload;
use openraft::LogId;
use openraft::LogState;
use openraft::OptionalSend;
use openraft::RaftLogReader;
use openraft::RaftSnapshotBuilder;
use openraft::Snapshot;
use openraft::SnapshotMeta;
use openraft::StoredMembership;
use openraft::impls::BasicNode;
use openraft::storage::EntryResponder;
use openraft::storage::IOFlushed;
use openraft::storage::RaftLogStorage;
use openraft::storage::RaftStateMachine;

use crate::Config;
use crate::DecodeError;
use crate::EncodeError;
use crate::NetworkFactory;
use crate::Server;
use crate::SnapshotSink;
use crate::WireLeaderId;
use crate::WireMessage;

openraft::declare_raft_types!(
    /// Type config of the demo key-value store.
    pub KvConfig:
        D = KvRequest,
        R = KvResponse,
        Node = BasicNode,
);

type KvLogId = LogId<WireLeaderId>;
type KvVote = openraft::impls::Vote<WireLeaderId>;
type KvEntry = openraft::impls::Entry<WireLeaderId, EntryPayload<KvRequest, u64, BasicNode>>;
type KvMembership = StoredMembership<WireLeaderId, u64, BasicNode>;
type KvSnapshotMeta = SnapshotMeta<WireLeaderId, u64, BasicNode>;

/// The demo's snapshot data: an in-memory buffer.
pub type KvSnapshotData = Cursor<Vec<u8>>;

/// A write to the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvRequest {
    /// Sets `key` to `value`.
    Set {
        /// The key.
        key: String,
        /// The value.
        value: Bytes,
    },
    /// Removes `key`.
    Delete {
        /// The key.
        key: String,
    },
}

impl fmt::Display for KvRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KvRequest::Set { key, value } => write!(f, "set {key} ({} bytes)", value.len()),
            KvRequest::Delete { key } => write!(f, "delete {key}"),
        }
    }
}

const TAG_SET: u8 = 1;
const TAG_DELETE: u8 = 2;

/// Wire form: tag (1 = set, 2 = delete), key length (u32, big-endian), key (UTF-8), and for a
/// set the value (the rest). Decoding slices the value out of the buffer without copying.
impl WireMessage for KvRequest {
    fn encode(&self) -> Result<Bytes, EncodeError> {
        let (tag, key, value) = match self {
            KvRequest::Set { key, value } => (TAG_SET, key, Some(value)),
            KvRequest::Delete { key } => (TAG_DELETE, key, None),
        };
        let key_len = u32::try_from(key.len()).map_err(|_| EncodeError("key longer than 4 GiB".into()))?;
        let mut buf = BytesMut::with_capacity(5 + key.len() + value.map_or(0, |v| v.len()));
        buf.put_u8(tag);
        buf.put_u32(key_len);
        buf.put_slice(key.as_bytes());
        if let Some(v) = value {
            buf.put_slice(v);
        }
        Ok(buf.freeze())
    }

    fn decode(mut bytes: Bytes) -> Result<Self, DecodeError> {
        if bytes.len() < 5 {
            return Err(DecodeError::invalid(
                "kv_request",
                format!("{} bytes, need at least 5", bytes.len()),
            ));
        }
        let tag = bytes.get_u8();
        let key_len = bytes.get_u32() as usize;
        if bytes.len() < key_len {
            return Err(DecodeError::invalid(
                "kv_request.key",
                format!("length {key_len} exceeds the {} bytes left", bytes.len()),
            ));
        }
        let key = String::decode(bytes.split_to(key_len)).map_err(|e| e.within("kv_request.key"))?;
        match tag {
            TAG_SET => Ok(KvRequest::Set { key, value: bytes }),
            TAG_DELETE if bytes.is_empty() => Ok(KvRequest::Delete { key }),
            TAG_DELETE => Err(DecodeError::invalid(
                "kv_request",
                "trailing bytes after a delete",
            )),
            other => Err(DecodeError::invalid(
                "kv_request.tag",
                format!("unknown tag {other}"),
            )),
        }
    }
}

/// The answer to a write: the value the key held before.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KvResponse {
    /// The previous value, if the key existed.
    pub previous: Option<Bytes>,
}

/// Wire form: empty for "no previous value", else `1` followed by the value.
impl WireMessage for KvResponse {
    fn encode(&self) -> Result<Bytes, EncodeError> {
        Ok(match &self.previous {
            None => Bytes::new(),
            Some(v) => {
                let mut buf = BytesMut::with_capacity(1 + v.len());
                buf.put_u8(1);
                buf.put_slice(v);
                buf.freeze()
            }
        })
    }

    fn decode(mut bytes: Bytes) -> Result<Self, DecodeError> {
        if bytes.is_empty() {
            return Ok(KvResponse { previous: None });
        }
        match bytes.get_u8() {
            1 => Ok(KvResponse {
                previous: Some(bytes),
            }),
            other => Err(DecodeError::invalid(
                "kv_response.tag",
                format!("unknown tag {other}"),
            )),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Log store

#[derive(Debug, Default)]
struct LogData {
    vote: Option<KvVote>,
    committed: Option<KvLogId>,
    last_purged: Option<KvLogId>,
    log: BTreeMap<u64, KvEntry>,
    /// Benchmarks only: keep at most this many of the newest entries.
    keep: Option<usize>,
}

/// In-memory Raft log. Clones share the same log, so a node can be restarted on it.
#[derive(Debug, Clone, Default)]
pub struct LogStore {
    inner: Arc<Mutex<LogData>>,
}

impl LogStore {
    /// A log that forgets all but the newest `keep` entries: only for benchmarks that stream
    /// entries at a follower that never commits them, so memory stays flat. Not a valid Raft
    /// log for anything else.
    pub fn bounded_for_benchmarks(keep: usize) -> Self {
        let store = LogStore::default();
        store.data().keep = Some(keep);
        store
    }

    fn data(&self) -> std::sync::MutexGuard<'_, LogData> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl RaftLogReader<KvConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + fmt::Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<KvEntry>, io::Error> {
        Ok(self.data().log.range(range).map(|(_, e)| e.clone()).collect())
    }

    async fn read_vote(&mut self) -> Result<Option<KvVote>, io::Error> {
        Ok(self.data().vote)
    }
}

impl RaftLogStorage<KvConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<KvConfig>, io::Error> {
        let d = self.data();
        let last = d.log.last_key_value().map(|(_, e)| e.log_id).or(d.last_purged);
        Ok(LogState {
            last_purged_log_id: d.last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &KvVote) -> Result<(), io::Error> {
        self.data().vote = Some(*vote);
        Ok(())
    }

    async fn save_committed(&mut self, committed: Option<KvLogId>) -> Result<(), io::Error> {
        self.data().committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<KvLogId>, io::Error> {
        Ok(self.data().committed)
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<KvConfig>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = KvEntry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        {
            let mut d = self.data();
            for e in entries {
                d.log.insert(e.log_id.index, e);
            }
            if let Some(keep) = d.keep {
                while d.log.len() > keep {
                    d.log.pop_first();
                }
            }
        }
        // Memory is as durable as this store gets: the write is "flushed" once applied.
        callback.io_completed(Ok(()));
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<KvLogId>) -> Result<(), io::Error> {
        let mut d = self.data();
        let from = last_log_id.map_or(0, |l| l.index + 1);
        d.log.split_off(&from);
        Ok(())
    }

    async fn purge(&mut self, log_id: KvLogId) -> Result<(), io::Error> {
        let mut d = self.data();
        d.last_purged = Some(log_id);
        d.log = d.log.split_off(&(log_id.index + 1));
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// State machine

#[derive(Debug, Default)]
struct SmData {
    kv: BTreeMap<String, Bytes>,
    last_applied: Option<KvLogId>,
    last_membership: KvMembership,
    snapshot: Option<(KvSnapshotMeta, Bytes)>,
    snapshot_seq: u64,
    snapshots_installed: u64,
}

/// In-memory state machine. Clones share the same data, so tests can read what was applied.
#[derive(Debug, Clone, Default)]
pub struct StateMachine {
    inner: Arc<Mutex<SmData>>,
}

impl StateMachine {
    fn data(&self) -> std::sync::MutexGuard<'_, SmData> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The value of `key` as applied on this node (not linearizable by itself).
    pub fn get(&self, key: &str) -> Option<Bytes> {
        self.data().kv.get(key).cloned()
    }

    /// A copy of every key and value applied on this node.
    pub fn dump(&self) -> BTreeMap<String, Bytes> {
        self.data().kv.clone()
    }

    /// How many snapshots from a leader this state machine installed.
    pub fn snapshots_installed(&self) -> u64 {
        self.data().snapshots_installed
    }

    /// The log id of the last applied entry.
    pub fn last_applied(&self) -> Option<KvLogId> {
        self.data().last_applied
    }
}

/// Snapshot format: per pair, key length (u32 BE), key, value length (u32 BE), value.
fn encode_snapshot(kv: &BTreeMap<String, Bytes>) -> Bytes {
    let size = kv.iter().map(|(k, v)| 8 + k.len() + v.len()).sum();
    let mut buf = BytesMut::with_capacity(size);
    for (k, v) in kv {
        buf.put_u32(k.len() as u32);
        buf.put_slice(k.as_bytes());
        buf.put_u32(v.len() as u32);
        buf.put_slice(v);
    }
    buf.freeze()
}

fn decode_snapshot(mut buf: Bytes) -> Result<BTreeMap<String, Bytes>, io::Error> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("snapshot is corrupt: {what}"));
    let mut kv = BTreeMap::new();
    while buf.has_remaining() {
        let take = |buf: &mut Bytes, what: &str| -> Result<Bytes, io::Error> {
            if buf.remaining() < 4 {
                return Err(bad(what));
            }
            let n = buf.get_u32() as usize;
            if buf.remaining() < n {
                return Err(bad(what));
            }
            Ok(buf.split_to(n))
        };
        let key = take(&mut buf, "key")?;
        let key = String::from_utf8(key.to_vec()).map_err(|_| bad("key is not UTF-8"))?;
        let value = take(&mut buf, "value")?;
        kv.insert(key, value);
    }
    Ok(kv)
}

impl RaftSnapshotBuilder<KvConfig> for StateMachine {
    type SnapshotData = KvSnapshotData;

    async fn build_snapshot(
        &mut self,
    ) -> Result<Snapshot<WireLeaderId, u64, BasicNode, KvSnapshotData>, io::Error> {
        let mut d = self.data();
        let bytes = encode_snapshot(&d.kv);
        d.snapshot_seq += 1;
        let meta = KvSnapshotMeta {
            last_log_id: d.last_applied,
            last_membership: d.last_membership.clone(),
        };
        d.snapshot = Some((meta.clone(), bytes.clone()));
        Ok(Snapshot {
            meta,
            snapshot: Cursor::new(bytes.to_vec()),
        })
    }
}

impl RaftStateMachine<KvConfig> for StateMachine {
    type SnapshotData = KvSnapshotData;
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<KvLogId>, KvMembership), io::Error> {
        let d = self.data();
        Ok((d.last_applied, d.last_membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<KvConfig>, io::Error>> + Unpin + OptionalSend,
    {
        while let Some((entry, responder)) = entries.try_next().await? {
            let response = {
                let mut d = self.data();
                d.last_applied = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => KvResponse::default(),
                    EntryPayload::Normal(KvRequest::Set { key, value }) => KvResponse {
                        previous: d.kv.insert(key, value),
                    },
                    EntryPayload::Normal(KvRequest::Delete { key }) => KvResponse {
                        previous: d.kv.remove(&key),
                    },
                    EntryPayload::Membership(m) => {
                        d.last_membership = StoredMembership::new(Some(entry.log_id), m);
                        KvResponse::default()
                    }
                }
            };
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
        snapshot: KvSnapshotData,
    ) -> Result<(), io::Error> {
        let bytes = Bytes::from(snapshot.into_inner());
        let kv = decode_snapshot(bytes.clone())?;
        let mut d = self.data();
        d.kv = kv;
        d.last_applied = meta.last_log_id;
        d.last_membership = meta.last_membership.clone();
        d.snapshot = Some((meta.clone(), bytes));
        d.snapshots_installed += 1;
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<WireLeaderId, u64, BasicNode, KvSnapshotData>>, io::Error> {
        Ok(self.data().snapshot.as_ref().map(|(meta, bytes)| Snapshot {
            meta: meta.clone(),
            snapshot: Cursor::new(bytes.to_vec()),
        }))
    }
}

// ---------------------------------------------------------------------------------------------
// A running node

/// The Raft handle of a demo node.
pub type KvRaft = openraft::Raft<KvConfig, StateMachine>;

/// One demo node: its `Raft`, its raftwire server and network factory, and its stores.
pub struct KvNode {
    /// The node id.
    pub id: u64,
    /// The Raft handle.
    pub raft: KvRaft,
    /// The network factory this node replicates through.
    pub network: NetworkFactory<KvConfig, KvSnapshotData>,
    /// The log (shared, survives [`KvNode::restart`]).
    pub log: LogStore,
    /// The state machine (shared, survives [`KvNode::restart`]).
    pub sm: StateMachine,
    server: Option<Server>,
    addr: SocketAddr,
    raft_config: Arc<openraft::Config>,
    net_config: Config,
    sink: Option<Arc<dyn SnapshotSink<KvSnapshotData>>>,
}

/// A step of running a demo node that failed.
#[derive(Debug, thiserror::Error)]
#[error("{step}: {reason}")]
pub struct NodeError {
    /// What was being done.
    pub step: String,
    /// Why it failed.
    pub reason: String,
}

impl NodeError {
    pub(crate) fn new(step: impl Into<String>, reason: impl fmt::Display) -> Self {
        NodeError {
            step: step.into(),
            reason: reason.to_string(),
        }
    }
}

impl KvNode {
    /// Starts node `id` with fresh stores, serving on `addr` (port 0 picks one).
    pub async fn start(
        id: u64,
        raft_config: Arc<openraft::Config>,
        net_config: Config,
        addr: SocketAddr,
    ) -> Result<KvNode, NodeError> {
        Self::start_inner(
            id,
            raft_config,
            net_config,
            addr,
            LogStore::default(),
            StateMachine::default(),
            None,
        )
        .await
    }

    /// Starts node `id` on the given stores (a restarted node's, or a benchmark's).
    pub async fn start_with_stores(
        id: u64,
        raft_config: Arc<openraft::Config>,
        net_config: Config,
        addr: SocketAddr,
        log: LogStore,
        sm: StateMachine,
    ) -> Result<KvNode, NodeError> {
        Self::start_inner(id, raft_config, net_config, addr, log, sm, None).await
    }

    /// Starts node `id` like [`KvNode::start`], receiving snapshots through `sink` (tests use
    /// it to slow a receiver down).
    pub async fn start_with_sink(
        id: u64,
        raft_config: Arc<openraft::Config>,
        net_config: Config,
        addr: SocketAddr,
        sink: impl SnapshotSink<KvSnapshotData>,
    ) -> Result<KvNode, NodeError> {
        let (log, sm) = (LogStore::default(), StateMachine::default());
        Self::start_inner(id, raft_config, net_config, addr, log, sm, Some(Arc::new(sink))).await
    }

    async fn start_inner(
        id: u64,
        raft_config: Arc<openraft::Config>,
        net_config: Config,
        addr: SocketAddr,
        log: LogStore,
        sm: StateMachine,
        sink: Option<Arc<dyn SnapshotSink<KvSnapshotData>>>,
    ) -> Result<KvNode, NodeError> {
        let network = NetworkFactory::new(id, net_config.clone())
            .map_err(|e| NodeError::new(format!("start the network of node {id}"), e))?;
        let raft = openraft::Raft::new(id, raft_config.clone(), network.clone(), log.clone(), sm.clone())
            .await
            .map_err(|e| NodeError::new(format!("start raft on node {id}"), e))?;
        // A restarted node's previous socket may still be draining (QUIC closes gracefully,
        // telling its peers first): retry a port in use for a short while.
        let give_up = std::time::Instant::now() + std::time::Duration::from_secs(3);
        let server = loop {
            let mut builder = Server::builder(raft.clone(), net_config.clone());
            if let Some(sink) = sink.clone() {
                builder = builder.shared_snapshot_sink(sink);
            }
            match builder.bind(addr).await {
                Ok(server) => break server,
                Err(crate::ServerError::Bind { source, .. })
                    if source.kind() == io::ErrorKind::AddrInUse && std::time::Instant::now() < give_up =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                Err(e) => return Err(NodeError::new(format!("start server of node {id}"), e)),
            }
        };
        let addr = server.local_addr();
        Ok(KvNode {
            id,
            raft,
            network,
            log,
            sm,
            server: Some(server),
            addr,
            raft_config,
            net_config,
            sink,
        })
    }

    /// The latest Raft metrics of this node.
    pub fn metrics(&self) -> openraft::RaftMetrics<KvConfig> {
        use openraft::async_runtime::watch::WatchReceiver;
        self.raft.metrics().borrow_watched().clone()
    }

    /// The address this node serves on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// This node as a membership entry.
    pub fn node(&self) -> BasicNode {
        BasicNode {
            addr: self.addr.to_string(),
        }
    }

    /// Stops Raft and the server; the stores are kept for [`KvNode::restart`].
    pub async fn stop(&mut self) -> Result<(), NodeError> {
        // Server first: peers' calls stop reaching a Raft that is going away.
        if let Some(server) = self.server.take() {
            server
                .shutdown()
                .await
                .map_err(|e| NodeError::new(format!("stop server of node {}", self.id), e))?;
        }
        self.raft
            .shutdown()
            .await
            .map_err(|e| NodeError::new(format!("stop raft of node {}", self.id), e))
    }

    /// Starts a stopped node again on the same address, stores and snapshot sink.
    pub async fn restart(self) -> Result<KvNode, NodeError> {
        Self::start_inner(
            self.id,
            self.raft_config,
            self.net_config,
            self.addr,
            self.log,
            self.sm,
            self.sink,
        )
        .await
    }

    /// Starts a stopped node again on the same address and stores with another network
    /// config (a rolling change of transports, say).
    pub async fn restart_with(mut self, net_config: Config) -> Result<KvNode, NodeError> {
        self.net_config = net_config;
        self.restart().await
    }

    /// Writes `key = value` through Raft (this node must be the leader).
    pub async fn write(
        &self,
        key: impl Into<String>,
        value: impl Into<Bytes>,
    ) -> Result<KvResponse, NodeError> {
        let key = key.into();
        let req = KvRequest::Set {
            key: key.clone(),
            value: value.into(),
        };
        let resp = self
            .raft
            .client_write(req)
            .await
            .map_err(|e| NodeError::new(format!("write {key}"), e))?;
        Ok(resp.data)
    }

    /// Reads `key` linearizably: confirms leadership with a quorum (ReadIndex), waits until
    /// that point is applied locally, then reads.
    pub async fn read(&self, key: &str) -> Result<Option<Bytes>, NodeError> {
        self.raft
            .ensure_linearizable(openraft::ReadPolicy::ReadIndex)
            .await
            .map_err(|e| NodeError::new(format!("read {key}"), e))?;
        Ok(self.sm.get(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips_and_slices_the_value() {
        let req = KvRequest::Set {
            key: "k".into(),
            value: Bytes::from(vec![7u8; 1000]),
        };
        let wire = req.encode().unwrap();
        assert_eq!(KvRequest::decode(wire).unwrap(), req);
        let del = KvRequest::Delete { key: "gone".into() };
        assert_eq!(KvRequest::decode(del.encode().unwrap()).unwrap(), del);
    }

    #[test]
    fn truncated_request_names_the_field() {
        let mut wire = BytesMut::new();
        wire.put_u8(TAG_SET);
        wire.put_u32(10);
        wire.put_slice(b"abc");
        let err = KvRequest::decode(wire.freeze()).unwrap_err();
        assert_eq!(err.field(), "kv_request.key");
    }

    #[test]
    fn unknown_tag_is_an_error() {
        let err = KvRequest::decode(Bytes::from_static(&[9, 0, 0, 0, 0])).unwrap_err();
        assert_eq!(err.field(), "kv_request.tag");
    }

    #[test]
    fn snapshot_round_trips_and_rejects_garbage() {
        let mut kv = BTreeMap::new();
        kv.insert("a".to_string(), Bytes::from_static(b"1"));
        kv.insert("b".to_string(), Bytes::from_static(b""));
        assert_eq!(decode_snapshot(encode_snapshot(&kv)).unwrap(), kv);
        assert!(decode_snapshot(Bytes::from_static(&[0, 0, 0, 9, 1])).is_err());
    }
}
