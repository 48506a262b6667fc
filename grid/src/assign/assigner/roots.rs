//! Roots and the booster: how many server-fed peers a substream may have, the parent a
//! peer takes (a free root, else a peer slot, else the server), and moving server-fed
//! peers beyond the roots onto free peer slots.

use super::{GridAssigner, PeerId, RELEASE_TRIES, Reassignment, SERVER};

impl GridAssigner {
    /// Server-fed peers each substream may have beyond the booster
    /// ([`GridConfig::peers_per_root`]): one per that many peers, at least one, at most
    /// [`GridConfig::max_roots`].
    pub(super) fn roots(&self) -> usize {
        let per = self.cfg.peers_per_root as usize;
        let n = self.live.len();
        if per == 0 {
            return 1;
        }
        (n / per).clamp(1, usize::from(self.cfg.max_roots.max(1)))
    }

    /// Substream `s` has a root slot free beyond its first (and the data plane's slot
    /// limit room for it). The first root is whoever the server ends up feeding: a
    /// substream without one takes the server when no peer slot can be used.
    pub(super) fn root_free(&self, s: u16) -> bool {
        let roots = self.roots();
        roots > 1
            && self.server_fed[usize::from(s)].len() < roots
            && self.server_used.saturating_add(u64::from(self.k)) < self.cfg.server_slots
    }

    /// The parent for `child` in substream `s`: a free root slot, else the best peer
    /// slot ([`GridAssigner::best_parent`], cycles checked), else the server (booster).
    pub(super) fn pick_parent(&self, child: u32, s: u16, exclude: &[PeerId], now_ms: u64) -> u32 {
        if self.root_free(s) {
            return SERVER;
        }
        self.best_parent(child, s, exclude, now_ms, true)
            .unwrap_or(SERVER)
    }

    /// While peer slots are free, moves server-fed peers beyond the roots of a substream
    /// under peers with free slots (lowest capacity first).
    pub(super) fn release_booster(&mut self, now_ms: u64, moved: &mut Vec<Reassignment>) {
        // Pass 0 only uses parents homed in the substream (their slots build that tree's
        // interior, SplitStream-style); pass 1 any free slot.
        for home_only in [true, false] {
            loop {
                let mut progressed = false;
                for s in 0..self.k {
                    if self.free_slots == 0 {
                        return;
                    }
                    let su = usize::from(s);
                    if self.server_fed[su].len() <= self.roots() {
                        continue;
                    }
                    if home_only && self.free_idx[su].first().is_none_or(|key| key.0) {
                        continue;
                    }
                    // Leaves first (moving them deepens nothing else), lowest capacity first.
                    // With punch-only parents about, peers that cannot punch may find
                    // no usable slot: look further so that they do not hide the others.
                    let tries_max = if self.punch_only_peers > 0 {
                        RELEASE_TRIES * 4
                    } else {
                        RELEASE_TRIES
                    };
                    let tries: Vec<u32> = self.server_fed[su]
                        .iter()
                        .take(tries_max)
                        .map(|&(_, _, q)| q)
                        .collect();
                    for q in tries {
                        if let Some(x) = self.best_parent(q, s, &[], now_ms, true) {
                            if home_only && self.peer(x).home != s {
                                continue;
                            }
                            self.detach(q, s);
                            self.attach(q, s, x);
                            moved.push(self.reassignment(q, s));
                            progressed = true;
                            break;
                        }
                    }
                }
                if !progressed {
                    break;
                }
            }
        }
    }
}
