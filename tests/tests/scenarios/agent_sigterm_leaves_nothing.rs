//! An agent stopped with SIGTERM exits 0 and leaves nothing behind: no
//! program on the pod-cgroup parent, no link, no loaded program of its own,
//! no pin directory. Pods keep working, directly.

use std::time::Duration;

use mesh_tests::{assert_eventually, bpftool, require_privileges, ClientRequest, Host};

use crate::{assert_direct, assert_via_agent, cluster};

#[test]
fn agent_sigterm_leaves_nothing() {
    require_privileges();
    let cluster = cluster().nodes(1).add_pod(0, "a1").add_pod(0, "a2").build();
    let node = cluster.node(0);
    let mut agent = cluster.start_agent(0);
    let (a1, a2) = (cluster.pod("a1"), cluster.pod("a2"));
    let server = a2.serve(&[8080]);

    let run = a1.client(&ClientRequest::new(a2.addr4(8080)).send("before"));
    assert_via_agent(&agent, a1, a2, run.single(), "before");
    let ours: Vec<u32> = node.attached_progs().iter().map(|p| p.id).collect();
    assert_eq!(
        ours.len(),
        mesh_common::names::ALL_PROGS.len(),
        "attached: {:?}",
        node.attached_progs()
    );
    assert!(
        node.pin_dir().is_dir(),
        "no pin dir {} while running",
        node.pin_dir().display()
    );

    let status = agent.stop();
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status}\nstderr:\n{}",
        agent.stderr()
    );
    assert!(
        !node.pin_dir().exists(),
        "pin dir {} left after SIGTERM",
        node.pin_dir().display()
    );
    let t = Duration::from_secs(5);
    crate::assert_detached(node, t, "SIGTERM");
    assert_eventually!(
        timeout = t,
        {
            let live = bpftool::prog_ids();
            ours.iter().all(|id| !live.contains(id))
        },
        "programs {ours:?} still loaded"
    );

    let r = a1
        .client(&ClientRequest::new(a2.addr4(8080)).send("after"))
        .single()
        .clone();
    assert_direct(&server, "a2", &r);
}
