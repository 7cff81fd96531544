//! `mesh-agent policy apply` swaps generations: the new policy is enforced as soon as the
//! command returns, the previous generation's entries are gone, and the agent publishes the
//! new generation. A bad policy directory is refused (exit 2, nothing written) with a message
//! naming the problem — an unsupported action (`CUSTOM`), malformed YAML (`file:line`), an
//! unknown kind, an unsupported field (a JWT `when` key), a policy set that would overflow
//! `mesh_pol_l4` — and the active generation stays (pinned maps, the agent's
//! `mesh_policy_generation`) and keeps being enforced, verified with traffic.

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

    let generation_metric = "mesh_policy_generation";
    wait_for(DEFAULT_TIMEOUT, "n1's generation gauge", || {
        (cluster.node(0).metric(generation_metric) == g1 as f64).then_some(())
    });

    // Bad directories: each refused with a clear message, nothing changes.
    // Enough ports that (port entries × source classes) exceeds the L4 map's budget.
    let budget = mesh_common::policy::budget(mesh_common::policy::capacity::POL_L4);
    let many_ports: Vec<String> = (1..=budget / 2 + 1000)
        .map(|p| format!("\"{p}\""))
        .collect();
    let overflow = deny_port(9090).replace("[\"9090\"]", &format!("[{}]", many_ports.join(", ")));
    let malformed =
        deny_port(9090).replace("metadata:\n  name: deny-a1", "metadata: {name: deny-a1");
    let unknown_kind = deny_port(9090).replace("kind: AuthorizationPolicy", "kind: Sidecar");
    let when = format!(
        "{}    when:\n    - key: request.auth.claims[iss]\n      values: [\"x\"]\n",
        deny_port(9090)
    );
    let bad_cases: [(&str, String, &[&str]); 5] = [
        (
            "custom",
            deny_port(9090).replace("action: DENY", "action: CUSTOM"),
            &["CUSTOM"],
        ),
        ("malformed", malformed, &["p.yaml:"]),
        ("unknown-kind", unknown_kind, &["p.yaml:", "Sidecar"]),
        (
            "when",
            when,
            &["p.yaml:", "default/deny-a1", "when[0].key", "not supported"],
        ),
        ("overflow", overflow, &[names::MAP_POL_L4, "would need"]),
    ];
    for (name, text, needles) in &bad_cases {
        let bad = cluster.write_policy_dir(&format!("policy-bad-{name}"), &[("p.yaml", text)]);
        let refused = cluster.policy_apply(0, &bad);
        assert_eq!(refused.code, Some(2), "{name}: {refused:?}");
        for needle in *needles {
            assert!(
                refused.stderr.contains(needle),
                "{name}: no {needle:?} in {refused:?}"
            );
        }
        for map in names::POLICY_MAPS {
            let gens = generations(&cluster, 0, map);
            assert!(
                gens.is_empty() || gens == vec![g1],
                "{name}: {map}: {gens:?}"
            );
        }
        expect_denied(a1, b1.addr4(8080));
        expect_allowed(a1, b1.addr4(9090));
        assert_eq!(
            cluster.node(0).metric(generation_metric),
            g1 as f64,
            "{name}"
        );
    }
    // The kernel's denials were counted by the agent.
    let kernel_denials = r#"mesh_policy_denials_total{layer="l4",side="kernel"}"#;
    wait_for(DEFAULT_TIMEOUT, "kernel denials counted", || {
        (cluster.node(0).metric(kernel_denials) >= bad_cases.len() as f64).then_some(())
    });

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
