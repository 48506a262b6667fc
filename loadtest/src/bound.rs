//! The Kumar–Liu–Ross fluid bound on server egress, integrated over a run in which
//! peers come and go.
//!
//! With n viewers of upload budgets u_i and stream rate r, a server must send at least
//! `max(r, n·r − Σu_i)` (Kumar, Liu, Ross, INFOCOM 2007). Over a run the audience
//! changes, so the bound is integrated piecewise: between two consecutive joins or
//! leaves, n and Σu are constant. With nobody present the server need send nothing (0,
//! not r).

/// One peer's stay: present from `joined_s` to `left_s` (`None`: until the end), with
/// `upload_kbps` of upload budget.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stay {
    /// Seconds since the start of the run when its join succeeded.
    pub joined_s: f64,
    /// Seconds since the start of the run when it left; `None` = still present.
    pub left_s: Option<f64>,
    /// Upload budget, kbit/s.
    pub upload_kbps: u32,
}

/// `∫ max(r, n(t)·r − Σu(t)) dt` over `[0, end_s]` in **bytes** (1 kbit = 1000 bits),
/// with `stream_kbps` = r. n(t) counts the stays covering t; the integrand is 0 where
/// n(t) = 0. Stays are clipped to the window.
pub fn fluid_bound_bytes(stream_kbps: u32, stays: &[Stay], end_s: f64) -> f64 {
    if end_s.is_nan() || end_s <= 0.0 {
        return 0.0;
    }
    // (time, Δn, Δu) events, clipped to the window.
    let mut events: Vec<(f64, i64, i64)> = Vec::with_capacity(stays.len() * 2);
    for s in stays {
        let from = s.joined_s.clamp(0.0, end_s);
        let to = s.left_s.unwrap_or(end_s).clamp(0.0, end_s);
        if to <= from {
            continue;
        }
        events.push((from, 1, i64::from(s.upload_kbps)));
        events.push((to, -1, -i64::from(s.upload_kbps)));
    }
    events.sort_by(|a, b| a.0.total_cmp(&b.0));
    let r = f64::from(stream_kbps);
    let (mut n, mut u) = (0i64, 0i64);
    let mut last = 0.0;
    let mut kbit = 0.0;
    for (t, dn, du) in events {
        kbit += rate_kbps(r, n, u) * (t - last);
        last = t;
        n += dn;
        u += du;
    }
    kbit += rate_kbps(r, n, u) * (end_s - last);
    kbit * 1000.0 / 8.0
}

/// The bound's rate with `n` peers offering `u` kbit/s in total.
fn rate_kbps(r: f64, n: i64, u: i64) -> f64 {
    if n <= 0 {
        0.0
    } else {
        r.max(n as f64 * r - u as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stay(joined_s: f64, left_s: Option<f64>, upload_kbps: u32) -> Stay {
        Stay {
            joined_s,
            left_s,
            upload_kbps,
        }
    }

    #[test]
    fn piecewise() {
        // r = 100 kbps. 0..10 s: nobody (0). 10..20: one peer with 0 upload (r = 100).
        // 20..30: three peers, uploads 0 + 50 + 100 → max(100, 300 − 150) = 150.
        // 30..40: peer 3 left → two peers 0 + 50 → max(100, 200 − 50) = 150.
        let stays = [
            stay(10.0, None, 0),
            stay(20.0, None, 50),
            stay(20.0, Some(30.0), 100),
        ];
        let kbit = 100.0 * 10.0 + 150.0 * 10.0 + 150.0 * 10.0;
        let b = fluid_bound_bytes(100, &stays, 40.0);
        assert!((b - kbit * 125.0).abs() < 1e-6, "{b}");
        // Rich peers: the bound never drops below r while someone is present.
        let rich = [stay(0.0, None, 1000), stay(0.0, None, 1000)];
        assert!((fluid_bound_bytes(100, &rich, 10.0) - 100.0 * 10.0 * 125.0).abs() < 1e-6);
        // Clipping to the window, and an empty window.
        assert_eq!(fluid_bound_bytes(100, &[stay(50.0, None, 0)], 40.0), 0.0);
        assert_eq!(fluid_bound_bytes(100, &stays, 0.0), 0.0);
    }
}
