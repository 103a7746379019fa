//! The module table in lib.rs holds: every module uses only what its row
//! allows, and the allowed uses form no circle. Below the table, no source
//! file uses another that uses it back, directly or round a longer circle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

type Graph = BTreeMap<String, BTreeSet<String>>;

const SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src");

/// The table at the top of lib.rs: module → the modules it may use.
fn table() -> Graph {
    let lib = std::fs::read_to_string(Path::new(SRC).join("lib.rs")).unwrap();
    lib.lines()
        .filter_map(|l| l.strip_prefix("//! | "))
        .filter(|row| !row.starts_with("module") && !row.starts_with("---"))
        .map(|row| {
            let mut cells = row.split('|').map(str::trim);
            let module = cells.next().unwrap().to_owned();
            let uses = cells.next().unwrap_or_default().split_whitespace().map(str::to_owned).collect();
            (module, uses)
        })
        .collect()
}

/// Source without comments and without inline `mod tests { .. }`.
fn code(text: &str) -> String {
    let text = text.find("#[cfg(test)]\nmod tests {").map_or(text, |i| &text[..i]);
    text.lines().map(|l| l.split("//").next().unwrap_or_default()).collect::<Vec<_>>().join("\n")
}

/// The crate modules `code` names: `crate::x`, and `x` in `crate::{x, ..}`.
fn named(code: &str) -> BTreeSet<String> {
    let ident = |s: &str| s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>();
    let mut out = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            out.extend(group.split(',').map(|p| ident(p.trim())).filter(|m| !m.is_empty()));
        } else {
            out.insert(ident(rest));
        }
    }
    out
}

/// What each top-level module's non-test sources use.
fn actual() -> Graph {
    let mut graph = Graph::new();
    for (module, code) in files() {
        let top = module.split("::").next().unwrap_or_default().to_owned();
        let uses = named(&code);
        graph.entry(top.clone()).or_default().extend(uses.into_iter().filter(|m| *m != top));
    }
    graph
}

/// A circle in `graph`, if there is one.
fn circle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(g: &Graph, n: &str, path: &mut Vec<String>, done: &mut BTreeSet<String>) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == n) {
            return Some(path[at..].iter().cloned().chain([n.to_owned()]).collect());
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_owned());
        for next in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(g, next, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|n| visit(graph, n, &mut Vec::new(), &mut done))
}

#[test]
fn every_module_uses_only_what_the_table_allows() {
    let table = table();
    assert!(table.len() > 10, "the table in lib.rs was not found: {table:?}");
    for (module, uses) in actual() {
        let allowed = table.get(&module).unwrap_or_else(|| panic!("module {module} is not in lib.rs's table"));
        let extra: Vec<_> = uses.difference(allowed).collect();
        assert!(extra.is_empty(), "{module} uses {extra:?}, which its row in lib.rs does not allow");
    }
}

#[test]
fn the_table_has_no_circle() {
    assert_eq!(circle(&table()), None);
    // And the check would see one.
    let looped: Graph = [("a", "b"), ("b", "c"), ("c", "a")]
        .into_iter()
        .map(|(m, u)| (m.to_owned(), BTreeSet::from([u.to_owned()])))
        .collect();
    assert_eq!(circle(&looped).map(|c| c.len()), Some(4));
}

#[test]
fn the_reader_finds_paths_and_groups() {
    let src = "use crate::call::Call;\nuse crate::{error, pool::Upstream};\n// crate::edge in a comment\nlet x = crate::bulk::run(f);";
    assert_eq!(named(&code(src)), ["bulk", "call", "error", "pool"].map(str::to_owned).into());
}

#[test]
fn errors_are_rendered_by_the_edge_alone() {
    let source = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/error.rs")).unwrap();
    let source = code(&source);
    for framework in ["axum", "tonic"] {
        assert!(
            !source.contains(&format!("{framework}::")),
            "error.rs uses {framework}: its rendering belongs in edge/"
        );
    }
}

/// Every non-test source file as its module path (`pool::table`; `pool`
/// for pool/mod.rs), with its code.
fn files() -> BTreeMap<String, String> {
    fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut paths = Vec::new();
    walk(Path::new(SRC), &mut paths);
    let mut out = BTreeMap::new();
    for path in paths {
        let rel = path.strip_prefix(SRC).unwrap().with_extension("");
        let mut parts: Vec<String> = rel.components().map(|c| c.as_os_str().to_str().unwrap().to_owned()).collect();
        if parts.last().is_some_and(|p| p == "mod") {
            parts.pop();
        }
        if matches!(parts.as_slice(), [one] if one == "lib" || one == "main")
            || parts.iter().any(|p| p == "tests" || p.ends_with("_tests"))
        {
            continue;
        }
        out.insert(parts.join("::"), code(&std::fs::read_to_string(&path).unwrap()));
    }
    out
}

/// Which source file uses which: `crate::`, `super::` and `self::` paths
/// (groups included), resolved to the longest file module they name, and
/// a parent's bare `child::` paths.
fn file_graph() -> Graph {
    let files = files();
    let ident = |s: &str| s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>();
    let resolve =
        |segs: &[String]| (1..=segs.len()).rev().map(|n| segs[..n].join("::")).find(|m| files.contains_key(m));
    let mut graph = Graph::new();
    for (module, code) in &files {
        let here: Vec<String> =
            if module.is_empty() { vec![] } else { module.split("::").map(str::to_owned).collect() };
        let mut uses = BTreeSet::new();
        for anchor in ["crate::", "super::", "self::"] {
            for (i, _) in code.match_indices(anchor) {
                if code[..i].chars().last().is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                    continue;
                }
                let mut base: Vec<String> = match anchor {
                    "crate::" => vec![],
                    "super::" => here[..here.len().saturating_sub(1)].to_vec(),
                    _ => here.clone(),
                };
                let mut rest = &code[i + anchor.len()..];
                // `super::super::`: one more level up.
                while let Some(r) = rest.strip_prefix("super::") {
                    base.pop();
                    rest = r;
                }
                let mut heads = Vec::new();
                let mut segs = base;
                loop {
                    if let Some(group) = rest.strip_prefix('{') {
                        let group = &group[..group.find('}').unwrap_or(group.len())];
                        heads.extend(group.split(',').map(|p| ident(p.trim())).filter(|p| !p.is_empty()).map(|p| {
                            let mut h = segs.clone();
                            h.push(p);
                            h
                        }));
                        break;
                    }
                    let seg = ident(rest);
                    if seg.is_empty() {
                        heads.push(segs.clone());
                        break;
                    }
                    rest = &rest[seg.len()..];
                    segs.push(seg);
                    match rest.strip_prefix("::") {
                        Some(r) => rest = r,
                        None => {
                            heads.push(segs.clone());
                            break;
                        }
                    }
                }
                uses.extend(heads.iter().filter_map(|h| resolve(h)));
            }
        }
        for child in files.keys() {
            let parts: Vec<&str> = child.split("::").collect();
            if parts.len() == here.len() + 1
                && parts[..here.len()] == here.iter().map(String::as_str).collect::<Vec<_>>()[..]
            {
                let name = format!("{}::", parts[here.len()]);
                let bare = code.match_indices(&name).any(|(i, _)| {
                    !code[..i].chars().last().is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':')
                });
                if bare {
                    uses.insert(child.clone());
                }
            }
        }
        uses.remove(module);
        graph.insert(module.clone(), uses);
    }
    graph
}

#[test]
fn no_source_file_uses_one_that_uses_it_back() {
    let graph = file_graph();
    assert!(graph.get("pool").is_some_and(|u| u.contains("pool::admission")), "the reader finds child paths");
    assert!(graph.get("pool::calls").is_some_and(|u| u.contains("pool")), "the reader finds super:: paths");
    assert_eq!(circle(&graph), None, "source files that use each other, round this circle");
}
