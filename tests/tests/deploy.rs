//! The deployment manifests: valid against the Kubernetes schemas (strict: no unknown field)
//! and saying what the agent needs. No root needed.

use std::{path::PathBuf, process::Command};

use k8s_openapi::api::apps::v1::DaemonSet;

fn deploy(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file)
}

#[test]
fn deploy_manifests_validate_strictly_against_kubernetes_schemas() {
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "--kubernetes-version", "1.33.0"])
        .arg(deploy("rbac.yaml"))
        .arg(deploy("daemonset.yaml"))
        .output()
        .expect("kubernetes-validate (PyPI) is installed by `cargo xtask setup`");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert_eq!(
        text.matches(" passed ").count(),
        4,
        "every object was checked: {text}"
    );
}

#[test]
fn daemonset_runs_the_agent_with_capabilities_not_privileged() {
    let text = std::fs::read_to_string(deploy("daemonset.yaml")).unwrap();
    let ds: DaemonSet = serde_saphyr::from_str(&text).unwrap();
    let pod = ds.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    let agent = &pod.containers[0];
    let security = agent.security_context.as_ref().unwrap();
    assert_ne!(
        security.privileged,
        Some(true),
        "the long-running agent must not be privileged"
    );
    let caps = security.capabilities.as_ref().unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    let added = caps.add.clone().unwrap();
    for needed in ["BPF", "NET_ADMIN"] {
        assert!(added.iter().any(|c| c == needed), "missing {needed} in {added:?}");
    }
    let args = agent.args.clone().unwrap();
    assert_eq!(args[0], "run");
    let mounts: Vec<String> = agent
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.mount_path.clone())
        .collect();
    assert!(mounts.contains(&"/sys/fs/bpf".to_string()), "{mounts:?}");
    assert!(args.iter().any(|a| a == "--pin-dir=/sys/fs/bpf/bpf-kube-proxy"));
    let cgroup = args.iter().find_map(|a| a.strip_prefix("--cgroup=")).unwrap();
    assert!(
        mounts.iter().any(|m| m == cgroup),
        "--cgroup must point at a mounted path"
    );
}

#[test]
fn daemonset_arguments_are_accepted_by_the_agent() {
    let text = std::fs::read_to_string(deploy("daemonset.yaml")).unwrap();
    let ds: DaemonSet = serde_saphyr::from_str(&text).unwrap();
    let args = ds.spec.unwrap().template.spec.unwrap().containers[0]
        .args
        .clone()
        .unwrap();
    // `--help` after the real arguments: clap rejects unknown or malformed flags first.
    let out = Command::new(integration_tests::binary())
        .args(args.iter().map(|a| a.replace("$(NODE_NAME)", "node-a")))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn kind_cluster_runs_without_kube_proxy() {
    let text = std::fs::read_to_string(deploy("kind/cluster.yaml")).unwrap();
    let config: serde_json::Value = serde_saphyr::from_str(&text).unwrap();
    assert_eq!(config["kind"], "Cluster");
    assert_eq!(config["networking"]["kubeProxyMode"], "none");
}
