//! IPv6 connections are caught (cgroup/connect6) and carried like IPv4 ones:
//! across nodes and on the same node, the original IPv6 destination is
//! recorded and reached.

use mesh_tests::{require_privileges, ClientRequest, Host};

use crate::{assert_via_agent, cluster};

#[test]
fn ipv6_pod_to_pod_redirected() {
    require_privileges();
    let cluster = cluster()
        .nodes(2)
        .add_pod(0, "a1")
        .add_pod(0, "a2")
        .add_pod(1, "b1")
        .build();
    let agents = cluster.start_agents();
    let (a1, a2, b1) = (cluster.pod("a1"), cluster.pod("a2"), cluster.pod("b1"));
    let _s1 = b1.serve(&[8080]);
    let _s2 = a2.serve(&[8080]);

    let sent = "over IPv6";
    for dst in [b1, a2] {
        let run = a1.client(&ClientRequest::new(dst.addr6(8080)).send(sent));
        let flow = assert_via_agent(&agents[0], a1, dst, run.single(), sent);
        assert!(
            flow.orig_dst().is_some_and(|a| a.is_ipv6()),
            "{:?}",
            flow.raw
        );
    }
}
