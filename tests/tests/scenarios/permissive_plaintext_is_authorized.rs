//! Plaintext accepted under PERMISSIVE is authorized with Istio's semantics (no principal, no
//! namespace; ipBlocks, ports apply), in the kernel at the destination. b2 on n2 is
//! PERMISSIVE; x1 and x2 are outside the mesh (unregistered pods on n1), a1 is in it.
//! - ALLOW `principals: ["*"]`: plaintext from x1 is dropped (its connect times out, it never
//!   reaches b2), logged `plaintext denied by policy` naming the policy, counted; a1 through
//!   the mesh is allowed.
//! - ALLOW `ipBlocks: [x1/32]`: x1 reaches b2 directly; x2 (not in the block) is dropped;
//!   a1 (mTLS, its address not in the block) is dropped at connect with EPERM.
//! - DENY `notPrincipals: ["*"]` (ISTIO-SECURITY-2021-004's recommendation): plaintext from
//!   x1 is dropped, a1 through the mesh is allowed.
//! - A DENY on port 9090 only: plaintext to 8080 passes, to 9090 is dropped.

use std::time::Duration;

use mesh_common::counters as ctr;
use mesh_tests::{require_privileges, ClientRequest, Host, Pod};

use super::policy_common::{apply, counters, docs, expect_denied, policy, wait_line};
use crate::{assert_carried, assert_direct, cluster};

#[track_caller]
fn expect_dropped(src: &Pod, dst: std::net::SocketAddr) {
    let run = src.client(
        &ClientRequest::new(dst)
            .send("plaintext")
            .io_timeout(Duration::from_millis(1500)),
    );
    assert!(
        !run.success() && run.results.iter().all(|r| r.hello.is_none()),
        "{} → {dst}: plaintext should be dropped: {:?}",
        src.name(),
        run.results
    );
}

#[test]
fn permissive_plaintext_is_authorized() {
    require_privileges();
    let cluster = cluster()
        .nodes(2)
        .add_pod(0, "a1")
        .add_unregistered_pod(0, "x1")
        .add_unregistered_pod(0, "x2")
        .add_pod(1, "b2")
        .permissive("b2")
        .build();
    let agents = cluster.start_agents();
    let (a1, x1, x2, b2) = (
        cluster.pod("a1"),
        cluster.pod("x1"),
        cluster.pod("x2"),
        cluster.pod("b2"),
    );
    let server = b2.serve(&[8080, 9090]);
    let denied_before = counters(&cluster, 1)[ctr::INGRESS_PLAINTEXT_DENIED_POLICY as usize];

    // 1. ALLOW principals ["*"]: plaintext has no principal.
    apply(
        &cluster,
        &agents,
        "any-principal",
        &policy(
            "default",
            "any-principal",
            Some("b2"),
            "ALLOW",
            false,
            "  rules:\n  - from:\n    - source: {principals: [\"*\"]}\n",
        ),
    );
    expect_dropped(x1, b2.addr4(8080));
    let line = wait_line(&agents[1], "plaintext denied by policy", "x1 → b2", |v| {
        v["dst"] == b2.addr4(8080).to_string()
    });
    assert_eq!(line["dst_workload"], b2.workload(), "{line}");
    assert_carried(&agents[0], a1, b2, "mesh");
    let denied_after = counters(&cluster, 1)[ctr::INGRESS_PLAINTEXT_DENIED_POLICY as usize];
    assert!(
        denied_after > denied_before,
        "ingress_plaintext_denied_policy did not move"
    );

    // 2. ALLOW ipBlocks [x1]: only x1's plaintext; a1 (mTLS) is not in the block either.
    apply(
        &cluster,
        &agents,
        "x1-only",
        &policy(
            "default",
            "x1-only",
            Some("b2"),
            "ALLOW",
            false,
            &format!(
                "  rules:\n  - from:\n    - source: {{ipBlocks: [\"{}/32\"]}}\n",
                x1.ip4()
            ),
        ),
    );
    let r = x1
        .client(&ClientRequest::new(b2.addr4(8080)).send("plaintext ok"))
        .single()
        .clone();
    assert_direct(&server, "b2", &r);
    expect_dropped(x2, b2.addr4(8080));
    expect_denied(a1, b2.addr4(8080));

    // 3. DENY notPrincipals ["*"]: every plaintext refused, the mesh allowed.
    apply(
        &cluster,
        &agents,
        "require-mtls",
        &policy(
            "default",
            "require-mtls",
            Some("b2"),
            "DENY",
            false,
            "  rules:\n  - from:\n    - source: {notPrincipals: [\"*\"]}\n",
        ),
    );
    expect_dropped(x1, b2.addr4(8080));
    assert_carried(&agents[0], a1, b2, "mesh again");

    // 4. Ports apply to plaintext: a DENY on 9090 only.
    apply(
        &cluster,
        &agents,
        "deny-9090",
        &docs(&[policy(
            "default",
            "deny-9090",
            Some("b2"),
            "DENY",
            false,
            "  rules:\n  - to:\n    - operation: {ports: [\"9090\"]}\n",
        )]),
    );
    let r = x1
        .client(&ClientRequest::new(b2.addr4(8080)).send("port ok"))
        .single()
        .clone();
    assert_direct(&server, "b2", &r);
    expect_dropped(x1, b2.addr4(9090));
}
