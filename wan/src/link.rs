//! The link emulator: a TCP proxy that adds one-way delay and shapes bandwidth per direction.
//!
//! Each direction models a serial link: a segment read at time t starts transmitting when the
//! link is free, occupies it for len/bandwidth, and is delivered one-way-delay later. The bytes
//! on the wire plus a queue are bounded, so a sender that outruns the link is held back by TCP,
//! as it would be behind a real bottleneck.

use crate::Rate;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::AbortHandle;
use tokio::time::Instant;

const SEGMENT: usize = 64 * 1024;

/// What the emulated link looks like.
#[derive(Clone, Debug, Default)]
pub struct LinkSpec {
    /// Round-trip time; each direction adds half.
    pub rtt: Duration,
    /// Bandwidth of each direction; `None` for unlimited.
    pub bandwidth: Option<Rate>,
    /// Flip one byte per N bytes towards the client, on average (for corruption tests). Random
    /// rather than periodic, and by volume rather than per read: a fixed period resonates with
    /// a pipelined protocol's window, and read sizes depend on timing.
    pub corrupt_every: Option<u64>,
}

/// Bytes forwarded so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// From client to target.
    pub to_target: u64,
    /// From target to client.
    pub to_client: u64,
    /// Connections accepted.
    pub connections: u64,
}

struct Shared {
    spec: LinkSpec,
    up: AtomicBool,
    /// True while the link is blackholed: connections stay up and nothing crosses.
    blackhole: watch::Sender<bool>,
    conns: Mutex<Vec<AbortHandle>>,
    to_target: AtomicU64,
    to_client: AtomicU64,
    connections: AtomicU64,
    segments_to_client: AtomicU64,
    /// One serial link per direction, shared by every connection: [to target, to client].
    wires: [Wire; 2],
}

/// One direction of the link: when it is next free, and room for bytes on it and queued.
struct Wire {
    free_at: Mutex<Instant>,
    budget: Arc<Semaphore>,
    capacity: usize,
}

impl Wire {
    fn new(spec: &LinkSpec) -> Wire {
        let one_way = spec.rtt / 2;
        // Room for what is on the wire (bandwidth x delay) plus as much again of queue.
        let capacity = match spec.bandwidth {
            Some(bw) => ((bw.bytes_per_sec() as f64 * one_way.as_secs_f64() * 2.0) as usize)
                .max(4 * SEGMENT),
            None => 16 << 20,
        };
        Wire {
            free_at: Mutex::new(Instant::now()),
            budget: Arc::new(Semaphore::new(capacity)),
            capacity,
        }
    }

    /// Books `n` bytes on the wire; returns when they finish arriving at the far end.
    fn book(&self, n: usize, spec: &LinkSpec) -> Instant {
        let tx_time = spec.bandwidth.map_or(Duration::ZERO, |bw| {
            Duration::from_secs_f64(n as f64 / bw.bytes_per_sec() as f64)
        });
        let mut free = self.free_at.lock().unwrap_or_else(|p| p.into_inner());
        let start = (*free).max(Instant::now());
        *free = start + tx_time;
        *free + spec.rtt / 2
    }
}

/// A running link emulator. Dropping it stops it and cuts its connections.
pub struct Link {
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// One accept loop per route: the first (`start`) and any added with `add_route`.
    accept: Mutex<Vec<AbortHandle>>,
}

impl Link {
    /// Listens on `listen` and forwards every connection to `target` through the emulated link.
    pub async fn start(listen: &str, target: &str, spec: LinkSpec) -> io::Result<Link> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            up: AtomicBool::new(true),
            blackhole: watch::Sender::new(false),
            conns: Mutex::new(Vec::new()),
            to_target: AtomicU64::new(0),
            to_client: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            // Seeded per link: a fixed sequence would corrupt the same segments on every run.
            segments_to_client: AtomicU64::new(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64),
            ),
            wires: [Wire::new(&spec), Wire::new(&spec)],
            spec,
        });
        let accept = accept_loop(shared.clone(), listener, target.into());
        Ok(Link {
            addr,
            shared,
            accept: Mutex::new(vec![accept]),
        })
    }

    /// Listens on `listen` too and forwards its connections to `target` over the same link:
    /// the new route shares its bandwidth, delay, counters and cuts (two services at one site,
    /// e.g. a QEMU's NBD server and its migration port, behind one WAN). Returns its address.
    pub async fn add_route(&self, listen: &str, target: &str) -> io::Result<SocketAddr> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let task = accept_loop(self.shared.clone(), listener, target.into());
        self.accept
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(task);
        Ok(addr)
    }

    /// The address clients should dial.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops every connection now (a lost link); new connections are still accepted.
    pub fn cut(&self) {
        let conns =
            std::mem::take(&mut *self.shared.conns.lock().unwrap_or_else(|p| p.into_inner()));
        for c in conns {
            c.abort();
        }
    }

    /// Takes the link down (cutting all connections and refusing new ones) or brings it back.
    pub fn set_up(&self, up: bool) {
        self.shared.up.store(up, Ordering::SeqCst);
        if !up {
            self.cut();
        }
    }

    /// Blackholes the link (connections stay up, new ones are accepted, nothing crosses in
    /// either direction: what a dead route looks like to TCP) or lifts it; nothing is lost,
    /// what waited crosses once it is lifted.
    pub fn set_blackhole(&self, on: bool) {
        self.shared.blackhole.send_replace(on);
    }

    /// Bytes forwarded so far.
    pub fn stats(&self) -> LinkStats {
        LinkStats {
            to_target: self.shared.to_target.load(Ordering::Relaxed),
            to_client: self.shared.to_client.load(Ordering::Relaxed),
            connections: self.shared.connections.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        for a in self.accept.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            a.abort();
        }
        self.cut();
    }
}

/// Accepts connections on `listener` and forwards each to `target` through the link.
fn accept_loop(s: Arc<Shared>, listener: TcpListener, target: Arc<str>) -> AbortHandle {
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                // Out of descriptors or similar: back off rather than spin.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            if !s.up.load(Ordering::SeqCst) {
                drop(client);
                continue;
            }
            s.connections.fetch_add(1, Ordering::Relaxed);
            let task = tokio::spawn(forward(s.clone(), client, target.clone()));
            let mut conns = s.conns.lock().unwrap_or_else(|p| p.into_inner());
            conns.retain(|h| !h.is_finished());
            conns.push(task.abort_handle());
        }
    })
    .abort_handle()
}

/// A well-mixed hash of a counter (SplitMix64), for corruption that looks random.
fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

async fn forward(shared: Arc<Shared>, client: TcpStream, to: Arc<str>) {
    let Ok(target) = TcpStream::connect(&*to).await else {
        tracing::debug!(target = %to, "link: target unreachable, dropping client");
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = target.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (tr, tw) = target.into_split();
    let up = direction(shared.clone(), cr, tw, false);
    let down = direction(shared, tr, cw, true);
    tokio::join!(up, down);
}

async fn direction(
    shared: Arc<Shared>,
    mut rd: OwnedReadHalf,
    mut wr: OwnedWriteHalf,
    to_client: bool,
) {
    // Each queued segment holds its share of the wire's budget until it is written or dropped:
    // a connection that dies with segments queued cannot shrink the link for the others.
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>, OwnedSemaphorePermit)>();
    let reader = {
        let shared = shared.clone();
        async move {
            let wire = &shared.wires[usize::from(to_client)];
            let mut open = shared.blackhole.subscribe();
            loop {
                if open.wait_for(|hole| !*hole).await.is_err() {
                    break;
                }
                let mut buf = vec![0u8; SEGMENT];
                let n = match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                buf.truncate(n);
                // The queue is bounded: a sender that outruns the link waits here, as behind a
                // real bottleneck, and TCP pushes back on it.
                let permits = n.min(wire.capacity);
                let Ok(permit) = wire.budget.clone().acquire_many_owned(permits as u32).await
                else {
                    break;
                };
                let deliver = wire.book(n, &shared.spec);
                if to_client {
                    if let Some(every) = shared.spec.corrupt_every {
                        let roll = shared.segments_to_client.fetch_add(1, Ordering::Relaxed);
                        if splitmix(roll) % every.max(1) < n as u64 {
                            buf[n / 2] ^= 0x5a;
                            tracing::info!(
                                segment = roll,
                                bytes = n,
                                "link: corrupted one byte in flight"
                            );
                        }
                    }
                }
                if tx.send((deliver, buf, permit)).is_err() {
                    break;
                }
            }
        }
    };
    let writer = {
        let shared = shared.clone();
        async move {
            let mut open = shared.blackhole.subscribe();
            while let Some((deliver, buf, permit)) = rx.recv().await {
                tokio::time::sleep_until(deliver).await;
                if open.wait_for(|hole| !*hole).await.is_err() {
                    return;
                }
                let ok = wr.write_all(&buf).await.is_ok();
                drop(permit);
                if !ok {
                    // Dropping the receiver drops (and releases) what is still queued.
                    return;
                }
                let counter = if to_client {
                    &shared.to_client
                } else {
                    &shared.to_target
                };
                counter.fetch_add(buf.len() as u64, Ordering::Relaxed);
            }
            let _ = wr.shutdown().await;
        }
    };
    tokio::join!(reader, writer);
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn round_trip_takes_the_rtt() {
        let echo = echo_server().await;
        let link = Link::start(
            "127.0.0.1:0",
            &echo.to_string(),
            LinkSpec {
                rtt: Duration::from_millis(60),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let mut s = TcpStream::connect(link.local_addr()).await.unwrap();
        let start = std::time::Instant::now();
        s.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap();
        let ms = start.elapsed().as_millis();
        assert!((58..200).contains(&ms), "rtt {ms} ms");
    }

    #[tokio::test]
    async fn bandwidth_is_shaped() {
        let echo = echo_server().await;
        let spec = LinkSpec {
            rtt: Duration::from_millis(2),
            bandwidth: Some(Rate(4_000_000)),
            corrupt_every: None,
        };
        let link = Link::start("127.0.0.1:0", &echo.to_string(), spec)
            .await
            .unwrap();
        let s = TcpStream::connect(link.local_addr()).await.unwrap();
        let (mut r, mut w) = s.into_split();
        let start = std::time::Instant::now();
        let sender = tokio::spawn(async move {
            w.write_all(&vec![7u8; 2_000_000]).await.unwrap();
        });
        let mut got = vec![0u8; 2_000_000];
        r.read_exact(&mut got).await.unwrap();
        sender.await.unwrap();
        // 2 MB each way over 4 MB/s links in series: at least 0.5 s.
        let secs = start.elapsed().as_secs_f64();
        assert!((0.45..2.0).contains(&secs), "took {secs}s");
        assert_eq!(link.stats().to_target, 2_000_000);
    }

    #[tokio::test]
    async fn two_routes_share_one_link() {
        let (one, two) = (echo_server().await, echo_server().await);
        let spec = LinkSpec {
            rtt: Duration::from_millis(2),
            bandwidth: Some(Rate(4_000_000)),
            corrupt_every: None,
        };
        let link = Link::start("127.0.0.1:0", &one.to_string(), spec)
            .await
            .unwrap();
        let second = link
            .add_route("127.0.0.1:0", &two.to_string())
            .await
            .unwrap();
        let start = std::time::Instant::now();
        let echo_through = |addr: SocketAddr| async move {
            let s = TcpStream::connect(addr).await.unwrap();
            let (mut r, mut w) = s.into_split();
            let sender = tokio::spawn(async move {
                w.write_all(&vec![7u8; 1_000_000]).await.unwrap();
            });
            let mut got = vec![0u8; 1_000_000];
            r.read_exact(&mut got).await.unwrap();
            sender.await.unwrap();
        };
        tokio::join!(echo_through(link.local_addr()), echo_through(second));
        // 1 MB on each route, each way, over one 4 MB/s link: 2 MB per direction, at least
        // 0.5 s; two separate links would have taken half that.
        let secs = start.elapsed().as_secs_f64();
        assert!((0.45..2.0).contains(&secs), "took {secs}s");
        assert_eq!(link.stats().to_target, 2_000_000);
        assert_eq!(link.stats().connections, 2);
    }

    #[tokio::test]
    async fn cut_drops_live_connections_and_down_refuses_new() {
        let echo = echo_server().await;
        let link = Link::start("127.0.0.1:0", &echo.to_string(), LinkSpec::default())
            .await
            .unwrap();
        let mut s = TcpStream::connect(link.local_addr()).await.unwrap();
        s.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        link.set_up(false);
        let mut rest = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut rest)).await;
        assert!(
            matches!(r, Ok(Ok(0)) | Ok(Err(_))),
            "connection survived the cut: {r:?}"
        );
        let mut s2 = TcpStream::connect(link.local_addr()).await.unwrap();
        let _ = s2.write_all(b"y").await;
        let r2 = tokio::time::timeout(Duration::from_secs(2), s2.read(&mut b)).await;
        assert!(
            matches!(r2, Ok(Ok(0)) | Ok(Err(_))),
            "down link served a connection"
        );
    }

    /// A server that writes without end to whoever connects.
    async fn flood_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let block = vec![1u8; 64 << 10];
                    while s.write_all(&block).await.is_ok() {}
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn connections_that_die_with_queued_bytes_leave_the_link_whole() {
        let spec = LinkSpec {
            rtt: Duration::from_millis(20),
            bandwidth: Some(Rate(1_000_000)),
            corrupt_every: None,
        };
        let link = Link::start("127.0.0.1:0", &flood_server().await.to_string(), spec)
            .await
            .unwrap();
        // Each connection fills the shared queue, then dies: cut, or the client killed.
        for round in 0..6 {
            let mut s = TcpStream::connect(link.local_addr()).await.unwrap();
            let mut b = [0u8; 1];
            let first = tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut b)).await;
            assert!(
                first.is_ok(),
                "connection {round} gets no bytes: the dead ones kept the budget"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
            if round % 2 == 0 {
                link.cut();
            }
            drop(s);
        }
        let mut s = TcpStream::connect(link.local_addr()).await.unwrap();
        let mut b = vec![0u8; 100_000];
        let r = tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut b)).await;
        assert!(
            r.is_ok(),
            "a new connection gets no bytes: the dead ones kept the budget"
        );
    }

    #[tokio::test]
    async fn a_blackhole_holds_everything_and_loses_nothing() {
        let echo = echo_server().await;
        let link = Link::start("127.0.0.1:0", &echo.to_string(), LinkSpec::default())
            .await
            .unwrap();
        let mut s = TcpStream::connect(link.local_addr()).await.unwrap();
        link.set_blackhole(true);
        s.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        let held = tokio::time::timeout(Duration::from_millis(500), s.read_exact(&mut b)).await;
        assert!(held.is_err(), "bytes crossed a blackholed link");
        link.set_blackhole(false);
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b))
            .await
            .expect("the held bytes cross once the blackhole is lifted")
            .unwrap();
        assert_eq!(&b, b"ping");
    }
}
