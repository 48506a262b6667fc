//! The sans-IO live playlist follower: give it each loaded media playlist and the time
//! (ms on any monotonic clock) its load began; it says which segments to fetch next, in
//! order, and when to reload. No I/O, no clock reads.
//!
//! Rules (RFC 8216 §6.3.3, §6.3.4):
//! * Start (and re-start) near the live edge: at the newest segment from which at least
//!   `live_start_ms` of media (default three target durations) remain in the playlist.
//! * Reload one target duration after the start of a load that found the playlist
//!   changed (new segments, or `EXT-X-ENDLIST` appeared), half a target duration after
//!   an unchanged one; never again after `EXT-X-ENDLIST`.
//! * `EXT-X-DISCONTINUITY` marks the job after it; `EXT-X-GAP` segments are skipped and
//!   mark the next job.
//! * A gap in media sequence numbers (segments that left the playlist before we fetched
//!   them), or a backlog longer than four live starts, re-starts at the live edge: the
//!   skipped segments are counted as missed and the next job is a discontinuity.
//! * Sequence numbers going backwards (the origin restarted its packager) re-start at
//!   the live edge as well, as a discontinuity.
//! * A segment is never handed out twice.

use super::playlist::MediaPlaylist;

/// Reload periods are computed from a target duration clamped to this range (ms), so a
/// hostile `EXT-X-TARGETDURATION:0` cannot make us spin.
pub const MIN_TARGET_MS: u64 = 1000;
pub const MAX_TARGET_MS: u64 = 60_000;

/// Follower settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FollowerConfig {
    /// Media to start behind the end of the playlist; `None`: three target durations.
    pub live_start_ms: Option<u64>,
}

/// One segment to fetch and feed to the chunker, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub seq: u64,
    /// As written in the playlist (resolve against the playlist URL).
    pub uri: String,
    pub duration_ms: u64,
    /// Data before this segment is not continuous with it (`EXT-X-DISCONTINUITY`, a
    /// gap, a skipped `EXT-X-GAP` segment, or a re-start).
    pub discontinuity: bool,
    /// The `EXT-X-MAP` init segment URI in effect.
    pub map: Option<String>,
}

/// What one loaded playlist means.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Update {
    pub jobs: Vec<Job>,
    /// The playlist changed since the previous load.
    pub changed: bool,
    /// Segments that left the playlist (or were skipped to catch up) before we fetched
    /// them.
    pub missed: u64,
    /// The media sequence went backwards: followed from the new live edge.
    pub restarted: bool,
}

/// Counters since the follower was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FollowerStats {
    pub loads: u64,
    pub unchanged_loads: u64,
    pub jobs: u64,
    pub missed: u64,
    pub gap_segments: u64,
    pub restarts: u64,
}

/// Follows one live media playlist.
#[derive(Debug, Clone, Default)]
pub struct Follower {
    cfg: FollowerConfig,
    next_seq: Option<u64>,
    last_end: Option<u64>,
    target_ms: u64,
    next_reload_ms: Option<u64>,
    last_change_ms: Option<u64>,
    ended: bool,
    pending_discontinuity: bool,
    stats: FollowerStats,
}

impl Follower {
    pub fn new(cfg: FollowerConfig) -> Self {
        Follower {
            cfg,
            target_ms: MIN_TARGET_MS,
            ..Follower::default()
        }
    }

    /// Takes a media playlist whose load began at `load_started_ms`.
    pub fn on_playlist(&mut self, load_started_ms: u64, pl: &MediaPlaylist) -> Update {
        self.stats.loads += 1;
        self.target_ms = pl.target_duration_ms.clamp(MIN_TARGET_MS, MAX_TARGET_MS);
        let end = pl.end_sequence();
        let changed = self.last_end != Some(end) || (pl.ended && !self.ended);
        let mut upd = Update {
            changed,
            ..Update::default()
        };
        let live = self.live_start(pl);
        let from = match self.next_seq {
            None => live,
            Some(n) if n > end => {
                // Fewer segments than we already fetched: the origin restarted.
                self.stats.restarts += 1;
                upd.restarted = true;
                self.pending_discontinuity = true;
                live
            }
            Some(n) if n < pl.media_sequence || self.behind_ms(pl, n) > 4 * self.live_ms() => {
                upd.missed = live.saturating_sub(n);
                self.pending_discontinuity = true;
                live
            }
            Some(n) => n,
        };
        for s in pl.segments.iter().filter(|s| s.seq >= from) {
            if s.gap {
                self.stats.gap_segments += 1;
                self.pending_discontinuity = true;
                continue;
            }
            let discontinuity = std::mem::take(&mut self.pending_discontinuity) || s.discontinuity;
            upd.jobs.push(Job {
                seq: s.seq,
                uri: s.uri.clone(),
                duration_ms: s.duration_ms,
                discontinuity,
                map: s.map.clone(),
            });
        }
        self.next_seq = Some(end.max(from));
        self.last_end = Some(end);
        self.ended = pl.ended;
        self.stats.jobs += upd.jobs.len() as u64;
        self.stats.missed += upd.missed;
        if changed {
            self.last_change_ms = Some(load_started_ms);
        } else {
            self.stats.unchanged_loads += 1;
        }
        self.next_reload_ms = if pl.ended {
            None
        } else if changed {
            Some(load_started_ms.saturating_add(self.target_ms))
        } else {
            Some(load_started_ms.saturating_add(self.target_ms / 2))
        };
        upd
    }

    /// When to begin the next load; `None` after `EXT-X-ENDLIST` (or before any load).
    pub fn next_reload_ms(&self) -> Option<u64> {
        self.next_reload_ms
    }

    /// The last playlist had `EXT-X-ENDLIST`: nothing more will come.
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// Since when (ms) the playlist has not changed; `None` before the first load.
    pub fn unchanged_since_ms(&self) -> Option<u64> {
        self.last_change_ms
    }

    /// The clamped target duration of the last playlist (ms).
    pub fn target_ms(&self) -> u64 {
        self.target_ms
    }

    pub fn stats(&self) -> FollowerStats {
        self.stats
    }

    fn live_ms(&self) -> u64 {
        self.cfg.live_start_ms.unwrap_or(3 * self.target_ms)
    }

    /// Sequence number to start at: the newest segment with at least `live_ms` of media
    /// from its start to the end (the first segment if the playlist is shorter).
    fn live_start(&self, pl: &MediaPlaylist) -> u64 {
        let want = self.live_ms();
        let mut acc = 0u64;
        for s in pl.segments.iter().rev() {
            acc = acc.saturating_add(s.duration_ms);
            if acc >= want {
                return s.seq;
            }
        }
        pl.media_sequence
    }

    /// Media in the playlist from sequence number `n` to the end.
    fn behind_ms(&self, pl: &MediaPlaylist, n: u64) -> u64 {
        pl.segments
            .iter()
            .filter(|s| s.seq >= n)
            .fold(0u64, |a, s| a.saturating_add(s.duration_ms))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::hls::playlist::Segment;
    use proptest::prelude::*;

    /// A live window of `len` 1-s segments starting at `first`, target duration 1 s.
    fn window(first: u64, len: u64) -> MediaPlaylist {
        MediaPlaylist {
            target_duration_ms: 1000,
            media_sequence: first,
            segments: (first..first + len)
                .map(|seq| Segment {
                    seq,
                    uri: format!("s{seq}.ts"),
                    duration_ms: 1000,
                    ..Segment::default()
                })
                .collect(),
            ended: false,
        }
    }

    fn seqs(u: &Update) -> Vec<u64> {
        u.jobs.iter().map(|j| j.seq).collect()
    }

    #[test]
    fn starts_three_target_durations_behind_the_edge_then_follows() {
        let mut f = Follower::new(FollowerConfig::default());
        let u = f.on_playlist(0, &window(10, 6));
        assert_eq!(seqs(&u), [13, 14, 15]);
        assert!(u.changed && u.missed == 0 && !u.restarted);
        assert!(u.jobs.iter().all(|j| !j.discontinuity));
        assert_eq!(u.jobs[0].uri, "s13.ts");
        assert_eq!(f.next_reload_ms(), Some(1000));
        // One new segment: only it; reload one target duration after the load began.
        let u = f.on_playlist(1000, &window(11, 6));
        assert_eq!(seqs(&u), [16]);
        assert_eq!(f.next_reload_ms(), Some(2000));
        // Unchanged: nothing, reload after half a target duration.
        let u = f.on_playlist(2000, &window(11, 6));
        assert!(u.jobs.is_empty() && !u.changed);
        assert_eq!(f.next_reload_ms(), Some(2500));
        assert_eq!(f.unchanged_since_ms(), Some(1000));
        let u = f.on_playlist(2500, &window(12, 6));
        assert_eq!(seqs(&u), [17]);
        assert_eq!(f.unchanged_since_ms(), Some(2500));
        let s = f.stats();
        assert_eq!((s.loads, s.unchanged_loads, s.jobs, s.missed), (4, 1, 5, 0));
    }

    #[test]
    fn a_configured_live_start_and_short_playlists() {
        let mut f = Follower::new(FollowerConfig {
            live_start_ms: Some(1),
        });
        assert_eq!(seqs(&f.on_playlist(0, &window(5, 6))), [10]);
        let mut f = Follower::new(FollowerConfig::default());
        assert_eq!(seqs(&f.on_playlist(0, &window(5, 2))), [5, 6]);
        let mut f = Follower::new(FollowerConfig::default());
        let u = f.on_playlist(0, &window(5, 0));
        assert!(u.jobs.is_empty());
        assert_eq!(seqs(&f.on_playlist(1000, &window(5, 1))), [5]);
    }

    #[test]
    fn discontinuity_tags_and_gap_segments_mark_the_next_job() {
        let mut f = Follower::new(FollowerConfig::default());
        f.on_playlist(0, &window(0, 3));
        let mut pl = window(1, 5);
        pl.segments[2].discontinuity = true; // seq 3
        pl.segments[3].gap = true; // seq 4 is absent
        let u = f.on_playlist(1000, &pl);
        assert_eq!(seqs(&u), [3, 5]);
        assert!(u.jobs[0].discontinuity && u.jobs[1].discontinuity);
        assert_eq!(f.stats().gap_segments, 1);
    }

    #[test]
    fn segments_that_fell_off_are_counted_and_restart_at_the_live_edge() {
        let mut f = Follower::new(FollowerConfig::default());
        assert_eq!(seqs(&f.on_playlist(0, &window(0, 6))), [3, 4, 5]);
        // We were away: the window now starts at 20 (we wanted 6).
        let u = f.on_playlist(15_000, &window(20, 6));
        assert_eq!(seqs(&u), [23, 24, 25]);
        assert_eq!(u.missed, 17);
        assert!(u.jobs[0].discontinuity && !u.jobs[1].discontinuity);
        assert_eq!(f.stats().missed, 17);
    }

    #[test]
    fn a_long_backlog_is_skipped_to_the_live_edge() {
        let mut f = Follower::new(FollowerConfig::default());
        f.on_playlist(0, &window(0, 3));
        // 100 new segments at once (a hostile or stuck origin): 12 s is the most we catch up.
        let u = f.on_playlist(1000, &window(0, 103));
        assert_eq!(seqs(&u), [100, 101, 102]);
        assert_eq!(u.missed, 97);
        assert!(u.jobs[0].discontinuity);
    }

    #[test]
    fn sequence_going_backwards_is_a_restart() {
        let mut f = Follower::new(FollowerConfig::default());
        f.on_playlist(0, &window(500, 6));
        let u = f.on_playlist(1000, &window(0, 4));
        assert!(u.restarted);
        assert_eq!(seqs(&u), [1, 2, 3]);
        assert!(u.jobs[0].discontinuity);
        assert_eq!(seqs(&f.on_playlist(2000, &window(0, 5))), [4]);
        assert_eq!(f.stats().restarts, 1);
    }

    #[test]
    fn endlist_stops_reloading_and_an_unchanged_ended_playlist_gives_nothing() {
        let mut f = Follower::new(FollowerConfig::default());
        f.on_playlist(0, &window(0, 6));
        let mut pl = window(1, 6);
        pl.ended = true;
        let u = f.on_playlist(1000, &pl);
        assert_eq!(seqs(&u), [6]);
        assert!(f.ended());
        assert_eq!(f.next_reload_ms(), None);
        // Loading it again (after a reconnect) hands out nothing twice.
        let u = f.on_playlist(9000, &pl);
        assert!(u.jobs.is_empty() && !u.changed);
    }

    #[test]
    fn hostile_target_durations_are_clamped() {
        let mut f = Follower::new(FollowerConfig::default());
        let mut pl = window(0, 3);
        pl.target_duration_ms = 0;
        f.on_playlist(0, &pl);
        assert_eq!(f.next_reload_ms(), Some(MIN_TARGET_MS));
        pl.target_duration_ms = 3_600_000;
        f.on_playlist(0, &pl);
        assert_eq!(f.next_reload_ms(), Some(MAX_TARGET_MS / 2));
    }

    proptest! {
        /// Whatever sequence of playlists arrives: between re-starts no segment is handed
        /// out twice and jobs come in increasing order, a miss or a re-start makes the
        /// next job a discontinuity, and reloads are never sooner than half a target.
        #[test]
        fn never_twice_always_in_order(
            steps in proptest::collection::vec((0u64..40, 0u64..12, any::<bool>(), any::<bool>()), 1..40)
        ) {
            let mut f = Follower::new(FollowerConfig::default());
            let mut last: Option<u64> = None;
            let mut now = 0;
            let mut first = 0u64;
            for (advance, len, disc, backwards) in steps {
                first = if backwards { advance } else { first + advance };
                let mut pl = window(first, len);
                if disc && len > 0 { pl.segments[0].discontinuity = true; }
                let u = f.on_playlist(now, &pl);
                if u.restarted {
                    // A new numbering: order is only meaningful from here on.
                    last = None;
                }
                for j in &u.jobs {
                    prop_assert!(last.is_none_or(|l| j.seq > l), "job {} after {:?}", j.seq, last);
                    last = Some(j.seq);
                }
                if u.missed > 0 || u.restarted {
                    prop_assert!(u.jobs.first().is_none_or(|j| j.discontinuity));
                }
                let next = f.next_reload_ms().unwrap();
                prop_assert!(next >= now + MIN_TARGET_MS / 2);
                now = next;
            }
        }
    }
}
