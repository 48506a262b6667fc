//! The simulated control plane: the real [`GridAssigner`] behind a message interface.
//! Peers' joins, leaves, re-searches and reports reach it after the control-plane
//! latency; its answers (a join's plan, a re-search's new parent, and every `moved`
//! reassignment it makes as a side effect) are delivered back to the peers concerned
//! after the same latency. Its processing time is not modelled (zero).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::Parent;
use crate::assign::{GridAssigner, GridError, GridStats, PeerInfo, Reassignment};
use crate::peer::PeerId;

/// A message from a peer to the control plane.
#[derive(Debug, Clone, PartialEq)]
pub enum ToControl {
    Join {
        id: PeerId,
        info: PeerInfo,
    },
    /// A clean leave, or missed heartbeats after a crash.
    Leave(PeerId),
    ReSearch {
        child: PeerId,
        substream: u16,
        exclude: Vec<PeerId>,
    },
    Report {
        reporter: PeerId,
        parent: PeerId,
    },
}

/// A message from the control plane to one peer.
#[derive(Debug, Clone, PartialEq)]
pub enum ToPeer {
    /// The join's answer.
    Joined {
        parents: Vec<Parent>,
        neighbours: Vec<PeerId>,
    },
    /// The join was refused (no capacity).
    Refused,
    /// A new parent for one substream (a side effect of someone else's operation).
    Assign { substream: u16, parent: Parent },
    /// The answer to this peer's re-search of `substream`.
    ReSearched { substream: u16, parent: Parent },
}

/// The real assigner plus the report counting the control plane does before demoting a
/// peer.
#[derive(Debug)]
pub struct ControlPlane {
    assigner: GridAssigner,
    /// Distinct reporters per reported peer.
    reports: BTreeMap<PeerId, BTreeSet<PeerId>>,
    /// Distinct reporters that demote a peer ([`GridAssigner::report_bad_peer`]).
    reporters_to_demote: usize,
    pub researches: u64,
    pub demoted: u64,
    pub refused: u64,
}

impl ControlPlane {
    pub fn new(assigner: GridAssigner, reporters_to_demote: usize) -> ControlPlane {
        ControlPlane {
            assigner,
            reports: BTreeMap::new(),
            reporters_to_demote: reporters_to_demote.max(1),
            researches: 0,
            demoted: 0,
            refused: 0,
        }
    }

    pub fn assigner(&self) -> &GridAssigner {
        &self.assigner
    }

    pub fn stats(&self) -> GridStats {
        self.assigner.stats()
    }

    /// Handles one message at `now`; returns what to deliver to whom.
    pub fn handle(&mut self, msg: ToControl, now: Duration) -> Vec<(PeerId, ToPeer)> {
        let mut out = Vec::new();
        match msg {
            ToControl::Join { id, info } => {
                match self.assigner.join(id, PeerInfo { now, ..info }) {
                    Ok(plan) => {
                        out.push((
                            id,
                            ToPeer::Joined {
                                parents: plan.parents,
                                neighbours: plan.neighbours,
                            },
                        ));
                        moved(&mut out, plan.moved);
                    }
                    Err(GridError::NoCapacity | GridError::TooManyPeers) => {
                        self.refused += 1;
                        out.push((id, ToPeer::Refused));
                    }
                    // A duplicate join or an invalid configuration: ignored.
                    Err(_) => {}
                }
            }
            ToControl::Leave(id) => {
                self.reports.remove(&id);
                moved(&mut out, self.assigner.leave(id, now));
            }
            ToControl::ReSearch {
                child,
                substream,
                exclude,
            } => {
                self.researches += 1;
                // An unknown child (it left meanwhile) is ignored.
                if let Ok(o) = self.assigner.reparent(child, substream, &exclude, now) {
                    out.push((
                        child,
                        ToPeer::ReSearched {
                            substream,
                            parent: o.parent,
                        },
                    ));
                    moved(&mut out, o.moved);
                }
            }
            ToControl::Report { reporter, parent } => {
                let r = self.reports.entry(parent).or_default();
                r.insert(reporter);
                if r.len() >= self.reporters_to_demote
                    && self.assigner.is_bad(parent) == Some(false)
                {
                    self.demoted += 1;
                    moved(&mut out, self.assigner.report_bad_peer(parent, now));
                }
            }
        }
        out
    }
}

fn moved(out: &mut Vec<(PeerId, ToPeer)>, moved: Vec<Reassignment>) {
    out.extend(moved.into_iter().map(|r| {
        (
            r.child,
            ToPeer::Assign {
                substream: r.substream,
                parent: r.parent,
            },
        )
    }));
}
