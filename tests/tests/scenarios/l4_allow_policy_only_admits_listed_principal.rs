//! An ALLOW policy on b1 naming a1's principal: a1 reaches b1, a2 (another service
//! account, same node) is refused in the kernel with EPERM (the default deny of a selected
//! workload: no policy named), counted and logged. c1, not selected by any policy, stays
//! reachable by everyone.

use mesh_tests::{require_privileges, Host};

use super::policy_common::{
    authz, denied_count, expect_allowed, expect_denied, principal, wait_denied_log,
};
use crate::cluster;

#[test]
fn l4_allow_policy_only_admits_listed_principal() {
    require_privileges();
    let cluster = cluster()
        .nodes(2)
        .add_pod(0, "a1")
        .add_pod(0, "a2")
        .add_pod(1, "b1")
        .add_pod(1, "c1")
        .build();
    let allow = authz(
        "allow-a1",
        "b1",
        "ALLOW",
        &format!(
            "  rules:\n  - from:\n    - source: {{principals: [\"{}\"]}}\n",
            principal("a1")
        ),
    );
    let dir = cluster.write_policy_dir("policy", &[("allow.yaml", &allow)]);
    let agents = [
        cluster.start_agent_with_policy(0, &dir),
        cluster.start_agent_with_policy(1, &dir),
    ];
    let (a1, a2, b1, c1) = (
        cluster.pod("a1"),
        cluster.pod("a2"),
        cluster.pod("b1"),
        cluster.pod("c1"),
    );
    let _b = b1.serve(&[8080]);
    let _c = c1.serve(&[8080]);

    expect_allowed(a1, b1.addr4(8080));
    expect_allowed(a1, b1.addr6(8080));
    let before = denied_count(&cluster, 0);
    expect_denied(a2, b1.addr4(8080));
    expect_denied(a2, b1.addr6(8080));
    assert!(denied_count(&cluster, 0) >= before + 2);
    let line = wait_denied_log(&agents[0], b1.addr4(8080));
    assert_eq!(line["src_workload"], "default/a2", "{line}");
    assert_eq!(line["dst_workload"], "default/b1", "{line}");
    assert_eq!(line["policy"], "-", "{line}");

    expect_allowed(a2, c1.addr4(8080));
    expect_allowed(a1, c1.addr4(8080));
}
