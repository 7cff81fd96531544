//! `ports` and `notPorts` at L4: b1 serves 8080 and 9090. An ALLOW to port 8080 admits 8080
//! and refuses 9090 in the kernel (both families); a DENY to `notPorts: [8080]` does the same
//! with the policy named; the same-node path (c1) is held to the same rule.

use mesh_tests::{require_privileges, Host};

use super::policy_common::{apply, docs, expect_allowed, expect_denied, policy, wait_line};
use crate::cluster;

#[test]
fn policy_ports_and_not_ports() {
    require_privileges();
    let cluster = cluster()
        .nodes(2)
        .add_pod(0, "a1")
        .add_pod(0, "c1")
        .add_pod(1, "b1")
        .build();
    let agents = cluster.start_agents();
    let [a1, b1, c1] = ["a1", "b1", "c1"].map(|n| cluster.pod(n));
    let _b = b1.serve(&[8080, 9090]);
    let _c = c1.serve(&[8080, 9090]);
    let both = |action: &str, op: &str| {
        docs(&[b1, c1].map(|p| {
            policy(
                "default",
                &format!("ports-{}", p.name()),
                Some(p.name()),
                action,
                false,
                &format!("  rules:\n  - to:\n    - operation: {op}\n"),
            )
        }))
    };

    apply(
        &cluster,
        &agents,
        "allow-8080",
        &both("ALLOW", "{ports: [\"8080\"]}"),
    );
    for dst in [b1, c1] {
        expect_allowed(a1, dst.addr4(8080));
        expect_allowed(a1, dst.addr6(8080));
        expect_denied(a1, dst.addr4(9090));
        expect_denied(a1, dst.addr6(9090));
    }
    let line = wait_line(&agents[0], "connection denied", "port 9090", |v| {
        v["port"] == 9090
    });
    assert_eq!(line["policy"], "-", "{line}");

    apply(
        &cluster,
        &agents,
        "deny-not-8080",
        &both("DENY", "{notPorts: [\"8080\"]}"),
    );
    for dst in [b1, c1] {
        expect_allowed(a1, dst.addr4(8080));
        expect_denied(a1, dst.addr4(9090));
        let name = format!("default/ports-{}", dst.name());
        wait_line(&agents[0], "connection denied", "notPorts", |v| {
            v["port"] == 9090 && v["policy"] == name.as_str()
        });
    }
}
