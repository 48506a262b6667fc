//! Issue 4's "key rotation works without dropping viewers", end to end over real
//! sockets.
//!
//! `chunk_token_key_rotation_drops_nobody`: 12 relaying SDK peers play a private
//! (token-gated) broadcast with 10 s chunk tokens. They join at 2 per second, so their
//! renewals are spread over the renewal cycle like a real audience's (peers joined in
//! lockstep renew together and can all miss the moments right after the switch, when
//! viewers are still learning the new key). While they play, the chunk-token
//! signing key is rotated the way another control-plane replica (or a restart with
//! `--rotate-token-key`) does it: `TokenKeys::load(.., rotate = true)` on a second
//! connection to the shared database. The running control plane picks the new key up
//! with its periodic key refresh, pushes the new set to the data plane (`KeysCommand`)
//! and to viewers (`Heartbeat.token_keys`), and signs with it only `SIGN_LEAD` after
//! the rotation, when every verifier knows it (a peer whose renewed token reaches a
//! parent that has not heard of the key yet would be refused). The swarm
//! keeps playing for two token lifetimes after the switch, so every token held at the
//! end was signed by the new key.
//!
//! Checked:
//! 1. the new key signs: an observer session (raw gRPC, decoding and verifying every
//!    renewed token with `starling_proto::token`) gets old-key tokens before the switch
//!    and only new-key tokens after it, the first of them after the new key was
//!    published; the old key stays published next to the new one;
//!    the data plane trusts both; every SDK peer received ≥ 2 renewals after the switch
//!    and the data plane accepted ≥ 2 renewals per peer;
//! 2. nobody was dropped or refused: every peer still plays (no end reason, no rejoin),
//!    no peer link refused for its token (SDK `peers_refused`), no data-plane token
//!    rejection and no UNAUTHORIZED / TOKEN_EXPIRED / REVOKED close;
//! 3. every peer's continuity ≥ 99 % over the rotation window and its output is
//!    byte-identical to the source over the whole run.
//!
//! Sleeps only pace the scenario; waits are bounded hang guards.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failure is a panic

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Issuer, env_or, init_tracing, unix_ms};
use starling_controlplane::tokens::{SIGN_LEAD, TokenKeys};
use starling_controlplane::{DatabaseConfig, Store};
use starling_loadtest::{Deployment, DeploymentConfig, Report, Swarm, SwarmConfig, UploadProfile};
use starling_proto::token::{Scopes, TokenVerifier, peek_unverified};
use starling_proto::v1::viewer_service_client::ViewerServiceClient;
use starling_proto::v1::{HeartbeatRequest, JoinRequest, PublicKey};

fn check(failures: &mut Vec<String>, ok: bool, what: String) {
    if !ok {
        eprintln!("FAIL: {what}");
        failures.push(what);
    }
}

/// A renewed token as the observer received it.
#[derive(Debug, Clone)]
struct Renewal {
    at_ms: u64,
    key_id: u32,
    /// Verified (signature, broadcast, scope, times) with the key set published in the
    /// same heartbeat answer.
    verified: Result<(), String>,
}

/// What the observer session saw.
#[derive(Debug, Default)]
struct Observed {
    /// Token key ids of the latest heartbeat answer (signing key first).
    published: Vec<u32>,
    /// When each key id was first published to the observer (unix ms).
    first_published: BTreeMap<u32, u64>,
    renewals: Vec<Renewal>,
    heartbeat_errors: u64,
    inactive: u64,
}

fn verify(token: &[u8], keys: &[PublicKey], broadcast: &str) -> Result<(), String> {
    let mut v = TokenVerifier::new();
    for k in keys {
        v.add_key(k.key_id, &k.ed25519).map_err(|e| e.to_string())?;
    }
    v.verify(token, broadcast, Scopes::PLAY, unix_ms(), 5_000)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The data plane's Prometheus series (name with labels → value).
fn dataplane_metrics(dep: &Deployment) -> BTreeMap<String, u64> {
    let text = starling_dataplane::metrics::render(&dep.node().expect("node").registry().scrape());
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.trim().parse::<f64>().ok()? as u64))
        })
        .collect()
}

fn sum_prefix(m: &BTreeMap<String, u64>, prefix: &str) -> u64 {
    m.iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(_, v)| v)
        .sum()
}

fn dataplane_key_ids(dep: &Deployment) -> Vec<u32> {
    dep.node().expect("node").registry().auth().key_ids()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_token_key_rotation_drops_nobody() {
    init_tracing();
    let peers = env_or("STARLING_ROTATION_PEERS", 12) as usize;
    let token_ttl = Duration::from_secs(10);
    let ttl_ms = token_ttl.as_millis() as u64;
    let issuer = Arc::new(Issuer::generate());
    // The database directory is ours, so a "second replica" can open it.
    let dir = tempfile::Builder::new()
        .prefix("starling-rotation-")
        .tempdir()
        .expect("temporary directory");
    let dep = Deployment::start(DeploymentConfig {
        public: false,
        viewer_jwt_keys: vec![issuer.credential_key()],
        token_ttl: Some(token_ttl),
        data_dir: Some(dir.path().to_path_buf()),
        ..DeploymentConfig::default()
    })
    .await
    .expect("deployment");
    let bid = dep.broadcast_id().to_string();
    let hb = dep.config().heartbeat_interval;
    let mut failures = Vec::new();

    // The swarm: relaying SDK peers, each with its own JWT subject.
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
            join_rate: 2.0,
            ..SwarmConfig::default()
        })
        .await;

    // The observer: a session of its own (not relaying, never dialled), heartbeating
    // like the SDK, that decodes every token it is handed.
    let mut vs = ViewerServiceClient::new(dep.channel().await.expect("viewer client"));
    let join = vs
        .join(JoinRequest {
            holder_key: vec![7; 32],
            broadcast_id: bid.clone(),
            credential: issuer.viewer("rotation-observer", &bid),
            client_version: "rotation-test-observer".into(),
            peer_addr: String::new(),
            upload_kbps: 0,
            mac_tickets: false,
            host_addr: String::new(),
        })
        .await
        .expect("observer join")
        .into_inner();
    let (old_id, _) = peek_unverified(&join.chunk_token).expect("join token");
    let join_published: Vec<u32> = join.token_keys.iter().map(|k| k.key_id).collect();
    println!("before the rotation: tokens signed by key {old_id}, published {join_published:?}");
    check(
        &mut failures,
        join_published == vec![old_id],
        format!(
            "before the rotation the published keys are {join_published:?}, expected [{old_id}]"
        ),
    );
    check(
        &mut failures,
        verify(&join.chunk_token, &join.token_keys, &bid).is_ok(),
        "the observer's join token does not verify".into(),
    );
    let observed = Arc::new(Mutex::new(Observed {
        published: join_published,
        ..Observed::default()
    }));
    let observer = {
        let observed = observed.clone();
        let mut vs = vs.clone();
        let session = join.session_id.clone();
        let bid = bid.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(hb);
            loop {
                tick.tick().await;
                let r = match vs
                    .heartbeat(HeartbeatRequest {
                        session_id: session.clone(),
                        ..HeartbeatRequest::default()
                    })
                    .await
                {
                    Ok(r) => r.into_inner(),
                    Err(_) => {
                        observed.lock().unwrap().heartbeat_errors += 1;
                        continue;
                    }
                };
                let mut o = observed.lock().unwrap();
                if !r.active {
                    o.inactive += 1;
                    continue;
                }
                o.published = r.token_keys.iter().map(|k| k.key_id).collect();
                let seen_at = unix_ms();
                for k in &r.token_keys {
                    o.first_published.entry(k.key_id).or_insert(seen_at);
                }
                if !r.chunk_token.is_empty() {
                    let key_id = peek_unverified(&r.chunk_token).map_or(0, |(id, _)| id);
                    o.renewals.push(Renewal {
                        at_ms: unix_ms(),
                        key_id,
                        verified: verify(&r.chunk_token, &r.token_keys, &bid),
                    });
                }
            }
        })
    };

    // Warm-up: longer than half a token lifetime, so renewals with the old key happen.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let before = swarm.sample();
    let dp_before = dataplane_metrics(&dep);
    println!(
        "warm-up: {} of {peers} peers playing; data plane trusts keys {:?}",
        swarm.active().len(),
        dataplane_key_ids(&dep)
    );

    // Rotate as another replica would: a second connection to the shared database.
    let rotated_at_ms = unix_ms();
    let new_id = {
        let db = DatabaseConfig::from_url_or_data_dir(None, dir.path());
        let replica = Store::connect(&db).await.expect("second replica's store");
        let keys = TokenKeys::load(&replica, token_ttl, true, rotated_at_ms as i64)
            .await
            .expect("rotate the token key");
        replica.close().await;
        // Published at once, signing only after SIGN_LEAD.
        assert_eq!(
            keys.signing_key_id(),
            old_id,
            "a new key must not sign at once"
        );
        keys.public_keys()
            .iter()
            .map(|k| k.key_id)
            .max()
            .expect("published keys")
    };
    println!("rotated: new signing key {new_id} (was {old_id})");
    check(
        &mut failures,
        new_id != old_id,
        format!("rotation kept key id {old_id}"),
    );

    // The running control plane publishes the new key at its next key refresh (5 s by
    // default) and signs with it once SIGN_LEAD has passed since the rotation.
    let switch_deadline = tokio::time::Instant::now() + SIGN_LEAD + Duration::from_secs(30);
    loop {
        let published = observed.lock().unwrap().published.clone();
        let dp_keys = dataplane_key_ids(&dep);
        if published.first() == Some(&new_id) && dp_keys.contains(&new_id) {
            break;
        }
        if tokio::time::Instant::now() >= switch_deadline {
            check(
                &mut failures,
                false,
                format!(
                    "the new key {new_id} did not start signing within SIGN_LEAD + 30 s: viewers are told {published:?}, the data plane trusts {dp_keys:?}"
                ),
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let switched_at_ms = unix_ms();
    let at_switch = swarm.sample();
    let stats_at_switch: Vec<_> = (0..peers).map(|i| swarm.stats(i)).collect();
    let dp_at_switch = dataplane_metrics(&dep);
    let published_at_switch = observed.lock().unwrap().published.clone();
    let dp_keys_at_switch = dataplane_key_ids(&dep);
    println!(
        "switch seen {} ms after the rotation: viewers told {published_at_switch:?}, data plane trusts {dp_keys_at_switch:?}",
        switched_at_ms - rotated_at_ms
    );
    check(
        &mut failures,
        published_at_switch == vec![new_id, old_id],
        format!(
            "published keys after the switch {published_at_switch:?}, expected [{new_id}, {old_id}] (the old key must stay published)"
        ),
    );
    check(
        &mut failures,
        dp_keys_at_switch.contains(&old_id) && dp_keys_at_switch.contains(&new_id),
        format!("the data plane trusts {dp_keys_at_switch:?}, expected both {old_id} and {new_id}"),
    );

    // Play on for two token lifetimes (plus a heartbeat and a margin): every token held
    // at the end was issued after the switch.
    tokio::time::sleep(token_ttl * 2 + hb + Duration::from_secs(2)).await;
    let after = swarm.sample();
    let dp_after = dataplane_metrics(&dep);
    observer.abort();
    let observed = std::mem::take(&mut *observed.lock().unwrap());

    // 1. The new key signs.
    let pre: Vec<_> = observed
        .renewals
        .iter()
        .filter(|r| r.at_ms < rotated_at_ms)
        .collect();
    let post: Vec<_> = observed
        .renewals
        .iter()
        .filter(|r| r.at_ms >= switched_at_ms)
        .collect();
    let key_ids = |v: &[&Renewal]| v.iter().map(|r| r.key_id).collect::<Vec<_>>();
    println!(
        "observer renewals: before the rotation {:?}, after the switch {:?}, heartbeat errors {}, inactive {}",
        key_ids(&pre),
        key_ids(&post),
        observed.heartbeat_errors,
        observed.inactive
    );
    check(
        &mut failures,
        !pre.is_empty() && pre.iter().all(|r| r.key_id == old_id),
        format!(
            "renewals before the rotation: {:?}, expected ≥ 1, all key {old_id}",
            key_ids(&pre)
        ),
    );
    check(
        &mut failures,
        post.len() >= 2 && post.iter().all(|r| r.key_id == new_id),
        format!(
            "renewals after the switch: {:?}, expected ≥ 2, all key {new_id}",
            key_ids(&post)
        ),
    );
    let first_new_token = observed
        .renewals
        .iter()
        .filter(|r| r.key_id == new_id)
        .map(|r| r.at_ms)
        .min();
    let first_new_published = observed.first_published.get(&new_id).copied();
    println!(
        "new key first published to the observer {:?} ms after the rotation, first token signed with it {:?} ms after",
        first_new_published.map(|t| t.saturating_sub(rotated_at_ms)),
        first_new_token.map(|t| t.saturating_sub(rotated_at_ms))
    );
    check(
        &mut failures,
        matches!((first_new_published, first_new_token), (Some(p), Some(t)) if p < t),
        format!(
            "the new key must be published before it signs: published at {first_new_published:?}, first token at {first_new_token:?}"
        ),
    );
    let unverified: Vec<_> = observed
        .renewals
        .iter()
        .filter_map(|r| r.verified.clone().err())
        .collect();
    check(
        &mut failures,
        unverified.is_empty(),
        format!("renewed tokens that do not verify with the published keys: {unverified:?}"),
    );
    check(
        &mut failures,
        observed.heartbeat_errors == 0 && observed.inactive == 0,
        format!(
            "observer: {} heartbeat errors, {} inactive answers",
            observed.heartbeat_errors, observed.inactive
        ),
    );
    check(
        &mut failures,
        observed.published == vec![new_id, old_id],
        format!(
            "published keys at the end {:?}, expected [{new_id}, {old_id}]",
            observed.published
        ),
    );
    let renewals: Vec<(usize, u64)> = (0..peers)
        .map(|i| {
            let then = stats_at_switch[i].as_ref().map_or(0, |s| s.token_renewals);
            let now = swarm.stats(i).map_or(0, |s| s.token_renewals);
            (i, now.saturating_sub(then))
        })
        .collect();
    println!("SDK token renewals after the switch (peer, count): {renewals:?}");
    check(
        &mut failures,
        renewals.iter().all(|&(_, n)| n >= 2),
        format!("peers with < 2 renewals (all new-key) after the switch: {renewals:?}"),
    );
    let dp_renewals = dp_after["starling_dataplane_token_renewals_total"]
        .saturating_sub(dp_at_switch["starling_dataplane_token_renewals_total"]);
    println!(
        "data plane: {dp_renewals} TOKEN renewals accepted after the switch; {} tokens accepted at subscribe over the run",
        dp_after["starling_dataplane_tokens_accepted_total"]
    );
    check(
        &mut failures,
        dp_renewals >= 2 * peers as u64,
        format!(
            "the data plane accepted {dp_renewals} renewals after the switch, expected ≥ {}",
            2 * peers
        ),
    );

    // 2. Nobody dropped or refused.
    let rejections = sum_prefix(&dp_after, "starling_dataplane_token_rejections_total");
    let token_closes: BTreeMap<&str, u64> = ["unauthorized", "token_expired", "revoked"]
        .into_iter()
        .map(|r| {
            (
                r,
                sum_prefix(
                    &dp_after,
                    &format!("starling_dataplane_connections_closed_total{{listener=\"wire\",reason=\"{r}\"}}"),
                ),
            )
        })
        .collect();
    let other_closes: BTreeMap<String, u64> = dp_after
        .iter()
        .filter(|(k, v)| {
            k.starts_with("starling_dataplane_connections_closed_total{listener=\"wire\"")
                && **v > dp_before.get(*k).copied().unwrap_or(0)
        })
        .map(|(k, v)| (k.clone(), v - dp_before.get(k).copied().unwrap_or(0)))
        .collect();
    println!(
        "data plane over the run: {rejections} token rejections, token closes {token_closes:?}; wire closes during the rotation window {other_closes:?}"
    );
    check(
        &mut failures,
        rejections == 0,
        format!("the data plane rejected {rejections} tokens"),
    );
    check(
        &mut failures,
        token_closes.values().all(|&n| n == 0),
        format!("the data plane closed connections for their token: {token_closes:?}"),
    );
    let mut dropped = Vec::new();
    let mut refused = Vec::new();
    for i in 0..peers {
        if let Some(reason) = swarm.end_reason(i) {
            dropped.push(format!("peer {i} stopped: {reason:?}"));
        }
        let s = swarm.stats(i);
        match s {
            None => dropped.push(format!("peer {i} has no viewer")),
            Some(s) => {
                if s.rejoins > 0 {
                    dropped.push(format!("peer {i} re-joined {} times", s.rejoins));
                }
                if s.peers_refused > 0 {
                    refused.push((i, s.peers_refused));
                }
            }
        }
    }
    let active = swarm.active().len();
    println!(
        "SDK: {active} of {peers} peers playing at the end; peer links refused for their token (peer, count): {refused:?}"
    );
    check(
        &mut failures,
        active == peers && dropped.is_empty(),
        format!("{active} of {peers} peers playing; {dropped:?}"),
    );
    check(
        &mut failures,
        refused.is_empty(),
        format!("peer links refused for their token (peer, count): {refused:?}"),
    );

    // 3. Everyone kept playing the source byte for byte.
    let window = Report::between(Some(&before), &after);
    println!(
        "--- {peers} peers from before the rotation to two token lifetimes after the switch ---\n{window}"
    );
    let whole = Report::of(&after);
    let since_switch = Report::between(Some(&at_switch), &after);
    println!(
        "continuity min: rotation window {:.4}, since the switch {:.4}; output bytes checked over the run {}; not identical {:?}",
        window.continuity_min, since_switch.continuity_min, whole.output_bytes, whole.not_identical
    );
    check(
        &mut failures,
        window.per_peer.len() == peers,
        format!(
            "{} peers in the report, expected {peers}",
            window.per_peer.len()
        ),
    );
    let below: Vec<_> = window
        .per_peer
        .iter()
        .filter(|p| p.continuity < 0.99 || !p.identical)
        .map(|p| (p.index, p.continuity, p.identical, p.problems.clone()))
        .collect();
    check(
        &mut failures,
        below.is_empty(),
        format!("peers below 99 % continuity or not identical: {below:?}"),
    );
    check(
        &mut failures,
        whole.not_identical.is_empty() && whole.output_bytes > 0,
        format!(
            "output not byte-identical to the source over the run: {:?} ({} bytes checked)",
            whole.not_identical, whole.output_bytes
        ),
    );
    println!(
        "ttl {ttl_ms} ms, heartbeat {} ms, run {:.1} s",
        hb.as_millis(),
        after.elapsed.as_secs_f64()
    );

    swarm.shutdown().await;
    dep.shutdown().await;
    drop(dir);
    assert!(failures.is_empty(), "failed:\n{}", failures.join("\n"));
}
