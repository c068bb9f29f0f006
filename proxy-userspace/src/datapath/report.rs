//! What the kernel and the loaded datapath offer, logged and exported once at start: kernel
//! features, pinned maps replaced, tc program load states, tc attachments.

use crate::{
    datapath::{
        external::{Attachment, ProgramState},
        features::{KernelFeatures, TcAttach, TcMode},
        loader::Recreated,
    },
    telemetry::metrics::{AttachmentLabel, FeatureLabel, Metrics, ProgramLabel, RecreatedLabel},
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

/// Exports the pinned maps the load replaced (the loader logged each with both layouts).
pub(crate) fn report_recreated(recreated: &[Recreated], metrics: &Metrics) {
    for r in recreated {
        metrics
            .maps_recreated
            .get_or_create(&RecreatedLabel {
                map: r.map.to_string(),
                mismatch: r.mismatch.as_str(),
            })
            .inc();
    }
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

#[cfg(test)]
mod tests {
    use proxy_common::maps as names;

    use super::*;
    use crate::datapath::loader::Mismatch;

    #[test]
    fn a_recreated_map_is_counted_by_name_and_mismatch() {
        let metrics = Metrics::new();
        let recreated = Recreated {
            map: names::CONNTRACK_V4,
            mismatch: Mismatch::Layout,
            pinned: "key {a:u32@0}4 value {b:u32@0}4".into(),
            built: "key {a:u32@0}4 value {c:u32@0}4".into(),
        };
        report_recreated(&[recreated], &metrics);
        let text = metrics.encode();
        assert!(
            text.contains(r#"bpf_kube_proxy_maps_recreated_total{map="bkp_ct_v4",mismatch="layout"} 1"#),
            "{text}"
        );
    }
}
