//! One Service's desired state from a complete snapshot of objects, computed from scratch as
//! the agent computes it from the same objects: what tools (`explain`) compare with the maps.

use std::net::IpAddr;

use crate::{
    pipeline::{
        inventory::Inventory,
        model::{ServiceEntry, ServiceName},
        translate::{self, ItemIssue, ServiceOutcome, TranslateError, TranslateOptions},
    },
    source::Snapshot,
};

/// [`desired_service`]'s answer, with what the snapshot's objects got wrong.
#[derive(Debug, Default)]
pub struct Desired {
    /// `None`: the Service is not proxied (absent, skipped or invalid).
    pub entry: Option<ServiceEntry>,
    /// Items dropped from otherwise usable objects.
    pub issues: Vec<ItemIssue>,
    /// Objects that could not be used at all (slices for other consumers are not counted).
    pub invalid: Vec<TranslateError>,
}

/// `service`'s desired frontends on node `node_name` (whose Node object, if the snapshot has
/// it, gives the zone), NodePorts served on `node_port_addresses`.
pub fn desired_service(
    snapshot: &Snapshot,
    node_name: &str,
    node_port_addresses: Vec<IpAddr>,
    opts: &TranslateOptions,
    service: &ServiceName,
) -> Desired {
    let mut out = Desired::default();
    let mut services = Vec::new();
    for svc in &snapshot.services {
        match translate::translate_service(svc, opts, &mut out.issues) {
            Ok(ServiceOutcome::Proxied(info)) => services.push(info),
            Ok(ServiceOutcome::Skipped(..)) => {}
            Err(e) => out.invalid.push(e),
        }
    }
    let mut slices = Vec::new();
    for slice in &snapshot.slices {
        match translate::translate_slice(slice, &mut out.issues) {
            Ok(info) => slices.push(info),
            Err(e) if e.is_foreign() => {}
            Err(e) => out.invalid.push(e),
        }
    }
    let node = snapshot
        .nodes
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(node_name));
    let mut inventory = Inventory::new(translate::translate_node(node_name, node, node_port_addresses));
    inventory.replace_services(services);
    inventory.replace_slices(slices);
    out.entry = inventory.desired(service);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::model::FrontendKind;

    fn parse<T: serde::de::DeserializeOwned>(yaml: &str) -> T {
        serde_saphyr::from_str(yaml).expect("test object parses")
    }

    const WEB: &str = "
metadata: {name: web, namespace: shop}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, nodePort: 30080}]
";
    /// Two endpoints, one hinted for zone z1.
    const WEB_SLICE: &str = "
metadata: {name: web-a, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.0.0.1], hints: {forZones: [{name: z1}]}}
- {addresses: [10.0.0.2], hints: {forZones: [{name: z2}]}}
";

    fn backends(desired: &Desired, kind: FrontendKind) -> Vec<String> {
        let entry = desired.entry.as_ref().expect("web is proxied");
        let frontend = entry.frontends.iter().find(|f| f.kind == kind).unwrap();
        frontend.backends.iter().map(|b| b.key.to_string()).collect()
    }

    #[test]
    fn the_service_is_joined_with_its_slices_and_seen_from_the_named_node() {
        let snap = Snapshot {
            services: vec![parse(WEB)],
            slices: vec![parse(WEB_SLICE)],
            nodes: vec![
                parse("metadata: {name: n1, labels: {topology.kubernetes.io/zone: z1}}"),
                parse("metadata: {name: n2, labels: {topology.kubernetes.io/zone: z2}}"),
            ],
        };
        let web = ServiceName::new("shop", "web");
        let opts = TranslateOptions::default();
        let desired = desired_service(&snap, "n1", vec!["192.168.1.10".parse().unwrap()], &opts, &web);
        assert_eq!(
            backends(&desired, FrontendKind::ClusterIp),
            ["10.0.0.1:8080/TCP"],
            "n1's zone picks its hinted endpoint"
        );
        let node_port = desired.entry.as_ref().unwrap().frontends.iter();
        assert!(
            node_port
                .filter(|f| f.kind == FrontendKind::NodePort)
                .all(|f| f.key.to_string() == "192.168.1.10:30080/TCP")
        );
        let elsewhere = desired_service(&snap, "n3", Vec::new(), &opts, &web);
        assert_eq!(
            backends(&elsewhere, FrontendKind::ClusterIp),
            ["10.0.0.1:8080/TCP", "10.0.0.2:8080/TCP"],
            "a node without a Node object has no zone, so hints are ignored"
        );
        assert!(
            desired_service(&snap, "n1", Vec::new(), &opts, &ServiceName::new("shop", "api"))
                .entry
                .is_none()
        );
    }

    #[test]
    fn broken_objects_are_reported_and_slices_for_other_consumers_are_not() {
        let snap = Snapshot {
            services: vec![
                parse(&WEB.replace(
                    "[{name: http, port: 80,",
                    "[{port: 79, protocol: QUIC}, {name: http, port: 80,",
                )),
                parse(
                    "metadata: {name: bad, namespace: shop}\nspec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}",
                ),
            ],
            slices: vec![
                parse(WEB_SLICE),
                parse(
                    "metadata: {name: fqdn, namespace: shop, labels: {kubernetes.io/service-name: web}}\n\
                     addressType: FQDN",
                ),
            ],
            nodes: Vec::new(),
        };
        let desired = desired_service(
            &snap,
            "n1",
            Vec::new(),
            &TranslateOptions::default(),
            &ServiceName::new("shop", "web"),
        );
        assert!(desired.entry.is_some());
        let issues: Vec<&str> = desired.issues.iter().map(|i| i.field.as_str()).collect();
        assert_eq!(issues, ["spec.ports[0].protocol"]);
        assert!(
            matches!(&desired.invalid[..], [TranslateError::InvalidClusterIp { .. }]),
            "{:?}",
            desired.invalid
        );
    }
}
