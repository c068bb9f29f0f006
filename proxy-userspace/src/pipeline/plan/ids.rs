//! Backend and reverse-NAT ids. Ids only grow, so a freed id is never reused while a reader
//! (a connection tracked under it, a tool decoding the maps) may still hold it.

use foldhash::{HashSet, HashSetExt as _};

/// Monotonic id source that skips ids still in use once it wraps.
#[derive(Debug)]
pub(super) struct Ids {
    next: u32,
    used: HashSet<u32>,
}

impl Ids {
    pub(super) fn new() -> Self {
        Self {
            next: 1,
            used: HashSet::new(),
        }
    }

    pub(super) fn take(&mut self) -> u32 {
        loop {
            let id = self.next;
            self.next = self.next.checked_add(1).unwrap_or(1);
            if id != 0 && self.used.insert(id) {
                return id;
            }
        }
    }

    /// Marks an id read back from the maps as taken; new ids continue after it.
    pub(super) fn adopt(&mut self, id: u32) {
        self.used.insert(id);
        if id >= self.next {
            self.next = id.checked_add(1).unwrap_or(1);
        }
    }

    pub(super) fn release(&mut self, id: u32) {
        self.used.remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::plan::{Planner, fixtures::*};

    #[test]
    fn ids_are_not_reused_after_release() {
        let mut p = Planner::new();
        let first = p
            .plan_service(&svc("a"), Some(&entry(&[("10.96.0.1", 80, &["10.0.0.1"])])))
            .plan;
        p.plan_service(&svc("a"), None);
        let second = p
            .plan_service(&svc("b"), Some(&entry(&[("10.96.0.2", 80, &["10.0.0.9"])])))
            .plan;
        assert_ne!(first.upsert_backends[0].0, second.upsert_backends[0].0);
        assert_ne!(first.upsert_rev_nats[0].id, second.upsert_rev_nats[0].id);
    }

    #[test]
    fn after_wrapping_ids_skip_zero_and_those_still_in_use() {
        let mut ids = Ids::new();
        ids.adopt(2);
        ids.adopt(u32::MAX - 1);
        assert_eq!(ids.take(), u32::MAX);
        assert_eq!(ids.take(), 1, "0 is never an id");
        assert_eq!(ids.take(), 3, "2 is still in use");
        ids.release(2);
        assert_eq!(ids.take(), 4, "a released id waits for the next wrap");
    }
}
