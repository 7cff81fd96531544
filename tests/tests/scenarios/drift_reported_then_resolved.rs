//! Intended vs active. Key k2 is trusted by the authority and pinned on n1 only. Version 2,
//! signed by k2, is published: n1 applies it, n2 refuses it (unknown signer). n2 reports its
//! drift (`mesh_config_drift` 1, n1 0), and `mesh-agent config status` at the authority lists
//! n2 as drifting (active 1, intended 2; exit 1). Version 3, signed by k1 (pinned on both), is
//! applied everywhere: the drift is gone on both sides (`config status` exit 0).

use mesh_tests::{authority::run_cli_status, require_privileges, wait_for, DEFAULT_TIMEOUT};

use super::signed_common::{publish, signed_cluster, wait_active};

#[test]
fn drift_reported_then_resolved() {
    require_privileges();
    let (cluster, mut agents, k1) = signed_cluster();
    let k2 = cluster.signer_key("k2");
    cluster.trust_signer(&cluster.authority_signers(), &k2);
    cluster.trust_signer(&cluster.node_signers(0), &k2);
    // n1's agent reads its pinned signers at start.
    agents[0].stop();
    agents[0].restart();

    publish(&cluster, &k2, 2, &[]);
    wait_for(DEFAULT_TIMEOUT, "n1 applies v2", || {
        (cluster.node(0).metric("mesh_config_active_version") == 2.0).then_some(())
    });
    wait_for(DEFAULT_TIMEOUT, "n2 reports drift", || {
        (cluster.node(1).metric("mesh_config_drift") == 1.0).then_some(())
    });
    assert_eq!(cluster.node(0).metric("mesh_config_drift"), 0.0);
    assert_eq!(cluster.node(1).metric("mesh_config_active_version"), 1.0);
    let dir = cluster.authority().dir().to_owned();
    let status = wait_for(DEFAULT_TIMEOUT, "config status shows n2 drifting", || {
        let (code, out) = run_cli_status(&[
            "config",
            "status",
            "--dir",
            &dir.to_string_lossy(),
            "--output",
            "json",
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        (code == Some(1) && v["drift"] == serde_json::json!(["n2"])).then_some(v)
    });
    assert_eq!(status["intended"]["version"], 2, "{status}");
    let n2 = status["agents"]
        .as_array()
        .and_then(|a| a.iter().find(|g| g["node"] == "n2"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(n2["activeVersion"], 1, "{status}");

    publish(&cluster, &k1, 3, &[]);
    wait_active(&cluster, 3);
    for i in 0..2 {
        wait_for(DEFAULT_TIMEOUT, "drift resolved", || {
            (cluster.node(i).metric("mesh_config_drift") == 0.0).then_some(())
        });
    }
    wait_for(DEFAULT_TIMEOUT, "config status clean", || {
        let (code, _) = run_cli_status(&["config", "status", "--dir", &dir.to_string_lossy()]);
        (code == Some(0)).then_some(())
    });
}
