//! `bpftool -j …` with its JSON parsed: what an operator would look at.

use std::{collections::BTreeSet, path::Path, process::Command};

use serde::Deserialize;
use serde_json::Value;

/// Runs `bpftool args` (a command that prints nothing useful, e.g. `map update`); panics with
/// its output if it fails.
#[track_caller]
pub fn run(args: &[&str]) {
    let out = Command::new("bpftool")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running bpftool {args:?}: {e}"));
    assert!(
        out.status.success(),
        "bpftool {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `bpftool -j <args>` and parses its output; panics on failure.
#[track_caller]
pub fn json(args: &[&str]) -> Value {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running bpftool {args:?}: {e}"));
    if !out.status.success() {
        panic!(
            "bpftool -j {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Value::Array(Vec::new());
    }
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("bpftool -j {args:?}: bad JSON ({e}): {text}"))
}

/// A program attached to a cgroup, as `bpftool -j cgroup show <path>` lists it.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct CgroupProg {
    pub id: u32,
    pub attach_type: String,
    #[serde(default)]
    pub attach_flags: String,
    #[serde(default)]
    pub name: String,
}

/// Programs attached directly to the cgroup at `path` (absolute).
#[track_caller]
pub fn cgroup_progs(path: &Path) -> Vec<CgroupProg> {
    let p = path.to_str().expect("cgroup path is UTF-8");
    let v = json(&["cgroup", "show", p]);
    serde_json::from_value(v.clone())
        .unwrap_or_else(|e| panic!("bpftool cgroup show {p}: unexpected JSON ({e}): {v}"))
}

/// `bpftool -j prog show`: every loaded program.
pub fn progs() -> Vec<Value> {
    match json(&["prog", "show"]) {
        Value::Array(a) => a,
        other => panic!("bpftool prog show: expected an array, got {other}"),
    }
}

/// Ids of every loaded program.
pub fn prog_ids() -> BTreeSet<u32> {
    progs()
        .iter()
        .filter_map(|p| p.get("id")?.as_u64())
        .map(|id| id as u32)
        .collect()
}

/// `bpftool -j link show`: every BPF link.
pub fn links() -> Vec<Value> {
    match json(&["link", "show"]) {
        Value::Array(a) => a,
        other => panic!("bpftool link show: expected an array, got {other}"),
    }
}

/// Links attached to the cgroup whose id (inode) is `cgroup_id`.
pub fn cgroup_links(cgroup_id: u64) -> Vec<Value> {
    links()
        .into_iter()
        .filter(|l| l.get("cgroup_id").and_then(Value::as_u64) == Some(cgroup_id))
        .collect()
}

/// The per-CPU counters map pinned at `pin` (`mesh_counters`), summed over
/// CPUs, indexed as `mesh_common::counters`.
#[track_caller]
pub fn counters(pin: &Path) -> Vec<u64> {
    let p = pin.to_str().expect("pin path is UTF-8");
    let dump = json(&["map", "dump", "pinned", p]);
    let Value::Array(entries) = &dump else {
        panic!("bpftool map dump pinned {p}: expected an array, got {dump}");
    };
    let mut out = Vec::new();
    for entry in entries {
        // With BTF, the typed view is under "formatted".
        let entry = entry.get("formatted").unwrap_or(entry);
        let key = entry
            .get("key")
            .and_then(Value::as_u64)
            .unwrap_or_else(|| panic!("bpftool map dump pinned {p}: no numeric key in {entry}"));
        let total: u64 = entry
            .get("values")
            .and_then(Value::as_array)
            .unwrap_or_else(|| panic!("bpftool map dump pinned {p}: no per-CPU values in {entry}"))
            .iter()
            .filter_map(|v| v.get("value").and_then(Value::as_u64))
            .sum();
        let key = key as usize;
        if out.len() <= key {
            out.resize(key + 1, 0);
        }
        out[key] = total;
    }
    out
}

/// `flags` of slot 0 of the pinned `mesh_config` map at `pin`, as `bpftool map dump` shows it
/// (the BTF-typed view).
pub fn config_flags(pin: &Path) -> u32 {
    let p = pin.to_str().expect("pin path is UTF-8");
    let dump = json(&["map", "dump", "pinned", p]);
    let entry = dump
        .as_array()
        .and_then(|a| a.first())
        .unwrap_or_else(|| panic!("bpftool map dump pinned {p}: no entry in {dump}"));
    let entry = entry.get("formatted").unwrap_or(entry);
    entry["value"]["flags"]
        .as_u64()
        .and_then(|f| u32::try_from(f).ok())
        .unwrap_or_else(|| panic!("bpftool map dump pinned {p}: no numeric value.flags in {entry}"))
}
