//! The long-running agent: loads the datapath, adopts what pinned maps already hold, keeps the
//! maps in sync with the source, and leaves everything in place when it stops.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use notify::{RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

use crate::{
    datapath::{
        loader::{Datapath, LoadError, MapSizes},
        maps::{OpenError, PinnedMaps},
        reader::{ReadError, Snapshot},
        writer::Writer,
    },
    metrics::Metrics,
    plan::{Plan, Planner},
    proxier::{PlanSink, Proxier, SyncReport},
    source::manifests::ManifestSet,
    translate::TranslateOptions,
};

#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub pin_dir: PathBuf,
    pub cgroup: PathBuf,
    pub node_name: String,
    pub manifests: PathBuf,
    pub map_sizes: MapSizes,
    pub translate: TranslateOptions,
    /// Re-reads the manifests at least this often, in case a file event was missed.
    pub resync_period: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("installing the SIGTERM handler: {0}")]
    Signal(std::io::Error),
    #[error("watching {path}: {source}")]
    Watch {
        path: PathBuf,
        source: notify::Error,
    },
}

impl PlanSink for Writer {
    fn apply(&mut self, plan: &Plan) -> Vec<String> {
        Writer::apply(self, plan)
            .into_iter()
            .map(|e| e.to_string())
            .collect()
    }
}

fn log_sync(what: &str, report: &SyncReport) {
    if report.ops > 0 || !report.failed.is_empty() {
        tracing::info!(
            services = report.services,
            map_ops = report.ops,
            failed = report.failed.len(),
            "{what}"
        );
    }
}

/// Watches the manifest path (its parent when it is a file, since editors replace files by
/// renaming) and nudges `tx` on any change.
fn watch(path: &Path, tx: mpsc::Sender<()>) -> Result<notify::RecommendedWatcher, AgentError> {
    let err = |source| AgentError::Watch {
        path: path.to_path_buf(),
        source,
    };
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
    Ok(watcher)
}

fn reload(manifests: &mut ManifestSet, proxier: &mut Proxier<Writer>) {
    let (changed, errors) = manifests.reload();
    for e in &errors {
        tracing::error!("{e}");
    }
    if changed {
        proxier.replace_all(&manifests.snapshot());
    }
}

pub async fn run(opts: AgentOptions, metrics: Arc<Metrics>) -> Result<(), AgentError> {
    let mut datapath = Datapath::load(&opts.pin_dir, opts.map_sizes)?;
    let maps = PinnedMaps::open(&opts.pin_dir)?;
    let existing = Snapshot::read(&maps)?;
    if !existing.frontends.is_empty() {
        tracing::info!(
            frontends = existing.frontends.len(),
            "adopting datapath state from pinned maps"
        );
    }
    let planner = Planner::adopt(existing.programmed());
    let mut proxier = Proxier::new(
        &opts.node_name,
        opts.translate.clone(),
        planner,
        Writer::new(maps),
        metrics,
    );

    let (tx, mut rx) = mpsc::channel(1);
    let _watcher = watch(&opts.manifests, tx)?;
    let mut manifests = ManifestSet::new(&opts.manifests);
    reload(&mut manifests, &mut proxier);
    log_sync("initial sync", &proxier.sync());
    log_sync(
        "removed state no Service claims",
        &proxier.release_unclaimed(),
    );

    // Programs go live (or switch over) only now that the maps hold the full state.
    let attached = datapath.attach(&opts.cgroup)?;
    tracing::info!(
        cgroup = %opts.cgroup.display(),
        pin_dir = %opts.pin_dir.display(),
        links_updated = attached.updated,
        links_created = attached.created,
        services = proxier.planner().service_count(),
        frontends = proxier.planner().frontend_count(),
        backends = proxier.planner().backend_count(),
        "datapath ready"
    );

    let mut resync = tokio::time::interval(opts.resync_period);
    resync.tick().await;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(AgentError::Signal)?;
    loop {
        tokio::select! {
            Some(()) = rx.recv() => {
                // Let a burst of writes (an editor's save, a `cp -r`) settle into one reload.
                tokio::time::sleep(Duration::from_millis(50)).await;
                while rx.try_recv().is_ok() {}
                reload(&mut manifests, &mut proxier);
            }
            _ = resync.tick() => reload(&mut manifests, &mut proxier),
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
        }
        if proxier.has_pending() {
            log_sync("sync", &proxier.sync());
        }
    }
    tracing::info!(
        "stopping; the datapath stays in place (run `bpf-kube-proxy cleanup` to remove it)"
    );
    Ok(())
}
