//! `namespaces` and `notNamespaces` at L4, and the scope of a policy's own namespace. Pods in
//! `default` (a1, b1) and in `other` (x1, y1). An ALLOW on b1 from namespace `other` admits x1
//! and refuses a1 in the kernel; a DENY from `notNamespaces: [other]` does the same with the
//! policy named. A policy in namespace `other` without a selector applies to y1 only: b1 in
//! `default` stays reachable by everyone.

use mesh_tests::{require_privileges, Host};

use super::policy_common::{apply, docs, expect_allowed, expect_denied, policy, wait_line};
use crate::cluster;

#[test]
fn policy_namespaces_and_not_namespaces() {
    require_privileges();
    let cluster = cluster()
        .nodes(2)
        .add_pod(0, "a1")
        .add_pod(0, "x1")
        .add_pod(1, "b1")
        .add_pod(1, "y1")
        .namespace("x1", "other")
        .namespace("y1", "other")
        .build();
    let agents = cluster.start_agents();
    let [a1, x1, b1, y1] = ["a1", "x1", "b1", "y1"].map(|n| cluster.pod(n));
    let _b = b1.serve(&[8080]);
    let _y = y1.serve(&[8080]);

    apply(
        &cluster,
        &agents,
        "allow-ns",
        &policy(
            "default",
            "from-other",
            Some("b1"),
            "ALLOW",
            false,
            "  rules:\n  - from:\n    - source: {namespaces: [\"other\"]}\n",
        ),
    );
    expect_allowed(x1, b1.addr4(8080));
    expect_allowed(x1, b1.addr6(8080));
    expect_denied(a1, b1.addr4(8080));
    // y1 is not selected (another namespace): open to all.
    expect_allowed(a1, y1.addr4(8080));

    apply(
        &cluster,
        &agents,
        "deny-not-ns",
        &policy(
            "default",
            "only-other",
            Some("b1"),
            "DENY",
            false,
            "  rules:\n  - from:\n    - source: {notNamespaces: [\"other\"]}\n",
        ),
    );
    expect_denied(a1, b1.addr6(8080));
    let line = wait_line(&agents[0], "connection denied", "notNamespaces", |v| {
        v["policy"] == "default/only-other" && v["src_workload"] == "default/a1"
    });
    assert_eq!(line["dst"], b1.addr6(8080).to_string().as_str(), "{line}");
    expect_allowed(x1, b1.addr4(8080));

    // A namespace-wide policy in `other`: y1 admits `default` only; b1 is out of its scope.
    apply(
        &cluster,
        &agents,
        "scope",
        &docs(&[policy(
            "other",
            "from-default",
            None,
            "ALLOW",
            false,
            "  rules:\n  - from:\n    - source: {namespaces: [\"default\"]}\n",
        )]),
    );
    expect_allowed(a1, y1.addr4(8080));
    expect_denied(x1, y1.addr4(8080));
    expect_allowed(x1, b1.addr4(8080));
    expect_allowed(a1, b1.addr4(8080));
}
