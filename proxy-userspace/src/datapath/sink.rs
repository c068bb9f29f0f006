//! The real datapath behind the proxier: map writes, then the sockets they left stale.

use std::sync::Arc;

use crate::{
    datapath::{sockets::StaleSockets, walker::Walker, writer::Writer},
    pipeline::plan::{Plan, PlanSink, Programmed, ReadBackError, WriteFailure},
    telemetry::metrics::Metrics,
};

pub(crate) struct DatapathSink {
    writer: Writer,
    stale: StaleSockets,
    metrics: Arc<Metrics>,
    /// Recounts the maps for `/metrics` after a write.
    walker: Walker,
}

impl DatapathSink {
    pub fn new(writer: Writer, stale: StaleSockets, metrics: Arc<Metrics>, walker: Walker) -> Self {
        Self {
            writer,
            stale,
            metrics,
            walker,
        }
    }
}

impl DatapathSink {
    /// Writes to `maps` from now on (the maps that replaced those that grew).
    pub(crate) fn reopen(&mut self, maps: crate::datapath::maps::PinnedMaps) {
        self.writer = Writer::new(maps);
    }
}

impl PlanSink for DatapathSink {
    fn apply(&mut self, plan: &Plan) -> Vec<WriteFailure> {
        let failed = PlanSink::apply(&mut self.writer, plan);
        if !plan.is_empty() {
            self.walker.recount();
        }
        if !plan.departed.is_empty() {
            let done = self.stale.terminate(&plan.departed);
            self.metrics
                .stale_udp_sockets_destroyed
                .inc_by(done.destroyed as u64);
            self.metrics.stale_udp_failures.inc_by(done.failures.len() as u64);
            for failure in &done.failures {
                tracing::warn!(%failure, "could not destroy stale UDP sockets");
            }
            if done.destroyed > 0 {
                tracing::info!(
                    destroyed = done.destroyed,
                    namespaces = done.namespaces,
                    "destroyed connected UDP sockets of departed backends"
                );
            }
        }
        failed
    }

    fn read_back(&mut self) -> Result<Programmed, ReadBackError> {
        self.writer.read_back()
    }
}
