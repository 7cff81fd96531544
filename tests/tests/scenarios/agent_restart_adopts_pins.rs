//! An agent killed with SIGKILL leaves its programs attached through their pinned links: the
//! mesh stays closed (a captured connect is refused, not sent directly). Restarted, the agent
//! adopts what is pinned: the same links (link ids unchanged) running the same programs
//! (same build: program ids unchanged, never detached), the same pinned maps, and traffic
//! flows through it again within 1 s of its ready line. Twice, so nothing accumulates.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use mesh_common::names;
use mesh_tests::{agent::list_pins, require_privileges, Host};

use crate::{assert_carried, cluster, expect_refused};

fn link_ids(node: &mesh_tests::Node) -> BTreeSet<u64> {
    node.attached_links()
        .iter()
        .filter_map(|l| l.get("id").and_then(serde_json::Value::as_u64))
        .collect()
}

#[test]
fn agent_restart_adopts_pins() {
    require_privileges();
    let cluster = cluster().nodes(1).add_pod(0, "a1").add_pod(0, "a2").build();
    let node = cluster.node(0);
    let mut agent = cluster.start_agent(0);
    let (a1, a2) = (cluster.pod("a1"), cluster.pod("a2"));
    let _server = a2.serve(&[8080]);

    let pins = list_pins(node.pin_dir());
    for map in names::ALL_MAPS {
        assert!(
            pins.iter().any(|p| p.ends_with(map)),
            "map {map} not pinned in {}: {pins:?}",
            node.pin_dir().display()
        );
    }
    for prog in names::ALL_PROGS {
        let link = format!("{}{prog}", names::LINK_PIN_PREFIX);
        assert!(
            pins.iter().any(|p| p.ends_with(&link)),
            "link of {prog} not pinned: {pins:?}"
        );
    }
    let progs = check_attached_once(node);
    let links = link_ids(node);
    assert_eq!(
        links.len(),
        names::ALL_PROGS.len(),
        "links: {:?}",
        node.attached_links()
    );

    for round in 1..=2 {
        let sent = format!("round {round}");
        assert_carried(&agent, a1, a2, &sent);

        agent.kill_sigkill();
        // Still attached, same programs, same links: the kernel did not let go.
        assert_eq!(
            check_attached_once(node),
            progs,
            "programs changed after SIGKILL"
        );
        assert_eq!(link_ids(node), links, "links changed after SIGKILL");
        expect_refused(a1, a2.addr4(8080), "agent down");

        agent.restart();
        let ready = Instant::now();
        let adopted: Vec<_> = agent
            .log_lines()
            .into_iter()
            .filter(|l| l["message"] == "pinned link")
            .collect();
        assert_eq!(adopted.len(), names::ALL_PROGS.len(), "{adopted:?}");
        assert!(
            adopted.iter().all(|l| l["action"] == "adopted"),
            "same build: every link adopted as it is: {adopted:?}"
        );
        let sent = format!("round {round}, restarted");
        assert_carried(&agent, a1, a2, &sent);
        assert!(
            ready.elapsed() < Duration::from_secs(1),
            "traffic flowed again only {:?} after ready",
            ready.elapsed()
        );
        assert_eq!(
            check_attached_once(node),
            progs,
            "programs replaced on restart {round}"
        );
        assert_eq!(link_ids(node), links, "links replaced on restart {round}");
        assert_eq!(
            list_pins(node.pin_dir()),
            pins,
            "pins changed across restart {round}"
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
