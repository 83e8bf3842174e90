//! `raftwire node` and `raftwire ctl`: a node of the demo key-value store serving Raft to its
//! peers and a client API to operators, and the client that drives it. The application side
//! (feature `app`), over gRPC for the client API.

mod api;
mod ctl;
mod exporter;
mod run;

pub use api::Api;
pub use api::KvState;
pub use api::LEADER_KEY;
pub use api::digest;
pub use ctl::Ctl;
pub use ctl::CtlError;
pub use ctl::EndpointStatus;
pub use ctl::LoadReport;
pub use ctl::load_value;
pub use ctl::write_keys;
pub use run::NodeOptions;
pub use run::RunError;
pub use run::Serving;
pub use run::run;

/// The protobuf messages and tonic service of `proto/client.proto`.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("raftwire.client.v1");
}
