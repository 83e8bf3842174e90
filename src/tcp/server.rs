//! The TCP server side: serves the exchanges of each connection the shared accept loop hands
//! over, one after another, through the shared server core.

use std::sync::Arc;
use std::time::Duration;

use openraft::storage::RaftStateMachine;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio::sync::oneshot;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::accept::Accepted;
use crate::accept::Conn;
use crate::accept::ConnInfo;
use crate::accept::TlsStream;
use crate::config::Config;
use crate::error::ServerError;
use crate::framed::Framing;
use crate::framed::server::Served;
use crate::framed::server::exchange;
use crate::service::Caller;
use crate::service::Service;
use crate::snapshot::SnapshotData;
use crate::types::RaftWireConfig;

/// How long shutdown waits, after cutting every connection, for request handlers to drop
/// the halves they still hold (they fail at their next read).
const RELEASE_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a new connection's greeting may take to leave.
const GREETING_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `service` over the framed TCP transport on the connections `incoming` brings until
/// `shutdown` fires; then gives open exchanges the grace period and closes every connection.
pub(crate) async fn serve<C, SM>(
    service: Arc<Service<C, SM>>,
    config: Config,
    mut incoming: mpsc::Receiver<Accepted>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), ServerError>
where
    C: RaftWireConfig,
    SM: RaftStateMachine<C>,
    SM::SnapshotData: SnapshotData,
{
    let max_len = super::max_frame(&config);
    let max_control = config.max_control_message_size;
    let framing = Framing::of(&config);
    // A connection waiting for its next exchange longer than this is closed (clients reuse
    // theirs for half as long).
    let idle = config.idle_peer_timeout;
    // Flipped after the grace period: every read and write of every connection fails, also
    // where a request handler (openraft's, say) still reads a connection's requests.
    let (kill_tx, kill) = watch::channel(false);
    // Held by every connection and by both halves of its exchange in progress: a handler may
    // still hold a half after its connection's task ended.
    let live = Arc::new(());
    let mut connections = JoinSet::new();
    let mut stopping = shutdown.clone();
    loop {
        tokio::select! {
            _ = stopping.wait_for(|stop| *stop) => break,
            accepted = incoming.recv() => {
                let Some(accepted) = accepted else { break };
                connections.spawn(connection(
                    accepted,
                    (kill.clone(), live.clone()),
                    service.clone(),
                    (max_len, max_control, idle, framing),
                    shutdown.clone(),
                ));
            }
        }
        while connections.try_join_next().is_some() {}
    }
    drop(incoming);
    // Idle connections close at once; exchanges under way get the grace period.
    crate::framed::server::drain(&mut connections, config.shutdown_grace, "TCP").await;
    let _ = kill_tx.send(true);
    connections.shutdown().await;
    // Handlers still reading a killed connection fail at their next read and let go.
    let deadline = tokio::time::Instant::now() + RELEASE_TIMEOUT;
    while Arc::strong_count(&live) > 1 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    if Arc::strong_count(&live) > 1 {
        tracing::warn!(
            held = Arc::strong_count(&live) - 1,
            "TCP connections still held {RELEASE_TIMEOUT:?} after they were cut"
        );
    }
    Ok(())
}

/// Serves one connection: a greeting, then exchanges one after another for as long as each
/// ends cleanly.
async fn connection<C, SM>(
    accepted: Accepted,
    (kill, live): (watch::Receiver<bool>, Arc<()>),
    service: Arc<Service<C, SM>>,
    (max_len, max_control, idle, framing): (usize, usize, Duration, Framing),
    mut shutdown: watch::Receiver<bool>,
) where
    C: RaftWireConfig,
    SM: RaftStateMachine<C>,
    SM::SnapshotData: SnapshotData,
{
    let Accepted {
        stream,
        node_id,
        addr,
        slot,
    } = accepted;
    let info = ConnInfo {
        node_id: Some(node_id),
        addr,
    };
    let mut conn = Conn::new(stream, info, kill, Some(slot));
    let caller = Caller {
        node_id: Some(node_id),
        addr,
    };
    let greeted = tokio::time::timeout(GREETING_TIMEOUT, async {
        conn.write_all(&crate::codec::END_FRAME).await?;
        conn.flush().await
    })
    .await;
    if !matches!(greeted, Ok(Ok(()))) {
        return tracing::debug!(%addr, node_id, "TCP peer went away before its greeting");
    }
    let served = Served {
        service: &service,
        max_len,
        first_frame: idle,
        transport: "TCP",
    };
    loop {
        // Between exchanges: wait for the next one, or close at shutdown.
        tokio::select! {
            ready = conn.get_ref().get_ref().0.readable() => if ready.is_err() { return },
            _ = shutdown.wait_for(|stop| *stop) => return,
            _ = tokio::time::sleep(idle) => {
                return tracing::debug!(%addr, node_id, "TCP connection idle for {idle:?}; closing");
            }
        }
        let (home, back) = oneshot::channel::<Conn<TlsStream>>();
        let held = live.clone();
        let (send, recv) = super::halves(conn, move |conn| {
            // Until the halves meet again or are both gone, the connection counts as live.
            let _held = held;
            let _ = home.send(conn);
        });
        let (send, reader) = framing.open(send, recv, max_len);
        if !exchange(send, reader.with_control_limit(max_control), &served, caller).await {
            // The connection closes with its halves, so the peer cannot take an unfinished
            // exchange for a whole one.
            return;
        }
        match back.await {
            Ok(again) => conn = again,
            Err(_) => return,
        }
    }
}
