//! A raw-TCP attacker against a relaying viewer's peer listener (real loopback
//! sockets, an in-test data plane and control plane). Before a link is admitted
//! (`HELLO` with a valid token, then `SUBSCRIBE`) only control frames are read, for a
//! bounded time, on a bounded number of connections; after admission a peer that sends
//! a chunk it was not asked for is closed, and its requests are rate-limited. Timeouts
//! only bound hangs; nothing asserts on wall-clock durations.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::live::{LiveServer, Opts, RAP_EVERY, Source};
use common::mini_cp::{self, MiniCp, Plan, Ref};
use starling_proto::holder::{HolderKey, Verifier};
use starling_proto::wire::{
    self, Chunk, Decoder, ErrorCode, Frame, Hello, Limits, Role, StartAt, Subscribe,
};
use starling_sdk::{PeerLimits, RelayConfig, Viewer, ViewerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const GUARD: Duration = Duration::from_secs(40);
const K: u16 = 4;
const CHUNK_MS: u64 = 100;

/// A relaying viewer fed by the data plane, with 4 child slots.
struct Relay {
    src: Source,
    _dp: LiveServer,
    cp: MiniCp,
    viewer: Viewer,
}

impl Relay {
    async fn start(broadcast: &str, limits: PeerLimits) -> Relay {
        let src = Source::start(K, CHUNK_MS);
        let dp = LiveServer::start(src.clone(), Opts::data_plane(broadcast)).await;
        src.wait_for(2 * RAP_EVERY).await;
        let cp = mini_cp::new(
            broadcast,
            dp.addr,
            K,
            CHUNK_MS as u32,
            500,
            vec![Plan {
                parents: vec![Ref::DataPlane; K as usize],
                child_slots: 4,
            }],
            vec![],
        );
        let url = mini_cp::start(cp.clone()).await;
        let mut c = ViewerConfig::new(broadcast);
        c.control_url = url;
        c.transport = starling_proto::transport::Transport::Plaintext;
        c.http_listen = None;
        c.reconnect_initial = Duration::from_millis(10);
        c.reconnect_max = Duration::from_millis(200);
        c.target_lag = Duration::from_millis(1500);
        c.relay = RelayConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            advertise_host: None,
            max_upload_kbps: Some(10_000),
            // Every attacker here dials from 127.0.0.1: the per-address cap (tested in
            // loadtest/tests/squatting.rs) would refuse them before the limits under test.
            max_links_per_ip: 0,
            ..RelayConfig::new()
        };
        c.peer_limits = limits;
        // The source is unsigned and the fake control plane hands out no chunk keys:
        // these tests are about the peer listener, not chunk verification.
        c.allow_unverified = true;
        let viewer = Viewer::join(c).await.unwrap();
        tokio::time::timeout(GUARD, async {
            while viewer.stats().chunks_played < 10 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the relay never played");
        Relay {
            src,
            _dp: dp,
            cp,
            viewer,
        }
    }

    fn addr(&self) -> String {
        self.viewer.peer_addr().unwrap().to_string()
    }

    async fn stop(self) {
        self.viewer.leave().await.unwrap();
        self.src.stop();
    }
}

/// A raw connection to the listener.
struct Raw {
    s: TcpStream,
    dec: Decoder,
    buf: BytesMut,
}

impl Raw {
    async fn connect(addr: &str) -> Raw {
        Raw {
            s: TcpStream::connect(addr).await.unwrap(),
            dec: Decoder::new(Limits::default()),
            buf: BytesMut::new(),
        }
    }

    async fn send(&mut self, f: &Frame) {
        let mut out = BytesMut::new();
        wire::encode(f, &mut out).unwrap();
        let _ = self.s.write_all(&out).await;
    }

    async fn hello(&mut self, token: Bytes) {
        self.send(&Frame::Hello(Hello {
            min_version: wire::PROTOCOL_VERSION,
            max_version: wire::PROTOCOL_VERSION,
            role: Role::Peer,
            token,
        }))
        .await;
    }

    /// Reads `HELLO_ACK` and answers it with the `PROOF` of `key` for `token` on a
    /// link to `verifier`.
    async fn prove(&mut self, token: &[u8], key: &HolderKey, verifier: Verifier) {
        let nonce = loop {
            match self.next().await {
                Some(Frame::HelloAck(a)) => break a.nonce,
                Some(Frame::Ping(_)) => {}
                other => panic!("expected HELLO_ACK, got {other:?}"),
            }
        };
        let proof = key.prove(&nonce, token, verifier);
        self.send(&Frame::Proof(Bytes::copy_from_slice(&proof)))
            .await;
    }

    async fn subscribe(&mut self, broadcast: &str, mask: u64) {
        self.send(&Frame::Subscribe(Subscribe {
            broadcast_id: broadcast.into(),
            start: StartAt::Live,
            substream_mask: mask,
        }))
        .await;
    }

    /// The next frame (PINGs included); `None` at EOF or a reset.
    async fn next(&mut self) -> Option<Frame> {
        loop {
            if let Some(f) = self.dec.decode(&mut self.buf).unwrap() {
                return Some(f);
            }
            match self.s.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// Reads until the link ends; returns the code of the `ERROR`/`GOODBYE` it ended
    /// with (`None`: closed without one) and the chunks received before.
    async fn end(&mut self, bound: Duration) -> (Option<ErrorCode>, usize) {
        let mut chunks = 0;
        let r = tokio::time::timeout(bound, async {
            loop {
                match self.next().await {
                    Some(Frame::Error(r)) | Some(Frame::Goodbye(r)) => return Some(r.code),
                    Some(Frame::Chunk(_)) => chunks += 1,
                    Some(_) => {}
                    None => return None,
                }
            }
        })
        .await
        .expect("the listener never closed the link");
        (r, chunks)
    }

    /// `HELLO` (valid token), a parent ticket for each substream of `mask` (the relay
    /// is the first joiner: peer 1) and `SUBSCRIBE`: waits for `STREAM_INFO`.
    async fn admitted(addr: &str, cp: &MiniCp, peer_id: u64, mask: u64) -> Raw {
        let mut r = Raw::connect(addr).await;
        let token = cp.token(peer_id);
        r.hello(token.clone()).await;
        r.prove(&token, mini_cp::test_holder(), Verifier::Peer(1))
            .await;
        for s in (0..64).filter(|s| mask & (1u64 << s) != 0) {
            r.send(&Frame::Ticket(Bytes::from(cp.ticket(peer_id, 1, s))))
                .await;
        }
        r.subscribe(&cp.broadcast, mask).await;
        tokio::time::timeout(GUARD, async {
            loop {
                match r.next().await {
                    Some(Frame::StreamInfo(_)) => return,
                    Some(Frame::Ping(_)) => {}
                    other => panic!("not admitted: {other:?}"),
                }
            }
        })
        .await
        .unwrap();
        r
    }
}

/// The 8-byte header of a CHUNK declaring a 4 MiB payload (nothing follows).
fn big_chunk_header() -> [u8; 8] {
    let len = (4u32 * 1024 * 1024).to_be_bytes();
    [5, 0, 0, 0, len[0], len[1], len[2], len[3]]
}

/// Before admission a CHUNK header is refused at once, whatever it declares: before
/// the fix, the listener decoded with the 4 MiB chunk limit, reserved the buffer and
/// waited for the payload (256 such connections per viewer: 1 GiB) until its 10 s
/// handshake timeout, and closed without a word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_before_admission_is_refused_before_anything_is_buffered() {
    let relay = Relay::start("h1", PeerLimits::default()).await;
    // Instead of HELLO.
    let mut a = Raw::connect(&relay.addr()).await;
    a.s.write_all(&big_chunk_header()).await.unwrap();
    let (code, _) = a.end(Duration::from_secs(8)).await;
    assert_eq!(code, Some(ErrorCode::FrameTooLarge));
    // After HELLO, instead of SUBSCRIBE.
    let mut b = Raw::connect(&relay.addr()).await;
    b.hello(relay.cp.token(50)).await;
    let f = b.next().await;
    assert!(matches!(f, Some(Frame::HelloAck(_))), "{f:?}");
    b.s.write_all(&big_chunk_header()).await.unwrap();
    let (code, _) = b.end(Duration::from_secs(8)).await;
    assert_eq!(code, Some(ErrorCode::FrameTooLarge));
    // The relay is unharmed.
    let played = relay.viewer.stats().chunks_played;
    tokio::time::timeout(GUARD, async {
        while relay.viewer.stats().chunks_played < played + 5 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    relay.stop().await;
}

/// `HELLO`, then only PINGs: closed with `ERROR(IDLE_TIMEOUT)` at the handshake
/// deadline (before the fix: closed without a word, after a fixed 10 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_that_never_subscribes_is_closed_at_the_deadline() {
    let limits = PeerLimits {
        handshake_timeout: Duration::from_millis(800),
        ..PeerLimits::default()
    };
    let relay = Relay::start("h2", limits).await;
    let mut a = Raw::connect(&relay.addr()).await;
    a.hello(relay.cp.token(51)).await;
    assert!(matches!(a.next().await, Some(Frame::HelloAck(_))));
    let (mut rd, mut wr) = a.s.into_split();
    let pinger = tokio::spawn(async move {
        for n in 0u64.. {
            let mut out = BytesMut::new();
            wire::encode(&Frame::Ping(n), &mut out).unwrap();
            if wr.write_all(&out).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let code = tokio::time::timeout(GUARD, async {
        let mut dec = Decoder::new(Limits::default());
        let mut buf = a.buf;
        loop {
            while let Some(f) = dec.decode(&mut buf).unwrap() {
                if let Frame::Error(r) | Frame::Goodbye(r) = f {
                    return Some(r.code);
                }
            }
            match rd.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("pings kept the handshake alive");
    pinger.abort();
    assert_eq!(code, Some(ErrorCode::IdleTimeout));
    relay.stop().await;
}

/// Hundreds of connections that stall in their handshake: each one beyond the cap
/// evicts the oldest, so a real child still gets in and the child already admitted
/// keeps receiving. Before the fix the stalled connections took all 256 slots for 10 s
/// each and new children were refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_handshakes_cannot_keep_real_children_out() {
    let relay = Relay::start("h3", PeerLimits::default()).await;
    let addr = relay.addr();
    let mut child = Raw::admitted(&addr, &relay.cp, 60, 0b0001).await;
    // 300 attackers, each says HELLO with a valid token and stalls.
    let mut attackers = Vec::new();
    let mut answered = 0;
    for i in 0..300u64 {
        let mut a = Raw::connect(&addr).await;
        a.hello(relay.cp.token(1000 + i)).await;
        // HELLO_ACK while it has a slot; ERROR or EOF when refused or evicted.
        if let Ok(Some(Frame::HelloAck(_))) =
            tokio::time::timeout(Duration::from_secs(5), a.next()).await
        {
            answered += 1;
        }
        attackers.push(a);
    }
    assert!(answered > 0);
    // A real child subscribes now, while the attackers are still connected.
    let mut newcomer = Raw::admitted(&addr, &relay.cp, 61, 0b0010).await;
    // Both children receive chunks.
    for (who, c) in [("admitted child", &mut child), ("newcomer", &mut newcomer)] {
        let got = tokio::time::timeout(GUARD, async {
            let mut n = 0;
            while n < 5 {
                match c.next().await {
                    Some(Frame::Chunk(_)) => n += 1,
                    Some(Frame::Error(r)) | Some(Frame::Goodbye(r)) => return Err(r.code),
                    Some(_) => {}
                    None => return Err(ErrorCode::Normal),
                }
            }
            Ok(n)
        })
        .await
        .unwrap();
        assert_eq!(got, Ok(5), "{who}");
    }
    let stats = relay.viewer.stats();
    assert!(
        stats.peer_connections_refused >= 300 - 16,
        "beyond the cap the oldest handshakes are evicted: {stats}"
    );
    drop(attackers);
    relay.stop().await;
}

/// After admission, a neighbour or a child that sends a chunk it was not asked for is
/// closed with `ERROR(UNEXPECTED_FRAME)` (before the fix: ignored, link kept).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsolicited_chunk_after_admission_closes_the_link() {
    let relay = Relay::start("h4", PeerLimits::default()).await;
    let addr = relay.addr();
    for (peer, mask) in [(70u64, 0u64), (71, 0b0100)] {
        let mut a = Raw::admitted(&addr, &relay.cp, peer, mask).await;
        let seq = relay.src.newest().unwrap() + 1;
        a.send(&Frame::Chunk(Chunk {
            seq,
            flags: 0,
            timestamp_ms: mini_cp::now_ms(),
            duration_ms: CHUNK_MS as u32,
            signature: Bytes::new(),
            payload: Bytes::from(vec![7u8; 1000]),
        }))
        .await;
        let (code, _) = a.end(Duration::from_secs(10)).await;
        assert_eq!(code, Some(ErrorCode::UnexpectedFrame), "mask {mask:#b}");
    }
    assert_eq!(relay.viewer.stats().unsolicited_chunks, 2);
    relay.stop().await;
}

/// A neighbour's `REQUEST`s beyond its link's rate are answered `NOT_FOUND` unseen
/// (before the fix: every held chunk was served).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_the_link_rate_are_refused() {
    let limits = PeerLimits {
        requests_per_s: 1.0,
        request_burst: 4.0,
        ..PeerLimits::default()
    };
    let relay = Relay::start("h5", limits).await;
    let mut a = Raw::admitted(&relay.addr(), &relay.cp, 80, 0).await;
    // Enough chunks held for 40 requests.
    tokio::time::timeout(GUARD, async {
        while relay.viewer.stats().current_seq.unwrap_or(0) < 60 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    let newest = relay.viewer.stats().current_seq.unwrap();
    let seqs: Vec<u64> = (newest.saturating_sub(39)..=newest).collect();
    let t0 = Instant::now();
    for &s in &seqs {
        a.send(&Frame::Request(s)).await;
    }
    let (mut served, mut refused) = (0u64, 0u64);
    tokio::time::timeout(GUARD, async {
        while served + refused < seqs.len() as u64 {
            match a.next().await {
                Some(Frame::Chunk(_)) => served += 1,
                Some(Frame::NotFound(_)) => refused += 1,
                Some(Frame::Error(r)) | Some(Frame::Goodbye(r)) => panic!("closed: {r:?}"),
                Some(_) => {}
                None => panic!("closed"),
            }
        }
    })
    .await
    .unwrap();
    // The burst, plus what the rate refilled while the answers came (measured, so a
    // loaded machine only loosens the bound).
    let bound = 4 + t0.elapsed().as_secs() + 1;
    assert!(
        served <= bound,
        "{served} of {} requests served (bound {bound})",
        seqs.len()
    );
    assert!(relay.viewer.stats().peer_requests_refused >= seqs.len() as u64 - bound);
    relay.stop().await;
}
