//! AUDIT and dry-run policies log and never enforce.
//! - L4, dry-run DENY of a1 → b1: a1 connects and is served; the kernel counts
//!   `connect_would_deny` and a1's agent logs `dry-run deny` (side kernel) with the policy.
//! - L4, AUDIT of everything on b1: traffic flows; b1's agent logs `audit` with the policy.
//! - L7 (c1 on n2, HTTP on 8080), dry-run DENY of `/admin/*` and AUDIT of `/audited`: the
//!   requests are answered by the pod (200), c1's agent logs `dry-run deny` (layer l7) and
//!   `audit` (layer l7) with method, path and policy; no `connection denied` anywhere.

use mesh_common::counters as ctr;
use mesh_tests::{require_privileges, Host};

use super::policy_common::{apply, counters, docs, expect_allowed, lines, policy, wait_line};
use crate::cluster;

#[test]
fn policy_audit_and_dry_run_do_not_enforce() {
    require_privileges();
    let cluster = cluster()
        .nodes(2)
        .add_pod(0, "a1")
        .add_pod(1, "b1")
        .add_pod(1, "c1")
        .http_ports("c1", &[8080])
        .build();
    let agents = cluster.start_agents();
    let [a1, b1, c1] = ["a1", "b1", "c1"].map(|n| cluster.pod(n));
    let _b = b1.serve(&[8080]);
    let c_server = c1.serve_http(&[8080]);
    let yaml = docs(&[
        policy(
            "default",
            "dry-deny-a1",
            Some("b1"),
            "DENY",
            true,
            &format!(
                "  rules:\n  - from:\n    - source: {{principals: [\"{}\"]}}\n",
                a1.principal()
            ),
        ),
        policy(
            "default",
            "audit-all",
            Some("b1"),
            "AUDIT",
            false,
            "  rules:\n  - {}\n",
        ),
        policy(
            "default",
            "dry-no-admin",
            Some("c1"),
            "DENY",
            true,
            "  rules:\n  - to:\n    - operation: {paths: [\"/admin/*\"]}\n",
        ),
        policy(
            "default",
            "audit-audited",
            Some("c1"),
            "AUDIT",
            false,
            "  rules:\n  - to:\n    - operation: {paths: [\"/audited\"]}\n",
        ),
    ]);
    apply(&cluster, &agents, "audit-dry-run", &yaml);

    // L4.
    let would_before = counters(&cluster, 0)[ctr::CONNECT_WOULD_DENY as usize];
    expect_allowed(a1, b1.addr4(8080));
    expect_allowed(a1, b1.addr6(8080));
    assert!(
        counters(&cluster, 0)[ctr::CONNECT_WOULD_DENY as usize] >= would_before + 2,
        "connect_would_deny did not move"
    );
    let line = wait_line(&agents[0], "dry-run deny", "kernel", |v| {
        v["dst"] == b1.addr4(8080).to_string().as_str()
    });
    assert_eq!(line["side"], "kernel", "{line}");
    assert_eq!(line["layer"], "l4", "{line}");
    assert_eq!(line["policy"], "default/dry-deny-a1", "{line}");
    assert_eq!(line["src_workload"], "default/a1", "{line}");
    let line = wait_line(&agents[1], "audit", "l4 on b1", |v| {
        v["dst"] == b1.addr4(8080).to_string().as_str()
    });
    assert_eq!(line["policy"], "default/audit-all", "{line}");
    assert_eq!(line["layer"], "l4", "{line}");

    // L7.
    let run = a1.http1(
        c1.addr4(8080),
        &["GET /admin/x", "POST /audited +body=1", "GET /plain"],
        false,
    );
    assert_eq!(
        run.statuses(),
        vec![
            (200, "c1 GET /admin/x host=-".to_owned()),
            (200, "c1 POST /audited host=- body=1".to_owned()),
            (200, "c1 GET /plain host=-".to_owned()),
        ],
        "{run:?}"
    );
    assert_eq!(c_server.http_requests().len(), 3);
    let line = wait_line(&agents[1], "dry-run deny", "l7 /admin/x", |v| {
        v["path"] == "/admin/x"
    });
    assert_eq!(line["layer"], "l7", "{line}");
    assert_eq!(line["method"], "GET", "{line}");
    assert_eq!(line["policy"], "default/dry-no-admin", "{line}");
    let line = wait_line(&agents[1], "audit", "l7 /audited", |v| {
        v["path"] == "/audited"
    });
    assert_eq!(line["layer"], "l7", "{line}");
    assert_eq!(line["method"], "POST", "{line}");
    assert_eq!(line["policy"], "default/audit-audited", "{line}");
    assert!(lines(&agents[1], "audit", |v| v["path"] == "/plain").is_empty());
    assert!(lines(&agents[1], "dry-run deny", |v| v["path"] == "/plain").is_empty());

    for agent in &agents {
        let denied = lines(agent, "connection denied", |_| true);
        assert!(denied.is_empty(), "{}: {denied:?}", agent.spec().node);
    }
}
