//! A small, protocol-faithful stand-in for kube-apiserver, for the agent's real kube-rs code
//! path (no real API server can be installed here).
//!
//! It serves Services, EndpointSlices and Nodes the way the API server does:
//! - list: `resourceVersion` in list metadata, label and field selectors, `limit` with
//!   `continue` tokens served from a consistent snapshot, items without kind/apiVersion;
//! - watch: from a resourceVersion, replaying history then streaming new changes, objects that
//!   stop (start) matching the selector arriving as DELETED (ADDED), BOOKMARK events when asked,
//!   `timeoutSeconds`, and an ERROR event with a 410 Expired Status when the resourceVersion
//!   is older than the compacted history;
//! - outages: `stop` closes the listener and every open connection, `restart` comes back on the
//!   same port with the same store, as a restarted API server backed by etcd would: its watch
//!   cache starts at the current resourceVersion (older watches get 410), and its authorizer
//!   answers 403 Forbidden for a warm-up period (`set_warmup`) before it has synced its RBAC;
//! - half-dead connections: `silence_watches` makes every open watch send nothing more (no
//!   events, no bookmarks) while its connection stays open; watches opened after it work.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use serde_json::{Value, json};
use tokio::{
    runtime::Handle,
    sync::{broadcast, watch},
    task::JoinSet,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    fn from_object(obj: &Value) -> Option<Self> {
        match obj["kind"].as_str()? {
            "Service" => Some(Self::Service),
            "EndpointSlice" => Some(Self::EndpointSlice),
            "Node" => Some(Self::Node),
            _ => None,
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Self::Service => "Service",
            Self::EndpointSlice => "EndpointSlice",
            Self::Node => "Node",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Self::Service | Self::Node => "v1",
            Self::EndpointSlice => "discovery.k8s.io/v1",
        }
    }
}

/// One change in the store's history.
#[derive(Debug)]
struct Change {
    rv: u64,
    kind: Kind,
    old: Option<Value>,
    new: Option<Value>,
}

type Key = (Kind, String, String);

#[derive(Default)]
struct Store {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    history: Vec<Arc<Change>>,
    /// Watches must start at or after this resourceVersion; older ones get 410 Gone.
    compacted: u64,
    /// Snapshots behind `continue` tokens: resourceVersion, items, where the next page starts
    /// (shared, so that paging through N items costs O(N), as the real watch cache does).
    pages: HashMap<u64, (u64, Arc<Vec<Value>>, usize)>,
    next_page: u64,
    uid: u64,
    requests: Vec<String>,
    bookmark_every: Duration,
    /// How long after `restart` every request is forbidden.
    warmup: Duration,
    forbidden_until: Option<Instant>,
}

struct Shared {
    store: Mutex<Store>,
    changes: broadcast::Sender<Arc<Change>>,
    /// Bumped to end every open watch.
    disconnect: watch::Sender<u64>,
    /// Bumped to make every open watch go silent.
    silence: watch::Sender<u64>,
}

pub struct ApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    handle: Handle,
    server: Option<tokio::task::JoinHandle<()>>,
}

fn key_of(kind: Kind, obj: &Value) -> Key {
    let meta = &obj["metadata"];
    let ns = if kind == Kind::Node {
        String::new()
    } else {
        meta["namespace"].as_str().unwrap_or("default").to_string()
    };
    (kind, ns, meta["name"].as_str().unwrap_or_default().to_string())
}

/// Label selector: comma-separated `k`, `!k`, `k=v`, `k==v`, `k!=v`.
fn labels_match(selector: &str, obj: &Value) -> bool {
    let labels = &obj["metadata"]["labels"];
    selector
        .split(',')
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .all(|req| {
            if let Some((k, v)) = req.split_once("!=") {
                labels[k.trim()].as_str() != Some(v.trim())
            } else if let Some((k, v)) = req.split_once("==").or_else(|| req.split_once('=')) {
                labels[k.trim()].as_str() == Some(v.trim())
            } else if let Some(k) = req.strip_prefix('!') {
                labels.get(k.trim()).is_none()
            } else {
                labels.get(req).is_some()
            }
        })
}

/// Field selector: `metadata.name=x`, `metadata.namespace=y`.
fn fields_match(selector: &str, obj: &Value) -> bool {
    selector
        .split(',')
        .filter(|r| !r.is_empty())
        .all(|req| match req.split_once('=') {
            Some(("metadata.name", v)) => obj["metadata"]["name"].as_str() == Some(v),
            Some(("metadata.namespace", v)) => obj["metadata"]["namespace"].as_str() == Some(v),
            _ => true,
        })
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Params {
    watch: Option<String>,
    label_selector: Option<String>,
    field_selector: Option<String>,
    resource_version: Option<String>,
    limit: Option<usize>,
    #[serde(rename = "continue")]
    continue_token: Option<String>,
    allow_watch_bookmarks: Option<bool>,
    timeout_seconds: Option<u64>,
}

impl Params {
    fn matches(&self, obj: &Value) -> bool {
        self.label_selector
            .as_deref()
            .is_none_or(|s| labels_match(s, obj))
            && self
                .field_selector
                .as_deref()
                .is_none_or(|s| fields_match(s, obj))
    }
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn with_type(kind: Kind, mut obj: Value) -> Value {
    obj["kind"] = json!(kind.kind());
    obj["apiVersion"] = json!(kind.api_version());
    obj
}

fn without_type(mut obj: Value) -> Value {
    if let Some(map) = obj.as_object_mut() {
        map.remove("kind");
        map.remove("apiVersion");
    }
    obj
}

fn list(shared: &Shared, kind: Kind, params: &Params) -> Response {
    let mut store = shared.store.lock().unwrap();
    let (rv, items, start) = match params
        .continue_token
        .as_deref()
        .and_then(|t| t.parse::<u64>().ok())
    {
        Some(token) => match store.pages.remove(&token) {
            Some(page) => page,
            None => {
                let body = status(410, "Expired", "the provided continue parameter is too old");
                return (StatusCode::GONE, axum::Json(body)).into_response();
            }
        },
        None => {
            let items: Vec<Value> = store
                .objects
                .iter()
                .filter(|((k, _, _), obj)| *k == kind && params.matches(obj))
                .map(|(_, obj)| without_type(obj.clone()))
                .collect();
            (store.rv, Arc::new(items), 0)
        }
    };
    let limit = params.limit.filter(|l| *l > 0).unwrap_or(usize::MAX);
    let end = start.saturating_add(limit).min(items.len());
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if end < items.len() {
        let token = store.next_page;
        store.next_page += 1;
        metadata["continue"] = json!(token.to_string());
        metadata["remainingItemCount"] = json!(items.len() - end);
        store.pages.insert(token, (rv, items.clone(), end));
    }
    drop(store);
    #[derive(serde::Serialize)]
    struct List<'a> {
        kind: String,
        #[serde(rename = "apiVersion")]
        api_version: &'static str,
        metadata: Value,
        items: &'a [Value],
    }
    let body = List {
        kind: format!("{}List", kind.kind()),
        api_version: kind.api_version(),
        metadata,
        items: &items[start..end],
    };
    axum::Json(body).into_response()
}

/// What a watcher with `params` sees of `change`, as a watch event.
fn event_for(change: &Change, params: &Params) -> Option<Value> {
    let was = change.old.as_ref().is_some_and(|o| params.matches(o));
    let is = change.new.as_ref().is_some_and(|n| params.matches(n));
    let (kind, obj) = match (was, is, &change.new) {
        (false, true, Some(new)) => ("ADDED", new),
        (true, true, Some(new)) => ("MODIFIED", new),
        (true, false, Some(new)) => ("DELETED", new),
        (true, _, None) => ("DELETED", change.old.as_ref()?),
        _ => return None,
    };
    Some(json!({"type": kind, "object": with_type(change.kind, obj.clone())}))
}

#[expect(clippy::unnecessary_wraps, reason = "the watch body is a stream of Results")]
fn line(event: &Value) -> Result<Bytes, std::io::Error> {
    let mut text = event.to_string();
    text.push('\n');
    Ok(Bytes::from(text))
}

fn watch_stream(shared: Arc<Shared>, kind: Kind, params: Params) -> Response {
    let from: u64 = params
        .resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let (replay, mut live, current, every) = {
        let store = shared.store.lock().unwrap();
        if from != 0 && from < store.compacted {
            let message = format!("too old resource version: {from} ({})", store.compacted);
            let event = json!({"type": "ERROR", "object": status(410, "Expired", &message)});
            return Response::new(Body::from(line(&event).unwrap_or_default()));
        }
        let replay: Vec<Arc<Change>> = store
            .history
            .iter()
            .filter(|c| c.rv > from && c.kind == kind)
            .cloned()
            .collect();
        (replay, shared.changes.subscribe(), store.rv, store.bookmark_every)
    };
    let mut disconnect = shared.disconnect.subscribe();
    disconnect.mark_unchanged();
    let mut silence = shared.silence.subscribe();
    silence.mark_unchanged();
    let timeout = Duration::from_secs(params.timeout_seconds.unwrap_or(1800));
    let bookmarks = params.allow_watch_bookmarks.unwrap_or(false);
    let stream = async_stream::stream! {
        // Everything up to `current` is in `replay`; the live feed may repeat some of it.
        for change in replay {
            if let Some(event) = event_for(&change, &params) {
                yield line(&event);
            }
        }
        let mut last = current;
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            // Biased, silence first: a change applied right after `silence_watches` must not
            // win a random draw against it.
            tokio::select! {
                biased;
                _ = silence.changed() => {
                    // Half-dead: the connection stays open, nothing more is sent, not even the
                    // close at `timeoutSeconds`.
                    let _ = disconnect.changed().await;
                    break;
                }
                received = live.recv() => match received {
                    Ok(change) if change.rv <= last || change.kind != kind => {}
                    Ok(change) => {
                        last = change.rv;
                        if let Some(event) = event_for(&change, &params) {
                            yield line(&event);
                        }
                    }
                    // Lagged or closed: end the watch; the client resumes from its last RV.
                    Err(_) => break,
                },
                _ = tick.tick(), if bookmarks => {
                    let rv = shared.store.lock().unwrap().rv.max(last);
                    let event = json!({"type": "BOOKMARK", "object": {"kind": kind.kind(),
                        "apiVersion": kind.api_version(), "metadata": {"resourceVersion": rv.to_string()}}});
                    yield line(&event);
                }
                _ = disconnect.changed() => break,
                () = &mut deadline => break,
            }
        }
    };
    Response::new(Body::from_stream(stream))
}

#[expect(clippy::unused_async, reason = "axum handlers are async")]
async fn handle(State(shared): State<Arc<Shared>>, kind: Kind, Query(params): Query<Params>) -> Response {
    let watching = matches!(params.watch.as_deref(), Some("true" | "1"));
    let forbidden = {
        let mut store = shared.store.lock().unwrap();
        store.requests.push(format!(
            "{} {} rv={}{}",
            if watching { "WATCH" } else { "LIST" },
            kind.kind(),
            params.resource_version.as_deref().unwrap_or(""),
            if params.allow_watch_bookmarks == Some(true) {
                " bookmarks"
            } else {
                ""
            },
        ));
        store.forbidden_until.is_some_and(|until| Instant::now() < until)
    };
    if forbidden {
        let resource = format!("{}s", kind.kind().to_lowercase());
        let group = kind.api_version().rsplit_once('/').map_or("", |(group, _)| group);
        let message = format!(
            "{resource} is forbidden: User \"system:serviceaccount:kube-system:bpf-kube-proxy\" \
             cannot {} resource \"{resource}\" in API group \"{group}\" at the cluster scope",
            if watching { "watch" } else { "list" },
        );
        return (
            StatusCode::FORBIDDEN,
            axum::Json(status(403, "Forbidden", &message)),
        )
            .into_response();
    }
    if watching {
        watch_stream(shared, kind, params)
    } else {
        list(&shared, kind, &params)
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/api/v1/services", get(|s, q| handle(s, Kind::Service, q)))
        .route(
            "/apis/discovery.k8s.io/v1/endpointslices",
            get(|s, q| handle(s, Kind::EndpointSlice, q)),
        )
        .route("/api/v1/nodes", get(|s, q| handle(s, Kind::Node, q)))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                axum::Json(status(404, "NotFound", "not served here")),
            )
        })
        .with_state(shared)
}

/// Accepts connections until aborted; aborting it also aborts every connection it serves.
async fn serve(listener: tokio::net::TcpListener, app: Router) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        connections.spawn(async move {
            let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
        while connections.try_join_next().is_some() {}
    }
}

impl ApiServer {
    /// Starts on 127.0.0.1 with a free port, on the given runtime.
    pub fn start(handle: &Handle) -> Self {
        let (changes, _) = broadcast::channel(65_536);
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::default()),
            changes,
            disconnect: watch::channel(0).0,
            silence: watch::channel(0).0,
        });
        shared.store.lock().unwrap().bookmark_every = Duration::from_secs(1);
        let listener = handle
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("binding the test API server");
        let addr = listener.local_addr().expect("local addr");
        let server = handle.spawn(serve(listener, router(shared.clone())));
        Self {
            shared,
            addr,
            handle: handle.clone(),
            server: Some(server),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig pointing at this server.
    pub fn write_kubeconfig(&self, path: &Path) {
        let config = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster: {{server: \"{}\"}}\n\
             users:\n- name: test\n  user: {{}}\ncontexts:\n- name: test\n  context: {{cluster: test, user: test}}\n\
             current-context: test\n",
            self.url()
        );
        std::fs::write(path, config).expect("writing kubeconfig");
    }

    /// Creates or replaces an object (its `kind` says which), as `kubectl apply` would.
    pub fn apply(&self, obj: Value) {
        let kind = Kind::from_object(&obj).unwrap_or_else(|| panic!("unsupported object {obj}"));
        let key = key_of(kind, &obj);
        let mut store = self.shared.store.lock().unwrap();
        store.rv += 1;
        let rv = store.rv;
        let old = store.objects.get(&key).cloned();
        let mut new = without_type(obj);
        let meta = &mut new["metadata"];
        meta["resourceVersion"] = json!(rv.to_string());
        if kind != Kind::Node && meta["namespace"].is_null() {
            meta["namespace"] = json!("default");
        }
        meta["uid"] = match &old {
            Some(o) => o["metadata"]["uid"].clone(),
            None => {
                store.uid += 1;
                json!(format!("00000000-0000-0000-0000-{:012}", store.uid))
            }
        };
        store.objects.insert(key, new.clone());
        self.record(&mut store, kind, old, Some(new));
    }

    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        let mut store = self.shared.store.lock().unwrap();
        let key = (
            kind,
            if kind == Kind::Node {
                String::new()
            } else {
                namespace.to_string()
            },
            name.to_string(),
        );
        let Some(mut old) = store.objects.remove(&key) else {
            return;
        };
        store.rv += 1;
        old["metadata"]["resourceVersion"] = json!(store.rv.to_string());
        self.record(&mut store, kind, Some(old), None);
    }

    fn record(&self, store: &mut Store, kind: Kind, old: Option<Value>, new: Option<Value>) {
        let change = Arc::new(Change {
            rv: store.rv,
            kind,
            old,
            new,
        });
        store.history.push(change.clone());
        let _ = self.shared.changes.send(change);
    }

    /// Forgets history, as etcd compaction does: watches resuming from before now get 410.
    pub fn compact(&self) {
        let mut store = self.shared.store.lock().unwrap();
        store.compacted = store.rv + 1;
        store.history.clear();
    }

    /// Ends every open watch (the client reconnects and resumes, or relists on 410).
    pub fn disconnect_watches(&self) {
        self.shared.disconnect.send_modify(|g| *g += 1);
    }

    /// Goes away: no listener, every connection closed.
    pub fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
            let _ = self.handle.block_on(server);
        }
        self.disconnect_watches();
    }

    /// BOOKMARK events on each watch that asks for them this often (a real API server: about
    /// once a minute), for watches opened from now on.
    pub fn set_bookmark_interval(&self, every: Duration) {
        self.shared.store.lock().unwrap().bookmark_every = every;
    }

    /// How long each `restart` answers every request with 403 Forbidden.
    pub fn set_warmup(&self, warmup: Duration) {
        self.shared.store.lock().unwrap().warmup = warmup;
    }

    /// When the last `restart`'s warm-up ends (now, if there was none).
    pub fn ready_at(&self) -> Instant {
        let store = self.shared.store.lock().unwrap();
        store.forbidden_until.unwrap_or_else(Instant::now)
    }

    /// Every watch open now goes silent with its connection held open, as behind a dead NAT
    /// entry or a hung proxy: no events, no bookmarks, no close.
    pub fn silence_watches(&self) {
        self.shared.silence.send_modify(|g| *g += 1);
    }

    /// Comes back on the same address with the same store, a fresh watch cache (starting at
    /// the current resourceVersion) and the authorizer warming up (see `set_warmup`).
    pub fn restart(&mut self) {
        self.stop();
        {
            let mut store = self.shared.store.lock().unwrap();
            store.compacted = store.rv;
            store.history.clear();
            store.forbidden_until = Some(Instant::now() + store.warmup);
        }
        let listener = self
            .handle
            .block_on(tokio::net::TcpListener::bind(self.addr))
            .expect("rebinding the test API server");
        self.server = Some(self.handle.spawn(serve(listener, router(self.shared.clone()))));
    }

    /// Requests seen so far, e.g. `LIST Service rv=0`, `WATCH Service rv=12 bookmarks` (the
    /// watch asked for bookmarks).
    pub fn requests(&self) -> Vec<String> {
        self.shared.store.lock().unwrap().requests.clone()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

/// Turns a YAML manifest (one document) into the JSON object `apply` takes.
pub fn from_yaml(yaml: &str) -> Value {
    serde_saphyr::from_str(yaml).expect("test manifest parses")
}
