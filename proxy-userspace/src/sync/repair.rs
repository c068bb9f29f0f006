//! When the repair pass runs. A sync whose writes failed (or whose writer was lost) leaves the
//! maps behind the planner's state; replanning would find nothing to do, since the planner
//! already records the wanted state, so the maps are read back and compared instead (as
//! Cilium's reconciler retries failed objects and prunes). Retries back off from
//! [`FIRST_RETRY`] doubling up to the sync period, where the periodic pass takes over.

use std::time::{Duration, Instant};

use crate::pipeline::plan::{ReadBackError, WriteFailure};

/// The first retry after a failure: soon enough that a transient error (EAGAIN, ENOMEM under
/// memory pressure) costs no noticeable downtime, late enough not to spin on a lasting one.
pub(crate) const FIRST_RETRY: Duration = Duration::from_millis(200);

/// What one repair pass did.
#[derive(Debug, Default)]
pub struct RepairReport {
    /// Map entries that differed from the desired state (and were rewritten or removed).
    pub differences: usize,
    pub failed: Vec<WriteFailure>,
    /// The maps could not be read back, so nothing was compared.
    pub unread: Option<ReadBackError>,
}

impl RepairReport {
    pub fn clean(&self) -> bool {
        self.failed.is_empty() && self.unread.is_none()
    }
}

/// The retry schedule: `None` while the maps are believed right.
#[derive(Debug)]
pub(crate) struct Schedule {
    cap: Duration,
    next: Option<(Instant, Duration)>,
}

impl Schedule {
    /// `cap`: the sync period, after which the periodic pass repairs anyway.
    pub(crate) fn new(cap: Duration) -> Self {
        Self { cap, next: None }
    }

    /// Something failed at `now`: retry after the current backoff, then back off further.
    pub(crate) fn failed(&mut self, now: Instant) {
        let backoff = self
            .next
            .map_or(FIRST_RETRY, |(_, last)| (last * 2).min(self.cap));
        self.next = Some((now + backoff, backoff));
    }

    pub(crate) fn succeeded(&mut self) {
        self.next = None;
    }

    pub(crate) fn due(&self) -> Option<Instant> {
        self.next.map(|(at, _)| at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_to_the_sync_period_and_reset_on_success() {
        let mut s = Schedule::new(Duration::from_secs(1));
        let t = Instant::now();
        assert_eq!(s.due(), None);
        let waits: Vec<Duration> = (0..5)
            .map(|_| {
                s.failed(t);
                s.due().unwrap() - t
            })
            .collect();
        let ms = |n| Duration::from_millis(n);
        assert_eq!(waits, [ms(200), ms(400), ms(800), ms(1000), ms(1000)]);
        s.succeeded();
        assert_eq!(s.due(), None);
        s.failed(t);
        assert_eq!(s.due(), Some(t + FIRST_RETRY));
    }
}
