//! How policies combine, at L4 and at L7, across nodes (b1) and on the same node (c1, HTTP on
//! 8080):
//! - a DENY matching a1 beats an ALLOW matching a1 (the DENY is named);
//! - no ALLOW policy selects the destination → allowed (a DENY for someone else changes
//!   nothing);
//! - an ALLOW that does not match → denied (default deny, no policy named);
//! - an ALLOW without `rules` (and with `rules: []`) → denies everyone;
//! - an ALLOW with `rules: [{}]` → allows everyone;
//! - at L7, a request matching both an ALLOW and a DENY gets 403.

use mesh_tests::{require_privileges, Host, Pod};

use super::policy_common::{apply, docs, expect_allowed, expect_denied, policy, wait_line};
use crate::cluster;

fn on(pods: &[&Pod], name: &str, action: &str, tail: &str) -> String {
    docs(
        &pods
            .iter()
            .map(|p| {
                policy(
                    "default",
                    &format!("{name}-{}", p.name()),
                    Some(p.name()),
                    action,
                    false,
                    tail,
                )
            })
            .collect::<Vec<_>>(),
    )
}

fn from(principal: &str) -> String {
    format!("  rules:\n  - from:\n    - source: {{principals: [\"{principal}\"]}}\n")
}

#[test]
fn policy_deny_beats_allow_and_defaults() {
    require_privileges();
    let cluster = cluster()
        .nodes(2)
        .add_pod(0, "a1")
        .add_pod(0, "a2")
        .add_pod(0, "c1")
        .add_pod(1, "b1")
        .http_ports("c1", &[8080])
        .build();
    let agents = cluster.start_agents();
    let [a1, a2, b1, c1] = ["a1", "a2", "b1", "c1"].map(|n| cluster.pod(n));
    let _b = b1.serve(&[8080]);
    let _c = c1.serve_http(&[8080]);
    let dsts = [b1, c1];
    let http_ok = |src: &Pod| {
        let run = src.http1(c1.addr4(8080), &["GET /x"], false);
        assert_eq!(
            run.statuses(),
            vec![(200, "c1 GET /x host=-".to_owned())],
            "{run:?}"
        );
    };

    // DENY beats ALLOW.
    let yaml = format!(
        "{}---\n{}",
        on(&[b1], "allow", "ALLOW", &from(&a1.principal())),
        on(&[b1], "deny", "DENY", &from(&a1.principal()))
    );
    apply(&cluster, &agents, "deny-beats-allow", &yaml);
    expect_denied(a1, b1.addr4(8080));
    wait_line(&agents[0], "connection denied", "the DENY named", |v| {
        v["policy"] == "default/deny-b1" && v["src_workload"] == "default/a1"
    });
    expect_denied(a2, b1.addr4(8080));

    // No ALLOW policy: a DENY for a2 leaves a1 allowed.
    apply(
        &cluster,
        &agents,
        "no-allow",
        &on(&dsts, "deny", "DENY", &from(&a2.principal())),
    );
    expect_allowed(a1, b1.addr4(8080));
    http_ok(a1);
    expect_denied(a2, b1.addr4(8080));
    expect_denied(a2, c1.addr4(8080));

    // An ALLOW that matches nobody here.
    apply(
        &cluster,
        &agents,
        "allow-nobody",
        &on(
            &dsts,
            "allow",
            "ALLOW",
            &from("cluster.local/ns/default/sa/nobody"),
        ),
    );
    for dst in dsts {
        expect_denied(a1, dst.addr4(8080));
        expect_denied(a2, dst.addr6(8080));
    }

    // ALLOW without rules, and with an empty rule list: deny-all.
    for (label, tail) in [("no-rules", ""), ("empty-rules", "  rules: []\n")] {
        apply(&cluster, &agents, label, &on(&dsts, "allow", "ALLOW", tail));
        for dst in dsts {
            expect_denied(a1, dst.addr4(8080));
            expect_denied(a2, dst.addr4(8080));
        }
    }

    // `rules: [{}]`: allow-all.
    apply(
        &cluster,
        &agents,
        "allow-all",
        &on(&dsts, "allow", "ALLOW", "  rules:\n  - {}\n"),
    );
    expect_allowed(a1, b1.addr4(8080));
    expect_allowed(a2, b1.addr6(8080));
    http_ok(a1);
    http_ok(a2);

    // L7: ALLOW /x, DENY /x for a2 — a2 gets 403 on the same connection that serves /y.
    let yaml = format!(
        "{}---\n{}",
        on(&[c1], "allow", "ALLOW", "  rules:\n  - to:\n    - operation: {paths: [\"/x\", \"/y\"]}\n"),
        on(&[c1], "deny", "DENY", &format!(
            "  rules:\n  - from:\n    - source: {{principals: [\"{}\"]}}\n    to:\n    - operation: {{paths: [\"/x\"]}}\n",
            a2.principal()))
    );
    apply(&cluster, &agents, "l7-deny-beats-allow", &yaml);
    http_ok(a1);
    let run = a2.http1(c1.addr4(8080), &["GET /x", "GET /y", "GET /z"], false);
    assert_eq!(
        run.statuses(),
        vec![
            (403, "RBAC: access denied".to_owned()),
            (200, "c1 GET /y host=-".to_owned()),
            (403, "RBAC: access denied".to_owned()),
        ],
        "{run:?}"
    );
    let line = wait_line(&agents[0], "connection denied", "l7 DENY /x", |v| {
        v["layer"] == "l7" && v["path"] == "/x"
    });
    assert_eq!(line["policy"], "default/deny-c1", "{line}");
    assert_eq!(line["side"], "local", "{line}");
}
