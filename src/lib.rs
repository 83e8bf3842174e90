//! # raftwire
//!
//! A production network layer for [openraft](https://docs.rs/openraft) clusters: one
//! [`RaftNetworkFactory`](openraft::RaftNetworkFactory) ([`NetworkFactory`]) and one
//! [`Server`], with the transport chosen at run time in [`Config`].
//!
//! - **gRPC** (tonic + prost over HTTP/2), the default; heartbeats, snapshots and bulk
//!   replication each get their own connection per peer; uncompressed replication and
//!   snapshot bodies carry entry payloads and snapshot chunks uncopied.
//! - **QUIC** (quinn) with raftwire's own zero-copy framing: one connection per peer, a stream
//!   per replication session, heartbeat, vote and snapshot, so nothing waits behind anything.
//! - **TCP**: the same framing over TLS 1.3 on TCP, the bulk-throughput path: separate
//!   connections per peer for replication, heartbeats and votes, and snapshots, each carrying
//!   one exchange at a time; it shares a TCP port with gRPC (told apart by ALPN).
//! - Natively **pipelined replication**: openraft's `stream_append` runs over one
//!   bidirectional stream per replication session, reading ahead up to a window of requests
//!   and bytes, with replies in order.
//! - **Streamed snapshots** in chunks with bounded memory on both sides, cancellable.
//! - **Mutual TLS** with node identity on every transport ([`TlsConfig`]); plaintext gRPC
//!   only as an explicit, logged opt-in. Operator tools hold client identities
//!   ([`ClientTls`]), which the Raft listeners refuse.
//! - Optional **zstd compression** of append batches and snapshot chunks, agreed per cluster
//!   (a peer whose setting differs is refused at connect).
//! - **Metrics** through the [`metrics`](https://docs.rs/metrics) facade, per peer and
//!   transport ([`METRICS`]): RPCs by kind and outcome, round trips, pipeline depth, bytes,
//!   connects, snapshot bytes and durations. Install a recorder before making the factory;
//!   without one, recording costs about 30 ns per pipelined append (a clock read included).
//!
//! ## Feature flags
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `grpc` | yes | the gRPC transport ([`Transport::Grpc`]) and the protobuf types in `pb` |
//! | `quic` | yes | the QUIC transport ([`Transport::Quic`]) and its tuning ([`QuicTuning`]) |
//! | `tcp` | yes | the framed TLS-over-TCP transport (`Transport::Tcp`) |
//! | `compression` | yes | optional zstd compression of large frames, set per cluster (`Compression`, off unless configured) |
//! | `app` | yes | the application side: the `raftwire` binary, the demo store (`kv`, `demo`) and the benchmark harness (`bench`); off for a lean network layer |
//!
//! With gRPC compiled in, [`Transport::default`] is gRPC. A config may list several
//! transports ([`ConfigBuilder::transports`]): the [`Server`] serves all of them and the
//! factory uses, per peer, the most preferred one that connects, falling back as
//! [`FallbackPolicy`] says (README: "Migrating a running cluster").
//!
//! ## Wiring it into an openraft application
//!
//! Your type config must meet [`RaftWireConfig`] (the defaults of
//! `openraft::declare_raft_types!` do, with `D`, `R` and `Node` implementing
//! [`WireMessage`]). Then, on every node:
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use raftwire::kv::{KvConfig, KvSnapshotData, LogStore, StateMachine};
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! // This node's identity (made by `raftwire certs init`) and the cluster CA.
//! let tls = raftwire::TlsConfig::from_pem_files("certs/ca.pem", "certs/node-1.pem", "certs/node-1.key")?;
//! let config = raftwire::Config::builder().transport(raftwire::Transport::default()).tls(tls).build()?;
//! let network = raftwire::NetworkFactory::<KvConfig, KvSnapshotData>::new(1, config.clone())?;
//! let raft = openraft::Raft::new(1, Arc::new(openraft::Config::default().validate()?), network,
//!                                LogStore::default(), StateMachine::default()).await?;
//! let server = raftwire::Server::builder(raft.clone(), config).bind("0.0.0.0:5001".parse()?).await?;
//! # server.shutdown().await?;
//! # Ok(()) }
//! ```
//!
//! ## Layout
//!
//! `config` (settings), `error` (error enums; the one place transport failures become
//! openraft's `RPCError`), `tls` and `certs` (mutual TLS, node identity, rcgen tooling),
//! `factory` (the factory, its per-peer link cache and the `RaftNetworkV2` impl), `link` (the
//! client trait every transport implements, and transport-neutral snapshot sending),
//! `connect` (background dialling with backoff and eviction), `route` (several transports
//! toward one peer: preference, fallback, re-probing), `pipeline` (transport-neutral
//! pipelining of `stream_append`), `stats` (counters and per-peer metric handles), `service` (the server core every transport serves through:
//! identity checks, snapshot receive / verify / install, bridging into `Raft`), `snapshot`,
//! `server`, `accept` (the TLS-over-TCP accept loop gRPC and TCP share, routing by ALPN),
//! `grpc/` (client, server, proto conversions, request bodies written without copies), `codec/` (the frame format of QUIC and TCP,
//! no I/O), `framed/` (exchanges in frames over any byte stream: client calls and server
//! dispatch), `quic/` and `tcp/` (each only connections and streams); behind the `app` feature: `kv` (the demo
//! key-value application, also used by the tests and benches), `node` (`raftwire node` and
//! `ctl`, the client API, the Prometheus endpoint), `demo` (the `raftwire demo` run), `bench` (the benchmark harness). A new transport is
//! one more folder implementing `link::Connector`/`link::Link` and serving through
//! `service::Service`.
#![warn(missing_docs)]

#[cfg(any(feature = "grpc", feature = "tcp"))]
mod accept;
mod certs;
mod config;
mod connect;
mod error;
mod factory;
mod limits;
mod link;
mod pipeline;
mod route;
mod server;
mod service;
mod snapshot;
mod stats;
mod tls;
mod types;
mod wire;

#[cfg(any(feature = "quic", feature = "tcp"))]
mod codec;
#[cfg(any(feature = "quic", feature = "tcp"))]
mod framed;
#[cfg(feature = "grpc")]
mod grpc;
#[cfg(feature = "quic")]
mod quic;
#[cfg(feature = "tcp")]
mod tcp;

/// Entry points for the cargo-fuzz targets in `fuzz/`; not a stable API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;

#[cfg(feature = "app")]
pub mod bench;
#[cfg(feature = "app")]
pub mod demo;
#[cfg(feature = "app")]
pub mod kv;
#[cfg(all(feature = "app", feature = "grpc"))]
pub mod node;

pub use certs::CertError;
pub use certs::CertificateAuthority;
pub use certs::CertificateInfo;
pub use certs::ClientCertificate;
pub use certs::NodeCertificate;
pub use certs::Validity;
pub use certs::inspect as inspect_certificate;
#[cfg(feature = "compression")]
pub use config::Compression;
pub use config::Config;
pub use config::ConfigBuilder;
pub use config::CongestionControl;
pub use config::FallbackPolicy;
pub use config::QuicTuning;
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
pub use snapshot::AbortFuture;
pub use snapshot::SinkFuture;
pub use snapshot::SnapshotData;
pub use snapshot::SnapshotSink;
pub use stats::METRICS;
pub use stats::NetworkStats;
pub use tls::ClientTls;
pub use tls::TlsConfig;
pub use tls::TlsError;
pub use tls::client_dns_name;
pub use tls::node_dns_name;
pub use tls::validate_client_name;
pub use types::PeerAddr;
pub use types::RaftWireConfig;
pub use types::WireLeaderId;
pub use wire::Json;
pub use wire::WireMessage;
