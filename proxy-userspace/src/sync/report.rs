//! After a sync: its log line, and the memory a large one went through handed back.

use crate::sync::proxier::SyncReport;

/// A sync this large (a first sync, a reload of many Services) went through megabytes of
/// short-lived memory: parsed documents, the plan, the batch arrays.
const LARGE_SYNC_OPS: usize = 10_000;

/// Logs a sync and, after a large one, hands the memory it went through back to the kernel.
pub(crate) fn finish_sync(what: &str, report: &SyncReport) {
    if report.ops > 0 || !report.failed.is_empty() {
        tracing::info!(
            services = report.services,
            map_ops = report.ops,
            failed = report.failed.len(),
            "{what}"
        );
    }
    if report.ops >= LARGE_SYNC_OPS {
        release_free_memory();
    }
}

/// Hands the allocator's free pages back to the kernel. glibc only returns the top of its heap
/// by itself, so without this the agent's RSS would stay at the peak of its largest sync
/// (about 20 MiB above what it holds at 10 000 Services) for the rest of its life.
pub(crate) fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks glibc's own free lists; no pointer of ours is involved.
    unsafe {
        libc::malloc_trim(0);
    }
}
