//! The module layering that `docs/architecture.md` states, held against the code: every
//! `crate::…` path in a library source file names a top-level module, and that module must sit
//! on a lower layer than the file's own. Test code (`#[cfg(test)]` modules, `src/test_util.rs`,
//! `src/cuda_tests.rs`) is not counted: it may use fixtures from anywhere.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// `module → layer` from the fenced `layers` block of `docs/architecture.md`: one line per
/// layer, `layer N  module module …`, the highest first.
fn layers(doc: &str) -> BTreeMap<String, usize> {
    let block = doc
        .split("```layers\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("docs/architecture.md has a ```layers block");
    let mut out = BTreeMap::new();
    for line in block.lines().filter(|l| !l.trim().is_empty()) {
        let mut words = line.split_whitespace();
        assert_eq!(
            words.next(),
            Some("layer"),
            "bad line in the layers block: {line}"
        );
        let n: usize = words
            .next()
            .and_then(|w| w.parse().ok())
            .unwrap_or_else(|| panic!("no layer number in: {line}"));
        for m in words {
            assert!(
                out.insert(m.to_string(), n).is_none(),
                "{m} is on two layers"
            );
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The library code of a file: everything before its first `#[cfg(test)]` item (test modules
/// close the file in this code base), without comments.
fn library_code(src: &str) -> String {
    let mut out = String::new();
    for line in src.lines() {
        let t = line.trim_start();
        if t.starts_with("#[cfg(test)]") || t.starts_with("#[cfg(all(test") {
            break;
        }
        if t.starts_with("//") {
            continue;
        }
        out.push_str(line.split(" // ").next().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// The top-level modules `code` names through `crate::`, in `use crate::{a, b::c}` groups too.
fn crate_edges(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a::x, b}`: the first segment of each item, up to the matching brace.
            let mut depth = 1;
            let mut item_start = true;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => item_start = true,
                    c if item_start && !c.is_whitespace() => {
                        out.push(ident(&group[j..]));
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            out.push(ident(rest));
        }
    }
    out.retain(|m| !m.is_empty() && m != "self");
    out
}

fn top_module(root: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(root).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    Some(first.trim_end_matches(".rs").to_string())
}

/// Every `(from, to, file)` edge that runs to the same or a higher layer.
fn violations(root: &Path, layer: &BTreeMap<String, usize>) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(root, &mut files);
    files.sort();
    let mut bad = Vec::new();
    for f in files {
        let Some(from) = top_module(root, &f) else {
            continue;
        };
        if ["lib", "main", "test_util", "cuda_tests"].contains(&from.as_str()) {
            continue;
        }
        let Some(&from_layer) = layer.get(&from) else {
            bad.push(format!(
                "{}: module {from} is on no layer of docs/architecture.md",
                f.display()
            ));
            continue;
        };
        let code = library_code(&std::fs::read_to_string(&f).unwrap());
        for to in crate_edges(&code) {
            if to == from || ["Error", "Result"].contains(&to.as_str()) {
                continue;
            }
            match layer.get(&to) {
                Some(&l) if l < from_layer => {}
                Some(&l) => bad.push(format!(
                    "{}: {from} (layer {from_layer}) imports {to} (layer {l})",
                    f.display()
                )),
                None => bad.push(format!(
                    "{}: {from} imports {to}, which is on no layer",
                    f.display()
                )),
            }
        }
    }
    bad.sort();
    bad.dedup();
    bad
}

#[test]
fn every_import_runs_down_the_layers_of_docs_architecture() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("docs/architecture.md")).unwrap();
    let layer = layers(&doc);
    let bad = violations(&root.join("src"), &layer);
    assert!(
        bad.is_empty(),
        "imports outside the layering of docs/architecture.md:\n{}",
        bad.join("\n")
    );
}

#[test]
fn the_check_sees_an_upward_import() {
    // A scratch tree with one upward edge (models → server), one grouped `use`, and test code
    // that may import anything.
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path();
    std::fs::create_dir_all(src.join("models")).unwrap();
    std::fs::write(
        src.join("models/mod.rs"),
        "use crate::{error::Error, util};\nuse crate::server::state::hex;\n\
         #[cfg(test)]\nmod tests { use crate::cli::Cli; }\n",
    )
    .unwrap();
    std::fs::write(src.join("server.rs"), "use crate::models::Model;\n").unwrap();
    let layer = layers("```layers\nlayer 2  server\nlayer 1  models\nlayer 0  error util\n```\n");
    let bad = violations(src, &layer);
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert!(
        bad[0].ends_with("models (layer 1) imports server (layer 2)"),
        "{bad:?}"
    );
    assert_eq!(
        crate_edges("use crate::{a::{b, c}, d};\nlet x = crate::e::f();"),
        ["a", "d", "e"]
    );
}
