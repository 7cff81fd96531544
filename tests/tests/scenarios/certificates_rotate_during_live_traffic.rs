//! Workload certificates rotate under traffic without a single failed connection. Both agents
//! request 60-second certificates (rotation is due at half-life, about 30 s after issue). Pods
//! a1 (n1) and b1 (n2) connect to each other sequentially, both ways at once, for more than
//! 35 s: every connection succeeds, both agents log a `workload certificate issued` line with
//! `rotation: "rotation"` while the traffic runs, count at least two successful issues
//! (`mesh_cert_rotations_total{result="ok"}`: the initial one and the rotation), and open new
//! HBONE connections with the new certificates (client handshakes ≥ 2 on each node).

use std::time::{Duration, Instant};

use mesh_tests::{require_privileges, wait_for, Agent, ClientRequest, Host};
use serde_json::Value;

use crate::cluster;

const LIFETIME_SECS: u64 = 60;
/// Connections per direction, one every `INTERVAL`: 90 × 0.5 s ≈ 45 s of traffic.
const COUNT: usize = 90;
const INTERVAL: Duration = Duration::from_millis(500);

/// The first `workload certificate issued` line of `agent` with `rotation: "rotation"`.
fn rotation_line(agent: &Agent) -> Option<Value> {
    agent
        .log_lines()
        .into_iter()
        .find(|l| l["message"] == "workload certificate issued" && l["rotation"] == "rotation")
}

#[test]
fn certificates_rotate_during_live_traffic() {
    require_privileges();
    let cluster = cluster().nodes(2).add_pod(0, "a1").add_pod(1, "b1").build();
    let agents: Vec<Agent> = (0..2)
        .map(|i| {
            let mut spec = cluster.agent_spec(i);
            spec.cert_lifetime_secs = Some(LIFETIME_SECS);
            Agent::start(spec)
        })
        .collect();
    let started = Instant::now();
    let (a1, b1) = (cluster.pod("a1"), cluster.pod("b1"));
    let _servers = (a1.serve(&[8080]), b1.serve(&[8080]));
    for (agent, pod) in agents.iter().zip([a1, b1]) {
        let initial = agent
            .log_lines()
            .into_iter()
            .find(|l| l["message"] == "workload certificate issued")
            .unwrap_or_else(|| panic!("agent {} logged no certificate", agent.spec().node));
        assert_eq!(
            initial["identity"].as_str(),
            Some(pod.spiffe_id().as_str()),
            "{initial}"
        );
        assert_eq!(initial["rotation"], "initial", "{initial}");
        let secs = initial["expires_in_secs"].as_u64().unwrap_or(0);
        assert!(
            (LIFETIME_SECS - 10..=LIFETIME_SECS).contains(&secs),
            "requested {LIFETIME_SECS} s: {initial}"
        );
    }

    let request = |dst| {
        ClientRequest::new(dst)
            .send("across a rotation")
            .count(COUNT)
            .interval(INTERVAL)
    };
    let mut forth = a1.spawn_client(&request(b1.addr4(8080)));
    let mut back = b1.spawn_client(&request(a1.addr4(8080)));

    // Both rotate while the clients are still at work.
    for agent in &agents {
        let line = wait_for(
            Duration::from_secs(LIFETIME_SECS),
            &format!("a rotation on {}", agent.spec().node),
            || rotation_line(agent),
        );
        assert!(
            forth.is_running() && back.is_running(),
            "the traffic ended before {} rotated ({:?} after start): {line}",
            agent.spec().node,
            started.elapsed()
        );
    }

    let forth = forth.wait();
    let back = back.wait();
    assert!(
        started.elapsed() > Duration::from_secs(35),
        "traffic lasted only {:?}",
        started.elapsed()
    );
    assert_eq!(forth.expect_ok().len(), COUNT);
    assert_eq!(back.expect_ok().len(), COUNT);
    for r in forth.results.iter() {
        assert_eq!(r.hello_name(), Some("b1"), "{r:?}");
    }
    for r in back.results.iter() {
        assert_eq!(r.hello_name(), Some("a1"), "{r:?}");
    }

    // Every connection crossed over HBONE (no silent fallback to plaintext).
    for (agent, src) in agents.iter().zip(["default/a1", "default/b1"]) {
        let carried = agent
            .flows()
            .into_iter()
            .filter(|f| f.src_workload.as_deref() == Some(src))
            .filter(|f| f.raw["transport"] == "hbone" && f.outcome.as_deref() == Some("ok"))
            .count();
        assert_eq!(
            carried,
            COUNT,
            "{}: hbone flows from {src}",
            agent.spec().node
        );
    }

    for (i, agent) in agents.iter().enumerate() {
        let node = cluster.node(i);
        let ok = node.metric(r#"mesh_cert_rotations_total{result="ok"}"#);
        assert!(
            ok >= 2.0,
            "{}: mesh_cert_rotations_total ok = {ok}",
            agent.spec().node
        );
        let handshakes = node.metric(r#"mesh_tls_handshakes_total{side="client",result="ok"}"#);
        assert!(
            handshakes >= 2.0,
            "{}: no new HBONE connection after the rotation ({handshakes} client handshakes)",
            agent.spec().node
        );
        let failed = node.metric(r#"mesh_tls_handshakes_total{side="server",result="error"}"#);
        assert_eq!(
            failed,
            0.0,
            "{}: server handshake errors",
            agent.spec().node
        );
    }
}
