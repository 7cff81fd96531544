//! PeerAuthentication from a policy directory applied with `mesh-agent policy apply` (not the
//! agent's `--policy-dir`): the generation carries each workload's mode and the running agent
//! re-programs `WORKLOAD_F_PERMISSIVE` from it.
//!
//! b1 and b2 (n2) are STRICT in the registry. x1 is a plaintext client outside the mesh
//! (an unenrolled pod cgroup on n1).
//! 1. A namespace-wide PERMISSIVE plus a selector-level STRICT for b2: x1 reaches b1 directly
//!    (flagged `plaintext inside a secure zone`), while its SYNs to b2 are dropped
//!    (`plaintext refused`).
//! 2. Changed live (STRICT for b1 instead): the verdicts swap without restarting anything.
//! 3. Removing the PeerAuthentications falls back to the registry (both STRICT).
//!
//! Mesh traffic (a1 on n1 → b1, b2) works throughout.

use std::{net::SocketAddr, time::Duration};

use mesh_tests::{
    require_privileges, wait_for, Agent, ClientRequest, Cluster, Host, Pod, Server, DEFAULT_TIMEOUT,
};
use serde_json::Value;

use super::policy_common::expect_allowed;
use crate::{assert_direct, cluster};

/// Short: refused plaintext connects are expected to time out.
const REFUSED_TIMEOUT: Duration = Duration::from_millis(1500);

fn peer_authn(name: &str, app: Option<&str>, mode: &str) -> String {
    let selector = app
        .map(|a| format!("  selector:\n    matchLabels: {{app: {a}}}\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: {name}\n  \
         namespace: default\nspec:\n{selector}  mtls:\n    mode: {mode}\n"
    )
}

/// Applies `files` on n2 and waits until its agent programmed the generation's flags.
#[track_caller]
fn apply(cluster: &Cluster, agent: &Agent, name: &str, files: &[(&str, &str)]) -> u64 {
    let dir = cluster.write_policy_dir(name, files);
    let applied = cluster.policy_apply(1, &dir);
    assert_eq!(applied.code, Some(0), "{applied:?}");
    let gen = applied.generation().expect("generation in the output");
    wait_for(
        DEFAULT_TIMEOUT,
        &format!("n2 follows generation {gen}"),
        || {
            agent.log_lines().into_iter().find(|l| {
                l["message"] == "policy generation active" && l["generation"].as_u64() == Some(gen)
            })
        },
    );
    gen
}

/// x1's plaintext connection to `dst` gets through directly, and n2 flags it.
#[track_caller]
fn plaintext_admitted(x1: &Pod, server: &Server, dst: &Pod, agent: &Agent) {
    let addr = dst.addr4(8080);
    // The flags follow the generation shortly after the view: retry until admitted.
    let r = wait_for(
        DEFAULT_TIMEOUT,
        &format!("plaintext to {} admitted", dst.name()),
        || {
            let run = x1.client(
                &ClientRequest::new(addr)
                    .send("plaintext")
                    .io_timeout(REFUSED_TIMEOUT),
            );
            run.success().then(|| run.results[0].clone())
        },
    );
    assert_direct(server, dst.name(), &r);
    let local = r.local_addr().expect("client reports its local address");
    wait_for(DEFAULT_TIMEOUT, "`plaintext inside a secure zone`", || {
        agent.log_lines().into_iter().find(|l| {
            l["message"] == "plaintext inside a secure zone"
                && l["src"].as_str() == Some(local.to_string().as_str())
                && l["dst_workload"].as_str() == Some(dst.workload().as_str())
        })
    });
}

/// x1's plaintext connection to `dst` is refused (SYN dropped), and n2 logs it.
#[track_caller]
fn plaintext_refused(x1: &Pod, dst: &Pod, agent: &Agent) {
    let addr: SocketAddr = dst.addr4(8080);
    let before = refusals(agent, addr);
    wait_for(
        DEFAULT_TIMEOUT,
        &format!("plaintext to {} refused", dst.name()),
        || {
            let run = x1.client(
                &ClientRequest::new(addr)
                    .send("plaintext")
                    .io_timeout(REFUSED_TIMEOUT),
            );
            (!run.success() && run.results.iter().all(|r| r.hello.is_none())).then_some(())
        },
    );
    wait_for(DEFAULT_TIMEOUT, "`plaintext refused`", || {
        (refusals(agent, addr) > before).then_some(())
    });
}

fn refusals(agent: &Agent, dst: SocketAddr) -> usize {
    agent
        .log_lines()
        .iter()
        .filter(|l: &&Value| {
            l["message"] == "plaintext refused"
                && l["dst"].as_str() == Some(dst.to_string().as_str())
        })
        .count()
}

#[test]
fn peer_authentication_strict_vs_permissive() {
    require_privileges();
    let cluster = cluster()
        .nodes(2)
        .add_pod(0, "a1")
        .add_unregistered_pod(0, "x1")
        .add_pod(1, "b1")
        .add_pod(1, "b2")
        .build();
    let agents = cluster.start_agents();
    let (a1, x1) = (cluster.pod("a1"), cluster.pod("x1"));
    let (b1, b2) = (cluster.pod("b1"), cluster.pod("b2"));
    assert!(!b1.permissive() && !b2.permissive());
    let s1 = b1.serve(&[8080]);
    let s2 = b2.serve(&[8080]);

    // 1. Namespace PERMISSIVE, b2 STRICT by selector.
    apply(
        &cluster,
        &agents[1],
        "pa-v1",
        &[
            ("ns.yaml", &peer_authn("default", None, "PERMISSIVE")),
            ("b2.yaml", &peer_authn("b2-strict", Some("b2"), "STRICT")),
        ],
    );
    plaintext_admitted(x1, &s1, b1, &agents[1]);
    plaintext_refused(x1, b2, &agents[1]);
    expect_allowed(a1, b1.addr4(8080));
    expect_allowed(a1, b2.addr4(8080));

    // 2. Live change: b1 STRICT by selector instead; the verdicts swap.
    apply(
        &cluster,
        &agents[1],
        "pa-v2",
        &[
            ("ns.yaml", &peer_authn("default", None, "PERMISSIVE")),
            ("b1.yaml", &peer_authn("b1-strict", Some("b1"), "STRICT")),
        ],
    );
    plaintext_admitted(x1, &s2, b2, &agents[1]);
    plaintext_refused(x1, b1, &agents[1]);

    // 3. No PeerAuthentication: the registry's STRICT again.
    apply(&cluster, &agents[1], "pa-none", &[]);
    plaintext_refused(x1, b2, &agents[1]);
    expect_allowed(a1, b1.addr4(8080));
    expect_allowed(a1, b2.addr4(8080));
}
