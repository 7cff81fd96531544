//! `ipBlocks` and `notIpBlocks` on source pod addresses, per family. An ALLOW from a1's IPv4
//! address admits a1 over IPv4 only: a1 over IPv6 and a2 (another address in the same /24)
//! are refused in the kernel. `ipBlocks: [10.1.0.0/24]` with `notIpBlocks: [a2/32]` admits a1
//! and not a2; a DENY from `notIpBlocks` (everything outside the v6 /64 of node 1's pods)
//! leaves IPv6 from node 1 alone and refuses its IPv4.

use mesh_tests::{require_privileges, Host};

use super::policy_common::{apply, expect_allowed, expect_denied, policy};
use crate::cluster;

#[test]
fn policy_ip_blocks_and_not_ip_blocks() {
    require_privileges();
    let cluster = cluster()
        .nodes(2)
        .add_pod(0, "a1")
        .add_pod(0, "a2")
        .add_pod(1, "b1")
        .build();
    let agents = cluster.start_agents();
    let [a1, a2, b1] = ["a1", "a2", "b1"].map(|n| cluster.pod(n));
    let _b = b1.serve(&[8080]);
    let source = |s: &str| {
        policy(
            "default",
            "by-ip",
            Some("b1"),
            "ALLOW",
            false,
            &format!("  rules:\n  - from:\n    - source: {s}\n"),
        )
    };

    apply(
        &cluster,
        &agents,
        "a1-v4",
        &source(&format!("{{ipBlocks: [\"{}/32\"]}}", a1.ip4())),
    );
    expect_allowed(a1, b1.addr4(8080));
    expect_denied(a1, b1.addr6(8080));
    expect_denied(a2, b1.addr4(8080));

    apply(
        &cluster,
        &agents,
        "v4-not-a2",
        &source(&format!(
            "{{ipBlocks: [\"10.1.0.0/24\"], notIpBlocks: [\"{}\"]}}",
            a2.ip4()
        )),
    );
    expect_allowed(a1, b1.addr4(8080));
    expect_denied(a2, b1.addr4(8080));
    expect_denied(a1, b1.addr6(8080));

    apply(
        &cluster,
        &agents,
        "deny-outside-v6",
        &policy(
            "default",
            "v6-only",
            Some("b1"),
            "DENY",
            false,
            "  rules:\n  - from:\n    - source: {notIpBlocks: [\"fd00:1::/64\"]}\n",
        ),
    );
    expect_allowed(a1, b1.addr6(8080));
    expect_allowed(a2, b1.addr6(8080));
    expect_denied(a1, b1.addr4(8080));
    expect_denied(a2, b1.addr4(8080));
}
