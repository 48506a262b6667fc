//! Tests of the simulator and of the grid's policies run on it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod scenarios;
mod scheduler_unit;
mod swarm;

use std::time::Duration;

use super::*;
use crate::Parent;
use crate::peer::PeerId;

pub(super) fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

/// Every listed peer played every chunk from its first one on, skipping none.
pub(super) fn assert_continuity(sim: &Sim, ids: &[PeerId], min_played: u64) {
    for &id in ids {
        let st = sim.stats(id).unwrap();
        assert_eq!(
            st.skipped,
            0,
            "peer {id} skipped chunks: {st:?}, re-searches {:?}",
            sim.researches(id)
        );
        assert!(st.played >= min_played, "peer {id} played too few: {st:?}");
    }
}
