//! A tampered bundle changes nothing. Version 1 with a DENY of a1 → b1 is applied. Version 2
//! (the DENY removed) is signed, then one byte of it flipped before it reaches the authority:
//! the authority refuses it (its log says why) and the agents keep version 1 — a1 → b1 stays
//! denied. On the node: n1's persisted state gets one byte of its bundle flipped while its
//! agent and the authority are down; the restarted agent refuses it
//! (`mesh_config_rejected_total` grows), programs nothing from it, and the kernel keeps
//! enforcing the DENY — under the safe baseline, which lifts once the authority serves version
//! 2 again (untampered).

use mesh_tests::{require_privileges, wait_for, Host, DEFAULT_TIMEOUT};

use super::{
    policy_common::expect_denied,
    signed_common::{deny_a1, publish, signed_cluster, wait_active, wait_denied},
};

/// `path` with one byte of the policy text flipped (inside a JSON string: still JSON).
fn flip(path: &std::path::Path, needle: &str) -> Vec<u8> {
    let mut bytes = std::fs::read(path).expect("read");
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle.as_bytes())
        .unwrap_or_else(|| panic!("{needle:?} not in {}", path.display()));
    bytes[at] ^= 0x01;
    bytes
}

#[test]
fn tampered_bundle_refused_previous_stays() {
    require_privileges();
    let (cluster, mut agents, k1) = signed_cluster();
    let (a1, b1) = (cluster.pod("a1"), cluster.pod("b1"));
    let _server = b1.serve(&[8080]);
    let deny = deny_a1();
    let v2 = publish(&cluster, &k1, 2, &[("deny.yaml", &deny)]);
    wait_active(&cluster, 2);
    wait_denied(a1, b1.addr4(8080));

    // Version 3 removes the DENY; one byte of its registry is flipped after signing.
    let v3 = cluster.build_bundle_file(&k1, 3, &cluster.registry_entries(), &[], &[]);
    let tampered = cluster.tmp_dir().join("bundle-v3.tampered.json");
    std::fs::write(&tampered, flip(&v3, "serviceAccount: sa-b1")).expect("write");
    cluster.install_bundle(&tampered);
    wait_for(
        DEFAULT_TIMEOUT,
        "the authority refuses the tampered bundle",
        || {
            cluster.authority().log_lines().into_iter().find(|l| {
                l["message"] == "state source refused as a whole; the published version stays"
                    && l["error"].as_str().is_some_and(|e| e.contains("digest"))
            })
        },
    );
    for i in 0..2 {
        assert_eq!(cluster.node(i).metric("mesh_config_active_version"), 2.0);
    }
    expect_denied(a1, b1.addr4(8080));

    // On the node: the persisted state tampered while everything is down.
    agents[0].stop();
    cluster.authority().stop();
    let state = cluster
        .agent_spec(0)
        .identity_dir
        .join("state/mesh-state.json");
    std::fs::write(&state, flip(&state, "deny-a1")).expect("tamper");
    agents[0].restart();
    assert!(
        cluster
            .node(0)
            .metric(r#"mesh_config_rejected_total{reason="digest_mismatch"}"#)
            >= 1.0
            || cluster
                .node(0)
                .metric(r#"mesh_config_rejected_total{reason="malformed"}"#)
                >= 1.0,
        "the tampered persisted bundle was not refused: {}",
        agents[0].tail_stdout(20)
    );
    assert_eq!(cluster.node(0).metric("mesh_config_active_version"), 0.0);
    // Nothing verified: the safe baseline seals n1's pods (a1 → b1 is refused by it too).
    assert_eq!(
        cluster
            .node(0)
            .metric(r#"mesh_config_state{state="baseline"}"#),
        1.0
    );
    expect_denied(a1, b1.addr4(8080));

    // The authority back, on version 2 again (an authority refuses to start on a bundle it
    // cannot verify): it verifies on n1; the baseline is lifted and the DENY of version 2 is
    // what the kernel enforces.
    cluster.install_bundle(&v2);
    cluster.authority().start();
    wait_active(&cluster, 2);
    wait_for(DEFAULT_TIMEOUT, "n1 leaves the baseline", || {
        (cluster
            .node(0)
            .metric(r#"mesh_config_state{state="active"}"#)
            == 1.0)
            .then_some(())
    });
    wait_denied(a1, b1.addr4(8080));
}
