//! Per-CPU datapath counters (read and summed by the agent for its metrics).

use proxy_common::counters::Counter;

use crate::COUNTERS;

#[inline(always)]
pub fn bump(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: the pointer comes from a successful per-CPU array lookup, so it is valid for
        // this program run and no other CPU writes this CPU's copy.
        unsafe { *slot += 1 };
    }
}
