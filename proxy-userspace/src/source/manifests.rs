//! Services, EndpointSlices and Nodes from YAML or JSON files: one file or a directory tree,
//! several documents per file, `kind: List` wrappers (as `kubectl get -o yaml` prints).
//!
//! A file that stops parsing keeps contributing its last good objects, and a document that
//! stops matching its schema keeps its last good version, so an editing mistake never removes
//! a working Service from the datapath. Deleting a file or a document does remove its objects.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    time::SystemTime,
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use serde_json::Value;

use super::{ObjectKind, Snapshot};

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not valid YAML/JSON, keeping its last good objects: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{path}: document {index}: {kind} {name}: {message}")]
    Document {
        path: PathBuf,
        index: usize,
        kind: String,
        name: String,
        message: String,
    },
}

#[derive(Clone, Debug)]
enum Object {
    Service(Service),
    Slice(EndpointSlice),
    Node(Node),
}

/// Identity of a document, known even when its body does not parse.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Identity {
    kind: ObjectKind,
    namespace: String,
    name: String,
}

#[derive(Clone, Debug, Default)]
struct FileState {
    stamp: Option<(SystemTime, u64)>,
    objects: BTreeMap<Identity, Object>,
}

/// The manifests under one path, with the last good parse of each file.
#[derive(Debug)]
pub struct ManifestSet {
    root: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
}

fn is_manifest(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'));
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default();
    !hidden && matches!(ext, "yaml" | "yml" | "json")
}

/// Manifest files under `root` in name order. Hidden entries are skipped, which also skips
/// the `..data` indirection of a mounted ConfigMap while following its symlinks.
fn list_files(root: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    if root.is_file() {
        out.push(root.to_path_buf());
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = fs::read_dir(root)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    entries.sort();
    for path in entries {
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if hidden {
            continue;
        }
        if path.is_dir() {
            list_files(&path, out)?;
        } else if is_manifest(&path) {
            out.push(path);
        }
    }
    Ok(())
}

fn identity_of(doc: &Value) -> Option<Identity> {
    let kind = match doc.get("kind")?.as_str()? {
        "Service" => ObjectKind::Service,
        "EndpointSlice" => ObjectKind::EndpointSlice,
        "Node" => ObjectKind::Node,
        _ => return None,
    };
    let meta = doc.get("metadata");
    let field = |f: &str| {
        meta.and_then(|m| m.get(f))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    Some(Identity {
        kind,
        namespace: if kind == ObjectKind::Node {
            String::new()
        } else {
            field("namespace").unwrap_or_else(|| "default".into())
        },
        name: field("name").unwrap_or_default(),
    })
}

fn typed(identity: &Identity, doc: Value) -> Result<Object, serde_json::Error> {
    Ok(match identity.kind {
        ObjectKind::Service => Object::Service(serde_json::from_value(doc)?),
        ObjectKind::EndpointSlice => Object::Slice(serde_json::from_value(doc)?),
        ObjectKind::Node => Object::Node(serde_json::from_value(doc)?),
    })
}

/// Flattens `kind: List` documents into their items.
fn flatten(doc: Value, out: &mut Vec<Value>) {
    match doc {
        Value::Object(ref map) if map.get("kind").and_then(Value::as_str) == Some("List") => {
            if let Some(Value::Array(items)) = map.get("items").cloned() {
                for item in items {
                    flatten(item, out);
                }
            }
        }
        Value::Null => {}
        other => out.push(other),
    }
}

impl ManifestSet {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            files: BTreeMap::new(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Re-reads what changed on disk. Returns whether anything did, and the problems found.
    pub fn reload(&mut self) -> (bool, Vec<ManifestError>) {
        let mut errors = Vec::new();
        let mut files = Vec::new();
        if let Err(source) = list_files(&self.root, &mut files) {
            // The path vanished or is unreadable: keep everything as it was.
            errors.push(ManifestError::Read {
                path: self.root.clone(),
                source,
            });
            return (false, errors);
        }
        let mut changed = false;
        let before = self.files.len();
        self.files.retain(|path, _| files.contains(path));
        changed |= self.files.len() != before;
        for path in files {
            let stamp = fs::metadata(&path)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())));
            let state = self.files.entry(path.clone()).or_default();
            if stamp.is_some() && state.stamp == stamp {
                continue;
            }
            changed = true;
            state.stamp = stamp;
            match fs::read_to_string(&path) {
                Ok(text) => parse_file(&path, &text, state, &mut errors),
                Err(source) => errors.push(ManifestError::Read { path, source }),
            }
        }
        (changed, errors)
    }

    /// Everything currently known, last good versions included.
    pub fn snapshot(&self) -> Snapshot {
        let mut snap = Snapshot::default();
        for state in self.files.values() {
            for object in state.objects.values() {
                match object {
                    Object::Service(s) => snap.services.push(s.clone()),
                    Object::Slice(s) => snap.slices.push(s.clone()),
                    Object::Node(n) => snap.nodes.push(n.clone()),
                }
            }
        }
        snap
    }
}

fn parse_file(path: &Path, text: &str, state: &mut FileState, errors: &mut Vec<ManifestError>) {
    let docs: Vec<Value> = match serde_saphyr::from_multiple::<Value>(text) {
        Ok(docs) => docs,
        Err(e) => {
            errors.push(ManifestError::Syntax {
                path: path.to_path_buf(),
                message: e.to_string(),
            });
            return;
        }
    };
    let mut flat = Vec::new();
    for doc in docs {
        flatten(doc, &mut flat);
    }
    let mut objects = BTreeMap::new();
    for (index, doc) in flat.into_iter().enumerate() {
        let Some(identity) = identity_of(&doc) else {
            // Other kinds (Deployments, ConfigMaps...) may share the file; they are not ours.
            continue;
        };
        match typed(&identity, doc) {
            Ok(object) => {
                objects.insert(identity, object);
            }
            Err(e) => {
                errors.push(ManifestError::Document {
                    path: path.to_path_buf(),
                    index,
                    kind: identity.kind.to_string(),
                    name: format!("{}/{}", identity.namespace, identity.name),
                    message: format!("{e}; keeping its last good version"),
                });
                if let Some(previous) = state.objects.get(&identity) {
                    objects.insert(identity, previous.clone());
                }
            }
        }
    }
    state.objects = objects;
}
