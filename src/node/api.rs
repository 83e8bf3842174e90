//! The client API of a node (`proto/client.proto`): status, key-value reads and writes, and
//! membership operations, served over gRPC.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use openraft::ServerState;
use openraft::async_runtime::watch::WatchReceiver;
use openraft::impls::BasicNode;
use openraft::storage::RaftStateMachine;
use tonic::Request;
use tonic::Response;
use tonic::Status;

use super::pb;
use crate::kv::KvConfig;
use crate::kv::KvRequest;

/// Metadata key naming the leader's node id on a "not the leader" refusal.
pub const LEADER_KEY: &str = "raftwire-leader";

/// How long a membership operation or a catching-up learner may take.
const MEMBERSHIP_TIMEOUT: Duration = Duration::from_secs(30);

/// What the client API reads from a node's state machine, besides openraft's traits.
pub trait KvState: Send + Sync + 'static {
    /// The value of `key`, as applied so far.
    fn get(&self, key: &str) -> Result<Option<Bytes>, String>;

    /// Every key and value, in key order (for the digest).
    fn for_each(&self, f: &mut dyn FnMut(&str, &[u8])) -> Result<(), String>;
}

impl KvState for crate::kv::StateMachine {
    fn get(&self, key: &str) -> Result<Option<Bytes>, String> {
        Ok(crate::kv::StateMachine::get(self, key))
    }

    fn for_each(&self, f: &mut dyn FnMut(&str, &[u8])) -> Result<(), String> {
        for (k, v) in self.dump() {
            f(&k, &v);
        }
        Ok(())
    }
}

impl KvState for crate::kv::durable::DurableStateMachine {
    fn get(&self, key: &str) -> Result<Option<Bytes>, String> {
        crate::kv::durable::DurableStateMachine::get(self, key).map_err(|e| e.to_string())
    }

    fn for_each(&self, f: &mut dyn FnMut(&str, &[u8])) -> Result<(), String> {
        for (k, v) in self.dump().map_err(|e| e.to_string())? {
            f(&k, &v);
        }
        Ok(())
    }
}

/// SHA-256 over every key and value in key order (each length-prefixed), as hex, and the
/// number of keys: equal digests mean equal contents.
pub fn digest(state: &dyn KvState) -> Result<(String, u64), String> {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let mut keys = 0u64;
    state.for_each(&mut |k, v| {
        ctx.update(&(k.len() as u64).to_be_bytes());
        ctx.update(k.as_bytes());
        ctx.update(&(v.len() as u64).to_be_bytes());
        ctx.update(v);
        keys += 1;
    })?;
    let hex: String = ctx.finish().as_ref().iter().map(|b| format!("{b:02x}")).collect();
    Ok((hex, keys))
}

/// The client API over one node's `Raft`.
pub struct Api<SM: RaftStateMachine<KvConfig>, S: KvState> {
    raft: openraft::Raft<KvConfig, SM>,
    state: S,
    /// This node's Raft address as its peers reach it (`--advertise`).
    advertise: String,
    /// The node's transport preference, for `status`.
    transports: String,
}

impl<SM: RaftStateMachine<KvConfig>, S: KvState> Api<SM, S> {
    /// An API for `raft`, whose applied data `state` reads.
    pub fn new(raft: openraft::Raft<KvConfig, SM>, state: S, advertise: String, transports: String) -> Self {
        Api {
            raft,
            state,
            advertise,
            transports,
        }
    }

    /// The tonic service, ready for a router.
    pub fn into_service(self) -> pb::client_server::ClientServer<Self> {
        pb::client_server::ClientServer::new(self)
    }

    fn metrics(&self) -> openraft::RaftMetrics<KvConfig> {
        self.raft.metrics().borrow_watched().clone()
    }

    fn members(&self) -> Vec<pb::Member> {
        members(&self.metrics())
    }

    /// A refusal for a request only the leader serves, naming the leader when known.
    fn not_leader(&self, leader: Option<u64>) -> Status {
        let mut status = Status::failed_precondition(match leader {
            Some(l) => format!("not the leader; node {l} is"),
            None => "not the leader, and no leader is known".to_string(),
        });
        if let Some(l) = leader
            && let Ok(v) = l.to_string().parse()
        {
            status.metadata_mut().insert(LEADER_KEY, v);
        }
        status
    }

    /// Maps an openraft error: a forward-to-leader becomes the redirect refusal.
    fn raft_error<E>(&self, e: openraft::errors::RaftError<KvConfig, E>) -> Status
    where
        E: std::error::Error + openraft::TryAsRef<openraft::errors::ForwardToLeader<KvConfig>>,
    {
        if let Some(f) = e.forward_to_leader() {
            return self.not_leader(f.leader_id);
        }
        Status::unavailable(e.to_string())
    }

    fn require_leader(&self) -> Result<(), Status> {
        let m = self.metrics();
        if m.current_leader == Some(m.id) && m.state == ServerState::Leader {
            Ok(())
        } else {
            Err(self.not_leader(m.current_leader))
        }
    }

    async fn membership_reply(&self, index: Option<u64>) -> pb::MembershipReply {
        pb::MembershipReply {
            members: self.members(),
            index,
        }
    }
}

fn members(m: &openraft::RaftMetrics<KvConfig>) -> Vec<pb::Member> {
    let membership = m.membership_config.membership();
    let voters: BTreeSet<u64> = membership.voter_ids().collect();
    membership
        .nodes()
        .map(|(id, node)| pb::Member {
            id: *id,
            addr: node.addr.clone(),
            voter: voters.contains(id),
        })
        .collect()
}

fn role(state: ServerState) -> &'static str {
    match state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

#[tonic::async_trait]
impl<SM: RaftStateMachine<KvConfig>, S: KvState> pb::client_server::Client for Api<SM, S> {
    async fn status(&self, _: Request<pb::StatusRequest>) -> Result<Response<pb::StatusReply>, Status> {
        let m = self.metrics();
        let (digest, keys) = digest(&self.state).map_err(Status::internal)?;
        let followers = m
            .replication
            .as_ref()
            .map(|r| {
                r.iter()
                    .filter(|(id, _)| **id != m.id)
                    .map(|(id, matched)| pb::FollowerProgress {
                        id: *id,
                        matched: matched.map(|l| l.index),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(Response::new(pb::StatusReply {
            id: m.id,
            role: role(m.state).to_string(),
            term: m.current_term,
            leader: m.current_leader,
            last_log_index: m.last_log_index,
            applied: m.last_applied.map(|l| l.index),
            members: members(&m),
            followers,
            digest,
            keys,
            transports: self.transports.clone(),
        }))
    }

    async fn put(&self, req: Request<pb::PutRequest>) -> Result<Response<pb::PutReply>, Status> {
        let req = req.into_inner();
        if req.key.is_empty() {
            return Err(Status::invalid_argument("the key is empty"));
        }
        let resp = self
            .raft
            .client_write(KvRequest::Set {
                key: req.key,
                value: req.value,
            })
            .await
            .map_err(|e| self.raft_error(e))?;
        Ok(Response::new(pb::PutReply {
            index: resp.log_id.index,
        }))
    }

    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::GetReply>, Status> {
        let req = req.into_inner();
        self.raft
            .ensure_linearizable(openraft::ReadPolicy::ReadIndex)
            .await
            .map_err(|e| self.raft_error(e))?;
        let value = self.state.get(&req.key).map_err(Status::internal)?;
        Ok(Response::new(pb::GetReply { value }))
    }

    async fn init(&self, _: Request<pb::InitRequest>) -> Result<Response<pb::MembershipReply>, Status> {
        let id = self.metrics().id;
        let alone = BTreeMap::from([(id, BasicNode::new(self.advertise.clone()))]);
        self.raft.initialize(alone).await.map_err(|e| match e {
            openraft::errors::RaftError::APIError(e) => Status::failed_precondition(e.to_string()),
            e => Status::unavailable(e.to_string()),
        })?;
        let m = self
            .raft
            .wait(Some(Duration::from_secs(10)))
            .metrics(
                |m| m.current_leader == Some(id) && m.last_applied.is_some_and(|l| l.leader_id.term > 0),
                "leading",
            )
            .await
            .map_err(|e| Status::deadline_exceeded(e.to_string()))?;
        Ok(Response::new(pb::MembershipReply {
            members: members(&m),
            index: m.last_applied.map(|l| l.index),
        }))
    }

    async fn add_learner(
        &self,
        req: Request<pb::AddLearnerRequest>,
    ) -> Result<Response<pb::MembershipReply>, Status> {
        let req = req.into_inner();
        if req.addr.is_empty() {
            return Err(Status::invalid_argument("the learner's address is empty"));
        }
        self.require_leader()?;
        let add = self.raft.add_learner(req.id, BasicNode::new(req.addr), true);
        let resp = tokio::time::timeout(MEMBERSHIP_TIMEOUT, add)
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!(
                    "the learner did not catch up within {MEMBERSHIP_TIMEOUT:?}"
                ))
            })?
            .map_err(|e| self.raft_error(e))?;
        Ok(Response::new(
            self.membership_reply(Some(resp.log_id.index)).await,
        ))
    }

    async fn promote(
        &self,
        req: Request<pb::PromoteRequest>,
    ) -> Result<Response<pb::MembershipReply>, Status> {
        let ids: BTreeSet<u64> = req.into_inner().ids.into_iter().collect();
        if ids.is_empty() {
            return Err(Status::invalid_argument("no node ids to promote"));
        }
        self.require_leader()?;
        let m = self.metrics();
        let membership = m.membership_config.membership();
        let known: BTreeSet<u64> = membership.nodes().map(|(id, _)| *id).collect();
        if let Some(unknown) = ids.iter().find(|id| !known.contains(id)) {
            return Err(Status::invalid_argument(format!(
                "node {unknown} is not a member; add it as a learner first"
            )));
        }
        let change = openraft::ChangeMembers::AddVoterIds(ids);
        let resp = self
            .raft
            .change_membership(change, false)
            .await
            .map_err(|e| self.raft_error(e))?;
        Ok(Response::new(
            self.membership_reply(Some(resp.log_id.index)).await,
        ))
    }

    async fn remove(&self, req: Request<pb::RemoveRequest>) -> Result<Response<pb::MembershipReply>, Status> {
        let id = req.into_inner().id;
        self.require_leader()?;
        let m = self.metrics();
        let membership = m.membership_config.membership();
        let voter = membership.voter_ids().any(|v| v == id);
        if membership.get_node(&id).is_none() {
            return Err(Status::invalid_argument(format!("node {id} is not a member")));
        }
        let change = if voter {
            openraft::ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else {
            openraft::ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        };
        let resp = self
            .raft
            .change_membership(change, false)
            .await
            .map_err(|e| self.raft_error(e))?;
        if voter {
            // A removed voter stays a learner; remove it as a node too.
            self.raft
                .change_membership(openraft::ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
                .await
                .map_err(|e| self.raft_error(e))?;
        }
        Ok(Response::new(
            self.membership_reply(Some(resp.log_id.index)).await,
        ))
    }

    async fn transfer_leader(
        &self,
        req: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::TransferLeaderReply>, Status> {
        let to = req.into_inner().to;
        self.require_leader()?;
        let m = self.metrics();
        if !m.membership_config.membership().voter_ids().any(|v| v == to) {
            return Err(Status::invalid_argument(format!("node {to} is not a voter")));
        }
        self.raft
            .trigger()
            .transfer_leader(to)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        self.raft
            .wait(Some(Duration::from_secs(10)))
            .metrics(|m| m.current_leader == Some(to), "leadership transferred")
            .await
            .map_err(|e| Status::deadline_exceeded(e.to_string()))?;
        Ok(Response::new(pb::TransferLeaderReply {}))
    }

    async fn snapshot(&self, _: Request<pb::SnapshotRequest>) -> Result<Response<pb::SnapshotReply>, Status> {
        let applied = self.metrics().last_applied.map(|l| l.index);
        let Some(applied) = applied else {
            return Ok(Response::new(pb::SnapshotReply { index: None }));
        };
        let unavailable = |e: openraft::errors::Fatal<KvConfig>| Status::unavailable(e.to_string());
        self.raft.trigger().snapshot().await.map_err(unavailable)?;
        self.raft
            .wait(Some(Duration::from_secs(30)))
            .metrics(
                |m| m.snapshot.is_some_and(|s| s.index >= applied),
                "snapshot built",
            )
            .await
            .map_err(|e| Status::deadline_exceeded(e.to_string()))?;
        self.raft
            .trigger()
            .purge_log(applied)
            .await
            .map_err(unavailable)?;
        self.raft
            .wait(Some(Duration::from_secs(30)))
            .metrics(|m| m.purged.is_some_and(|p| p.index >= applied), "log purged")
            .await
            .map_err(|e| Status::deadline_exceeded(e.to_string()))?;
        Ok(Response::new(pb::SnapshotReply { index: Some(applied) }))
    }
}
