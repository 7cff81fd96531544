//! A policy change reaches connections that are already open, and only those it denies.
//!
//! Four connections to b1 (on n2) are held open through the mesh: a1 and a2 from n1 (HBONE),
//! b2 and b3 from n2 itself (same-node, the agent is both ends). `mesh-agent policy apply`
//! then installs a DENY for the principals of a1 and b2 only, on both nodes:
//! - a1's and b2's connections are closed within ~2 s of the apply; n2's agent logs
//!   `connection closed: no longer allowed` for each, naming the source identity, b1 and the
//!   policy;
//! - a2's and b3's stay open for their whole hold time (the `held` event), and new connections
//!   from a2 and b3 still echo, while new ones from a1 and b2 fail at `connect()` (EPERM).

use std::time::{Duration, Instant};

use mesh_tests::{require_privileges, wait_for, HeldConnection, Host, Pod, DEFAULT_TIMEOUT};
use serde_json::Value;

use super::policy_common::{authz, expect_allowed, expect_denied, principal};
use crate::cluster;

/// How long after the apply returned a denied connection must be closed.
const CLOSE_WITHIN: Duration = Duration::from_secs(2);
/// How long the connections that stay allowed are held.
const KEEP: Duration = Duration::from_secs(6);

#[track_caller]
fn established(who: &str, held: &HeldConnection) -> Value {
    wait_for(DEFAULT_TIMEOUT, &format!("{who}'s held connection"), || {
        if let Some(f) = held.failed() {
            panic!("{who}: held connection failed: {f}");
        }
        held.established()
    })
}

/// The hold client's event `kind` (`held`: nothing closed the connection within its hold time).
fn event(h: &mut HeldConnection, kind: &str) -> Option<Value> {
    h.proc()
        .stdout_lines()
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["event"].as_str() == Some(kind))
}

#[test]
fn policy_change_closes_live_connection_keeps_allowed() {
    require_privileges();
    let cluster = cluster()
        .nodes(2)
        .add_pod(0, "a1")
        .add_pod(0, "a2")
        .add_pod(1, "b1")
        .add_pod(1, "b2")
        .add_pod(1, "b3")
        .build();
    let agents = cluster.start_agents();
    let (a1, a2) = (cluster.pod("a1"), cluster.pod("a2"));
    let (b1, b2, b3) = (cluster.pod("b1"), cluster.pod("b2"), cluster.pod("b3"));
    let _server = b1.serve(&[8080]);
    let dst = b1.addr4(8080);

    // Denied later: held "forever"; kept: held for KEEP, counted from now.
    let long = Duration::from_secs(60);
    let mut held: Vec<(&Pod, HeldConnection, bool)> = vec![
        (a1, a1.hold(dst, long), true),
        (b2, b2.hold(dst, long), true),
        (a2, a2.hold(dst, KEEP), false),
        (b3, b3.hold(dst, KEEP), false),
    ];
    for (pod, h, _) in &held {
        let e = established(pod.name(), h);
        assert_eq!(
            e["hello"].as_str(),
            Some(format!("b1 {dst}").as_str()),
            "{}: {e}",
            pod.name()
        );
    }
    // Both sides carry them: HBONE into n2, and n2's own same-node connections.
    let inbound = r#"mesh_connections_active{direction="inbound"}"#;
    wait_for(DEFAULT_TIMEOUT, "two open inbound tunnels on n2", || {
        (cluster.node(1).metric(inbound) >= 2.0).then_some(())
    });

    let rules = format!(
        "  rules:\n  - from:\n    - source: {{principals: [\"{}\", \"{}\"]}}\n",
        principal("a1"),
        principal("b2")
    );
    let dir = cluster.write_policy_dir(
        "deny-a1-b2",
        &[("p.yaml", &authz("deny-a1-b2", "b1", "DENY", &rules))],
    );
    let applied_at = Instant::now();
    for node in [1, 0] {
        let applied = cluster.policy_apply(node, &dir);
        assert_eq!(applied.code, Some(0), "n{}: {applied:?}", node + 1);
    }

    // The denied ones are closed, quickly, and n2 says why.
    for (pod, h, denied) in &held {
        if !denied {
            continue;
        }
        let closed = wait_for(
            CLOSE_WITHIN.saturating_sub(applied_at.elapsed()) + Duration::from_millis(500),
            &format!("{}'s connection closed", pod.name()),
            || h.closed(),
        );
        assert!(
            applied_at.elapsed() < CLOSE_WITHIN + Duration::from_millis(500),
            "{}: closed only after {:?}: {closed}",
            pod.name(),
            applied_at.elapsed()
        );
        let id = pod.spiffe_id();
        let line = wait_for(
            DEFAULT_TIMEOUT,
            &format!("n2 closes {}'s connection", pod.name()),
            || {
                agents[1].log_lines().into_iter().find(|l| {
                    l["message"] == "connection closed: no longer allowed"
                        && l["src_identity"].as_str() == Some(id.as_str())
                })
            },
        );
        assert_eq!(
            line["dst_workload"].as_str(),
            Some(b1.workload().as_str()),
            "{line}"
        );
        assert_eq!(
            line["policy"].as_str(),
            Some("default/deny-a1-b2"),
            "{line}"
        );
    }

    // The allowed ones were never touched: held for their whole time, then ended by the
    // client itself (`held`), not by the mesh (`closed`).
    for (pod, h, denied) in &mut held {
        if *denied {
            continue;
        }
        let held_event = wait_for(
            KEEP + DEFAULT_TIMEOUT,
            &format!("{}'s connection held to the end", pod.name()),
            || {
                if let Some(c) = h.closed() {
                    panic!("{}: allowed connection closed: {c}", pod.name());
                }
                event(h, "held")
            },
        );
        assert!(held_event["held_ms"].as_u64().unwrap_or(0) >= KEEP.as_millis() as u64 - 100);
    }
    let closed_lines: Vec<Value> = agents[1]
        .log_lines()
        .into_iter()
        .filter(|l| l["message"] == "connection closed: no longer allowed")
        .collect();
    assert_eq!(closed_lines.len(), 2, "{closed_lines:?}");

    // New connections: the kept sources still echo, the denied ones fail at connect().
    expect_allowed(a2, dst);
    expect_allowed(b3, dst);
    expect_denied(a1, dst);
    expect_denied(b2, dst);
}
