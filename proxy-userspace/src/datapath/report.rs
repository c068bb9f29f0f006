//! What the kernel and the loaded datapath offer, logged and exported: kernel features, pinned
//! maps replaced, tc program load states (once at start), tc attachments and whether remote
//! backends' replies arrive where the tc programs are (whenever those change).

use std::collections::BTreeSet;

use crate::{
    datapath::{
        external::{Attached, Attachment, ProgramState, XDP_PROGRAM},
        features::{KernelFeatures, TcAttach, TcMode, XdpAttach},
        loader::Recreated,
    },
    node::reply_routes::{Change, ReplyPaths},
    pipeline::model::ServiceName,
    telemetry::metrics::{
        AttachmentLabel, DeviceLabel, DeviceProgramLabel, FeatureLabel, Metrics, ProgramLabel, RecreatedLabel,
    },
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
pub(crate) fn report_programs(
    programs: &[(&'static str, ProgramState)],
    xdp: XdpAttach,
    metrics: &Metrics,
) -> Vec<String> {
    let mut problems = Vec::new();
    for (program, state) in programs {
        let state = match state {
            ProgramState::Loaded => "loaded",
            ProgramState::Failed(reason) => {
                if degrades(program, xdp) {
                    problems.push(format!("tc: program {program} not loaded: {reason}"));
                }
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

/// Whether `program` failing to load leaves external traffic worse served: the XDP program
/// only when XDP was asked for (`--xdp off` never attaches it).
fn degrades(program: &str, xdp: XdpAttach) -> bool {
    program != XDP_PROGRAM || xdp != XdpAttach::Off
}

/// The states of `bpf_kube_proxy_tc_attachments`; a series is 1 in the state it is in.
const ATTACHMENT_STATES: [&str; 3] = ["attached", "failed", "absent"];

fn set_attachment_state(metrics: &Metrics, a: &Attachment, state: &'static str) {
    for s in ATTACHMENT_STATES {
        let label = AttachmentLabel {
            device: a.device.clone(),
            program: a.program.to_string(),
            mode: a.mode,
            state: s,
        };
        // Only the series of a state it was ever in exist: the others need no zero.
        if s == state {
            metrics.tc_attachments.get_or_create(&label).set(1);
        } else if let Some(gauge) = metrics.tc_attachments.get(&label) {
            gauge.set(0);
        }
    }
}

/// Logs and exports the tc attachments, `previous` being those of the last attach (empty at
/// start): an attachment of `previous` that is not in `attachments` went with its device.
/// A failure is logged when it first occurs. Returns the problems, for `/healthz`.
pub(crate) fn report_attachments(
    previous: &[Attachment],
    attachments: &[Attachment],
    metrics: &Metrics,
) -> Vec<String> {
    let same = |a: &Attachment, b: &Attachment| a.device == b.device && a.program == b.program;
    let mut problems = Vec::new();
    for a in attachments {
        let state = match &a.outcome {
            Ok(attached) => {
                if *attached == Attached::Reattached {
                    tracing::info!(
                        device = %a.device,
                        program = a.program,
                        mode = a.mode,
                        "tc program attached afresh: its device had been deleted (and is back)"
                    );
                    metrics
                        .tc_reattached
                        .get_or_create(&DeviceProgramLabel {
                            device: a.device.clone(),
                            program: a.program.to_string(),
                        })
                        .inc();
                }
                "attached"
            }
            Err(e) => {
                if !previous.iter().any(|p| same(p, a) && p.outcome == a.outcome) {
                    tracing::error!(
                        device = %a.device,
                        program = a.program,
                        mode = a.mode,
                        "tc program not attached; traffic from outside arriving on this device is not served: {e}"
                    );
                }
                problems.push(format!("tc: {e}"));
                "failed"
            }
        };
        set_attachment_state(metrics, a, state);
    }
    for gone in previous
        .iter()
        .filter(|p| !attachments.iter().any(|a| same(p, a)))
    {
        tracing::warn!(
            device = %gone.device,
            program = gone.program,
            "device gone (or no longer selected): its tc program is detached"
        );
        set_attachment_state(metrics, gone, "absent");
    }
    problems
}

/// Compares where SNATed backends' replies arrive with the devices `served` by the tc
/// programs: logs each Service whose replies arrive elsewhere once per change (and once it is
/// served again), and exports how many Services each such device fails.
pub(crate) fn report_replies(
    paths: &mut ReplyPaths<ServiceName>,
    served: BTreeSet<String>,
    metrics: &Metrics,
) {
    let before = paths.unserved_per_device();
    for change in paths.report(served) {
        match change {
            Change::Unserved(service, devices) => tracing::warn!(
                %service,
                devices = ?devices,
                "replies of this Service's remote backends (SNATed flows from outside the node) arrive on devices without the tc programs, so those connections hang: add the devices to --devices, or use --devices auto"
            ),
            Change::Served(service) => tracing::info!(
                %service,
                "replies of this Service's remote backends all arrive on devices with the tc programs again"
            ),
        }
    }
    let now = paths.unserved_per_device();
    for device in before.into_keys().filter(|d| !now.contains_key(d)) {
        metrics
            .reply_device_unserved
            .get_or_create(&DeviceLabel { device })
            .set(0);
    }
    for (device, services) in now {
        metrics
            .reply_device_unserved
            .get_or_create(&DeviceLabel { device })
            .set(i64::try_from(services).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
mod tests {
    use proxy_common::maps as names;

    use super::*;

    #[test]
    fn an_xdp_program_that_did_not_load_degrades_health_only_when_xdp_was_asked_for() {
        let metrics = Metrics::new();
        let programs = [
            ("bkp_tc_ingress", ProgramState::Loaded),
            (XDP_PROGRAM, ProgramState::Failed("invalid argument".into())),
        ];
        assert!(report_programs(&programs, XdpAttach::Off, &metrics).is_empty());
        for xdp in [XdpAttach::Auto, XdpAttach::Native, XdpAttach::Generic] {
            assert_eq!(report_programs(&programs, xdp, &metrics).len(), 1, "{xdp:?}");
        }
        let tc_failed = [("bkp_tc_ingress", ProgramState::Failed("E2BIG".into()))];
        assert_eq!(report_programs(&tc_failed, XdpAttach::Off, &metrics).len(), 1);
    }
    use crate::datapath::loader::Mismatch;

    #[test]
    fn an_attachment_whose_device_went_is_absent_and_one_attached_afresh_is_counted() {
        let metrics = Metrics::new();
        let on = |device: &str, outcome| Attachment {
            device: device.into(),
            program: "bkp_tc_ingress",
            mode: "tcx",
            outcome,
        };
        let series = |device: &str, state: &str| {
            format!(
                r#"bpf_kube_proxy_tc_attachments{{device="{device}",program="bkp_tc_ingress",mode="tcx",state="{state}"}}"#
            )
        };
        let first = [on("eth0", Ok(Attached::Created)), on("eth1", Err("busy".into()))];
        assert_eq!(report_attachments(&[], &first, &metrics), ["tc: busy"]);
        let second = [on("eth1", Ok(Attached::Reattached))];
        assert!(report_attachments(&first, &second, &metrics).is_empty());
        let text = metrics.encode();
        for (line, value) in [
            (series("eth0", "attached"), 0),
            (series("eth0", "absent"), 1),
            (series("eth1", "failed"), 0),
            (series("eth1", "attached"), 1),
            (
                r#"bpf_kube_proxy_tc_reattached_total{device="eth1",program="bkp_tc_ingress"}"#.into(),
                1,
            ),
        ] {
            assert!(
                text.contains(&format!("{line} {value}\n")),
                "{line} {value}: {text}"
            );
        }
        assert!(!text.contains(&series("eth1", "absent")), "{text}");
    }

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
