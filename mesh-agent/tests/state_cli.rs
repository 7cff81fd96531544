//! `mesh-agent state show` on a node's state directory and `mesh-agent config status` (=
//! `state agents`) on an authority directory: the real binary, exit codes, `--output json`.

use std::fs;

use mesh_agent::state::Snapshot;

mod common;
use common::{run, s};

const REGISTRY: &str = include_str!("bundle/registry.yaml");

#[test]
fn state_show_prints_the_applied_state_and_refuses_a_tampered_one() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("state");
    // Nothing yet: exit 1, said so.
    let (code, _, err) = run(&["state", "show", "--state-dir", s(&dir)]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no mesh state"), "{err}");
    // No directory given at all: exit 2.
    let (code, _, _) = run(&["state", "show"]);
    assert_eq!(code, 2);

    let snapshot = Snapshot::new(7, "file:/r".into(), REGISTRY.into(), 1);
    snapshot.persist(&dir).unwrap();
    let (code, out, err) = run(&["state", "show", "--state-dir", s(&dir), "--output", "json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["version"], 7);
    assert_eq!(v["digest"], snapshot.digest.as_str());
    assert_eq!(v["workloads"], 2, "{v}");
    let (code, out, _) = run(&["state", "show", "--state-dir", s(&dir)]);
    assert_eq!(code, 0);
    assert!(out.starts_with("version 7"), "{out}");

    // One byte changed on disk: refused (the digest), exit 1.
    let path = dir.join("mesh-state.json");
    let text = fs::read_to_string(&path).unwrap();
    fs::write(&path, text.replacen("shop", "shoq", 1)).unwrap();
    let (code, _, err) = run(&["state", "show", "--state-dir", s(&dir)]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("digest"), "{err}");
}

#[test]
fn config_status_exit_codes_follow_drift() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let status = || {
        let (code, out, err) = run(&["config", "status", "--dir", s(dir), "--output", "json"]);
        (
            code,
            serde_json::from_str::<serde_json::Value>(&out).ok(),
            err,
        )
    };
    // No record: 2.
    assert_eq!(status().0, 2);
    fs::create_dir_all(dir.join("state")).unwrap();
    fs::write(
        dir.join("state/published.json"),
        r#"{"version":3,"digest":"sha256:aa","source":"file:/r","publishedUnixMs":1}"#,
    )
    .unwrap();
    // Published, no agent yet: no drift.
    assert_eq!(status().0, 0);
    let agents = |n2_version: u64, n2_digest: &str| {
        format!(
            r#"{{"n1":{{"version":3,"activeVersion":3,"activeDigest":"sha256:aa","seenUnixMs":1}},"n2":{{"version":3,"activeVersion":{n2_version},"activeDigest":"{n2_digest}","seenUnixMs":1}}}}"#
        )
    };
    fs::write(dir.join("state/agents.json"), agents(2, "sha256:bb")).unwrap();
    let (code, v, err) = status();
    assert_eq!(code, 1, "{err}");
    assert_eq!(v.unwrap()["drift"], serde_json::json!(["n2"]));
    // The same version with another digest is drift too.
    fs::write(dir.join("state/agents.json"), agents(3, "sha256:cc")).unwrap();
    assert_eq!(status().0, 1);
    fs::write(dir.join("state/agents.json"), agents(3, "sha256:aa")).unwrap();
    assert_eq!(status().0, 0);
    // A corrupt record: 2.
    fs::write(dir.join("state/agents.json"), "{").unwrap();
    assert_eq!(status().0, 2);
}
