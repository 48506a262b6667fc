//! Tests of the live grids: join, heartbeat, leave, expiry, revocation, reports, trust.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use starling_proto::token::Scopes;
use starling_proto::v1::PeerReportKind;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

fn input<'a>(session: &'a str, addr: &str, upload: u32) -> JoinInput<'a> {
    JoinInput {
        broadcast_id: "b",
        substreams: 4,
        server_slots: u64::MAX,
        session_id: session,
        peer_addr: addr.to_string(),
        upload_kbps: upload,
        remote_ip: addr
            .parse::<SocketAddr>()
            .ok()
            .map(|a| a.ip())
            .or(Some(IpAddr::from([10, 9, 9, 9]))),
        addr_prefix: 0,
        subject: None,
        credential_expires_at: None,
        mac_tickets: false,
        probe_first: false,
        reflexive: None,
    }
}

fn from(mut i: JoinInput<'_>, ip: [u8; 4]) -> JoinInput<'_> {
    i.remote_ip = Some(IpAddr::from(ip));
    i
}

const BAD: PeerReportKind = PeerReportKind::BadChunk;
const SILENT: PeerReportKind = PeerReportKind::NonDelivery;

#[test]
fn prefixes() {
    let a = ip_prefix("10.1.2.3".parse().unwrap());
    assert_eq!(a, ip_prefix("10.1.2.200".parse().unwrap()));
    assert_ne!(a, ip_prefix("10.1.3.3".parse().unwrap()));
    assert_eq!(a, ip_prefix("::ffff:10.1.2.9".parse().unwrap()));
    let v6 = ip_prefix("2001:db8:1::1".parse().unwrap());
    assert_eq!(v6, ip_prefix("2001:db8:1:ffff::2".parse().unwrap()));
    assert_ne!(v6, ip_prefix("2001:db8:2::1".parse().unwrap()));
    assert!(v6 >= 0x8000_0000 && a < (1 << 24));
    let remote: SocketAddr = "192.168.7.9:5555".parse().unwrap();
    assert_eq!(addr_prefix("", Some(remote)), ip_prefix(remote.ip()));
    assert_eq!(
        addr_prefix("0.0.0.0:7000", Some(remote)),
        ip_prefix(remote.ip())
    );
    assert_eq!(addr_prefix("peer.example:7000", None), 0);
    assert_eq!(addr_prefix("10.1.2.3:7000", Some(remote)), a);
    assert_eq!(
        dialable_addr("0.0.0.0:7000", Some(remote)),
        "192.168.7.9:7000"
    );
    assert_eq!(
        dialable_addr("10.0.0.1:7000", Some(remote)),
        "10.0.0.1:7000"
    );
    assert_eq!(dialable_addr("host:7000", Some(remote)), "host:7000");
}

#[test]
fn join_heartbeat_leave_expire_and_drop() {
    let g = LiveGrids::new();
    g.set_rate("b", 0);
    assert_eq!(g.rate("b"), None);
    let a = g.join(input("sa", "10.0.0.1:1", 4000)).unwrap();
    assert_eq!(a.stream_kbps, DEFAULT_STREAM_KBPS);
    assert_eq!(a.child_slots, 16);
    assert!(a.parents.iter().all(|p| p.peer.is_none()));
    assert_eq!(
        a.parents.iter().map(|p| p.substream).collect::<Vec<_>>(),
        vec![0, 1, 2, 3]
    );
    let b = g.join(input("sb", "", 0)).unwrap();
    assert_ne!(a.peer_id, b.peer_id);
    assert!(b.parents.iter().all(|p| {
        p.peer
            .as_ref()
            .is_some_and(|r| r.peer_id == a.peer_id && r.addr == "10.0.0.1:1")
    }));
    assert_eq!(b.neighbours.len(), 1);
    // A never gets B (no address) as a neighbour.
    let hb = g.heartbeat("sa", [100, 0, 50]).unwrap();
    assert!(hb.neighbours.is_empty());
    g.heartbeat("sb", [0, 300, 0]).unwrap();
    let f = g.figures("b").unwrap();
    assert_eq!(f.stats.peers, 2);
    assert!((f.peer_share - 0.75).abs() < 1e-9);
    // Counters are cumulative: the same values add nothing.
    g.heartbeat("sb", [0, 300, 0]).unwrap();
    assert!((g.figures("b").unwrap().peer_share - 0.75).abs() < 1e-9);

    let err = g.reparent("sb", 4, &[]).unwrap_err();
    assert!(matches!(err, ReparentRefused::InvalidSubstream { .. }));
    assert_eq!(
        g.reparent("nope", 0, &[]).unwrap_err(),
        ReparentRefused::UnknownSession
    );
    let (p, _) = g.reparent("sb", 1, &[a.peer_id]).unwrap();
    assert_eq!(p.substream, 1);
    assert!(p.peer.is_none(), "A excluded: the server");

    assert_eq!(g.leave("sa").map(|(id, _)| id), Some(a.peer_id));
    assert!(g.leave("sa").is_none());
    let hb = g.heartbeat("sb", [0, 300, 0]).unwrap();
    assert!(hb.parents.iter().all(|p| p.peer.is_none()));
    assert!(hb.neighbours.is_empty());

    assert!(g.expire(Duration::from_secs(3600)).is_empty());
    let gone = g.expire(Duration::ZERO);
    assert_eq!(gone.len(), 1);
    assert_eq!(gone[0].session_id, "sb");
    assert!(g.heartbeat("sb", [0; 3]).is_none());
    assert_eq!(g.figures("b").unwrap().stats.peers, 0);

    g.join(input("sc", "", 0)).unwrap();
    assert_eq!(g.drop_broadcast("b"), 1);
    assert!(g.figures("b").is_none());
    assert!(g.heartbeat("sc", [0; 3]).is_none());
}

#[test]
fn revoke_by_subject_or_session_and_report_bad_peer() {
    let g = LiveGrids::new();
    let mut a = input("sa", "10.0.0.1:1", 100_000);
    a.subject = Some("alice".into());
    let a = g.join(a).unwrap();
    let mut b_in = input("sb", "", 0);
    b_in.subject = Some("bob".into());
    let b = g.join(b_in).unwrap();
    let c = g.join(input("sc", "", 0)).unwrap();
    assert!(g.set_token(
        "sb",
        TokenState {
            scopes: Scopes::PLAY,
            expires_at_ms: 5,
            holder_key: [1; 32]
        }
    ));
    let hb = g.heartbeat("sb", [0; 3]).unwrap();
    assert_eq!(hb.peer_id, b.peer_id);
    assert_eq!(hb.broadcast_id, "b");
    assert_eq!(hb.token.map(|t| t.expires_at_ms), Some(5));
    assert_eq!(g.session_peer("sc"), Some((c.peer_id, "b".to_string())));

    // Reports: not oneself, unknown sessions, peers not assigned refused.
    assert_eq!(
        g.report_bad_peer("sb", b.peer_id, BAD),
        Err(ReportRefused::SelfReport)
    );
    assert_eq!(
        g.report_bad_peer("nope", a.peer_id, BAD),
        Err(ReportRefused::UnknownSession)
    );
    assert!(matches!(
        g.report_bad_peer("sa", c.peer_id, BAD),
        Err(ReportRefused::NotAssigned { .. })
    ));
    // Two distinct addresses are not enough (the test input's default address is
    // shared by sb and sc)...
    let r = g.report_bad_peer("sb", a.peer_id, BAD).unwrap();
    assert!(r.known_peer && !r.excluded);
    assert_eq!((r.reporter, r.reporters, r.moved), (b.peer_id, 1, 0));
    let r = g.report_bad_peer("sc", a.peer_id, BAD).unwrap();
    assert_eq!((r.reporters, r.excluded), (1, false), "same address");
    let d = g.join(from(input("sd", "", 0), [10, 0, 0, 4])).unwrap();
    assert!(!g.report_bad_peer("sd", a.peer_id, BAD).unwrap().excluded);
    assert_eq!(g.is_demoted("b", a.peer_id), Some(false));
    // ...a third distinct address demotes A: its children are re-parented.
    let e = g.join(from(input("se", "", 0), [10, 0, 0, 5])).unwrap();
    let r = g.report_bad_peer("se", a.peer_id, BAD).unwrap();
    assert_eq!((r.reporters, r.excluded), (3, true));
    assert!(r.moved > 0);
    assert_eq!(g.bad_peer_reports(), 4);
    assert_eq!(g.peers_demoted(), 1);
    assert_eq!(g.is_demoted("b", a.peer_id), Some(true));
    for s in ["sb", "sc", "sd", "se"] {
        let hb = g.heartbeat(s, [0; 3]).unwrap();
        assert!(hb.parents.iter().all(|p| p.peer.is_none()), "{s}");
    }
    let f = g.join(input("sf", "", 0)).unwrap();
    assert!(f.parents.iter().all(|p| p.peer.is_none()));
    // More reports change nothing.
    assert!(!g.report_bad_peer("sd", a.peer_id, BAD).unwrap().excluded);
    // A peer id that never existed is not the session's to report.
    assert!(matches!(
        g.report_bad_peer("sb", 9_999, BAD),
        Err(ReportRefused::NotAssigned { .. })
    ));
    let _ = (d, e);

    // Revocation by subject, in the right broadcast only.
    assert!(g.revoke("other", RevokeTarget::Subject("alice")).is_empty());
    let gone = g.revoke("b", RevokeTarget::Subject("alice"));
    assert_eq!(gone.len(), 1);
    assert_eq!(gone[0].peer_id, a.peer_id);
    assert!(g.heartbeat("sa", [0; 3]).is_none());
    assert!(!g.set_token(
        "sa",
        TokenState {
            scopes: Scopes::PLAY,
            expires_at_ms: 9,
            holder_key: [1; 32]
        }
    ));
    let gone = g.revoke("b", RevokeTarget::Session("sc"));
    assert_eq!(gone.len(), 1);
    assert_eq!(gone[0].session_id, "sc");
    assert!(g.revoke("b", RevokeTarget::Session("sc")).is_empty());
    assert_eq!(g.figures("b").unwrap().stats.peers, 4);
}

#[test]
fn upload_budget_changes_move_children_through_heartbeats() {
    let g = LiveGrids::new();
    let a = g.join(input("sa", "10.0.0.1:1", 4000)).unwrap(); // 16 slots
    let b = g.join(input("sb", "", 0)).unwrap();
    let on_a = |hb: &HeartbeatView| {
        hb.parents
            .iter()
            .filter(|p| p.peer.as_ref().is_some_and(|r| r.peer_id == a.peer_id))
            .count()
    };
    assert_eq!(on_a(&g.heartbeat("sb", [0; 3]).unwrap()), 4);
    // A's SDK measured one copy's worth of uplink: 4 slots; still enough for B.
    assert_eq!(g.set_upload("sa", 1000), Some(0));
    assert_eq!(g.figures("b").unwrap().stats.peer_supply, 4);
    // Half a copy: 2 slots, B's other two substreams move (to the data plane).
    assert_eq!(g.set_upload("sa", 500), Some(2));
    assert_eq!(on_a(&g.heartbeat("sb", [0; 3]).unwrap()), 2);
    // 0 = unchanged; a peer without an address never gets slots; unknown sessions.
    assert_eq!(g.set_upload("sa", 0), Some(0));
    assert_eq!(g.figures("b").unwrap().stats.peer_supply, 2);
    assert_eq!(g.set_upload("sb", 9000), Some(0));
    assert_eq!(g.figures("b").unwrap().stats.peer_supply, 2);
    assert_eq!(g.set_upload("nope", 1000), None);
    let _ = b;
}

#[test]
fn reports_further_apart_than_the_window_never_demote() {
    let trust = TrustConfig {
        report_window: Duration::from_millis(200),
        ..TrustConfig::default()
    };
    let g = LiveGrids::with_config(CounterLimits::default(), trust);
    let p = g.join(input("sp", "10.0.0.1:1", 4000)).unwrap();
    for (i, k) in ["k1", "k2", "k3"].into_iter().enumerate() {
        let ip = [10, 1, 0, u8::try_from(i).unwrap() + 1];
        let v = g.join(from(input(k, "", 0), ip)).unwrap();
        assert!(
            v.parents
                .iter()
                .any(|x| x.peer.as_ref().is_some_and(|r| r.peer_id == p.peer_id))
        );
    }
    // Three distinct children, each complaint expired before the next (the sleeps only
    // lengthen under load): never more than one counts.
    for k in ["k1", "k2", "k3"] {
        let r = g.report_bad_peer(k, p.peer_id, SILENT).unwrap();
        assert!(!r.excluded && r.reporters == 1, "{k}: {r:?}");
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(g.is_demoted("b", p.peer_id), Some(false));
}

#[test]
fn non_delivery_demotes_only_on_three_distinct_children() {
    let g = LiveGrids::new();
    let p = g.join(input("sp", "10.0.0.1:1", 4000)).unwrap();
    let n = g.join(input("sn", "10.0.0.2:1", 0)).unwrap();
    let kids: Vec<JoinView> = (1..=3u8)
        .map(|i| {
            let s = ["k1", "k2", "k3"][usize::from(i - 1)];
            g.join(from(input(s, "", 0), [10, 1, 0, i])).unwrap()
        })
        .collect();
    assert!(kids.iter().all(|k| {
        k.parents
            .iter()
            .all(|x| x.peer.as_ref().is_some_and(|r| r.peer_id == p.peer_id))
    }));
    // A neighbour is not a parent: NON_DELIVERY about it is refused, BAD_CHUNK not.
    let hb = g.heartbeat("k1", [0; 3]).unwrap();
    if let Some(nb) = hb.neighbours.iter().find(|r| r.peer_id == n.peer_id) {
        assert!(matches!(
            g.report_bad_peer("k1", nb.peer_id, SILENT),
            Err(ReportRefused::NotAssigned { .. })
        ));
    }
    let r = g.report_bad_peer("k1", p.peer_id, SILENT).unwrap();
    assert!(!r.excluded && r.reporters == 1);
    // The same child again, and a BAD_CHUNK from another, do not add up.
    assert_eq!(
        g.report_bad_peer("k1", p.peer_id, SILENT)
            .unwrap()
            .reporters,
        1
    );
    assert_eq!(
        g.report_bad_peer("k2", p.peer_id, BAD).unwrap().reporters,
        1
    );
    assert_eq!(g.is_demoted("b", p.peer_id), Some(false));
    assert!(!g.report_bad_peer("k2", p.peer_id, SILENT).unwrap().excluded);
    let r = g.report_bad_peer("k3", p.peer_id, SILENT).unwrap();
    assert!(r.excluded && r.moved > 0);
    for k in ["k1", "k2", "k3"] {
        let hb = g.heartbeat(k, [0; 3]).unwrap();
        assert!(
            !hb.parents
                .iter()
                .any(|x| x.peer.as_ref().is_some_and(|r| r.peer_id == p.peer_id)),
            "{k}"
        );
    }
}

#[test]
fn a_huge_claim_gets_the_capped_slots_and_ids_are_random() {
    let g = LiveGrids::new();
    // 1000 kbit/s default rate, 4 substreams, ceiling 4 copies: 16 slots.
    let s = g.join(input("sy", "10.0.0.1:1", 1_000_000)).unwrap();
    assert_eq!(s.granted_kbps, 4000);
    assert_eq!(g.figures("b").unwrap().stats.peer_supply, 16);
    assert_eq!(
        s.child_slots, 256,
        "the claim's slots, for the SDK's admission"
    );
    let h = g.join(input("sh", "10.0.0.2:1", 2000)).unwrap();
    assert_eq!(h.granted_kbps, 2000);
    assert_eq!(g.figures("b").unwrap().stats.peer_supply, 24);
    for id in [s.peer_id, h.peer_id] {
        assert!(id > 0 && id <= i64::MAX as u64);
    }
    assert_ne!(s.peer_id + 1, h.peer_id);
    // Heartbeats claiming uploads confirm nothing while it carries no child.
    g.heartbeat("sy", [0, 0, 0]);
    assert_eq!(g.uploads_confirmed(), 0);
}

#[test]
fn measured_rate_is_used_at_grid_creation() {
    let g = LiveGrids::new();
    g.set_rate("b", 2000);
    let a = g.join(input("sa", "10.0.0.1:1", 1000)).unwrap();
    assert_eq!(a.stream_kbps, 2000);
    assert_eq!(a.child_slots, 2);
}

/// Whether `w` was woken (a stored permit), without waiting.
fn was_woken(w: &StreamWake) -> bool {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        tokio::time::timeout(Duration::from_millis(1), w.woken())
            .await
            .is_ok()
    })
}

#[test]
fn streams_are_woken_keep_sessions_alive_and_detach_with_grace() {
    let g = LiveGrids::new();
    let a = g.join(input("sa", "10.0.0.1:1", 4000)).unwrap();
    g.join(input("sb", "", 0)).unwrap();
    let (wa, wb) = (
        std::sync::Arc::new(StreamWake::default()),
        std::sync::Arc::new(StreamWake::default()),
    );
    let at_a = g.attach("sa", &wa).unwrap();
    let at_b = g.attach("sb", &wb).unwrap();
    assert_eq!(at_a.peer_id, a.peer_id);
    assert!(g.attach("nope", &wa).is_none());
    assert!(!was_woken(&wa) && !was_woken(&wb));
    // Attached sessions never expire by silence.
    std::thread::sleep(Duration::from_millis(5));
    assert!(g.expire(Duration::ZERO).is_empty());
    // B's stream detaches: B expires once the grace has passed (here: at once; the
    // silence timeout is 2 ms).
    let timeout = Duration::from_millis(2);
    assert!(g.detach("sb", at_b.generation, &wb, timeout, Duration::ZERO));
    std::thread::sleep(Duration::from_millis(5));
    let expired = g.expire(timeout);
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].session_id, "sb");
    // A new B child of A; A leaves: the child's stream is woken, and so is A's own.
    g.join(input("sc", "", 0)).unwrap();
    let wc = std::sync::Arc::new(StreamWake::default());
    g.attach("sc", &wc).unwrap();
    assert!(
        g.view("sc")
            .unwrap()
            .parents
            .iter()
            .any(|p| p.peer.is_some())
    );
    g.leave("sa");
    assert!(was_woken(&wc), "the moved child is woken");
    assert!(was_woken(&wa), "the removed peer's stream is woken");
    assert!(!g.detach(
        "sa",
        at_a.generation,
        &wa,
        Duration::from_secs(60),
        Duration::ZERO
    ));
    // A second stream supersedes the first.
    let wc2 = std::sync::Arc::new(StreamWake::default());
    let second = g.attach("sc", &wc2).unwrap();
    assert!(wc.superseded() && was_woken(&wc));
    assert!(!wc2.superseded());
    assert!(g.detach(
        "sc",
        second.generation,
        &wc2,
        Duration::from_secs(60),
        Duration::from_secs(60)
    ));
    assert!(
        g.expire(Duration::from_secs(60)).is_empty(),
        "within the grace"
    );
}
