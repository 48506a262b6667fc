//! The peer scheduler's own unit tests (one `PeerScheduler`, events and `now` by
//! hand, no network): moved here with the simulator they used to share a file with.

use std::time::Duration;

use crate::Parent;
use crate::peer::*;

fn at(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

fn drain(s: &mut PeerScheduler) -> Vec<Action> {
    std::iter::from_fn(|| s.poll_action()).collect()
}

/// A scheduler that has seen chunks 0..=3 arrive on time (1 s chunks, seq n at n s).
fn started() -> PeerScheduler {
    let mut s = fed(SchedulerConfig::default());
    s.tick(at(3000));
    drain(&mut s);
    s
}

/// A scheduler with `cfg`, every substream fed by the server, chunks 0..=3 received at
/// 0..=3 s.
fn fed(cfg: SchedulerConfig) -> PeerScheduler {
    let mut s = PeerScheduler::new(cfg).unwrap();
    for seq in 0..4u16 {
        s.on_parent_changed(seq, Some(Parent::Server), at(0));
    }
    for seq in 0..4 {
        assert!(s.on_chunk(seq, Source::Parent(seq as u16), at(seq * 1000)));
    }
    s
}

#[test]
fn missing_chunk_comes_from_a_neighbour_that_has_it() {
    let mut s = started();
    s.on_neighbour_added(7);
    s.on_neighbour_added(8);
    let mut map = BufferMap::new(0, 16);
    map.set(4);
    s.on_buffer_map(8, map, at(4100));
    drain(&mut s);
    // seq 4 is due at 4000 + 2000 = 6000; repair starts at 5000.
    s.tick(at(4900));
    assert!(
        !drain(&mut s)
            .iter()
            .any(|a| matches!(a, Action::Request { .. }))
    );
    s.tick(at(5000));
    let acts = drain(&mut s);
    assert!(acts.contains(&Action::Request {
        neighbour: 8,
        seq: 4
    }));
    assert!(
        !acts
            .iter()
            .any(|a| matches!(a, Action::RequestFromServer { .. }))
    );
    assert!(s.on_chunk(4, Source::Neighbour(8), at(5100)));
    s.tick(at(6000));
    assert!(drain(&mut s).contains(&Action::Play { seq: 4 }));
    assert_eq!(s.stats().skipped, 0);
}

#[test]
fn server_is_asked_only_when_no_neighbour_has_it_and_the_deadline_is_near() {
    let mut s = started();
    s.on_neighbour_added(7);
    s.on_buffer_map(7, BufferMap::new(0, 16), at(4000));
    drain(&mut s);
    s.tick(at(5000));
    assert!(
        drain(&mut s)
            .iter()
            .all(|a| !matches!(a, Action::Request { .. } | Action::RequestFromServer { .. }))
    );
    s.tick(at(5600));
    assert!(drain(&mut s).contains(&Action::RequestFromServer { seq: 4 }));
    assert!(s.on_chunk(4, Source::Server, at(5700)));
    s.tick(at(6000));
    assert!(drain(&mut s).contains(&Action::Play { seq: 4 }));
}

#[test]
fn a_flowing_neighbour_is_predicted_to_hold_chunks_newer_than_its_map() {
    let mut s = started();
    // Neighbour 9's map (at 3100) holds 0..=3, its last K chunks: flowing. Neighbour 8's
    // misses chunk 2: one of its substreams is not flowing, so nothing is predicted.
    s.on_neighbour_added(8);
    s.on_neighbour_added(9);
    let mut full = BufferMap::new(0, 16);
    let mut gap = BufferMap::new(0, 16);
    for seq in 0..4 {
        full.set(seq);
        if seq != 2 {
            gap.set(seq);
        }
    }
    s.on_buffer_map(9, full, at(3100));
    s.on_buffer_map(8, gap, at(3100));
    drain(&mut s);
    // Chunk 4 (due at 6000) is missing at 5000: neighbour 9 should have had it since
    // ~4100, so it is asked; neighbour 8 never is.
    s.tick(at(5000));
    let acts = drain(&mut s);
    assert!(acts.contains(&Action::Request {
        neighbour: 9,
        seq: 4
    }));
    assert!(
        !acts
            .iter()
            .any(|a| matches!(a, Action::Request { neighbour: 8, .. }))
    );
    // A wrong guess costs one round trip: after NOT_FOUND the server is asked in time.
    s.on_not_found(9, 4, at(5050));
    s.tick(at(5600));
    let acts = drain(&mut s);
    assert!(acts.contains(&Action::RequestFromServer { seq: 4 }));
    assert!(!acts.iter().any(|a| matches!(a, Action::Request { .. })));
}

/// The neighbours a round of buffer maps went to (empty: no map this tick).
fn maps_to(acts: &[Action]) -> Vec<PeerId> {
    acts.iter()
        .filter_map(|a| match a {
            Action::SendBufferMap { to, .. } => Some(*to),
            _ => None,
        })
        .collect()
}

#[test]
fn a_flowing_peer_sends_maps_only_when_its_neighbours_would_predict_wrong() {
    // 1 s chunks, checks every 2 s, refresh every 10 s.
    let mut s = fed(SchedulerConfig::default());
    s.on_neighbour_added(7);
    assert_eq!(maps_to(&drain(&mut s)), vec![7]);
    // The first periodic check sends (nothing was sent to all yet), then a flowing peer
    // that holds every chunk since is predicted correctly: no map until the refresh.
    s.tick(at(3000));
    assert_eq!(maps_to(&drain(&mut s)), vec![7]);
    let mut seq = 4;
    let mut sent_at = Vec::new();
    for t in (4000..=16_000).step_by(1000) {
        assert!(s.on_chunk(seq, Source::Parent((seq % 4) as u16), at(t)));
        seq += 1;
        s.tick(at(t));
        if !maps_to(&drain(&mut s)).is_empty() {
            sent_at.push(t);
        }
    }
    assert_eq!(sent_at, vec![13_000], "only the 10 s refresh");
    assert_eq!(s.stats().buffer_maps_sent, 2);
    // A chunk that never comes (seq 17) makes the prediction wrong: the next check
    // sends a map without waiting for the refresh, and so does every check while the
    // hole is among the last K chunks (the neighbours then read the map itself). Once
    // flowing again, one map tells them so, and the peer is quiet again.
    seq += 1;
    let mut sent_at = Vec::new();
    for t in (18_000..=24_000).step_by(1000) {
        assert!(s.on_chunk(seq, Source::Parent((seq % 4) as u16), at(t)));
        seq += 1;
        s.tick(at(t));
        if !maps_to(&drain(&mut s)).is_empty() {
            sent_at.push(t);
        }
    }
    assert_eq!(sent_at, vec![18_000, 20_000, 22_000]);
    // A neighbour added meanwhile gets a map at once.
    s.on_neighbour_added(8);
    assert_eq!(maps_to(&drain(&mut s)), vec![8]);
    s.tick(at(25_000));
    assert_eq!(maps_to(&drain(&mut s)), Vec::<PeerId>::new());
}

#[test]
fn a_repairing_peer_ticks_every_quarter_chunk_however_busy_its_links() {
    // 1 s chunks (tick interval 250 ms); chunk 4 never comes, so from its repair lead
    // on (deadline 6 s, lead 1 s) the peer repairs and asks to be ticked periodically.
    // Events every 20 ms must not push that tick back: it is due 250 ms after the last
    // one, not 250 ms after the latest event.
    let mut s = started();
    s.on_neighbour_added(7);
    s.tick(at(5000));
    drain(&mut s);
    assert!(s.ticks_periodically(at(5000)));
    for (i, t) in (5020..5400u64).step_by(20).enumerate() {
        if i % 5 == 0 {
            s.on_buffer_map(7, BufferMap::new(0, 16), at(t));
        } else {
            s.on_request(7, 0);
        }
        drain(&mut s);
        let next = s.next_timeout(at(t)).unwrap();
        assert!(
            next <= at(5250).max(at(t)),
            "at {t} ms the next tick is {next:?}"
        );
    }
}

#[test]
fn unanswered_request_is_retried_elsewhere_then_skipped_at_the_deadline() {
    let mut s = started();
    for nb in [7, 8] {
        s.on_neighbour_added(nb);
        let mut map = BufferMap::new(0, 16);
        map.set(4);
        s.on_buffer_map(nb, map, at(4000));
    }
    drain(&mut s);
    s.tick(at(5000));
    assert!(drain(&mut s).contains(&Action::Request {
        neighbour: 7,
        seq: 4
    }));
    s.tick(at(5300));
    assert!(drain(&mut s).contains(&Action::Request {
        neighbour: 8,
        seq: 4
    }));
    s.on_not_found(8, 4, at(5350));
    s.tick(at(5600));
    assert!(drain(&mut s).contains(&Action::RequestFromServer { seq: 4 }));
    s.tick(at(6000));
    assert!(drain(&mut s).contains(&Action::Skip { seq: 4 }));
    assert_eq!(s.stats().skipped, 1);
}

#[test]
fn pushes_to_children_and_answers_requests() {
    let mut s = started();
    s.on_child_added(50, &[0, 2], None);
    s.on_child_added(51, &[1], None);
    drain(&mut s);
    s.on_chunk(4, Source::Parent(0), at(4020));
    s.on_chunk(5, Source::Parent(1), at(5020));
    s.on_chunk(6, Source::Neighbour(9), at(6020));
    assert_eq!(
        drain(&mut s),
        vec![
            Action::Push { child: 50, seq: 4 },
            Action::Push { child: 51, seq: 5 },
            Action::Push { child: 50, seq: 6 },
        ]
    );
    assert!(!s.on_chunk(4, Source::Neighbour(9), at(6030)));
    s.on_request(9, 5);
    s.on_request(9, 99);
    assert_eq!(
        drain(&mut s),
        vec![
            Action::Serve { to: 9, seq: 5 },
            Action::NotFound { to: 9, seq: 99 }
        ]
    );
    s.on_child_removed(50, &[]);
    s.on_chunk(8, Source::Parent(0), at(8020));
    assert!(drain(&mut s).is_empty());
}

#[test]
fn silent_parent_is_re_searched_once() {
    let mut s = started();
    s.on_parent_changed(0, Some(Parent::Peer(3)), at(3100));
    // seq 4 (substream 0) becomes available at ~4000; silence after 5500, but only once
    // the chunk can be had elsewhere: here, once a neighbour's buffer map has it.
    s.on_neighbour_added(9);
    for t in [4000, 5000, 5400, 5600, 5800] {
        s.tick(at(t));
        assert!(
            !drain(&mut s)
                .iter()
                .any(|a| matches!(a, Action::ReSearch { .. })),
            "re-searched at {t} though no one had the chunk"
        );
    }
    let mut map = BufferMap::new(0, 64);
    map.set(4);
    s.on_buffer_map(9, map, at(5850));
    s.tick(at(5900));
    let acts = drain(&mut s);
    assert!(acts.contains(&Action::ReSearch {
        substream: 0,
        exclude: Some(3)
    }));
    s.tick(at(5700));
    assert!(
        !drain(&mut s)
            .iter()
            .any(|a| matches!(a, Action::ReSearch { .. }))
    );
}

#[test]
fn state_stays_bounded() {
    let mut s = started();
    for seq in 4..10_000u64 {
        s.on_chunk(seq, Source::Parent((seq % 4) as u16), at(seq * 1000 + 20));
        s.tick(at(seq * 1000 + 30));
        drain(&mut s);
    }
    assert!(s.buffer_map().len() <= 64);
    assert!(s.repairs_len() <= 64 && s.held_len() <= 64);
}

#[test]
fn re_searches_back_off_while_new_parents_keep_failing() {
    let mut s = started();
    s.on_neighbour_added(9);
    let mut parent = 3;
    s.on_parent_changed(0, Some(Parent::Peer(parent)), at(3100));
    let mut times = Vec::new();
    // The neighbour has every chunk; no parent ever delivers substream 0.
    for t in (3200..230_000u64).step_by(100) {
        let live = t / 1000;
        let mut map = BufferMap::new(live.saturating_sub(63), 64);
        for q in live.saturating_sub(63)..=live {
            map.set(q);
        }
        s.on_buffer_map(9, map, at(t));
        s.tick(at(t));
        for a in drain(&mut s) {
            if let Action::ReSearch {
                substream: 0,
                exclude,
            } = a
            {
                assert_eq!(exclude, Some(parent));
                times.push(t);
                parent += 1;
                s.on_parent_changed(0, Some(Parent::Peer(parent)), at(t + 50));
            }
        }
    }
    // Doubling from 5 s, capped at 60 s; each re-search waits for the next chunk of the
    // substream to be overdue, so up to one round of K chunks (4 s) later than that.
    let gaps: Vec<u64> = times.windows(2).map(|w| w[1] - w[0]).collect();
    let least = [5000, 10_000, 20_000, 40_000, 60_000, 60_000];
    assert_eq!(gaps.len(), least.len(), "re-searches at {times:?}");
    for (g, l) in gaps.iter().zip(least) {
        assert!(
            (l..l + 4000).contains(g),
            "gap {g} ms, expected {l}..{}: re-searches at {times:?}",
            l + 4000
        );
    }
}

#[test]
fn a_start_up_burst_plays_at_once_even_out_of_order() {
    let mut s = PeerScheduler::new(SchedulerConfig::default()).unwrap();
    for sub in 0..4u16 {
        s.on_parent_changed(sub, Some(Parent::Server), at(9_000));
    }
    // The live chunk first (available at 10 000: seq 10 at 1 s chunks, base 0)...
    assert!(s.on_chunk(10, Source::Parent(2), at(10_000)));
    s.tick(at(10_005));
    assert!(
        drain(&mut s)
            .iter()
            .all(|a| !matches!(a, Action::Play { .. }))
    );
    // ...then the start-up burst of older ones: they are still taken, and being past
    // their deadline (seq·1 s + 2 s lag) they play at once, oldest first.
    for seq in 7..10 {
        assert!(s.on_chunk(seq, Source::Parent((seq % 4) as u16), at(10_010)));
    }
    s.tick(at(10_020));
    let plays: Vec<u64> = drain(&mut s)
        .into_iter()
        .filter_map(|a| match a {
            Action::Play { seq } => Some(seq),
            _ => None,
        })
        .collect();
    assert_eq!(plays, vec![7, 8]);
    // From the first play on, the schedule is fixed: an older chunk is refused and the
    // next ones play on time (seq 9 at 11 000, seq 10 at 12 000).
    assert!(!s.on_chunk(6, Source::Neighbour(5), at(10_030)));
    s.tick(at(10_999));
    assert!(
        drain(&mut s)
            .iter()
            .all(|a| !matches!(a, Action::Play { .. }))
    );
    s.tick(at(11_000));
    assert!(drain(&mut s).contains(&Action::Play { seq: 9 }));
    s.tick(at(12_000));
    assert!(drain(&mut s).contains(&Action::Play { seq: 10 }));
    assert_eq!(s.stats().skipped, 0);
}

#[test]
fn a_new_parent_is_not_silent_for_chunks_that_came_before_it() {
    // 1 s chunks, K = 4: a substream carries one chunk every 4 s, longer than the 1.5 s
    // silence timeout. A parent assigned at 4500, after chunk 4 (substream 0) became
    // available at 4000, owes chunk 8 first (due ~8000); before it, no re-search, even
    // though chunk 4 (held, and in a neighbour's map) is not played yet (4 s lag).
    let mut s = fed(SchedulerConfig {
        target_lag: Duration::from_secs(4),
        repair_lead: Duration::from_secs(2),
        ..SchedulerConfig::default()
    });
    s.on_chunk(4, Source::Server, at(4000));
    s.on_parent_changed(0, Some(Parent::Peer(3)), at(4500));
    s.on_neighbour_added(9);
    let mut map = BufferMap::new(0, 64);
    map.set(4);
    s.on_buffer_map(9, map.clone(), at(4600));
    for t in [5000, 6000, 6500, 7000, 8000, 9000, 9400] {
        s.tick(at(t));
        let acts = drain(&mut s);
        assert!(
            !acts.iter().any(|a| matches!(a, Action::ReSearch { .. })),
            "re-searched at {t}, before the new parent's first due chunk"
        );
        if t == 7000 {
            assert!(
                !acts.contains(&Action::Play { seq: 4 }),
                "chunk 4 played too early"
            );
        }
    }
    // Chunk 8 is not delivered and a neighbour has it: silent after 8000 + 1.5 s.
    map.set(8);
    s.on_buffer_map(9, map, at(9450));
    s.tick(at(9600));
    assert!(drain(&mut s).contains(&Action::ReSearch {
        substream: 0,
        exclude: Some(3)
    }));
}

#[test]
fn a_parent_that_skips_a_push_is_not_silent_but_one_that_keeps_skipping_is_replaced() {
    // 1 s chunks, K = 4; peer 3 becomes substream 0's parent at 3500 and owes chunk 4
    // (available at 4000) first. It skips it (over its upload budget) and says so.
    let mut s = fed(SchedulerConfig::default());
    s.on_parent_changed(0, Some(Parent::Peer(3)), at(3500));
    drain(&mut s);
    // It is repaired well before the repair lead (1 s before its deadline), so that it
    // can still reach this peer's own children in time: from a neighbour that has it at
    // once, else (here: no neighbour) from the server 500 ms after the skip.
    s.on_parent_skipped(4, at(4000));
    assert_eq!(drain(&mut s), vec![]);
    s.tick(at(4250));
    assert!(!drain(&mut s).contains(&Action::RequestFromServer { seq: 4 }));
    s.tick(at(4500));
    assert!(drain(&mut s).contains(&Action::RequestFromServer { seq: 4 }));
    // The repair arrives: held now, so a silence check would blame the parent.
    assert!(s.on_chunk(4, Source::Server, at(4550)));
    for (t, seq) in [
        (5000, 5),
        (5600, 0),
        (5800, 0),
        (6000, 6),
        (7000, 7),
        (9000, 0),
    ] {
        if seq != 0 {
            assert!(s.on_chunk(seq, Source::Parent((seq % 4) as u16), at(t)));
        }
        s.tick(at(t));
        let acts = drain(&mut s);
        assert!(
            !acts.iter().any(|a| matches!(a, Action::ReSearch { .. })),
            "re-searched at {t}: a skip announced by the parent is not silence"
        );
        if t == 6000 {
            assert!(
                acts.contains(&Action::Play { seq: 4 }),
                "chunk 4 repaired in time"
            );
        }
    }
    assert_eq!(s.stats().parent_skips, 1);
    assert_eq!(s.stats().skipped, 0);
    // A notice for a chunk far beyond the newest held (or already played) is ignored.
    s.on_parent_skipped(1_000_000, at(9000));
    s.on_parent_skipped(1, at(9000));
    assert_eq!(s.stats().parent_skips, 1);
    assert!(drain(&mut s).is_empty());
    // A parent that skips every push of the substream is replaced on the fourth skip in a
    // row (three strikes): 4, 8, 12, 16.
    for seq in [8, 12] {
        s.on_parent_skipped(seq, at(seq * 1000));
        assert!(
            !drain(&mut s)
                .iter()
                .any(|a| matches!(a, Action::ReSearch { .. }))
        );
    }
    s.on_parent_skipped(16, at(16_000));
    assert!(drain(&mut s).contains(&Action::ReSearch {
        substream: 0,
        exclude: Some(3)
    }));
}

#[test]
fn within_the_server_lead_one_neighbour_then_the_server() {
    // Seq 4 is due at 6000; the server lead (400 ms) opens at 5600. Four neighbours'
    // maps hold it; each answers NOT_FOUND (its upload budget spent).
    let mut s = started();
    for nb in [7, 8, 9, 10] {
        s.on_neighbour_added(nb);
        let mut map = BufferMap::new(0, 16);
        map.set(4);
        s.on_buffer_map(nb, map, at(4000));
    }
    drain(&mut s);
    s.tick(at(5000));
    assert!(drain(&mut s).contains(&Action::Request {
        neighbour: 7,
        seq: 4
    }));
    s.on_not_found(7, 4, at(5050));
    // Before the server lead, neighbours whose maps hold it are asked in turn.
    s.tick(at(5100));
    assert!(drain(&mut s).contains(&Action::Request {
        neighbour: 8,
        seq: 4
    }));
    s.on_not_found(8, 4, at(5650));
    // Within it: one more neighbour…
    s.tick(at(5650));
    assert!(drain(&mut s).contains(&Action::Request {
        neighbour: 9,
        seq: 4
    }));
    s.on_not_found(9, 4, at(5700));
    // …then the server, before the deadline (not neighbour 10).
    s.tick(at(5700));
    let acts = drain(&mut s);
    assert!(
        acts.contains(&Action::RequestFromServer { seq: 4 }),
        "{acts:?}"
    );
    assert!(s.on_chunk(4, Source::Server, at(5750)));
    s.tick(at(6000));
    assert!(drain(&mut s).contains(&Action::Play { seq: 4 }));
    assert_eq!(s.stats().skipped, 0);
}

#[test]
fn within_the_server_lead_a_prediction_is_not_worth_a_try() {
    // Neighbour 7 was flowing when it sent its map (chunks 0..=3): seq 4 is predicted
    // there from 5000 on. Inside the server lead the server is asked instead.
    let mut s = started();
    s.on_neighbour_added(7);
    let mut map = BufferMap::new(0, 16);
    for seq in 0..4 {
        map.set(seq);
    }
    s.on_buffer_map(7, map, at(4000));
    drain(&mut s);
    s.tick(at(5700));
    let acts = drain(&mut s);
    assert!(
        acts.contains(&Action::RequestFromServer { seq: 4 }),
        "{acts:?}"
    );
    assert!(
        !acts
            .iter()
            .any(|a| matches!(a, Action::Request { seq: 4, .. })),
        "{acts:?}"
    );
}

#[test]
fn a_new_child_gets_the_start_backfill_and_a_resuming_one_what_it_lacks() {
    // 250 ms chunks, K = 4, back-fill 1.5 s = 6 chunks: seqs 0..=23 held.
    let mut s = PeerScheduler::new(SchedulerConfig {
        chunk_duration: Duration::from_millis(250),
        start_backfill: Duration::from_millis(1500),
        ..SchedulerConfig::default()
    })
    .unwrap();
    for sub in 0..4u16 {
        s.on_parent_changed(sub, Some(Parent::Server), at(0));
    }
    for seq in 0..24u64 {
        assert!(s.on_chunk(seq, Source::Parent((seq % 4) as u16), at(seq * 250)));
    }
    drain(&mut s);
    let pushed = |s: &mut PeerScheduler, child: PeerId| -> Vec<u64> {
        drain(s)
            .into_iter()
            .filter_map(|a| match a {
                Action::Push { child: c, seq } if c == child => Some(seq),
                _ => None,
            })
            .collect()
    };
    // A starting viewer (live): the last 1.5 s of its substreams (0 and 2).
    s.on_child_added(50, &[0, 2], None);
    assert_eq!(pushed(&mut s, 50), vec![18, 20, 22]);
    // A re-parented child playing from 21: only what it lacks from there.
    s.on_child_added(51, &[1, 3], Some(21));
    assert_eq!(pushed(&mut s, 51), vec![21, 23]);
    // A resume point older than the back-fill is capped to it.
    s.on_child_added(52, &[1], Some(3));
    assert_eq!(pushed(&mut s, 52), vec![21]);
    // Nothing new: nothing sent.
    s.on_child_added(53, &[0, 1, 2, 3], Some(24));
    assert_eq!(pushed(&mut s, 53), Vec::<u64>::new());
}

/// A parent that always takes 1.2 s is judged against the play-out base, not against
/// the earliest arrival ever seen: one chunk straight from the source must not make it
/// late from then on (the ten-minute creep of issue 16).
#[test]
fn one_early_chunk_does_not_make_a_steady_parent_late() {
    let mut s = PeerScheduler::new(SchedulerConfig::default()).unwrap();
    s.on_parent_changed(0, Some(Parent::Peer(50)), at(0));
    for sub in 1..4u16 {
        s.on_parent_changed(sub, Some(Parent::Server), at(0));
    }
    s.on_neighbour_added(8);
    let mut acts = Vec::new();
    for seq in 0..40u64 {
        let when = seq * 1000 + 1200;
        if seq == 9 {
            // From a neighbour, right at the chunk's availability (the parent's push
            // follows at its usual time).
            s.tick(at(seq * 1000));
            acts.extend(drain(&mut s));
            s.on_chunk(seq, Source::Neighbour(8), at(seq * 1000));
        }
        let from = Source::Parent((seq % 4) as u16);
        if seq == 6 {
            // The neighbour holds everything (so a late parent could be left for it).
            let mut map = BufferMap::new(0, 64);
            for i in 0..64 {
                map.set(i);
            }
            s.on_buffer_map(8, map, at(when - 1));
        }
        s.tick(at(when - 1));
        acts.extend(drain(&mut s));
        s.on_chunk(seq, from, at(when));
        s.tick(at(when));
        acts.extend(drain(&mut s));
    }
    assert!(s.stats().played > 30, "{:?}", s.stats());
    assert!(
        !acts
            .iter()
            .any(|a| matches!(a, Action::ReSearch { .. } | Action::ReportParent { .. })),
        "{:?}",
        acts.iter()
            .filter(|a| matches!(a, Action::ReSearch { .. } | Action::ReportParent { .. }))
            .collect::<Vec<_>>()
    );
}

/// Runs one peer fed by the server on every substream: chunk `seq` (1 s chunks, K = 4)
/// arrives `delay(seq)` ms after its availability; ticks every 50 ms. Returns each
/// played chunk's lag (play time − `seq`·1 s) and every action.
fn play_with_delays(
    catch_up: Duration,
    delay: impl Fn(u64) -> u64,
) -> (Vec<(u64, u64)>, Vec<Action>) {
    let mut s = PeerScheduler::new(SchedulerConfig {
        catch_up,
        ..SchedulerConfig::default()
    })
    .unwrap();
    for sub in 0..4u16 {
        s.on_parent_changed(sub, Some(Parent::Server), at(0));
    }
    let mut arrivals: Vec<(u64, u64)> = (0..60u64).map(|q| (q * 1000 + delay(q), q)).collect();
    arrivals.sort();
    let (mut lags, mut acts) = (Vec::new(), Vec::new());
    let mut next = 0;
    // Until chunk 59 has played (later ones never come).
    for now in (0..61_000u64).step_by(50) {
        while next < arrivals.len() && arrivals[next].0 <= now {
            let seq = arrivals[next].1;
            s.on_chunk(seq, Source::Parent((seq % 4) as u16), at(now));
            next += 1;
        }
        s.tick(at(now));
        for a in drain(&mut s) {
            if let Action::Play { seq } = a {
                lags.push((seq, now - seq * 1000));
            }
            acts.push(a);
        }
    }
    (lags, acts)
}

/// The start-up schedule follows the first chunks (here 1.5 s behind the source, as a
/// parent's back-fill queues them); once every substream shows it runs 0.3 s behind,
/// play-out catches up at 1.1x to that plus the target lag, and plays every chunk.
#[test]
fn the_schedule_catches_up_with_a_stream_that_arrives_sooner() {
    let delay = |q: u64| if q < 4 { 1500 } else { 300 };
    let (lags, acts) = play_with_delays(Duration::from_millis(100), delay);
    let first = lags.first().unwrap().1;
    let last = lags.last().unwrap().1;
    assert!((3450..=3550).contains(&first), "{lags:?}");
    assert!((2250..=2350).contains(&last), "{lags:?}");
    // No faster than 1.1x: 100 ms a second.
    for w in lags.windows(2) {
        assert!(w[0].1 - w[1].1 <= 150, "{w:?}");
    }
    assert!(
        !acts.iter().any(|a| matches!(a, Action::Skip { .. })),
        "{acts:?}"
    );
    // Without catching up the start-up schedule holds for good.
    let (lags, _) = play_with_delays(Duration::ZERO, delay);
    assert!(
        lags.iter().all(|&(_, l)| (3450..=3550).contains(&l)),
        "{lags:?}"
    );
}

/// Catching up stops where the slowest substream's chunks would come later than half
/// the late threshold (1 s) after the schedule's base: its parent is not made late,
/// nothing is skipped or re-searched.
#[test]
fn catching_up_never_makes_the_slowest_substream_late() {
    let delay = |q: u64| match (q < 4, q % 4) {
        (true, _) => 1500,
        (false, 3) => 1200,
        _ => 300,
    };
    let (lags, acts) = play_with_delays(Duration::from_millis(100), delay);
    let last = lags.last().unwrap().1;
    // Base 1200 − 500 = 700 behind the source, plus the 2 s target lag.
    assert!((2650..=2750).contains(&last), "{lags:?}");
    assert!(
        !acts.iter().any(|a| matches!(
            a,
            Action::Skip { .. } | Action::ReSearch { .. } | Action::RequestFromServer { .. }
        )),
        "{acts:?}"
    );
}
