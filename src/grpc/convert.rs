//! Conversions between openraft's messages and the protobuf types, in both directions.
//!
//! Encoding never fails except for application values (`WireMessage::encode`). Decoding checks
//! every field openraft requires and names the missing or invalid one.

use std::collections::BTreeMap;
use std::collections::BTreeSet;

use openraft::EntryPayload;
use openraft::LogId;
use openraft::Membership;
use openraft::StoredMembership;
use openraft::alias::SnapshotMetaOf;
use openraft::alias::VoteOf;
use openraft::impls::Entry;
use openraft::impls::Vote;
use openraft::raft::AppendEntriesRequest;
use openraft::raft::AppendEntriesResponse;
use openraft::raft::SnapshotResponse;
use openraft::raft::StreamAppendError;
use openraft::raft::StreamAppendResult;
use openraft::raft::TransferLeaderError;
use openraft::raft::TransferLeaderRequest;
use openraft::raft::TransferLeaderResponse;
use openraft::raft::VoteRequest;
use openraft::raft::VoteResponse;

use super::pb;
use crate::error::DecodeError;
use crate::error::EncodeError;
use crate::types::RaftWireConfig;
use crate::types::WireLeaderId;
use crate::wire::WireMessage;

type WireLogId = LogId<WireLeaderId>;

fn required<T>(v: Option<T>, field: &str) -> Result<T, DecodeError> {
    v.ok_or_else(|| DecodeError::missing(field))
}

// ---- leader id, vote, log id ----

pub(crate) fn leader_id_to_pb(l: &WireLeaderId) -> pb::LeaderId {
    pb::LeaderId {
        term: l.term,
        node_id: l.node_id,
    }
}

fn leader_id_from_pb(l: pb::LeaderId) -> WireLeaderId {
    WireLeaderId {
        term: l.term,
        node_id: l.node_id,
    }
}

pub(crate) fn vote_to_pb(v: &Vote<WireLeaderId>) -> pb::Vote {
    pb::Vote {
        leader_id: Some(leader_id_to_pb(&v.leader_id)),
        committed: v.committed,
    }
}

pub(crate) fn vote_from_pb(v: Option<pb::Vote>, field: &str) -> Result<Vote<WireLeaderId>, DecodeError> {
    let v = required(v, field)?;
    let leader_id = required(v.leader_id, "leader_id").map_err(|e| e.within(field))?;
    Ok(Vote {
        leader_id: leader_id_from_pb(leader_id),
        committed: v.committed,
    })
}

pub(crate) fn log_id_to_pb(l: &WireLogId) -> pb::LogId {
    pb::LogId {
        leader_id: Some(leader_id_to_pb(&l.leader_id)),
        index: l.index,
    }
}

fn opt_log_id_to_pb(l: &Option<WireLogId>) -> Option<pb::LogId> {
    l.as_ref().map(log_id_to_pb)
}

fn log_id_from_pb(l: pb::LogId, field: &str) -> Result<WireLogId, DecodeError> {
    let leader_id = required(l.leader_id, "leader_id").map_err(|e| e.within(field))?;
    Ok(LogId {
        leader_id: leader_id_from_pb(leader_id),
        index: l.index,
    })
}

/// An optional log id: absent means "no log" in openraft, so absence is valid here.
fn opt_log_id_from_pb(l: Option<pb::LogId>, field: &str) -> Result<Option<WireLogId>, DecodeError> {
    l.map(|l| log_id_from_pb(l, field)).transpose()
}

// ---- membership and entries ----

fn membership_to_pb<N: WireMessage + openraft::Node>(
    m: &Membership<u64, N>,
) -> Result<pb::Membership, EncodeError> {
    let configs = m
        .get_joint_config()
        .iter()
        .map(|set| pb::VoterSet {
            ids: set.iter().copied().collect(),
        })
        .collect();
    let nodes = m
        .nodes()
        .map(|(id, node)| {
            Ok(pb::NodeEntry {
                id: *id,
                node: node.encode()?,
            })
        })
        .collect::<Result<_, EncodeError>>()?;
    Ok(pb::Membership { configs, nodes })
}

fn membership_from_pb<N>(m: Option<pb::Membership>, field: &str) -> Result<Membership<u64, N>, DecodeError>
where
    N: WireMessage + openraft::Node,
{
    let m = required(m, field)?;
    let configs: Vec<BTreeSet<u64>> = m
        .configs
        .into_iter()
        .map(|s| s.ids.into_iter().collect())
        .collect();
    let mut nodes = BTreeMap::new();
    for (i, n) in m.nodes.into_iter().enumerate() {
        let node = N::decode(n.node).map_err(|e| e.within(&format!("{field}.nodes[{i}].node")))?;
        if nodes.insert(n.id, node).is_some() {
            return Err(DecodeError::invalid(
                &format!("{field}.nodes[{i}].id"),
                format!("node {} listed twice", n.id),
            ));
        }
    }
    Membership::new(configs, nodes).map_err(|e| DecodeError::invalid(field, e))
}

fn entry_to_pb<C: RaftWireConfig>(e: &C::Entry) -> Result<pb::Entry, EncodeError> {
    let payload = match &e.payload {
        EntryPayload::Blank => pb::entry::Payload::Blank(pb::Blank {}),
        EntryPayload::Normal(d) => pb::entry::Payload::Normal(d.encode()?),
        EntryPayload::Membership(m) => pb::entry::Payload::Membership(membership_to_pb(m)?),
    };
    Ok(pb::Entry {
        log_id: Some(log_id_to_pb(&e.log_id)),
        payload: Some(payload),
    })
}

fn entry_from_pb<C: RaftWireConfig>(e: pb::Entry, field: &str) -> Result<C::Entry, DecodeError> {
    let log_id = log_id_from_pb(
        required(e.log_id, "log_id").map_err(|x| x.within(field))?,
        &format!("{field}.log_id"),
    )?;
    let payload = match required(e.payload, "payload").map_err(|x| x.within(field))? {
        pb::entry::Payload::Blank(_) => EntryPayload::Blank,
        pb::entry::Payload::Normal(b) => {
            EntryPayload::Normal(C::D::decode(b).map_err(|x| x.within(&format!("{field}.normal")))?)
        }
        pb::entry::Payload::Membership(m) => {
            EntryPayload::Membership(membership_from_pb(Some(m), &format!("{field}.membership"))?)
        }
    };
    Ok(Entry { log_id, payload })
}

// ---- vote ----

pub(crate) fn vote_request_to_pb<C: RaftWireConfig>(r: &VoteRequest<C>) -> pb::VoteRequest {
    pb::VoteRequest {
        vote: Some(vote_to_pb(&r.vote)),
        last_log_id: opt_log_id_to_pb(&r.last_log_id),
        leadership_transfer: r.leadership_transfer,
    }
}

pub(crate) fn vote_request_from_pb<C: RaftWireConfig>(
    r: pb::VoteRequest,
) -> Result<VoteRequest<C>, DecodeError> {
    Ok(VoteRequest {
        vote: vote_from_pb(r.vote, "vote")?,
        last_log_id: opt_log_id_from_pb(r.last_log_id, "last_log_id")?,
        leadership_transfer: r.leadership_transfer,
    })
}

pub(crate) fn vote_response_to_pb<C: RaftWireConfig>(r: &VoteResponse<C>) -> pb::VoteResponse {
    pb::VoteResponse {
        vote: Some(vote_to_pb(&r.vote)),
        vote_granted: r.vote_granted,
        last_log_id: opt_log_id_to_pb(&r.last_log_id),
    }
}

pub(crate) fn vote_response_from_pb<C: RaftWireConfig>(
    r: pb::VoteResponse,
) -> Result<VoteResponse<C>, DecodeError> {
    Ok(VoteResponse {
        vote: vote_from_pb(r.vote, "vote")?,
        vote_granted: r.vote_granted,
        last_log_id: opt_log_id_from_pb(r.last_log_id, "last_log_id")?,
    })
}

// ---- append entries ----

pub(crate) fn append_request_to_pb<C: RaftWireConfig>(
    r: &AppendEntriesRequest<C>,
) -> Result<pb::AppendEntriesRequest, EncodeError> {
    Ok(pb::AppendEntriesRequest {
        vote: Some(vote_to_pb(&r.vote)),
        prev_log_id: opt_log_id_to_pb(&r.prev_log_id),
        entries: r.entries.iter().map(entry_to_pb::<C>).collect::<Result<_, _>>()?,
        leader_commit: opt_log_id_to_pb(&r.leader_commit),
    })
}

pub(crate) fn append_request_from_pb<C: RaftWireConfig>(
    r: pb::AppendEntriesRequest,
) -> Result<AppendEntriesRequest<C>, DecodeError> {
    let mut entries = Vec::with_capacity(r.entries.len());
    for (i, e) in r.entries.into_iter().enumerate() {
        entries.push(entry_from_pb::<C>(e, &format!("entries[{i}]"))?);
    }
    Ok(AppendEntriesRequest {
        vote: vote_from_pb(r.vote, "vote")?,
        prev_log_id: opt_log_id_from_pb(r.prev_log_id, "prev_log_id")?,
        entries,
        leader_commit: opt_log_id_from_pb(r.leader_commit, "leader_commit")?,
    })
}

pub(crate) fn append_response_to_pb<C: RaftWireConfig>(
    r: &AppendEntriesResponse<C>,
) -> pb::AppendEntriesResponse {
    use pb::append_entries_response::Result as R;
    let result = match r {
        AppendEntriesResponse::Success => R::Success(pb::Blank {}),
        AppendEntriesResponse::PartialSuccess(m) => R::PartialSuccess(pb::Matched {
            log_id: opt_log_id_to_pb(m),
        }),
        AppendEntriesResponse::Conflict => R::Conflict(pb::Blank {}),
        AppendEntriesResponse::HigherVote(v) => R::HigherVote(vote_to_pb(v)),
    };
    pb::AppendEntriesResponse { result: Some(result) }
}

pub(crate) fn append_response_from_pb<C: RaftWireConfig>(
    r: pb::AppendEntriesResponse,
) -> Result<AppendEntriesResponse<C>, DecodeError> {
    use pb::append_entries_response::Result as R;
    Ok(match required(r.result, "result")? {
        R::Success(_) => AppendEntriesResponse::Success,
        R::PartialSuccess(m) => {
            AppendEntriesResponse::PartialSuccess(opt_log_id_from_pb(m.log_id, "partial_success.log_id")?)
        }
        R::Conflict(_) => AppendEntriesResponse::Conflict,
        R::HigherVote(v) => AppendEntriesResponse::HigherVote(vote_from_pb(Some(v), "higher_vote")?),
    })
}

pub(crate) fn stream_reply_to_pb<C: RaftWireConfig>(r: &StreamAppendResult<C>) -> pb::StreamAppendReply {
    use pb::stream_append_reply::Result as R;
    let result = match r {
        Ok(m) => R::Matched(pb::Matched {
            log_id: opt_log_id_to_pb(m),
        }),
        Err(StreamAppendError::Conflict(l)) => R::Conflict(log_id_to_pb(l)),
        Err(StreamAppendError::HigherVote(v)) => R::HigherVote(vote_to_pb(v)),
    };
    pb::StreamAppendReply { result: Some(result) }
}

pub(crate) fn stream_reply_from_pb<C: RaftWireConfig>(
    r: pb::StreamAppendReply,
) -> Result<StreamAppendResult<C>, DecodeError> {
    use pb::stream_append_reply::Result as R;
    Ok(match required(r.result, "result")? {
        R::Matched(m) => Ok(opt_log_id_from_pb(m.log_id, "matched.log_id")?),
        R::Conflict(l) => Err(StreamAppendError::Conflict(log_id_from_pb(l, "conflict")?)),
        R::HigherVote(v) => Err(StreamAppendError::HigherVote(vote_from_pb(
            Some(v),
            "higher_vote",
        )?)),
    })
}

// ---- snapshot ----

pub(crate) fn snapshot_header_to_pb<C: RaftWireConfig>(
    vote: &VoteOf<C>,
    meta: &SnapshotMetaOf<C>,
) -> Result<pb::SnapshotHeader, EncodeError> {
    Ok(pb::SnapshotHeader {
        vote: Some(vote_to_pb(vote)),
        meta: Some(pb::SnapshotMeta {
            last_log_id: opt_log_id_to_pb(&meta.last_log_id),
            last_membership_log_id: opt_log_id_to_pb(meta.last_membership.log_id()),
            last_membership: Some(membership_to_pb(meta.last_membership.membership())?),
        }),
    })
}

pub(crate) fn snapshot_header_from_pb<C: RaftWireConfig>(
    h: pb::SnapshotHeader,
) -> Result<(VoteOf<C>, SnapshotMetaOf<C>), DecodeError> {
    let vote = vote_from_pb(h.vote, "header.vote")?;
    let meta = required(h.meta, "header.meta")?;
    let membership = membership_from_pb(meta.last_membership, "header.meta.last_membership")?;
    let meta = openraft::SnapshotMeta {
        last_log_id: opt_log_id_from_pb(meta.last_log_id, "header.meta.last_log_id")?,
        last_membership: StoredMembership::new(
            opt_log_id_from_pb(meta.last_membership_log_id, "header.meta.last_membership_log_id")?,
            membership,
        ),
    };
    Ok((vote, meta))
}

pub(crate) fn snapshot_response_to_pb<C: RaftWireConfig>(r: &SnapshotResponse<C>) -> pb::SnapshotResponse {
    pb::SnapshotResponse {
        vote: Some(vote_to_pb(&r.vote)),
    }
}

pub(crate) fn snapshot_response_from_pb<C: RaftWireConfig>(
    r: pb::SnapshotResponse,
) -> Result<SnapshotResponse<C>, DecodeError> {
    Ok(SnapshotResponse {
        vote: vote_from_pb(r.vote, "vote")?,
    })
}

// ---- transfer leader ----

pub(crate) fn transfer_request_to_pb<C: RaftWireConfig>(
    r: &TransferLeaderRequest<C>,
) -> pb::TransferLeaderRequest {
    pb::TransferLeaderRequest {
        from_leader: Some(vote_to_pb(r.from_leader())),
        to_node_id: *r.to_node_id(),
        last_log_id: r.last_log_id().map(log_id_to_pb),
    }
}

pub(crate) fn transfer_request_from_pb<C: RaftWireConfig>(
    r: pb::TransferLeaderRequest,
) -> Result<TransferLeaderRequest<C>, DecodeError> {
    Ok(TransferLeaderRequest::new(
        vote_from_pb(r.from_leader, "from_leader")?,
        r.to_node_id,
        opt_log_id_from_pb(r.last_log_id, "last_log_id")?,
    ))
}

pub(crate) fn transfer_response_to_pb<C: RaftWireConfig>(
    r: &TransferLeaderResponse<C>,
) -> pb::TransferLeaderResponse {
    use pb::transfer_leader_response::Result as R;
    let result = match r {
        Ok(()) => R::Ok(pb::Blank {}),
        Err(TransferLeaderError::VoteChanged { expected, actual }) => R::VoteChanged(pb::VoteChanged {
            expected: Some(vote_to_pb(expected)),
            actual: Some(vote_to_pb(actual)),
        }),
        Err(TransferLeaderError::LogNotFlushed { expected, actual }) => R::LogNotFlushed(pb::LogNotFlushed {
            expected: opt_log_id_to_pb(expected),
            actual: opt_log_id_to_pb(actual),
        }),
    };
    pb::TransferLeaderResponse { result: Some(result) }
}

pub(crate) fn transfer_response_from_pb<C: RaftWireConfig>(
    r: pb::TransferLeaderResponse,
) -> Result<TransferLeaderResponse<C>, DecodeError> {
    use pb::transfer_leader_response::Result as R;
    Ok(match required(r.result, "result")? {
        R::Ok(_) => Ok(()),
        R::VoteChanged(v) => Err(TransferLeaderError::VoteChanged {
            expected: vote_from_pb(v.expected, "vote_changed.expected")?,
            actual: vote_from_pb(v.actual, "vote_changed.actual")?,
        }),
        R::LogNotFlushed(l) => Err(TransferLeaderError::LogNotFlushed {
            expected: opt_log_id_from_pb(l.expected, "log_not_flushed.expected")?,
            actual: opt_log_id_from_pb(l.actual, "log_not_flushed.actual")?,
        }),
    })
}
