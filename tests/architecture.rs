//! The library's import graph keeps the house's order: data flows one way, and no file imports a
//! file that imports it back.
//!
//! Every top-level module of `src/` has a floor (below); a module may use modules on lower floors
//! only — not a later stage, not a sibling on its own floor. Within the whole library, the files
//! (resolved from `use crate::…`, `use super::…` and `crate::…` paths) form no circle. The
//! binary (`src/main.rs`, `src/bin/`) sits on top of everything and is not checked.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Floors, lowest first: a module may import only modules on a lower floor.
const FLOORS: &[&[&str]] = &[
    &["device", "alloc", "atomic"],
    &["engine"],
    &["data", "weights"],
    &["error"],
    &["fetch"],
    &["zoo"],
    &["perturbation", "metrics"],
    &["classifier"],
    &["attack", "defense"],
    &["eval"],
    &["demo"],
];

fn floor(module: &str) -> Option<usize> {
    FLOORS.iter().position(|f| f.contains(&module))
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every library source file under `root` (the binary's files left out).
fn files(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read src") {
        let p = e.expect("dir entry").path();
        let rel = p.strip_prefix(root).unwrap().to_path_buf();
        if rel == Path::new("main.rs") || rel.starts_with("bin") {
            continue;
        }
        if p.is_dir() {
            files(root, &p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The module path of a file: `src/engine/conv.rs` → `["engine", "conv"]`; `mod.rs` and
/// `lib.rs` name their folder.
fn module_of(root: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(root).unwrap();
    let mut parts: Vec<String> = rel
        .iter()
        .map(|c| c.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if parts.last().is_some_and(|l| l == "mod" || l == "lib") {
        parts.pop();
    }
    parts
}

/// The file that defines module path `m` (its longest prefix that is a file).
fn file_of(root: &Path, m: &[String]) -> Option<PathBuf> {
    for n in (1..=m.len()).rev() {
        let base = m[..n].iter().fold(root.to_path_buf(), |p, s| p.join(s));
        let f = base.with_extension("rs");
        if f.is_file() {
            return Some(f);
        }
        let f = base.join("mod.rs");
        if f.is_file() {
            return Some(f);
        }
    }
    None
}

/// Source without comments (line comments, doc comments and block comments) and strings.
fn code(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
            i += 2;
            while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                i += 1;
            }
            i += 2;
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

/// Expands `a::{b, c::{d, e}}` into `a::b`, `a::c::d`, `a::c::e`.
fn expand(path: &str, out: &mut Vec<String>) {
    let path = path.trim();
    let Some(open) = path.find('{') else {
        out.push(path.to_string());
        return;
    };
    let prefix = &path[..open];
    let inner = &path[open + 1..path.rfind('}').unwrap_or(path.len())];
    let (mut depth, mut start) = (0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                expand(&format!("{prefix}{}", &inner[start..i]), out);
                start = i + 1;
            }
            _ => {}
        }
    }
    if !inner[start..].trim().is_empty() {
        expand(&format!("{prefix}{}", &inner[start..]), out);
    }
}

/// The module paths a file refers to, absolute (`crate::…` resolved, `super::…` resolved
/// against the file's own module).
fn references(root: &Path, file: &Path) -> Vec<Vec<String>> {
    let text = code(&std::fs::read_to_string(file).expect("read source"));
    let me = module_of(root, file);
    let mut paths = Vec::new();
    // `use` statements, braces expanded.
    for stmt in text.split(';') {
        let mut t = stmt.trim();
        // Attributes before the statement (`#[cfg(test)]`).
        while t.starts_with("#[") {
            match t.find(']') {
                Some(e) => t = t[e + 1..].trim_start(),
                None => break,
            }
        }
        let t = t.strip_prefix("pub ").unwrap_or(t);
        let t = t.strip_prefix("pub(crate) ").unwrap_or(t);
        let t = t.strip_prefix("pub(super) ").unwrap_or(t);
        if let Some(rest) = t.strip_prefix("use ") {
            let flat: String = rest.split_whitespace().collect::<Vec<_>>().join(" ");
            expand(&flat, &mut paths);
        }
    }
    // Paths in code: `crate::a::b` and `super::a`.
    for key in ["crate::", "super::"] {
        let mut at = 0;
        while let Some(i) = text[at..].find(key) {
            let start = at + i;
            let end = text[start..]
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .map_or(text.len(), |e| start + e);
            paths.push(text[start..end].to_string());
            at = end.max(start + key.len());
        }
    }
    let mut out = Vec::new();
    for p in paths {
        let p = p.trim_end_matches("::*").trim_end_matches(':');
        let segs: Vec<&str> = p
            .split("::")
            .map(|s| s.split(" as ").next().unwrap_or(s).trim())
            .filter(|s| !s.is_empty())
            .collect();
        let abs: Vec<String> = match segs.first() {
            Some(&"crate") => segs[1..].iter().map(|s| s.to_string()).collect(),
            Some(&"super") => {
                let mut base = me.clone();
                // `super` of a `mod.rs`/file module is its parent.
                let mut rest = &segs[..];
                while rest.first() == Some(&"super") {
                    base.pop();
                    rest = &rest[1..];
                }
                base.extend(rest.iter().map(|s| s.to_string()));
                base
            }
            _ => continue,
        };
        if !abs.is_empty() {
            out.push(abs);
        }
    }
    out
}

/// Imports against the floors in the tree at `root`.
fn floor_violations(root: &Path) -> Vec<String> {
    let mut all = Vec::new();
    files(root, root, &mut all);
    let mut wrong = Vec::new();
    for f in &all {
        let me = module_of(root, f);
        let Some(top) = me.first() else { continue };
        let rel = f.strip_prefix(root).unwrap().display().to_string();
        let Some(mine) = floor(top) else {
            wrong.push(format!(
                "{rel}: module `{top}` has no floor in tests/architecture.rs"
            ));
            continue;
        };
        for r in references(root, f) {
            let other = &r[0];
            if other == top {
                continue;
            }
            if let Some(theirs) = floor(other)
                && theirs >= mine
            {
                wrong.push(format!(
                    "{rel} (floor {mine}, `{top}`) uses `crate::{}` (floor {theirs}, not below)",
                    r.join("::")
                ));
            }
        }
    }
    wrong.sort();
    wrong.dedup();
    wrong
}

/// Circles between the files of the tree at `root`.
fn circles(root: &Path) -> Vec<String> {
    let mut all = Vec::new();
    files(root, root, &mut all);
    let mut edges: BTreeMap<PathBuf, BTreeSet<PathBuf>> = BTreeMap::new();
    for f in &all {
        let e = edges.entry(f.clone()).or_default();
        for r in references(root, f) {
            if let Some(t) = file_of(root, &r)
                && &t != f
            {
                e.insert(t);
            }
        }
    }
    fn visit(
        root: &Path,
        n: &PathBuf,
        edges: &BTreeMap<PathBuf, BTreeSet<PathBuf>>,
        state: &mut BTreeMap<PathBuf, u8>,
        stack: &mut Vec<PathBuf>,
        found: &mut Vec<String>,
    ) {
        state.insert(n.clone(), 1);
        stack.push(n.clone());
        for m in edges.get(n).into_iter().flatten() {
            match state.get(m).copied().unwrap_or(0) {
                0 => visit(root, m, edges, state, stack, found),
                1 => {
                    let i = stack.iter().position(|s| s == m).unwrap();
                    let names: Vec<String> = stack[i..]
                        .iter()
                        .chain(std::iter::once(m))
                        .map(|p| p.strip_prefix(root).unwrap().display().to_string())
                        .collect();
                    found.push(names.join(" -> "));
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.clone(), 2);
    }
    let (mut state, mut stack, mut found) = (BTreeMap::new(), Vec::new(), Vec::new());
    for n in edges.keys() {
        if state.get(n).copied().unwrap_or(0) == 0 {
            visit(root, n, &edges, &mut state, &mut stack, &mut found);
        }
    }
    found
}

#[test]
fn modules_import_only_lower_floors() {
    let wrong = floor_violations(&src());
    assert!(
        wrong.is_empty(),
        "imports against the floors:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn files_form_no_circle() {
    let found = circles(&src());
    assert!(
        found.is_empty(),
        "circles between files:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_checker_catches_what_it_is_for() {
    // A tree with a backward import (zoo → eval), a sibling import (attack → defense) and a
    // circle (engine/a.rs ↔ engine/b.rs, one of them through a braced `use`): each is reported;
    // comments and strings that mention crate paths are not imports.
    let root = std::env::temp_dir().join(format!("sfr-arch-{}", std::process::id()));
    let write = |rel: &str, text: &str| {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    };
    write(
        "lib.rs",
        "pub mod zoo;\npub mod eval;\npub mod attack;\npub mod defense;\npub mod engine;\n",
    );
    write(
        "zoo/mod.rs",
        "use crate::{engine::a::X, eval::{evaluate, Report}};\n// use crate::attack::y;\n",
    );
    write(
        "eval/mod.rs",
        "pub fn evaluate() { let _ = \"crate::defense::z\"; }\n",
    );
    write("attack/mod.rs", "fn f() { crate::defense::train(); }\n");
    write("defense/mod.rs", "pub fn train() {}\n");
    write("engine/mod.rs", "pub mod a;\npub mod b;\n");
    write("engine/a.rs", "use super::{b::Y};\npub struct X;\n");
    write(
        "engine/b.rs",
        "pub struct Y;\nfn g() -> super::a::X { super::a::X }\n",
    );
    let wrong = floor_violations(&root);
    let found = circles(&root);
    std::fs::remove_dir_all(&root).ok();
    assert_eq!(wrong.len(), 3, "{wrong:?}");
    assert!(
        wrong
            .iter()
            .any(|w| w.starts_with("zoo/mod.rs") && w.contains("crate::eval::evaluate")),
        "{wrong:?}"
    );
    assert!(
        wrong
            .iter()
            .any(|w| w.starts_with("attack/mod.rs") && w.contains("crate::defense::train")),
        "{wrong:?}"
    );
    assert!(
        found
            .iter()
            .any(|c| c.contains("engine/a.rs") && c.contains("engine/b.rs")),
        "{found:?}"
    );
}
