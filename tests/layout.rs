//! The layout's rule, checked on the sources: no import cycles between the modules of a
//! crate (issue 10, review §1.5). A module `a` depends on `b` when code of `a` (outside
//! `#[cfg(test)]` and comments) names `crate::b...`; at every nesting depth up to three
//! (`net`, `net::client`, `core::pg::tar`) the dependency graph of each crate must have
//! no cycle, so each layer can be read, tested and moved without the ones above it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Module = Vec<String>;

/// Every `.rs` file under `src` with its module path (`lib.rs`/`main.rs` are the root).
fn modules(src: &Path) -> Vec<(PathBuf, Module)> {
    let mut out = Vec::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some("rs") {
                continue;
            }
            let rel = path.strip_prefix(src).unwrap().with_extension("");
            let mut m: Module = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if m.last().is_some_and(|l| l == "mod") {
                m.pop();
            }
            if m == ["lib"] || m == ["main"] {
                m.clear();
            }
            out.push((path, m));
        }
    }
    out
}

/// The code of a file without comments and without what follows its first
/// `#[cfg(test)]` (test modules sit at the end of a file and may reach anywhere).
fn code_of(text: &str) -> String {
    let text = text.split("#[cfg(test)]").next().unwrap_or_default();
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Module paths named as `crate::a::b::...` in `code`.
fn crate_paths(code: &str) -> Vec<Module> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let before = rest[..i].chars().last();
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // e.g. `walvault_crate::`
        }
        let mut path = Module::new();
        let mut s = rest;
        loop {
            let end = s
                .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                .unwrap_or(s.len());
            if end == 0 {
                break;
            }
            path.push(s[..end].to_string());
            s = &s[end..];
            match s.strip_prefix("::") {
                Some(t) => s = t,
                None => break,
            }
        }
        if !path.is_empty() {
            out.push(path);
        }
    }
    out
}

/// One cycle of the graph, if it has any.
fn find_cycle(edges: &BTreeMap<Module, BTreeSet<Module>>) -> Option<Vec<Module>> {
    fn visit(
        n: &Module,
        edges: &BTreeMap<Module, BTreeSet<Module>>,
        state: &mut BTreeMap<Module, u8>,
        stack: &mut Vec<Module>,
    ) -> Option<Vec<Module>> {
        state.insert(n.clone(), 1);
        stack.push(n.clone());
        for m in edges.get(n).into_iter().flatten() {
            match state.get(m) {
                Some(1) => {
                    let at = stack.iter().position(|s| s == m).unwrap();
                    let mut cycle = stack[at..].to_vec();
                    cycle.push(m.clone());
                    return Some(cycle);
                }
                Some(_) => {}
                None => {
                    if let Some(c) = visit(m, edges, state, stack) {
                        return Some(c);
                    }
                }
            }
        }
        stack.pop();
        state.insert(n.clone(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in edges.keys() {
        if !state.contains_key(n) {
            if let Some(c) = visit(n, edges, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

/// The module graph of the crate at `src`, truncated to `depth` components. Only paths
/// that name a module of the crate count (a `crate::x::Type` counts as `x`).
fn graph(src: &Path, depth: usize) -> BTreeMap<Module, BTreeSet<Module>> {
    let files = modules(src);
    let known: BTreeSet<Module> = files.iter().map(|(_, m)| m.clone()).collect();
    let mut edges: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for (path, module) in &files {
        let me: Module = module.iter().take(depth).cloned().collect();
        let code = code_of(&std::fs::read_to_string(path).unwrap());
        for target in crate_paths(&code) {
            // The longest prefix of the path that is a module of the crate.
            let Some(len) = (1..=target.len())
                .rev()
                .find(|&l| known.contains(&target[..l]))
            else {
                continue;
            };
            let to: Module = target[..len].iter().take(depth).cloned().collect();
            // A module may use its own parts and its ancestors' items freely.
            if to.starts_with(&me) || me.starts_with(&to) {
                continue;
            }
            edges.entry(me.clone()).or_default().insert(to);
        }
    }
    edges
}

#[test]
fn no_crate_has_an_import_cycle_between_its_modules() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut cycles = Vec::new();
    let mut edges_seen = 0;
    for krate in ["protocol", "archived", "pushclient", "pullclient"] {
        for depth in 1..=3 {
            let g = graph(&root.join(krate).join("src"), depth);
            edges_seen += g.values().map(BTreeSet::len).sum::<usize>();
            if let Some(c) = find_cycle(&g) {
                let names: Vec<String> = c.iter().map(|m| m.join("::")).collect();
                cycles.push(format!("{krate} (depth {depth}): {}", names.join(" -> ")));
            }
        }
    }
    // The scan must have seen the crates' real dependencies (e.g. archived's server
    // using its services), or an empty graph would pass vacuously.
    assert!(
        edges_seen > 50,
        "only {edges_seen} module dependencies found"
    );
    assert!(
        cycles.is_empty(),
        "import cycles between modules:\n{}",
        cycles.join("\n")
    );
}

#[test]
fn the_cycle_check_finds_a_cycle() {
    let m = |s: &str| s.split("::").map(String::from).collect::<Module>();
    let mut g = BTreeMap::new();
    g.insert(m("get"), BTreeSet::from([m("spool")]));
    g.insert(m("spool"), BTreeSet::from([m("fetch"), m("get")]));
    assert_eq!(find_cycle(&g), Some(vec![m("get"), m("spool"), m("get")]));
    g.get_mut(&m("spool")).unwrap().remove(&m("get"));
    assert_eq!(find_cycle(&g), None);
    assert_eq!(
        crate_paths("use crate::net::client::{A, B}; x = crate::fetch::absolute(p); my_crate::no"),
        vec![m("net::client"), m("fetch::absolute")]
    );
}
