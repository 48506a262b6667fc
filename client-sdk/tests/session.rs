//! The session stream from the SDK's side, against the in-test control plane
//! (`common::mini_cp`, which implements `ViewerService.Session` for real: a first
//! message with the full state, deltas the test pushes, versioned keys): deltas of
//! parents, token, keys and revocations reach the viewer; `active = false` stops it;
//! a broken stream is reopened with the key version held; counters go up at the
//! interval the control plane names; an `UNIMPLEMENTED` control plane gets unary
//! heartbeats; `Join` refused with a retry pushback is retried after it. Real loopback
//! sockets; timeouts only bound hangs, and time is only ever asserted from below.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::live::{LiveServer, Opts, RAP_EVERY, Source};
use common::mini_cp::{self, MiniCp, Plan, Ref};
use starling_proto::integrity::ChunkSigner;
use starling_proto::token::generate_pkcs8;
use starling_proto::v1::{PeerRef, SessionDown, SubstreamParent};
use starling_sdk::{RelayConfig, SdkError, Stats, Viewer, ViewerConfig};

const GUARD: Duration = Duration::from_secs(40);
const K: u16 = 4;
const CHUNK_MS: u64 = 100;
const PARENT: u64 = 99;

fn signer(key_id: u32) -> Arc<ChunkSigner> {
    Arc::new(ChunkSigner::new(key_id, &generate_pkcs8().unwrap()).unwrap())
}

fn key(s: &ChunkSigner) -> (u32, Vec<u8>) {
    (s.key_id(), s.public_key().to_vec())
}

fn config(broadcast: &str, url: &str) -> ViewerConfig {
    let mut c = ViewerConfig::new(broadcast);
    c.control_url = url.into();
    c.transport = starling_proto::transport::Transport::Plaintext;
    c.http_listen = None;
    c.reconnect_initial = Duration::from_millis(10);
    c.reconnect_max = Duration::from_millis(200);
    c.target_lag = Duration::from_millis(1500);
    c.relay = RelayConfig::disabled();
    c
}

async fn wait_until(what: &str, f: impl Fn() -> bool) {
    tokio::time::timeout(GUARD, async {
        while !f() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

async fn wait_stats(v: &Viewer, what: &str, f: impl Fn(&Stats) -> bool) -> Stats {
    wait_until(what, || f(&v.stats())).await;
    v.stats()
}

/// A data plane (signing with key 1), optionally a fake peer parent, and the fake
/// control plane with one plan (every substream from `parents`).
struct Setup {
    src: Source,
    _dp: LiveServer,
    parent: Option<(Source, LiveServer)>,
    cp: MiniCp,
    url: String,
    signer: Arc<ChunkSigner>,
}

impl Setup {
    async fn start(broadcast: &str, with_parent: bool, heartbeat_ms: u32) -> Setup {
        Setup::start_with(broadcast, with_parent, heartbeat_ms, |_| {}).await
    }

    async fn start_with(
        broadcast: &str,
        with_parent: bool,
        heartbeat_ms: u32,
        tune: impl FnOnce(&mut MiniCp),
    ) -> Setup {
        let a = signer(1);
        let src = Source::signed(K, CHUNK_MS, broadcast, a.clone());
        let dp = LiveServer::start(src.clone(), Opts::data_plane(broadcast)).await;
        let parent = if with_parent {
            let psrc = Source::signed(K, CHUNK_MS, broadcast, a.clone());
            let p = LiveServer::start(psrc.clone(), Opts::peer(broadcast)).await;
            Some((psrc, p))
        } else {
            None
        };
        src.wait_for(2 * RAP_EVERY).await;
        let parents = match &parent {
            Some((_, p)) => vec![Ref::Fixed(PARENT, p.addr.to_string()); usize::from(K)],
            None => vec![Ref::DataPlane; usize::from(K)],
        };
        let mut cp = mini_cp::new(
            broadcast,
            dp.addr,
            K,
            CHUNK_MS as u32,
            heartbeat_ms,
            vec![Plan {
                parents,
                child_slots: 0,
            }],
            vec![key(&a)],
        );
        tune(&mut cp);
        let url = mini_cp::start(cp.clone()).await;
        Setup {
            src,
            _dp: dp,
            parent,
            cp,
            url,
            signer: a,
        }
    }

    fn stop(&self) {
        self.src.stop();
        if let Some((p, _)) = &self.parent {
            p.stop();
        }
    }

    /// Waits until the viewer's first stream is open and registered.
    async fn stream_open(&self, n: usize) {
        wait_until("the session stream opened", || self.cp.opens().len() >= n).await;
    }
}

/// One substream's parent changes from the data plane to a peer: the relay engine
/// gets the assignment and dials that peer (the other substreams stay where they are:
/// the SDK's mirror of the session state, unit-tested in `viewer::session`, sends
/// the full assignment with that one change).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_delta_moves_that_substream_to_the_new_parent() {
    let s = Setup::start("ss1", false, 60_000).await;
    let peer = LiveServer::start(s.src.clone(), Opts::peer("ss1")).await;
    let v = Viewer::join(config("ss1", &s.url)).await.unwrap();
    s.stream_open(1).await;
    wait_stats(&v, "playing", |st| st.chunks_played >= 10).await;
    assert_eq!(v.stats().bytes_from_peers, 0);
    let pushed = s.cp.push(
        "s1",
        SessionDown {
            active: true,
            parents: vec![SubstreamParent {
                substream: 1,
                peer: Some(PeerRef {
                    peer_id: PARENT,
                    addr: peer.addr.to_string(),
                    punch: false,
                }),
                ticket: s.cp.ticket(1, PARENT, 1),
            }],
            ..SessionDown::default()
        },
    );
    assert_eq!(pushed, 1);
    let st = wait_stats(&v, "chunks from the new parent", |st| {
        st.bytes_from_peers > 0
    })
    .await;
    assert!(st.bytes_from_server > 0, "{st}");
    assert_eq!(s.cp.heartbeats(), 0, "no unary heartbeats on the stream");
    v.leave().await.unwrap();
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_token_is_applied() {
    let s = Setup::start("ss2", false, 60_000).await;
    let v = Viewer::join(config("ss2", &s.url)).await.unwrap();
    s.stream_open(1).await;
    assert_eq!(v.stats().token_renewals, 0);
    let token = s.cp.token(1);
    s.cp.push(
        "s1",
        SessionDown {
            active: true,
            chunk_token: token.to_vec(),
            token_expires_at_unix_ms: (mini_cp::now_ms() + 120_000) as i64,
            ..SessionDown::default()
        },
    );
    wait_stats(&v, "the token renewed", |st| st.token_renewals >= 1).await;
    v.leave().await.unwrap();
    s.stop();
}

/// New key sets arrive as a new version; after the stream breaks, the viewer reopens
/// it saying it holds that version (so unchanged keys are not resent), and keeps
/// playing meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_keys_are_applied_and_their_version_sent_when_the_stream_is_reopened() {
    let s = Setup::start("ss3", false, 60_000).await;
    let v = Viewer::join(config("ss3", &s.url)).await.unwrap();
    s.stream_open(1).await;
    // Join gives no key version: the first stream asks for the keys.
    assert_eq!(s.cp.opens()[0], ("s1".to_string(), 0));
    let b = signer(2);
    s.cp.set_chunk_keys(vec![key(&s.signer), key(&b)]);
    // The keys are queued before the break: the viewer reads them first.
    assert_eq!(s.cp.break_streams(), 1);
    s.stream_open(2).await;
    let opens = s.cp.opens();
    assert_eq!(opens[1], ("s1".to_string(), 2), "{opens:?}");
    let played = v.stats().chunks_played;
    wait_stats(&v, "playing on", |st| st.chunks_played >= played + 10).await;
    assert!(!v.is_closed());
    assert_eq!(s.cp.heartbeats(), 0);
    v.leave().await.unwrap();
    s.stop();
}

/// A broken stream (twice) is reopened, and the viewer plays on throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_stream_is_reopened_and_the_viewer_keeps_playing() {
    let s = Setup::start("ss4", false, 60_000).await;
    let v = Viewer::join(config("ss4", &s.url)).await.unwrap();
    for n in 1..=2 {
        s.stream_open(n).await;
        let played = v.stats().chunks_played;
        wait_stats(&v, "playing", |st| st.chunks_played >= played + 5).await;
        assert_eq!(s.cp.break_streams(), 1);
    }
    s.stream_open(3).await;
    let played = v.stats().chunks_played;
    wait_stats(&v, "playing on", |st| st.chunks_played >= played + 5).await;
    assert!(s.cp.opens().iter().all(|(sid, _)| sid == "s1"));
    v.leave().await.unwrap();
    s.stop();
}

/// A revoked parent's link is closed and its substreams re-parented away from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_parent_is_dropped() {
    let s = Setup::start("ss5", true, 60_000).await;
    let v = Viewer::join(config("ss5", &s.url)).await.unwrap();
    s.stream_open(1).await;
    wait_stats(&v, "chunks from the parent", |st| st.bytes_from_peers > 0).await;
    s.cp.revoke(&[PARENT]);
    wait_until("re-parenting away from the revoked parent", || {
        s.cp.log
            .lock()
            .reparents
            .iter()
            .any(|(sid, _, ex)| sid == "s1" && ex.contains(&PARENT))
    })
    .await;
    wait_stats(&v, "no peer links", |st| st.peer_links == 0).await;
    v.leave().await.unwrap();
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inactive_session_stops_the_viewer() {
    let s = Setup::start("ss6", false, 60_000).await;
    let v = Viewer::join(config("ss6", &s.url)).await.unwrap();
    s.stream_open(1).await;
    assert_eq!(s.cp.end_session("s1"), 1);
    let r = tokio::time::timeout(GUARD, v.closed()).await.unwrap();
    assert!(matches!(r, Err(SdkError::SessionInactive)), "{r:?}");
    s.stop();
}

/// Counters go up every `counters_interval_ms` the first message names (short here);
/// only counted, never timed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_are_sent_at_the_interval_the_control_plane_names() {
    let s = Setup::start_with("ss7", false, 60_000, |cp| {
        cp.session.lock().counters_interval_ms = 100;
    })
    .await;
    let v = Viewer::join(config("ss7", &s.url)).await.unwrap();
    wait_until("5 counter updates", || s.cp.ups_of("s1") >= 5).await;
    let last =
        s.cp.session
            .lock()
            .ups
            .last()
            .map(|(_, u)| u.bytes_from_server)
            .unwrap();
    assert!(last > 0, "cumulative counters");
    assert_eq!(s.cp.heartbeats(), 0);
    v.leave().await.unwrap();
    s.stop();
}

/// An older control plane (`UNIMPLEMENTED`): unary heartbeats, as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_session_stream_the_viewer_heartbeats() {
    let s = Setup::start_with("ss8", false, 100, |cp| {
        cp.session.lock().unimplemented = true;
    })
    .await;
    let v = Viewer::join(config("ss8", &s.url)).await.unwrap();
    wait_until("3 heartbeats", || s.cp.heartbeats() >= 3).await;
    let played = v.stats().chunks_played;
    wait_stats(&v, "playing", |st| st.chunks_played >= played + 5).await;
    v.leave().await.unwrap();
    s.stop();
}

/// `session_stream = false`: unary heartbeats only, no stream is opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_can_be_turned_off() {
    let s = Setup::start("ss9", false, 100).await;
    let mut c = config("ss9", &s.url);
    c.session_stream = false;
    let v = Viewer::join(c).await.unwrap();
    wait_until("3 heartbeats", || s.cp.heartbeats() >= 3).await;
    assert!(s.cp.opens().is_empty());
    v.leave().await.unwrap();
    s.stop();
}

/// A flash crowd: `Join` is refused twice with `RESOURCE_EXHAUSTED` and a 300 ms retry
/// pushback, then admitted: the SDK joins on the third attempt, each retry at least
/// the pushback after the refusal (jitter only adds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_is_retried_after_the_retry_pushback() {
    let s = Setup::start_with("ss10", false, 60_000, |cp| {
        *cp.join_busy.lock() = (2, 300);
    })
    .await;
    let v = Viewer::join(config("ss10", &s.url)).await.unwrap();
    let attempts = s.cp.log.lock().join_attempts.clone();
    assert_eq!(attempts.len(), 3, "{attempts:?}");
    assert_eq!(s.cp.log.lock().joins.len(), 1);
    for w in attempts.windows(2) {
        let gap = w[1].duration_since(w[0]);
        assert!(gap >= Duration::from_millis(300), "{gap:?}");
    }
    v.leave().await.unwrap();
    s.stop();
}

/// Refused more often than `join_attempts` allows: the error comes back typed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_gives_up_after_its_attempts() {
    let s = Setup::start_with("ss11", false, 60_000, |cp| {
        *cp.join_busy.lock() = (10, 20);
    })
    .await;
    let mut c = config("ss11", &s.url);
    c.join_attempts = 2;
    let r = Viewer::join(c).await;
    assert!(
        matches!(r, Err(SdkError::ControlBusy { retry_after: Some(d), .. }) if d == Duration::from_millis(20)),
        "{:?}",
        r.err()
    );
    assert_eq!(s.cp.log.lock().join_attempts.len(), 2);
    s.stop();
}

/// A `Join` answer without chunk keys (a legacy control plane, or a man in the middle
/// who stripped them) is an error, not a fallback to unverified play; the session is
/// left. With `allow_unverified` the viewer plays, and counts its chunks unverified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_without_chunk_keys_is_refused_unless_unverified_play_is_allowed() {
    let s = Setup::start_with("ss9", false, 60_000, |cp| {
        cp.join_chunk_keys = Some(Vec::new());
    })
    .await;
    let e = match Viewer::join(config("ss9", &s.url)).await {
        Ok(_) => panic!("a viewer joined without chunk keys"),
        Err(e) => e,
    };
    assert!(matches!(e, SdkError::Unverifiable(_)), "{e}");
    assert!(e.is_fatal(), "{e}");
    wait_until("the refused session left", || s.cp.leaves() >= 1).await;
    s.stop();

    // The fake control plane has one plan per Join: a second one for the second viewer.
    let s = Setup::start_with("ss10", false, 60_000, |cp| {
        cp.join_chunk_keys = Some(Vec::new());
    })
    .await;
    let mut insecure = config("ss10", &s.url);
    insecure.allow_unverified = true;
    insecure.session_stream = false; // the stream's first message would bring keys
    let v = Viewer::join(insecure).await.unwrap();
    let st = wait_stats(&v, "playing unverified", |st| st.chunks_played >= 5).await;
    assert!(st.chunks_unverified >= 5, "{st}");
    assert_eq!(st.chunks_verified, 0, "{st}");
    v.leave().await.unwrap();
    s.stop();
}
