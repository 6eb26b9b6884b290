//! A UDP forwarder on loopback that a test can cut: the source dials the proxy, the proxy
//! forwards each datagram to the target from a socket of its own per source address, and
//! [`UdpProxy::set`] drops traffic in one direction or both, as a pulled cable or a dead link
//! would. Counters tell how far a transfer has got, so a cut can be aimed at a byte offset.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// What the proxy lets through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Everything.
    Up = 0,
    /// Nothing, either way.
    Down = 1,
    /// Source → target only (the target's answers are lost).
    ToTargetOnly = 2,
    /// Target → source only (the source's packets are lost).
    ToSourceOnly = 3,
}

#[derive(Debug, Default)]
struct Shared {
    link: AtomicU8,
    stop: AtomicBool,
    to_target: AtomicU64,
    to_source: AtomicU64,
    dropped: AtomicU64,
}

impl Shared {
    fn passes(&self, to_target: bool) -> bool {
        let link = self.link.load(Ordering::Relaxed);
        let ok = link == Link::Up as u8
            || (to_target && link == Link::ToTargetOnly as u8)
            || (!to_target && link == Link::ToSourceOnly as u8);
        if !ok {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }
}

/// A running proxy; stops when dropped.
#[derive(Debug)]
pub struct UdpProxy {
    /// The port the source should dial (on 127.0.0.1).
    pub port: u16,
    shared: Arc<Shared>,
    front: Option<JoinHandle<()>>,
}

impl UdpProxy {
    /// Forwards 127.0.0.1:`port` (a fresh port) to `target`.
    pub fn start(target: SocketAddr) -> UdpProxy {
        let front = UdpSocket::bind("127.0.0.1:0").expect("bind the proxy");
        front
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("read timeout");
        let port = front.local_addr().expect("local addr").port();
        let shared = Arc::new(Shared::default());
        let sh = shared.clone();
        let handle = std::thread::spawn(move || front_loop(front, target, sh));
        UdpProxy {
            port,
            shared,
            front: Some(handle),
        }
    }

    /// Sets what gets through from now on.
    pub fn set(&self, link: Link) {
        self.shared.link.store(link as u8, Ordering::SeqCst);
    }

    /// Bytes forwarded to the target so far.
    pub fn to_target(&self) -> u64 {
        self.shared.to_target.load(Ordering::Relaxed)
    }

    /// Datagrams dropped so far.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for UdpProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.front.take() {
            let _ = h.join();
        }
    }
}

fn front_loop(front: UdpSocket, target: SocketAddr, sh: Arc<Shared>) {
    let front = Arc::new(front);
    let backs: Mutex<HashMap<SocketAddr, Arc<UdpSocket>>> = Mutex::new(HashMap::new());
    let mut threads = Vec::new();
    let mut buf = vec![0u8; 65536];
    while !sh.stop.load(Ordering::SeqCst) {
        let (n, from) = match front.recv_from(&mut buf) {
            Ok(r) => r,
            Err(_) => continue, // timeout: look at `stop` again
        };
        let back = {
            let mut backs = backs.lock().expect("backs");
            backs
                .entry(from)
                .or_insert_with(|| {
                    let back = UdpSocket::bind("127.0.0.1:0").expect("bind a back socket");
                    back.connect(target).expect("connect to the target");
                    back.set_read_timeout(Some(Duration::from_millis(50)))
                        .expect("read timeout");
                    let back = Arc::new(back);
                    let (b, f, s) = (back.clone(), front.clone(), sh.clone());
                    threads.push(std::thread::spawn(move || back_loop(b, f, from, s)));
                    back
                })
                .clone()
        };
        if sh.passes(true) {
            sh.to_target.fetch_add(n as u64, Ordering::Relaxed);
            let _ = back.send(&buf[..n]);
        }
    }
    for t in threads {
        let _ = t.join();
    }
}

fn back_loop(back: Arc<UdpSocket>, front: Arc<UdpSocket>, client: SocketAddr, sh: Arc<Shared>) {
    let mut buf = vec![0u8; 65536];
    while !sh.stop.load(Ordering::SeqCst) {
        let Ok(n) = back.recv(&mut buf) else { continue };
        if sh.passes(false) {
            sh.to_source.fetch_add(n as u64, Ordering::Relaxed);
            let _ = front.send_to(&buf[..n], client);
        }
    }
}
