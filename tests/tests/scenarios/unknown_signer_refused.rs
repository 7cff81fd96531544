//! Only pinned signers count. Key k2 is trusted by the authority but pinned on no node: the
//! authority publishes version 2 (a DENY of a1 → b1) signed by k2, and both agents refuse it
//! (`mesh_config_rejected_total{reason="unknown_signer"}`), keep version 1, and a1 still
//! reaches b1. Version 3, the same content signed by the pinned k1, is applied: the kernel of
//! n1 now refuses a1 → b1 — the policy came from the verified bundle, not from any directory.

use mesh_tests::{require_privileges, wait_for, Host, DEFAULT_TIMEOUT};

use super::{
    policy_common::expect_allowed,
    signed_common::{deny_a1, publish, rejected, signed_cluster, wait_active, wait_denied},
};

#[test]
fn unknown_signer_refused() {
    require_privileges();
    let (cluster, _agents, k1) = signed_cluster();
    let (a1, b1) = (cluster.pod("a1"), cluster.pod("b1"));
    let _server = b1.serve(&[8080]);
    expect_allowed(a1, b1.addr4(8080));

    let k2 = cluster.signer_key("k2");
    cluster.trust_signer(&cluster.authority_signers(), &k2);
    let deny = deny_a1();
    publish(&cluster, &k2, 2, &[("deny.yaml", &deny)]);
    for i in 0..2 {
        wait_for(DEFAULT_TIMEOUT, "the unknown signer refused", || {
            (rejected(&cluster, i, "unknown_signer") >= 1.0).then_some(())
        });
        assert_eq!(
            cluster.node(i).metric("mesh_config_active_version"),
            1.0,
            "n{} left version 1",
            i + 1
        );
    }
    expect_allowed(a1, b1.addr4(8080));

    publish(&cluster, &k1, 3, &[("deny.yaml", &deny)]);
    wait_active(&cluster, 3);
    wait_denied(a1, b1.addr4(8080));
}
