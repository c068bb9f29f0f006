//! Watching the manifest path: file events, settled into one reload per burst.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use notify::{RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

#[derive(Debug, thiserror::Error)]
#[error("watching {path}: {source}")]
pub struct WatchError {
    path: PathBuf,
    source: notify::Error,
}

/// Lets a burst of writes (an editor's save, a `cp -r`) settle into one reload.
const SETTLE: Duration = Duration::from_millis(50);

/// The file events under a manifest path.
pub(crate) struct FileWatch {
    _watcher: notify::RecommendedWatcher,
    events: mpsc::Receiver<()>,
    /// An event was taken but the burst it started has not been reported yet.
    pending: bool,
}

impl FileWatch {
    /// Watches `path` (its parent when it is a file, since editors replace files by renaming).
    pub fn new(path: &Path) -> Result<Self, WatchError> {
        let err = |source| WatchError {
            path: path.to_path_buf(),
            source,
        };
        let (tx, events) = mpsc::channel(1);
        let mut watcher = notify::recommended_watcher(move |_event| {
            // A full channel means a reload is already pending.
            let _ = tx.try_send(());
        })
        .map_err(err)?;
        let (target, mode) = if path.is_dir() {
            (path, RecursiveMode::Recursive)
        } else {
            (
                path.parent().unwrap_or(Path::new(".")),
                RecursiveMode::NonRecursive,
            )
        };
        watcher.watch(target, mode).map_err(err)?;
        Ok(Self {
            _watcher: watcher,
            events,
            pending: false,
        })
    }

    /// Resolves once something under the path changed and the burst of writes settled.
    /// Cancel-safe, as a `select!` branch must be: a change seen by a dropped call is reported
    /// by the next one.
    pub async fn changed(&mut self) {
        if !self.pending {
            if self.events.recv().await.is_none() {
                // The watcher stopped: no more events, and the periodic resync still reloads.
                std::future::pending::<()>().await;
            }
            self.pending = true;
        }
        tokio::time::sleep(SETTLE).await;
        while self.events.try_recv().is_ok() {}
        self.pending = false;
    }
}
