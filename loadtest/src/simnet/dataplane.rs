//! Real data-plane traffic for the fabric's viewers: one wire connection (TCP) per
//! viewer to the data plane its `Join` named, authenticated with its chunk token
//! (`HELLO`, renewed with `TOKEN`), subscribed to the substreams the grid gives to the
//! server (`SUBSCRIBE`, replaced when they change), carrying its last-resort
//! `REQUEST`s. Every chunk is verified as a device does (the data plane's signature,
//! with the process's shared [`VerifiedSignatures`] cache) before it reaches the node,
//! with the chunk keys the session last received (`Join`'s, then each key set the
//! session stream pushes, [`DpCmd::Keys`]). A chunk signed with a key id not held is
//! held (at most [`HOLD`] of them, for at most [`HOLD_FOR`], the SDK's
//! `KeyHoldLimits`) while the session asks for the current key sets, and checked again
//! when they come; one whose key id is still unknown then is refused. A token renewed
//! before the handshake is answered is sent right after it.
//! The first chunk of any connection tells the fabric when the stream's chunk 0 was
//! due ([`Input::Origin`]).
//! As the SDK does, the verifier accepts only the broadcast's run that `Join` named
//! and, with [`DpShared::age_limit`] (on by default, the SDK's defaults), only chunks
//! signed recently by the control plane's clock (the offset measured at `Join`).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use starling_proto::holder::{HolderKey, Verifier};
use starling_proto::integrity::{ChunkMeta, ChunkVerifier, IntegrityError, VerifiedSignatures};
use starling_proto::wire::{
    self, Chunk, Decoder, Frame, Hello, Limits, Role, StartAt, Subscribe, chunk_flags,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::msg::{Input, SimChunk};
use super::reports::ViewerFigures;

/// Handshake deadline.
const HANDSHAKE: Duration = Duration::from_secs(10);
/// Chunks held for a key id not known yet (the SDK's `KeyHoldLimits::per_link`).
pub const HOLD: usize = 4;
/// A held chunk whose key has not come after this long is dropped (the SDK's
/// `KeyHoldLimits::max_wait`).
pub const HOLD_FOR: Duration = Duration::from_secs(10);

/// What a viewer's session asks of its data-plane connection.
#[derive(Debug)]
pub enum DpCmd {
    /// Push these substreams (mask), resuming at this chunk (`None`: the live edge).
    Subscribe(u64, Option<u64>),
    /// A last-resort request.
    Request(u64),
    /// A renewed chunk token.
    Token(Bytes),
    /// The current chunk keys (the full set: replaces the one held).
    Keys(Vec<(u32, Vec<u8>)>),
}

/// Shared by every data-plane connection of the process.
#[derive(Debug)]
pub struct DpShared {
    /// Authentic signature blocks already checked.
    pub cache: Arc<VerifiedSignatures>,
    /// Chunk duration, ms (for [`Input::Origin`]).
    pub chunk_ms: u64,
    /// Connections open now.
    pub open: AtomicU64,
    /// Connections that failed (dial, handshake, or later).
    pub failed: AtomicU64,
    /// Chunks received and verified.
    pub chunks: AtomicU64,
    /// Chunks refused by the signature check.
    pub bad_chunks: AtomicU64,
    /// Requests sent.
    pub requests: AtomicU64,
    /// Key sets taken (each replaces a connection's chunk keys).
    pub key_sets: AtomicU64,
    /// Chunks held for a key id not known yet.
    pub held: AtomicU64,
    /// Whether the origin was sent.
    origin_sent: AtomicBool,
    /// `(max age, max future)` of a chunk's signed timestamp, ms (`None`: no limit).
    /// Default: the SDK's (30 s, 10 s).
    pub age_limit: Option<(u64, u64)>,
}

impl DpShared {
    /// Counters at zero and a signature cache of `cache` entries.
    pub fn new(chunk_ms: u64, cache: usize) -> DpShared {
        DpShared {
            cache: Arc::new(VerifiedSignatures::new(cache)),
            chunk_ms,
            open: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            chunks: AtomicU64::new(0),
            bad_chunks: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            key_sets: AtomicU64::new(0),
            held: AtomicU64::new(0),
            origin_sent: AtomicBool::new(false),
            age_limit: Some((30_000, 10_000)),
        }
    }
}

/// One viewer's connection.
pub struct DpSetup {
    /// Local peer index.
    pub index: usize,
    /// The data plane's wire address.
    pub addr: String,
    /// The chunk token.
    pub token: Bytes,
    /// The simulated viewer's holder key (the token names it): its `PROOF` follows
    /// `HELLO_ACK`, as the SDK's does.
    pub holder: Arc<HolderKey>,
    /// The broadcast.
    pub broadcast_id: String,
    /// The substreams the server pushes at first.
    pub mask: u64,
    /// The data plane's chunk keys.
    pub chunk_keys: Vec<(u32, Vec<u8>)>,
    /// The broadcast's run from `Join` (0: not said, no run check).
    pub run_epoch: u64,
    /// The control plane's clock minus this process's, ms (measured at `Join`).
    pub clock_offset_ms: i64,
    /// Where chunks go.
    pub fabric: mpsc::Sender<Input>,
    /// Shared state.
    pub shared: Arc<DpShared>,
    /// The viewer's figures (its key-refresh signal).
    pub figures: Arc<ViewerFigures>,
}

/// Runs one viewer's connection until its commands end or the connection fails.
pub async fn connection(s: DpSetup, cmds: mpsc::Receiver<DpCmd>) {
    let shared = s.shared.clone();
    shared.open.fetch_add(1, Ordering::Relaxed);
    let r = run(s, cmds).await;
    shared.open.fetch_sub(1, Ordering::Relaxed);
    if let Err(e) = r {
        shared.failed.fetch_add(1, Ordering::Relaxed);
        tracing::debug!("data-plane connection: {e}");
    }
}

async fn send(stream: &mut TcpStream, f: &Frame) -> Result<(), String> {
    let b = wire::encode_to_bytes(f).map_err(|e| e.to_string())?;
    stream.write_all(&b).await.map_err(|e| e.to_string())
}

/// A verifier of `keys` (a key that does not parse is left out, and logged: chunks it
/// signed are then refused, as those of any unknown key).
fn verifier_of(s: &DpSetup, keys: &[(u32, Vec<u8>)]) -> ChunkVerifier {
    let mut v = ChunkVerifier::new(s.broadcast_id.clone())
        .with_cache(s.shared.cache.clone())
        .with_run((s.run_epoch != 0).then_some(s.run_epoch));
    if let Some((max_age, max_future)) = s.shared.age_limit {
        v = v.with_age_limit(max_age, max_future);
    }
    for (id, k) in keys {
        if let Err(e) = v.add_key(*id, k) {
            tracing::warn!("chunk key {id} left out: {e}");
        }
    }
    v
}

fn verify(s: &DpSetup, v: &ChunkVerifier, c: &Chunk) -> Result<(), IntegrityError> {
    let meta = ChunkMeta {
        seq: c.seq,
        flags: c.flags & !chunk_flags::DISCONTINUITY,
        timestamp_ms: c.timestamp_ms,
        duration_ms: c.duration_ms,
    };
    v.verify(
        &meta,
        &c.payload,
        &c.signature,
        starling_proto::time::unix_ms().saturating_add_signed(s.clock_offset_ms),
    )
}

/// A verified chunk to the fabric; `false` when the fabric is gone.
async fn forward(s: &DpSetup, c: Chunk) -> bool {
    s.shared.chunks.fetch_add(1, Ordering::Relaxed);
    if !s.shared.origin_sent.swap(true, Ordering::Relaxed) {
        // Chunk `seq` is due at (seq + 1)·d after the origin.
        let due = (c.seq + 1).saturating_mul(s.shared.chunk_ms);
        let origin = c.timestamp_ms.saturating_sub(due);
        let _ = s.fabric.send(Input::Origin { unix_ms: origin }).await;
    }
    let chunk = Arc::new(SimChunk {
        seq: c.seq,
        cut_ms: c.timestamp_ms,
        payload: c.payload,
    });
    let m = Input::ServerChunk {
        index: s.index,
        chunk,
    };
    s.fabric.send(m).await.is_ok()
}

fn refuse(s: &DpSetup, seq: u64, e: &IntegrityError) {
    s.shared.bad_chunks.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(seq, "data-plane chunk refused: {e}");
}

async fn run(s: DpSetup, mut cmds: mpsc::Receiver<DpCmd>) -> Result<(), String> {
    let mut verifier = verifier_of(&s, &s.chunk_keys);
    let mut stream = tokio::time::timeout(HANDSHAKE, TcpStream::connect(&s.addr))
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| format!("connect {}: {e}", s.addr))?;
    let _ = stream.set_nodelay(true);
    send(
        &mut stream,
        &Frame::Hello(Hello {
            min_version: wire::MIN_PROTOCOL_VERSION,
            max_version: wire::PROTOCOL_VERSION,
            role: Role::Viewer,
            token: s.token.clone(),
        }),
    )
    .await?;
    let mut decoder = Decoder::new(Limits::default());
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut subscribed = false;
    let mut mask = s.mask;
    // A token renewed before the handshake was answered.
    let mut token: Option<Bytes> = None;
    // Chunks signed with a key id not held yet, and when they came.
    let mut held: VecDeque<(Instant, Chunk)> = VecDeque::new();
    loop {
        let frame = loop {
            if let Some(f) = decoder.decode(&mut buf).map_err(|e| e.to_string())? {
                break Some(f);
            }
            tokio::select! {
                n = stream.read_buf(&mut buf) => {
                    if n.map_err(|e| e.to_string())? == 0 {
                        return Err("closed by the data plane".into());
                    }
                }
                cmd = cmds.recv() => {
                    let f = match cmd {
                        None => return Ok(()),
                        Some(DpCmd::Subscribe(m, resume)) => {
                            mask = m;
                            Frame::Subscribe(Subscribe {
                                broadcast_id: s.broadcast_id.clone(),
                                start: resume.map_or(StartAt::Live, StartAt::Seq),
                                substream_mask: m,
                            })
                        }
                        Some(DpCmd::Request(seq)) => {
                            s.shared.requests.fetch_add(1, Ordering::Relaxed);
                            Frame::Request(seq)
                        }
                        Some(DpCmd::Token(t)) if !subscribed => {
                            token = Some(t);
                            break None;
                        }
                        Some(DpCmd::Token(t)) => Frame::Token(t),
                        Some(DpCmd::Keys(keys)) => {
                            verifier = verifier_of(&s, &keys);
                            s.shared.key_sets.fetch_add(1, Ordering::Relaxed);
                            // The held chunks again: played if their key came, else
                            // refused (a key the control plane does not publish).
                            for (_, c) in std::mem::take(&mut held) {
                                match verify(&s, &verifier, &c) {
                                    Ok(()) => {
                                        if !forward(&s, c).await {
                                            return Ok(());
                                        }
                                    }
                                    Err(e) => refuse(&s, c.seq, &e),
                                }
                            }
                            break None;
                        }
                    };
                    if subscribed {
                        send(&mut stream, &f).await?;
                    }
                    break None;
                }
            }
        };
        let Some(frame) = frame else { continue };
        match frame {
            Frame::HelloAck(ack) if !subscribed => {
                subscribed = true;
                let proof = s.holder.prove(&ack.nonce, &s.token, Verifier::DataPlane);
                send(&mut stream, &Frame::Proof(Bytes::copy_from_slice(&proof))).await?;
                let sub = Frame::Subscribe(Subscribe {
                    broadcast_id: s.broadcast_id.clone(),
                    start: StartAt::Live,
                    substream_mask: mask,
                });
                send(&mut stream, &sub).await?;
                if let Some(t) = token.take() {
                    send(&mut stream, &Frame::Token(t)).await?;
                }
            }
            Frame::Chunk(c) => match verify(&s, &verifier, &c) {
                Ok(()) => {
                    if !forward(&s, c).await {
                        return Ok(());
                    }
                }
                Err(IntegrityError::UnknownKeyId(id)) => {
                    // Held while the session asks for the current keys (the node
                    // repairs what is dropped here).
                    let now = Instant::now();
                    held.retain(|(at, _)| now.duration_since(*at) < HOLD_FOR);
                    if held.len() < HOLD {
                        s.shared.held.fetch_add(1, Ordering::Relaxed);
                        held.push_back((now, c));
                    } else {
                        refuse(&s, c.seq, &IntegrityError::UnknownKeyId(id));
                    }
                    s.figures.key_refresh.notify_one();
                }
                Err(e) => refuse(&s, c.seq, &e),
            },
            Frame::NotFound(seq) => {
                let m = Input::ServerNotFound {
                    index: s.index,
                    seq,
                };
                if s.fabric.send(m).await.is_err() {
                    return Ok(());
                }
            }
            Frame::Ping(n) => send(&mut stream, &Frame::Pong(n)).await?,
            Frame::Error(r) | Frame::Goodbye(r) => {
                return Err(format!("data plane: {r:?}"));
            }
            _ => {}
        }
    }
}
