//! Helpers shared by the policy scenarios.

use std::{net::SocketAddr, time::Duration};

use mesh_common::{counters as ctr, names};
use mesh_tests::{bpftool, wait_for, Agent, ClientRequest, ClientResult, Cluster, Host, Pod, DEFAULT_TIMEOUT};
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
    let run = src.client(&ClientRequest::new(dst).send("denied?").io_timeout(DENIED_TIMEOUT));
    assert!(!run.success(), "{} → {dst} should be denied: {:?}", src.name(), run.results);
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
    assert!(r.echo_ok && r.hello.is_some(), "{} → {dst} should work: {r:?}", src.name());
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
    wait_for(DEFAULT_TIMEOUT, &format!("`connection denied` for {dst}"), || {
        agent.log_lines().into_iter().find(|v| {
            v["message"] == "connection denied" && v["dst"] == dst.to_string().as_str()
        })
    })
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
