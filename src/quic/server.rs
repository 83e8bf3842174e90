//! The QUIC server side: accepts connections, reads each stream's frames and hands them to
//! the shared server core; nothing here decides what a request may do.

use std::sync::Arc;
use std::time::Duration;

use openraft::storage::RaftStateMachine;
use tokio::sync::OwnedSemaphorePermit;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::FrameReader;
use super::Outgoing;
use crate::codec::ErrorCode;
use crate::config::Config;
use crate::error::ServerError;
use crate::framed::Framing;
use crate::framed::server::Served;
use crate::framed::server::exchange;
use crate::limits::Admission;
use crate::service::Caller;
use crate::service::Service;
use crate::snapshot::SnapshotData;
use crate::tls;
use crate::types::RaftWireConfig;

/// How long a new stream may take to deliver its first frame.
const FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(10);

struct Ctx<C: RaftWireConfig, SM: RaftStateMachine<C>> {
    service: Arc<Service<C, SM>>,
    max_len: usize,
    max_control: usize,
    framing: Framing,
    admission: Arc<Admission>,
    handshake_timeout: Duration,
}

/// Serves `service` over QUIC on `socket` until `shutdown` fires; then stops accepting, gives
/// open streams `grace` to finish and closes every connection.
pub(crate) async fn serve<C, SM>(
    service: Arc<Service<C, SM>>,
    config: Config,
    socket: std::net::UdpSocket,
    shutdown: watch::Receiver<bool>,
) -> Result<(), ServerError>
where
    C: RaftWireConfig,
    SM: RaftStateMachine<C>,
    SM::SnapshotData: SnapshotData,
{
    let serve_err = |e: &dyn std::fmt::Display| ServerError::Serve(e.to_string());
    let tls = config
        .tls
        .as_ref()
        .ok_or_else(|| serve_err(&"QUIC needs a TLS identity"))?;
    let crypto = tls
        .server_config(super::alpn(&config))
        .map_err(|e| serve_err(&e))?;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(crypto).map_err(|e| serve_err(&e))?;
    let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = super::transport_config(&config.quic);
    let streams = config
        .max_concurrent_streams
        .min(config.quic.max_concurrent_streams);
    transport.max_concurrent_bidi_streams(quinn::VarInt::from_u32(streams));
    server_config.transport_config(Arc::new(transport));
    let runtime = quinn::default_runtime().ok_or_else(|| serve_err(&"no async runtime"))?;
    let endpoint = quinn::Endpoint::new(
        super::endpoint_config(Some(tls)),
        Some(server_config),
        socket,
        runtime,
    )
    .map_err(|e| serve_err(&e))?;
    let ctx = Arc::new(Ctx {
        service,
        max_len: super::max_frame(&config),
        max_control: config.max_control_message_size,
        framing: Framing::of(&config),
        admission: Admission::new(&config),
        handshake_timeout: config.connect_timeout,
    });
    let mut connections = JoinSet::new();
    let mut stopping = shutdown.clone();
    loop {
        tokio::select! {
            _ = stopping.wait_for(|stop| *stop) => break,
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                match ctx.admission.handshake(incoming.remote_address()) {
                    Some(slot) => {
                        let stop = shutdown.clone();
                        connections.spawn(connection(incoming, slot, ctx.clone(), stop));
                    }
                    // Every handshake slot is busy. A Retry costs no state: a real client
                    // answers it (and comes back validated), a spoofed or abandoned one never
                    // does. An address already validated is refused outright.
                    None if !incoming.remote_address_validated() => {
                        let _ = incoming.retry();
                    }
                    None => incoming.refuse(),
                }
            }
        }
        while connections.try_join_next().is_some() {}
    }
    // Stop accepting: new connection attempts are refused from here on.
    endpoint.set_server_config(None);
    // Connections stop taking new streams; open ones get the grace period.
    crate::framed::server::drain(&mut connections, config.shutdown_grace, "QUIC").await;
    endpoint.close(quinn::VarInt::from_u32(0), b"server shutting down");
    connections.shutdown().await;
    // The socket is released once the endpoint has told its peers (bounded: peers that do
    // not answer are given up on).
    let _ = tokio::time::timeout(Duration::from_millis(500), endpoint.wait_idle()).await;
    Ok(())
}

async fn connection<C, SM>(
    incoming: quinn::Incoming,
    handshake_slot: OwnedSemaphorePermit,
    ctx: Arc<Ctx<C, SM>>,
    mut shutdown: watch::Receiver<bool>,
) where
    C: RaftWireConfig,
    SM: RaftStateMachine<C>,
    SM::SnapshotData: SnapshotData,
{
    let addr = incoming.remote_address();
    let handshake_timeout = ctx.handshake_timeout;
    let handshake = tokio::time::timeout(handshake_timeout, incoming).await;
    drop(handshake_slot);
    let conn = match handshake {
        Ok(Ok(conn)) => conn,
        // A client that gave up (shutting down, timed out) is no refusal worth a warning.
        Ok(Err(e @ quinn::ConnectionError::ApplicationClosed(_))) => {
            return tracing::debug!(%addr, "QUIC handshake abandoned by the client: {e}");
        }
        Ok(Err(e)) => return tracing::warn!(%addr, "QUIC handshake refused: {e}"),
        Err(_) => return tracing::warn!(%addr, "QUIC handshake timed out after {handshake_timeout:?}"),
    };
    let certs = conn.peer_identity().and_then(|id| {
        id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
            .ok()
    });
    let Some(node_id) = tls::peer_node_id(certs.as_deref().map(|c| c.as_slice())) else {
        // The verifier already refuses certificates without a node id.
        conn.close(super::code(super::REFUSED), super::REFUSED_REASON);
        return tracing::warn!(%addr, "QUIC peer has no node identity; closed");
    };
    // Held while the connection lives; `admit` logs a refusal.
    let Some(_peer_slot) = ctx.admission.admit(node_id, addr) else {
        conn.close(
            quinn::VarInt::from_u32(ErrorCode::Refused as u32),
            b"too many connections from this node",
        );
        return;
    };
    let caller = Caller {
        node_id: Some(node_id),
        addr,
    };
    tracing::debug!(%addr, node_id, "QUIC connection accepted");
    // Dropping the set (when this task is aborted at the end of a shutdown) aborts every
    // stream.
    let mut streams = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => break,
            accepted = conn.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    let (send, recv) = ctx.framing.open(send, recv, ctx.max_len);
                    streams.spawn(stream(
                        send,
                        recv.with_control_limit(ctx.max_control),
                        ctx.clone(),
                        caller,
                    ));
                }
                Err(e) => {
                    tracing::debug!(%addr, node_id, "QUIC connection ended: {e}");
                    return;
                }
            }
        }
        while streams.try_join_next().is_some() {}
    }
    // Shutting down: open streams may finish within the server's grace period.
    while streams.join_next().await.is_some() {}
}

/// Serves one stream: one exchange.
async fn stream<C, SM>(send: Outgoing, reader: FrameReader, ctx: Arc<Ctx<C, SM>>, caller: Caller)
where
    C: RaftWireConfig,
    SM: RaftStateMachine<C>,
    SM::SnapshotData: SnapshotData,
{
    let served = Served {
        service: &ctx.service,
        max_len: ctx.max_len,
        first_frame: FIRST_FRAME_TIMEOUT,
        transport: "QUIC",
    };
    exchange(send, reader, &served, caller).await;
}
