//! Read-only views of a running [`Sim`]: who is alive, a viewer's scheduler figures,
//! re-searches, children and parents, the assigner, the data plane's counters.

use std::time::Duration;

use crate::Parent;
use crate::assign::GridAssigner;
use crate::peer::{PeerId, SchedulerStats};

use super::Sim;

impl Sim {
    /// Virtual time now.
    pub fn now(&self) -> Duration {
        Duration::from_micros(self.now)
    }

    /// Viewers assigned and not gone (silent ones included).
    pub fn alive(&self) -> Vec<PeerId> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.receives())
            .map(|(&id, _)| id)
            .collect()
    }

    /// A viewer's scheduler figures.
    pub fn stats(&self, id: PeerId) -> Option<SchedulerStats> {
        self.nodes.get(&id).map(|n| n.peer.stats())
    }

    /// A viewer's re-searches sent: (when, substream, excluded parents).
    pub fn researches(&self, id: PeerId) -> &[(Duration, u16, Vec<PeerId>)] {
        self.nodes.get(&id).map_or(&[], |n| &n.research_log)
    }

    /// The children `id` pushes `substream` to (its own view).
    pub fn children(&self, id: PeerId, substream: u16) -> Vec<PeerId> {
        self.nodes
            .get(&id)
            .map_or_else(Vec::new, |n| n.children_in(substream))
    }

    /// A viewer's parents as it knows them, by substream.
    pub fn parents(&self, id: PeerId) -> Vec<Option<Parent>> {
        self.nodes
            .get(&id)
            .map_or_else(Vec::new, |n| n.parents.clone())
    }

    /// The control plane's assigner.
    pub fn assigner(&self) -> &GridAssigner {
        self.control.assigner()
    }

    /// Chunk pushes the data plane sent.
    pub fn server_pushes(&self) -> u64 {
        self.counters.server_pushes
    }

    /// Repairs the data plane served.
    pub fn server_pulls(&self) -> u64 {
        self.counters.server_pulls
    }

    /// Scheduler ticks run, all peers.
    pub fn ticks(&self) -> u64 {
        self.counters.ticks
    }

    /// Early ticks checked (tests with [`super::Drive::Deadlines`]).
    pub fn early_checks(&self) -> u64 {
        self.counters.early_checks
    }

    /// A [`super::SimReport`] of the run so far.
    pub fn report(&self) -> super::SimReport {
        super::SimReport::collect(self)
    }

    /// Messages between the peers and the control plane not yet delivered (0: every
    /// peer knows the parents the assigner gave it).
    pub fn control_messages_in_flight(&self) -> u64 {
        self.counters.control_in_flight
    }

    /// Ticks refused because a peer's `next_timeout` stayed at the same instant 50
    /// times (a scheduler that would spin; 0 in a sound run).
    pub fn spins(&self) -> u64 {
        self.counters.spins
    }
}
