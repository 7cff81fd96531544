//! `mesh-agent policy apply` swaps generations: the new policy is enforced as soon as the
//! command returns, the previous generation's entries are gone, and the agent publishes the
//! new generation. A bad policy directory is refused (exit 2, nothing written): the active
//! generation stays and keeps being enforced, verified with traffic.

use mesh_common::names;
use mesh_tests::{require_privileges, wait_for, Host, DEFAULT_TIMEOUT};

use super::policy_common::{authz, expect_allowed, expect_denied, generations, principal};
use crate::cluster;

fn deny_port(port: u16) -> String {
    authz(
        "deny-a1",
        "b1",
        "DENY",
        &format!(
            "  rules:\n  - from:\n    - source: {{principals: [\"{}\"]}}\n    to:\n    - operation: {{ports: [\"{port}\"]}}\n",
            principal("a1")
        ),
    )
}

#[test]
fn policy_update_is_atomic_and_bad_update_keeps_old() {
    require_privileges();
    let cluster = cluster().nodes(2).add_pod(0, "a1").add_pod(1, "b1").build();
    let agents = cluster.start_agents();
    let (a1, b1) = (cluster.pod("a1"), cluster.pod("b1"));
    let _server = b1.serve(&[8080, 9090]);
    expect_allowed(a1, b1.addr4(8080));

    // Generation 1: 8080 denied.
    let dir = cluster.write_policy_dir("policy-v1", &[("p.yaml", &deny_port(8080))]);
    let applied = cluster.policy_apply(0, &dir);
    assert_eq!(applied.code, Some(0), "{applied:?}");
    let g1 = applied.generation().expect("generation in the output");
    expect_denied(a1, b1.addr4(8080));
    expect_allowed(a1, b1.addr4(9090));
    assert_eq!(generations(&cluster, 0, names::MAP_POL_L4), vec![g1]);
    wait_for(DEFAULT_TIMEOUT, "the agent's view of generation 1", || {
        agents[0].log_lines().into_iter().find(|v| {
            v["message"] == "policy generation active" && v["generation"].as_u64() == Some(g1)
        })
    });

    // A bad directory: refused, nothing changes.
    let bad = cluster.write_policy_dir(
        "policy-bad",
        &[("p.yaml", &deny_port(9090).replace("action: DENY", "action: CUSTOM"))],
    );
    let refused = cluster.policy_apply(0, &bad);
    assert_eq!(refused.code, Some(2), "{refused:?}");
    assert!(refused.stderr.contains("CUSTOM"), "{refused:?}");
    for map in names::POLICY_MAPS {
        let gens = generations(&cluster, 0, map);
        assert!(gens.is_empty() || gens == vec![g1], "{map}: {gens:?}");
    }
    expect_denied(a1, b1.addr4(8080));
    expect_allowed(a1, b1.addr4(9090));

    // Generation 2: 9090 denied instead; generation 1 is gone.
    let dir = cluster.write_policy_dir("policy-v2", &[("p.yaml", &deny_port(9090))]);
    let applied = cluster.policy_apply(0, &dir);
    assert_eq!(applied.code, Some(0), "{applied:?}");
    let g2 = applied.generation().expect("generation in the output");
    assert!(g2 > g1);
    expect_allowed(a1, b1.addr4(8080));
    expect_denied(a1, b1.addr6(9090));
    for map in names::POLICY_MAPS {
        let gens = generations(&cluster, 0, map);
        assert!(gens.is_empty() || gens == vec![g2], "{map}: {gens:?}");
    }
}
