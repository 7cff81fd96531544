//! The agent's audit log: a kernel L4 denial and a plaintext connection refused at the SYN
//! (STRICT) come back from `mesh-agent audit query` with their fields (workloads, identity,
//! addresses, port, policy, generation); `audit verify` passes on the untouched log; after a SIGKILL and a torn final line (a crash mid-write) the log verifies
//! up to its last complete record, and the restarted agent cuts the torn line, records it,
//! and continues the chain; through an upgrade (two agents on one directory for a moment)
//! and a clean stop the chain stays whole and verifies.

use std::{path::Path, process::Command, time::Duration};

use mesh_tests::{require_privileges, wait_for, ClientRequest, Host, DEFAULT_TIMEOUT};
use serde_json::Value;

use super::policy_common::{authz, expect_denied};
use crate::cluster;

/// Runs `mesh-agent audit ARGS…` (file work only: no namespace needed).
pub(super) fn audit(args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(mesh_tests::agent_bin());
    cmd.arg("audit").args(args);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("MESH_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd.output().expect("running mesh-agent audit");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub(crate) fn query(dir: &Path, filters: &[&str]) -> Vec<Value> {
    let mut args = vec!["query", dir.to_str().unwrap(), "--output", "json"];
    args.extend_from_slice(filters);
    let (code, out, err) = audit(&args);
    assert_eq!(code, 0, "audit query failed: {err}");
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The records `audit query DIR filters…` returns, once there are at least `at_least` of them
/// (a bounded wait: the writer is asynchronous).
pub(crate) fn query_until(dir: &Path, what: &str, filters: &[&str], at_least: usize) -> Vec<Value> {
    wait_for(DEFAULT_TIMEOUT, what, || {
        let r = query(dir, filters);
        (r.len() >= at_least).then_some(r)
    })
}

#[track_caller]
pub(crate) fn verify_ok(dir: &Path) -> String {
    let (code, out, err) = audit(&["verify", dir.to_str().unwrap()]);
    assert_eq!(code, 0, "audit verify failed:\n{out}{err}");
    out
}

#[test]
fn audit_log_records_kernel_denials_and_survives_sigkill() {
    require_privileges();
    // x1: a plaintext client outside the mesh (not in the registry).
    let cluster = cluster().nodes(2).add_unregistered_pod(0, "x1");
    let cluster = cluster.add_pod(0, "a1").add_pod(1, "b1").build();
    // Port 8080 of b1 is closed to everyone: decided in the kernel at a1's connect().
    let rules = "  rules:\n  - to:\n    - operation: {ports: [\"8080\"]}\n";
    let deny = authz("close-8080", "b1", "DENY", rules);
    let dir = cluster.write_policy_dir("policy", &[("deny.yaml", &deny)]);
    let mut agent = cluster.start_agent_with_policy(0, &dir);
    let n2 = cluster.start_agent_with_policy(1, &dir);
    let audit_dir = agent.spec().identity_dir.join("state/audit");
    let (a1, b1) = (cluster.pod("a1"), cluster.pod("b1"));
    let _server = b1.serve(&[8080]);

    expect_denied(a1, b1.addr4(8080));
    let denial = query_until(
        &audit_dir,
        "the kernel denial in `audit query`",
        &[
            "--kind",
            "connection",
            "--verdict",
            "deny",
            "--dst",
            "default/b1",
            "--port",
            "8080",
        ],
        1,
    )
    .swap_remove(0);
    for (field, want) in [
        ("layer", "kernel"),
        ("node", "n1"),
        ("src_workload", "default/a1"),
        ("src_identity", "spiffe://cluster.local/ns/default/sa/sa-a1"),
        ("dst_identity", "spiffe://cluster.local/ns/default/sa/sa-b1"),
        ("policy", "default/close-8080"),
    ] {
        assert_eq!(denial[field], want, "{field} in {denial}");
    }
    assert!(
        denial["generation"].as_u64().is_some_and(|g| g >= 1),
        "{denial}"
    );
    // Other filters exclude it.
    assert!(query(&audit_dir, &["--dst", "default/b1", "--verdict", "allow"]).is_empty());
    assert_eq!(query(&audit_dir, &["--kind", "agent_start"]).len(), 1);
    verify_ok(&audit_dir);

    // Plaintext from outside the mesh to the STRICT b1: refused at the SYN on n2, recorded
    // in n2's log.
    let run = cluster.pod("x1").client(
        &ClientRequest::new(b1.addr4(8080))
            .send("plaintext")
            .io_timeout(Duration::from_millis(1500)),
    );
    assert!(
        !run.success(),
        "plaintext to STRICT b1 succeeded: {:?}",
        run.results
    );
    let n2_dir = n2.spec().identity_dir.join("state/audit");
    let refused = wait_for(DEFAULT_TIMEOUT, "`plaintext refused` in n2's log", || {
        query(&n2_dir, &["--kind", "plaintext", "--verdict", "refused"])
            .into_iter()
            .next()
    });
    assert_eq!(refused["dst_workload"], "default/b1", "{refused}");
    assert_eq!(refused["dst_addr"], b1.addr4(8080).to_string(), "{refused}");
    assert_eq!(refused["node"], "n2", "{refused}");
    let src = refused["src_addr"].as_str().unwrap_or_default();
    assert!(
        src.starts_with(&format!("{}:", cluster.pod("x1").ip4())),
        "{refused}"
    );
    verify_ok(&n2_dir);

    // A crash: SIGKILL, and a record torn mid-write at the end of the last segment.
    agent.kill_sigkill();
    let segments = mesh_agent_segments(&audit_dir);
    let last = segments.last().expect("a segment");
    let mut f = std::fs::OpenOptions::new().append(true).open(last).unwrap();
    std::io::Write::write_all(&mut f, b"{\"v\":1,\"seq\":99999,\"time\":\"2026-").unwrap();
    drop(f);
    let out = verify_ok(&audit_dir);
    assert!(out.contains("torn final line"), "{out}");

    agent.restart();
    let recovered = wait_for(DEFAULT_TIMEOUT, "the `recovered` record", || {
        query(&audit_dir, &["--kind", "recovered"])
            .into_iter()
            .next()
    });
    assert_eq!(recovered["action"], "torn_tail_cut", "{recovered}");
    assert_eq!(query(&audit_dir, &["--kind", "agent_start"]).len(), 2);
    expect_denied(a1, b1.addr4(8080));
    wait_for(DEFAULT_TIMEOUT, "the second denial", || {
        (query(&audit_dir, &["--verdict", "deny", "--dst", "default/b1"]).len() >= 2).then_some(())
    });
    // An upgrade: two agents share the directory for a moment; the new one's records wait
    // until the old one has written its `agent_stop` and closed the log.
    agent.upgrade(Duration::from_secs(1));
    wait_for(DEFAULT_TIMEOUT, "the upgraded agent's agent_start", || {
        (query(&audit_dir, &["--kind", "agent_start"]).len() == 3).then_some(())
    });
    agent.stop();
    let kinds: Vec<String> = query(&audit_dir, &[])
        .iter()
        .filter_map(|r| {
            r["kind"]
                .as_str()
                .filter(|k| k.starts_with("agent_"))
                .map(str::to_owned)
        })
        .collect();
    // The SIGKILLed run has no stop; the upgraded one stopped before its successor started.
    assert_eq!(
        kinds,
        [
            "agent_start",
            "agent_start",
            "agent_stop",
            "agent_start",
            "agent_stop"
        ],
        "{kinds:?}"
    );
    let out = verify_ok(&audit_dir);
    assert!(out.starts_with("ok: "), "{out}");
}

pub(super) fn mesh_agent_segments(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let p = e.unwrap().path();
            let name = p.file_name()?.to_str()?.to_owned();
            (name.starts_with("segment-") && name.ends_with(".jsonl")).then_some(p)
        })
        .collect();
    v.sort();
    v
}
