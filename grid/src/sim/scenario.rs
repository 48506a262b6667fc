//! Scenario builders over a [`Sim`]: a flash crowd of joins, steady churn, upload
//! profiles. They only schedule joins and leaves; drawing from the simulation's seeded
//! RNG keeps them deterministic.

use std::time::Duration;

use crate::peer::PeerId;

use super::rng::us;
use super::{PeerSpec, Sim};

/// Upload budgets as multiples of the stream rate, dealt to joining viewers in turn
/// (the load test's `--upload-profile`, e.g. `0,0.8,1.6,0.8`: on average 0.8·r).
#[derive(Debug, Clone, PartialEq)]
pub struct UploadProfile {
    /// Budgets as multiples of the stream rate, dealt in turn.
    pub multiples: Vec<f64>,
    /// Each viewer's physical uplink as a multiple of its budget (≥ 1).
    pub uplink_factor: f64,
}

impl UploadProfile {
    /// Budgets `multiples` × r on uplinks `uplink_factor` times the budget.
    pub fn new(multiples: &[f64], uplink_factor: f64) -> UploadProfile {
        UploadProfile {
            multiples: multiples.to_vec(),
            uplink_factor,
        }
    }

    /// The `i`-th viewer's peer spec for a stream of `stream_kbps` (address prefixes
    /// spread over 16 networks).
    pub fn spec(&self, i: u64, stream_kbps: u32) -> PeerSpec {
        let m = if self.multiples.is_empty() {
            1.0
        } else {
            self.multiples[(i % self.multiples.len() as u64) as usize]
        };
        let kbps = (m.max(0.0) * f64::from(stream_kbps)).round() as u32;
        PeerSpec {
            addr_prefix: (i % 16) as u32,
            uplink_kbps: ((f64::from(kbps) * self.uplink_factor).round() as u32)
                .max(super::MIN_UPLINK_KBPS),
            ..PeerSpec::with_upload(kbps)
        }
    }
}

impl Sim {
    /// `n` viewers join at random times in `[start, start + window)` (uniform), their
    /// budgets dealt from `profile`. Returns their ids.
    pub fn flash_crowd(
        &mut self,
        n: u64,
        start: Duration,
        window: Duration,
        profile: &UploadProfile,
    ) -> Vec<PeerId> {
        let mut times: Vec<u64> = (0..n)
            .map(|_| us(start) + self.rng.below(us(window).max(1)))
            .collect();
        times.sort_unstable();
        let r = self.cfg.stream_kbps;
        let first = self.nodes.len() as u64;
        times
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                let spec = profile.spec(first + i as u64, r);
                self.join_at(Duration::from_micros(t), spec)
            })
            .collect()
    }

    /// Steady churn from `from` to `until`: every `every`, one random viewer of `pool`
    /// still in it leaves (cleanly, or crashes with probability `crash`), and a new one
    /// joins with the next budget of `profile`. The newcomers join the pool. Returns
    /// the ids that left.
    #[allow(clippy::too_many_arguments)]
    pub fn churn(
        &mut self,
        pool: &mut Vec<PeerId>,
        from: Duration,
        until: Duration,
        every: Duration,
        crash: f64,
        profile: &UploadProfile,
    ) -> Vec<PeerId> {
        let mut left = Vec::new();
        let step = us(every).max(1);
        let mut t = us(from);
        let r = self.cfg.stream_kbps;
        while t < us(until) && !pool.is_empty() {
            let victim = pool.swap_remove(self.rng.below(pool.len() as u64) as usize);
            if self.rng.unit() < crash {
                self.crash_at(Duration::from_micros(t), victim);
            } else {
                self.leave_at(Duration::from_micros(t), victim);
            }
            left.push(victim);
            let spec = profile.spec(self.nodes.len() as u64, r);
            pool.push(self.join_at(Duration::from_micros(t), spec));
            t += step;
        }
        left
    }
}
