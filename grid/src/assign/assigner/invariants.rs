//! Test-only: every structural invariant of the assigner, checked by brute force.

use super::*;

impl GridAssigner {
    /// Test-only: every structural invariant, checked by brute force.
    pub(crate) fn check_invariants(&self) -> Result<(), String> {
        let k = self.k;
        let mut server = 0u64;
        let mut used = 0u64;
        let mut supply = 0u64;
        let mut free = 0u64;
        let mut upload = 0u64;
        let mut hist = vec![0u64; self.depth_hist.len()];
        let mut free_idx = vec![BTreeSet::new(); usize::from(k)];
        let mut leaf_idx = vec![BTreeSet::new(); usize::from(k)];
        let mut server_fed = vec![BTreeSet::new(); usize::from(k)];
        if self.live.len() != self.ids.len() {
            return Err("live/ids length mismatch".into());
        }
        for (pos, &idx) in self.live.iter().enumerate() {
            let p = self.peer(idx);
            if p.live_pos as usize != pos || self.ids.get(&p.id) != Some(&idx) {
                return Err(format!("peer {} position/id map broken", p.id));
            }
            if !p.indexed {
                return Err(format!("peer {} not indexed", p.id));
            }
            upload += u64::from(p.upload_kbps);
            if !p.bad {
                supply += u64::from(p.cap);
                free += u64::from(p.cap - p.used);
            } else if !p.children.is_empty() {
                return Err(format!("bad peer {} has children", p.id));
            }
            if p.used as usize != p.children.len() || p.used > p.cap {
                return Err(format!(
                    "peer {} used {} children {}",
                    p.id,
                    p.used,
                    p.children.len()
                ));
            }
            used += u64::from(p.used);
            for &(c, s) in &p.children {
                if self.peer(c).parents[usize::from(s)] != idx {
                    return Err(format!("child link of {} in {s} not mirrored", p.id));
                }
                if p.punch_only && !self.peer(c).can_punch {
                    return Err(format!(
                        "punch-only {} parents {} that cannot punch",
                        p.id,
                        self.peer(c).id
                    ));
                }
                if p.punch_only
                    && self.peer(c).punch_only
                    && self.peer(c).children.iter().any(|&(x, _)| x == idx)
                {
                    return Err(format!(
                        "punch-only {} and {} parent each other",
                        p.id,
                        self.peer(c).id
                    ));
                }
            }
            for s in 0..k {
                let su = usize::from(s);
                let link = p.parents[su];
                hist[usize::from(p.depth[su])] += 1;
                if link == NONE {
                    return Err(format!("peer {} has no parent in {s}", p.id));
                } else if link == SERVER {
                    server += 1;
                    server_fed[su].insert(self.sf_key(idx, s));
                    if p.depth[su] != 1 {
                        return Err(format!("server-fed {} at depth {}", p.id, p.depth[su]));
                    }
                } else {
                    let q = self.peer(link);
                    if !q.children.contains(&(idx, s)) {
                        return Err(format!("parent of {} in {s} lacks the child", p.id));
                    }
                    if p.depth[su] != q.depth[su] + 1 {
                        return Err(format!("depth of {} in {s} inconsistent", p.id));
                    }
                }
                // Acyclic: the chain reaches the server within n steps.
                let mut x = idx;
                let mut steps = 0;
                while x != SERVER {
                    x = self.peer(x).parents[su];
                    steps += 1;
                    if steps > self.live.len() {
                        return Err(format!("cycle through {} in {s}", p.id));
                    }
                }
                if p.free_eligible() {
                    free_idx[su].insert(self.free_key(idx, s));
                }
                if p.leaf_eligible(s) {
                    leaf_idx[su].insert((p.depth[su], idx));
                }
            }
        }
        if server != self.server_used
            || used != self.used
            || supply != self.supply
            || free != self.free_slots
            || upload != self.upload_total
        {
            return Err(format!(
                "counters: server {server}/{} used {used}/{} supply {supply}/{} free {free}/{} upload {upload}/{}",
                self.server_used, self.used, self.supply, self.free_slots, self.upload_total
            ));
        }
        if hist != self.depth_hist {
            return Err("depth histogram mismatch".into());
        }
        if free_idx != self.free_idx {
            return Err("free index mismatch".into());
        }
        if leaf_idx != self.leaf_idx {
            return Err("leaf index mismatch".into());
        }
        if server_fed != self.server_fed {
            return Err("server-fed index mismatch".into());
        }
        Ok(())
    }
}
