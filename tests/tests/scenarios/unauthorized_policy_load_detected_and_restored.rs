//! On a node that requires signed configuration, the agent is the only legitimate writer of
//! the policy maps. Version 2 (a DENY of a1 → b1) is applied; then someone runs `mesh-agent
//! policy apply` by hand on n1 with an empty policy directory (which would allow everything).
//! n1's agent notices the generation it did not write (`mesh_config_unauthorized_loads_total`,
//! a log line, an audit record), restores the verified policy, and a1 → b1 is denied again.

use mesh_tests::{require_privileges, wait_for, Host, DEFAULT_TIMEOUT};

use super::{policy_common::expect_denied, signed_common::signed_cluster_denying};

#[test]
fn unauthorized_policy_load_detected_and_restored() {
    require_privileges();
    let (cluster, agents, _k1, _server) = signed_cluster_denying();
    let (a1, b1) = (cluster.pod("a1"), cluster.pod("b1"));
    let generation = |i: usize| cluster.node(i).metric("mesh_policy_generation") as u64;
    let verified = generation(0);

    let empty = cluster.write_policy_dir("by-hand", &[]);
    let applied = cluster.policy_apply(0, &empty);
    assert_eq!(applied.code, Some(0), "{applied:?}");
    let hand = applied.generation().expect("the hand-applied generation");
    assert!(hand > verified);

    wait_for(DEFAULT_TIMEOUT, "the unauthorized load detected", || {
        (cluster
            .node(0)
            .metric("mesh_config_unauthorized_loads_total")
            >= 1.0)
            .then_some(())
    });
    let line = wait_for(DEFAULT_TIMEOUT, "the agent says so", || {
        agents[0].log_lines().into_iter().find(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("unauthorized policy load"))
        })
    });
    assert_eq!(line["active"].as_u64(), Some(hand), "{line}");
    wait_for(DEFAULT_TIMEOUT, "the verified policy restored", || {
        (generation(0) > hand).then_some(())
    });
    expect_denied(a1, b1.addr4(8080));
    assert_eq!(
        cluster
            .node(1)
            .metric("mesh_config_unauthorized_loads_total"),
        0.0
    );
}
