//! `mesh-agent policy check` decides what the mesh does: the Istio conformance cases marked
//! `mesh: true` (mesh-agent/tests/conformance/*.yaml) are applied, one after the other, to a
//! real two-node mini-cluster built with the conformance registry's workloads (ns1/a and ns2/d
//! on n1 as sources; ns1/b, ns1/c and ns2/e on n2 serving TCP on 19090 and HTTP on 18080,
//! 18085 and 17070, declared `httpPorts`), and for each the real outcome — a connect refused
//! by the kernel with EPERM, an HTTP 403 from the destination agent, or the server's answer —
//! is compared with the decision `policy check`'s code path gives for the cluster's registry,
//! and with the case's expectation (from Istio's sources).

use std::{net::SocketAddr, sync::Arc};

use mesh_agent::{
    policy::check::{
        cases::{self, Case, Expected, Outcome},
        Decision, Layer,
    },
    registry::Registry,
};
use mesh_tests::{require_privileges, Cluster, Host, Pod};

use super::policy_common::{apply, expect_allowed, expect_denied};

const SUITE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../mesh-agent/tests/conformance"
);
const HTTP_PORTS: [u16; 3] = [17070, 18080, 18085];
const TCP_PORT: u16 = 19090;

/// The `mesh: true` cases, sorted by file then order.
fn mesh_cases() -> Vec<(String, Case)> {
    cases::load_dir(std::path::Path::new(SUITE))
        .unwrap_or_else(|e| panic!("{e}"))
        .into_iter()
        .filter(|(_, c)| c.mesh)
        .map(|(_, c)| (c.name.clone(), c))
        .collect()
}

/// The pod of `ns/name` (pods are named after the workload).
fn pod<'c>(cluster: &'c Cluster, workload: &str) -> &'c Pod {
    let name = workload.rsplit('/').next().unwrap_or(workload);
    let p = cluster.pod(name);
    assert_eq!(p.workload(), workload, "the cluster mirrors the registry");
    p
}

/// What the mesh did with the case's request, and where a denial came from (`Layer::L4`: the
/// kernel refused connect(); `Layer::L7`: the destination agent answered 403).
fn outcome(cluster: &Cluster, case: &Case, want: Decision) -> (Decision, Layer) {
    let r = &case.request;
    let src = pod(
        cluster,
        r.from
            .as_deref()
            .expect("mesh cases name a source workload"),
    );
    let dst: SocketAddr = pod(cluster, &r.to).addr4(r.port);
    if !HTTP_PORTS.contains(&r.port) {
        // A TCP connection: the kernel refuses a denied one at connect() (EPERM); an allowed
        // one reaches the server.
        match want {
            Decision::Allow => expect_allowed(src, dst),
            Decision::Deny => expect_denied(src, dst),
        };
        return (want, Layer::L4);
    }
    let line = format!(
        "{} {}",
        r.method.as_deref().unwrap_or("GET"),
        r.path.as_deref().unwrap_or("/")
    );
    let run = src.http1(dst, &[line.as_str()], false);
    if let Some(err) = &run.error {
        assert!(
            err.contains("Operation not permitted"),
            "{}: {line} to {dst}: neither refused by the kernel nor answered: {run:?}",
            case.name
        );
        return (Decision::Deny, Layer::L4);
    }
    match run.statuses().first().map(|s| s.0) {
        Some(200) => (Decision::Allow, Layer::L7),
        Some(403) => (Decision::Deny, Layer::L7),
        other => panic!("{}: {line} to {dst}: status {other:?}: {run:?}", case.name),
    }
}

#[test]
fn policy_check_matches_the_mesh() {
    require_privileges();
    let cases = mesh_cases();
    assert!(cases.len() >= 6, "only {} mesh cases", cases.len());
    let mut builder = crate::cluster().nodes(2);
    for (node, name, ns) in [
        (0, "a", "ns1"),
        (0, "d", "ns2"),
        (1, "b", "ns1"),
        (1, "c", "ns1"),
        (1, "e", "ns2"),
    ] {
        builder = builder
            .add_pod(node, name)
            .namespace(name, ns)
            .http_ports(name, &HTTP_PORTS);
    }
    let cluster = builder.build();
    let agents = cluster.start_agents();
    let _servers: Vec<_> = ["b", "c", "e"]
        .iter()
        .flat_map(|n| {
            let p = cluster.pod(n);
            [p.serve(&[TCP_PORT]), p.serve_http(&HTTP_PORTS)]
        })
        .collect();
    // `policy check` against the mesh's own registry (its addresses, its workloads).
    let registry = Arc::new(Registry::load_all(&cluster.write_registry()).expect("registry"));
    let scratch = cluster.tmp_dir().join("policy-check");
    let mut checked = Vec::new();
    for (i, (name, case)) in cases.iter().enumerate() {
        assert!(
            case.known_difference.is_none(),
            "{name}: a known difference cannot be a mesh case"
        );
        let found = cases::run(case, Arc::clone(&registry), &scratch.join(i.to_string()))
            .expect("writing the policies");
        if let Outcome::Failed(why) = cases::judge(case, &found) {
            panic!("{name}: policy check disagrees with Istio: {why}");
        }
        let report = found.expect("judged above");
        let want = match case.expect.decision {
            Expected::Allow => Decision::Allow,
            Expected::Deny => Decision::Deny,
            Expected::Invalid => unreachable!("an invalid case was judged above"),
        };
        assert_eq!(report.decision, want, "{name}");
        let policies = if case.policies.trim().is_empty() {
            "# no policy\n".to_owned()
        } else {
            case.policies.clone()
        };
        apply(&cluster, &agents, &format!("case-{i}"), &policies);
        let (got, layer) = outcome(&cluster, case, want);
        assert_eq!(
            got, report.decision,
            "{name}: the mesh decided {got:?}, policy check {:?} ({})",
            report.decision, report.reason
        );
        if got == Decision::Deny {
            assert_eq!(
                layer, report.layer,
                "{name}: denied by the {layer:?} layer, policy check says {:?}",
                report.layer
            );
        }
        checked.push(format!("{name}: {got:?}"));
    }
    println!(
        "policy check = mesh for {} cases:\n  {}",
        checked.len(),
        checked.join("\n  ")
    );
}
