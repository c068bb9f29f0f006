//! Services, EndpointSlices and Nodes from YAML or JSON files: one file or a directory tree,
//! several documents per file, `kind: List` wrappers (as `kubectl get -o yaml` prints).
//!
//! A document that does not parse is skipped, named by the line it starts on, and the file's
//! other documents are read; until it parses again nothing the file defined is removed (the
//! broken document may be any of them). A document that stops matching its schema keeps its
//! last good version. So an editing mistake never removes a working Service from the
//! datapath; deleting a file or a document does remove its objects.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    time::SystemTime,
};

use serde_json::Value;

use super::{Change, Identity, Object, ObjectKind, Objects, Snapshot};

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error(
        "{path}: document at line {line}: not valid YAML/JSON, skipped; nothing the file \
         defined is removed until it parses: {message}"
    )]
    Syntax {
        path: PathBuf,
        line: u64,
        message: String,
    },
    #[error("{path}: document at line {line}: {kind} {name}: {message}")]
    Document {
        path: PathBuf,
        line: u64,
        kind: String,
        name: String,
        message: String,
    },
}

impl ManifestError {
    /// The kind of object found invalid, as `bpf_kube_proxy_invalid_objects{kind}` counts it
    /// (`document` for one that does not parse); `None` for a file that could not be read.
    pub(crate) fn invalid_kind(&self) -> Option<&str> {
        match self {
            Self::Read { .. } => None,
            Self::Syntax { .. } => Some("document"),
            Self::Document { kind, .. } => Some(kind),
        }
    }
}

/// The objects of a file are not kept: the agent's inventory holds what it needs of them, and
/// holding both would double its memory. The identities tell which ones a file stopped defining.
#[derive(Clone, Debug, Default)]
struct FileState {
    stamp: Option<(SystemTime, u64)>,
    identities: BTreeSet<Identity>,
}

/// The manifests under one path: which objects each file defines.
#[derive(Debug)]
pub(crate) struct ManifestSet {
    root: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
}

fn is_manifest(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'));
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or_default();
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
    let field = |f: &str| meta.and_then(|m| m.get(f)).and_then(Value::as_str);
    Some(Identity::new(kind, field("namespace"), field("name")))
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

    /// Re-reads what changed on disk and hands `sink` every object that changed or went away,
    /// as it is read. Returns the problems found.
    pub(crate) fn reload(&mut self, mut sink: impl FnMut(Change)) -> Vec<ManifestError> {
        let mut errors = Vec::new();
        let mut files = Vec::new();
        if let Err(source) = list_files(&self.root, &mut files) {
            // The path vanished or is unreadable: keep everything as it was.
            errors.push(ManifestError::Read {
                path: self.root.clone(),
                source,
            });
            return errors;
        }
        let listed: BTreeSet<&PathBuf> = files.iter().collect();
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !listed.contains(p))
            .cloned()
            .collect();
        let mut dropped = Vec::new();
        for path in gone {
            dropped.extend(self.files.remove(&path).unwrap_or_default().identities);
        }
        for path in files {
            let stamp = fs::metadata(&path)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())));
            let state = self.files.entry(path.clone()).or_default();
            if stamp.is_some() && state.stamp == stamp {
                continue;
            }
            state.stamp = stamp;
            // Read as a stream: the text of a whole cluster's manifests is never held at once.
            match fs::File::open(&path) {
                Ok(file) => {
                    let before = std::mem::take(&mut state.identities);
                    let mut reader = BufReader::new(file);
                    state.identities = parse_file(&path, &mut reader, &before, &mut sink, &mut errors);
                    dropped.extend(before.difference(&state.identities).cloned());
                }
                Err(source) => errors.push(ManifestError::Read { path, source }),
            }
        }
        self.remove_dropped(dropped, &mut sink);
        errors
    }

    /// An object one file stopped defining is gone unless another file still defines it; then
    /// that file is read again, so its version is the one that stays.
    fn remove_dropped(&self, dropped: Vec<Identity>, sink: &mut impl FnMut(Change)) {
        let mut reread = BTreeSet::new();
        for identity in dropped {
            match self
                .files
                .iter()
                .find(|(_, state)| state.identities.contains(&identity))
            {
                Some((path, _)) => {
                    reread.insert(path);
                }
                None => sink(Change::Delete(identity)),
            }
        }
        for path in reread {
            if let Ok(file) = fs::File::open(path) {
                // Unchanged since its last read: the same documents, the same problems.
                let identities = &self.files[path].identities;
                parse_file(path, &mut BufReader::new(file), identities, sink, &mut Vec::new());
            }
        }
    }
}

/// Reads every manifest under `path` once (for tools).
pub fn read_once(path: &Path) -> (Snapshot, Vec<ManifestError>) {
    let mut objects = Objects::default();
    let errors = ManifestSet::new(path).reload(|change| objects.apply(change));
    (objects.snapshot(), errors)
}

/// The parser's resource limits for one document, raised from its defaults (250 000 nodes),
/// which guard against hostile input: one `kind: List` may hold a whole cluster's Services and
/// EndpointSlices (10 000 of each is about 2 million nodes).
fn parse_options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::budget::Budget::default();
    budget.max_nodes = 50_000_000;
    budget.max_events = 200_000_000;
    budget.max_total_scalar_bytes = 4 << 30;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options
}

/// One YAML document's text, and where it sits in its file.
struct DocumentText {
    /// The file's line number of the text's first line (blank and comment lines included).
    first_line: u64,
    /// The line the document starts on: its `---`, else its first line of content.
    start: Option<u64>,
    text: Vec<u8>,
}

impl DocumentText {
    fn at(first_line: u64) -> Self {
        Self {
            first_line,
            start: None,
            text: Vec::new(),
        }
    }
}

/// Whether `line` is a YAML document marker (`---` or `...`, alone or followed by a space).
fn is_marker(line: &[u8], marker: &[u8]) -> bool {
    line.strip_prefix(marker)
        .is_some_and(|rest| rest.first().is_none_or(u8::is_ascii_whitespace))
}

/// Cuts a YAML stream into its documents at their markers and hands each one with content to
/// `each`, so that one that does not parse cannot hide the ones after it. YAML forbids a
/// marker at the start of a line inside any scalar or collection, so this cuts where the
/// parser would; comments and directives before a `---` stay with its document. One
/// document's text is held at a time.
fn split_documents(reader: &mut impl BufRead, mut each: impl FnMut(DocumentText)) -> std::io::Result<()> {
    let mut doc = DocumentText::at(1);
    let mut line = Vec::new();
    let mut number = 0;
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        number += 1;
        let starts = is_marker(&line, b"---");
        let ends = is_marker(&line, b"...");
        if starts && doc.start.is_some() {
            each(std::mem::replace(&mut doc, DocumentText::at(number)));
        }
        let trimmed = line.trim_ascii_start();
        let content =
            starts || !(ends || trimmed.is_empty() || trimmed.starts_with(b"#") || line.starts_with(b"%"));
        if content && doc.start.is_none() {
            doc.start = Some(number);
        }
        doc.text.extend_from_slice(&line);
        if ends {
            let done = std::mem::replace(&mut doc, DocumentText::at(number + 1));
            if done.start.is_some() {
                each(done);
            }
        }
    }
    if doc.start.is_some() {
        each(doc);
    }
    Ok(())
}

/// Parses one file's documents one at a time, handing each valid object to `sink` as it goes,
/// so that a file of 20 000 Services and slices is never held parsed all at once. Returns the
/// identities the file now defines: a document that stops matching its schema keeps its
/// identity (its last good version stays in the sink), and while any document does not parse
/// or the file cannot be read to its end, every identity it had before (`before`) stays, since
/// the unreadable part may define any of them.
pub(crate) fn parse_file(
    path: &Path,
    reader: &mut impl BufRead,
    before: &BTreeSet<Identity>,
    sink: &mut impl FnMut(Change),
    errors: &mut Vec<ManifestError>,
) -> BTreeSet<Identity> {
    let mut identities = BTreeSet::new();
    let mut unreadable = false;
    let read = split_documents(reader, |doc| {
        let line = doc.start.unwrap_or(doc.first_line);
        for parsed in serde_saphyr::read_with_options::<_, Value>(&mut doc.text.as_slice(), parse_options()) {
            let value = match parsed {
                Ok(value) => value,
                // Any document parses as a Value, so this is a syntax or budget error.
                Err(e) => {
                    unreadable = true;
                    let line_offset = doc.first_line - 1;
                    errors.push(ManifestError::Syntax {
                        path: path.to_path_buf(),
                        line,
                        message: e
                            .render_with_options(serde_saphyr::render_options! { line_offset: line_offset }),
                    });
                    continue;
                }
            };
            let mut flat = Vec::new();
            flatten(value, &mut flat);
            for item in flat {
                let Some(identity) = identity_of(&item) else {
                    // Other kinds (Deployments, ConfigMaps...) may share the file; they are not ours.
                    continue;
                };
                match typed(&identity, item) {
                    Ok(object) => {
                        sink(Change::Apply(object));
                        identities.insert(identity);
                    }
                    Err(e) => {
                        errors.push(ManifestError::Document {
                            path: path.to_path_buf(),
                            line,
                            kind: identity.kind.to_string(),
                            name: format!("{}/{}", identity.namespace, identity.name),
                            message: format!("{e}; keeping its last good version"),
                        });
                        if before.contains(&identity) {
                            identities.insert(identity);
                        }
                    }
                }
            }
        }
    });
    if let Err(source) = read {
        unreadable = true;
        errors.push(ManifestError::Read {
            path: path.to_path_buf(),
            source,
        });
    }
    if unreadable {
        identities.extend(before.iter().cloned());
    }
    identities
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEB: &str = "
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-a, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: [{addresses: [10.0.0.1]}]
";

    fn names(snap: &Snapshot) -> Vec<String> {
        let mut out: Vec<String> = snap
            .services
            .iter()
            .map(|s| format!("svc:{}", s.metadata.name.clone().unwrap_or_default()))
            .chain(
                snap.slices
                    .iter()
                    .map(|s| format!("slice:{}", s.metadata.name.clone().unwrap_or_default())),
            )
            .chain(
                snap.nodes
                    .iter()
                    .map(|n| format!("node:{}", n.metadata.name.clone().unwrap_or_default())),
            )
            .collect();
        out.sort();
        out
    }

    /// A set and the objects its reloads produced, as the agent's inventory would hold them.
    struct Watched {
        set: ManifestSet,
        objects: Objects,
    }

    impl Watched {
        fn new(root: &Path) -> Self {
            Self {
                set: ManifestSet::new(root),
                objects: Objects::default(),
            }
        }

        /// Whether any object changed or went away, and the problems found.
        fn reload(&mut self) -> (bool, Vec<ManifestError>) {
            let mut changes = 0;
            let errors = self.set.reload(|change| {
                changes += 1;
                self.objects.apply(change);
            });
            (changes > 0, errors)
        }

        fn snapshot(&self) -> Snapshot {
            self.objects.snapshot()
        }
    }

    /// `WEB` as the one file of a directory, read once: the directory, the file and the set.
    fn web_read_once() -> (tempfile::TempDir, PathBuf, Watched) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("web.yaml");
        fs::write(&file, WEB).unwrap();
        let mut set = Watched::new(dir.path());
        set.reload();
        (dir, file, set)
    }

    /// The first port of the first Service.
    fn first_port(snap: &Snapshot) -> i32 {
        snap.services[0].spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port
    }

    /// Rewrites a file so its (mtime, size) stamp surely changes.
    fn rewrite(path: &Path, text: &str) {
        fs::write(path, text).unwrap();
        let later = SystemTime::now() + std::time::Duration::from_secs(5);
        fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(later)
            .unwrap();
    }

    #[test]
    fn multi_document_files_lists_and_json_are_read_and_other_kinds_ignored() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("web.yaml"), WEB).unwrap();
        fs::write(
            dir.path().join("list.yml"),
            "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Node, metadata: {name: n1, labels: {topology.kubernetes.io/zone: z1}}}\n",
        )
        .unwrap();
        fs::write(
            dir.path().join("api.json"),
            r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "api"}, "spec": {"clusterIP": "10.96.0.11", "ports": [{"port": 81}]}}"#,
        )
        .unwrap();
        fs::write(dir.path().join("README.md"), "not a manifest").unwrap();
        fs::write(
            dir.path().join(".hidden.yaml"),
            "kind: Service\nmetadata: {name: hidden}",
        )
        .unwrap();
        let mut set = Watched::new(dir.path());
        let (changed, errors) = set.reload();
        assert!(changed && errors.is_empty(), "{errors:?}");
        assert_eq!(
            names(&set.snapshot()),
            ["node:n1", "slice:web-a", "svc:api", "svc:web"]
        );
        assert!(!set.reload().0, "nothing changed on disk");
    }

    #[test]
    fn one_file_may_hold_a_whole_clusters_services_and_slices() {
        let dir = tempfile::tempdir().unwrap();
        let mut text = String::new();
        for i in 0..3_000 {
            text.push_str(&format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: ns}}\nspec: {{clusterIP: 10.96.{}.{}, ports: [{{port: 80}}]}}\n---\n",
                i / 250,
                i % 250 + 1
            ));
        }
        fs::write(dir.path().join("all.yaml"), text).unwrap();
        let mut set = Watched::new(dir.path());
        let (_, errors) = set.reload();
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(set.snapshot().services.len(), 3_000);
    }

    #[test]
    fn a_file_that_stops_parsing_keeps_its_last_good_objects() {
        let (_dir, file, mut set) = web_read_once();
        rewrite(&file, "kind: Service\nmetadata: {name: [unclosed\n");
        let (_, errors) = set.reload();
        assert!(
            matches!(&errors[..], [ManifestError::Syntax { .. }]),
            "{errors:?}"
        );
        assert_eq!(names(&set.snapshot()), ["slice:web-a", "svc:web"]);
    }

    /// Three Services, the middle one broken: its document starts at line 6 (the `---`).
    const MIDDLE_BROKEN: &str = "\
apiVersion: v1
kind: Service
metadata: {name: first, namespace: shop}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}
# the next document does not parse
---
apiVersion: v1
kind: Service
metadata: {name: [unclosed
---
apiVersion: v1
kind: Service
metadata: {name: third, namespace: shop}
spec: {clusterIP: 10.96.0.12, ports: [{port: 80}]}
";

    #[test]
    fn a_document_that_does_not_parse_is_skipped_by_its_line_and_the_rest_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("shop.yaml");
        fs::write(&file, MIDDLE_BROKEN).unwrap();
        let (snap, errors) = read_once(dir.path());
        assert_eq!(names(&snap), ["svc:first", "svc:third"]);
        assert_eq!(errors.len(), 1, "{errors:?}");
        let message = errors[0].to_string();
        assert!(
            message.starts_with(&format!("{}: document at line 6: ", file.display())),
            "{message}"
        );
    }

    #[test]
    fn breaking_one_document_keeps_its_last_good_version_and_updates_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("shop.yaml");
        let good = MIDDLE_BROKEN.replace(
            "{name: [unclosed",
            "{name: second, namespace: shop}\nspec: {clusterIP: 10.96.0.11, ports: [{port: 80}]}",
        );
        fs::write(&file, &good).unwrap();
        let mut set = Watched::new(dir.path());
        set.reload();
        assert_eq!(names(&set.snapshot()), ["svc:first", "svc:second", "svc:third"]);
        rewrite(&file, &MIDDLE_BROKEN.replace("10.96.0.12", "10.96.0.13"));
        let (_, errors) = set.reload();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].to_string().contains("document at line 6"),
            "{}",
            errors[0]
        );
        let snap = set.snapshot();
        assert_eq!(
            names(&snap),
            ["svc:first", "svc:second", "svc:third"],
            "nothing is removed"
        );
        let third = snap
            .services
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some("third"))
            .unwrap();
        assert_eq!(
            third.spec.as_ref().unwrap().cluster_ip.as_deref(),
            Some("10.96.0.13"),
            "the document after the broken one is read"
        );
    }

    #[test]
    fn a_file_cut_short_applies_the_documents_before_the_error_and_removes_nothing() {
        let (_dir, file, mut set) = web_read_once();
        // A save caught halfway: the Service is complete and changed, the rest is cut off.
        let cut = WEB.replace("port: 80", "port: 81");
        let cut = &cut[..cut.find("kind: EndpointSlice").unwrap()];
        rewrite(&file, &format!("{cut}metadata: {{name: [unclosed\n"));
        let (_, errors) = set.reload();
        assert!(
            matches!(&errors[..], [ManifestError::Syntax { .. }]),
            "{errors:?}"
        );
        let snap = set.snapshot();
        assert_eq!(names(&snap), ["slice:web-a", "svc:web"]);
        assert_eq!(first_port(&snap), 81);
    }

    #[test]
    fn an_object_two_files_define_keeps_the_remaining_files_version() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("web.yaml"), WEB).unwrap();
        let other = dir.path().join("a-copy.yaml");
        fs::write(&other, WEB.replace("port: 80", "port: 81")).unwrap();
        let mut set = Watched::new(dir.path());
        set.reload();
        assert_eq!(
            first_port(&set.snapshot()),
            80,
            "files are read in name order, the last one wins"
        );
        fs::remove_file(dir.path().join("web.yaml")).unwrap();
        set.reload();
        assert_eq!(names(&set.snapshot()), ["slice:web-a", "svc:web"]);
        assert_eq!(first_port(&set.snapshot()), 81, "the copy left defines it now");
        fs::remove_file(&other).unwrap();
        set.reload();
        assert!(names(&set.snapshot()).is_empty());
    }

    #[test]
    fn a_document_that_stops_matching_its_schema_keeps_its_last_good_version() {
        let (_dir, file, mut set) = web_read_once();
        let broken = WEB
            .replace("ports: [{port: 80}]", "ports: [{port: eighty}]")
            .replace(
                "endpoints: [{addresses: [10.0.0.1]}]",
                "endpoints: [{addresses: [10.0.0.1]}, {addresses: [10.0.0.2]}]",
            );
        rewrite(&file, &broken);
        let (_, errors) = set.reload();
        assert_eq!(errors.len(), 1, "{errors:?}");
        let message = errors[0].to_string();
        assert!(
            message.contains("document at line 2: Service shop/web"),
            "{message}"
        );
        let snap = set.snapshot();
        assert_eq!(first_port(&snap), 80);
        assert_eq!(
            snap.slices[0].endpoints.len(),
            2,
            "the valid document in the same file is updated"
        );
    }

    #[test]
    fn deleting_a_file_or_document_removes_its_objects() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("web.yaml");
        fs::write(&file, WEB).unwrap();
        fs::write(
            dir.path().join("other.yaml"),
            WEB.replace("name: web,", "name: other,"),
        )
        .unwrap();
        let mut set = Watched::new(dir.path());
        set.reload();
        let without_slice = WEB.split("---").take(2).collect::<Vec<_>>().join("---");
        rewrite(&file, &without_slice);
        fs::remove_file(dir.path().join("other.yaml")).unwrap();
        assert!(set.reload().0);
        assert_eq!(names(&set.snapshot()), ["svc:web"]);
    }

    #[test]
    fn a_missing_path_is_an_error_that_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("m");
        fs::create_dir(&sub).unwrap();
        fs::write(sub.join("web.yaml"), WEB).unwrap();
        let mut set = Watched::new(&sub);
        set.reload();
        fs::remove_dir_all(&sub).unwrap();
        let (changed, errors) = set.reload();
        assert!(!changed && matches!(&errors[..], [ManifestError::Read { .. }]));
        assert_eq!(names(&set.snapshot()), ["slice:web-a", "svc:web"]);
    }
}
