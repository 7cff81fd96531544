//! The authority keeps every node's signed audit checkpoints: the node's audit key is
//! registered at the authority on first use, bound to the node's certificate identity; the
//! agent sends each checkpoint it writes over its mTLS channel; the authority keeps them in
//! `<authority-dir>/audit-nodes/<node>/checkpoints.jsonl` and records what it accepted in its
//! own audit log. The node's log also holds the policy directory accepted and refused, the
//! generation swap it saw, and the workload certificate issued. An attacker on the node who deletes the last segment together with the
//! node's own checkpoints leaves a log that verifies locally, but `audit verify
//! --checkpoints <the authority's copy>` reports the missing tail.

use std::path::Path;

use mesh_tests::{require_privileges, wait_for, Agent, DEFAULT_TIMEOUT};
use serde_json::Value;

use super::audit_log_records_kernel_denials_and_survives_sigkill::{audit, mesh_agent_segments};
use super::policy_common::authz;
use crate::cluster;

/// The highest checkpoint seq in a checkpoints file (none if missing or empty).
fn last_checkpoint(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok()?["seq"].as_u64())
        .max()
}

/// The node's records of `kind`, as (action, subject) pairs.
fn events(dir: &Path, kind: &str) -> Vec<(String, String)> {
    let (code, out, err) = audit(&[
        "query",
        dir.to_str().unwrap(),
        "--kind",
        kind,
        "--output",
        "json",
    ]);
    assert_eq!(code, 0, "audit query: {err}");
    out.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|r| {
            let s = |f: &str| r[f].as_str().unwrap_or_default().to_owned();
            (s("action"), s("subject"))
        })
        .collect()
}

#[test]
fn audit_checkpoints_kept_by_authority_catch_deleted_segment() {
    require_privileges();
    let cluster = cluster().nodes(1).add_pod(0, "a1").build();
    let rules = "  rules:\n  - to:\n    - operation: {ports: [\"8080\"]}\n";
    let policy = cluster.write_policy_dir(
        "policy",
        &[("deny.yaml", &authz("close-8080", "a1", "DENY", rules))],
    );
    let mut spec = cluster.agent_spec(0);
    spec.policy_dir = Some(policy.clone());
    // Segments rotate every second, checkpoints every second: a restart leaves several.
    spec.extra_args = ["--audit-segment-secs", "1", "--audit-checkpoint-secs", "1"]
        .map(String::from)
        .to_vec();
    let mut agent = Agent::start(spec);
    let audit_dir = agent.spec().identity_dir.join("state/audit");
    let authority_dir = cluster.authority().dir().to_owned();
    let node_dir = authority_dir.join("audit-nodes/n1");
    let copy = node_dir.join("checkpoints.jsonl");
    let local = audit_dir.join("checkpoints.jsonl");

    // Trust on first use: the key the node exported is the one the authority bound to n1.
    let registered = wait_for(DEFAULT_TIMEOUT, "n1's audit key at the authority", || {
        std::fs::read_to_string(node_dir.join("audit-key.pub")).ok()
    });
    let exported = std::fs::read_to_string(audit_dir.join("audit-key.pub")).unwrap();
    assert_eq!(registered.trim(), exported.trim());
    wait_for(DEFAULT_TIMEOUT, "an audit segment closed by age", || {
        agent
            .log_lines()
            .iter()
            .any(|l| l["message"] == "audit segment closed")
            .then_some(())
    });
    // The node's own events: the policy directory accepted at start, the workload
    // certificate issued; a change accepted and the new generation seen active; then a
    // broken file refused (the generation stays).
    wait_for(
        DEFAULT_TIMEOUT,
        "the policy directory accepted at start",
        || {
            events(&audit_dir, "config")
                .iter()
                .any(|(a, s)| a == "accepted" && Path::new(s) == policy)
                .then_some(())
        },
    );
    let certs = events(&audit_dir, "cert");
    assert!(
        certs.contains(&(
            "issued".into(),
            "spiffe://cluster.local/ns/default/sa/sa-a1".into()
        )),
        "{certs:?} {}",
        audit(&["query", audit_dir.to_str().unwrap(), "--output", "json"]).1
    );
    let rules = "  rules:\n  - to:\n    - operation: {ports: [\"9090\"]}\n";
    std::fs::write(
        policy.join("more.yaml"),
        authz("close-9090", "a1", "DENY", rules),
    )
    .unwrap();
    wait_for(DEFAULT_TIMEOUT, "the change accepted and activated", || {
        let e = events(&audit_dir, "config");
        (e.iter().filter(|(a, _)| a == "accepted").count() == 2
            && e.iter()
                .any(|(a, s)| a == "activated" && s == "policy_generation"))
        .then_some(())
    });
    std::fs::write(
        policy.join("broken.yaml"),
        "kind: AuthorizationPolicy\nspec: [not a map\n",
    )
    .unwrap();
    wait_for(DEFAULT_TIMEOUT, "the broken policy refused", || {
        events(&audit_dir, "config")
            .iter()
            .any(|(a, _)| a == "refused")
            .then_some(())
    });
    // A revocation: the authority records it as its service picks it up; the node records
    // its certificate revoked and the replacement.
    let (_, out, _) = audit(&[
        "query",
        audit_dir.to_str().unwrap(),
        "--kind",
        "cert",
        "--output",
        "json",
    ]);
    let issued: Value =
        serde_json::from_str(out.lines().next().expect("an issued record")).unwrap();
    let serial = issued["detail"]
        .as_str()
        .and_then(|d| d.strip_prefix("serial "))
        .and_then(|d| d.split(',').next())
        .unwrap_or_else(|| panic!("no serial in {issued}"))
        .to_owned();
    cluster.authority().revoke(&serial);
    let authority_audit = authority_dir.join("audit");
    wait_for(
        DEFAULT_TIMEOUT,
        "the revocation in the authority's log",
        || {
            events(&authority_audit, "cert")
                .contains(&("revoked".into(), serial.clone()))
                .then_some(())
        },
    );
    wait_for(
        DEFAULT_TIMEOUT,
        "the node's certificate revoked and rotated",
        || {
            let e = events(&audit_dir, "cert");
            (e.iter().any(|(a, _)| a == "revoked") && e.iter().any(|(a, _)| a == "rotated"))
                .then_some(())
        },
    );
    wait_for(DEFAULT_TIMEOUT, "checkpoints counted as sent", || {
        let m = cluster.node(0).metrics();
        (m.get(r#"mesh_audit_checkpoints_forwarded_total{result="sent"}"#)
            .is_some_and(|v| *v >= 1.0)
            && m.get(r#"mesh_audit_checkpoints_forwarded_total{result="refused"}"#)
                .is_none_or(|v| *v == 0.0))
        .then_some(())
    });
    agent.restart();
    agent.stop();
    // The final checkpoint (after `agent_stop`) reached the authority too.
    let last_local = last_checkpoint(&local).expect("local checkpoints");
    wait_for(DEFAULT_TIMEOUT, "the authority's copy up to date", || {
        (last_checkpoint(&copy) == Some(last_local)).then_some(())
    });
    let segs = mesh_agent_segments(&audit_dir);
    assert!(segs.len() >= 2, "{segs:?}");
    let (code, out, err) = audit(&[
        "verify",
        audit_dir.to_str().unwrap(),
        "--checkpoints",
        copy.to_str().unwrap(),
    ]);
    assert_eq!(
        code, 0,
        "untouched log against the authority's copy:\n{out}{err}"
    );

    // The attack: the last segment and the node's own checkpoints go.
    std::fs::remove_file(segs.last().unwrap()).unwrap();
    std::fs::write(&local, "").unwrap();
    let (code, out, err) = audit(&["verify", audit_dir.to_str().unwrap()]);
    assert_eq!(code, 0, "locally the deletion is invisible:\n{out}{err}");
    let (code, out, err) = audit(&[
        "verify",
        audit_dir.to_str().unwrap(),
        "--checkpoints",
        copy.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "the authority's copy must catch it:\n{out}{err}");
    assert!(
        out.contains("the tail (or the last segments) was removed"),
        "{out}{err}"
    );

    // The authority's own audit log recorded the custody and the certificates it issued.
    let records = wait_for(DEFAULT_TIMEOUT, "custody records at the authority", || {
        let (code, out, _) = audit(&[
            "query",
            authority_audit.to_str().unwrap(),
            "--output",
            "json",
        ]);
        let v: Vec<Value> = out
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        (code == 0
            && v.iter()
                .any(|r| r["kind"] == "custody" && r["action"] == "checkpoint_accepted")
            && v.iter()
                .any(|r| r["kind"] == "cert" && r["action"] == "issued"))
        .then_some(v)
    });
    let registered = records
        .iter()
        .find(|r| r["kind"] == "custody" && r["action"] == "key_registered")
        .expect("key_registered record");
    assert_eq!(registered["subject"], "n1", "{registered}");
    assert!(records.iter().all(|r| r["node"] == "authority"));
}
