//! 200 connections open at the same time, from four pods on two nodes, to
//! twenty different destinations on six pods that all listen on the SAME two
//! ports (IPv4 and IPv6): every connection is answered by the pod and address
//! it was addressed to, and the source node's agent records each one with
//! its own original destination. No cross-talk between redirected sockets.

use std::collections::BTreeSet;

use mesh_tests::{assert_eventually, require_privileges, ClientRequest, Host, Pod};

use crate::{cluster, hello_of};

const PORTS: [u16; 2] = [8080, 9090];
const PER_TARGET: usize = 10;

#[test]
fn concurrent_200_connections_no_crosstalk() {
    require_privileges();
    let cluster = cluster().nodes(2).pods_per_node(3).build();
    let agents = cluster.start_agents();
    let pods: Vec<&Pod> = cluster.pods().iter().collect();
    let _servers: Vec<_> = pods.iter().map(|p| p.serve(&PORTS)).collect();

    // Each client pod targets the five other pods once, on alternating ports
    // and families: 4 clients × 5 targets × 10 connections = 200.
    let clients = ["a1", "a2", "b1", "b2"];
    let mut running = Vec::new();
    for (c, name) in clients.iter().enumerate() {
        let src = cluster.pod(name);
        let others = pods.iter().filter(|p| p.name() != *name);
        for (j, dst) in others.enumerate() {
            let port = PORTS[(c + j) % 2];
            let addr = if (c + j) % 3 == 0 {
                dst.addr6(port)
            } else {
                dst.addr4(port)
            };
            let req = ClientRequest::new(addr)
                .send(&format!("from {name} to {} #{j}", dst.name()))
                .count(PER_TARGET)
                .concurrency(PER_TARGET);
            running.push((src, *dst, src.spawn_client(&req)));
        }
    }
    assert_eq!(running.len() * PER_TARGET, 200);
    let runs: Vec<_> = running
        .into_iter()
        .map(|(src, dst, c)| (src, dst, c.wait()))
        .collect();

    let mut expected = Vec::new();
    for (src, dst, run) in &runs {
        for r in run.expect_ok() {
            let target = r.connect_addr().expect("connect address");
            assert_eq!(target, run.request.connect);
            assert_eq!(
                r.hello.as_deref(),
                Some(hello_of(dst, target).as_str()),
                "cross-talk: {} → {target}: {r:?}",
                src.name()
            );
            expected.push((
                src.node_index(),
                src.workload(),
                r.local_addr().expect("local address"),
                target,
            ));
        }
    }
    assert_eq!(expected.len(), 200);

    // Every connection has its own flow record on its source node's agent.
    for (n, agent) in agents.iter().enumerate() {
        let want = expected.iter().filter(|e| e.0 == n).count();
        assert_eventually!(
            agent.flows().len() >= want,
            "agent {} logged {} of {want} flows",
            agent.spec().node,
            agent.flows().len()
        );
    }
    let mut conn_ids = BTreeSet::new();
    for (n, workload, local, target) in &expected {
        let flow = agents[*n]
            .flow_from(*local)
            .unwrap_or_else(|| panic!("no flow from {local} on node {n}"));
        assert_eq!(
            flow.src_workload.as_deref(),
            Some(workload.as_str()),
            "{:?}",
            flow.raw
        );
        assert_eq!(
            flow.orig_dst(),
            Some(*target),
            "cross-talk in the agent: {:?}",
            flow.raw
        );
        assert_eq!(flow.outcome.as_deref(), Some("ok"), "{:?}", flow.raw);
        if let Some(id) = flow.conn_id {
            assert!(
                conn_ids.insert((*n, id)),
                "conn_id {id} used twice on node {n}"
            );
        }
    }
}
