//! The on-disk encoding of what the durable store keeps: log entries, votes, log ids,
//! memberships and snapshot records. Integers are big-endian; a `u32` length precedes every
//! variable-length field. The format has a version number, kept in each database's metadata
//! table and checked when the store is opened.

use std::collections::BTreeMap;
use std::collections::BTreeSet;

use bytes::Bytes;
use openraft::EntryPayload;
use openraft::Membership;
use openraft::StoredMembership;
use openraft::impls::BasicNode;

use super::KvEntry;
use super::KvLogId;
use super::KvMembership;
use super::KvSnapshotMeta;
use super::KvVote;
use crate::DecodeError;
use crate::EncodeError;
use crate::WireLeaderId;
use crate::WireMessage;
use crate::kv::KvRequest;

/// The version of this encoding; a store written with another one is refused.
pub(super) const FORMAT_VERSION: u64 = 1;

const PAYLOAD_BLANK: u8 = 0;
const PAYLOAD_NORMAL: u8 = 1;
const PAYLOAD_MEMBERSHIP: u8 = 2;

/// The largest count a length field may hold: 4 GiB.
fn len_u32(n: usize, what: &str) -> Result<u32, EncodeError> {
    u32::try_from(n).map_err(|_| EncodeError(format!("{what} longer than 4 GiB")))
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_len_prefixed(out: &mut Vec<u8>, bytes: &[u8], what: &str) -> Result<(), EncodeError> {
    out.extend_from_slice(&len_u32(bytes.len(), what)?.to_be_bytes());
    out.extend_from_slice(bytes);
    Ok(())
}

fn put_log_id(out: &mut Vec<u8>, id: &KvLogId) {
    put_u64(out, id.leader_id.term);
    put_u64(out, id.leader_id.node_id);
    put_u64(out, id.index);
}

fn put_opt_log_id(out: &mut Vec<u8>, id: Option<&KvLogId>) {
    match id {
        None => out.push(0),
        Some(id) => {
            out.push(1);
            put_log_id(out, id);
        }
    }
}

fn put_membership(out: &mut Vec<u8>, m: &Membership<u64, BasicNode>) -> Result<(), EncodeError> {
    let configs = m.get_joint_config();
    out.extend_from_slice(&len_u32(configs.len(), "membership configs")?.to_be_bytes());
    for set in configs {
        out.extend_from_slice(&len_u32(set.len(), "voter set")?.to_be_bytes());
        for id in set {
            put_u64(out, *id);
        }
    }
    let nodes: Vec<_> = m.nodes().collect();
    out.extend_from_slice(&len_u32(nodes.len(), "membership nodes")?.to_be_bytes());
    for (id, node) in nodes {
        put_u64(out, *id);
        put_len_prefixed(out, &node.encode()?, "node")?;
    }
    Ok(())
}

/// An entry: its log id, a payload tag, and for a normal entry the request's wire form, for a
/// membership entry the membership.
pub(super) fn encode_entry(entry: &KvEntry) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::with_capacity(32);
    put_log_id(&mut out, &entry.log_id);
    match &entry.payload {
        EntryPayload::Blank => out.push(PAYLOAD_BLANK),
        EntryPayload::Normal(req) => {
            out.push(PAYLOAD_NORMAL);
            out.extend_from_slice(&req.encode()?);
        }
        EntryPayload::Membership(m) => {
            out.push(PAYLOAD_MEMBERSHIP);
            put_membership(&mut out, m)?;
        }
    }
    Ok(out)
}

/// A vote: term, node id, and whether it is committed.
pub(super) fn encode_vote(vote: &KvVote) -> Vec<u8> {
    let mut out = Vec::with_capacity(17);
    put_u64(&mut out, vote.leader_id.term);
    put_u64(&mut out, vote.leader_id.node_id);
    out.push(u8::from(vote.committed));
    out
}

/// An optional log id: a tag byte (0 none, 1 some) and the log id.
pub(super) fn encode_opt_log_id(id: Option<&KvLogId>) -> Vec<u8> {
    let mut out = Vec::with_capacity(25);
    put_opt_log_id(&mut out, id);
    out
}

/// The applied membership: its log id and the membership.
pub(super) fn encode_stored_membership(m: &KvMembership) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::new();
    put_opt_log_id(&mut out, m.log_id().as_ref());
    put_membership(&mut out, m.membership())?;
    Ok(out)
}

/// The record of the current snapshot: its meta and the name of its file.
pub(super) fn encode_snapshot_record(meta: &KvSnapshotMeta, file: &str) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::new();
    put_opt_log_id(&mut out, meta.last_log_id.as_ref());
    put_opt_log_id(&mut out, meta.last_membership.log_id().as_ref());
    put_membership(&mut out, meta.last_membership.membership())?;
    put_len_prefixed(&mut out, file.as_bytes(), "snapshot file name")?;
    Ok(out)
}

/// Reads the fields above back, naming the field that does not decode.
pub(super) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(super) fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::invalid(
                field,
                format!("needs {n} bytes, {} left", self.buf.len()),
            ));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u8(&mut self, field: &str) -> Result<u8, DecodeError> {
        Ok(self.take(1, field)?[0])
    }

    fn u32(&mut self, field: &str) -> Result<u32, DecodeError> {
        let b = self.take(4, field)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, field: &str) -> Result<u64, DecodeError> {
        let mut v = [0u8; 8];
        v.copy_from_slice(self.take(8, field)?);
        Ok(u64::from_be_bytes(v))
    }

    fn len_prefixed(&mut self, field: &str) -> Result<&'a [u8], DecodeError> {
        let n = self.u32(field)? as usize;
        self.take(n, field)
    }

    /// A count of items that take at least `min_item` bytes each, checked against what is left
    /// so that a corrupt count cannot make us reserve memory.
    fn count(&mut self, field: &str, min_item: usize) -> Result<usize, DecodeError> {
        let n = self.u32(field)? as usize;
        if n.saturating_mul(min_item) > self.buf.len() {
            return Err(DecodeError::invalid(
                field,
                format!("{n} items cannot fit in the {} bytes left", self.buf.len()),
            ));
        }
        Ok(n)
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    /// Fails if anything is left: a record is read whole.
    pub(super) fn finish(self, field: &str) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::invalid(
                field,
                format!("{} trailing bytes", self.buf.len()),
            ))
        }
    }

    pub(super) fn log_id(&mut self, field: &str) -> Result<KvLogId, DecodeError> {
        let term = self.u64(field)?;
        let node_id = self.u64(field)?;
        let index = self.u64(field)?;
        Ok(KvLogId {
            leader_id: WireLeaderId { term, node_id },
            index,
        })
    }

    pub(super) fn opt_log_id(&mut self, field: &str) -> Result<Option<KvLogId>, DecodeError> {
        match self.u8(field)? {
            0 => Ok(None),
            1 => Ok(Some(self.log_id(field)?)),
            other => Err(DecodeError::invalid(field, format!("unknown tag {other}"))),
        }
    }

    pub(super) fn vote(&mut self) -> Result<KvVote, DecodeError> {
        let term = self.u64("vote.term")?;
        let node_id = self.u64("vote.node_id")?;
        let committed = match self.u8("vote.committed")? {
            0 => false,
            1 => true,
            other => {
                return Err(DecodeError::invalid(
                    "vote.committed",
                    format!("{other} is not a bool"),
                ));
            }
        };
        Ok(KvVote {
            leader_id: WireLeaderId { term, node_id },
            committed,
        })
    }

    fn membership(&mut self, field: &str) -> Result<Membership<u64, BasicNode>, DecodeError> {
        let n_configs = self.count(field, 4)?;
        let mut configs = Vec::with_capacity(n_configs);
        for _ in 0..n_configs {
            let n_ids = self.count(field, 8)?;
            let mut set = BTreeSet::new();
            for _ in 0..n_ids {
                set.insert(self.u64(field)?);
            }
            configs.push(set);
        }
        let n_nodes = self.count(field, 12)?;
        let mut nodes = BTreeMap::new();
        for _ in 0..n_nodes {
            let id = self.u64(field)?;
            let node = BasicNode::decode(Bytes::copy_from_slice(self.len_prefixed(field)?))
                .map_err(|e| e.within(field))?;
            nodes.insert(id, node);
        }
        Membership::new(configs, nodes).map_err(|e| DecodeError::invalid(field, e))
    }

    pub(super) fn stored_membership(&mut self) -> Result<KvMembership, DecodeError> {
        let log_id = self.opt_log_id("membership.log_id")?;
        let membership = self.membership("membership")?;
        Ok(StoredMembership::new(log_id, membership))
    }

    pub(super) fn entry(&mut self) -> Result<KvEntry, DecodeError> {
        let log_id = self.log_id("entry.log_id")?;
        let payload = match self.u8("entry.payload")? {
            PAYLOAD_BLANK => EntryPayload::Blank,
            PAYLOAD_NORMAL => EntryPayload::Normal(
                KvRequest::decode(Bytes::copy_from_slice(self.rest()))
                    .map_err(|e| e.within("entry.payload"))?,
            ),
            PAYLOAD_MEMBERSHIP => EntryPayload::Membership(self.membership("entry.membership")?),
            other => {
                return Err(DecodeError::invalid(
                    "entry.payload",
                    format!("unknown payload tag {other}"),
                ));
            }
        };
        Ok(KvEntry { log_id, payload })
    }

    /// A snapshot record: the snapshot's meta and the name of its file.
    pub(super) fn snapshot_record(&mut self) -> Result<(KvSnapshotMeta, String), DecodeError> {
        let last_log_id = self.opt_log_id("snapshot.last_log_id")?;
        let membership_log_id = self.opt_log_id("snapshot.membership_log_id")?;
        let membership = self.membership("snapshot.membership")?;
        let file = String::from_utf8(self.len_prefixed("snapshot.file")?.to_vec())
            .map_err(|_| DecodeError::invalid("snapshot.file", "not UTF-8"))?;
        let meta = KvSnapshotMeta {
            last_log_id,
            last_membership: StoredMembership::new(membership_log_id, membership),
        };
        Ok((meta, file))
    }
}

/// Decodes a whole record with `read`, refusing trailing bytes.
pub(super) fn decode<T>(
    buf: &[u8],
    what: &str,
    read: impl FnOnce(&mut Reader<'_>) -> Result<T, DecodeError>,
) -> Result<T, DecodeError> {
    let mut r = Reader::new(buf);
    let v = read(&mut r)?;
    r.finish(what)?;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_id(term: u64, node: u64, index: u64) -> KvLogId {
        KvLogId {
            leader_id: WireLeaderId { term, node_id: node },
            index,
        }
    }

    fn membership() -> Membership<u64, BasicNode> {
        let nodes = [(1, "127.0.0.1:1"), (2, "127.0.0.1:2"), (3, "h:3")]
            .into_iter()
            .map(|(id, addr)| (id, BasicNode { addr: addr.into() }))
            .collect::<BTreeMap<_, _>>();
        Membership::new(vec![BTreeSet::from([1, 2]), BTreeSet::from([1, 2, 3])], nodes).expect("valid")
    }

    #[test]
    fn entries_round_trip() {
        let entries = [
            KvEntry {
                log_id: log_id(1, 2, 3),
                payload: EntryPayload::Blank,
            },
            KvEntry {
                log_id: log_id(4, 5, 6),
                payload: EntryPayload::Normal(KvRequest::Set {
                    key: "k".into(),
                    value: Bytes::from(vec![9u8; 300]),
                }),
            },
            KvEntry {
                log_id: log_id(7, 8, 9),
                payload: EntryPayload::Membership(membership()),
            },
        ];
        for e in entries {
            let bytes = encode_entry(&e).expect("encodes");
            assert_eq!(decode(&bytes, "entry", |r| r.entry()).expect("decodes"), e);
        }
    }

    #[test]
    fn records_round_trip() {
        let vote = KvVote {
            leader_id: WireLeaderId { term: 5, node_id: 2 },
            committed: true,
        };
        assert_eq!(
            decode(&encode_vote(&vote), "vote", |r| r.vote()).expect("vote"),
            vote
        );
        let id = Some(log_id(3, 1, 10));
        assert_eq!(
            decode(&encode_opt_log_id(id.as_ref()), "id", |r| r.opt_log_id("id")).expect("id"),
            id
        );
        let sm = StoredMembership::new(id, membership());
        let bytes = encode_stored_membership(&sm).expect("encodes");
        assert_eq!(
            decode(&bytes, "m", |r| r.stored_membership()).expect("membership"),
            sm
        );
        let meta = KvSnapshotMeta {
            last_log_id: Some(log_id(3, 1, 12)),
            last_membership: sm,
        };
        let bytes = encode_snapshot_record(&meta, "snap-1").expect("encodes");
        assert_eq!(
            decode(&bytes, "snapshot", |r| r.snapshot_record()).expect("record"),
            (meta, "snap-1".to_string())
        );
    }

    #[test]
    fn corrupt_records_name_the_field() {
        let e = KvEntry {
            log_id: log_id(1, 1, 1),
            payload: EntryPayload::Membership(membership()),
        };
        let bytes = encode_entry(&e).expect("encodes");
        let err = decode(&bytes[..bytes.len() - 3], "entry", |r| r.entry()).unwrap_err();
        assert!(err.field().starts_with("entry.membership"), "{err}");
        let err = decode(&[0u8; 5], "entry", |r| r.entry()).unwrap_err();
        assert_eq!(err.field(), "entry.log_id");
        let mut bad_tag = encode_entry(&e).expect("encodes");
        bad_tag[24] = 9;
        assert_eq!(
            decode(&bad_tag, "entry", |r| r.entry()).unwrap_err().field(),
            "entry.payload"
        );
        let mut vote = encode_vote(&KvVote::new(1, 1));
        vote.push(0);
        assert_eq!(decode(&vote, "vote", |r| r.vote()).unwrap_err().field(), "vote");
    }
}
