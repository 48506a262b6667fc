//! Hole-punching constraints of the assigner: which peers are reachable only by
//! punching, and who may parent whom (see the module docs of [`crate::assign`]).

use std::time::Duration;

use super::{GridAssigner, SERVER, finish_moved, ms};
use crate::assign::{PeerId, Reassignment};

impl GridAssigner {
    /// Marks a peer as reachable only by hole punching (`true`) or directly. From now
    /// on it is chosen as a parent only for peers that [`crate::assign::PeerInfo::can_punch`]; when it
    /// becomes punch-only, its children that cannot punch are re-parented (returned, as
    /// [`GridAssigner::set_upload`] does). Unknown peers and unchanged flags are ignored.
    pub fn set_punch_only(
        &mut self,
        peer_id: PeerId,
        punch_only: bool,
        now: Duration,
    ) -> Vec<Reassignment> {
        let Some(&idx) = self.ids.get(&peer_id) else {
            return Vec::new();
        };
        if self.peer(idx).punch_only == punch_only {
            return Vec::new();
        }
        if punch_only {
            self.punch_only_peers += 1;
        } else {
            self.punch_only_peers -= 1;
        }
        self.peer_mut(idx).punch_only = punch_only;
        let now_ms = ms(now);
        let mut moved = Vec::new();
        if punch_only {
            let orphans: Vec<(u32, u16)> = self
                .peer(idx)
                .children
                .iter()
                .copied()
                .filter(|&(c, _)| !self.punch_compatible(idx, c) || !self.punch_compatible(c, idx))
                .collect();
            for (c, cs) in orphans {
                self.detach(c, cs);
                let target = self.pick_parent(c, cs, &[peer_id], now_ms);
                self.attach(c, cs, target);
                moved.push(self.reassignment(c, cs));
            }
        }
        self.release_booster(now_ms, &mut moved);
        finish_moved(moved, None)
    }

    /// Whether a peer is reachable only by hole punching; `None` for an unknown peer.
    pub fn is_punch_only(&self, peer_id: PeerId) -> Option<bool> {
        self.ids.get(&peer_id).map(|&idx| self.peer(idx).punch_only)
    }

    /// Whether `link` (a peer index or [`SERVER`]) may parent `child` as far as hole
    /// punching goes ([`GridAssigner::punch_compatible`]).
    pub(super) fn may_parent(&self, link: u32, child: u32) -> bool {
        link == SERVER || self.punch_compatible(link, child)
    }

    /// A punch-only `parent` only parents peers that can punch; and two punch-only
    /// peers are never each other's parents (in any substreams): a punched link joins
    /// the two listeners' ports, and only one TCP connection can join them.
    pub(super) fn punch_compatible(&self, parent: u32, child: u32) -> bool {
        let (p, c) = (self.peer(parent), self.peer(child));
        if !p.punch_only {
            return true;
        }
        c.can_punch && !(c.punch_only && c.children.iter().any(|&(x, _)| x == parent))
    }
}
