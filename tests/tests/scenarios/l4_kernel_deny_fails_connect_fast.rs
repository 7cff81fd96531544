//! A DENY policy for a1 → b1 port 8080 is decided in the kernel of a1's node: connect()
//! fails with EPERM at once (well under 100 ms), nothing reaches b1's node (no inbound
//! record, the server accepted nothing), `connect_denied_policy` moves and a1's agent logs
//! `connection denied` (layer l4, side kernel) naming both workloads, the port and the
//! policy. Other ports and other sources are untouched.

use mesh_tests::{require_privileges, Host};

use super::policy_common::{
    authz, denied_count, expect_allowed, expect_denied, inbound_seen, principal, wait_denied_log,
};
use crate::cluster;

#[test]
fn l4_kernel_deny_fails_connect_fast() {
    require_privileges();
    let cluster = cluster()
        .nodes(2)
        .add_pod(0, "a1")
        .add_pod(0, "a2")
        .add_pod(1, "b1")
        .build();
    let deny = authz(
        "deny-a1",
        "b1",
        "DENY",
        &format!(
            "  rules:\n  - from:\n    - source: {{principals: [\"{}\"]}}\n    to:\n    - operation: {{ports: [\"8080\"]}}\n",
            principal("a1")
        ),
    );
    let dir = cluster.write_policy_dir("policy", &[("deny.yaml", &deny)]);
    let agents = [
        cluster.start_agent_with_policy(0, &dir),
        cluster.start_agent_with_policy(1, &dir),
    ];
    assert!(
        agents[0]
            .log_lines()
            .iter()
            .any(|v| v["message"] == "policy applied"
                && v["generation"].as_u64().is_some_and(|g| g >= 1)),
        "no `policy applied` on n1:\n{}",
        agents[0].tail_stdout(20)
    );
    let (a1, a2, b1) = (cluster.pod("a1"), cluster.pod("a2"), cluster.pod("b1"));
    let server = b1.serve(&[8080, 9090]);
    let before = denied_count(&cluster, 0);

    for dst in [b1.addr4(8080), b1.addr6(8080)] {
        expect_denied(a1, dst);
        let line = wait_denied_log(&agents[0], dst);
        assert_eq!(line["layer"], "l4", "{line}");
        assert_eq!(line["side"], "kernel", "{line}");
        assert_eq!(line["src_workload"], "default/a1", "{line}");
        assert_eq!(
            line["src_identity"], "spiffe://cluster.local/ns/default/sa/sa-a1",
            "{line}"
        );
        assert_eq!(line["dst_workload"], "default/b1", "{line}");
        assert_eq!(line["port"], 8080, "{line}");
        assert_eq!(line["policy"], "default/deny-a1", "{line}");
    }
    assert!(
        denied_count(&cluster, 0) >= before + 2,
        "connect_denied_policy did not move"
    );
    // Nothing arrived at b1's node.
    assert!(
        server.accepted().is_empty(),
        "b1 accepted {:?}",
        server.accepted()
    );
    assert!(
        !inbound_seen(&agents[1], b1.addr4(8080)),
        "n2 saw an inbound connection"
    );
    assert_eq!(denied_count(&cluster, 1), 0);

    // Another port, and another source, are not denied.
    expect_allowed(a1, b1.addr4(9090));
    expect_allowed(a2, b1.addr4(8080));
}
