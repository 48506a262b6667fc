//! Lying parents, deterministically: a parent that fails every other push (skipping
//! it with a notice, or not sending it at all) is re-searched and reported; an honest
//! relay carrying a partly covered slot (3.2 slots' budget, 4 children, skips paced
//! per child as the SDK's relay does) is not.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use super::{Action, ChildPace, PeerScheduler, SchedulerConfig, Source};
use crate::Parent;

const K: u64 = 8;
const CHUNK_MS: u64 = 100;
const PARENT: u64 = 7;

fn cfg() -> SchedulerConfig {
    SchedulerConfig {
        substreams: K as u16,
        chunk_duration: Duration::from_millis(CHUNK_MS),
        ..SchedulerConfig::default()
    }
}

/// What the parent does with a chunk of the substream it feeds.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fate {
    Pushed,
    Skipped,
    NeverSent,
}

/// A child whose substream `s` is fed by peer `PARENT` and the others by the server,
/// for `chunks` chunks; `fate(i)` says what happens to the parent's i-th chunk.
/// Returns the reports and the re-searches of substream `s` that excluded the parent.
fn run(s: u16, chunks: u64, mut fate: impl FnMut(u64) -> Fate) -> (Vec<Action>, Vec<Action>) {
    let mut sched = PeerScheduler::new(cfg()).unwrap();
    let at = |ms: u64| Duration::from_millis(ms);
    for sub in 0..K as u16 {
        let up = if sub == s {
            Parent::Peer(PARENT)
        } else {
            Parent::Server
        };
        sched.on_parent_changed(sub, Some(up), at(0));
    }
    let (mut reports, mut researches) = (Vec::new(), Vec::new());
    let mut i = 0;
    for seq in 0..chunks {
        // Each chunk arrives 20 ms after it is cut.
        let now = at(seq * CHUNK_MS + 20);
        let sub = (seq % K) as u16;
        if sub == s {
            match fate(i) {
                Fate::Pushed => {
                    sched.on_chunk(seq, Source::Parent(sub), now);
                }
                Fate::Skipped => sched.on_parent_skipped(seq, now),
                Fate::NeverSent => {}
            }
            i += 1;
        } else {
            sched.on_chunk(seq, Source::Parent(sub), now);
        }
        sched.tick(now);
        while let Some(a) = sched.poll_action() {
            match a {
                Action::ReportParent { .. } => reports.push(a),
                Action::ReSearch {
                    substream,
                    exclude: Some(p),
                } if substream == s && p == PARENT => researches.push(a),
                _ => {}
            }
        }
    }
    (reports, researches)
}

#[test]
fn a_parent_skipping_every_other_push_is_re_searched_and_reported() {
    // Never two skips in a row: the strike rule (four in a row) never fires.
    let (reports, researches) = run(3, 8 * 64, |i| {
        if i % 2 == 1 {
            Fate::Skipped
        } else {
            Fate::Pushed
        }
    });
    assert_eq!(
        reports,
        vec![Action::ReportParent {
            substream: 3,
            parent: PARENT,
            missed: 16,
            window: 32,
        }],
        "reported once, as soon as its first 32 owed chunks are in"
    );
    assert!(!researches.is_empty(), "and re-searched");
}

#[test]
fn a_parent_silently_dropping_every_other_push_is_re_searched_and_reported() {
    let (reports, researches) = run(5, 8 * 64, |i| {
        if i % 2 == 1 {
            Fate::NeverSent
        } else {
            Fate::Pushed
        }
    });
    assert_eq!(reports.len(), 1, "{reports:?}");
    assert!(!researches.is_empty());
}

#[test]
fn an_honest_relay_with_a_partly_covered_slot_is_never_blamed() {
    // 3.2 slots' budget, 4 children on substreams 0..=3 of 8, paced as the relay paces
    // them; every skip is announced.
    let (len, slots) = (1000.0, 3.2);
    let rate = slots * len / (K as f64 * CHUNK_MS as f64 / 1000.0);
    let children = [0u64, 1, 2, 3];
    let chunks = 8 * 400;
    let mut pace = [ChildPace::default(); 4];
    let mut fates: Vec<Vec<Fate>> = vec![Vec::new(); 4];
    for seq in 0..chunks {
        for (c, &s) in children.iter().enumerate() {
            if seq % K == s {
                let ok = pace[c].allow(rate, 1, 4, len, Duration::from_millis(seq * CHUNK_MS));
                fates[c].push(if ok { Fate::Pushed } else { Fate::Skipped });
            }
        }
    }
    for (c, &s) in children.iter().enumerate() {
        let skipped = fates[c].iter().filter(|f| **f == Fate::Skipped).count();
        // The budget covers 80 % of the pushes: each child loses about a fifth.
        let n = fates[c].len();
        assert!(
            (n / 6..=n / 4).contains(&skipped),
            "child {c}: {skipped} of {n} skipped"
        );
        let f = fates[c].clone();
        let (reports, researches) = run(s as u16, chunks, |i| f[i as usize]);
        assert!(reports.is_empty(), "child {c}: {reports:?}");
        assert!(researches.is_empty(), "child {c}: {researches:?}");
    }
}
