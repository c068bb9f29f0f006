//! Services, EndpointSlices and this node's Node from the API server, through kube-rs watchers:
//! list, then watch from the list's resourceVersion, with bookmarks; on a watch error, an
//! expired resourceVersion (410 Gone) or a lost connection the watcher backs off and relists.
//! A watch that shows nothing, not even a bookmark, for the liveness window is dropped and
//! watched again (see [`super::liveness`]).
//!
//! [`Watches`] never flushes on a relist: `Init` starts a buffer, `InitApply` fills it, and
//! `InitDone` replaces that kind's objects in one [`Change::Replace`] (kube-runtime's reflector
//! buffers the same way), so the datapath keeps serving the last known state for as long as the
//! API server is gone.

use std::{collections::BTreeSet, path::Path, time::Duration};

use futures::{Stream, StreamExt as _, stream::BoxStream};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Config,
    client::ClientBuilder,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, watcher},
};

use super::liveness::{self, LivenessLayer};
use super::meta::{LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME};
use super::{Change, Listed, Object, ObjectKind, Snapshot};

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
pub(crate) enum KubeEvent {
    Service(Box<watcher::Event<Service>>),
    Slice(Box<watcher::Event<EndpointSlice>>),
    Node(Box<watcher::Event<Node>>),
    /// The watch for `kind` failed; it will back off and retry (relisting if needed).
    Error {
        kind: ObjectKind,
        error: String,
    },
    /// The watch for `kind` showed nothing for `after`; it is watched again.
    Silent {
        kind: ObjectKind,
        after: Duration,
    },
}

/// A client from `--kubeconfig`, or in-cluster config, or the usual kubeconfig lookup. With
/// `watch_liveness`, its watches are restarted when they are silent that long (a client that
/// only lists needs none).
pub async fn client(
    kubeconfig: Option<&Path>,
    watch_liveness: Option<Duration>,
) -> Result<Client, KubeSourceError> {
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
    let builder = ClientBuilder::try_from(config).map_err(KubeSourceError::Client)?;
    Ok(match watch_liveness {
        Some(window) => builder.with_layer(&LivenessLayer(window)).build(),
        None => builder.build(),
    })
}

/// kube-proxy's server-side filter: Services (and their slices, which inherit the labels) that
/// another proxy owns or that are headless never reach this node. With a proxy name of our
/// own, proxy-name labels must come through so `translate` can pick ours.
pub(crate) fn label_selector(service_proxy_name: Option<&str>) -> String {
    match service_proxy_name {
        Some(_) => format!("!{LABEL_HEADLESS}"),
        None => format!("!{LABEL_SERVICE_PROXY_NAME},!{LABEL_HEADLESS}"),
    }
}

/// Retries 200 ms apart at first, then at most a second apart (jittered, so that nodes do not
/// retry in step), back to 200 ms after anything succeeds. kube-rs's default, client-go's
/// reflector backoff, doubles from 0.8 s to 30 s: a restart of the API server that takes ten
/// seconds, plus its 403s while the authorizer warms up, spaced the retries so far apart that
/// a change made when it was ready took 5 to 16 s more to arrive.
fn retry_backoff() -> watcher::ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_millis(500))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .into()
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
        .backoff(retry_backoff())
        .map(move |item| match item {
            Ok(event) => wrap(Box::new(event)),
            Err(e) => match liveness::silent_for(&e) {
                Some(after) => KubeEvent::Silent { kind, after },
                None => KubeEvent::Error {
                    kind,
                    error: e.to_string(),
                },
            },
        })
        .boxed()
}

/// All three watches, merged.
pub(crate) fn events(
    client: Client,
    node_name: &str,
    service_proxy_name: Option<&str>,
) -> impl Stream<Item = KubeEvent> + Send + use<> {
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

/// Buffers one watch's relist so that it lands as a single replacement.
struct Relist<K> {
    buffer: Option<Vec<K>>,
    listed: bool,
}

impl<K> Default for Relist<K> {
    fn default() -> Self {
        Self {
            buffer: None,
            listed: false,
        }
    }
}

impl<K> Relist<K>
where
    K: Into<Object>,
    Vec<K>: Into<Listed>,
{
    fn feed(&mut self, event: watcher::Event<K>) -> Option<Change> {
        match event {
            watcher::Event::Init => {
                self.buffer = Some(Vec::new());
                None
            }
            watcher::Event::InitApply(obj) => {
                self.buffer.get_or_insert_with(Vec::new).push(obj);
                None
            }
            watcher::Event::InitDone => {
                self.listed = true;
                Some(Change::Replace(self.buffer.take().unwrap_or_default().into()))
            }
            watcher::Event::Apply(obj) => Some(Change::Apply(obj.into())),
            watcher::Event::Delete(obj) => Some(Change::Delete(obj.into().identity())),
        }
    }
}

/// How a watch is doing, when that changed or it failed again.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum WatchHealth {
    /// The watch failed; it backs off and retries (relisting if needed), and the datapath keeps
    /// its last state meanwhile. `first`: it had been working until now.
    Failed {
        kind: ObjectKind,
        error: String,
        first: bool,
    },
    /// The first event of a watch that had failed.
    Recovered(ObjectKind),
    /// The watch showed nothing, not even a bookmark, for `after`, and is watched again from
    /// its last resourceVersion.
    Silent { kind: ObjectKind, after: Duration },
}

/// What one [`KubeEvent`] did.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Step {
    /// `None` while a list is being buffered, and for errors.
    pub change: Option<Change>,
    pub health: Option<WatchHealth>,
}

/// The three watches' relist buffering and health: watcher events in, [`Change`]s out.
#[derive(Default)]
pub struct Watches {
    services: Relist<Service>,
    slices: Relist<EndpointSlice>,
    nodes: Relist<Node>,
    failing: BTreeSet<ObjectKind>,
}

impl Watches {
    /// Whether every kind has been listed once: until then a sync would see a partial world
    /// (Services without their endpoints, say) and drop what the pinned maps hold for the rest.
    pub(crate) fn listed(&self) -> bool {
        self.services.listed && self.slices.listed && self.nodes.listed
    }

    pub(crate) fn feed(&mut self, event: KubeEvent) -> Step {
        let (kind, change) = match event {
            KubeEvent::Service(e) => (ObjectKind::Service, self.services.feed(*e)),
            KubeEvent::Slice(e) => (ObjectKind::EndpointSlice, self.slices.feed(*e)),
            KubeEvent::Node(e) => (ObjectKind::Node, self.nodes.feed(*e)),
            KubeEvent::Error { kind, error } => {
                let first = self.failing.insert(kind);
                return Step {
                    change: None,
                    health: Some(WatchHealth::Failed { kind, error, first }),
                };
            }
            // Not a failure: the new watch may well stay quiet, and "recovered" would then
            // wait for the next change.
            KubeEvent::Silent { kind, after } => {
                return Step {
                    change: None,
                    health: Some(WatchHealth::Silent { kind, after }),
                };
            }
        };
        Step {
            change,
            health: self.failing.remove(&kind).then_some(WatchHealth::Recovered(kind)),
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;
    use crate::source::{Identity, Objects};

    fn meta(namespace: Option<&str>, name: &str) -> ObjectMeta {
        ObjectMeta {
            namespace: namespace.map(str::to_string),
            name: Some(name.to_string()),
            ..ObjectMeta::default()
        }
    }

    fn service(name: &str) -> Service {
        Service {
            metadata: meta(Some("shop"), name),
            ..Service::default()
        }
    }

    fn slice(name: &str) -> EndpointSlice {
        EndpointSlice {
            metadata: meta(Some("shop"), name),
            ..EndpointSlice::default()
        }
    }

    fn node(name: &str) -> Node {
        Node {
            metadata: meta(None, name),
            ..Node::default()
        }
    }

    fn svc(event: watcher::Event<Service>) -> KubeEvent {
        KubeEvent::Service(Box::new(event))
    }

    fn failed(kind: ObjectKind) -> KubeEvent {
        KubeEvent::Error {
            kind,
            error: "connection refused".to_string(),
        }
    }

    /// Feeds `events`, returning the changes they made.
    fn feed_all(watches: &mut Watches, events: impl IntoIterator<Item = KubeEvent>) -> Vec<Change> {
        events
            .into_iter()
            .filter_map(|e| watches.feed(e).change)
            .collect()
    }

    /// The Services' names that applying `changes` leaves.
    fn services_after(objects: &mut Objects, changes: Vec<Change>) -> Vec<String> {
        for change in changes {
            objects.apply(change);
        }
        let mut names: Vec<String> = objects
            .snapshot()
            .services
            .into_iter()
            .filter_map(|s| s.metadata.name)
            .collect();
        names.sort();
        names
    }

    #[test]
    fn the_initial_list_lands_as_one_replace_only_at_init_done() {
        let mut watches = Watches::default();
        for event in [
            watcher::Event::Init,
            watcher::Event::InitApply(service("web")),
            watcher::Event::InitApply(service("api")),
        ] {
            assert_eq!(watches.feed(svc(event)), Step::default());
        }
        assert_eq!(
            watches.feed(svc(watcher::Event::InitDone)).change,
            Some(Change::Replace(Listed::Services(vec![
                service("web"),
                service("api")
            ])))
        );
    }

    #[test]
    fn objects_listed_before_any_init_are_buffered_too() {
        let mut watches = Watches::default();
        assert_eq!(
            watches
                .feed(svc(watcher::Event::InitApply(service("web"))))
                .change,
            None
        );
        assert!(!watches.services.listed);
        let changes = feed_all(&mut watches, [svc(watcher::Event::InitDone)]);
        assert_eq!(changes, [Change::Replace(Listed::Services(vec![service("web")]))]);
        assert!(watches.services.listed);
    }

    #[test]
    fn a_relist_after_an_error_keeps_the_old_state_until_init_done_then_replaces_it() {
        let mut watches = Watches::default();
        let mut objects = Objects::default();
        let initial = feed_all(
            &mut watches,
            [
                svc(watcher::Event::Init),
                svc(watcher::Event::InitApply(service("web"))),
                svc(watcher::Event::InitApply(service("api"))),
                svc(watcher::Event::InitDone),
            ],
        );
        assert_eq!(services_after(&mut objects, initial), ["api", "web"]);
        let relisting = feed_all(
            &mut watches,
            [
                failed(ObjectKind::Service),
                svc(watcher::Event::Init),
                svc(watcher::Event::InitApply(service("web"))),
                svc(watcher::Event::InitApply(service("db"))),
            ],
        );
        assert!(
            relisting.is_empty(),
            "nothing changes while the relist is buffered"
        );
        assert!(watches.services.listed, "still listed, from the first list");
        let done = feed_all(&mut watches, [svc(watcher::Event::InitDone)]);
        assert_eq!(
            services_after(&mut objects, done),
            ["db", "web"],
            "api, missing from the relist, is gone"
        );
    }

    #[test]
    fn applies_and_deletes_pass_through_and_a_delete_names_the_object() {
        let mut watches = Watches::default();
        let changes = feed_all(
            &mut watches,
            [
                svc(watcher::Event::Apply(service("web"))),
                svc(watcher::Event::Delete(service("web"))),
                KubeEvent::Slice(Box::new(watcher::Event::Delete(slice("web-a")))),
                KubeEvent::Node(Box::new(watcher::Event::Delete(node("n1")))),
            ],
        );
        assert_eq!(
            changes,
            [
                Change::Apply(Object::Service(Box::new(service("web")))),
                Change::Delete(Identity::new(ObjectKind::Service, Some("shop"), Some("web"))),
                Change::Delete(Identity::new(
                    ObjectKind::EndpointSlice,
                    Some("shop"),
                    Some("web-a")
                )),
                Change::Delete(Identity::new(ObjectKind::Node, None, Some("n1"))),
            ]
        );
    }

    #[test]
    fn an_object_without_a_namespace_is_in_default() {
        let mut watches = Watches::default();
        let mut unnamespaced = service("web");
        unnamespaced.metadata.namespace = None;
        let changes = feed_all(&mut watches, [svc(watcher::Event::Delete(unnamespaced))]);
        let [Change::Delete(identity)] = &changes[..] else {
            panic!("{changes:?}");
        };
        assert_eq!(identity.namespace, "default");
    }

    #[test]
    fn listed_only_once_services_slices_and_the_node_have_all_listed() {
        let mut watches = Watches::default();
        feed_all(
            &mut watches,
            [
                svc(watcher::Event::Init),
                svc(watcher::Event::InitDone),
                KubeEvent::Slice(Box::new(watcher::Event::Init)),
                KubeEvent::Slice(Box::new(watcher::Event::InitDone)),
                KubeEvent::Node(Box::new(watcher::Event::Init)),
            ],
        );
        assert!(!watches.listed(), "the Node is still being listed");
        let node_listed = feed_all(
            &mut watches,
            [KubeEvent::Node(Box::new(watcher::Event::InitDone))],
        );
        assert_eq!(node_listed, [Change::Replace(Listed::Nodes(Vec::new()))]);
        assert!(watches.listed());
        feed_all(
            &mut watches,
            [
                failed(ObjectKind::Node),
                KubeEvent::Node(Box::new(watcher::Event::Init)),
            ],
        );
        assert!(watches.listed(), "a relist does not undo the first list");
    }

    #[test]
    fn a_failing_watch_is_reported_first_then_again_then_recovered_once() {
        let mut watches = Watches::default();
        let health = |watches: &mut Watches, event| watches.feed(event).health;
        let failure = |kind, first| {
            Some(WatchHealth::Failed {
                kind,
                error: "connection refused".to_string(),
                first,
            })
        };
        assert_eq!(
            health(&mut watches, failed(ObjectKind::Service)),
            failure(ObjectKind::Service, true)
        );
        assert_eq!(
            health(&mut watches, failed(ObjectKind::Service)),
            failure(ObjectKind::Service, false)
        );
        assert_eq!(
            health(&mut watches, failed(ObjectKind::Node)),
            failure(ObjectKind::Node, true),
            "each kind is tracked on its own"
        );
        let step = watches.feed(svc(watcher::Event::Apply(service("web"))));
        assert_eq!(step.health, Some(WatchHealth::Recovered(ObjectKind::Service)));
        assert!(step.change.is_some(), "the recovering event still counts");
        assert_eq!(health(&mut watches, svc(watcher::Event::Init)), None);
        assert_eq!(
            health(&mut watches, KubeEvent::Node(Box::new(watcher::Event::Init))),
            Some(WatchHealth::Recovered(ObjectKind::Node))
        );
    }

    #[test]
    fn a_silent_watch_is_reported_and_is_not_a_failure_to_recover_from() {
        let mut watches = Watches::default();
        let after = Duration::from_secs(90);
        let step = watches.feed(KubeEvent::Silent {
            kind: ObjectKind::EndpointSlice,
            after,
        });
        assert_eq!(
            step,
            Step {
                change: None,
                health: Some(WatchHealth::Silent {
                    kind: ObjectKind::EndpointSlice,
                    after
                }),
            }
        );
        let next = watches.feed(KubeEvent::Slice(Box::new(watcher::Event::Apply(slice("web-a")))));
        assert_eq!(next.health, None, "no recovery from what was not a failure");
    }

    #[test]
    fn retries_start_within_half_a_second_and_never_wait_more_than_one() {
        use kube::runtime::utils::Backoff as _;
        let mut backoff = retry_backoff();
        for _ in 0..3 {
            let delays: Vec<Duration> = backoff.by_ref().take(50).collect();
            assert!(delays[0] < Duration::from_millis(400), "{delays:?}");
            assert!(delays.iter().all(|d| *d <= Duration::from_secs(1)), "{delays:?}");
            backoff.reset();
        }
    }

    #[test]
    fn selector_matches_kube_proxy_unless_we_have_a_proxy_name() {
        assert_eq!(
            label_selector(None),
            "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
        );
        assert_eq!(label_selector(Some("bpf")), "!service.kubernetes.io/headless");
    }
}
