//! The authority is not on the data path. With traffic flowing both ways between a1 (n1) and
//! b1 (n2), the authority is stopped: both agents notice (`authority unreachable, serving with
//! the current certificates`) and every connection still succeeds, including a new HBONE
//! connection made during the outage (a2 → b1, a source identity not pooled yet, so a fresh
//! mutual-TLS handshake with the certificates in hand). The authority is started again: the
//! agents reconnect (`authority reachable again`) and traffic goes on. No connection failed at
//! any point, and both agents stayed up and healthy.

use std::time::Duration;

use mesh_tests::{
    cluster::ADMIN_PORT, require_privileges, wait_for, Agent, ClientRequest, Host, Pod,
};

use crate::{assert_via_agent, cluster};

/// Background traffic per direction: 100 connections, one every 250 ms (≈ 25 s).
const COUNT: usize = 100;
const INTERVAL: Duration = Duration::from_millis(250);

fn logged(agent: &Agent, message: &str) -> bool {
    agent.log_lines().iter().any(|l| l["message"] == message)
}

/// A few connections `src` → `dst`, each checked end to end (via `agent`).
#[track_caller]
fn round(agent: &Agent, src: &Pod, dst: &Pod, what: &str) {
    let sent = format!("{what}: {} to {}", src.name(), dst.name());
    let run = src.client(&ClientRequest::new(dst.addr4(8080)).send(&sent).count(3));
    for r in run.expect_ok() {
        let flow = assert_via_agent(agent, src, dst, r, &sent);
        assert_eq!(flow.raw["transport"], "hbone", "{what}: {:?}", flow.raw);
    }
}

#[test]
fn authority_restart_does_not_interrupt_traffic() {
    require_privileges();
    let cluster = cluster()
        .nodes(2)
        .add_pod(0, "a1")
        .add_pod(0, "a2")
        .add_pod(1, "b1")
        .build();
    let mut agents = cluster.start_agents();
    let (a1, a2, b1) = (cluster.pod("a1"), cluster.pod("a2"), cluster.pod("b1"));
    let _servers = (a1.serve(&[8080]), b1.serve(&[8080]));

    let request = |dst| {
        ClientRequest::new(dst)
            .send("steady traffic")
            .count(COUNT)
            .interval(INTERVAL)
    };
    let forth = a1.spawn_client(&request(b1.addr4(8080)));
    let back = b1.spawn_client(&request(a1.addr4(8080)));
    round(&agents[0], a1, b1, "before the outage");

    let before_outage = forth.results_so_far().len() + back.results_so_far().len();
    cluster.authority().stop();
    for agent in &agents {
        wait_for(
            Duration::from_secs(10),
            &format!("{} notices the authority is gone", agent.spec().node),
            || {
                logged(
                    agent,
                    "authority unreachable, serving with the current certificates",
                )
                .then_some(())
            },
        );
    }
    round(&agents[0], a1, b1, "during the outage");
    round(&agents[1], b1, a1, "during the outage");
    round(&agents[0], a2, b1, "new HBONE connection during the outage");

    // The background traffic went on during the outage, without a failure.
    wait_for(
        Duration::from_secs(10),
        "background connections during the outage",
        || {
            (forth.results_so_far().len() + back.results_so_far().len() > before_outage + 4)
                .then_some(())
        },
    );
    let failed: Vec<_> = [&forth, &back]
        .iter()
        .flat_map(|c| c.results_so_far())
        .filter(|r| !r.echo_ok || r.error.is_some())
        .collect();
    assert!(failed.is_empty(), "failed during the outage: {failed:?}");

    cluster.authority().start();
    for agent in &agents {
        wait_for(
            Duration::from_secs(10),
            &format!("{} reconnects to the authority", agent.spec().node),
            || logged(agent, "authority reachable again").then_some(()),
        );
    }
    round(&agents[0], a1, b1, "after the restart");
    round(&agents[1], b1, a1, "after the restart");

    let (forth, back) = (forth.wait(), back.wait());
    assert_eq!(forth.expect_ok().len(), COUNT);
    assert_eq!(back.expect_ok().len(), COUNT);

    for (i, agent) in agents.iter_mut().enumerate() {
        assert!(agent.is_running(), "agent {} exited", agent.spec().node);
        assert_eq!(
            cluster.node(i).http_get(ADMIN_PORT, "/healthz").trim(),
            "ok"
        );
        let failures = agent
            .flows()
            .into_iter()
            .filter(|f| f.outcome.as_deref() != Some("ok"))
            .map(|f| f.raw)
            .collect::<Vec<_>>();
        assert!(
            failures.is_empty(),
            "{}: failed flows {failures:?}",
            agent.spec().node
        );
    }
}
