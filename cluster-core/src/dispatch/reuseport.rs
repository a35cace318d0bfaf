//! `SO_REUSEPORT` slots: each worker serves the sockets of one slot, and a reload's
//! replacement takes its predecessor's slot, so connections the kernel queued on the slot's
//! sockets are served rather than reset.

use std::collections::HashMap;
use std::time::Duration;

/// Orphaned `SO_REUSEPORT` sockets wait this long for a replacement worker before they close.
pub(super) const SLOT_GRACE: Duration = Duration::from_secs(2);

/// The slot of each worker that has one.
#[derive(Debug, Default)]
pub(super) struct Slots(HashMap<u32, usize>);

impl Slots {
    /// Worker `id`'s slot: its own, or the lowest free one.
    pub(super) fn of(&mut self, id: u32) -> usize {
        if let Some(s) = self.0.get(&id) {
            return *s;
        }
        let mut s = 0;
        while self.taken(s) {
            s += 1;
        }
        self.0.insert(id, s);
        s
    }

    /// Worker `id`'s slot, if it has one.
    pub(super) fn get(&self, id: u32) -> Option<usize> {
        self.0.get(&id).copied()
    }

    /// How many workers hold `slot`.
    pub(super) fn holders(&self, slot: usize) -> usize {
        self.0.values().filter(|s| **s == slot).count()
    }

    /// Worker `new` shares `old`'s slot.
    pub(super) fn inherit(&mut self, new: u32, old: u32) {
        if let Some(slot) = self.0.get(&old).copied() {
            self.0.insert(new, slot);
        }
    }

    /// Worker `id` is gone; its slot, if it had one.
    pub(super) fn release(&mut self, id: u32) -> Option<usize> {
        self.0.remove(&id)
    }

    /// Whether a worker holds `slot`.
    pub(super) fn taken(&self, slot: usize) -> bool {
        self.0.values().any(|s| *s == slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_reused_lowest_first_and_inherited_by_replacements() {
        let mut s = Slots::default();
        assert_eq!((s.of(1), s.of(2), s.of(3)), (0, 1, 2));
        assert_eq!(s.of(2), 1, "a worker keeps its slot");
        s.inherit(4, 2);
        assert_eq!(s.of(4), 1);
        assert_eq!(s.release(2), Some(1));
        assert!(s.taken(1), "the replacement still holds it");
        assert_eq!(s.release(4), Some(1));
        assert!(!s.taken(1));
        assert_eq!(s.of(5), 1, "the lowest free slot");
        assert_eq!(s.release(9), None);
    }
}
