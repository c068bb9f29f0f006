//! Services, EndpointSlices and this node's Node from the API server, through kube-rs watchers:
//! list, then watch from the list's resourceVersion, with bookmarks; on a watch error, an
//! expired resourceVersion (410 Gone) or a lost connection the watcher backs off and relists.
//!
//! The consumer never flushes on a relist: `Init` starts a buffer, `InitApply` fills it, and
//! `InitDone` replaces that kind's objects in one diff, so the datapath keeps serving the last
//! known state for as long as the API server is gone.

use std::path::Path;

use futures::{Stream, StreamExt as _, stream::BoxStream};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, watcher},
};

use super::meta::{LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME};
use super::{ObjectKind, Snapshot};

#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        source: kube::config::KubeconfigError,
    },
    #[error("no Kubernetes configuration (in-cluster, KUBECONFIG or ~/.kube/config): {0}")]
    Infer(kube::config::InferConfigError),
    #[error("building the Kubernetes client: {0}")]
    Client(kube::Error),
}

/// One thing that happened on a watch.
#[derive(Debug)]
pub enum KubeEvent {
    Service(Box<watcher::Event<Service>>),
    Slice(Box<watcher::Event<EndpointSlice>>),
    Node(Box<watcher::Event<Node>>),
    /// The watch for `kind` failed; it will back off and retry (relisting if needed).
    Error {
        kind: ObjectKind,
        error: String,
    },
}

/// A client from `--kubeconfig`, or in-cluster config, or the usual kubeconfig lookup.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, KubeSourceError> {
    let config = match kubeconfig {
        Some(path) => {
            let err = |source| KubeSourceError::Kubeconfig {
                path: path.display().to_string(),
                source,
            };
            let kc = Kubeconfig::read_from(path).map_err(err)?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(err)?
        }
        None => Config::infer().await.map_err(KubeSourceError::Infer)?,
    };
    Client::try_from(config).map_err(KubeSourceError::Client)
}

/// kube-proxy's server-side filter: Services (and their slices, which inherit the labels) that
/// another proxy owns or that are headless never reach this node. With a proxy name of our
/// own, proxy-name labels must come through so `translate` can pick ours.
pub fn label_selector(service_proxy_name: Option<&str>) -> String {
    match service_proxy_name {
        Some(_) => format!("!{LABEL_HEADLESS}"),
        None => format!("!{LABEL_SERVICE_PROXY_NAME},!{LABEL_HEADLESS}"),
    }
}

fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    kind: ObjectKind,
    wrap: fn(Box<watcher::Event<K>>) -> KubeEvent,
) -> BoxStream<'static, KubeEvent>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    watcher(api, config)
        .default_backoff()
        .map(move |item| match item {
            Ok(event) => wrap(Box::new(event)),
            Err(e) => KubeEvent::Error {
                kind,
                error: e.to_string(),
            },
        })
        .boxed()
}

/// All three watches, merged.
pub fn events(
    client: Client,
    node_name: &str,
    service_proxy_name: Option<&str>,
) -> impl Stream<Item = KubeEvent> {
    let selector = label_selector(service_proxy_name);
    let services = watch(
        Api::<Service>::all(client.clone()),
        watcher::Config::default().labels(&selector),
        ObjectKind::Service,
        KubeEvent::Service,
    );
    let slices = watch(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default().labels(&selector),
        ObjectKind::EndpointSlice,
        KubeEvent::Slice,
    );
    let node = watch(
        Api::<Node>::all(client),
        watcher::Config::default().fields(&format!("metadata.name={node_name}")),
        ObjectKind::Node,
        KubeEvent::Node,
    );
    futures::stream::select_all([services, slices, node])
}

/// One read of everything [`events`] watches (for `explain`, which needs no watch).
pub async fn list_once(
    client: Client,
    node_name: &str,
    service_proxy_name: Option<&str>,
) -> Result<Snapshot, kube::Error> {
    let selector = kube::api::ListParams::default().labels(&label_selector(service_proxy_name));
    let node = kube::api::ListParams::default().fields(&format!("metadata.name={node_name}"));
    Ok(Snapshot {
        services: Api::<Service>::all(client.clone()).list(&selector).await?.items,
        slices: Api::<EndpointSlice>::all(client.clone())
            .list(&selector)
            .await?
            .items,
        nodes: Api::<Node>::all(client).list(&node).await?.items,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selector_matches_kube_proxy_unless_we_have_a_proxy_name() {
        assert_eq!(
            label_selector(None),
            "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
        );
        assert_eq!(label_selector(Some("bpf")), "!service.kubernetes.io/headless");
    }
}
