//! The map walker: the one thread that reads whole maps on a timer (conntrack garbage
//! collection, the fill counts `/metrics` shows). A full conntrack table is 524 288 entries,
//! tenths of a second to read even in batches: on a tokio worker that would hold up watch
//! events and scrapes; here it holds up nothing.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        mpsc::{RecvTimeoutError, SyncSender, sync_channel},
    },
    time::{Duration, Instant},
};

use crate::{
    datapath::{conntrack::Conntrack, readings::FillCache},
    telemetry::metrics::Metrics,
};

/// The longest the fill counts may lag behind the maps when nothing is programmed.
const FILL_PERIOD: Duration = Duration::from_secs(10);

/// The least time between two counts the agent asked for: a burst of syncs costs one count a
/// second, not one each.
const MIN_GAP: Duration = Duration::from_secs(1);

/// Asks the walker to count the maps again (after a sync wrote them).
pub(crate) struct Walker(SyncSender<()>);

impl Walker {
    /// Never blocks: a request already waiting covers this one.
    pub(crate) fn recount(&self) {
        let _ = self.0.try_send(());
    }
}

/// Starts the walker: the fill counts at once and whenever asked, conntrack garbage
/// collection on its period.
pub(crate) fn spawn(
    mut conntrack: Conntrack,
    fill: FillCache,
    pin_dir: PathBuf,
    metrics: Arc<Metrics>,
) -> std::io::Result<Walker> {
    let period = conntrack.gc_period().min(FILL_PERIOD);
    let (tx, rx) = sync_channel(1);
    std::thread::Builder::new()
        .name("map-walker".into())
        .spawn(move || {
            let mut next_gc = Instant::now() + period;
            loop {
                fill.refresh(&pin_dir);
                let counted_at = Instant::now();
                let wait = next_gc.saturating_duration_since(counted_at);
                match rx.recv_timeout(wait) {
                    Ok(()) => {
                        std::thread::sleep(MIN_GAP.saturating_sub(counted_at.elapsed()));
                        continue;
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    // The agent is stopping; collect on the period meanwhile.
                    Err(RecvTimeoutError::Disconnected) => std::thread::sleep(wait),
                }
                let collected = conntrack.collect();
                metrics.conntrack_collected.inc_by(collected as u64);
                if collected > 0 {
                    tracing::debug!(collected, "removed expired conntrack entries");
                }
                next_gc = Instant::now() + period;
            }
        })?;
    Ok(Walker(tx))
}
