//! Tidy tests: the workspace's Architecture Invariants (what each crate must never
//! depend on, read from `cargo metadata`) and source-file rules (size, module docs).
//! Each failure says which rule broke and how to find the offending edge or file.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// Source files over this many lines fail [`source_files_are_small`].
const MAX_LINES: usize = 1200;

/// Files allowed over [`MAX_LINES`] for now, each with the reason.
const TOO_LONG_ALLOWED: &[(&str, &str)] = &[];

/// Module files allowed without a `//!` doc for now.
const UNDOCUMENTED_ALLOWED: &[(&str, &str)] = &[];

struct Metadata {
    root: PathBuf,
    /// package id → name
    names: BTreeMap<String, String>,
    /// package id → ids of its normal (non-dev, non-build) dependencies
    normal_deps: BTreeMap<String, Vec<String>>,
    /// workspace member name → id
    members: BTreeMap<String, String>,
}

fn metadata() -> Metadata {
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("cargo metadata JSON");
    let root = PathBuf::from(v["workspace_root"].as_str().expect("workspace_root"));
    let mut names = BTreeMap::new();
    for p in v["packages"].as_array().expect("packages") {
        names.insert(
            p["id"].as_str().expect("id").to_string(),
            p["name"].as_str().expect("name").to_string(),
        );
    }
    let mut members = BTreeMap::new();
    for id in v["workspace_members"]
        .as_array()
        .expect("workspace_members")
    {
        let id = id.as_str().expect("member id").to_string();
        members.insert(names[&id].clone(), id);
    }
    let mut normal_deps = BTreeMap::new();
    for node in v["resolve"]["nodes"].as_array().expect("resolve.nodes") {
        let id = node["id"].as_str().expect("node id").to_string();
        let deps = node["deps"]
            .as_array()
            .expect("deps")
            .iter()
            .filter(|d| {
                d["dep_kinds"]
                    .as_array()
                    .expect("dep_kinds")
                    .iter()
                    .any(|k| k["kind"].is_null())
            })
            .map(|d| d["pkg"].as_str().expect("pkg").to_string())
            .collect();
        normal_deps.insert(id, deps);
    }
    Metadata {
        root,
        names,
        normal_deps,
        members,
    }
}

impl Metadata {
    fn id(&self, member: &str) -> &str {
        self.members
            .get(member)
            .unwrap_or_else(|| panic!("{member} is not a workspace member"))
    }

    /// Names of `member`'s direct normal dependencies.
    fn direct(&self, member: &str) -> BTreeSet<String> {
        self.normal_deps[self.id(member)]
            .iter()
            .map(|d| self.names[d].clone())
            .collect()
    }

    /// Every package `member` reaches through normal dependencies, with the path that
    /// reaches it first (breadth first).
    fn reachable(&self, member: &str) -> BTreeMap<String, Vec<String>> {
        let start = self.id(member).to_string();
        let mut paths: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut seen = BTreeSet::from([start.clone()]);
        let mut queue = VecDeque::from([(start, vec![member.to_string()])]);
        while let Some((id, path)) = queue.pop_front() {
            for d in self.normal_deps.get(&id).into_iter().flatten() {
                if seen.insert(d.clone()) {
                    let mut p = path.clone();
                    p.push(self.names[d].clone());
                    paths.entry(self.names[d].clone()).or_insert(p.clone());
                    queue.push_back((d.clone(), p));
                }
            }
        }
        paths
    }

    /// The broken invariants if `member` reaches a package matching one of `forbidden`
    /// (a name, or a prefix ending in `*`).
    fn never_depends_on(&self, member: &str, forbidden: &[&str], why: &str) -> Vec<String> {
        let mut errors = Vec::new();
        for (name, path) in self.reachable(member) {
            if forbidden.iter().any(|f| match f.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix),
                None => name == *f,
            }) {
                errors.push(format!(
                    "Architecture Invariant broken: {member} must never depend on {name} ({why}); \
                     through {}",
                    path.join(" -> ")
                ));
            }
        }
        errors
    }
}

fn check(errors: Vec<String>) {
    assert!(errors.is_empty(), "\n{}\n", errors.join("\n"));
}

#[test]
fn data_plane_never_depends_on_storage_or_the_control_plane() {
    let m = metadata();
    check(m.never_depends_on(
        "starling-dataplane",
        &["sqlx", "sqlx-*", "starling-controlplane"],
        "the data plane never talks to the database, and serves viewers when the control plane is down",
    ));
}

#[test]
fn grid_is_sans_io() {
    let m = metadata();
    const ALLOWED: &[&str] = &["thiserror"];
    let mut errors = Vec::new();
    for d in m.direct("starling-grid") {
        if !ALLOWED.contains(&d.as_str()) {
            errors.push(format!(
                "Architecture Invariant broken: starling-grid depends on {d}; it may only depend on {ALLOWED:?} \
                 (sans-IO: nothing async, no sockets, no clocks)"
            ));
        }
    }
    errors.extend(m.never_depends_on(
        "starling-grid",
        &[
            "tokio",
            "tokio-*",
            "futures",
            "futures-*",
            "glommio",
            "tonic",
            "tonic-*",
        ],
        "sans-IO",
    ));
    check(errors);
}

#[test]
fn sdk_never_depends_on_servers() {
    let m = metadata();
    check(m.never_depends_on(
        "starling-sdk",
        &["starling-controlplane", "sqlx", "sqlx-*", "glommio"],
        "viewers embed the SDK: no server, storage or glommio code",
    ));
}

#[test]
fn sdk_ffi_never_depends_on_servers() {
    let m = metadata();
    check(m.never_depends_on(
        "starling-sdk-ffi",
        &["starling-controlplane", "starling-dataplane", "sqlx", "sqlx-*", "glommio"],
        "C apps link the SDK's C ABI: no server, storage or glommio code (the servers are dev-dependencies of its tests only)",
    ));
}

#[test]
fn proto_never_depends_on_storage_or_glommio() {
    let m = metadata();
    check(m.never_depends_on(
        "starling-proto",
        &["sqlx", "sqlx-*", "glommio"],
        "shared by every crate, including the SDK",
    ));
}

#[test]
fn telemetry_never_depends_on_storage() {
    let m = metadata();
    check(m.never_depends_on(
        "starling-telemetry",
        &["sqlx", "sqlx-*"],
        "shared by both servers, including the data plane",
    ));
}

/// Every `.rs` file under `<member>/src`, relative to the workspace root.
fn source_files(m: &Metadata) -> Vec<(String, PathBuf)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    let mut dirs = BTreeSet::new();
    for entry in std::fs::read_dir(&m.root)
        .expect("workspace root")
        .flatten()
    {
        if entry.path().join("Cargo.toml").is_file() && entry.path().join("src").is_dir() {
            dirs.insert(entry.path().join("src"));
        }
    }
    for d in dirs {
        walk(&d, &mut files);
    }
    let mut out: Vec<_> = files
        .into_iter()
        .map(|p| {
            let rel = p
                .strip_prefix(&m.root)
                .expect("under the root")
                .to_string_lossy()
                .replace('\\', "/");
            (rel, p)
        })
        .collect();
    out.sort();
    out
}

#[test]
fn source_files_are_small() {
    let m = metadata();
    let mut errors = Vec::new();
    for (rel, path) in source_files(&m) {
        let lines = std::fs::read_to_string(&path)
            .expect("read")
            .lines()
            .count();
        if lines > MAX_LINES && !TOO_LONG_ALLOWED.iter().any(|(f, _)| *f == rel) {
            errors.push(format!(
                "{rel}: {lines} lines (limit {MAX_LINES}): split it by responsibility"
            ));
        }
    }
    check(errors);
}

#[test]
fn every_module_has_a_doc() {
    let m = metadata();
    let mut errors = Vec::new();
    for (rel, path) in source_files(&m) {
        let text = std::fs::read_to_string(&path).expect("read");
        let first = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with("#!["));
        let documented = first.is_some_and(|l| l.starts_with("//!"));
        if !documented && !UNDOCUMENTED_ALLOWED.iter().any(|(f, _)| *f == rel) {
            errors.push(format!(
                "{rel}: no `//!` module doc at the top (say what its one concern is)"
            ));
        }
    }
    check(errors);
}

/// The crate-level modules a source file's code (not its comments, not its
/// `#[cfg(test)]` tail) names through `crate::`.
fn crate_paths(text: &str) -> BTreeSet<String> {
    let code = text.split("#[cfg(test)]").next().unwrap_or("");
    let mut out = BTreeSet::new();
    for line in code.lines() {
        if line.trim_start().starts_with("//") {
            continue;
        }
        let mut rest = line;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

/// A cycle in `edges` reachable from `start`, as a path that ends where it began.
fn find_cycle(edges: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    // Depth-first with an explicit stack of (node, next child index).
    let mut path: Vec<String> = vec![start.to_string()];
    let mut next: Vec<usize> = vec![0];
    let mut done = BTreeSet::new();
    while let Some(node) = path.last().cloned() {
        let i = *next.last().unwrap_or(&0);
        let children: Vec<&String> = edges
            .get(&node)
            .map(|s| s.iter().collect())
            .unwrap_or_default();
        if let Some(child) = children.get(i) {
            if let Some(l) = next.last_mut() {
                *l += 1;
            }
            if let Some(pos) = path.iter().position(|p| p == *child) {
                let mut cycle = path[pos..].to_vec();
                cycle.push((*child).clone());
                return Some(cycle);
            }
            if !done.contains(*child) {
                path.push((*child).clone());
                next.push(0);
            }
        } else {
            done.insert(node);
            path.pop();
            next.pop();
        }
    }
    None
}

#[test]
fn no_import_cycles_between_a_crates_top_level_modules() {
    let m = metadata();
    // crate src dir -> module -> modules it names through `crate::`
    let mut graphs: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for (rel, path) in source_files(&m) {
        let Some((krate, inner)) = rel.split_once("/src/") else {
            continue;
        };
        let top = inner.split('/').next().unwrap_or(inner);
        let module = top.trim_end_matches(".rs");
        if matches!(module, "lib" | "main" | "bin") || inner.contains("tests") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read");
        let deps = graphs
            .entry(krate.to_string())
            .or_default()
            .entry(module.to_string())
            .or_default();
        for d in crate_paths(&text) {
            if d != module {
                deps.insert(d);
            }
        }
    }
    let mut errors = Vec::new();
    for (krate, edges) in &graphs {
        for start in edges.keys() {
            if let Some(cycle) = find_cycle(edges, start) {
                errors.push(format!(
                    "{krate}: modules import each other: {} (give the shared part its own module, or have one side read a snapshot)",
                    cycle.join(" -> ")
                ));
                break;
            }
        }
    }
    check(errors);
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    g.entry("a".into()).or_default().insert("b".into());
    g.entry("b".into()).or_default().insert("c".into());
    assert_eq!(find_cycle(&g, "a"), None);
    g.entry("c".into()).or_default().insert("a".into());
    assert_eq!(
        find_cycle(&g, "a"),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    let paths = crate_paths(
        "use crate::ring::X;\n// crate::metrics\nfn f() { crate::auth::g(); }\n#[cfg(test)]\nuse crate::serve;",
    );
    assert_eq!(
        paths.into_iter().collect::<Vec<_>>(),
        vec!["auth".to_string(), "ring".to_string()]
    );
}
