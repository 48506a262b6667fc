//! [`Peer`] deterministically: pushes paced to the budget with skip announcements,
//! serves within what pushes leave, parents, re-search and the play clock's timeouts.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use super::{Peer, PeerAction, PeerConfig, SchedulerConfig, Source};
use crate::Parent;

const K: u16 = 4;
const MS: fn(u64) -> Duration = Duration::from_millis;

fn peer(upload_kbps: u32, slots: u32) -> Peer {
    let cfg = PeerConfig {
        me: 1,
        scheduler: SchedulerConfig {
            substreams: K,
            chunk_duration: MS(100),
            ..SchedulerConfig::default()
        },
        upload_kbps,
        budget_kbps: upload_kbps,
        stream_kbps: 800,
        child_slots: slots,
    };
    Peer::new(cfg, Duration::ZERO).unwrap()
}

fn drain(p: &mut Peer) -> Vec<PeerAction> {
    std::iter::from_fn(|| p.poll_action()).collect()
}

#[test]
fn pushes_beyond_a_childs_share_are_announced_as_skipped() {
    // 8 kbit/s = 1000 B/s, one child on substream 0: its share is the whole budget,
    // with 2 s of debt (2000 B): 1000-byte chunks, two go out on debt, then skips.
    let mut p = peer(8, 1);
    p.add_child(9, 0b1, None);
    let mut sent = 0;
    let mut skipped = 0;
    for i in 0..4u64 {
        let seq = i * u64::from(K);
        assert!(p.handle_chunk(seq, Source::Parent(0), 1000, 0, MS(1)));
        for a in drain(&mut p) {
            match a {
                PeerAction::Send {
                    to: 9,
                    seq: s,
                    push: true,
                } if s == seq => {
                    sent += 1;
                    p.on_uploaded(1000);
                }
                PeerAction::NotFound { to: 9, seq: s } if s == seq => skipped += 1,
                _ => {}
            }
        }
    }
    assert_eq!(
        (sent, skipped),
        (3, 1),
        "debt floor: credit > -2000 B allows a third"
    );
}

#[test]
fn serves_spend_only_what_is_saved_and_unheld_chunks_are_not_found() {
    let mut p = peer(80, 1);
    assert!(p.handle_chunk(0, Source::Parent(0), 5000, 0, Duration::ZERO));
    drain(&mut p);
    p.handle_request(5, 0, Duration::ZERO);
    p.handle_request(5, 99, Duration::ZERO);
    let a = drain(&mut p);
    assert!(a.contains(&PeerAction::NotFound { to: 5, seq: 0 }), "{a:?}");
    assert!(
        a.contains(&PeerAction::NotFound { to: 5, seq: 99 }),
        "{a:?}"
    );
    // 10,000 B/s: after a second, 5000 B are saved.
    p.handle_request(5, 0, MS(1000));
    assert_eq!(
        drain(&mut p),
        vec![PeerAction::Send {
            to: 5,
            seq: 0,
            push: false
        }]
    );
}

#[test]
fn a_parent_naming_us_is_the_data_plane_and_researches_go_one_at_a_time() {
    let mut p = peer(0, 0);
    assert_eq!(p.parent(2), Some(Parent::Server));
    p.set_parent(2, Some(Parent::Peer(7)), MS(5));
    assert_eq!(p.parent(2), Some(Parent::Peer(7)));
    p.set_parent(2, Some(Parent::Peer(1)), MS(5));
    assert_eq!(p.parent(2), Some(Parent::Server));
    p.set_parent(2, None, MS(5));
    assert_eq!(p.parent(2), None);
    p.ban(42);
    assert_eq!(p.research(2, vec![7]), Some(vec![7, 42]));
    assert_eq!(p.research(2, vec![7]), None);
    p.research_answered(2);
    assert!(p.research(2, vec![]).is_some());
    assert_eq!(p.research(K, vec![]), None, "out of range");
}

#[test]
fn slots_need_a_relay_budget_and_are_lowered_with_it() {
    assert!(!peer(0, 4).child_fits(1, 0, false));
    let mut p = peer(800, 4);
    assert!(p.child_fits(0b1111, 0, false));
    p.add_child(3, 0b11, None);
    assert_eq!(p.slots().used(), 2);
    // 200 kbit/s per slot: 400 kbit/s buys 2.
    assert_eq!(p.lower_budget(400), 2);
    assert!(!p.slots().over());
    p.link_closed(3);
    assert_eq!(p.slots().used(), 0);
}

#[test]
fn failed_parents_are_remembered_for_a_while() {
    let mut p = peer(0, 0);
    p.parent_failed(7, MS(1000));
    p.forget_old_failures(MS(5000));
    assert!(p.memory().recently_failed(7));
    p.forget_old_failures(MS(11_000));
    assert!(!p.memory().recently_failed(7));
}

#[test]
fn timeouts_are_given_in_real_time() {
    // The same chunks at the same (real) time: without timestamps the play clock runs
    // at the nominal rate; with chunks cut 200 ms apart against a nominal 100 ms, at
    // half speed, so the scheduler's next deadline is twice as far in real time.
    let feed = |p: &mut Peer, stamps: bool| {
        for s in 0..20u64 {
            let ts = if stamps { 1_000 + s * 200 } else { 0 };
            p.handle_chunk(s, Source::Parent((s % 4) as u16), 100, ts, MS(0));
        }
        drain(p);
        p.handle_timeout(MS(0));
        drain(p);
    };
    let mut p = peer(0, 0);
    feed(&mut p, false);
    let mut q = peer(0, 0);
    feed(&mut q, true);
    assert_eq!(p.clock_rate(), 1.0);
    assert!((q.clock_rate() - 0.5).abs() < 1e-9);
    let t = p.next_timeout(MS(0)).unwrap();
    let u = q.next_timeout(MS(0)).unwrap();
    assert!(t > Duration::ZERO);
    assert_eq!(u, t * 2);
}

#[test]
fn a_child_changing_its_mask_holds_only_the_new_one() {
    let mut p = peer(1000, 8);
    p.add_child(7, 0b0011, None);
    assert_eq!(p.slots().used(), 2);
    p.add_child(7, 0b0111, None);
    assert_eq!(p.slots().used(), 3);
    p.remove_child(7);
    assert_eq!(p.slots().used(), 0);
}

#[test]
fn children_that_relay_a_substream_are_pushed_it_first() {
    let mut p = peer(8000, 16);
    // Four children on substream 0 (keys 9..=12: the scheduler's own order is by key),
    // one on substream 1.
    for c in 9..=12 {
        p.add_child(c, 0b01, None);
    }
    p.add_child(13, 0b10, None);
    let told = |p: &mut Peer| -> Vec<u64> {
        drain(p)
            .into_iter()
            .filter_map(|a| match a {
                PeerAction::Relaying { substreams } => Some(substreams),
                _ => None,
            })
            .collect()
    };
    // We relay substreams 0 and 1 now: our parents are told so, once.
    assert_eq!(told(&mut p), vec![0b11]);
    // Child 11 relays substream 0, child 12 relays only substream 1 (a leaf in 0).
    p.set_child_relaying(11, 0b01);
    p.set_child_relaying(12, 0b10);
    let pushes = |p: &mut Peer, seq: u64| -> Vec<u64> {
        assert!(p.handle_chunk(seq, Source::Parent(0), 100, 0, MS(1)));
        drain(p)
            .into_iter()
            .filter_map(|a| match a {
                PeerAction::Send { to, push: true, .. } => {
                    p.on_uploaded(100);
                    Some(to)
                }
                _ => None,
            })
            .collect()
    };
    assert_eq!(pushes(&mut p, 0), vec![11, 9, 10, 12]);
    // A re-subscription (new mask) keeps what the child said; its link closing forgets it.
    p.remove_child(11);
    p.add_child(11, 0b01, Some(u64::MAX));
    assert_eq!(pushes(&mut p, 4), vec![11, 9, 10, 12]);
    p.link_closed(11);
    p.add_child(11, 0b01, Some(u64::MAX));
    assert_eq!(pushes(&mut p, 8), vec![9, 10, 11, 12]);
    // No children left on substream 1: the parents hear the new mask.
    p.link_closed(13);
    assert_eq!(told(&mut p), vec![0b01]);
}
