//! A bounded time series ([`Series`]): points `(t_s, value)` appended as a run goes, at
//! most a fixed number kept however long the run; past that, adjacent pairs merge (their
//! mean, or their max) and every later point stands for twice as many samples.

use serde::{Serialize, Serializer};

/// How two points merge when the series is decimated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reduce {
    /// The mean of the values (the time of the later point).
    Mean,
    /// The larger value (peaks survive decimation).
    Max,
}

/// A time series of at most `cap` points (see the module docs).
#[derive(Debug, Clone)]
pub struct Series {
    points: Vec<(f64, f64)>,
    cap: usize,
    /// Raw samples per kept point.
    stride: usize,
    /// The point being filled: (time of its last sample, sum or max, samples).
    acc: Option<(f64, f64, usize)>,
    reduce: Reduce,
}

impl Series {
    /// An empty series keeping at most `cap` points (at least 2, rounded up to even).
    pub(crate) fn new(cap: usize, reduce: Reduce) -> Series {
        let cap = cap.max(2).next_multiple_of(2);
        Series {
            points: Vec::new(),
            cap,
            stride: 1,
            acc: None,
            reduce,
        }
    }

    /// Appends the sample `value` at `t_s` (seconds, not decreasing).
    pub(crate) fn push(&mut self, t_s: f64, value: f64) {
        let (v, n) = match self.acc.take() {
            None => (value, 1),
            Some((_, v, n)) => match self.reduce {
                Reduce::Mean => (v + value, n + 1),
                Reduce::Max => (v.max(value), n + 1),
            },
        };
        if n < self.stride {
            self.acc = Some((t_s, v, n));
            return;
        }
        self.points.push((t_s, self.finish(v, n)));
        if self.points.len() >= self.cap {
            let reduce = self.reduce;
            self.points = self
                .points
                .chunks(2)
                .map(|p| match (reduce, p) {
                    (Reduce::Mean, [a, b]) => (b.0, (a.1 + b.1) / 2.0),
                    (Reduce::Max, [a, b]) => (b.0, a.1.max(b.1)),
                    (_, _) => p[p.len() - 1],
                })
                .collect();
            self.stride *= 2;
        }
    }

    fn finish(&self, v: f64, n: usize) -> f64 {
        match self.reduce {
            Reduce::Mean => v / n.max(1) as f64,
            Reduce::Max => v,
        }
    }

    /// The points, the one still being filled last (at most `cap`).
    pub fn points(&self) -> Vec<(f64, f64)> {
        let mut v = self.points.clone();
        if let Some((t, s, n)) = self.acc {
            v.push((t, self.finish(s, n)));
        }
        v
    }

    /// Raw samples per point now (1 until the series was first decimated).
    pub fn stride(&self) -> usize {
        self.stride
    }

    /// The value of the point covering time `t_s`: the first point at or after it (a
    /// point stands for the samples since the previous one), the last one past the end;
    /// `None` while empty.
    pub fn at(&self, t_s: f64) -> Option<f64> {
        let i = self.points.partition_point(|p| p.0 < t_s);
        match self.points.get(i) {
            Some(p) => Some(p.1),
            None => match self.acc {
                Some((_, s, n)) => Some(self.finish(s, n)),
                None => self.points.last().map(|p| p.1),
            },
        }
    }

    /// Points kept (the one being filled included).
    pub fn len(&self) -> usize {
        self.points.len() + usize::from(self.acc.is_some())
    }

    /// True before the first sample.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Serialize for Series {
    /// As `[[t_s, value], ...]`.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.points().serialize(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_series_are_kept_as_sampled() {
        let mut s = Series::new(8, Reduce::Mean);
        assert!(s.is_empty() && s.at(3.0).is_none());
        for t in 1..=5 {
            s.push(f64::from(t), f64::from(t * 10));
        }
        assert_eq!(s.len(), 5);
        assert_eq!(s.stride(), 1);
        assert_eq!(s.points()[4], (5.0, 50.0));
        // The point covering 2.5 s is the one at 3 s; past the end, the last.
        assert_eq!(s.at(2.5), Some(30.0));
        assert_eq!(s.at(0.0), Some(10.0));
        assert_eq!(s.at(99.0), Some(50.0));
    }

    #[test]
    fn decimation_keeps_the_series_bounded_and_its_shape() {
        let cap = 100;
        let mut mean = Series::new(cap, Reduce::Mean);
        let mut max = Series::new(cap, Reduce::Max);
        // A ramp with one spike, 10,000 samples: far more than the cap.
        for i in 0..10_000u32 {
            let v = if i == 5_000 { 1e6 } else { f64::from(i) };
            mean.push(f64::from(i), v);
            max.push(f64::from(i), v);
            assert!(mean.len() <= cap && max.len() <= cap, "bounded at {i}");
        }
        assert!(mean.len() >= cap / 4, "{} points", mean.len());
        assert!(mean.stride() >= 128);
        // The max series keeps the spike; the mean one spreads it.
        let peak = |s: &Series| s.points().iter().map(|p| p.1).fold(0.0, f64::max);
        assert_eq!(peak(&max), 1e6);
        assert!(peak(&mean) < 1e6);
        // Times still increase and cover the run.
        let p = mean.points();
        assert!(p.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(p[p.len() - 1].0, 9_999.0);
        // Means of a ramp stay on it (within a stride), away from the spike.
        let (t, v) = p[p.len() / 4];
        assert!((t - v).abs() <= mean.stride() as f64, "({t}, {v})");
    }
}
