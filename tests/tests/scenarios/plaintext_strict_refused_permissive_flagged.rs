//! Inbound protection in the kernel. A plaintext client that does not go
//! through the mesh (a pod cgroup that is not enrolled, on another node)
//! connects to a STRICT pod and to a PERMISSIVE pod on node n2:
//! - STRICT: its SYN is dropped by `mesh_ingress`, the connect times out, n2's
//!   agent logs `plaintext refused` naming the client's address, the
//!   destination and the destination workload, and `ingress_plaintext_refused`
//!   moves in the pinned `mesh_counters`;
//! - PERMISSIVE: the connection reaches the pod directly, and the agent logs
//!   `plaintext inside a secure zone` (counter `ingress_plaintext_permissive`).
//!
//! Mesh traffic to the STRICT pod still works, both from another node (the
//! remote agent, a mesh peer) and from the same node (the local agent binds
//! its outbound address), and is counted as `ingress_mesh`.

use std::{net::SocketAddr, time::Duration};

use mesh_common::{counters as ctr, names};
use mesh_tests::{
    bpftool, require_privileges, wait_for, Agent, ClientRequest, Host, DEFAULT_TIMEOUT,
};
use serde_json::Value;

use crate::{assert_direct, assert_via_agent, cluster};

/// Short: the refused connects are expected to time out.
const REFUSED_TIMEOUT: Duration = Duration::from_millis(1500);

/// The agent's log line with `message` whose `dst` is `dst`, waited for.
#[track_caller]
fn wait_event(agent: &Agent, message: &str, dst: SocketAddr) -> Value {
    wait_for(DEFAULT_TIMEOUT, &format!("`{message}` for {dst}"), || {
        agent.log_lines().into_iter().find(|v| {
            v.get("message").and_then(Value::as_str) == Some(message)
                && v.get("dst").and_then(Value::as_str) == Some(dst.to_string().as_str())
        })
    })
}

fn field<'a>(v: &'a Value, name: &str) -> &'a str {
    v.get(name)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no string field `{name}` in {v}"))
}

/// The IP of an `ip:port` field.
fn ip_of(v: &Value, name: &str) -> std::net::IpAddr {
    let s = field(v, name);
    s.parse::<SocketAddr>()
        .unwrap_or_else(|e| panic!("`{name}` {s:?} is not ip:port ({e}): {v}"))
        .ip()
}

#[test]
fn plaintext_strict_refused_permissive_flagged() {
    require_privileges();
    let cluster = cluster()
        .nodes(2)
        .add_pod(0, "a1")
        .add_unregistered_pod(0, "x1")
        .add_pod(1, "b1")
        .add_pod(1, "b2")
        .add_pod(1, "b3")
        .permissive("b2")
        .build();
    let agents = cluster.start_agents();
    let (a1, x1) = (cluster.pod("a1"), cluster.pod("x1"));
    let (b1, b2, b3) = (cluster.pod("b1"), cluster.pod("b2"), cluster.pod("b3"));
    assert!(!b1.permissive() && b2.permissive());
    let _strict = b1.serve(&[8080]);
    let permissive = b2.serve(&[8080]);
    let counters_pin = cluster.node(1).pin_dir().join(names::MAP_COUNTERS);
    let before = bpftool::counters(&counters_pin);

    // STRICT: plaintext from outside the mesh is refused (SYN dropped), IPv4 and IPv6.
    for dst in [b1.addr4(8080), b1.addr6(8080)] {
        let run = x1.client(
            &ClientRequest::new(dst)
                .send("plaintext")
                .io_timeout(REFUSED_TIMEOUT),
        );
        assert!(
            !run.success(),
            "plaintext connect to STRICT {dst} succeeded: {:?}",
            run.results
        );
        assert!(
            run.results.iter().all(|r| r.hello.is_none()),
            "the STRICT pod answered: {:?}",
            run.results
        );
        let line = wait_event(&agents[1], "plaintext refused", dst);
        let want_src = if dst.is_ipv4() {
            std::net::IpAddr::V4(x1.ip4())
        } else {
            std::net::IpAddr::V6(x1.ip6())
        };
        assert_eq!(ip_of(&line, "src"), want_src, "{line}");
        assert_eq!(field(&line, "dst_workload"), b1.workload(), "{line}");
    }

    // PERMISSIVE: allowed, reaches the pod directly, and flagged.
    let r = x1
        .client(&ClientRequest::new(b2.addr4(8080)).send("plaintext ok"))
        .single()
        .clone();
    assert_direct(&permissive, "b2", &r);
    let line = wait_event(&agents[1], "plaintext inside a secure zone", b2.addr4(8080));
    let local = r.local_addr().expect("client reports its local address");
    assert_eq!(field(&line, "src"), local.to_string(), "{line}");
    assert_eq!(field(&line, "dst_workload"), b2.workload(), "{line}");

    // Mesh traffic to the STRICT pod still works: cross-node and same-node.
    let sent = "through the mesh";
    let run = a1.client(&ClientRequest::new(b1.addr4(8080)).send(sent));
    assert_via_agent(&agents[0], a1, b1, run.single(), sent);
    let run = b3.client(&ClientRequest::new(b1.addr4(8080)).send(sent));
    assert_via_agent(&agents[1], b3, b1, run.single(), sent);
    let run = a1.client(&ClientRequest::new(b1.addr6(8080)).send(sent));
    assert_via_agent(&agents[0], a1, b1, run.single(), sent);

    // The kernel counted all of it.
    let after = bpftool::counters(&counters_pin);
    let moved = |i: u32| {
        let i = i as usize;
        after.get(i).copied().unwrap_or(0) - before.get(i).copied().unwrap_or(0)
    };
    let report = format!("before {before:?}, after {after:?}");
    // Each refused connect is its SYN and the retransmissions.
    assert!(moved(ctr::INGRESS_PLAINTEXT_REFUSED) >= 2, "{report}");
    assert!(moved(ctr::INGRESS_PLAINTEXT_PERMISSIVE) >= 1, "{report}");
    assert!(moved(ctr::INGRESS_MESH) >= 3, "{report}");
    assert_eq!(moved(ctr::INGRESS_ERRORS), 0, "{report}");
    assert_eq!(moved(ctr::EVENTS_DROPPED), 0, "{report}");
    // The agent's metrics count the same verdicts (one per kernel event; each refused
    // connect is at least one).
    let refused = r#"mesh_plaintext_connections_total{verdict="refused"}"#;
    let permissive = r#"mesh_plaintext_connections_total{verdict="permissive"}"#;
    let n2 = cluster.node(1);
    wait_for(DEFAULT_TIMEOUT, "n2's plaintext metrics", || {
        (n2.metric(refused) >= 2.0 && n2.metric(permissive) >= 1.0).then_some(())
    });
    assert!(
        n2.metric(refused) <= moved(ctr::INGRESS_PLAINTEXT_REFUSED) as f64,
        "more refusals counted than the kernel dropped SYNs: {report}"
    );
    assert_eq!(cluster.node(0).metric(refused), 0.0, "n1 refused plaintext");
    assert_eq!(
        cluster.node(0).metric(permissive),
        0.0,
        "n1 flagged plaintext"
    );
    // Nothing of it on n1, where no enrolled workload was a destination.
    let n1 = bpftool::counters(&cluster.node(0).pin_dir().join(names::MAP_COUNTERS));
    assert_eq!(n1[ctr::INGRESS_PLAINTEXT_REFUSED as usize], 0, "n1: {n1:?}");
}
