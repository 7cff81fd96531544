//! Slowloris on an L7 port: 200 connections from one pod each send half a request head and
//! stop. The destination agent (L7 policy on b1:8080, `--max-pending-heads-per-source 40`,
//! `--request-head-timeout-secs 2`) keeps 40 of them until the head timeout and answers `408`;
//! the other 160 are refused at once — closed, or answered `429` when the request line had
//! already arrived when the cap was checked (which one is a race on the wire) — and counted in
//! `mesh_connections_refused_total{proxy="inbound",reason="pending_heads"}`. Nothing is left
//! open and both agents are back to their descriptors of before. A complete request from the
//! same pod is then served as usual.

use std::time::Duration;

use mesh_tests::{assert_eventually, require_privileges, Agent, Host};

use super::{
    l7_common::l7_policy,
    policy_common::{apply, docs},
};

const COUNT: usize = 200;
const CAP: usize = 40;
const HEAD_TIMEOUT: Duration = Duration::from_secs(2);

#[test]
fn l7_half_sent_heads_capped_per_source() {
    require_privileges();
    let cluster = crate::cluster()
        .nodes(2)
        .add_pod(0, "a1")
        .add_pod(1, "b1")
        .http_ports("b1", &[8080])
        .build();
    let agents: Vec<Agent> = (0..2)
        .map(|n| {
            let mut spec = cluster.agent_spec(n);
            spec.extra_args = [
                "--max-pending-heads-per-source",
                &CAP.to_string(),
                "--request-head-timeout-secs",
                &HEAD_TIMEOUT.as_secs().to_string(),
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
            Agent::start(spec)
        })
        .collect();
    let _server = cluster.pod("b1").serve_http(&[8080]);
    apply(&cluster, &agents, "l7", &docs(&[l7_policy("b1")]));
    let (a1, b1) = (cluster.pod("a1"), cluster.pod("b1"));
    let fds_before: Vec<usize> = agents.iter().map(Agent::open_fds).collect();

    let results = a1.half_heads(
        b1.addr4(8080),
        COUNT,
        "GET /api/slow HTTP/1.1\r\nhost: b1\r\nx-slow: ",
    );
    assert_eq!(results.len(), COUNT);
    let timed_out: Vec<_> = results
        .iter()
        .filter(|(_, a)| a.starts_with("HTTP/1.1 408"))
        .collect();
    let refused: Vec<_> = results
        .iter()
        .filter(|(_, a)| a.is_empty() || a.starts_with("HTTP/1.1 429"))
        .collect();
    assert_eq!(
        (timed_out.len(), refused.len()),
        (CAP, COUNT - CAP),
        "{CAP} held until the head timeout, the rest closed: {results:?}"
    );
    for (ms, _) in &refused {
        assert!(
            *ms < 1500,
            "a refused head is closed at once, not after {ms} ms"
        );
    }
    for (ms, _) in &timed_out {
        let ms = Duration::from_millis(*ms);
        assert!(
            ms >= HEAD_TIMEOUT - Duration::from_millis(200) && ms < HEAD_TIMEOUT * 3,
            "408 after the head timeout, got it after {ms:?}"
        );
    }
    assert_eventually!(
        cluster
            .node(1)
            .metric(r#"mesh_connections_refused_total{proxy="inbound",reason="pending_heads"}"#)
            == (COUNT - CAP) as f64,
        "n2 counts every refused head"
    );
    // Nothing held any more: descriptors back to where they were (± a pooled connection).
    for (n, agent) in agents.iter().enumerate() {
        assert_eventually!(
            agent.open_fds() <= fds_before[n] + 2,
            "node {n}: {} descriptors open, {} before",
            agent.open_fds(),
            fds_before[n]
        );
    }
    // The source is not blocked afterwards: a complete request is served.
    let run = a1.http1(b1.addr4(8080), &["GET /api/ok"], false);
    assert_eq!(run.statuses()[0].0, 200, "{:?}", run.statuses());
}
