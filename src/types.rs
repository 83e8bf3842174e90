//! The bounds an application's `RaftTypeConfig` must meet, in one place.

use openraft::RaftTypeConfig;
use openraft::impls::BasicNode;
use openraft::impls::Entry;
use openraft::impls::EntryPayload;
use openraft::impls::Vote;
use openraft::impls::leader_id_adv::LeaderId;

use crate::wire::WireMessage;

/// openraft's "advanced" leader id: a term and a node id, both `u64`.
pub type WireLeaderId = LeaderId<u64, u64>;

/// Every bound raftwire puts on an application's [`RaftTypeConfig`].
///
/// It is implemented automatically for every type config that meets them:
///
/// | associated type | must be |
/// |---|---|
/// | `NodeId`, `Term` | `u64` |
/// | `LeaderId` | `openraft::impls::leader_id_adv::LeaderId<u64, u64>` (the default) |
/// | `Vote` | `openraft::impls::Vote<Self::LeaderId>` (the default) |
/// | `Payload` | `openraft::EntryPayload<Self::D, u64, Self::Node>` (the default) |
/// | `Entry` | `openraft::Entry<Self::LeaderId, Self::Payload>` (the default) |
/// | `D`, `R` | [`WireMessage`] |
/// | `Node` | [`WireMessage`] + [`PeerAddr`] (`BasicNode` is both) |
///
/// A config declared with `openraft::declare_raft_types!` that only sets `D`, `R` and `Node`
/// meets all of them. The async runtime must be tokio: raftwire's transports run on it.
pub trait RaftWireConfig:
    RaftTypeConfig<
        NodeId = u64,
        Term = u64,
        LeaderId = WireLeaderId,
        Vote = Vote<WireLeaderId>,
        Payload = EntryPayload<<Self as RaftTypeConfig>::D, u64, <Self as RaftTypeConfig>::Node>,
        Entry = Entry<
            WireLeaderId,
            EntryPayload<<Self as RaftTypeConfig>::D, u64, <Self as RaftTypeConfig>::Node>,
        >,
        D: WireMessage,
        R: WireMessage,
        Node: WireMessage + PeerAddr,
    >
{
}

impl<C> RaftWireConfig for C where
    C: RaftTypeConfig<
            NodeId = u64,
            Term = u64,
            LeaderId = WireLeaderId,
            Vote = Vote<WireLeaderId>,
            Payload = EntryPayload<<C as RaftTypeConfig>::D, u64, <C as RaftTypeConfig>::Node>,
            Entry = Entry<
                WireLeaderId,
                EntryPayload<<C as RaftTypeConfig>::D, u64, <C as RaftTypeConfig>::Node>,
            >,
            D: WireMessage,
            R: WireMessage,
            Node: WireMessage + PeerAddr,
        >
{
}

/// How the factory finds a peer: the address its server listens on, as `host:port`, and
/// optionally which transports it serves.
///
/// A node type that knows what its node serves (written into the membership when the node
/// joins) implements [`PeerAddr::transports`]: a factory then never tries a transport the
/// peer does not serve. Without it, every transport of the factory's preference list is tried
/// (in the background, at most once per
/// [`fallback_backoff`](crate::ConfigBuilder::fallback_backoff) for one that failed).
pub trait PeerAddr {
    /// The peer's listening address, `host:port`.
    fn peer_addr(&self) -> &str;

    /// The transports the peer serves, if the node value says; `None` (the default): unknown.
    fn transports(&self) -> Option<Vec<crate::Transport>> {
        None
    }

    /// Where the peer serves `transport`. Default: [`PeerAddr::peer_addr`] (a server serves
    /// all its transports on one port number: TCP for gRPC, UDP for QUIC).
    fn transport_addr(&self, transport: crate::Transport) -> &str {
        let _ = transport;
        self.peer_addr()
    }
}

impl PeerAddr for BasicNode {
    fn peer_addr(&self) -> &str {
        &self.addr
    }
}
