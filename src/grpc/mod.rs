//! gRPC transport (tonic + prost over HTTP/2).

mod body;
mod client;
pub(crate) mod convert;
mod counted;
mod limit;
mod primed;
mod serve;
mod server;

pub(crate) use client::Connector;
pub(crate) use serve::Incoming;
pub(crate) use serve::serve;
pub(crate) use server::RaftService;
use server::remap_oversize;

/// The protobuf messages and tonic service of `proto/raftwire.proto`, for interoperating
/// peers and for tests that speak the wire protocol directly.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("raftwire.v1");
}

/// gRPC's ALPN protocol id (HTTP/2).
pub(crate) const ALPN: &[u8] = b"h2";

/// Whether `config` compresses gRPC messages (zstd, gRPC's own message compression).
fn compressed(config: &crate::config::Config) -> bool {
    #[cfg(feature = "compression")]
    return config.compression.is_on();
    #[cfg(not(feature = "compression"))]
    {
        let _ = config;
        false
    }
}

/// Request header every call of a compressing node carries (`zstd`): the server checks it
/// against its own setting before decoding anything.
pub(crate) const COMPRESSION_HEADER: &str = "raftwire-compression";

/// Metadata key set on every error status raftwire's server produces itself.
pub(crate) const ERROR_MARK: &str = "raftwire-error";

/// Marks a status as raftwire's own answer, so the client tells it from a broken connection.
pub(crate) fn marked(mut status: tonic::Status) -> tonic::Status {
    status
        .metadata_mut()
        .insert(ERROR_MARK, tonic::metadata::MetadataValue::from_static("1"));
    status
}
