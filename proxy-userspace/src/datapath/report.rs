//! What the kernel and the loaded datapath offer, logged and exported once at start: kernel
//! features, tc program load states, tc attachments.

use crate::{
    datapath::{
        external::{Attachment, ProgramState},
        features::{KernelFeatures, TcAttach, TcMode},
    },
    telemetry::metrics::{AttachmentLabel, FeatureLabel, Metrics, ProgramLabel},
};

/// Probes the kernel once, logs the one line and exports it; returns the tc attach mode.
pub(crate) fn probe_kernel(tc_attach: TcAttach, metrics: &Metrics) -> TcMode {
    let kernel = KernelFeatures::probe();
    let mode = tc_attach.mode(kernel.tcx);
    kernel.log(mode);
    for feature in kernel.list() {
        if let Some(available) = feature.available {
            metrics
                .kernel_features
                .get_or_create(&FeatureLabel {
                    feature: feature.name,
                })
                .set(i64::from(available));
        }
    }
    mode
}

/// Exports the tc programs' load states; returns the problems, for `/healthz`.
pub(crate) fn report_programs(programs: &[(&'static str, ProgramState)], metrics: &Metrics) -> Vec<String> {
    let mut problems = Vec::new();
    for (program, state) in programs {
        let state = match state {
            ProgramState::Loaded => "loaded",
            ProgramState::Failed(reason) => {
                problems.push(format!("tc: program {program} not loaded: {reason}"));
                "failed"
            }
        };
        metrics
            .datapath_programs
            .get_or_create(&ProgramLabel {
                program: program.to_string(),
                state,
            })
            .set(1);
    }
    problems
}

/// Logs and exports the tc attachments; returns the problems, for `/healthz`.
pub(crate) fn report_attachments(attachments: &[Attachment], metrics: &Metrics) -> Vec<String> {
    let mut problems = Vec::new();
    for a in attachments {
        let state = match &a.outcome {
            Ok(_) => "attached",
            Err(e) => {
                tracing::error!(
                    device = %a.device,
                    program = a.program,
                    mode = a.mode.as_str(),
                    "tc program not attached; traffic from outside arriving on this device is not served: {e}"
                );
                problems.push(format!("tc: {e}"));
                "failed"
            }
        };
        metrics
            .tc_attachments
            .get_or_create(&AttachmentLabel {
                device: a.device.clone(),
                program: a.program.to_string(),
                mode: a.mode.as_str(),
                state,
            })
            .set(1);
    }
    problems
}
