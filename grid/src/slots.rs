//! Slot arithmetic shared by the assigner and a relaying peer: what one child slot
//! carries and how many slots an upload budget buys.

/// The rate of one child slot in the peer grid: one substream of a `stream_kbps`
/// stream split `k` ways, rounded up (`k == 0` is treated as 1; never 0): the grid's
/// figures (booster kbit/s). How many slots a budget buys is [`slots_for`].
pub fn slot_kbps(stream_kbps: u32, k: u16) -> u32 {
    stream_kbps.div_ceil(u32::from(k.clamp(1, 64))).max(1)
}

/// Child slots an upload budget of `upload_kbps` buys in a `stream_kbps` stream split
/// `k` ways: `U·K / r` whole slots, plus one more for the fraction left over when it
/// is at least an eighth of a slot and the parent would lose at most a fifth of its
/// pushes to each child (`(1 − frac) ≤ (whole + 1) / 5`, the skips spread over its
/// children). Below an eighth, the extra slot would only add repairs (and a measured
/// stream rate that wobbles by 1 kbit/s would add it to budgets of exactly N slots). A relay carries such a partly covered slot as far as its budget goes and
/// sends `NOT_FOUND` for the pushes it skips, which its children then repair; without
/// it, a budget of 3.2 slots would leave 0.2 of a slot unused (with many peers of
/// scarce upload, that fraction is most of the gap to the fluid bound). 0 when
/// `stream_kbps` is 0. The control plane's assigner and a relaying SDK count alike.
pub fn slots_for(upload_kbps: u32, stream_kbps: u32, k: u16) -> u32 {
    if stream_kbps == 0 {
        return 0;
    }
    let r = u64::from(stream_kbps);
    let units = u64::from(upload_kbps) * u64::from(k.clamp(1, 64));
    let whole = units / r;
    let short = r - units % r; // r·(1 − frac) of the next slot
    let extra = u64::from(units % r * 8 >= r && short * 5 <= r * (whole + 1));
    u32::try_from(whole + extra).unwrap_or(u32::MAX)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_slot_is_added_for_a_fraction_that_loses_at_most_a_fifth_of_each_push() {
        // 70 kbit/s in 4 substreams: a slot is 17.5 kbit/s.
        assert_eq!(slots_for(70, 70, 4), 4);
        assert_eq!(slots_for(0, 70, 4), 0);
        // 0.8 x r = 3.2 slots: the 4th slot loses 0.8 / 4 = a fifth of each push.
        assert_eq!(slots_for(56, 70, 4), 4);
        // 3.1 slots would lose 0.9 / 4 > a fifth: 3.
        assert_eq!(slots_for(54, 70, 4), 3);
        // 4.06 slots: the fraction is under an eighth of a slot: 4 (a stream measured at
        // 70 instead of 71 kbit/s does not add a slot to a budget of exactly 4).
        assert_eq!(slots_for(71, 70, 4), 4);
        assert_eq!(slots_for(71, 71, 4), 4);
        // 1.6 x r = 6.4 slots: 7.
        assert_eq!(slots_for(112, 70, 4), 7);
        // A quarter of one slot buys no child (it would lose 3 pushes in 4).
        assert_eq!(slots_for(5, 70, 4), 0);
        // 0.6 of a slot (the child would lose 40 %): none; 0.9 of one: 1.
        assert_eq!(slots_for(10, 70, 4), 0);
        assert_eq!(slots_for(16, 70, 4), 1);
        assert_eq!(slots_for(1000, 0, 4), 0);
    }

    proptest! {
        #[test]
        fn slots_cover_the_budget_within_one_slot(u in 0u32..1_000_000, r in 1u32..100_000, k in 1u16..=64) {
            let n = u64::from(slots_for(u, r, k));
            let units = u64::from(u) * u64::from(k);
            // n slots of r/k: never less than the whole slots the budget buys, never
            // more than one beyond them, and that one only if it keeps 4/5 of a push.
            prop_assert!(n * u64::from(r) >= units - units % u64::from(r));
            prop_assert!(n * u64::from(r) < units + u64::from(r));
            if n * u64::from(r) > units {
                prop_assert!((n * u64::from(r) - units) * 5 <= u64::from(r) * n);
                prop_assert!((n * u64::from(r) - units) * 8 <= u64::from(r) * 7);
            }
        }
    }
}
