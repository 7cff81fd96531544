//! Helpers shared by the policy scenarios.

use std::{net::SocketAddr, time::Duration};

use mesh_common::{counters as ctr, names};
use mesh_tests::{
    bpftool, wait_for, Agent, ClientRequest, ClientResult, Cluster, Host, Pod, DEFAULT_TIMEOUT,
};
use serde_json::Value;

/// A denied connect fails at once; this bounds the client if it does not.
pub const DENIED_TIMEOUT: Duration = Duration::from_secs(2);

/// An AuthorizationPolicy in `default` selecting `app: <app>`.
pub fn authz(name: &str, app: &str, action: &str, rules: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  \
         namespace: default\nspec:\n  selector:\n    matchLabels: {{app: {app}}}\n  action: {action}\n{rules}"
    )
}

/// The principal of pod `name` (service account `sa-<name>`).
pub fn principal(name: &str) -> String {
    format!("cluster.local/ns/default/sa/sa-{name}")
}

/// One connection from `src` to `dst`, expected to be refused by the kernel: the client
/// sees EPERM, in well under 100 ms. Returns the result.
#[track_caller]
pub fn expect_denied(src: &Pod, dst: SocketAddr) -> ClientResult {
    let run = src.client(
        &ClientRequest::new(dst)
            .send("denied?")
            .io_timeout(DENIED_TIMEOUT),
    );
    assert!(
        !run.success(),
        "{} → {dst} should be denied: {:?}",
        src.name(),
        run.results
    );
    assert_eq!(run.results.len(), 1, "{:?}", run.results);
    let r = run.results[0].clone();
    let err = r.error.clone().unwrap_or_default();
    assert!(
        err.contains("Operation not permitted"),
        "{} → {dst}: expected EPERM from connect(), got {r:?}",
        src.name()
    );
    let us = r.connect_us.expect("client reports connect time");
    assert!(us < 100_000, "{} → {dst}: denial took {us} µs", src.name());
    assert!(r.hello.is_none(), "{r:?}");
    r
}

/// One connection from `src` to `dst`, expected to work (hello from the server).
#[track_caller]
pub fn expect_allowed(src: &Pod, dst: SocketAddr) -> ClientResult {
    let run = src.client(&ClientRequest::new(dst).send("allowed?"));
    let r = run.single().clone();
    assert!(
        r.echo_ok && r.hello.is_some(),
        "{} → {dst} should work: {r:?}",
        src.name()
    );
    r
}

/// The kernel counters of node `index`, by index.
pub fn counters(cluster: &Cluster, index: usize) -> Vec<u64> {
    bpftool::counters(&cluster.node(index).pin_dir().join(names::MAP_COUNTERS))
}

/// `connect_denied_policy` of node `index`.
pub fn denied_count(cluster: &Cluster, index: usize) -> u64 {
    counters(cluster, index)[ctr::CONNECT_DENIED_POLICY as usize]
}

/// The agent's `connection denied` line for `dst`, waited for.
#[track_caller]
pub fn wait_denied_log(agent: &Agent, dst: SocketAddr) -> Value {
    wait_for(
        DEFAULT_TIMEOUT,
        &format!("`connection denied` for {dst}"),
        || {
            agent.log_lines().into_iter().find(|v| {
                v["message"] == "connection denied" && v["dst"] == dst.to_string().as_str()
            })
        },
    )
}

/// Whether node `node`'s agent logged an `inbound` record for `dst`.
pub fn inbound_seen(agent: &Agent, dst: SocketAddr) -> bool {
    agent
        .log_lines()
        .iter()
        .any(|v| v["message"] == "inbound" && v["dst"] == dst.to_string().as_str())
}

/// Dump of a pinned policy map (BTF-formatted entries).
pub fn dump(cluster: &Cluster, index: usize, map: &str) -> Vec<Value> {
    let pin = cluster.node(index).pin_dir().join(map);
    match bpftool::json(&["map", "dump", "pinned", pin.to_str().expect("UTF-8 pin")]) {
        Value::Array(entries) => entries
            .into_iter()
            .map(|e| e.get("formatted").cloned().unwrap_or(e))
            .collect(),
        other => panic!("bpftool dump of {map}: {other}"),
    }
}

/// The distinct generations of the entries of a pinned policy map.
pub fn generations(cluster: &Cluster, index: usize, map: &str) -> Vec<u64> {
    let mut gens: Vec<u64> = dump(cluster, index, map)
        .iter()
        .filter_map(|e| e["key"]["gen"].as_u64())
        .collect();
    gens.sort_unstable();
    gens.dedup();
    gens
}

/// An AuthorizationPolicy `name` in namespace `ns`: `selector` (`app` label) or none (the
/// whole namespace), `action`, `spec_tail` appended verbatim under `spec:` (two spaces of
/// indentation: `rules:` …, or nothing for a policy without rules), optionally dry-run.
pub fn policy(
    ns: &str,
    name: &str,
    app: Option<&str>,
    action: &str,
    dry_run: bool,
    spec_tail: &str,
) -> String {
    let annotations = if dry_run {
        "  annotations:\n    istio.io/dry-run: \"true\"\n"
    } else {
        ""
    };
    let selector = app
        .map(|a| format!("  selector:\n    matchLabels: {{app: {a}}}\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  \
         namespace: {ns}\n{annotations}spec:\n{selector}  action: {action}\n{spec_tail}"
    )
}

/// Several YAML documents in one file.
pub fn docs(parts: &[String]) -> String {
    parts.join("---\n")
}

/// Writes `yaml` as policy directory `name`, applies it on every node with `mesh-agent
/// policy apply` and waits (bounded) until every agent reads the applied generation.
#[track_caller]
pub fn apply(cluster: &Cluster, agents: &[Agent], name: &str, yaml: &str) {
    let dir = cluster.write_policy_dir(name, &[("policy.yaml", yaml)]);
    for (i, agent) in agents.iter().enumerate() {
        let applied = cluster.policy_apply(i, &dir);
        assert_eq!(
            applied.code,
            Some(0),
            "policy {name} on node {i}: {applied:?}"
        );
        let gen = applied.generation().expect("generation in the output");
        wait_for(
            DEFAULT_TIMEOUT,
            &format!("node {i}'s agent on generation {gen} ({name})"),
            || {
                agent.log_lines().into_iter().find(|v| {
                    v["message"] == "policy generation active"
                        && v["generation"].as_u64() == Some(gen)
                })
            },
        );
    }
}

/// The agent's log lines with `message`, matching `pred`.
pub fn lines(agent: &Agent, message: &str, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
    agent
        .log_lines()
        .into_iter()
        .filter(|v| v["message"] == message && pred(v))
        .collect()
}

/// Waits (bounded) for a log line with `message` matching `pred`, and returns it.
#[track_caller]
pub fn wait_line(agent: &Agent, message: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    wait_for(
        DEFAULT_TIMEOUT,
        &format!("`{message}` ({what}) on {}", agent.spec().node),
        || lines(agent, message, &pred).into_iter().next(),
    )
}
