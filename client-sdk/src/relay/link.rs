//! Peer-grid connections: one reader and one writer task per link, talking to the
//! engine over bounded channels; outgoing dials; the peer listener.
//!
//! A link's writer owns a bounded queue. The engine only ever `try_send`s into it, so a
//! slow receiver never blocks the engine or other links: when its queue is full, the
//! engine closes it (`GOODBYE(TOO_SLOW)` for a child). Chunks are queued as the shared
//! [`Chunk`] (reference-counted payload) and written as the prefix (28 bytes plus the
//! data plane's signature block) and the payload, without copying it: a relayed chunk
//! is byte-identical to the one received.
//!
//! Every chunk read on a link is verified by that link's reader (signature block and
//! SHA-256 of the payload, see [`crate::rights`]) before the engine sees it; a chunk
//! that fails becomes [`Ev::BadChunk`]. The listener checks the chunk token in every
//! peer's `HELLO` before answering it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use starling_proto::holder::{self, HolderKey, Verifier};
use starling_proto::integrity::IntegrityError;
use starling_proto::wire::{
    self, Chunk, ErrorCode, Frame, Limits, Reason, Role, StartAt, StreamInfo, Subscribe,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::AbortHandle;

use super::Ev;
use super::admission::{IpLimiter, IpPermit, Tickets};
use super::handshake::{PeerHandshake, Step, Us};
use super::listener_limits::{Handshakes, PeerLimits};
use crate::conn::{self, FrameReader, OpenParams, WireConn};
use crate::error::SdkError;
use crate::rights::{ChunkCheck, Grant};
use crate::shared::Shared;

/// Engine-local identity of one connection (never reused).
pub(crate) type LinkId = u64;

/// Frames queued per link. A child whose queue is full is closed as too slow.
pub(crate) const LINK_QUEUE: usize = 96;
/// Keep-alive: a link that has sent nothing this long sends a `PING` (the other side's
/// 15 s idle timeout then only fires on a dead connection). A `PING` is answered with a
/// `PONG` only by a side that has sent nothing this long either: anything it sent
/// already proves the link alive. (A child sends its parent nothing but these pings; at
/// 3 s with a `PONG` each they were a quarter of a grid's frames.)
const PING_EVERY: Duration = Duration::from_secs(5);
/// How long a refused handshake waits for the peer to read our `ERROR` and close
/// ([`WireConn::linger`]).
const REFUSAL_LINGER: Duration = Duration::from_millis(500);
/// Refused sockets lingering at once, at most (their connection slots are already
/// free: this bounds the sockets a refusal flood can hold).
const MAX_LINGERING: usize = 32;

/// What an accepted connection holds while it lives: a place under [`PeerLimits::max_incoming`]
/// and one under its address's cap.
#[derive(Debug)]
pub(crate) struct IncomingPermit {
    _slot: tokio::sync::OwnedSemaphorePermit,
    _ip: IpPermit,
}

/// Something to write on a link.
#[derive(Debug)]
pub(crate) enum Out {
    /// An encoded control frame.
    Frame(Bytes),
    /// A chunk: prefix, then the shared payload.
    Chunk(Chunk),
    /// Answer to the other side's `PING`, sent only if nothing else was for
    /// [`PING_EVERY`].
    Pong(u64),
}

/// The engine's handle on a link's writer.
#[derive(Debug)]
pub(crate) struct LinkHandle {
    tx: mpsc::Sender<Out>,
    kill: Option<oneshot::Sender<Frame>>,
    /// Incoming links: the reader's `CHUNK` limit (0 until the engine admits the link)
    /// and the limit to raise it to.
    chunk_gate: Option<(Arc<AtomicU32>, u32)>,
}

/// Why an item could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QueueError {
    Full,
    Closed,
}

impl LinkHandle {
    pub(crate) fn send(&self, out: Out) -> Result<(), QueueError> {
        self.tx.try_send(out).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => QueueError::Full,
            mpsc::error::TrySendError::Closed(_) => QueueError::Closed,
        })
    }

    /// Items queued and not yet taken by the writer (the one it is writing excluded).
    pub(crate) fn queued(&self) -> usize {
        self.tx.max_capacity().saturating_sub(self.tx.capacity())
    }

    pub(crate) fn send_frame(&self, f: &Frame) -> Result<(), QueueError> {
        match wire::encode_to_bytes(f) {
            Ok(b) => self.send(Out::Frame(b)),
            Err(e) => {
                tracing::warn!("cannot encode a frame: {e}");
                Ok(())
            }
        }
    }

    /// An incoming link was admitted: its reader accepts chunks (answers to our
    /// requests) from now on. Until then a `CHUNK` header of any length is
    /// `FRAME_TOO_LARGE`.
    pub(crate) fn allow_chunks(&self) {
        if let Some((limit, max)) = &self.chunk_gate {
            limit.store(*max, Ordering::Relaxed);
        }
    }

    /// Closes the link after writing `last` (an `ERROR` or `GOODBYE`); queued frames
    /// not yet written are dropped.
    pub(crate) fn close(mut self, last: Frame) {
        if let Some(k) = self.kill.take() {
            let _ = k.send(last);
        }
    }
}

pub(crate) fn reason(code: ErrorCode, message: &str) -> Reason {
    Reason {
        code,
        message: message.to_string(),
    }
}

/// Starts the reader and writer tasks of an established connection. `drained`, if
/// given, counts the chunk bytes (prefix and payload) the writer hands to the socket.
/// `gate`, if given, is the `CHUNK` limit the reader gets once
/// [`LinkHandle::allow_chunks`] is called; until then it reads no chunk at all.
#[allow(clippy::too_many_arguments)]
pub(crate) fn spawn_link(
    link: LinkId,
    conn: WireConn,
    events: mpsc::Sender<Ev>,
    idle: Duration,
    permit: Option<IncomingPermit>,
    shared: Arc<Shared>,
    drained: Option<Arc<AtomicU64>>,
    gate: Option<u32>,
) -> LinkHandle {
    let (mut reader, writer) = conn.into_split();
    let mut chunk_gate = None;
    if let Some(max) = gate {
        let limit = Arc::new(AtomicU32::new(0));
        reader = reader.with_chunk_limit(limit.clone());
        chunk_gate = Some((limit, max));
    }
    let (tx, rx) = mpsc::channel(LINK_QUEUE);
    let (kill_tx, kill_rx) = oneshot::channel();
    let r = tokio::spawn(read_loop(
        link,
        reader,
        events.clone(),
        tx.clone(),
        idle,
        permit,
        shared,
    ));
    tokio::spawn(write_loop(
        link,
        writer,
        rx,
        kill_rx,
        r.abort_handle(),
        events,
        drained,
    ));
    LinkHandle {
        tx,
        kill: Some(kill_tx),
        chunk_gate,
    }
}

async fn read_loop(
    link: LinkId,
    mut r: FrameReader,
    events: mpsc::Sender<Ev>,
    tx: mpsc::Sender<Out>,
    idle: Duration,
    _permit: Option<IncomingPermit>,
    shared: Arc<Shared>,
) {
    // One idle timer for the link's life, moved on only when it fires (re-arming a
    // timer per frame costs a timer-wheel insert and removal each).
    let mut last_frame = tokio::time::Instant::now();
    let idle_timer = tokio::time::sleep(idle);
    tokio::pin!(idle_timer);
    let reason = loop {
        let frame = tokio::select! {
            biased;
            f = r.next_frame() => {
                last_frame = tokio::time::Instant::now();
                f
            }
            () = &mut idle_timer => {
                let due = last_frame + idle;
                if tokio::time::Instant::now() < due {
                    idle_timer.as_mut().reset(due);
                    continue;
                }
                break SdkError::Timeout("waiting for a frame on a grid link");
            }
        };
        match frame {
            Ok(Frame::Chunk(mut c)) => {
                let ev = match shared.check_chunk(&c) {
                    ChunkCheck::Verified { flags } => {
                        // Stored and relayed with the signed flags.
                        c.flags = flags;
                        Ev::Frame {
                            link,
                            frame: Frame::Chunk(c),
                        }
                    }
                    ChunkCheck::Unverified => Ev::Frame {
                        link,
                        frame: Frame::Chunk(c),
                    },
                    // Dropped without blame (counted); a request for it times out
                    // and goes elsewhere.
                    ChunkCheck::Excused(_) => continue,
                    // Not a verdict yet: the engine refreshes the keys first.
                    ChunkCheck::Bad(IntegrityError::UnknownKeyId(_)) => {
                        Ev::UnknownKey { link, chunk: c }
                    }
                    ChunkCheck::Bad(error) => Ev::BadChunk {
                        link,
                        seq: c.seq,
                        len: c.payload.len() as u64,
                        error,
                    },
                };
                if events.send(ev).await.is_err() {
                    return;
                }
            }
            Err(e) => break e,
            Ok(Frame::Ping(n)) => {
                let _ = tx.try_send(Out::Pong(n));
            }
            Ok(Frame::Pong(_)) => {}
            Ok(frame) => {
                if events.send(Ev::Frame { link, frame }).await.is_err() {
                    return;
                }
            }
        }
    };
    let _ = events.send(Ev::LinkDown { link, reason }).await;
}

/// Writes one item; returns the chunk bytes written (0 for a control frame).
async fn write_out(w: &mut OwnedWriteHalf, out: &Out) -> std::io::Result<u64> {
    match out {
        Out::Frame(b) => w.write_all(b).await.map(|()| 0),
        Out::Pong(n) => {
            let b = wire::encode_to_bytes(&Frame::Pong(*n))
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            w.write_all(&b).await.map(|()| 0)
        }
        Out::Chunk(c) => {
            let prefix = wire::chunk_prefix_signed(
                c.seq,
                c.flags,
                c.timestamp_ms,
                c.duration_ms,
                &c.signature,
                c.payload.len(),
            )
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            let n = prefix.as_bytes().len() + c.payload.len();
            // One writev for header and payload (two writes cost two syscalls and two
            // loopback deliveries per chunk).
            let mut buf = bytes::Buf::chain(prefix.as_bytes(), &c.payload[..]);
            w.write_all_buf(&mut buf).await?;
            Ok(n as u64)
        }
    }
}

async fn write_loop(
    link: LinkId,
    mut w: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Out>,
    mut kill: oneshot::Receiver<Frame>,
    reader: AbortHandle,
    events: mpsc::Sender<Ev>,
    drained: Option<Arc<AtomicU64>>,
) {
    let normal = || Frame::Goodbye(reason(ErrorCode::Normal, "closing"));
    // Pings keep a silent link alive; one that carries frames needs none. One timer,
    // moved on only when it fires (re-arming it per write would cost a timer-wheel
    // insert and removal each).
    let ping = tokio::time::sleep(PING_EVERY);
    tokio::pin!(ping);
    let mut nonce = 0u64;
    let mut last_write = tokio::time::Instant::now();
    // `None`: the stream position is undefined (write failed or was cut): no goodbye.
    let last: Option<Frame> = loop {
        let out = tokio::select! {
            biased;
            k = &mut kill => break Some(k.unwrap_or_else(|_| normal())),
            m = rx.recv() => match m {
                Some(Out::Pong(_)) if last_write.elapsed() < PING_EVERY => continue,
                Some(out) => out,
                None => break Some(normal()),
            },
            () = &mut ping => {
                let due = last_write + PING_EVERY;
                let now = tokio::time::Instant::now();
                if now < due {
                    ping.as_mut().reset(due);
                    continue;
                }
                ping.as_mut().reset(now + PING_EVERY);
                nonce = nonce.wrapping_add(1);
                match wire::encode_to_bytes(&Frame::Ping(nonce)) {
                    Ok(b) => Out::Frame(b),
                    Err(_) => continue,
                }
            }
        };
        tokio::select! {
            biased;
            k = &mut kill => {
                // Cut in the middle of a frame: the peer will see a malformed stream
                // or EOF, which is what a kill means anyway.
                drop(k);
                break None;
            }
            r = write_out(&mut w, &out) => match r {
                Ok(n) => {
                    last_write = tokio::time::Instant::now();
                    if let Some(d) = &drained
                        && n > 0
                    {
                        d.fetch_add(n, Ordering::Relaxed);
                    }
                }
                Err(_) => break None,
            },
        }
    };
    if let Some(f) = last
        && let Ok(b) = wire::encode_to_bytes(&f)
    {
        let _ = tokio::time::timeout(Duration::from_millis(500), w.write_all(&b)).await;
    }
    let _ = tokio::time::timeout(Duration::from_millis(500), w.shutdown()).await;
    reader.abort();
    let _ = events.try_send(Ev::LinkDown {
        link,
        reason: SdkError::Closed,
    });
}

/// Everything needed to dial a link.
#[derive(Debug, Clone)]
pub(crate) struct Dial {
    pub addr: String,
    pub token: Bytes,
    pub broadcast_id: String,
    pub start: StartAt,
    pub limits: Limits,
    pub timeout: Duration,
    pub idle: Duration,
    pub role: Role,
    pub mask: u64,
    /// Parent tickets for the substreams of `mask` (sent before `SUBSCRIBE`).
    pub tickets: Vec<Bytes>,
    /// The key our token names (a `PROOF` follows `HELLO_ACK`).
    pub holder: Option<Arc<HolderKey>>,
    /// Who `addr` is, as the proof names it.
    pub verifier: Verifier,
    /// Dial by hole punching from our listener's address ([`crate::punch`]).
    pub punch_from: Option<(std::net::SocketAddr, Arc<crate::punch::Rendezvous>)>,
}

/// Connects, handshakes and reports `Connected` or `ConnectFailed`.
pub(crate) async fn dial(link: LinkId, d: Dial, events: mpsc::Sender<Ev>, shared: Arc<Shared>) {
    let started = std::time::Instant::now();
    let r = conn::open(OpenParams {
        addr: &d.addr,
        token: &d.token,
        broadcast_id: &d.broadcast_id,
        start: d.start,
        limits: d.limits,
        timeout: d.timeout,
        role: d.role,
        mask: d.mask,
        tickets: &d.tickets,
        holder: d.holder.as_deref(),
        verifier: d.verifier,
        punch_from: d.punch_from.as_ref().map(|(a, r)| (*a, &**r)),
    })
    .await;
    if d.role == Role::Peer {
        let mut s = shared.stats_mut();
        match &r {
            Ok(_) if d.punch_from.is_some() => s.punched_links += 1,
            Ok(_) => {}
            Err(e) => {
                s.peer_dials_failed += 1;
                // How long we waited on a peer we could not reach at all.
                if matches!(e, SdkError::Connect { .. }) {
                    s.peer_dial_fail_max = s.peer_dial_fail_max.max(started.elapsed());
                }
            }
        }
    }
    let ev = match r {
        Ok(c) if c.info.broadcast_id != d.broadcast_id => Ev::ConnectFailed {
            link,
            err: SdkError::Protocol(format!(
                "{} serves broadcast {:?}, not {:?}",
                d.addr, c.info.broadcast_id, d.broadcast_id
            )),
        },
        Ok(c) => {
            let info = c.info.clone();
            let version = c.version;
            let handle = spawn_link(link, c, events.clone(), d.idle, None, shared, None, None);
            Ev::Connected {
                link,
                handle,
                info,
                version,
            }
        }
        Err(err) => Ev::ConnectFailed { link, err },
    };
    let _ = events.send(ev).await;
}

/// Shared by the listener's handshake tasks.
#[derive(Clone)]
pub(crate) struct AcceptCtx {
    pub shared: Arc<crate::shared::Shared>,
    pub limits: Limits,
    pub peer: PeerLimits,
    pub idle: Duration,
    pub events: mpsc::Sender<Ev>,
    pub ids: Arc<AtomicU64>,
    /// Chunk bytes written on accepted links (children and neighbours we serve).
    pub drained: Arc<AtomicU64>,
    /// Connections per source address.
    pub per_ip: Arc<IpLimiter>,
    /// Silent connections from a parent we punch towards go to our dial.
    pub rendezvous: Arc<crate::punch::Rendezvous>,
}

/// Accepts peer connections until the task is aborted.
pub(crate) async fn listen(
    listener: TcpListener,
    mut punched: Option<mpsc::Receiver<(tokio::net::TcpStream, std::net::SocketAddr)>>,
    ctx: AcceptCtx,
) {
    let slots = Arc::new(Semaphore::new(ctx.peer.max_incoming));
    let handshakes = Arc::new(Mutex::new(Handshakes::new(ctx.peer.max_handshakes)));
    let lingering = Arc::new(Semaphore::new(MAX_LINGERING));
    let mut stop = ctx.shared.stop_signal();
    loop {
        let r = tokio::select! {
            _ = crate::shared::stopped(&mut stop) => return,
            r = listener.accept() => r,
            // A link our punch towards a child opened: handled as accepted.
            Some(p) = async {
                match punched.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                ctx.shared.stats_mut().punched_links += 1;
                Ok(p)
            }
        };
        let (stream, addr) = match r {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("peer listener accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%addr, "too many peer connections: refused");
            ctx.shared.stats_mut().peer_connections_refused += 1;
            if let Ok(b) = wire::encode_to_bytes(&Frame::Error(reason(
                ErrorCode::ServerBusy,
                "too many peer connections",
            ))) {
                // Best effort, never waiting: the socket's buffer is empty.
                let _ = stream.try_write(&b);
            }
            drop(stream);
            continue;
        };
        let Some(ip) = ctx.per_ip.try_acquire(addr.ip()) else {
            tracing::info!(%addr, "too many peer connections from this address: refused");
            ctx.shared.stats_mut().peers_refused += 1;
            // Best effort, without waiting: the socket's buffer is empty.
            let busy = Frame::Error(reason(
                ErrorCode::ServerBusy,
                "too many connections from your address",
            ));
            if let Ok(b) = wire::encode_to_bytes(&busy) {
                let _ = stream.try_write(&b);
            }
            drop(stream);
            continue;
        };
        let permit = IncomingPermit {
            _slot: slot,
            _ip: ip,
        };
        let (hs, evicted, evicted_count) = handshakes.lock().start();
        if evicted_count > 0 {
            tracing::debug!(%addr, evicted_count, "too many peer handshakes: evicted the oldest");
            ctx.shared.stats_mut().peer_connections_refused += evicted_count as u64;
        }
        let ctx = ctx.clone();
        let handshakes = handshakes.clone();
        let lingering = lingering.clone();
        tokio::spawn(async move {
            // Until admitted, a peer can make us buffer control frames only.
            let before = Limits {
                max_chunk_payload: 0,
                ..ctx.limits
            };
            // A peer that connected to us sends HELLO at once; a punch-only parent whose
            // own dial reached us sends nothing and waits for ours: while nothing
            // arrived, a dial of ours towards it claims the connection.
            let claimed = tokio::time::timeout(ctx.peer.handshake_timeout, async {
                // `peek`, not `readable`: the latter may report a fresh socket readable
                // with nothing to read.
                let mut first = [0u8; 1];
                tokio::select! {
                    _ = stream.peek(&mut first) => None,
                    tx = ctx.rendezvous.claim(addr) => Some(tx),
                }
            })
            .await
            .ok()
            .flatten();
            tracing::trace!(%addr, claimed = claimed.is_some(), "incoming peer connection");
            if let Some(tx) = claimed {
                handshakes.lock().finish(hs);
                tracing::debug!(%addr, "a punching parent's connection handed to our dial");
                let _ = tx.send(stream);
                return;
            }
            let mut conn = WireConn::accepted(stream, before, addr.to_string());
            let outcome = tokio::select! {
                r = tokio::time::timeout(ctx.peer.handshake_timeout, handshake(&mut conn, &ctx)) => r.ok(),
                _ = evicted => Some(Err(SdkError::Server {
                    code: ErrorCode::ServerBusy,
                    message: "too many peer handshakes".into(),
                })),
            };
            handshakes.lock().finish(hs);
            let last = match outcome {
                Some(Ok((sub, grant, tickets))) => {
                    let link = ctx.ids.fetch_add(1, Ordering::Relaxed);
                    let handle = spawn_link(
                        link,
                        conn,
                        ctx.events.clone(),
                        ctx.idle,
                        Some(permit),
                        ctx.shared.clone(),
                        Some(ctx.drained.clone()),
                        Some(ctx.limits.max_chunk_payload),
                    );
                    let _ = ctx
                        .events
                        .send(Ev::Incoming {
                            link,
                            sub,
                            handle,
                            addr: addr.to_string(),
                            grant,
                            tickets,
                        })
                        .await;
                    return;
                }
                // Refused by `handshake`, which said why.
                Some(Err(SdkError::Protocol(e))) => {
                    tracing::debug!(%addr, "peer handshake refused: {e}");
                    None
                }
                Some(Err(SdkError::Wire(e))) => {
                    tracing::info!(%addr, "peer handshake: {e}; closing");
                    Some(reason(e.code(), &e.to_string()))
                }
                Some(Err(SdkError::Server { code, message })) => {
                    tracing::debug!(%addr, "peer handshake cancelled: {message}");
                    Some(reason(code, &message))
                }
                Some(Err(e)) => {
                    tracing::debug!(%addr, "peer handshake failed: {e}");
                    None
                }
                None => {
                    tracing::info!(%addr, "peer handshake timed out; closing");
                    Some(reason(ErrorCode::IdleTimeout, "handshake timed out"))
                }
            };
            if let Some(r) = last {
                let _ =
                    tokio::time::timeout(Duration::from_millis(500), conn.send(&Frame::Error(r)))
                        .await;
            }
            // Every refusal has written its ERROR by now: free the slot, then let the
            // peer read the refusal (a few lingering sockets at most; beyond them, the
            // socket is dropped at once as before).
            drop(permit);
            if let Ok(_lingering) = lingering.try_acquire_owned() {
                conn.linger(REFUSAL_LINGER).await;
            }
        });
    }
}

/// Runs the handshake ([`super::handshake`]) on an accepted link. Refusals are sent
/// as `ERROR` before failing (as [`SdkError::Protocol`]): `UNAUTHORIZED` for a missing,
/// invalid or expired token or ticket, `REVOKED` for a revoked peer. Decoding errors
/// are returned as they are (the caller answers them).
async fn handshake(
    conn: &mut WireConn,
    ctx: &AcceptCtx,
) -> Result<(Subscribe, Grant, Option<Tickets>), SdkError> {
    let mut hs =
        PeerHandshake::new(holder::new_nonce().map_err(|e| SdkError::Protocol(e.to_string()))?);
    loop {
        let frame = conn.next_frame().await?;
        let me = ctx.shared.stats_mut().peer_id;
        let us = Us {
            rights: &ctx.shared.rights,
            me,
            broadcast_id: &ctx.shared.broadcast_id,
        };
        match hs.on_frame(frame, us, ctx.shared.rights.now_ms()) {
            Step::Send(f) => conn.send(&f).await?,
            Step::Read => {}
            Step::Refuse { refusal, counted } => {
                if counted {
                    ctx.shared.stats_mut().peers_refused += 1;
                    tracing::info!(addr = conn.addr, code = ?refusal.code, "peer refused: {}", refusal.message);
                }
                let _ = conn
                    .send(&Frame::Error(reason(refusal.code, &refusal.message)))
                    .await;
                return Err(SdkError::Protocol(refusal.message));
            }
            Step::Done {
                sub,
                grant,
                tickets,
            } => return Ok((sub, grant, tickets)),
        }
    }
}

/// `STREAM_INFO` for an accepted link.
pub(crate) fn stream_info(
    broadcast_id: &str,
    content_type: &str,
    chunk_duration_ms: u32,
    substreams: u16,
    first_seq: u64,
    live_seq: u64,
) -> Frame {
    Frame::StreamInfo(StreamInfo {
        broadcast_id: broadcast_id.to_string(),
        content_type: content_type.chars().take(255).collect(),
        chunk_duration_ms,
        substreams,
        first_seq,
        live_seq,
    })
}
