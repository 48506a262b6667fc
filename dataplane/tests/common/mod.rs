//! Shared helpers of the integration tests: an ffmpeg-made MPEG-TS file served at real
//! time by a tiny HTTP source, node configs, a blocking wire-protocol client.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use anyhow::{Result, bail};
use bytes::BytesMut;
use starling_dataplane::{Config, Node, StaticBroadcast, Timeouts};
use starling_proto::wire::{self, Decoder, Frame, Hello, Limits, Role, StartAt, Subscribe};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const TS_SECS: f64 = 20.0;

pub fn test_ts() -> &'static [u8] {
    static TS: OnceLock<Vec<u8>> = OnceLock::new();
    TS.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.ts");
        let status = Command::new("ffmpeg")
            .args(["-hide_banner", "-loglevel", "error", "-y"])
            .args(["-f", "lavfi", "-i", "testsrc=size=320x240:rate=25"])
            .args(["-f", "lavfi", "-i", "sine", "-c:v", "libx264", "-g", "25"])
            .args(["-c:a", "aac", "-t", "20", "-f", "mpegts"])
            .arg(&out)
            .status()
            .expect("ffmpeg must be installed");
        assert!(status.success());
        std::fs::read(out).unwrap()
    })
}

/// Serves the test TS at roughly real time to every connection on `listener`.
pub fn serve_source(listener: TcpListener) {
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let mut req = [0u8; 2048];
                let _ = conn.read(&mut req);
                let ts = test_ts();
                let _ = conn.write_all(b"HTTP/1.0 200 OK\r\nContent-Type: video/mp2t\r\n\r\n");
                let bytes_per_sec = ts.len() as f64 / TS_SECS;
                let piece = 188 * 20;
                let start = Instant::now();
                // Icecast-like burst of ~1 s, then real time.
                let mut sent = 0usize;
                while sent < ts.len() {
                    let n = piece.min(ts.len() - sent);
                    if conn.write_all(&ts[sent..sent + n]).is_err() {
                        return;
                    }
                    sent += n;
                    let due = Duration::from_secs_f64((sent as f64 / bytes_per_sec - 1.0).max(0.0));
                    if let Some(wait) = due.checked_sub(start.elapsed()) {
                        std::thread::sleep(wait);
                    }
                }
            });
        }
    });
}

pub fn start_source() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    serve_source(l);
    a
}

pub fn config(static_broadcasts: Vec<StaticBroadcast>, cores: usize) -> Config {
    Config {
        static_broadcasts,
        wire_listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        cores,
        io_memory_kib: 256,
        source_policy: starling_dataplane::source_policy::SourcePolicy::with_loopback(),
        timeouts: Timeouts {
            backoff_max: Duration::from_secs(1),
            ..Timeouts::default()
        },
        ..Config::default()
    }
}

pub fn node_with_source(cores: usize) -> (Node, SocketAddr) {
    let src = start_source();
    let sb: StaticBroadcast = format!("test=http://{src}/live.ts").parse().unwrap();
    (Node::start(config(vec![sb], cores)).unwrap(), src)
}

pub struct Client {
    pub s: TcpStream,
    pub buf: BytesMut,
    pub dec: Decoder,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Result<Client> {
        Self::from_stream(TcpStream::connect(addr)?)
    }
    pub fn from_stream(s: TcpStream) -> Result<Client> {
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Client {
            s,
            buf: BytesMut::new(),
            dec: Decoder::new(Limits::default()),
        })
    }
    pub fn send(&mut self, f: &Frame) -> Result<()> {
        self.s.write_all(&wire::encode_to_bytes(f)?)?;
        Ok(())
    }
    /// Next frame; PINGs are answered and skipped.
    pub fn recv(&mut self) -> Result<Frame> {
        loop {
            match self.recv_raw()? {
                Frame::Ping(n) => self.send(&Frame::Pong(n))?,
                f => return Ok(f),
            }
        }
    }
    /// Next frame, PINGs included (not answered).
    pub fn recv_raw(&mut self) -> Result<Frame> {
        loop {
            if let Some(f) = self.dec.decode(&mut self.buf)? {
                return Ok(f);
            }
            let mut tmp = [0u8; 65536];
            let n = self.s.read(&mut tmp)?;
            if n == 0 {
                bail!("connection closed");
            }
            self.buf.extend_from_slice(&tmp[..n]);
        }
    }
    pub fn handshake(addr: SocketAddr, id: &str, start: StartAt) -> Result<Client> {
        Self::handshake_mask(addr, id, start, wire::ALL_SUBSTREAMS)
    }
    pub fn handshake_mask(
        addr: SocketAddr,
        id: &str,
        start: StartAt,
        substream_mask: u64,
    ) -> Result<Client> {
        Self::handshake_token(addr, id, start, substream_mask, bytes::Bytes::new())
    }
    /// HELLO with `token`, then SUBSCRIBE.
    pub fn handshake_token(
        addr: SocketAddr,
        id: &str,
        start: StartAt,
        substream_mask: u64,
        token: bytes::Bytes,
    ) -> Result<Client> {
        Self::handshake_proven(addr, id, start, substream_mask, token, Some(holder()))
    }

    /// HELLO with `token`, PROOF with `key` (none: no PROOF), then SUBSCRIBE.
    pub fn handshake_proven(
        addr: SocketAddr,
        id: &str,
        start: StartAt,
        substream_mask: u64,
        token: bytes::Bytes,
        key: Option<&starling_proto::holder::HolderKey>,
    ) -> Result<Client> {
        let mut c = Client::connect(addr)?;
        c.send(&Frame::Hello(Hello {
            min_version: wire::PROTOCOL_VERSION,
            max_version: wire::PROTOCOL_VERSION,
            role: Role::Viewer,
            token: token.clone(),
        }))?;
        let nonce = match c.recv()? {
            Frame::HelloAck(a) => {
                assert_eq!(a.version, wire::PROTOCOL_VERSION);
                a.nonce
            }
            other => bail!("expected HELLO_ACK, got {other:?}"),
        };
        if let Some(k) = key
            && !token.is_empty()
        {
            let proof = k.prove(&nonce, &token, starling_proto::holder::Verifier::DataPlane);
            c.send(&Frame::Proof(bytes::Bytes::copy_from_slice(&proof)))?;
        }
        c.send(&Frame::Subscribe(Subscribe {
            broadcast_id: id.into(),
            start,
            substream_mask,
        }))?;
        Ok(c)
    }
}

pub fn pid(p: &[u8]) -> u16 {
    (u16::from(p[1] & 0x1F) << 8) | u16::from(p[2])
}

pub fn wait_for(what: &str, mut f: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if f() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("gave up waiting for {what}")
}

/// A node ingesting the test source as broadcast `test`, with `f` applied to its config.
pub fn node_with(cores: usize, f: impl FnOnce(&mut Config)) -> (Node, SocketAddr) {
    let src = start_source();
    let sb: StaticBroadcast = format!("test=http://{src}/live.ts").parse().unwrap();
    let mut cfg = config(vec![sb], cores);
    f(&mut cfg);
    let node = Node::start(cfg).unwrap();
    // Static broadcasts are registered by the tokio thread, just after start returns.
    wait_for("the broadcast", || node.status("test").is_some()).unwrap();
    (node, src)
}

/// `GET path` on a plain HTTP listener; returns (head, body) of a complete response.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(String, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")?;
    let mut r = String::new();
    s.read_to_string(&mut r)?;
    match r.split_once("\r\n\r\n") {
        Some((h, b)) => Ok((h.to_owned(), b.to_owned())),
        None => bail!("no complete HTTP response: {r:?}"),
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A PLAY token for `peer` on `broadcast`, valid from a second ago for `ttl_ms`.
pub fn play_token(
    signer: &starling_proto::token::TokenSigner,
    broadcast: &str,
    peer: u64,
    ttl_ms: u64,
) -> bytes::Bytes {
    let now = now_ms();
    signer
        .sign(&starling_proto::token::TokenClaims {
            broadcast_id: broadcast.into(),
            peer_id: peer,
            session_id: peer + 1000,
            scopes: starling_proto::token::Scopes::PLAY,
            issued_at_ms: now - 1000,
            expires_at_ms: now + ttl_ms,
            holder_key: holder().public_key(),
        })
        .unwrap()
}

/// The holder key of the test viewers ([`play_token`]s name it).
pub fn holder() -> &'static starling_proto::holder::HolderKey {
    static K: std::sync::OnceLock<starling_proto::holder::HolderKey> = std::sync::OnceLock::new();
    K.get_or_init(|| starling_proto::holder::HolderKey::from_seed(&[3; 32]).unwrap())
}

/// A chunk verifier for `broadcast` trusting the node's chunk key.
pub fn chunk_verifier(node: &Node, broadcast: &str) -> starling_proto::integrity::ChunkVerifier {
    let mut v = starling_proto::integrity::ChunkVerifier::new(broadcast);
    v.add_key(node.chunk_key_id(), &node.chunk_public_key())
        .unwrap();
    v
}

/// Checks a received CHUNK's signature block (DISCONTINUITY is receiver-specific and
/// not covered by the signature).
pub fn verify_chunk(v: &starling_proto::integrity::ChunkVerifier, c: &wire::Chunk) -> Result<()> {
    if c.signature.is_empty() {
        bail!("chunk {} carries no signature", c.seq);
    }
    let meta = starling_proto::integrity::ChunkMeta {
        seq: c.seq,
        flags: c.flags & !wire::chunk_flags::DISCONTINUITY,
        timestamp_ms: c.timestamp_ms,
        duration_ms: c.duration_ms,
    };
    v.verify(&meta, &c.payload, &c.signature, now_ms())
        .map_err(|e| anyhow::anyhow!("chunk {}: {e}", c.seq))
}

/// Reads until a CHUNK (PINGs answered); fails on anything else.
pub fn next_chunk(c: &mut Client) -> Result<wire::Chunk> {
    match c.recv()? {
        Frame::Chunk(ch) => Ok(ch),
        other => bail!("expected CHUNK, got {other:?}"),
    }
}

/// Reads (skipping CHUNKs) until an ERROR or GOODBYE; returns (is_error, reason).
pub fn until_close(c: &mut Client) -> Result<(bool, wire::Reason)> {
    loop {
        match c.recv()? {
            Frame::Chunk(_) | Frame::StreamInfo(_) => {}
            Frame::Error(r) => return Ok((true, r)),
            Frame::Goodbye(r) => return Ok((false, r)),
            other => bail!("unexpected {other:?}"),
        }
    }
}

/// A viewer reading every pushed chunk in its own thread, from a subscribed `Client`;
/// fails on the first chunk that is not the previous one + 1 or is flagged
/// DISCONTINUITY.
pub struct Healthy {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    chunks: std::sync::Arc<std::sync::atomic::AtomicU64>,
    thread: std::thread::JoinHandle<Result<u64>>,
}

impl Healthy {
    pub fn reading(mut c: Client) -> Healthy {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let stop = Arc::new(AtomicBool::new(false));
        let chunks = Arc::new(AtomicU64::new(0));
        let (s, n) = (Arc::clone(&stop), Arc::clone(&chunks));
        let thread = std::thread::spawn(move || -> Result<u64> {
            let mut prev: Option<u64> = None;
            while !s.load(Ordering::SeqCst) {
                let ch = next_chunk(&mut c).map_err(|e| e.context("healthy viewer"))?;
                if let Some(p) = prev
                    && ch.seq != p + 1
                {
                    bail!("healthy viewer: chunk {} after {p}", ch.seq);
                }
                if ch.flags & wire::chunk_flags::DISCONTINUITY != 0 {
                    bail!("healthy viewer: chunk {} flagged DISCONTINUITY", ch.seq);
                }
                prev = Some(ch.seq);
                n.fetch_add(1, Ordering::SeqCst);
            }
            Ok(n.load(Ordering::SeqCst))
        });
        Healthy {
            stop,
            chunks,
            thread,
        }
    }

    pub fn count(&self) -> u64 {
        self.chunks.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits for `more` chunks beyond those received so far, then stops the reader.
    pub fn finish(self, more: u64) -> Result<u64> {
        let target = self.count() + more;
        let r = wait_for("the healthy viewer's chunks", || {
            self.count() >= target || self.thread.is_finished()
        });
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let n = self
            .thread
            .join()
            .map_err(|_| anyhow::anyhow!("healthy viewer panicked"))??;
        r?;
        Ok(n)
    }
}
