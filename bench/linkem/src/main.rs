//! Link emulator for the push benchmark (`bench/push`, `--link lan|wan`).
//!
//! The kernel the bench runs on has no netem, so delay and loss are made here, in userspace, by
//! a proxy on loopback that the bench runs inside its network namespace:
//!
//! - UDP (QUIC): every datagram from a client to `LISTEN` goes, one per client address, through
//!   an upstream socket to `UPSTREAM`; the replies come back the same way.
//! - TCP (ssh): each accepted connection is paired with one to `UPSTREAM` and the bytes are
//!   copied both ways.
//!
//! Each direction is one emulated link ([`link::Link`], shared by all flows of that direction):
//! a bottleneck of `--rate-mbit` with `--queue-ms` of FIFO, then `--rtt-ms`/2 of one-way delay,
//! and, for datagrams only, random loss of `--loss` (seeded). A byte stream is not dropped: a
//! stream proxy cannot lose a TCP segment without rebuilding TCP, so the TCP side gets delay and
//! rate only (bench/README.md, "Push", says what that means for rsync).
//!
//! Timing is done by plain threads and `thread::sleep`, not tokio: tokio's timer wheel has a
//! resolution of 1 ms, which is twice the whole one-way delay of the LAN profile.
//!
//! ```text
//! stackclone-bench-linkem proxy --rtt-ms 40 --rate-mbit 100 --loss 0.001 \
//!     --udp 127.0.0.1:47444=127.0.0.1:47443 --tcp 127.0.0.1:2223=127.0.0.1:2222
//! stackclone-bench-linkem selftest --rtt-ms 40 --rate-mbit 100 --loss 0.001 [--secs 2]
//! ```

mod link;

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use clap::{Args, Parser, Subcommand};
use link::{Link, Verdict, tcp_wire, udp_wire};

#[derive(Debug, Parser)]
#[command(about = "UDP/TCP proxy on loopback with delay, loss and a rate limit")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Forward until killed.
    Proxy {
        #[command(flatten)]
        shape: Shape,
        /// LISTEN=UPSTREAM for datagrams (repeatable).
        #[arg(long, value_parser = parse_pair)]
        udp: Vec<(SocketAddr, SocketAddr)>,
        /// LISTEN=UPSTREAM for streams (repeatable).
        #[arg(long, value_parser = parse_pair)]
        tcp: Vec<(SocketAddr, SocketAddr)>,
    },
    /// Measure round trips and bulk rates through an in-process proxy with this shape, against
    /// in-process echo servers and sinks on 127.0.0.1, and print them as JSON.
    Selftest {
        #[command(flatten)]
        shape: Shape,
        /// Seconds of each bulk transfer.
        #[arg(long, default_value_t = 2.0)]
        secs: f64,
        /// Round trips per ping test.
        #[arg(long, default_value_t = 20)]
        pings: usize,
        /// Rate the UDP bulk test offers, Mbit/s of IP bytes; default 1.2 x the link's rate,
        /// as fast as it can when the link is unlimited.
        #[arg(long)]
        udp_offer_mbit: Option<f64>,
    },
}

#[derive(Debug, Clone, Args)]
struct Shape {
    /// Round-trip time added (half in each direction), ms.
    #[arg(long, default_value_t = 0.0)]
    rtt_ms: f64,
    /// Rate of each direction, Mbit/s of IP bytes; 0 = unlimited.
    #[arg(long, default_value_t = 0.0)]
    rate_mbit: f64,
    /// Share of datagrams lost in each direction (0.001 = 0.1 %); streams are never dropped.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Backlog the bottleneck holds before it tail-drops datagrams (streams wait instead), ms;
    /// default max(RTT, 5 ms).
    #[arg(long)]
    queue_ms: Option<f64>,
    /// Seed of the loss decisions.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn parse_pair(s: &str) -> Result<(SocketAddr, SocketAddr), String> {
    let (a, b) = s.split_once('=').ok_or("expected LISTEN=UPSTREAM")?;
    Ok((
        a.parse().map_err(|e| format!("{a}: {e}"))?,
        b.parse().map_err(|e| format!("{b}: {e}"))?,
    ))
}

/// Both directions of the emulated link, on one clock.
#[derive(Debug, Clone)]
struct Path {
    epoch: Instant,
    /// Client to server.
    up: Arc<Mutex<Link>>,
    /// Server to client.
    down: Arc<Mutex<Link>>,
    /// Datagrams dropped: queue full, random loss (both directions).
    dropped_queue: Arc<AtomicU64>,
    dropped_loss: Arc<AtomicU64>,
}

impl Path {
    fn new(s: &Shape) -> Self {
        let delay = Duration::from_secs_f64(s.rtt_ms / 2000.0);
        let queue = Duration::from_secs_f64(s.queue_ms.unwrap_or(s.rtt_ms.max(5.0)) / 1000.0);
        let rate = s.rate_mbit * 1e6;
        Self {
            epoch: Instant::now(),
            up: Arc::new(Mutex::new(Link::new(rate, delay, queue, s.loss, s.seed))),
            down: Arc::new(Mutex::new(Link::new(
                rate,
                delay,
                queue,
                s.loss,
                s.seed ^ 0x5eed_d0d0,
            ))),
            dropped_queue: Arc::default(),
            dropped_loss: Arc::default(),
        }
    }

    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// Sleeps until `at`, less `early`: the caller's running estimate of how late a sleep
    /// wakes (timer slack and scheduling, about 0.1 ms here, a fifth of the LAN's one-way
    /// delay). Updates the estimate from this wake-up.
    fn sleep_until(&self, at: Duration, early: &mut Duration) {
        let now = self.now();
        if at <= now + *early {
            return;
        }
        let want = at - *early;
        thread::sleep(want - now);
        let late = self.now().saturating_sub(want);
        // EWMA over the last ~8 sleeps, capped: a descheduled thread should not make every
        // later packet early by the length of that stall.
        let late = late.min(Duration::from_millis(1));
        *early = (*early * 7 + late) / 8;
    }

    /// A datagram of `len` bytes enters `link`: when to deliver it, if at all.
    fn datagram(&self, link: &Mutex<Link>, len: usize) -> Option<Duration> {
        let v = link.lock().unwrap().send(self.now(), udp_wire(len), true);
        match v {
            Verdict::Deliver(at) => Some(at),
            Verdict::QueueFull => {
                self.dropped_queue.fetch_add(1, Ordering::Relaxed);
                None
            }
            Verdict::Lost => {
                self.dropped_loss.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }
}

/// The input of a delay line: (delivery time, data or end of stream).
type Line = mpsc::Sender<(Duration, Option<Vec<u8>>)>;

/// A delay line: packets go in with their delivery time and come out, in order, at that time.
fn delay_line<F>(path: &Path, name: String, mut out: F) -> Line
where
    F: FnMut(Option<&[u8]>) -> io::Result<()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<(Duration, Option<Vec<u8>>)>();
    let p = path.clone();
    thread::Builder::new()
        .name(name)
        .spawn(move || {
            let mut early = Duration::ZERO;
            for (at, data) in rx {
                p.sleep_until(at, &mut early);
                if out(data.as_deref()).is_err() || data.is_none() {
                    break;
                }
            }
        })
        .expect("spawn delay line");
    tx
}

// ---- UDP ------------------------------------------------------------------------------------

/// Socket buffers of the proxy's UDP sockets. The default 208 KiB is 1.7 ms at 1 Gbit/s: a
/// proxy thread that is descheduled that long on a busy 2-core machine would drop datagrams
/// the emulated link never meant to lose. (The kernel caps this at net.core.rmem_max, 4 MiB
/// here and per network namespace.)
const UDP_BUF: usize = 4 << 20;

fn udp_bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        None,
    )?;
    s.set_recv_buffer_size(UDP_BUF)?;
    s.set_send_buffer_size(UDP_BUF)?;
    s.bind(&addr.into())?;
    Ok(s.into())
}

fn udp_proxy(path: Path, listen: SocketAddr, upstream: SocketAddr) -> Result<()> {
    let sock = Arc::new(udp_bind(listen).with_context(|| format!("bind udp {listen}"))?);
    let p = path.clone();
    thread::Builder::new()
        .name(format!("udp {listen}"))
        .spawn(move || {
            let mut flows: HashMap<SocketAddr, Line> = HashMap::new();
            let mut buf = vec![0u8; 65536];
            loop {
                let (n, peer) = match sock.recv_from(&mut buf) {
                    Ok(x) => x,
                    Err(e) => {
                        eprintln!("linkem: udp {listen}: {e}");
                        continue;
                    }
                };
                let tx = match flows.entry(peer) {
                    Entry::Occupied(e) => e.into_mut(),
                    Entry::Vacant(e) => match udp_flow(&p, &sock, peer, upstream) {
                        Ok(tx) => e.insert(tx),
                        Err(e) => {
                            eprintln!("linkem: udp flow {peer} -> {upstream}: {e:#}");
                            continue;
                        }
                    },
                };
                if let Some(at) = p.datagram(&p.up, n) {
                    let _ = tx.send((at, Some(buf[..n].to_vec())));
                }
            }
        })?;
    Ok(())
}

/// One client address: its own upstream socket, a delay line each way.
fn udp_flow(
    p: &Path,
    listen: &Arc<UdpSocket>,
    peer: SocketAddr,
    upstream: SocketAddr,
) -> Result<Line> {
    let up = Arc::new(udp_bind(SocketAddr::from(([127, 0, 0, 1], 0)))?);
    up.connect(upstream)?;
    let up_out = up.clone();
    let tx_up = delay_line(p, format!("udp {peer} up"), move |d| {
        if let Some(d) = d {
            // A refused send (the server is not listening yet) is a lost datagram, as on a wire.
            let _ = up_out.send(d);
        }
        Ok(())
    });
    let l = listen.clone();
    let tx_down = delay_line(p, format!("udp {peer} down"), move |d| {
        if let Some(d) = d {
            let _ = l.send_to(d, peer);
        }
        Ok(())
    });
    let p = p.clone();
    thread::Builder::new()
        .name(format!("udp {peer} recv"))
        .spawn(move || {
            let mut buf = vec![0u8; 65536];
            loop {
                match up.recv(&mut buf) {
                    Ok(n) => {
                        if let Some(at) = p.datagram(&p.down, n) {
                            let _ = tx_down.send((at, Some(buf[..n].to_vec())));
                        }
                    }
                    // ECONNREFUSED from an earlier send to a port nobody listens on: keep going.
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                    Err(e) => {
                        eprintln!("linkem: udp upstream for {peer}: {e}");
                        return;
                    }
                }
            }
        })?;
    Ok(tx_up)
}

// ---- TCP ------------------------------------------------------------------------------------

fn tcp_proxy(path: Path, listen: SocketAddr, upstream: SocketAddr) -> Result<()> {
    let l = TcpListener::bind(listen).with_context(|| format!("bind tcp {listen}"))?;
    thread::Builder::new()
        .name(format!("tcp {listen}"))
        .spawn(move || {
            for c in l.incoming() {
                let c = match c {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("linkem: accept on {listen}: {e}");
                        continue;
                    }
                };
                // The connection's setup costs a round trip on the emulated link too.
                let p = path.clone();
                thread::spawn(move || {
                    let d = p.up.lock().unwrap().delay() + p.down.lock().unwrap().delay();
                    thread::sleep(d);
                    match TcpStream::connect(upstream) {
                        Ok(u) => {
                            if let Err(e) = tcp_pair(&p, c, u) {
                                eprintln!("linkem: tcp pair: {e}");
                            }
                        }
                        Err(e) => eprintln!("linkem: connect {upstream}: {e}"),
                    }
                });
            }
        })?;
    Ok(())
}

fn tcp_pair(p: &Path, client: TcpStream, server: TcpStream) -> io::Result<()> {
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    pump(
        p,
        p.up.clone(),
        client.try_clone()?,
        server.try_clone()?,
        "up",
    );
    pump(p, p.down.clone(), server, client, "down");
    Ok(())
}

/// Copies `from` to `to` through `link`: delay, rate, and backpressure once the link holds
/// `queue` of backlog. An end of stream is passed on as a write shutdown, after the data.
fn pump(p: &Path, link: Arc<Mutex<Link>>, mut from: TcpStream, to: TcpStream, dir: &str) {
    let mut out = to.try_clone().expect("clone tcp stream");
    let from2 = from.try_clone().expect("clone tcp stream");
    let tx = delay_line(p, format!("tcp {dir} out"), move |d| {
        let r = match d {
            Some(d) => out.write_all(d),
            None => out.shutdown(Shutdown::Write),
        };
        if r.is_err() {
            // The far side is gone: stop reading this direction too.
            let _ = from2.shutdown(Shutdown::Both);
            let _ = out.shutdown(Shutdown::Both);
        }
        r
    });
    let p = p.clone();
    thread::spawn(move || {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            // Backpressure: read no more while the bottleneck holds a full queue.
            loop {
                let (backlog, queue) = {
                    let l = link.lock().unwrap();
                    (l.backlog(p.now()), l.queue())
                };
                if backlog <= queue {
                    break;
                }
                thread::sleep(backlog - queue);
            }
            let n = match from.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => 0,
            };
            let v = link.lock().unwrap().send(p.now(), tcp_wire(n), false);
            let Verdict::Deliver(at) = v else {
                unreachable!("streams are not dropped")
            };
            let data = (n > 0).then(|| buf[..n].to_vec());
            if tx.send((at, data)).is_err() || n == 0 {
                break;
            }
        }
        drop(to);
    });
}

// ---- self-test ------------------------------------------------------------------------------

fn selftest(
    shape: &Shape,
    secs: f64,
    pings: usize,
    offer: Option<f64>,
) -> Result<serde_json::Value> {
    let path = Path::new(shape);
    let lo = |port| SocketAddr::from(([127, 0, 0, 1], port));
    // Echo and sink servers.
    let uecho = UdpSocket::bind(lo(0))?;
    let uecho_addr = uecho.local_addr()?;
    thread::spawn(move || {
        let mut b = [0u8; 2048];
        while let Ok((n, a)) = uecho.recv_from(&mut b) {
            let _ = uecho.send_to(&b[..n], a);
        }
    });
    let usink = udp_bind(lo(0))?;
    let usink_addr = usink.local_addr()?;
    let usink_count = Arc::new(Mutex::new((0u64, None::<Instant>, None::<Instant>)));
    let uc = usink_count.clone();
    thread::spawn(move || {
        let mut b = [0u8; 2048];
        while let Ok(n) = usink.recv(&mut b) {
            let now = Instant::now();
            let mut c = uc.lock().unwrap();
            c.0 += udp_wire(n) as u64;
            c.1.get_or_insert(now);
            c.2 = Some(now);
        }
    });
    let techo = TcpListener::bind(lo(0))?;
    let techo_addr = techo.local_addr()?;
    thread::spawn(move || {
        for c in techo.incoming().flatten() {
            thread::spawn(move || {
                let mut w = c.try_clone().unwrap();
                let _ = w.set_nodelay(true);
                let mut r = c;
                let _ = io::copy(&mut r, &mut w);
            });
        }
    });
    let tsink = TcpListener::bind(lo(0))?;
    let tsink_addr = tsink.local_addr()?;
    let (tsink_tx, tsink_rx) = mpsc::channel();
    thread::spawn(move || {
        if let Some(Ok(mut c)) = tsink.incoming().next() {
            let mut b = vec![0u8; 256 * 1024];
            let (mut total, mut first, mut last) = (0u64, None, Instant::now());
            while let Ok(n) = c.read(&mut b) {
                if n == 0 {
                    break;
                }
                let now = Instant::now();
                first.get_or_insert(now);
                last = now;
                total += n as u64;
            }
            let _ = tsink_tx.send((total, first.map(|f| last - f)));
        }
    });
    let rcvbuf0 = rcvbuf_errors();
    // Proxies in front of them, on free ports.
    let free_udp = || -> Result<SocketAddr> { Ok(UdpSocket::bind(lo(0))?.local_addr()?) };
    let free_tcp = || -> Result<SocketAddr> { Ok(TcpListener::bind(lo(0))?.local_addr()?) };
    let (pu_echo, pu_sink, pt_echo, pt_sink) = (free_udp()?, free_udp()?, free_tcp()?, free_tcp()?);
    udp_proxy(path.clone(), pu_echo, uecho_addr)?;
    udp_proxy(path.clone(), pu_sink, usink_addr)?;
    tcp_proxy(path.clone(), pt_echo, techo_addr)?;
    tcp_proxy(path.clone(), pt_sink, tsink_addr)?;

    // UDP round trips.
    let s = UdpSocket::bind(lo(0))?;
    s.connect(pu_echo)?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut udp_rtt = Vec::new();
    let mut udp_lost = 0;
    for i in 0..pings {
        let msg = (i as u64).to_le_bytes();
        let t = Instant::now();
        s.send(&msg)?;
        let mut b = [0u8; 64];
        loop {
            match s.recv(&mut b) {
                Ok(n) if b[..n] == msg => {
                    udp_rtt.push(t.elapsed().as_secs_f64() * 1000.0);
                    break;
                }
                Ok(_) => continue, // a late reply to a ping counted lost
                Err(_) => {
                    udp_lost += 1;
                    break;
                }
            }
        }
        thread::sleep(Duration::from_millis(5));
    }
    // TCP round trips on one connection (the first includes nothing of the connect).
    let t = Instant::now();
    let mut c = TcpStream::connect(pt_echo)?;
    c.set_nodelay(true)?;
    let mut tcp_rtt = Vec::new();
    let mut b = [0u8; 64];
    c.write_all(b"x")?;
    c.read_exact(&mut b[..1])?;
    let tcp_connect_ms = t.elapsed().as_secs_f64() * 1000.0;
    for _ in 0..pings {
        let t = Instant::now();
        c.write_all(&[7u8; 64])?;
        c.read_exact(&mut b)?;
        tcp_rtt.push(t.elapsed().as_secs_f64() * 1000.0);
        thread::sleep(Duration::from_millis(5));
    }
    drop(c);

    // TCP bulk: as fast as the client can write, for `secs`.
    let mut c = TcpStream::connect(pt_sink)?;
    let chunk = vec![0x5au8; 64 * 1024];
    let t = Instant::now();
    let mut sent = 0u64;
    while t.elapsed().as_secs_f64() < secs {
        c.write_all(&chunk)?;
        sent += chunk.len() as u64;
    }
    c.shutdown(Shutdown::Write)?;
    let (got, span) = tsink_rx
        .recv_timeout(Duration::from_secs(60))
        .map_err(|_| anyhow!("tcp sink: no result"))?;
    let span = span.unwrap_or_default().as_secs_f64();
    let tcp_mbit = if span > 0.0 {
        tcp_wire(got as usize) as f64 * 8.0 / span / 1e6
    } else {
        0.0
    };

    // UDP bulk: 1452-byte datagrams (QUIC's size on a 1500 link) blasted for `secs`; what
    // reaches the sink per second is the link's (or the proxy's) ceiling.
    let s = UdpSocket::bind(lo(0))?;
    s.connect(pu_sink)?;
    let d = vec![0xa5u8; 1452];
    let offer = offer.unwrap_or(shape.rate_mbit * 1.2);
    let t = Instant::now();
    let mut udp_sent = 0u64;
    while t.elapsed().as_secs_f64() < secs {
        // Bursts of 16, then wait for the schedule (if paced).
        for _ in 0..16 {
            if s.send(&d).is_ok() {
                udp_sent += 1;
            }
        }
        if offer > 0.0 {
            let due = udp_sent as f64 * udp_wire(d.len()) as f64 * 8.0 / (offer * 1e6);
            let el = t.elapsed().as_secs_f64();
            if due > el {
                thread::sleep(Duration::from_secs_f64(due - el));
            }
        }
    }
    let offered_mbit =
        udp_sent as f64 * udp_wire(d.len()) as f64 * 8.0 / t.elapsed().as_secs_f64() / 1e6;
    thread::sleep(Duration::from_secs_f64(0.5 + shape.rtt_ms / 1000.0));
    let (ubytes, ufirst, ulast) = *usink_count.lock().unwrap();
    let uspan = match (ufirst, ulast) {
        (Some(a), Some(b)) => (b - a).as_secs_f64(),
        _ => 0.0,
    };
    let udp_mbit = if uspan > 0.0 {
        ubytes as f64 * 8.0 / uspan / 1e6
    } else {
        0.0
    };

    let stats = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        let med = if v.is_empty() {
            f64::NAN
        } else {
            v[v.len() / 2]
        };
        serde_json::json!({"min": v.first(), "median": med, "max": v.last(), "n": v.len()})
    };
    Ok(serde_json::json!({
        "shape": {"rtt_ms": shape.rtt_ms, "rate_mbit": shape.rate_mbit, "loss": shape.loss,
                  "queue_ms": shape.queue_ms.unwrap_or(shape.rtt_ms.max(5.0))},
        "udp_rtt_ms": stats(&mut udp_rtt),
        "udp_ping_lost": udp_lost,
        "tcp_connect_and_first_rtt_ms": tcp_connect_ms,
        "tcp_rtt_ms": stats(&mut tcp_rtt),
        "tcp_bulk": {"client_bytes": sent, "sink_bytes": got, "mbit_s_ip": tcp_mbit},
        "udp_bulk": {"datagrams_sent": udp_sent, "offered_mbit_s_ip": offered_mbit,
                     "sink_ip_bytes": ubytes, "mbit_s_ip": udp_mbit,
                     "rcvbuf_errors": rcvbuf_errors().zip(rcvbuf0).map(|(a, b)| a - b),
                     "dropped_queue": path.dropped_queue.load(Ordering::Relaxed),
                     "dropped_loss": path.dropped_loss.load(Ordering::Relaxed)},
    }))
}

/// UDP datagrams dropped by full socket receive buffers in this network namespace so far.
fn rcvbuf_errors() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut rows = s.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (rows.next()?, rows.next()?);
    let i = names.split_whitespace().position(|n| n == "RcvbufErrors")?;
    values.split_whitespace().nth(i)?.parse().ok()
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Proxy { shape, udp, tcp } => {
            let path = Path::new(&shape);
            for (l, u) in udp {
                udp_proxy(path.clone(), l, u)?;
            }
            for (l, u) in tcp {
                tcp_proxy(path.clone(), l, u)?;
            }
            // The bench waits for this line: every listener is bound.
            println!("linkem ready");
            io::stdout().flush()?;
            loop {
                thread::sleep(Duration::from_secs(3600));
            }
        }
        Cmd::Selftest {
            shape,
            secs,
            pings,
            udp_offer_mbit,
        } => {
            let v = selftest(&shape, secs, pings, udp_offer_mbit)?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
    }
}
