//! Issue 4's acceptance tests (rights and integrity), end to end over real sockets:
//!
//! 1. `credentials_and_admin_bearer`: a non-public broadcast refuses SDK viewers with no,
//!    forged, expired or wrong-broadcast credentials with typed errors, plays for a
//!    valid JWT (byte-identical output); admin calls without the bearer (or with a wrong
//!    one) are `UNAUTHENTICATED`.
//! 2. `revocation_cuts_off_data_plane_at_once_and_peers_within_a_token_lifetime`: 12 SDK
//!    peers relaying, each with its own JWT subject, 10 s chunk tokens. One peer that
//!    has children is revoked by subject; a second session of the same subject (a raw
//!    wire client that keeps its links and keeps re-dialling with its last token) shows
//!    what a revoked viewer that does not give up gets: nothing from the data plane
//!    after the revocation (beyond chunks already in flight), nothing from peers after
//!    its last token's expiry + skew + a heartbeat. Everyone else keeps playing
//!    (continuity ≥ 99 %, byte-identical output).
//! 3. `polluter_cannot_reach_a_player`: 50 SDK peers plus one malicious peer written
//!    here with the raw wire codec. It joins with a large upload budget, relays honestly
//!    until it has children, then sends corrupted payloads (the real signature block,
//!    one payload byte flipped) and forged chunks (random payload signed with its own
//!    key under the data plane's key id), and answers REQUESTs with corrupted chunks,
//!    while it keeps heartbeating. No honest output differs from the source by a byte,
//!    every honest peer keeps continuity ≥ 99 %, its children report it, and at the end
//!    nobody is subscribed to it although its session is still alive.
//!
//! Thresholds are on counters and on the protocol's own timestamps (token expiry);
//! sleeps only pace the scenario, timeouts are hang guards.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failure is a panic

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{DialError, Issuer, RawConn, env_or, init_tracing, raw_holder, unix_ms, write_frame};
use starling_loadtest::{
    Deployment, DeploymentConfig, OutputCheck, Report, Swarm, SwarmConfig, UploadProfile, peer_ip,
};
use starling_proto::holder::Verifier;
use starling_proto::integrity::{ChunkMeta, ChunkSigner, parse_block};
use starling_proto::v1::admin_service_client::AdminServiceClient;
use starling_proto::v1::viewer_service_client::ViewerServiceClient;
use starling_proto::v1::{
    BroadcastRef, HeartbeatRequest, JoinRequest, ListBroadcastsRequest, RevokeViewerRequest,
};
use starling_proto::wire::{
    self, BufferMapFrame, Chunk, ErrorCode, Frame, HelloAck, Reason, Role, StreamInfo, chunk_flags,
};
use starling_sdk::{SdkError, Viewer, ViewerConfig};
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;

fn check(failures: &mut Vec<String>, ok: bool, what: String) {
    if !ok {
        eprintln!("FAIL: {what}");
        failures.push(what);
    }
}

fn viewer_config(dep: &Deployment, credential: Option<String>) -> ViewerConfig {
    let mut vc = ViewerConfig::new(dep.broadcast_id());
    vc.control_url = dep.control_url();
    vc.transport = dep.transport();
    vc.http_listen = None;
    vc.credential = credential;
    vc
}

fn rejected_code(e: &SdkError) -> Option<tonic::Code> {
    match e {
        SdkError::ControlRejected { code, .. } => Some(*code),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------
// 1. Credentials
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_and_admin_bearer() {
    init_tracing();
    let issuer = Issuer::generate();
    let other = Issuer::generate();
    let dep = Deployment::start(DeploymentConfig {
        public: false,
        viewer_jwt_keys: vec![issuer.credential_key()],
        ..DeploymentConfig::default()
    })
    .await
    .expect("deployment");
    let bid = dep.broadcast_id().to_string();
    let mut failures = Vec::new();

    // Viewers that must not get in, each with the code it must get.
    let now = common::unix_secs();
    let cases: Vec<(&str, Option<String>, tonic::Code)> = vec![
        ("no credential", None, tonic::Code::Unauthenticated),
        (
            "garbage",
            Some("not-a-jwt".into()),
            tonic::Code::Unauthenticated,
        ),
        (
            "signed by another key",
            Some(other.viewer("mallory", &bid)),
            tonic::Code::Unauthenticated,
        ),
        (
            "expired",
            Some(issuer.mint(&serde_json::json!({
                "sub": "late", "broadcast": bid, "iat": now - 7200, "exp": now - 3600,
                "aud": starling_loadtest::deployment::VIEWER_JWT_AUDIENCE,
                "iss": starling_loadtest::deployment::VIEWER_JWT_ISSUER,
            }))),
            tonic::Code::Unauthenticated,
        ),
        (
            "for another service",
            Some(issuer.mint(&serde_json::json!({
                "sub": "elsewhere", "broadcast": bid, "iat": now, "exp": now + 600,
                "aud": "some-other-service",
                "iss": starling_loadtest::deployment::VIEWER_JWT_ISSUER,
            }))),
            tonic::Code::Unauthenticated,
        ),
        (
            "another broadcast",
            Some(issuer.viewer("elsewhere", "some-other-broadcast")),
            tonic::Code::PermissionDenied,
        ),
    ];
    for (what, cred, want) in cases {
        match Viewer::join(viewer_config(&dep, cred)).await {
            Ok(v) => {
                failures.push(format!("viewer with {what} joined"));
                let _ = v.leave().await;
            }
            Err(e) => {
                println!("{what}: refused: {e}");
                check(
                    &mut failures,
                    rejected_code(&e) == Some(want) && e.is_fatal(),
                    format!("{what}: expected ControlRejected({want:?}), got {e:?}"),
                );
            }
        }
    }

    // A valid credential joins and plays the source byte for byte.
    let viewer = Viewer::join(viewer_config(&dep, Some(issuer.viewer("alice", &bid))))
        .await
        .expect("viewer with a valid credential");
    let pattern = dep.source().pattern();
    let mut sub = viewer.subscribe();
    let mut out = OutputCheck::default();
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        while out.bytes < 200_000 {
            match sub.next_bytes().await {
                Some(b) => out.feed(&pattern, &b),
                None => break,
            }
        }
    })
    .await;
    println!(
        "valid credential: {} bytes checked, {}",
        out.bytes,
        viewer.stats()
    );
    check(
        &mut failures,
        out.bytes >= 200_000 && out.identical(),
        format!(
            "valid viewer's output: {} bytes, problems {:?}",
            out.bytes, out.problems
        ),
    );
    check(
        &mut failures,
        viewer.stats().chunks_verified > 0 && viewer.stats().chunks_unverified == 0,
        format!("chunks not verified: {}", viewer.stats()),
    );
    let _ = viewer.leave().await;

    // Admin calls: no bearer, a wrong bearer, then the right one.
    let mut bare = AdminServiceClient::new(dep.channel().await.expect("connect"));
    match bare.get_broadcast(BroadcastRef { id: bid.clone() }).await {
        Ok(_) => failures.push("admin call without bearer succeeded".into()),
        Err(s) => {
            println!("admin without bearer: {:?}: {}", s.code(), s.message());
            check(
                &mut failures,
                s.code() == tonic::Code::Unauthenticated,
                format!("admin without bearer: {:?}", s.code()),
            );
        }
    }
    let mut wrong = starling_loadtest::deployment::admin_client(
        &dep.control_url(),
        "this-is-not-the-admin-key-0123456789",
        &dep.transport(),
    )
    .await
    .expect("client");
    match wrong
        .list_broadcasts(ListBroadcastsRequest::default())
        .await
    {
        Ok(_) => failures.push("admin call with a wrong bearer succeeded".into()),
        Err(s) => check(
            &mut failures,
            s.code() == tonic::Code::Unauthenticated && !s.message().contains(dep.admin_key()),
            format!("admin with wrong bearer: {:?} {}", s.code(), s.message()),
        ),
    }
    check(
        &mut failures,
        dep.admin()
            .list_broadcasts(ListBroadcastsRequest::default())
            .await
            .is_ok(),
        "admin call with the bearer failed".into(),
    );
    dep.shutdown().await;
    assert!(failures.is_empty(), "failed:\n{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------------
// 2. Revocation
// ---------------------------------------------------------------------------------

/// A second session of the revoked subject, on the raw wire: it keeps every link it
/// has and re-dials the data plane and its parent peers with its last token.
struct Shadow {
    revoked_at_ms: AtomicU64,
    dp_chunks: AtomicU64,
    dp_chunks_after_revoke: AtomicU64,
    dp_dials_ok_after_revoke: AtomicU64,
    peer_bytes: AtomicU64,
    peer_bytes_after_revoke: AtomicU64,
    last_peer_chunk_ms: AtomicU64,
    peer_dials_ok_after_revoke: AtomicU64,
    refusals: Mutex<Vec<(bool, ErrorCode)>>,
    token_expires_ms: AtomicU64,
    hb_active: AtomicBool,
    renewals_after_revoke: AtomicU64,
}

#[allow(clippy::too_many_arguments)]
async fn shadow_link(
    sh: Arc<Shadow>,
    addr: String,
    role: Role,
    bid: String,
    mask: u64,
    tickets: Vec<Bytes>,
    mut token: watch::Receiver<Bytes>,
    verifier: Verifier,
) {
    let is_dp = role == Role::Viewer;
    loop {
        let tok = token.borrow_and_update().clone();
        match RawConn::dial_ticketed(&addr, role, tok, &bid, mask, &tickets, verifier).await {
            Ok((mut c, _info)) => {
                if sh.revoked_at_ms.load(Ordering::SeqCst) != 0 {
                    if is_dp {
                        &sh.dp_dials_ok_after_revoke
                    } else {
                        &sh.peer_dials_ok_after_revoke
                    }
                    .fetch_add(1, Ordering::SeqCst);
                }
                loop {
                    tokio::select! {
                        f = c.next() => match f {
                            Ok(Some(Frame::Chunk(ch))) => {
                                let revoked = sh.revoked_at_ms.load(Ordering::SeqCst) != 0;
                                let n = ch.payload.len() as u64;
                                if is_dp {
                                    sh.dp_chunks.fetch_add(1, Ordering::SeqCst);
                                    if revoked {
                                        sh.dp_chunks_after_revoke.fetch_add(1, Ordering::SeqCst);
                                    }
                                } else {
                                    sh.peer_bytes.fetch_add(n, Ordering::SeqCst);
                                    if revoked {
                                        sh.peer_bytes_after_revoke.fetch_add(n, Ordering::SeqCst);
                                    }
                                    sh.last_peer_chunk_ms.fetch_max(unix_ms(), Ordering::SeqCst);
                                }
                            }
                            Ok(Some(Frame::Ping(n))) => {
                                if c.send(&Frame::Pong(n)).await.is_err() { break; }
                            }
                            Ok(Some(Frame::Error(r) | Frame::Goodbye(r))) => {
                                sh.refusals.lock().unwrap().push((is_dp, r.code));
                                break;
                            }
                            Ok(Some(_)) => {}
                            Ok(None) | Err(_) => break,
                        },
                        r = token.changed() => {
                            if r.is_err() { return; }
                            let t = token.borrow_and_update().clone();
                            if c.send(&Frame::Token(t)).await.is_err() { break; }
                        }
                    }
                }
            }
            Err(DialError::Refused(r)) => sh.refusals.lock().unwrap().push((is_dp, r.code)),
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_cuts_off_data_plane_at_once_and_peers_within_a_token_lifetime() {
    init_tracing();
    let peers = env_or("STARLING_REVOKE_PEERS", 12) as usize;
    let token_ttl = Duration::from_secs(10);
    let skew_ms = 5_000u64; // the SDK's and the data plane's token skew
    let issuer = Arc::new(Issuer::generate());
    let dep = Deployment::start(DeploymentConfig {
        public: false,
        viewer_jwt_keys: vec![issuer.credential_key()],
        token_ttl: Some(token_ttl),
        ..DeploymentConfig::default()
    })
    .await
    .expect("deployment");
    let bid = dep.broadcast_id().to_string();
    let hb_ms = dep.config().heartbeat_interval.as_millis() as u64;
    let chunk_bytes = u64::from(dep.source().bitrate_kbps()) * u64::from(dep.config().chunk_ms) / 8;

    let swarm = Swarm::new(&dep);
    {
        let issuer = issuer.clone();
        let bid = bid.clone();
        swarm.set_credentials(move |i| Some(issuer.viewer(&format!("viewer-{i}"), &bid)));
    }
    swarm
        .add_peers(&SwarmConfig {
            peers,
            upload: UploadProfile::uniform(2.0),
            ..SwarmConfig::default()
        })
        .await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let mut failures = Vec::new();

    // The target: the peer with the most children.
    let presence = swarm.presence();
    let (target, children) = presence
        .iter()
        .filter_map(|p| Some((p.index, p.stats.as_ref()?.children)))
        .max_by_key(|&(_, c)| c)
        .expect("peers");
    println!("target: peer {target} with {children} children");
    check(
        &mut failures,
        children > 0,
        format!("no peer has children after 8 s ({peers} peers)"),
    );
    let subject = format!("viewer-{target}");

    // The shadow: same subject, raw wire, not relaying.
    let mut vs = ViewerServiceClient::new(dep.channel().await.expect("viewer client"));
    let join = vs
        .join(JoinRequest {
            holder_key: raw_holder().public_key().to_vec(),
            broadcast_id: bid.clone(),
            credential: issuer.viewer(&subject, &bid),
            client_version: "rights-test-shadow".into(),
            peer_addr: String::new(),
            upload_kbps: 0,
            mac_tickets: false,
            host_addr: String::new(),
        })
        .await
        .expect("shadow join")
        .into_inner();
    let sh = Arc::new(Shadow {
        revoked_at_ms: AtomicU64::new(0),
        dp_chunks: AtomicU64::new(0),
        dp_chunks_after_revoke: AtomicU64::new(0),
        dp_dials_ok_after_revoke: AtomicU64::new(0),
        peer_bytes: AtomicU64::new(0),
        peer_bytes_after_revoke: AtomicU64::new(0),
        last_peer_chunk_ms: AtomicU64::new(0),
        peer_dials_ok_after_revoke: AtomicU64::new(0),
        refusals: Mutex::new(Vec::new()),
        token_expires_ms: AtomicU64::new(join.token_expires_at_unix_ms as u64),
        hb_active: AtomicBool::new(true),
        renewals_after_revoke: AtomicU64::new(0),
    });
    let (tok_tx, tok_rx) = watch::channel(Bytes::from(join.chunk_token.clone()));
    let k = join.params.as_ref().map_or(4, |p| p.substreams.max(1));
    // Its parents, with the tickets the control plane signed for it (an assigned child).
    let mut by_parent: BTreeMap<String, (u64, Vec<Bytes>)> = BTreeMap::new();
    let mut parent_ids: BTreeMap<String, u64> = BTreeMap::new();
    let mut dp_mask = 0u64;
    for p in &join.parents {
        match &p.peer {
            Some(peer) => {
                parent_ids.insert(peer.addr.clone(), peer.peer_id);
                let e = by_parent.entry(peer.addr.clone()).or_default();
                e.0 |= 1 << p.substream;
                e.1.push(Bytes::from(p.ticket.clone()));
            }
            None => dp_mask |= 1 << p.substream,
        }
    }
    println!(
        "shadow: session {}, K={k}, parents {:?}, data-plane mask {dp_mask:#x}",
        join.session_id,
        by_parent
            .iter()
            .map(|(a, (m, _))| (a, m))
            .collect::<Vec<_>>()
    );
    let mut tasks: Vec<JoinHandle<()>> = Vec::new();
    tasks.push(tokio::spawn(shadow_link(
        sh.clone(),
        join.dataplane_wire_addr.clone(),
        Role::Viewer,
        bid.clone(),
        wire::ALL_SUBSTREAMS,
        Vec::new(),
        tok_rx.clone(),
        Verifier::DataPlane,
    )));
    for (addr, (mask, tickets)) in &by_parent {
        tasks.push(tokio::spawn(shadow_link(
            sh.clone(),
            addr.clone(),
            Role::Peer,
            bid.clone(),
            *mask,
            tickets.clone(),
            tok_rx.clone(),
            Verifier::Peer(parent_ids.get(addr).copied().unwrap_or(0)),
        )));
    }
    {
        let sh = sh.clone();
        let mut vs = vs.clone();
        let session = join.session_id.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(hb_ms));
            loop {
                tick.tick().await;
                let Ok(r) = vs
                    .heartbeat(HeartbeatRequest {
                        session_id: session.clone(),
                        ..HeartbeatRequest::default()
                    })
                    .await
                else {
                    continue;
                };
                let r = r.into_inner();
                sh.hb_active.store(r.active, Ordering::SeqCst);
                if !r.chunk_token.is_empty() {
                    if sh.revoked_at_ms.load(Ordering::SeqCst) != 0 {
                        sh.renewals_after_revoke.fetch_add(1, Ordering::SeqCst);
                    }
                    sh.token_expires_ms
                        .store(r.token_expires_at_unix_ms as u64, Ordering::SeqCst);
                    let _ = tok_tx.send(Bytes::from(r.chunk_token));
                }
            }
        }));
    }
    // Long enough for a token renewal (at half the lifetime) to be exercised.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let peer_bytes_before = sh.peer_bytes.load(Ordering::SeqCst);
    let dp_chunks_before = sh.dp_chunks.load(Ordering::SeqCst);
    println!(
        "shadow before revocation: {dp_chunks_before} chunks from the data plane, {peer_bytes_before} bytes from peers"
    );
    check(
        &mut failures,
        dp_chunks_before > 0 && peer_bytes_before > 0,
        format!(
            "the shadow must receive from the data plane and from peers before the revocation: {dp_chunks_before} chunks / {peer_bytes_before} bytes"
        ),
    );

    // Revoke the subject.
    let before = swarm.sample();
    let target_before = swarm.stats(target).expect("target stats");
    let resp = dep
        .admin()
        .revoke_viewer(RevokeViewerRequest {
            broadcast_id: bid.clone(),
            subject: subject.clone(),
            session_id: String::new(),
        })
        .await
        .expect("RevokeViewer")
        .into_inner();
    sh.revoked_at_ms.store(unix_ms(), Ordering::SeqCst);
    let target_at_revoke = swarm.stats(target).expect("target stats");
    println!("revoked {} sessions of {subject}", resp.revoked_sessions);
    check(
        &mut failures,
        resp.revoked_sessions == 2,
        format!("revoked_sessions {} != 2", resp.revoked_sessions),
    );

    // Pace: past the last token's expiry + skew + a heartbeat, plus a few seconds.
    let expiry = sh.token_expires_ms.load(Ordering::SeqCst);
    let bound_ms = expiry + skew_ms + hb_ms;
    let wait_until = bound_ms + 3_000;
    let t2 = tokio::time::Instant::now() + Duration::from_secs(2);
    tokio::time::sleep_until(t2).await;
    let target_2s = swarm.stats(target).expect("target stats");
    let now = unix_ms();
    if wait_until > now {
        tokio::time::sleep(Duration::from_millis(wait_until - now)).await;
    }
    let after = swarm.sample();
    let target_end = swarm.stats(target).expect("target stats");
    let end_reason = swarm.end_reason(target);
    for t in &tasks {
        t.abort();
    }

    // The SDK viewer: stopped with a revocation, nothing more from the data plane.
    println!("target at revocation: {target_at_revoke}\ntarget at the end: {target_end}");
    println!("target end reason: {end_reason:?}");
    let revoked_reason = matches!(
        &end_reason,
        Some(Err(e)) if matches!(e, SdkError::SessionInactive)
            || matches!(e.server_code(), Some(ErrorCode::Revoked | ErrorCode::Unauthorized | ErrorCode::TokenExpired))
    );
    check(
        &mut failures,
        revoked_reason,
        format!("the revoked SDK viewer did not stop with a revocation: {end_reason:?}"),
    );
    let in_flight = 2 * chunk_bytes;
    let dp_after = target_2s
        .bytes_from_server
        .saturating_sub(target_at_revoke.bytes_from_server);
    check(
        &mut failures,
        dp_after <= in_flight && target_end.bytes_from_server == target_2s.bytes_from_server,
        format!(
            "revoked SDK viewer: {dp_after} bytes from the data plane after revocation (in flight ≤ {in_flight}), then {} more",
            target_end.bytes_from_server - target_2s.bytes_from_server
        ),
    );
    check(
        &mut failures,
        target_end.bytes_from_peers == target_2s.bytes_from_peers,
        "revoked SDK viewer still receives from peers".into(),
    );
    let _ = target_before;

    // The shadow, which never gives up.
    let refusals = sh.refusals.lock().unwrap().clone();
    let last_peer = sh.last_peer_chunk_ms.load(Ordering::SeqCst);
    let revoked_at = sh.revoked_at_ms.load(Ordering::SeqCst);
    println!(
        "shadow after revocation: {} data-plane chunks, {} data-plane re-dials accepted, {} peer bytes (last peer chunk {} ms after the revocation; bound {} ms), {} peer re-dials accepted, {} renewals, heartbeat active {}; refusals {:?}",
        sh.dp_chunks_after_revoke.load(Ordering::SeqCst),
        sh.dp_dials_ok_after_revoke.load(Ordering::SeqCst),
        sh.peer_bytes_after_revoke.load(Ordering::SeqCst),
        last_peer as i64 - revoked_at as i64,
        bound_ms as i64 - revoked_at as i64,
        sh.peer_dials_ok_after_revoke.load(Ordering::SeqCst),
        sh.renewals_after_revoke.load(Ordering::SeqCst),
        sh.hb_active.load(Ordering::SeqCst),
        refusals
            .iter()
            .fold(BTreeMap::<String, usize>::new(), |mut m, (dp, c)| {
                *m.entry(format!("{}:{c:?}", if *dp { "data plane" } else { "peer" }))
                    .or_default() += 1;
                m
            })
    );
    check(
        &mut failures,
        sh.dp_chunks_after_revoke.load(Ordering::SeqCst) <= 2
            && sh.dp_dials_ok_after_revoke.load(Ordering::SeqCst) == 0,
        "the data plane kept serving the revoked shadow".into(),
    );
    check(
        &mut failures,
        refusals
            .iter()
            .any(|(dp, c)| *dp && matches!(c, ErrorCode::Revoked | ErrorCode::Unauthorized)),
        "the data plane never refused the revoked shadow with REVOKED/UNAUTHORIZED".into(),
    );
    check(
        &mut failures,
        last_peer <= bound_ms,
        format!(
            "a peer served the revoked shadow {} ms after its token's expiry + skew + heartbeat",
            last_peer.saturating_sub(bound_ms)
        ),
    );
    check(
        &mut failures,
        sh.renewals_after_revoke.load(Ordering::SeqCst) == 0
            && !sh.hb_active.load(Ordering::SeqCst),
        "the revoked shadow's session was renewed or is still active".into(),
    );

    // Everyone else keeps playing.
    let r = Report::between(Some(&before), &after);
    let others: Vec<_> = r.per_peer.iter().filter(|p| p.index != target).collect();
    println!(
        "--- the other {} peers over the revocation ---\n{r}",
        others.len()
    );
    check(
        &mut failures,
        others.len() == peers - 1,
        format!(
            "{} other peers active, expected {}",
            others.len(),
            peers - 1
        ),
    );
    let below: Vec<_> = others
        .iter()
        .filter(|p| p.continuity < 0.99 || !p.identical)
        .map(|p| (p.index, p.continuity, p.identical, p.problems.clone()))
        .collect();
    check(
        &mut failures,
        below.is_empty(),
        format!("peers below 99 % continuity or not identical: {below:?}"),
    );
    swarm.shutdown().await;
    dep.shutdown().await;
    assert!(failures.is_empty(), "failed:\n{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------------
// 3. Pollution
// ---------------------------------------------------------------------------------

/// The malicious peer's shared state.
struct Polluter {
    bid: String,
    info: Mutex<Option<StreamInfo>>,
    chunks: Mutex<BTreeMap<u64, Chunk>>,
    new_chunks: broadcast::Sender<Chunk>,
    malicious: AtomicBool,
    forger_pkcs8: Vec<u8>,
    children_now: AtomicUsize,
    children_peak: AtomicUsize,
    child_ids: Mutex<HashMap<u64, u64>>,
    links: AtomicU64,
    honest_sent: AtomicU64,
    corrupted_sent: AtomicU64,
    forged_sent: AtomicU64,
    bad_answers: AtomicU64,
    /// Links that were sent a bad chunk so far (see [`Polluter::bad`]).
    next_victim: AtomicU64,
    /// Peer ids sent at least one bad chunk, and those that answered ERROR(BAD_CHUNK).
    victims: Mutex<HashSet<u64>>,
    reporters: Mutex<HashSet<u64>>,
    from_server: AtomicU64,
    uploaded: AtomicU64,
    hb_active: AtomicBool,
    hb_ok: AtomicU64,
    /// Parent tickets its children presented (they were assigned to it for real).
    tickets: AtomicU64,
}

impl Polluter {
    fn corrupt(&self, c: &Chunk) -> Chunk {
        let mut p = c.payload.to_vec();
        let i = p.len() / 2;
        if let Some(b) = p.get_mut(i) {
            *b ^= 0x01;
        }
        Chunk {
            payload: Bytes::from(p),
            ..c.clone()
        }
    }

    fn forge(&self, c: &Chunk) -> Chunk {
        let key_id = parse_block(&c.signature).map_or(1, |b| b.key_id);
        let payload: Vec<u8> = (0..c.payload.len() as u64)
            .map(|i| ((i ^ c.seq).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
            .collect();
        let meta = ChunkMeta {
            seq: c.seq,
            flags: c.flags & !chunk_flags::DISCONTINUITY,
            timestamp_ms: c.timestamp_ms,
            duration_ms: c.duration_ms,
        };
        let signer = ChunkSigner::new(key_id, &self.forger_pkcs8).expect("signer");
        let signature = signer.sign(&self.bid, &meta, &payload).expect("sign");
        Chunk {
            signature,
            payload: Bytes::from(payload),
            ..c.clone()
        }
    }

    /// The `n`-th bad chunk: even `n` corrupted, odd `n` forged. Each link numbers its
    /// bad pushes from the link's victim index (`next_victim`, taken at its first bad
    /// push), so the first victim gets a corrupted chunk first, the second a forged one,
    /// and so on: with two victims or more both kinds are sent whatever the timing (a
    /// victim drops the link at its first bad chunk, so it usually sees only one).
    fn bad(&self, c: &Chunk, n: u64, peer: Option<u64>) -> Chunk {
        if let Some(p) = peer {
            self.victims.lock().unwrap().insert(p);
        }
        if n.is_multiple_of(2) {
            self.corrupted_sent.fetch_add(1, Ordering::SeqCst);
            self.corrupt(c)
        } else {
            self.forged_sent.fetch_add(1, Ordering::SeqCst);
            self.forge(c)
        }
    }

    fn buffer_map(&self) -> Option<Frame> {
        let chunks = self.chunks.lock().unwrap();
        let first = *chunks.keys().next()?;
        let last = *chunks.keys().next_back()?;
        let len = (last - first + 1).min(u64::from(wire::MAX_BUFFER_MAP_BITS)) as u16;
        let mut bits = vec![0u8; usize::from(len).div_ceil(8)];
        for s in chunks.keys() {
            let i = (s - first) as usize;
            if i < usize::from(len) {
                bits[i / 8] |= 0x80 >> (i % 8);
            }
        }
        Some(Frame::BufferMap(BufferMapFrame {
            base: first,
            len,
            bits: Bytes::from(bits),
        }))
    }
}

async fn polluter_dp(p: Arc<Polluter>, addr: String, token: Bytes, ready: mpsc::Sender<()>) {
    loop {
        if let Ok((mut c, info)) = RawConn::dial(
            &addr,
            Role::Viewer,
            token.clone(),
            &p.bid,
            wire::ALL_SUBSTREAMS,
            Verifier::DataPlane,
        )
        .await
        {
            *p.info.lock().unwrap() = Some(info);
            let _ = ready.try_send(());
            loop {
                match c.next().await {
                    Ok(Some(Frame::Chunk(mut ch))) => {
                        ch.flags &= !chunk_flags::DISCONTINUITY;
                        p.from_server
                            .fetch_add(ch.payload.len() as u64, Ordering::Relaxed);
                        {
                            let mut m = p.chunks.lock().unwrap();
                            m.insert(ch.seq, ch.clone());
                            while m.len() > 64 {
                                m.pop_first();
                            }
                        }
                        let _ = p.new_chunks.send(ch);
                    }
                    Ok(Some(Frame::Ping(n))) => {
                        if c.send(&Frame::Pong(n)).await.is_err() {
                            break;
                        }
                    }
                    Ok(Some(Frame::Error(_) | Frame::Goodbye(_))) | Ok(None) | Err(_) => break,
                    Ok(Some(_)) => {}
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn polluter_conn(p: Arc<Polluter>, stream: tokio::net::TcpStream, conn_id: u64) {
    let mut c = RawConn::new(stream);
    let hello = match tokio::time::timeout(Duration::from_secs(10), c.next()).await {
        Ok(Ok(Some(Frame::Hello(h)))) => h,
        _ => return,
    };
    let peer = starling_proto::token::peek_unverified(&hello.token)
        .ok()
        .map(|(_, claims)| claims.peer_id);
    // The child's PROOF that follows is not checked (nor answered) here.
    let ack = HelloAck {
        version: wire::PROTOCOL_VERSION,
        nonce: [0; 32],
    };
    if c.send(&Frame::HelloAck(ack)).await.is_err() {
        return;
    }
    p.links.fetch_add(1, Ordering::SeqCst);
    let (mut rd, mut w) = c.into_split();
    let (out_tx, mut out_rx) = mpsc::channel::<Frame>(256);
    let writer = tokio::spawn({
        let p = p.clone();
        async move {
            while let Some(f) = out_rx.recv().await {
                if let Frame::Chunk(ch) = &f {
                    p.uploaded
                        .fetch_add(ch.payload.len() as u64, Ordering::Relaxed);
                }
                if write_frame(&mut w, &f).await.is_err() {
                    break;
                }
            }
        }
    });
    let mut new_chunks = p.new_chunks.subscribe();
    let mut mask = 0u64;
    let mut sent = 0u64;
    let mut victim_index: Option<u64> = None;
    let k = p.info.lock().unwrap().as_ref().map_or(4, |i| i.substreams);
    let mut bm = tokio::time::interval(Duration::from_millis(500));
    let set_child = |is: bool, was: bool| {
        if is && !was {
            let n = p.children_now.fetch_add(1, Ordering::SeqCst) + 1;
            p.children_peak.fetch_max(n, Ordering::SeqCst);
            if let Some(id) = peer {
                p.child_ids.lock().unwrap().insert(conn_id, id);
            }
        } else if was && !is {
            p.children_now.fetch_sub(1, Ordering::SeqCst);
            p.child_ids.lock().unwrap().remove(&conn_id);
        }
    };
    loop {
        tokio::select! {
            f = rd.next() => match f {
                Ok(Some(Frame::Subscribe(s))) => {
                    set_child(s.substream_mask != 0, mask != 0);
                    mask = s.substream_mask;
                    let (info, live) = {
                        let info = p.info.lock().unwrap().clone();
                        let live = p.chunks.lock().unwrap().keys().next_back().copied().unwrap_or(0);
                        (info, live)
                    };
                    let Some(info) = info else { break };
                    let _ = out_tx.try_send(Frame::StreamInfo(StreamInfo {
                        first_seq: live + 1,
                        live_seq: live,
                        ..info
                    }));
                }
                Ok(Some(Frame::Ping(n))) => { let _ = out_tx.try_send(Frame::Pong(n)); }
                Ok(Some(Frame::Request(seq))) => {
                    let held = p.chunks.lock().unwrap().get(&seq).cloned();
                    let answer = match held {
                        Some(ch) if p.malicious.load(Ordering::SeqCst) => {
                            p.bad_answers.fetch_add(1, Ordering::SeqCst);
                            if let Some(id) = peer { p.victims.lock().unwrap().insert(id); }
                            Frame::Chunk(p.corrupt(&ch))
                        }
                        Some(ch) => Frame::Chunk(ch),
                        None => Frame::NotFound(seq),
                    };
                    let _ = out_tx.try_send(answer);
                }
                Ok(Some(Frame::Error(Reason { code, .. }) | Frame::Goodbye(Reason { code, .. }))) => {
                    if code == ErrorCode::BadChunk && let Some(id) = peer {
                        p.reporters.lock().unwrap().insert(id);
                    }
                    break;
                }
                Ok(Some(Frame::Ticket(_))) => {
                    p.tickets.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            },
            r = new_chunks.recv() => match r {
                Ok(ch) => {
                    if mask != 0 && wire::mask_wants(mask, ch.seq, k) {
                        let out = if p.malicious.load(Ordering::SeqCst) {
                            let first = *victim_index
                                .get_or_insert_with(|| p.next_victim.fetch_add(1, Ordering::SeqCst));
                            let n = first + sent;
                            sent += 1;
                            p.bad(&ch, n, peer)
                        } else {
                            p.honest_sent.fetch_add(1, Ordering::Relaxed);
                            ch
                        };
                        if out_tx.try_send(Frame::Chunk(out)).is_err() { break; }
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => break,
            },
            _ = bm.tick() => {
                if let Some(f) = p.buffer_map() { let _ = out_tx.try_send(f); }
            }
        }
    }
    set_child(false, mask != 0);
    writer.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polluter_cannot_reach_a_player() {
    init_tracing();
    let peers = env_or("STARLING_POLLUTION_PEERS", 50) as usize;
    let honest_secs = env_or("STARLING_POLLUTION_HONEST_SECS", 10);
    let attack_secs = env_or("STARLING_POLLUTION_ATTACK_SECS", 30);
    let dep = Deployment::start(DeploymentConfig {
        control_metrics: true,
        ..DeploymentConfig::default()
    })
    .await
    .expect("deployment");
    let bid = dep.broadcast_id().to_string();
    let stream_kbps = dep.source().bitrate_kbps();
    let hb = dep.config().heartbeat_interval;

    // The polluter joins first, with 8x the stream rate, in the peers' /24.
    let ip = peer_ip(249);
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.expect("bind");
    let listen_addr = listener.local_addr().expect("addr");
    // Its gRPC channel calls from its relay address, as the SDK's does: the control
    // plane checks that `peer_addr` is on the caller's address.
    let channel = starling_proto::transport::endpoint(&dep.control_url(), &dep.transport())
        .expect("control URL")
        .local_address(Some(std::net::IpAddr::V4(ip)))
        .connect()
        .await
        .expect("viewer channel");
    let mut vs = ViewerServiceClient::new(channel);
    let join = vs
        .join(JoinRequest {
            holder_key: raw_holder().public_key().to_vec(),
            broadcast_id: bid.clone(),
            credential: String::new(),
            client_version: "rights-test-polluter".into(),
            peer_addr: listen_addr.to_string(),
            upload_kbps: 8 * stream_kbps,
            mac_tickets: false,
            host_addr: String::new(),
        })
        .await
        .expect("polluter join")
        .into_inner();
    println!(
        "polluter: peer {} at {listen_addr}, {} child slots",
        join.peer_id, join.child_slots
    );
    let p = Arc::new(Polluter {
        bid: bid.clone(),
        info: Mutex::new(None),
        chunks: Mutex::new(BTreeMap::new()),
        new_chunks: broadcast::channel(256).0,
        malicious: AtomicBool::new(false),
        forger_pkcs8: starling_proto::token::generate_pkcs8().expect("key"),
        children_now: AtomicUsize::new(0),
        children_peak: AtomicUsize::new(0),
        child_ids: Mutex::new(HashMap::new()),
        links: AtomicU64::new(0),
        honest_sent: AtomicU64::new(0),
        corrupted_sent: AtomicU64::new(0),
        forged_sent: AtomicU64::new(0),
        bad_answers: AtomicU64::new(0),
        next_victim: AtomicU64::new(0),
        victims: Mutex::new(HashSet::new()),
        reporters: Mutex::new(HashSet::new()),
        from_server: AtomicU64::new(0),
        uploaded: AtomicU64::new(0),
        hb_active: AtomicBool::new(true),
        hb_ok: AtomicU64::new(0),
        tickets: AtomicU64::new(0),
    });
    let mut tasks: Vec<JoinHandle<()>> = Vec::new();
    let (ready_tx, mut ready_rx) = mpsc::channel(1);
    tasks.push(tokio::spawn(polluter_dp(
        p.clone(),
        join.dataplane_wire_addr.clone(),
        Bytes::from(join.chunk_token.clone()),
        ready_tx,
    )));
    tokio::time::timeout(Duration::from_secs(10), ready_rx.recv())
        .await
        .expect("polluter's data-plane link");
    {
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            let mut id = 0u64;
            while let Ok((s, _)) = listener.accept().await {
                id += 1;
                tokio::spawn(polluter_conn(p.clone(), s, id));
            }
        }));
    }
    {
        let p = p.clone();
        let mut vs = vs.clone();
        let session = join.session_id.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(hb);
            loop {
                tick.tick().await;
                if let Ok(r) = vs
                    .heartbeat(HeartbeatRequest {
                        session_id: session.clone(),
                        bytes_from_server: p.from_server.load(Ordering::Relaxed),
                        bytes_from_peers: 0,
                        bytes_uploaded: p.uploaded.load(Ordering::Relaxed),
                        ..Default::default()
                    })
                    .await
                {
                    p.hb_active.store(r.into_inner().active, Ordering::SeqCst);
                    p.hb_ok.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }

    // The honest swarm.
    let swarm = Swarm::join(
        &dep,
        SwarmConfig {
            peers,
            upload: UploadProfile::mixed(),
            ..SwarmConfig::default()
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(honest_secs)).await;
    let children_at_attack = p.children_now.load(Ordering::SeqCst);
    let child_ids_at_attack: HashSet<u64> = p.child_ids.lock().unwrap().values().copied().collect();
    println!(
        "before the attack: polluter has {children_at_attack} children ({} links so far, {} honest chunks relayed)",
        p.links.load(Ordering::SeqCst),
        p.honest_sent.load(Ordering::SeqCst)
    );
    let mut failures = Vec::new();
    check(
        &mut failures,
        children_at_attack >= 2,
        format!(
            "the polluter got {children_at_attack} children (two or more are needed for both kinds of bad chunk): the test would prove nothing"
        ),
    );
    check(
        &mut failures,
        p.tickets.load(Ordering::Relaxed) > 0,
        "the polluter's children presented no parent ticket".into(),
    );

    // Attack.
    let before = swarm.sample();
    p.malicious.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(attack_secs)).await;
    // Hang guard for re-parenting: the polluter must end up with no children.
    let _ = tokio::time::timeout(Duration::from_secs(20), async {
        while p.children_now.load(Ordering::SeqCst) > 0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    let after = swarm.sample();
    let children_end = p.children_now.load(Ordering::SeqCst);
    let hb_before = p.hb_ok.load(Ordering::SeqCst);
    tokio::time::sleep(hb * 3).await;
    let polluter_alive =
        p.hb_active.load(Ordering::SeqCst) && p.hb_ok.load(Ordering::SeqCst) > hb_before;
    let victims = p.victims.lock().unwrap().clone();
    let reporters = p.reporters.lock().unwrap().clone();
    println!(
        "polluter: {} corrupted + {} forged chunks pushed, {} corrupted REQUEST answers, to {} peers; {} answered BAD_CHUNK; children at attack {children_at_attack}, peak {}, now {children_end}; session alive {polluter_alive}",
        p.corrupted_sent.load(Ordering::SeqCst),
        p.forged_sent.load(Ordering::SeqCst),
        p.bad_answers.load(Ordering::SeqCst),
        victims.len(),
        reporters.len(),
        p.children_peak.load(Ordering::SeqCst),
    );

    let r = Report::between(Some(&before), &after);
    let whole = Report::of(&after);
    println!("--- {peers} honest peers over the attack ---\n{r}");
    check(
        &mut failures,
        r.peers_active == peers && r.join_failures == 0 && r.peers_closed == 0,
        format!("{} of {peers} honest peers active", r.peers_active),
    );
    let bad: Vec<_> = r
        .per_peer
        .iter()
        .filter(|x| x.continuity < 0.99)
        .map(|x| (x.index, x.continuity))
        .collect();
    check(
        &mut failures,
        bad.is_empty(),
        format!("honest peers with continuity < 99 % during the attack: {bad:?}"),
    );
    check(
        &mut failures,
        whole.not_identical.is_empty() && whole.per_peer.iter().all(|x| x.output_bytes > 0),
        format!(
            "honest outputs differ from the source: {:?}",
            whole
                .per_peer
                .iter()
                .filter(|x| !x.identical)
                .map(|x| (x.index, x.problems.clone()))
                .collect::<Vec<_>>()
        ),
    );
    // Deterministic whatever the load: with two pushed-to victims or more, the second
    // link's first bad push is forged (see `Polluter::bad`).
    let pushed_to = p.next_victim.load(Ordering::SeqCst);
    check(
        &mut failures,
        pushed_to >= 2
            && p.corrupted_sent.load(Ordering::SeqCst) > 0
            && p.forged_sent.load(Ordering::SeqCst) > 0,
        format!(
            "the polluter pushed bad chunks on {pushed_to} links: {} corrupted, {} forged",
            p.corrupted_sent.load(Ordering::SeqCst),
            p.forged_sent.load(Ordering::SeqCst)
        ),
    );

    // The SDKs noticed and reported.
    let presence = swarm.presence();
    let stats_by_peer: HashMap<u64, starling_sdk::Stats> = presence
        .iter()
        .filter_map(|x| {
            let s = x.stats.clone()?;
            Some((s.peer_id?, s))
        })
        .collect();
    let bad_total: u64 = stats_by_peer
        .values()
        .map(|s| s.bad_chunks_from_peers)
        .sum();
    let reported_total: u64 = stats_by_peer.values().map(|s| s.peers_reported).sum();
    let bad_from_server: u64 = stats_by_peer
        .values()
        .map(|s| s.bad_chunks_from_server)
        .sum();
    let verified: u64 = stats_by_peer.values().map(|s| s.chunks_verified).sum();
    let played: u64 = stats_by_peer.values().map(|s| s.chunks_played).sum();
    println!(
        "SDKs: {bad_total} bad chunks from peers, {reported_total} ReportPeer calls, {bad_from_server} bad chunks from the server; {verified} chunks verified for {played} played ({:.3} checks per played chunk)",
        verified as f64 / played.max(1) as f64
    );
    check(
        &mut failures,
        bad_total > 0 && reported_total > 0 && bad_from_server == 0,
        format!(
            "SDK counters: bad {bad_total}, reported {reported_total}, bad from server {bad_from_server}"
        ),
    );
    for id in &reporters {
        match stats_by_peer.get(id) {
            Some(s) => check(
                &mut failures,
                s.bad_chunks_from_peers > 0 && s.peers_reported > 0,
                format!("peer {id} answered BAD_CHUNK but its stats say {s}"),
            ),
            None => failures.push(format!(
                "peer {id} answered BAD_CHUNK but is not in the swarm"
            )),
        }
    }
    check(
        &mut failures,
        child_ids_at_attack.iter().any(|id| reporters.contains(id)),
        "none of the polluter's children at the attack reported it".into(),
    );
    if let Some(url) = dep.control_metrics_url() {
        let text = common::http_get(&url).await;
        let n = common::metric_sum(&text, "starling_cp_grpc_server_handled_total", "ReportPeer");
        println!("control plane: {n} ReportPeer calls handled");
        check(
            &mut failures,
            n >= 1.0,
            "control plane saw no ReportPeer".into(),
        );
    }

    // Nobody is subscribed to it any more, while its session lives on.
    check(
        &mut failures,
        children_end == 0,
        format!("the polluter still has {children_end} children"),
    );
    check(
        &mut failures,
        polluter_alive,
        "the polluter's session ended: 'no children' would prove nothing".into(),
    );

    for t in &tasks {
        t.abort();
    }
    swarm.shutdown().await;
    dep.shutdown().await;
    assert!(failures.is_empty(), "failed:\n{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------------
// Cost of the checks (for the closing note; prints, asserts nothing about speed)
// ---------------------------------------------------------------------------------

/// `cargo test -p starling-loadtest --test rights -- --ignored --nocapture check_costs`
#[test]
#[ignore = "measurement: prints the cost of chunk and token checks"]
fn check_costs() {
    use starling_proto::integrity::ChunkVerifier;
    use starling_proto::token::{Scopes, TokenClaims, TokenSigner, TokenVerifier};
    let bid = "m3p7kq2xw9ab4cde"; // a 16-character id, like the control plane's
    let viewers = 10_000f64;
    let pkcs8 = starling_proto::token::generate_pkcs8().unwrap();
    let signer = ChunkSigner::new(7, &pkcs8).unwrap();
    let mut verifier = ChunkVerifier::new(bid);
    verifier.add_key(7, &signer.public_key()).unwrap();
    println!(
        "chunk checks (signature block + SHA-256 of the payload), per chunk and per stream-second at {viewers} viewers:"
    );
    // (label, payload bytes, chunk duration ms)
    for (label, bytes, chunk_ms) in [
        (
            "500 kbit/s, 250 ms chunks (the harness)",
            15_625usize,
            250u64,
        ),
        ("2 Mbit/s, 250 ms chunks", 62_500, 250),
        ("2 Mbit/s, 1 s chunks", 250_000, 1000),
    ] {
        let payload: Vec<u8> = (0..bytes).map(|i| (i * 31 % 251) as u8).collect();
        let meta = ChunkMeta {
            seq: 42,
            flags: 1,
            timestamp_ms: 1,
            duration_ms: chunk_ms as u32,
        };
        let block = signer.sign(bid, &meta, &payload).unwrap();
        let n = 300;
        let t = std::time::Instant::now();
        for _ in 0..n {
            verifier.verify(&meta, &payload, &block, 0).unwrap();
        }
        let per = t.elapsed().as_secs_f64() / f64::from(n);
        let per_stream_s = per * 1000.0 / chunk_ms as f64;
        println!(
            "  {label}: {:.1} µs per chunk; {:.3} ms CPU per viewer per stream-second; {:.2} CPU-s per stream-second for {viewers} viewers (spread over their devices)",
            per * 1e6,
            per_stream_s * 1e3,
            per_stream_s * viewers
        );
    }
    let tsigner = TokenSigner::new(3, &pkcs8).unwrap();
    let mut tv = TokenVerifier::new();
    tv.add_key(3, &tsigner.public_key()).unwrap();
    let token = tsigner
        .sign(&TokenClaims {
            broadcast_id: bid.into(),
            peer_id: 1,
            session_id: 2,
            scopes: Scopes::ALL,
            holder_key: [1; 32],
            issued_at_ms: 1_000,
            expires_at_ms: 121_000,
        })
        .unwrap();
    let n = 3000;
    let t = std::time::Instant::now();
    for _ in 0..n {
        tv.verify(&token, bid, Scopes::PLAY, 2_000, 5_000).unwrap();
    }
    let per = t.elapsed().as_secs_f64() / f64::from(n);
    // Per viewer: one check per link at connect and at every renewal (every ttl/2).
    // Links checked per viewer: the data plane + parents/neighbours (~8).
    let ttl_s = 120.0;
    let checks_per_s = viewers * 9.0 / (ttl_s / 2.0);
    println!(
        "token check: {:.1} µs; at {viewers} viewers, 120 s tokens renewed at half-life, ~9 links each: {checks_per_s:.0} checks/s = {:.1} ms CPU per stream-second in total (data plane's share: {:.1} ms)",
        per * 1e6,
        checks_per_s * per * 1e3,
        viewers / (ttl_s / 2.0) * per * 1e3
    );
}
