//! The simulator's one source of randomness: a seeded SplitMix64 generator, and the
//! link-latency distributions drawn from it. Same seed, same draws.

use std::time::Duration;

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast, and good enough for drawing
/// latencies, loss and join times; not for anything secret.
#[derive(Debug, Clone)]
pub struct SimRng(u64);

impl SimRng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> SimRng {
        SimRng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[0, n)` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        self.next_u64() % n
    }
}

/// The SplitMix64 finalizer: a stateless hash of one word.
pub(crate) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One-way latency of a link between two endpoints. Each link draws its latency once
/// (a hash of the seed and the two endpoints), so a link delivers in order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Latency {
    /// Every link alike.
    Fixed(Duration),
    /// Uniform in `[min, max]`, per link.
    Uniform {
        /// Shortest link.
        min: Duration,
        /// Longest link.
        max: Duration,
    },
}

impl Latency {
    /// The latency of the link `{a, b}` (symmetric) in microseconds.
    pub fn link_us(&self, seed: u64, a: u64, b: u64) -> u64 {
        match *self {
            Latency::Fixed(d) => us(d),
            Latency::Uniform { min, max } => {
                let (lo, hi) = (us(min), us(max).max(us(min)));
                let (x, y) = (a.min(b), a.max(b));
                let h = mix(seed ^ mix(x.wrapping_mul(0x1_0000_0001) ^ mix(y)));
                lo + h % (hi - lo + 1)
            }
        }
    }
}

/// A duration in whole microseconds (saturating).
pub(crate) fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}
