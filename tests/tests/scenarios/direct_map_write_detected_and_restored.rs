//! A direct write to the policy maps is caught. Version 2 (a DENY of a1 → b1) is applied on a
//! node that requires signed configuration. Then the DENY entry of the active generation in n1's
//! `mesh_pol_l4` is rewritten to ALLOW with `bpftool map update` — no new generation, just
//! different bytes. n1's agent notices the content no longer matches what it wrote from the
//! verified bundle (`mesh_config_unauthorized_loads_total`, a log line), writes the verified
//! policy again as a new generation, and a1 → b1 is denied again.

use mesh_common::{names, policy::POL_ALLOW, policy::POL_DENY};
use mesh_tests::{bpftool, require_privileges, wait_for, Host, DEFAULT_TIMEOUT};

use super::{
    policy_common::{dump, expect_denied},
    signed_common::signed_cluster_denying,
};

/// `words` as bpftool's `hex` bytes (little-endian u32s).
fn hex(words: &[u64]) -> Vec<String> {
    words
        .iter()
        .flat_map(|w| (*w as u32).to_le_bytes())
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn direct_map_write_detected_and_restored() {
    require_privileges();
    let (cluster, agents, _k1, _server) = signed_cluster_denying();
    let (a1, b1) = (cluster.pod("a1"), cluster.pod("b1"));
    // The DENY entry of the generation the agent reports active (the metric follows the maps
    // within a poll: bounded wait until both agree).
    let (generation, entry) = wait_for(
        DEFAULT_TIMEOUT,
        "the DENY entry of the active generation",
        || {
            let generation = cluster.node(0).metric("mesh_policy_generation") as u64;
            dump(&cluster, 0, names::MAP_POL_L4)
                .into_iter()
                .find(|e| {
                    e["key"]["gen"].as_u64() == Some(generation)
                        && e["value"]["verdict"].as_u64() == Some(u64::from(POL_DENY))
                        && e["value"]["policy_str"].as_u64().is_some_and(|s| s != 0)
                })
                .map(|e| (generation, e))
        },
    );
    let (k, v) = (&entry["key"], &entry["value"]);
    let field = |o: &serde_json::Value, f: &str| o[f].as_u64().unwrap_or(0);
    let key = hex(&["gen", "set_id", "class_id", "port"].map(|f| field(k, f)));
    let mut value: Vec<u64> = [
        "verdict",
        "flags",
        "policy_str",
        "l7_count",
        "dry_run_str",
        "audit_str",
    ]
    .iter()
    .map(|f| field(v, f))
    .collect();
    value[0] = u64::from(POL_ALLOW);
    let pin = cluster.node(0).pin_dir().join(names::MAP_POL_L4);
    let mut args: Vec<String> = vec![
        "map".into(),
        "update".into(),
        "pinned".into(),
        pin.display().to_string(),
        "key".into(),
        "hex".into(),
    ];
    args.extend(key);
    args.extend(["value".into(), "hex".into()]);
    args.extend(hex(&value));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    bpftool::run(&refs);

    wait_for(DEFAULT_TIMEOUT, "the changed entries detected", || {
        (cluster
            .node(0)
            .metric("mesh_config_unauthorized_loads_total")
            >= 1.0)
            .then_some(())
    });
    wait_for(DEFAULT_TIMEOUT, "the agent says so", || {
        agents[0].log_lines().into_iter().find(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.contains("entries of the active generation were changed"))
        })
    });
    wait_for(DEFAULT_TIMEOUT, "the verified policy written again", || {
        (cluster.node(0).metric("mesh_policy_generation") as u64 > generation).then_some(())
    });
    expect_denied(a1, b1.addr4(8080));
}
