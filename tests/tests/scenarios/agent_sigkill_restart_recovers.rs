//! An agent killed with SIGKILL cannot clean up, yet nothing stale keeps
//! catching traffic: its programs leave the pod-cgroup parent, pods reach
//! each other directly. Restarted, it catches traffic again with exactly one
//! program per hook (connect4, connect6, sock_ops), the same set of pinned
//! maps, and no program or link left over from the killed run. Twice, so
//! nothing accumulates.

use std::{collections::BTreeSet, time::Duration};

use mesh_common::names;
use mesh_tests::{
    agent::list_pins, assert_eventually, bpftool, require_privileges, ClientRequest, Host,
};

use crate::{assert_direct, assert_via_agent, cluster};

#[test]
fn agent_sigkill_restart_recovers() {
    require_privileges();
    let cluster = cluster().nodes(1).add_pod(0, "a1").add_pod(0, "a2").build();
    let node = cluster.node(0);
    let mut agent = cluster.start_agent(0);
    let (a1, a2) = (cluster.pod("a1"), cluster.pod("a2"));
    let server = a2.serve(&[8080]);
    let t = Duration::from_secs(5);

    let pins = list_pins(node.pin_dir());
    assert!(
        !pins.is_empty(),
        "nothing pinned in {}",
        node.pin_dir().display()
    );
    for map in names::ALL_MAPS {
        assert!(
            pins.iter().any(|p| p.ends_with(map)),
            "map {map} not pinned in {}: {pins:?}",
            node.pin_dir().display()
        );
    }

    for round in 1..=2 {
        let sent = format!("round {round}");
        let run = a1.client(&ClientRequest::new(a2.addr4(8080)).send(&sent));
        assert_via_agent(&agent, a1, a2, run.single(), &sent);
        let before = check_attached_once(node);

        agent.kill_sigkill();
        crate::assert_detached(node, t, "SIGKILL");
        let r = a1
            .client(&ClientRequest::new(a2.addr4(8080)).send("agent down"))
            .single()
            .clone();
        assert_direct(&server, "a2", &r);

        agent.restart();
        let sent = format!("round {round}, restarted");
        let run = a1.client(&ClientRequest::new(a2.addr4(8080)).send(&sent));
        assert_via_agent(&agent, a1, a2, run.single(), &sent);
        let after = check_attached_once(node);
        assert_eventually!(
            timeout = t,
            {
                let live = bpftool::prog_ids();
                before
                    .iter()
                    .all(|id| after.contains(id) || !live.contains(id))
            },
            "programs {before:?} of the killed run still loaded (now attached: {after:?})"
        );
        assert_eq!(
            list_pins(node.pin_dir()),
            pins,
            "pinned maps changed across restart {round}"
        );
    }
}

/// Exactly one program per hook on the pod-cgroup parent, with our names, and
/// no link but theirs. Returns their ids.
#[track_caller]
fn check_attached_once(node: &mesh_tests::Node) -> BTreeSet<u32> {
    let progs = node.attached_progs();
    let mut types: Vec<&str> = progs.iter().map(|p| p.attach_type.as_str()).collect();
    types.sort_unstable();
    assert_eq!(
        types,
        [
            "cgroup_inet4_connect",
            "cgroup_inet6_connect",
            "cgroup_inet_ingress",
            "cgroup_sock_ops"
        ],
        "attached: {progs:?}"
    );
    let mut got: Vec<&str> = progs.iter().map(|p| p.name.as_str()).collect();
    got.sort_unstable();
    let mut want = names::ALL_PROGS.to_vec();
    want.sort_unstable();
    assert_eq!(got, want, "attached: {progs:?}");
    let ids: BTreeSet<u32> = progs.iter().map(|p| p.id).collect();
    let links = node.attached_links();
    assert!(
        links.len() <= names::ALL_PROGS.len(),
        "more links than programs on the pod cgroup: {links:?}"
    );
    for l in &links {
        let pid = l
            .get("prog_id")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0) as u32;
        assert!(
            ids.contains(&pid),
            "link to a program that is not attached (stale): {l}"
        );
    }
    ids
}
