//! A userspace relay between a client and a server on 127.0.0.1, for links that are slow or
//! that die: every byte (TCP) or datagram (UDP) is held for a one-way delay before it is
//! passed on, and `cut` makes the link vanish without a word to either end.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::net::TcpStream;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// A running relay; dropping it stops every task and closes every socket.
pub struct Relay {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    tasks: Arc<std::sync::Mutex<JoinSet<()>>>,
}

impl Relay {
    /// Relays TCP connections to `target`, each direction delayed by `one_way`.
    pub async fn tcp(target: SocketAddr, one_way: Duration) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let relay = Relay::new(addr);
        let (cut, tasks) = (relay.cut.clone(), relay.tasks.clone());
        relay.spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                if cut.load(Ordering::SeqCst) {
                    continue;
                }
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                let _ = (client.set_nodelay(true), server.set_nodelay(true));
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                let mut t = tasks.lock().unwrap();
                t.spawn(pipe(cr, sw, one_way, cut.clone()));
                t.spawn(pipe(sr, cw, one_way, cut.clone()));
            }
        });
        relay
    }

    /// Relays UDP datagrams to `target` (one upstream socket per client address), each
    /// direction delayed by `one_way`.
    pub async fn udp(target: SocketAddr, one_way: Duration) -> Relay {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = front.local_addr().unwrap();
        let relay = Relay::new(addr);
        let (cut, tasks) = (relay.cut.clone(), relay.tasks.clone());
        relay.spawn(async move {
            let mut upstreams: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
            let mut buf = vec![0u8; 65536];
            loop {
                let Ok((n, from)) = front.recv_from(&mut buf).await else {
                    return;
                };
                if cut.load(Ordering::SeqCst) {
                    continue;
                }
                let up = match upstreams.get(&from) {
                    Some(up) => up.clone(),
                    None => {
                        let up = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
                        up.connect(target).await.unwrap();
                        upstreams.insert(from, up.clone());
                        // Answers from the server go back to this client, delayed too.
                        let (front, up2, cut2) = (front.clone(), up.clone(), cut.clone());
                        tasks.lock().unwrap().spawn(async move {
                            let mut buf = vec![0u8; 65536];
                            loop {
                                let Ok(n) = up2.recv(&mut buf).await else { return };
                                let datagram = buf[..n].to_vec();
                                let (front, cut) = (front.clone(), cut2.clone());
                                tokio::spawn(async move {
                                    tokio::time::sleep(one_way).await;
                                    if !cut.load(Ordering::SeqCst) {
                                        let _ = front.send_to(&datagram, from).await;
                                    }
                                });
                            }
                        });
                        up
                    }
                };
                let datagram = buf[..n].to_vec();
                let cut = cut.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(one_way).await;
                    if !cut.load(Ordering::SeqCst) {
                        let _ = up.send(&datagram).await;
                    }
                });
            }
        });
        relay
    }

    fn new(addr: SocketAddr) -> Relay {
        Relay {
            addr,
            cut: Arc::new(AtomicBool::new(false)),
            tasks: Arc::new(std::sync::Mutex::new(JoinSet::new())),
        }
    }

    fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.lock().unwrap().spawn(task);
    }

    /// The link vanishes: nothing more passes either way and nobody is told (no FIN, no RST,
    /// no close frame), as when a cable is pulled or a host dies.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }

    /// The link works again for new TCP connections and for every UDP datagram; TCP
    /// connections that were open at the cut stay dead.
    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
        self.tasks.lock().unwrap().abort_all();
    }
}

/// Copies one direction of a TCP connection, holding every read for `delay`, in order.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
    cut: Arc<AtomicBool>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = async move {
        while let Some((at, bytes)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if cut.load(Ordering::SeqCst) {
                // Hold the socket open, silent, as a dead peer's would stay.
                std::future::pending::<()>().await;
            }
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    let reader = async move {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.send((Instant::now() + delay, buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    };
    tokio::join!(writer, reader);
}
