//! A live in-test data plane: chunks are cut in real time, subscriptions honour
//! substream masks (a later `SUBSCRIBE` replaces the mask), `REQUEST` is answered with
//! `CHUNK` or `NOT_FOUND`. The same server, with `role = Peer` and some chunks left
//! out, corrupted or re-signed with a forged key, plays a lossy or polluting parent
//! peer. A signed source signs every chunk as the data plane does.
#![allow(dead_code)]

use parking_lot::Mutex;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use starling_proto::integrity::{ChunkMeta, ChunkSigner};
use starling_proto::wire::{
    self, Chunk, Decoder, ErrorCode, Frame, HelloAck, Limits, Reason, Role, StartAt, StreamInfo,
    chunk_flags,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::payload;

/// Chunk `seq` of run `run`: `<run RUN>` then [`payload`]`(seq)`, so a player's
/// output tells which run each chunk came from.
pub fn payload_in_run(seq: u64, run: u64) -> Bytes {
    let mut v = format!("<run {run}>").into_bytes();
    v.extend_from_slice(&payload(seq));
    Bytes::from(v)
}

/// Every `RAP_EVERY`-th chunk is a random access point.
pub const RAP_EVERY: u64 = 5;

/// The stream being cut: every chunk so far (tests are short), and the newest seq.
#[derive(Clone)]
pub struct Source {
    pub chunks: Arc<Mutex<Vec<Chunk>>>,
    newest: watch::Receiver<Option<u64>>,
    pub k: u16,
    pub chunk_ms: u64,
    task: Arc<tokio::task::JoinHandle<()>>,
}

impl Source {
    /// Cuts chunk 0 now and one more every `chunk_ms` (unsigned chunks).
    pub fn start(k: u16, chunk_ms: u64) -> Source {
        Source::start_inner(k, chunk_ms, None, 0)
    }

    /// Like [`Source::start`], every chunk signed for `broadcast` with `signer`.
    pub fn signed(k: u16, chunk_ms: u64, broadcast: &str, signer: Arc<ChunkSigner>) -> Source {
        Source::signed_in_run(k, chunk_ms, broadcast, signer, 0)
    }

    /// Like [`Source::signed`], for run `run` of the broadcast.
    pub fn signed_in_run(
        k: u16,
        chunk_ms: u64,
        broadcast: &str,
        signer: Arc<ChunkSigner>,
        run: u64,
    ) -> Source {
        Source::start_inner(k, chunk_ms, Some((broadcast.to_string(), signer, run)), 0)
    }

    /// Like [`Source::signed_in_run`], every chunk stamped `age_ms` in the past (a
    /// recording replayed later).
    pub fn signed_aged(
        k: u16,
        chunk_ms: u64,
        broadcast: &str,
        signer: Arc<ChunkSigner>,
        run: u64,
        age_ms: u64,
    ) -> Source {
        Source::start_inner(
            k,
            chunk_ms,
            Some((broadcast.to_string(), signer, run)),
            age_ms,
        )
    }

    /// Emits `recorded` again from its first chunk, one every `chunk_ms`, unchanged
    /// (signatures, timestamps and all): a relay replaying a recording.
    pub fn replaying(k: u16, chunk_ms: u64, recorded: Vec<Chunk>) -> Source {
        let chunks = Arc::new(Mutex::new(Vec::new()));
        let (tx, newest) = watch::channel(None);
        let c2 = chunks.clone();
        let task = tokio::spawn(async move {
            let mut iv = tokio::time::interval(Duration::from_millis(chunk_ms));
            for c in recorded {
                iv.tick().await;
                let seq = c.seq;
                c2.lock().push(c);
                let _ = tx.send(Some(seq));
            }
        });
        Source {
            chunks,
            newest,
            k,
            chunk_ms,
            task: Arc::new(task),
        }
    }

    fn start_inner(
        k: u16,
        chunk_ms: u64,
        signer: Option<(String, Arc<ChunkSigner>, u64)>,
        age_ms: u64,
    ) -> Source {
        let chunks = Arc::new(Mutex::new(Vec::new()));
        let (tx, newest) = watch::channel(None);
        let c2 = chunks.clone();
        let task = tokio::spawn(async move {
            let mut iv = tokio::time::interval(Duration::from_millis(chunk_ms));
            for seq in 0u64.. {
                iv.tick().await;
                let ts = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64)
                    .saturating_sub(age_ms);
                let flags = if seq % RAP_EVERY == 0 {
                    chunk_flags::RANDOM_ACCESS
                } else {
                    0
                };
                let p = match &signer {
                    Some((_, _, run)) if *run != 0 => payload_in_run(seq, *run),
                    _ => payload(seq),
                };
                let signature = match &signer {
                    Some((b, s, run)) => s
                        .sign_in_run(
                            b,
                            *run,
                            &ChunkMeta {
                                seq,
                                flags,
                                timestamp_ms: ts,
                                duration_ms: chunk_ms as u32,
                            },
                            &p,
                        )
                        .unwrap(),
                    None => Bytes::new(),
                };
                c2.lock().push(Chunk {
                    seq,
                    flags,
                    timestamp_ms: ts,
                    duration_ms: chunk_ms as u32,
                    signature,
                    payload: p,
                });
                let _ = tx.send(Some(seq));
            }
        });
        Source {
            chunks,
            newest,
            k,
            chunk_ms,
            task: Arc::new(task),
        }
    }

    pub fn stop(&self) {
        self.task.abort();
    }

    pub fn newest(&self) -> Option<u64> {
        *self.newest.borrow()
    }

    fn get(&self, seq: u64) -> Option<Chunk> {
        self.chunks.lock().get(seq as usize).cloned()
    }

    /// Waits until chunk `seq` exists.
    pub async fn wait_for(&self, seq: u64) {
        let mut rx = self.newest.clone();
        let _ = rx.wait_for(|n| n.is_some_and(|n| n >= seq)).await;
    }
}

#[derive(Default, Debug)]
pub struct LiveLog {
    pub connections: usize,
    /// (connection number, mask) for every SUBSCRIBE.
    pub subscribes: Vec<(usize, u64)>,
    pub requests: Vec<u64>,
    pub bytes_pushed: u64,
    pub bytes_served: u64,
    /// The token of every `HELLO`, and of every `TOKEN` frame.
    pub hello_tokens: Vec<Bytes>,
    pub token_frames: Vec<Bytes>,
    /// Codes of the `ERROR`/`GOODBYE` frames received.
    pub closes: Vec<ErrorCode>,
    /// Bad chunks sent (corrupted or forged).
    pub bad_sent: Vec<u64>,
    /// (connection number, mask) for every `RELAYING` received.
    pub relaying: Vec<(usize, u64)>,
}

pub struct LiveServer {
    pub addr: SocketAddr,
    pub log: Arc<Mutex<LiveLog>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for LiveServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Clone)]
pub struct Opts {
    pub broadcast: String,
    /// Role the server accepts (`Viewer` for the data plane, `Peer` for a fake peer).
    pub role: Role,
    /// Chunks never pushed nor served.
    pub drop: BTreeSet<u64>,
    /// Chunks older than this many behind the newest are gone.
    pub window: u64,
    /// Chunks sent with one payload byte flipped (signature unchanged).
    pub corrupt: BTreeSet<u64>,
    /// Chunks sent with a signature block made with a key of the attacker's.
    pub forge: BTreeSet<u64>,
    /// The protocol version `HELLO_ACK` chooses.
    pub version: u16,
}

impl Opts {
    pub fn data_plane(broadcast: &str) -> Opts {
        Opts {
            broadcast: broadcast.into(),
            role: Role::Viewer,
            drop: BTreeSet::new(),
            window: 300,
            corrupt: BTreeSet::new(),
            forge: BTreeSet::new(),
            version: 2,
        }
    }

    /// A fake peer (role `Peer`).
    pub fn peer(broadcast: &str) -> Opts {
        Opts {
            role: Role::Peer,
            ..Opts::data_plane(broadcast)
        }
    }
}

/// What a polluting sender makes of chunk `c`.
fn tamper(c: Chunk, opts: &Opts, log: &Mutex<LiveLog>) -> Chunk {
    if opts.corrupt.contains(&c.seq) {
        log.lock().bad_sent.push(c.seq);
        let mut p = c.payload.to_vec();
        let i = p.len() / 2;
        p[i] ^= 0x40;
        return Chunk {
            payload: Bytes::from(p),
            ..c
        };
    }
    if opts.forge.contains(&c.seq) {
        log.lock().bad_sent.push(c.seq);
        let key_id = starling_proto::integrity::parse_block(&c.signature)
            .map(|b| b.key_id)
            .unwrap_or(1);
        let forger = ChunkSigner::new(
            key_id,
            &starling_proto::integrity::generate_pkcs8().unwrap(),
        )
        .unwrap();
        let mut p = c.payload.to_vec();
        p[0] ^= 0x01;
        let meta = ChunkMeta {
            seq: c.seq,
            flags: c.flags,
            timestamp_ms: c.timestamp_ms,
            duration_ms: c.duration_ms,
        };
        let signature = forger.sign(&opts.broadcast, &meta, &p).unwrap();
        return Chunk {
            payload: Bytes::from(p),
            signature,
            ..c
        };
    }
    c
}

impl LiveServer {
    pub async fn start(source: Source, opts: Opts) -> LiveServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new(LiveLog::default()));
        let log2 = log.clone();
        let task = tokio::spawn(async move {
            let mut conns = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                let n = {
                    let mut l = log2.lock();
                    l.connections += 1;
                    l.connections
                };
                conns.push(AbortOnDrop(tokio::spawn(serve(
                    s,
                    n,
                    source.clone(),
                    opts.clone(),
                    log2.clone(),
                ))));
            }
        });
        LiveServer { addr, log, task }
    }

    pub fn requests(&self) -> Vec<u64> {
        self.log.lock().requests.clone()
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn read_frame(
    s: &mut tokio::net::tcp::OwnedReadHalf,
    dec: &mut Decoder,
    buf: &mut BytesMut,
) -> Option<Frame> {
    loop {
        match dec.decode(buf) {
            Ok(Some(f)) => return Some(f),
            Ok(None) => {}
            Err(_) => return None,
        }
        buf.reserve(4096);
        match s.read_buf(buf).await {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

async fn send(w: &mut OwnedWriteHalf, f: &Frame) -> bool {
    let b = wire::encode_to_bytes(f).unwrap();
    w.write_all(&b).await.is_ok()
}

fn wants(mask: u64, seq: u64, k: u16) -> bool {
    wire::mask_wants(mask, seq, k)
}

async fn serve(s: TcpStream, _n: usize, src: Source, opts: Opts, log: Arc<Mutex<LiveLog>>) {
    let _ = s.set_nodelay(true);
    let (mut r, mut w) = s.into_split();
    let mut dec = Decoder::new(Limits::control_only());
    let mut buf = BytesMut::new();
    let Some(Frame::Hello(hello)) = read_frame(&mut r, &mut dec, &mut buf).await else {
        return;
    };
    log.lock().hello_tokens.push(hello.token.clone());
    if hello.role != opts.role {
        send(
            &mut w,
            &Frame::Error(Reason {
                code: ErrorCode::UnexpectedFrame,
                message: "wrong role".into(),
            }),
        )
        .await;
        return;
    }
    send(
        &mut w,
        &Frame::HelloAck(HelloAck {
            version: opts.version,
            nonce: [0; 32],
        }),
    )
    .await;
    // A child sends its parent tickets first (not checked here).
    let sub = loop {
        match read_frame(&mut r, &mut dec, &mut buf).await {
            Some(Frame::Subscribe(sub)) => break sub,
            Some(Frame::Ticket(_) | Frame::Proof(_)) => {}
            _ => return,
        }
    };
    let conn_no = log.lock().connections;
    log.lock().subscribes.push((conn_no, sub.substream_mask));
    if sub.broadcast_id != opts.broadcast {
        send(
            &mut w,
            &Frame::Error(Reason {
                code: ErrorCode::UnknownBroadcast,
                message: "no such broadcast".into(),
            }),
        )
        .await;
        return;
    }
    let newest = src.newest().unwrap_or(0);
    let live_start = newest - newest % RAP_EVERY;
    let oldest = newest.saturating_sub(opts.window);
    let start = match sub.start {
        StartAt::Live => live_start,
        StartAt::Seq(n) if n >= oldest && n <= newest + 1 => n,
        StartAt::Seq(_) => live_start,
    };
    if !send(
        &mut w,
        &Frame::StreamInfo(StreamInfo {
            broadcast_id: opts.broadcast.clone(),
            content_type: "video/mp2t".into(),
            chunk_duration_ms: src.chunk_ms as u32,
            substreams: src.k,
            first_seq: start,
            live_seq: newest,
        }),
    )
    .await
    {
        return;
    }
    let mut mask = sub.substream_mask;
    let mut cursor = start;
    let mut newest_rx = src.newest.clone();
    let (ftx, mut frx) = tokio::sync::mpsc::channel::<Frame>(64);
    let reader = AbortOnDrop(tokio::spawn(async move {
        while let Some(f) = read_frame(&mut r, &mut dec, &mut buf).await {
            if ftx.send(f).await.is_err() {
                return;
            }
        }
    }));
    loop {
        // Push everything up to the newest chunk.
        while let Some(c) = src.get(cursor) {
            if wants(mask, c.seq, src.k) && !opts.drop.contains(&c.seq) {
                log.lock().bytes_pushed += c.payload.len() as u64;
                let c = tamper(c, &opts, &log);
                if !send(&mut w, &Frame::Chunk(c)).await {
                    return;
                }
            }
            cursor += 1;
        }
        tokio::select! {
            r = newest_rx.changed() => if r.is_err() { return; },
            f = frx.recv() => match f {
                None => break,
                Some(Frame::Subscribe(s)) => {
                    log.lock().subscribes.push((conn_no, s.substream_mask));
                    mask = s.substream_mask;
                    if let StartAt::Seq(n) = s.start {
                        let newest = src.newest().unwrap_or(0);
                        if n >= newest.saturating_sub(opts.window) && n <= newest + 1 {
                            cursor = n;
                        }
                    }
                }
                Some(Frame::Request(seq)) => {
                    log.lock().requests.push(seq);
                    let newest = src.newest().unwrap_or(0);
                    let held = seq + opts.window >= newest && !opts.drop.contains(&seq);
                    let reply = match src.get(seq) {
                        Some(c) if held => {
                            log.lock().bytes_served += c.payload.len() as u64;
                            Frame::Chunk(tamper(c, &opts, &log))
                        }
                        _ => Frame::NotFound(seq),
                    };
                    if !send(&mut w, &reply).await {
                        return;
                    }
                }
                Some(Frame::Ping(n)) => {
                    if !send(&mut w, &Frame::Pong(n)).await {
                        return;
                    }
                }
                Some(Frame::Token(t)) => log.lock().token_frames.push(t),
                Some(Frame::Relaying(m)) => log.lock().relaying.push((conn_no, m)),
                Some(Frame::Goodbye(r)) | Some(Frame::Error(r)) => {
                    log.lock().closes.push(r.code);
                    break;
                }
                Some(_) => {}
            },
        }
    }
    drop(reader);
}
