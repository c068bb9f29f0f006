//! The pipeline's one-way flow, checked on the sources: each stage folder may import only the
//! stages before it and the side concerns it serves. A `use crate::...` that runs against the
//! flow (the writer naming the proxier, the model naming datapath types) fails here, with the
//! file and the import.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
};

/// Stage folders (or top-level modules) and the crate modules each may import, besides itself.
/// The flow: source → pipeline → sync → datapath; `node`, `health` and `telemetry` sit beside
/// it; `agent` and `config` wire everything and may import anything.
const ALLOWED: &[(&str, &[&str])] = &[
    ("source", &[]),
    ("telemetry", &[]),
    ("node", &[]),
    ("pipeline", &["source"]),
    ("health", &["pipeline", "telemetry"]),
    ("sync", &["source", "pipeline", "health", "telemetry"]),
    ("datapath", &["pipeline", "node", "telemetry"]),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level crate modules a file names through `crate::`, in paths and in `use` trees
/// (`use crate::{a::x, b::{y, z}}` names `a` and `b`).
fn crate_modules(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(tree) = rest.strip_prefix('{') {
            let mut depth = 1;
            let mut word = String::new();
            let mut at_item = true;
            for c in tree.chars() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    _ => {}
                }
                if depth == 0 {
                    break;
                }
                if depth == 1 {
                    if c.is_alphanumeric() || c == '_' {
                        if at_item {
                            word.push(c);
                        }
                    } else {
                        if !word.is_empty() {
                            found.insert(std::mem::take(&mut word));
                        }
                        at_item = c == ',' || (at_item && c.is_whitespace());
                    }
                }
            }
        } else {
            let word: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            found.insert(word);
        }
    }
    found
}

#[test]
fn no_import_runs_against_the_flow() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut against = Vec::new();
    let mut checked = 0;
    for file in &files {
        let relative = file.strip_prefix(&src).unwrap();
        let stage = relative
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        let Some((_, allowed)) = ALLOWED.iter().find(|(name, _)| *name == stage) else {
            continue;
        };
        checked += 1;
        let text = fs::read_to_string(file).unwrap();
        assert!(
            !text.contains("super::super::"),
            "{}: reaches out of its folder with super::super",
            relative.display()
        );
        for module in crate_modules(&text) {
            if module != stage && !allowed.contains(&module.as_str()) {
                against.push(format!("{}: imports crate::{module}", relative.display()));
            }
        }
    }
    assert!(
        checked > 20,
        "only {checked} files checked: is the layout still as ALLOWED says?"
    );
    assert!(
        against.is_empty(),
        "imports against the flow:\n{}",
        against.join("\n")
    );
}

#[test]
fn use_trees_name_each_top_level_module() {
    let text = "use crate::{\n    a::x,\n    b::{y, z::w},\n    c,\n};\nfn f() { crate::d::g(); }";
    let found: Vec<String> = crate_modules(text).into_iter().collect();
    assert_eq!(found, ["a", "b", "c", "d"]);
}
