//! A small in-test data plane speaking the wire protocol on a real loopback socket.
#![allow(dead_code)]

use parking_lot::Mutex;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use starling_proto::wire::{
    self, Chunk, Decoder, ErrorCode, Frame, HelloAck, Limits, Reason, StartAt, StreamInfo,
    chunk_flags,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

#[derive(Clone)]
pub struct Script {
    pub broadcast: String,
    pub content_type: String,
    pub chunks: Vec<Chunk>,
    /// On the first connection only: close after sending the chunk with this seq.
    pub drop_after: Option<u64>,
    /// On `SUBSCRIBE Seq(n)`, start `overlap` chunks earlier (an overlapping resend the
    /// SDK must de-duplicate).
    pub overlap_on_resume: u64,
    /// If set, one permit is taken before each chunk is sent.
    pub pace: Option<Arc<Semaphore>>,
    /// Answer HELLO with this error instead of HELLO_ACK.
    pub hello_error: Option<ErrorCode>,
    /// After the last chunk, take a permit, then send `GOODBYE BroadcastStopped` and
    /// close.
    pub goodbye: Option<Arc<Semaphore>>,
}

impl Script {
    /// `n` chunks of varied sizes; only the first is a random access point.
    pub fn numbered(broadcast: &str, n: u64) -> Script {
        let chunks = (0..n)
            .map(|seq| Chunk {
                seq,
                flags: if seq == 0 {
                    chunk_flags::RANDOM_ACCESS
                } else {
                    0
                },
                timestamp_ms: 1_700_000_000_000 + seq * 1000,
                duration_ms: 1000,
                signature: Bytes::new(),
                payload: payload(seq),
            })
            .collect();
        Script {
            broadcast: broadcast.into(),
            content_type: "video/mp2t".into(),
            chunks,
            drop_after: None,
            overlap_on_resume: 0,
            pace: None,
            hello_error: None,
            goodbye: None,
        }
    }

    pub fn expected_bytes(&self) -> Vec<u8> {
        self.chunks
            .iter()
            .flat_map(|c| c.payload.iter().copied())
            .collect()
    }
}

/// Chunks cut from a real MPEG-TS byte stream on 188-byte packet boundaries; only the
/// first (which starts with PAT/PMT) is marked random access.
pub fn ts_chunks(ts: &[u8], packets_per_chunk: usize) -> Vec<Chunk> {
    ts.chunks(188 * packets_per_chunk)
        .enumerate()
        .map(|(i, c)| Chunk {
            seq: i as u64,
            flags: if i == 0 {
                chunk_flags::RANDOM_ACCESS
            } else {
                0
            },
            timestamp_ms: 0,
            duration_ms: 100,
            signature: Bytes::new(),
            payload: Bytes::copy_from_slice(c),
        })
        .collect()
}

/// Deterministic, seq-tagged payload of varying length.
pub fn payload(seq: u64) -> Bytes {
    let len = 100 + (seq as usize * 7919) % 3000;
    let mut v = Vec::with_capacity(len);
    v.extend_from_slice(format!("<chunk {seq}>").as_bytes());
    while v.len() < len {
        v.push((seq as u8).wrapping_mul(31).wrapping_add(v.len() as u8));
    }
    Bytes::from(v)
}

#[derive(Default)]
pub struct Log {
    pub subscribes: Vec<StartAt>,
    pub pongs: Vec<u64>,
    pub connections: usize,
    pub tokens: Vec<Bytes>,
}

pub struct Fixture {
    pub addr: SocketAddr,
    pub log: Arc<Mutex<Log>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Fixture {
    pub async fn start(script: Script) -> Fixture {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new(Log::default()));
        let log2 = log.clone();
        let task = tokio::spawn(async move {
            let mut conns = Vec::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let first = {
                    let mut l = log2.lock();
                    l.connections += 1;
                    l.connections == 1
                };
                conns.push(tokio::spawn(serve_conn(
                    stream,
                    script.clone(),
                    log2.clone(),
                    first,
                )));
            }
        });
        Fixture { addr, log, task }
    }

    pub fn subscribes(&self) -> Vec<StartAt> {
        self.log.lock().subscribes.clone()
    }
}

async fn read_frame(s: &mut TcpStream, dec: &mut Decoder, buf: &mut BytesMut) -> Option<Frame> {
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

async fn send(s: &mut TcpStream, f: &Frame) -> bool {
    let b = wire::encode_to_bytes(f).unwrap();
    s.write_all(&b).await.is_ok()
}

async fn serve_conn(mut s: TcpStream, script: Script, log: Arc<Mutex<Log>>, first: bool) {
    let mut dec = Decoder::new(Limits::control_only());
    let mut buf = BytesMut::new();
    let Some(Frame::Hello(hello)) = read_frame(&mut s, &mut dec, &mut buf).await else {
        return;
    };
    log.lock().tokens.push(hello.token.clone());
    if let Some(code) = script.hello_error {
        send(
            &mut s,
            &Frame::Error(Reason {
                code,
                message: "refused".into(),
            }),
        )
        .await;
        return;
    }
    let Some(version) = wire::negotiate(hello.min_version, hello.max_version) else {
        return;
    };
    send(
        &mut s,
        &Frame::HelloAck(HelloAck {
            version,
            nonce: [0; 32],
        }),
    )
    .await;
    // The SDK proves its token's key first (not checked by this fake).
    let sub = loop {
        match read_frame(&mut s, &mut dec, &mut buf).await {
            Some(Frame::Proof(_)) => {}
            Some(Frame::Subscribe(sub)) => break sub,
            _ => return,
        }
    };
    log.lock().subscribes.push(sub.start);
    if sub.broadcast_id != script.broadcast {
        send(
            &mut s,
            &Frame::Error(Reason {
                code: ErrorCode::UnknownBroadcast,
                message: format!("no broadcast {}", sub.broadcast_id),
            }),
        )
        .await;
        return;
    }
    let start = match sub.start {
        StartAt::Live => 0,
        StartAt::Seq(n) => n.saturating_sub(script.overlap_on_resume),
    };
    let live_seq = script.chunks.last().map_or(0, |c| c.seq);
    send(
        &mut s,
        &Frame::StreamInfo(StreamInfo {
            broadcast_id: script.broadcast.clone(),
            content_type: script.content_type.clone(),
            chunk_duration_ms: 1000,
            substreams: 1,
            first_seq: start,
            live_seq,
        }),
    )
    .await;
    send(&mut s, &Frame::Ping(7)).await;
    for c in script.chunks.iter().filter(|c| c.seq >= start) {
        if let Some(p) = &script.pace {
            match p.acquire().await {
                Ok(permit) => permit.forget(),
                Err(_) => return,
            }
        }
        if !send(&mut s, &Frame::Chunk(c.clone())).await {
            return;
        }
        if first && script.drop_after == Some(c.seq) {
            // Abrupt drop mid-stream.
            let _ = s.shutdown().await;
            return;
        }
    }
    if let Some(g) = &script.goodbye {
        if let Ok(p) = g.acquire().await {
            p.forget();
        }
        send(
            &mut s,
            &Frame::Goodbye(Reason {
                code: ErrorCode::BroadcastStopped,
                message: "stopped".into(),
            }),
        )
        .await;
        let _ = s.shutdown().await;
        return;
    }
    // Stay connected (a live stream with nothing new yet); record pongs.
    while let Some(f) = read_frame(&mut s, &mut dec, &mut buf).await {
        if let Frame::Pong(n) = f {
            log.lock().pongs.push(n);
        }
    }
}
pub mod live;
pub mod mini_cp;
