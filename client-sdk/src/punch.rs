//! TCP hole punching (docs/PROTOCOL.md, "Hole punching"): one local port for the peer
//! listener, the control-plane connection and every punched link, so that a router that
//! keeps ports (an endpoint-independent mapping) shows the same public port to everyone.
//!
//! * The peer listener and every socket that must leave from its port are bound with
//!   `SO_REUSEADDR` and `SO_REUSEPORT` ([`reusable_socket`]).
//! * The control-plane channel connects from that port ([`BoundConnector`]): the control
//!   plane then observes the viewer's server-reflexive address *of the listener's port*
//!   and, when that port equals the listener's own (`JoinRequest.host_addr`), knows that
//!   the router keeps ports.
//! * A child dials a punch-only parent from that port again and again for
//!   [`PUNCH_WINDOW`] ([`connect_from`]); the parent, told by the control plane at the
//!   same moment (`SessionDown.punch`), dials the child from its own listener's port
//!   ([`Puncher`]). Each side's SYN opens its own router for the other's: the link opens
//!   by TCP simultaneous open, or as an ordinary accept once the parent's router is
//!   open. A link the parent's dial opened is handed to its peer listener as if accepted.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use tokio::sync::{Notify, Semaphore, mpsc, oneshot};
use tokio::time::Instant;
use tonic::codegen::http::Uri;

/// How long a child keeps dialling a parent reachable only by hole punching before it
/// gives up, re-parents and reports the parent unreachable.
pub(crate) const PUNCH_WINDOW: Duration = Duration::from_millis(1500);
/// One connection attempt: a SYN the other router dropped is not retransmitted by the
/// kernel for a second, so a fresh attempt goes out sooner.
const ATTEMPT: Duration = Duration::from_millis(400);
/// Pause after an attempt that failed at once (refused, unreachable).
const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// How long a parent's own dial towards a child may take: long enough for two kernel
/// SYN retransmissions (1 s, 3 s). Its router stays open for the child long after.
const PARENT_DIAL: Duration = Duration::from_secs(4);
/// Parent-side punches in flight at once; more children wait for a free one.
const MAX_PUNCHES: usize = 16;
/// Punched connections waiting for the peer listener to take them.
pub(crate) const PUNCHED_QUEUE: usize = 16;

/// A TCP socket bound to `local` with `SO_REUSEADDR` and (on Unix) `SO_REUSEPORT`, so
/// that the peer listener, the control-plane connection and punched links share one
/// port.
pub(crate) fn reusable_socket(local: SocketAddr) -> io::Result<TcpSocket> {
    let s = if local.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    s.set_reuseaddr(true)?;
    #[cfg(all(
        unix,
        not(any(target_os = "solaris", target_os = "illumos", target_os = "cygwin"))
    ))]
    s.set_reuseport(true)?;
    s.bind(local)?;
    Ok(s)
}

/// The peer listener, bound so that connections can leave from its port.
pub(crate) fn bind_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    reusable_socket(addr)?.listen(1024)
}

/// Connections that open "the wrong way round": a punch-only parent's own dial towards
/// us reaches our peer listener (we have no NAT, or a port mapping) instead of our
/// dialling socket. The listener hands a silent incoming connection from an address we
/// are punching towards to that dial ([`Rendezvous::claim`]), which then speaks as the
/// connecting side on it; the parent treats its dial's connection as accepted either
/// way. One per viewer, shared by its listener and its dials.
#[derive(Debug, Default)]
pub(crate) struct Rendezvous {
    waiting: parking_lot::Mutex<HashMap<SocketAddr, oneshot::Sender<TcpStream>>>,
    registered: Notify,
}

impl Rendezvous {
    /// Waits until a dial towards `addr` is under way, then returns where to hand the
    /// connection (the caller has a connection from `addr` that sent nothing yet).
    pub(crate) async fn claim(&self, addr: SocketAddr) -> oneshot::Sender<TcpStream> {
        loop {
            let registered = self.registered.notified();
            tokio::pin!(registered);
            registered.as_mut().enable();
            if let Some(tx) = self.waiting.lock().remove(&addr) {
                return tx;
            }
            registered.await;
        }
    }

    fn register(&self, addr: SocketAddr) -> oneshot::Receiver<TcpStream> {
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().insert(addr, tx);
        self.registered.notify_waiters();
        rx
    }

    fn forget(&self, addr: SocketAddr) {
        self.waiting.lock().remove(&addr);
    }
}

/// Connects to `remote` from `local` (the peer listener's address), again and again
/// until one attempt opens, the peer listener hands over a connection from `remote`
/// ([`Rendezvous`]), or `window` is over; the last error otherwise.
pub(crate) async fn connect_from(
    local: SocketAddr,
    remote: SocketAddr,
    window: Duration,
    rendezvous: &Rendezvous,
) -> io::Result<TcpStream> {
    if local.is_ipv4() != remote.is_ipv4() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("cannot punch from {local} to {remote}: address families differ"),
        ));
    }
    let mut handed = rendezvous.register(remote);
    tracing::trace!(%local, %remote, "punch: dialling");
    let r = tokio::select! {
        r = attempts(local, remote, window) => r,
        Ok(s) = &mut handed => Ok(s),
    };
    rendezvous.forget(remote);
    tracing::trace!(%remote, ok = r.is_ok(), "punch: dial over");
    // A connection the listener handed over while the last attempt failed.
    let s = match (r, handed.try_recv()) {
        (Ok(s), _) | (Err(_), Ok(s)) => s,
        (Err(e), Err(_)) => return Err(e),
    };
    // Closed with a reset, not a FIN: no TIME_WAIT on our side, which would block the
    // same two ports for a minute should the control plane pair us again (the link
    // ends with GOODBYE first anyway).
    #[allow(deprecated)] // a zero linger resets at once: nothing blocks on drop
    let _ = s.set_linger(Some(Duration::ZERO));
    Ok(s)
}

async fn attempts(
    local: SocketAddr,
    remote: SocketAddr,
    window: Duration,
) -> io::Result<TcpStream> {
    let deadline = Instant::now() + window;
    let mut last = io::Error::new(io::ErrorKind::TimedOut, "hole punching timed out");
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(last);
        }
        let socket = reusable_socket(local)?;
        match tokio::time::timeout(ATTEMPT.min(left), socket.connect(remote)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Ok(Err(e)) => {
                // `AddrNotAvailable`: the 4-tuple is taken, by the parent's own dial
                // that our listener accepted: it is handed over through the rendezvous.
                last = e;
                tokio::time::sleep(RETRY_PAUSE.min(left)).await;
            }
            Err(_) => {
                last = io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer from {remote} within {} ms", window.as_millis()),
                );
            }
        }
    }
}

/// A parent's side of hole punching: dials each child the control plane names, from
/// the peer listener's port, and hands a connection that opens to the listener.
#[derive(Clone)]
pub(crate) struct Puncher {
    local: SocketAddr,
    punched: mpsc::Sender<(TcpStream, SocketAddr)>,
    permits: Arc<Semaphore>,
}

impl Puncher {
    /// A puncher for the listener at `local`, whose accept loop takes `punched`.
    pub(crate) fn new(local: SocketAddr, punched: mpsc::Sender<(TcpStream, SocketAddr)>) -> Self {
        Puncher {
            local,
            punched,
            permits: Arc::new(Semaphore::new(MAX_PUNCHES)),
        }
    }

    /// Dials `child` in the background (a malformed address is logged and skipped).
    pub(crate) fn punch(&self, child: &str) {
        let Ok(remote) = child.parse::<SocketAddr>() else {
            tracing::info!(child, "punch: not an ip:port address, skipped");
            return;
        };
        let me = self.clone();
        tokio::spawn(async move {
            let Ok(_permit) = me.permits.clone().acquire_owned().await else {
                return;
            };
            let socket = match reusable_socket(me.local) {
                Ok(s) => s,
                Err(e) => {
                    tracing::info!(%remote, "punch: cannot bind the listener's port: {e}");
                    return;
                }
            };
            // One attempt, retransmitted by the kernel: its first SYN opens our router
            // for the child; if the child's SYN meets it, the link opens here.
            match tokio::time::timeout(PARENT_DIAL, socket.connect(remote)).await {
                Ok(Ok(stream)) => {
                    tracing::debug!(%remote, "punch: link to a child opened by simultaneous open");
                    let _ = stream.set_nodelay(true);
                    let _ = me.punched.send((stream, remote)).await;
                }
                Ok(Err(e)) => {
                    tracing::debug!(%remote, "punch: {e} (the child may come in through the listener)")
                }
                Err(_) => {
                    tracing::debug!(%remote, "punch: no answer (the child may come in through the listener)")
                }
            }
        });
    }
}

/// Connects the control-plane channel from `local` (the peer listener's address), so
/// that the control plane observes the listener port's public mapping. If that fails
/// (the port's 4-tuple towards the control plane still in `TIME_WAIT` after a
/// reconnect, say), it connects from an ephemeral port as usual.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BoundConnector {
    pub local: SocketAddr,
}

impl tower_service::Service<Uri> for BoundConnector {
    type Response = TokioIo<TcpStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let local = self.local;
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no host in URL"))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
                Some("https") => 443,
                _ => 80,
            });
            let mut last = io::Error::new(io::ErrorKind::NotFound, "no address for host");
            for remote in tokio::net::lookup_host((host.as_str(), port)).await? {
                let bound = if remote.is_ipv4() == local.is_ipv4() {
                    match reusable_socket(local) {
                        Ok(s) => s.connect(remote).await.ok(),
                        Err(_) => None,
                    }
                } else {
                    None
                };
                let stream = match bound {
                    Some(s) => Ok(s),
                    None => TcpStream::connect(remote).await,
                };
                match stream {
                    Ok(s) => {
                        let _ = s.set_nodelay(true);
                        return Ok(TokioIo::new(s));
                    }
                    Err(e) => last = e,
                }
            }
            Err(last)
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A listener and an outgoing connection share one port: the far end sees the
    /// listener's port as the source.
    #[tokio::test]
    async fn a_connection_leaves_from_the_listeners_port() {
        let l = bind_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let local = l.local_addr().unwrap();
        let far = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let far_addr = far.local_addr().unwrap();
        let rv = Rendezvous::default();
        let (out, accepted) = tokio::join!(
            connect_from(local, far_addr, Duration::from_secs(10), &rv),
            far.accept()
        );
        out.unwrap();
        assert_eq!(accepted.unwrap().1, local);
        // The listener still accepts.
        let (c, a) = tokio::join!(TcpStream::connect(local), l.accept());
        c.unwrap();
        a.unwrap();
    }

    /// Two sockets dialling each other's listener port at once open one connection
    /// (TCP simultaneous open), or one side's listener takes it.
    #[tokio::test]
    async fn both_sides_dialling_at_once_open_a_link() {
        let la = bind_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let lb = bind_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let (a, b) = (la.local_addr().unwrap(), lb.local_addr().unwrap());
        let (tx, mut rx) = mpsc::channel(4);
        Puncher::new(b, tx).punch(&a.to_string());
        let child = connect_from(a, b, Duration::from_secs(10), &Rendezvous::default())
            .await
            .unwrap();
        assert_eq!(child.peer_addr().unwrap(), b);
        // The parent's side: its own dial opened (simultaneous open), or its listener
        // accepted the child's.
        let parent_side = tokio::select! {
            Some(p) = rx.recv() => p.1,
            acc = lb.accept() => acc.unwrap().1,
        };
        assert_eq!(parent_side, a);
    }

    /// Nobody answering: the dial gives up after its window with an error.
    #[tokio::test]
    async fn an_unanswered_punch_gives_up() {
        let l = bind_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let gone = {
            let t = TcpListener::bind("127.0.0.1:0").await.unwrap();
            t.local_addr().unwrap()
        };
        let r = connect_from(
            l.local_addr().unwrap(),
            gone,
            Duration::from_millis(300),
            &Rendezvous::default(),
        )
        .await;
        assert!(r.is_err());
    }

    /// The parent's dial reached the child's listener first (no NAT in front of the
    /// child): the listener hands that connection to the child's dial, which uses it.
    #[tokio::test]
    async fn a_parents_dial_that_reached_our_listener_is_handed_to_our_dial() {
        let child_l = bind_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let parent_l = bind_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let (c, p) = (
            child_l.local_addr().unwrap(),
            parent_l.local_addr().unwrap(),
        );
        let rv = Arc::new(Rendezvous::default());
        // The parent dials the child: the child's listener accepts it.
        let parent_side = reusable_socket(p).unwrap().connect(c).await.unwrap();
        let (accepted, from) = child_l.accept().await.unwrap();
        assert_eq!(from, p);
        let listener_side = {
            let rv = rv.clone();
            tokio::spawn(async move {
                let tx = rv.claim(from).await;
                tx.send(accepted).is_ok()
            })
        };
        // The child's dial towards the parent: its own attempts cannot open (the
        // 4-tuple is taken), the listener hands the connection over.
        let got = connect_from(c, p, Duration::from_secs(10), &rv)
            .await
            .unwrap();
        assert!(listener_side.await.unwrap());
        assert_eq!(got.peer_addr().unwrap(), p);
        assert_eq!(got.local_addr().unwrap(), parent_side.peer_addr().unwrap());
    }
}
