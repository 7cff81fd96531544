//! `principals` and `notPrincipals` at L4, across nodes and on the same node. An ALLOW naming
//! a1's principal admits a1 only: a2 (same namespace, another service account) and x1 (another
//! namespace) fail `connect()` with EPERM at once, the source agent logs `connection denied`
//! (kernel) and the destination's agent and pod see nothing. `notPrincipals: [a1]` turns it
//! round, and a prefix principal (`…/ns/other/*`) admits exactly the other namespace.
//! Same-node connections that are allowed are carried locally (`transport: local`).

use mesh_tests::{require_privileges, Host};

use super::policy_common::{
    apply, docs, expect_allowed, expect_denied, inbound_seen, policy, wait_line,
};
use crate::cluster;

#[test]
fn policy_principals_and_not_principals() {
    require_privileges();
    let cluster = cluster()
        .nodes(2)
        .add_pod(0, "a1")
        .add_pod(0, "a2")
        .add_pod(0, "x1")
        .add_pod(0, "c1")
        .add_pod(1, "b1")
        .namespace("x1", "other")
        .build();
    let agents = cluster.start_agents();
    let [a1, a2, x1, b1, c1] = ["a1", "a2", "x1", "b1", "c1"].map(|n| cluster.pod(n));
    let b_server = b1.serve(&[8080]);
    let _c_server = c1.serve(&[8080]);
    let both = |action: &str, source: &str| {
        docs(&[b1, c1].map(|p| {
            policy(
                "default",
                &format!("p-{}", p.name()),
                Some(p.name()),
                action,
                false,
                &format!("  rules:\n  - from:\n    - source: {source}\n"),
            )
        }))
    };

    // ALLOW principals [a1].
    apply(
        &cluster,
        &agents,
        "allow-a1",
        &both(
            "ALLOW",
            &format!("{{principals: [\"{}\"]}}", a1.principal()),
        ),
    );
    let ok = expect_allowed(a1, b1.addr4(8080));
    let flow = agents[0].wait_flow_from(ok.local_addr().expect("local"));
    assert_eq!(flow.raw["transport"], "hbone", "{:?}", flow.raw);
    let ok = expect_allowed(a1, c1.addr6(8080));
    let flow = agents[0].wait_flow_from(ok.local_addr().expect("local"));
    assert_eq!(flow.raw["transport"], "local", "{:?}", flow.raw);
    let accepted_before = b_server.accepted().len();
    for (src, dst) in [
        (a2, b1.addr4(8080)),
        (x1, b1.addr6(8080)),
        (a2, c1.addr4(8080)),
    ] {
        expect_denied(src, dst);
        let line = wait_line(&agents[0], "connection denied", "kernel", |v| {
            v["dst"] == dst.to_string().as_str() && v["src_workload"] == src.workload().as_str()
        });
        assert_eq!(line["layer"], "l4", "{line}");
        assert_eq!(line["side"], "kernel", "{line}");
        assert_eq!(line["src_identity"], src.spiffe_id().as_str(), "{line}");
        // The default deny of a selected workload: no policy is named.
        assert_eq!(line["policy"], "-", "{line}");
    }
    assert_eq!(x1.workload(), "other/x1");
    assert_eq!(
        b_server.accepted().len(),
        accepted_before,
        "b1 accepted a denied connection"
    );
    assert!(
        !inbound_seen(&agents[1], b1.addr6(8080)),
        "n2 saw the denied x1 connection"
    );
    assert!(
        !agents[1]
            .log_lines()
            .iter()
            .any(|v| v["message"] == "inbound" && v["peer_identity"] != a1.spiffe_id().as_str()),
        "n2 saw a tunnel from someone other than a1"
    );

    // ALLOW notPrincipals [a1]: everyone but a1.
    apply(
        &cluster,
        &agents,
        "not-a1",
        &both(
            "ALLOW",
            &format!("{{notPrincipals: [\"{}\"]}}", a1.principal()),
        ),
    );
    expect_denied(a1, b1.addr4(8080));
    expect_denied(a1, c1.addr4(8080));
    expect_allowed(a2, b1.addr4(8080));
    expect_allowed(x1, b1.addr4(8080));
    expect_allowed(x1, c1.addr4(8080));

    // DENY a prefix principal: the whole `other` namespace, nobody else.
    apply(
        &cluster,
        &agents,
        "deny-other",
        &both("DENY", "{principals: [\"cluster.local/ns/other/*\"]}"),
    );
    expect_denied(x1, b1.addr4(8080));
    let line = wait_line(&agents[0], "connection denied", "named DENY", |v| {
        v["src_workload"] == "other/x1" && v["policy"] == "default/p-b1"
    });
    assert_eq!(line["dst_workload"], "default/b1", "{line}");
    expect_denied(x1, c1.addr6(8080));
    expect_allowed(a1, b1.addr4(8080));
    expect_allowed(a2, c1.addr4(8080));
}
