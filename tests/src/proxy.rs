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
//! bytes forwarded from the target to the clients, so a test can cut while a large blob is in
//! flight.
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
    link: watch::Sender<Link>,
    forwarded_bytes: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
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
        let forwarded_bytes = Arc::new(AtomicU64::new(0));
        let counter = forwarded_bytes.clone();
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
            link,
            forwarded_bytes,
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
        self.link.send_replace(Link::Cut);
    }

    /// Keeps connections open but forwards nothing.
    pub fn blackhole(&self) {
        self.link.send_replace(Link::Blackhole);
    }

    /// Lets bytes flow again.
    pub fn restore(&self) {
        self.link.send_replace(Link::Open);
    }

    /// Bytes forwarded from the target to clients so far.
    pub fn forwarded_bytes(&self) -> u64 {
        self.forwarded_bytes.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.link.send_replace(Link::Shutdown);
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
    counter: Arc<AtomicU64>,
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
    counter: Arc<AtomicU64>,
) {
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let no_count = Arc::new(AtomicU64::new(0));
    let up = pump(client_read, server_write, link.clone(), no_count);
    let down = pump(server_read, client_write, link, counter);
    // Either direction ending (a close, an error, a cut) ends both: the sockets drop here.
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

/// Copies `from` to `to` while the link is open; holds while it is blackholed; returns when it
/// is cut, or at the end of `from`, or on an error.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut link: watch::Receiver<Link>,
    counter: Arc<AtomicU64>,
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
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        counter.fetch_add(n as u64, Ordering::Relaxed);
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
