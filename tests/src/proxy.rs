//! A fault proxy in user space: a TCP forwarder on loopback between a standby and its primary,
//! which a test can cut, blackhole and restore (`tc netem` is not available here).
//!
//! [`FaultProxy::start`] listens on `127.0.0.1:0` and forwards every accepted connection to the
//! target, both ways, in chunks of at most [`CHUNK_BYTES_MAX`]. Its [`Link`] state is a
//! `tokio::sync::watch` that every connection task follows:
//! * [`Link::Open`] — bytes flow.
//! * [`Link::Cut`] ([`FaultProxy::cut`]) — every connection is closed at once (both sockets
//!   dropped) and new ones are accepted and closed at once: a broken link, seen as a reset.
//! * [`Link::Blackhole`] ([`FaultProxy::blackhole`]) — connections stay open but nothing is
//!   forwarded either way, and new connections are accepted and left silent: a partition, which
//!   only the endpoints' keepalives can detect.
//!
//! [`FaultProxy::restore`] opens the link again. [`FaultProxy::forwarded_bytes`] counts the
//! bytes forwarded from the target to the clients, and [`FaultProxy::cut_after`] arms a cut at
//! a byte count, taken by the forwarding task itself the moment it is reached: so a test cuts
//! while a large blob is in flight, not after it went through.
//!
//! The proxy runs on a tokio runtime of its own, on a thread it owns: [`Drop`] cuts every
//! connection, stops the accept loop and joins the thread.
//!
//! Implementation caveats: one target; no latency or reordering injection (the issue asks for
//! cuts and partitions only).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The largest chunk forwarded in one write.
pub const CHUNK_BYTES_MAX: usize = 64 * 1024;

/// The state of the link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// Bytes flow.
    Open,
    /// Connections are closed and refused.
    Cut,
    /// Connections stay open, nothing flows.
    Blackhole,
    /// The proxy is being dropped.
    Shutdown,
}

/// A running fault proxy; see the module docs.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// What the proxy's handle and its tasks share.
struct Shared {
    link: watch::Sender<Link>,
    /// Bytes forwarded from the target to clients.
    forwarded_bytes: AtomicU64,
    /// The count of forwarded bytes at which the downstream task cuts the link (`u64::MAX`:
    /// none armed).
    cut_at_bytes: AtomicU64,
}

impl Shared {
    /// How many of `n` bytes may go before an armed cut.
    fn allowed(&self, n: usize) -> usize {
        let cut_at = self.cut_at_bytes.load(Ordering::Relaxed);
        let left = cut_at.saturating_sub(self.forwarded_bytes.load(Ordering::Relaxed));
        n.min(usize::try_from(left).unwrap_or(usize::MAX))
    }

    /// Counts `n` forwarded bytes; takes an armed cut whose count is reached.
    fn forwarded(&self, n: usize) {
        let total = self.forwarded_bytes.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        if total >= self.cut_at_bytes.load(Ordering::Relaxed) {
            self.cut_at_bytes.store(u64::MAX, Ordering::Relaxed);
            self.link.send_replace(Link::Cut);
        }
    }
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `target` (a loopback address).
    pub fn start(target: SocketAddr) -> FaultProxy {
        assert!(
            target.ip().is_loopback(),
            "the proxy forwards on loopback only"
        );
        let std_listener =
            std::net::TcpListener::bind("127.0.0.1:0").expect("bind the proxy on loopback");
        std_listener
            .set_nonblocking(true)
            .expect("make the proxy's listener non-blocking");
        let addr = std_listener.local_addr().expect("the proxy's address");
        let (link, watching) = watch::channel(Link::Open);
        let shared = Arc::new(Shared {
            link,
            forwarded_bytes: AtomicU64::new(0),
            cut_at_bytes: AtomicU64::new(u64::MAX),
        });
        let counter = shared.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("build the proxy's runtime");
            runtime.block_on(async move {
                let listener = TcpListener::from_std(std_listener).expect("proxy listener");
                accept_loop(listener, target, watching, counter).await;
            });
        });
        FaultProxy {
            addr,
            shared,
            thread: Some(thread),
        }
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR` of the proxy.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Closes every connection and refuses new ones.
    pub fn cut(&self) {
        self.shared.link.send_replace(Link::Cut);
    }

    /// Arms a cut taken once `bytes` more bytes have gone from the target to the clients.
    pub fn cut_after(&self, bytes: u64) {
        let at = self.forwarded_bytes().saturating_add(bytes);
        self.shared.cut_at_bytes.store(at, Ordering::Relaxed);
    }

    /// The current state of the link.
    pub fn link(&self) -> Link {
        *self.shared.link.borrow()
    }

    /// Keeps connections open but forwards nothing.
    pub fn blackhole(&self) {
        self.shared.link.send_replace(Link::Blackhole);
    }

    /// Lets bytes flow again.
    pub fn restore(&self) {
        self.shared.link.send_replace(Link::Open);
    }

    /// Bytes forwarded from the target to clients so far.
    pub fn forwarded_bytes(&self) -> u64 {
        self.shared.forwarded_bytes.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.link.send_replace(Link::Shutdown);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Accepts until shutdown; each connection is served by a task this loop owns (a `JoinSet`,
/// aborted when the loop ends).
async fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    mut link: watch::Receiver<Link>,
    counter: Arc<Shared>,
) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else { continue };
                if *link.borrow() == Link::Cut {
                    drop(client);
                    continue;
                }
                connections.spawn(serve(client, target, link.clone(), counter.clone()));
            }
            changed = link.changed() => {
                if changed.is_err() || *link.borrow() == Link::Shutdown {
                    break;
                }
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    connections.shutdown().await;
}

/// Forwards one connection both ways until either side closes or the link is cut.
async fn serve(
    client: TcpStream,
    target: SocketAddr,
    link: watch::Receiver<Link>,
    counter: Arc<Shared>,
) {
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let up = pump(client_read, server_write, link.clone(), None);
    let down = pump(server_read, client_write, link, Some(counter));
    // Either direction ending (a close, an error, a cut) ends both: the sockets drop here.
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

/// Copies `from` to `to` (counting into `counter`, downstream) while the link is open; holds while it is blackholed; returns when it
/// is cut, or at the end of `from`, or on an error.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut link: watch::Receiver<Link>,
    counter: Option<Arc<Shared>>,
) {
    let mut buf = vec![0u8; CHUNK_BYTES_MAX];
    loop {
        if !wait_open(&mut link).await {
            return;
        }
        let read = tokio::select! {
            read = from.read(&mut buf) => read,
            _ = link.changed() => continue,
        };
        let n = match read {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Bytes read while the link was open but blackholed or cut since are held or dropped.
        if !wait_open(&mut link).await {
            return;
        }
        // An armed cut is taken mid-chunk, at its exact byte.
        let n = counter.as_ref().map_or(n, |c| c.allowed(n));
        // Counted before the write, so that a client that got the bytes sees them counted;
        // a cut this takes still lets this chunk through, and ends the loop next time round.
        if let Some(counter) = &counter {
            counter.forwarded(n);
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Waits while the link is blackholed; true when it is open, false when cut or shut down.
async fn wait_open(link: &mut watch::Receiver<Link>) -> bool {
    loop {
        let state = *link.borrow_and_update();
        match state {
            Link::Open => return true,
            Link::Cut | Link::Shutdown => return false,
            Link::Blackhole => {
                if link.changed().await.is_err() {
                    return false;
                }
            }
        }
    }
}
