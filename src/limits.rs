//! The server's admission limits, shared by every transport: how many handshakes run at once
//! and how many connections one node identity may hold. See the `Limits` section of
//! [`Config`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;

use tokio::sync::OwnedSemaphorePermit;
use tokio::sync::Semaphore;

use crate::config::Config;

/// Admission state of one server.
#[derive(Debug)]
pub(crate) struct Admission {
    handshakes: Arc<Semaphore>,
    max_per_peer: usize,
    per_peer: Mutex<HashMap<u64, usize>>,
    /// Connections turned away because every handshake slot was busy.
    busy: AtomicU64,
    /// Connections closed because their node already had `max_per_peer`.
    over_peer_limit: AtomicU64,
}

/// One connection counted against its node's limit, until dropped.
#[derive(Debug)]
pub(crate) struct PeerSlot {
    admission: Arc<Admission>,
    node_id: u64,
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut per_peer = self.admission.per_peer.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = per_peer.get_mut(&self.node_id) {
            *n -= 1;
            if *n == 0 {
                per_peer.remove(&self.node_id);
            }
        }
    }
}

impl Admission {
    pub(crate) fn new(config: &Config) -> Arc<Self> {
        Arc::new(Admission {
            handshakes: Arc::new(Semaphore::new(config.max_concurrent_handshakes)),
            max_per_peer: config.max_connections_per_peer,
            per_peer: Mutex::default(),
            busy: AtomicU64::new(0),
            over_peer_limit: AtomicU64::new(0),
        })
    }

    /// A handshake slot, held until the handshake ends; `None` (counted, logged at debug)
    /// when all are busy.
    pub(crate) fn handshake(&self, addr: SocketAddr) -> Option<OwnedSemaphorePermit> {
        let permit = self.handshakes.clone().try_acquire_owned().ok();
        if permit.is_none() {
            let n = self.busy.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::debug!(%addr, refused_so_far = n, "every handshake slot is busy; turning the connection away");
            // A flood is worth one line now and then at a level operators see.
            if n.is_power_of_two() && n >= 64 {
                tracing::info!(
                    refused_so_far = n,
                    "connections turned away: every handshake slot busy"
                );
            }
        }
        permit
    }

    /// Counts a connection of `node_id`; `None` (counted, logged) when the node already has
    /// the most connections allowed.
    pub(crate) fn admit(self: &Arc<Self>, node_id: u64, addr: SocketAddr) -> Option<PeerSlot> {
        let mut per_peer = self.per_peer.lock().unwrap_or_else(|p| p.into_inner());
        let n = per_peer.entry(node_id).or_insert(0);
        if *n >= self.max_per_peer {
            let open = *n;
            drop(per_peer);
            let total = self.over_peer_limit.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::warn!(
                %addr,
                node_id,
                open,
                refused_so_far = total,
                "node already has the most connections allowed (max_connections_per_peer); closing the new one"
            );
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            admission: self.clone(),
            node_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(handshakes: usize, per_peer: usize) -> Config {
        let ca = crate::certs::CertificateAuthority::generate("limits test CA").unwrap();
        Config::builder()
            .tls(ca.tls_config(1).unwrap())
            .max_concurrent_handshakes(handshakes)
            .max_connections_per_peer(per_peer)
            .build()
            .unwrap()
    }

    #[test]
    fn handshake_slots_are_bounded_and_returned() {
        let a = Admission::new(&config(2, 1));
        let addr: SocketAddr = ([127, 0, 0, 1], 1).into();
        let p1 = a.handshake(addr).unwrap();
        let _p2 = a.handshake(addr).unwrap();
        assert!(a.handshake(addr).is_none());
        drop(p1);
        assert!(a.handshake(addr).is_some());
        assert_eq!(a.busy.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn connections_per_node_are_bounded_and_returned() {
        let a = Admission::new(&config(2, 2));
        let addr: SocketAddr = ([127, 0, 0, 1], 1).into();
        let s1 = a.admit(7, addr).unwrap();
        let _s2 = a.admit(7, addr).unwrap();
        assert!(a.admit(7, addr).is_none());
        let _other = a.admit(8, addr).unwrap();
        drop(s1);
        assert!(a.admit(7, addr).is_some());
        assert!(!a.per_peer.lock().unwrap().is_empty());
    }
}
