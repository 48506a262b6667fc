//! The in-memory state behind the live grids: one broadcast's assigner and peer table
//! ([`BroadcastGrid`]), one session's entry (counters, credential, reportable peers), peer
//! ids and per-broadcast seeds.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use parking_lot::Mutex;

use starling_proto::v1::{PeerRef, SubstreamParent};

use super::{MAX_REPORTABLE, REPORTABLE_FOR, StreamWake, TokenState};
use crate::reports::clamp::Credits;
use crate::trust::{ReportLedger, UploadTrust};
use starling_grid::assign::{GridAssigner, Parent, PeerId, Reassignment};

/// A peer id: random in `1..=i64::MAX` (never 0, the proto's "absent"; fits a signed
/// 64-bit column), so ids cannot be guessed from one's own and a restarted control
/// plane does not hand out ids that revocation lists of the previous run still name.
pub(super) fn random_peer_id() -> PeerId {
    loop {
        let b = uuid::Uuid::new_v4().into_bytes();
        let mut v = [0u8; 8];
        // Bytes 6 and 8 carry the UUID version and variant: skip them.
        v[..6].copy_from_slice(&b[..6]);
        v[6..].copy_from_slice(&b[9..11]);
        let id = u64::from_le_bytes(v) & (i64::MAX as u64);
        if id != 0 {
            return id;
        }
    }
}

#[derive(Debug)]
pub(super) struct PeerSlot {
    /// The session's id (the same allocation as its key in the session map).
    pub(super) session_id: Arc<str>,
    pub(super) addr: Box<str>,
    /// `addr` is the peer's server-reflexive address, reachable only by hole punching
    /// (its children dial it while it dials them: `PeerRef.punch`).
    pub(super) punch: bool,
    /// A child could not punch through to it: it relays to nobody until it joins again.
    pub(super) punch_failed: bool,
    /// The peer's server-reflexive address when its NAT keeps ports (it can punch):
    /// what a punch-only parent dials to let it in. Empty otherwise.
    pub(super) reflexive: Box<str>,
    pub(super) neighbours: Box<[PeerId]>,
    /// The session stream attached to this peer, woken (under the grid lock) when the
    /// grid moves the peer or removes it ([`super::StreamWake`]).
    pub(super) wake: Option<Arc<StreamWake>>,
}

#[derive(Debug)]
pub(super) struct GridState {
    pub(super) assigner: GridAssigner,
    pub(super) peers: HashMap<PeerId, PeerSlot>,
    /// Set when the broadcast's grid is dropped; late joins are refused.
    pub(super) closed: bool,
    /// BAD_CHUNK reports by distinct reporter address.
    pub(super) bad_chunk: ReportLedger,
    /// NON_DELIVERY reports by distinct child address.
    pub(super) non_delivery: ReportLedger,
}

impl GridState {
    pub(super) fn parent_ref(&self, s: usize, p: Parent) -> SubstreamParent {
        SubstreamParent {
            substream: u32::try_from(s).unwrap_or(u32::MAX),
            peer: match p {
                Parent::Server => None,
                Parent::Peer(id) => Some(self.peer_ref(id)),
            },
            // Signed by the service when it hands the assignment out.
            ticket: Vec::new(),
        }
    }

    pub(super) fn peer_ref(&self, id: PeerId) -> PeerRef {
        let slot = self.peers.get(&id);
        PeerRef {
            peer_id: id,
            addr: slot.map(|p| String::from(&*p.addr)).unwrap_or_default(),
            punch: slot.is_some_and(|p| p.punch),
        }
    }

    /// True when others can open a connection to `id` on their own (a mesh neighbour
    /// must be: only parents and children are coordinated for hole punching).
    pub(super) fn dialable(&self, id: PeerId) -> bool {
        self.peers
            .get(&id)
            .is_some_and(|p| !p.addr.is_empty() && !p.punch)
    }

    /// The children a punch-only peer must punch towards: each with its reflexive
    /// address. Empty for any other peer.
    pub(super) fn punch_children(&self, id: PeerId) -> Vec<PeerRef> {
        if !self.peers.get(&id).is_some_and(|p| p.punch) {
            return Vec::new();
        }
        let mut kids: Vec<PeerId> = self
            .assigner
            .children(id)
            .unwrap_or_default()
            .into_iter()
            .map(|(c, _)| c)
            .collect();
        kids.sort_unstable();
        kids.dedup();
        kids.into_iter()
            .filter_map(|c| {
                let slot = self.peers.get(&c)?;
                (!slot.reflexive.is_empty()).then(|| PeerRef {
                    peer_id: c,
                    addr: String::from(&*slot.reflexive),
                    punch: true,
                })
            })
            .collect()
    }

    /// Wakes the session stream of `parent` when it is reachable only by punching: a
    /// new child needs it to punch ([`GridState::punch_children`]).
    pub(super) fn wake_punch_parent(&self, parent: Parent) {
        if let Parent::Peer(p) = parent
            && let Some(slot) = self.peers.get(&p)
            && slot.punch
            && let Some(w) = &slot.wake
        {
            w.wake();
        }
    }

    pub(super) fn parents_of(&self, id: PeerId) -> Vec<SubstreamParent> {
        self.assigner
            .parents(id)
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(|(s, p)| self.parent_ref(s, p))
            .collect()
    }

    /// Tops `current` up to the configured neighbour count with random peers that accept
    /// connections (a peer without an address cannot be dialled).
    pub(super) fn top_up_neighbours(&mut self, id: PeerId, current: &mut Vec<PeerId>) {
        let want = usize::from(self.assigner.config().neighbours);
        if current.len() >= want {
            return;
        }
        let sample = self.assigner.sample_neighbours(id, want * 2);
        for n in sample {
            if current.len() >= want {
                break;
            }
            if self.dialable(n) && !current.contains(&n) {
                current.push(n);
            }
        }
    }

    /// Removes a peer (its own stream, if any, is woken to learn the session is over)
    /// and re-parents its children (their streams are woken). Returns the peers moved.
    pub(super) fn remove_peer(&mut self, id: PeerId, now: Duration) -> usize {
        if let Some(w) = self.peers.remove(&id).and_then(|p| p.wake) {
            w.wake();
        }
        self.bad_chunk.forget(id);
        self.non_delivery.forget(id);
        let moved = self.assigner.leave(id, now);
        self.wake_moved(&moved)
    }

    /// Wakes the session stream of every peer in `moved` (each once is enough: a woken
    /// stream computes its whole view). Returns `moved.len()`.
    pub(super) fn wake_moved(&self, moved: &[Reassignment]) -> usize {
        for r in moved {
            if let Some(w) = self.peers.get(&r.child).and_then(|p| p.wake.as_ref()) {
                w.wake();
            }
            self.wake_punch_parent(r.parent);
        }
        moved.len()
    }

    /// Slots in use by `id` × the substream rate: what its children can take, kbit/s.
    pub(super) fn carried_kbps(&self, id: PeerId) -> u64 {
        let used = self.assigner.children(id).map_or(0, |c| c.len());
        (used as u64).saturating_mul(u64::from(self.assigner.stats().substream_kbps))
    }
}

/// One broadcast's grid plus its delivered-byte totals.
#[derive(Debug)]
pub struct BroadcastGrid {
    /// The broadcast's id (shared by its sessions and their streams).
    pub(super) id: Arc<str>,
    pub(super) state: Mutex<GridState>,
    pub(super) from_server: AtomicU64,
    pub(super) from_peers: AtomicU64,
    pub(super) uploaded: AtomicU64,
}

#[derive(Debug, Clone)]
pub(super) struct SessionEntry {
    /// Its broadcast's grid (which names the broadcast).
    pub(super) grid: Arc<BroadcastGrid>,
    pub(super) peer_id: PeerId,
    pub(super) last_seen: Duration,
    /// Last cumulative counters reported: from server, from peers, uploaded.
    pub(super) counters: [u64; 3],
    /// Unused counter allowance (`None`: the start-up burst, not spent yet).
    pub(super) credits: Option<Credits>,
    /// The credential's subject.
    pub(super) subject: Option<String>,
    /// The credential's expiry, unix seconds.
    pub(super) credential_expires_at: Option<u64>,
    /// The chunk token last issued.
    pub(super) token: Option<TokenState>,
    /// Peers this session reported.
    pub(super) reported: Vec<PeerId>,
    /// The caller's IP at join.
    pub(super) addr: Option<IpAddr>,
    /// Claimed and granted upload budget.
    pub(super) upload: UploadTrust,
    /// Peers handed to this session recently.
    pub(super) reportable: Vec<Reportable>,
    /// Generation of the session stream attached now (0 = none): a session with a
    /// stream never expires by silence ([`LiveGrids::expire`](super::LiveGrids::expire)).
    pub(super) stream: u64,
    /// When a child's complaint last had this session's address probed again.
    pub(super) last_reprobe: Option<Duration>,
}

/// A peer handed to a session recently: when last as a parent and when last as a parent
/// or neighbour, in [`tick`]s (0 = never).
#[derive(Debug, Clone, Copy)]
pub(super) struct Reportable {
    peer: PeerId,
    parent_at: u32,
    seen_at: u32,
}

/// Tenths of a second since the grids' epoch, plus one (0 is "never"): 13 years fit.
fn tick(now: Duration) -> u32 {
    u32::try_from(now.as_millis() / 100)
        .unwrap_or(u32::MAX)
        .saturating_add(1)
}

impl SessionEntry {
    /// Its broadcast's id.
    pub(super) fn broadcast_id(&self) -> &Arc<str> {
        &self.grid.id
    }

    pub(super) fn remember(
        &mut self,
        peers: impl IntoIterator<Item = (PeerId, bool)>,
        now: Duration,
    ) {
        let t = tick(now);
        let window = tick(REPORTABLE_FOR) - 1;
        let peers = peers.into_iter();
        if self.reportable.is_empty() {
            // What a join hands out, without growth slack.
            self.reportable
                .reserve_exact(peers.size_hint().0.min(MAX_REPORTABLE));
        }
        let mut added = false;
        for (id, parent) in peers {
            let parent_at = if parent { t } else { 0 };
            match self.reportable.iter_mut().find(|r| r.peer == id) {
                Some(e) => {
                    e.parent_at = e.parent_at.max(parent_at);
                    e.seen_at = t;
                }
                None => {
                    added = true;
                    self.reportable.push(Reportable {
                        peer: id,
                        parent_at,
                        seen_at: t,
                    });
                }
            }
        }
        self.reportable
            .retain(|r| t.saturating_sub(r.seen_at) <= window);
        if self.reportable.len() > MAX_REPORTABLE {
            self.reportable
                .sort_by_key(|r| std::cmp::Reverse(r.seen_at));
            self.reportable.truncate(MAX_REPORTABLE);
        }
        if added && self.reportable.capacity() > self.reportable.len() + 4 {
            self.reportable.shrink_to_fit();
        }
    }

    pub(super) fn may_report(&self, id: PeerId, as_parent: bool, now: Duration) -> bool {
        let t = tick(now);
        let window = tick(REPORTABLE_FOR) - 1;
        let recent = |at: u32| at != 0 && t.saturating_sub(at) <= window;
        self.reportable.iter().any(|r| {
            r.peer == id
                && if as_parent {
                    recent(r.parent_at)
                } else {
                    recent(r.seen_at)
                }
        })
    }
}

pub(super) fn assigned(parents: &[SubstreamParent], neighbours: &[PeerRef]) -> Vec<(PeerId, bool)> {
    parents
        .iter()
        .filter_map(|p| p.peer.as_ref().map(|r| (r.peer_id, true)))
        .chain(neighbours.iter().map(|n| (n.peer_id, false)))
        .collect()
}

/// A per-broadcast RNG seed (FNV-1a of the id), so neighbour sampling differs between
/// broadcasts but is reproducible.
pub(super) fn seed_of(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
