//! # raftwire
//!
//! A production network layer for [openraft](https://docs.rs/openraft) clusters: one
//! [`RaftNetworkFactory`](openraft::RaftNetworkFactory) ([`NetworkFactory`]) and one
//! [`Server`] with the transport chosen in [`Config`].
//!
//! - **gRPC** (tonic + prost over HTTP/2), the default.
//! - Natively **pipelined replication**: openraft's `stream_append` runs over one
//!   bidirectional stream per replication session, reading ahead up to a window of requests
//!   and bytes, with replies in order.
//! - **Streamed snapshots** in chunks with bounded memory on both sides, cancellable.
//! - Heartbeats, snapshots and bulk replication on **separate connections** per peer.
//!
//! ## Feature flags
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `grpc` | yes | the gRPC transport ([`Transport::Grpc`]) and the protobuf types in [`pb`] |
//! | `quic` | yes | reserved for the QUIC transport; it adds nothing yet |
//!
//! ## Wiring it into an openraft application
//!
//! Your type config must meet [`RaftWireConfig`] (the defaults of
//! `openraft::declare_raft_types!` do, with `D`, `R` and `Node` implementing
//! [`WireMessage`]). Then:
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use raftwire::kv::{KvConfig, LogStore, StateMachine};
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = raftwire::Config::builder().build()?;
//! let sm = StateMachine::default();
//! let network = raftwire::NetworkFactory::<KvConfig, _>::new(1, config.clone());
//! let raft = openraft::Raft::new(1, Arc::new(openraft::Config::default().validate()?), network,
//!                                LogStore::default(), sm).await?;
//! let server = raftwire::Server::builder(raft.clone())
//!     .config(config)
//!     .bind("127.0.0.1:5001".parse()?)
//!     .await?;
//! # server.shutdown().await?;
//! # Ok(()) }
//! ```
//!
//! ## Layout
//!
//! `config` (settings), `error` (error enums; the one place transport failures become
//! openraft's `RPCError`), `factory` (the factory and its connection cache), `pipeline`
//! (transport-independent pipelining of `stream_append`), `grpc/` (client, server and proto
//! conversions), `server` (serves a `Raft`), `kv` (the demo key-value application, also used
//! by the tests), `demo` (the `raftwire demo` run).
#![warn(missing_docs)]

mod certs;
mod config;
mod error;
mod factory;
mod pipeline;
mod server;
mod snapshot;
mod stats;
mod tls;
mod types;
mod wire;

#[cfg(feature = "quic")]
mod codec;
#[cfg(feature = "grpc")]
mod grpc;

pub mod demo;
pub mod kv;

pub use certs::CertError;
pub use certs::CertificateAuthority;
pub use certs::CertificateInfo;
pub use certs::NodeCertificate;
pub use certs::Validity;
pub use certs::inspect as inspect_certificate;
pub use config::Config;
pub use config::ConfigBuilder;
pub use config::Transport;
pub use error::ConfigError;
pub use error::DecodeError;
pub use error::EncodeError;
pub use error::ServerError;
pub use error::TransportError;
pub use factory::Network;
pub use factory::NetworkFactory;
#[cfg(feature = "grpc")]
pub use grpc::pb;
pub use server::Server;
pub use server::ServerBuilder;
pub use snapshot::SinkFuture;
pub use snapshot::SnapshotData;
pub use snapshot::SnapshotSink;
pub use stats::NetworkStats;
pub use tls::TlsConfig;
pub use tls::TlsError;
pub use tls::node_dns_name;
pub use types::PeerAddr;
pub use types::RaftWireConfig;
pub use types::WireLeaderId;
pub use wire::Json;
pub use wire::WireMessage;
