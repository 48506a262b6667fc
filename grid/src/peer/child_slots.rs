//! [`ChildSlots`]: a relaying peer's child-slot accounting: how many substream
//! subscriptions its budget buys, how many its children hold, whether one more fits,
//! and the slots left when the budget is lowered. (Checking a child's parent tickets
//! is the caller's business: crypto stays outside the grid core.)

use crate::slots_for;

/// Child-slot accounting of one relaying peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChildSlots {
    /// Child slots the control plane gave us (substream subscriptions).
    slots: u32,
    /// Substream subscriptions our children hold.
    used: u32,
    /// Relay budget, kbit/s (0 = not relaying).
    budget_kbps: u32,
    /// The stream's rate (0 = unknown).
    stream_kbps: u32,
    /// Substreams `K`.
    k: u16,
}

impl ChildSlots {
    /// `slots` child slots for a budget of `budget_kbps` in a `stream_kbps` stream
    /// split `k` ways (`budget_kbps == 0`: not relaying, no slots).
    pub fn new(slots: u32, budget_kbps: u32, stream_kbps: u32, k: u16) -> ChildSlots {
        ChildSlots {
            slots: if budget_kbps > 0 { slots } else { 0 },
            used: 0,
            budget_kbps,
            stream_kbps,
            k,
        }
    }

    /// Child slots now.
    pub fn slots(&self) -> u32 {
        self.slots
    }

    /// Substream subscriptions held by children.
    pub fn used(&self) -> u32 {
        self.used
    }

    /// Relay budget now, kbit/s (0 = not relaying).
    pub fn budget_kbps(&self) -> u32 {
        self.budget_kbps
    }

    /// New slots from a (re-)join; ignored when not relaying.
    pub fn set_slots(&mut self, slots: u32) {
        if self.budget_kbps > 0 {
            self.slots = slots;
        }
    }

    /// Substream subscriptions admitted with our slots: twice the slots for ticketed
    /// children (the control plane's view runs ahead of its children's: a joiner that
    /// takes a leaf's place here arrives before the leaf hears of its move), the slots
    /// alone when nothing can be checked.
    pub fn admit_limit(&self, ticketed: bool) -> u32 {
        admit_limit(self.slots, ticketed)
    }

    /// Whether a child asking for `mask` fits when the other children hold
    /// `others_used` subscriptions.
    pub fn fits(&self, mask: u64, others_used: u32, ticketed: bool) -> bool {
        mask == 0 || others_used.saturating_add(mask.count_ones()) <= self.admit_limit(ticketed)
    }

    /// A child now holds `mask`.
    pub fn add(&mut self, mask: u64) {
        self.used += mask.count_ones();
    }

    /// A child let go of `mask`.
    pub fn remove(&mut self, mask: u64) {
        self.used = self.used.saturating_sub(mask.count_ones());
    }

    /// Child slots a budget buys, as the control plane counts them ([`slots_for`]);
    /// proportionally to the current slots when the stream rate is unknown.
    pub fn slots_for(&self, kbps: u32) -> u32 {
        if self.stream_kbps > 0 {
            slots_for(kbps, self.stream_kbps, self.k)
        } else if self.budget_kbps > 0 {
            let v = u64::from(self.slots) * u64::from(kbps) / u64::from(self.budget_kbps);
            u32::try_from(v).unwrap_or(u32::MAX)
        } else {
            0
        }
    }

    /// The uplink drains only `kbps`: the budget and the slots are lowered (never
    /// raised). Returns the new slots; children beyond them must go
    /// ([`ChildSlots::over`]).
    pub fn lower_budget(&mut self, kbps: u32) -> u32 {
        self.slots = self.slots_for(kbps).min(self.slots);
        self.budget_kbps = kbps;
        self.slots
    }

    /// Children hold more subscriptions than the slots.
    pub fn over(&self) -> bool {
        self.used > self.slots
    }
}

/// [`ChildSlots::admit_limit`] for `slots` slots.
pub fn admit_limit(slots: u32, ticketed: bool) -> u32 {
    if ticketed {
        slots.saturating_mul(2)
    } else {
        slots
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticketed_children_may_hold_twice_the_slots() {
        let mut c = ChildSlots::new(2, 1000, 1000, 4);
        assert!(c.fits(0b1111, 0, true));
        assert!(!c.fits(0b1111, 0, false));
        assert!(c.fits(0b11, 0, false));
        c.add(0b111);
        assert_eq!(c.used(), 3);
        assert!(!c.fits(0b11, c.used(), true));
        assert!(c.fits(0b1, c.used(), true));
        assert!(c.fits(0, 100, false), "a neighbour takes no slot");
        c.remove(0b11);
        assert_eq!(c.used(), 1);
    }

    #[test]
    fn no_slots_without_a_relay_budget() {
        let mut c = ChildSlots::new(4, 0, 1000, 4);
        assert_eq!(c.slots(), 0);
        c.set_slots(3);
        assert_eq!(c.slots(), 0);
        assert!(!c.fits(1, 0, true));
    }

    #[test]
    fn a_lowered_budget_buys_fewer_slots_and_never_more() {
        // 1000 kbit/s in 4 substreams: 250 kbit/s a slot.
        let mut c = ChildSlots::new(4, 1000, 1000, 4);
        c.add(0b1111);
        assert_eq!(c.lower_budget(500), 2);
        assert_eq!(c.budget_kbps(), 500);
        assert!(c.over());
        assert_eq!(c.lower_budget(900), 2, "never raised");
        // Unknown stream rate: proportional to the slots.
        let mut u = ChildSlots::new(8, 1000, 0, 4);
        assert_eq!(u.slots_for(500), 4);
        assert_eq!(u.lower_budget(250), 2);
        assert!(!u.over());
    }
}
