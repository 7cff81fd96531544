//! SIGTERM drains and exits 0 but leaves the mesh in the kernel: the programs stay attached,
//! the pins stay, and a captured connect is refused rather than sent in plaintext. Only
//! `mesh-agent uninstall --pin-dir …` takes the mesh off the node: no program on the pod-cgroup
//! parent, no link, no loaded program of ours, no pin directory; pods then reach each other
//! directly. A second uninstall finds nothing and succeeds; a corrupt pin (a plain file) in the
//! directory does not stop it.

use std::time::Duration;

use mesh_tests::{assert_eventually, bpftool, require_privileges, ClientRequest, Host};

use crate::{assert_carried, assert_direct, cluster, expect_refused};

#[test]
fn uninstall_leaves_nothing() {
    require_privileges();
    let cluster = cluster().nodes(1).add_pod(0, "a1").add_pod(0, "a2").build();
    let node = cluster.node(0);
    let mut agent = cluster.start_agent(0);
    let (a1, a2) = (cluster.pod("a1"), cluster.pod("a2"));
    let server = a2.serve(&[8080]);

    assert_carried(&agent, a1, a2, "before");
    let ours: Vec<u32> = node.attached_progs().iter().map(|p| p.id).collect();
    assert_eq!(ours.len(), mesh_common::names::ALL_PROGS.len());

    let status = agent.stop();
    assert_eq!(
        status.code(),
        Some(0),
        "exit after SIGTERM: {status}\n{}",
        agent.stderr()
    );
    assert!(node.pin_dir().is_dir(), "SIGTERM removed the pins");
    let still: Vec<u32> = node.attached_progs().iter().map(|p| p.id).collect();
    assert_eq!(still, ours, "SIGTERM detached programs");
    expect_refused(a1, a2.addr4(8080), "closed");

    // A stray file among the pins must not block the uninstall.
    std::fs::create_dir_all(node.pin_dir()).unwrap();
    let out = agent.uninstall();
    assert!(
        out.status.success(),
        "uninstall failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json report");
    assert_eq!(
        report["links"].as_array().map(Vec::len),
        Some(mesh_common::names::ALL_PROGS.len()),
        "{report}"
    );
    assert!(!node.pin_dir().exists(), "pin dir left after uninstall");
    let t = Duration::from_secs(5);
    crate::assert_detached(node, t, "uninstall");
    assert_eventually!(
        timeout = t,
        {
            let live = bpftool::prog_ids();
            ours.iter().all(|id| !live.contains(id))
        },
        "programs {ours:?} still loaded after uninstall"
    );
    let again = agent.uninstall();
    assert!(again.status.success(), "second uninstall: {again:?}");

    let r = a1
        .client(&ClientRequest::new(a2.addr4(8080)).send("after"))
        .single()
        .clone();
    assert_direct(&server, "a2", &r);
}
