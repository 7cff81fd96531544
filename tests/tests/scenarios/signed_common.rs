//! Shared set-up of the signed-configuration scenarios: nodes n1 (a1) and n2 (b1); signer key
//! k1 trusted by the authority and pinned on both nodes; the authority follows
//! `<tmp>/bundle.json`; version 1 (no policy) published and applied before the test goes on.

use mesh_tests::{signing::SignerKey, Agent, Cluster, Host};

use super::policy_common::{authz, principal};
use crate::cluster;

/// A DENY of a1 → b1 (any port): the kernel of n1 refuses the connect once it is applied.
pub fn deny_a1() -> String {
    authz(
        "deny-a1",
        "b1",
        "DENY",
        &format!(
            "  rules:\n  - from:\n    - source: {{principals: [\"{}\"]}}\n",
            principal("a1")
        ),
    )
}

/// The cluster, its agents (running version 1) and k1.
pub fn signed_cluster() -> (Cluster, Vec<Agent>, SignerKey) {
    signed_cluster_with(&[])
}

/// [`signed_cluster`] with more `authority serve` arguments.
pub fn signed_cluster_with(authority_args: &[&str]) -> (Cluster, Vec<Agent>, SignerKey) {
    let cluster = cluster().nodes(2).add_pod(0, "a1").add_pod(1, "b1").build();
    let k1 = cluster.signer_key("k1");
    cluster.trust_signer(&cluster.authority_signers(), &k1);
    for i in 0..2 {
        cluster.trust_signer(&cluster.node_signers(i), &k1);
    }
    publish(&cluster, &k1, 1, &[]);
    cluster.follow_bundle_afresh(authority_args);
    let agents = cluster.start_agents();
    wait_active(&cluster, 1);
    (cluster, agents, k1)
}

/// Publishes version `version` of the cluster's registry with `policies`, signed by `key`.
pub fn publish(
    cluster: &Cluster,
    key: &SignerKey,
    version: u64,
    policies: &[(&str, &str)],
) -> std::path::PathBuf {
    cluster.publish_bundle_file(
        key,
        version,
        &cluster.registry_entries(),
        cluster.services(),
        policies,
    )
}

/// Waits (bounded) until both agents run configuration `version`.
#[track_caller]
pub fn wait_active(cluster: &Cluster, version: u64) {
    for i in 0..2 {
        mesh_tests::wait_for(
            mesh_tests::DEFAULT_TIMEOUT,
            &format!("n{} runs configuration v{version}", i + 1),
            || {
                (cluster.node(i).metric("mesh_config_active_version") as u64 == version)
                    .then_some(())
            },
        );
    }
}

/// `mesh_config_rejected_total{reason}` of node `i`.
pub fn rejected(cluster: &Cluster, i: usize, reason: &str) -> f64 {
    cluster.node(i).metric(&format!(
        r#"mesh_config_rejected_total{{reason="{reason}"}}"#
    ))
}

/// Waits (bounded) until `src` → `dst` is refused at connect() — the policy of a version is
/// compiled a moment after the version is applied — then checks it as [`expect_denied`] does.
///
/// [`expect_denied`]: super::policy_common::expect_denied
#[track_caller]
pub fn wait_denied(src: &mesh_tests::Pod, dst: std::net::SocketAddr) {
    mesh_tests::wait_for(
        mesh_tests::DEFAULT_TIMEOUT,
        &format!("{} → {dst} denied", src.name()),
        || {
            let run = src.client(
                &mesh_tests::ClientRequest::new(dst)
                    .send("x")
                    .io_timeout(std::time::Duration::from_secs(2)),
            );
            run.results
                .first()
                .and_then(|r| r.error.as_deref())
                .is_some_and(|e| e.contains("Operation not permitted"))
                .then_some(())
        },
    );
    super::policy_common::expect_denied(src, dst);
}

/// [`signed_cluster`] with b1 serving on 8080 and version 2 (a DENY of a1 → b1) applied and
/// enforced. Returns the server too (keep it alive).
pub fn signed_cluster_denying() -> (Cluster, Vec<Agent>, SignerKey, mesh_tests::Server) {
    let (cluster, agents, k1) = signed_cluster();
    let server = cluster.pod("b1").serve(&[8080]);
    publish(&cluster, &k1, 2, &[("deny.yaml", &deny_a1())]);
    wait_active(&cluster, 2);
    wait_denied(cluster.pod("a1"), cluster.pod("b1").addr4(8080));
    (cluster, agents, k1, server)
}
