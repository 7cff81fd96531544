//! When a starting agent's programs differ from those on the pinned links, it swaps them in
//! on the same links atomically (`BPF_LINK_UPDATE` with `BPF_F_REPLACE`), never detaching. The
//! difference is forced here by removing a pinned map while the agent is down (the attached
//! programs still use the old map, so the new agent must replace them). A client in a1 keeps
//! connecting to a2 throughout the kill, the restart and the swap: no connection ever reaches
//! a2 directly (which a detach-then-attach window would allow); every one is refused (or reset
//! or closed, if the agent was killed holding it) or carried by the agent — the one probe in
//! flight at the SIGKILL may be cut after its hello. Afterwards the link ids are the same, the
//! program ids new, and the old programs are unloaded.

use std::{collections::BTreeSet, time::Duration};

use mesh_common::names;
use mesh_tests::{assert_eventually, bpftool, require_privileges, ClientRequest, Host};

use crate::{assert_carried, cluster};

fn links(node: &mesh_tests::Node) -> BTreeSet<(u64, u64)> {
    node.attached_links()
        .iter()
        .filter_map(|l| Some((l.get("id")?.as_u64()?, l.get("prog_id")?.as_u64()?)))
        .collect()
}

#[test]
fn agent_restart_updates_programs_in_place() {
    require_privileges();
    let cluster = cluster().nodes(1).add_pod(0, "a1").add_pod(0, "a2").build();
    let node = cluster.node(0);
    let mut agent = cluster.start_agent(0);
    let (a1, a2) = (cluster.pod("a1"), cluster.pod("a2"));
    let server = a2.serve(&[8080]);
    assert_carried(&agent, a1, a2, "before");
    let before = links(node);
    assert_eq!(before.len(), names::ALL_PROGS.len(), "{before:?}");

    let probe = a1.spawn_client(
        &ClientRequest::new(a2.addr4(8080))
            .send("probe")
            .count(300)
            .interval(Duration::from_millis(10))
            .io_timeout(Duration::from_secs(2)),
    );
    agent.kill_sigkill();
    std::fs::remove_file(node.pin_dir().join(names::MAP_COUNTERS)).expect("remove a map pin");
    agent.restart();
    let actions: Vec<_> = agent
        .log_lines()
        .into_iter()
        .filter(|l| l["message"] == "pinned link")
        .collect();
    assert!(
        actions.len() == names::ALL_PROGS.len() && actions.iter().all(|l| l["action"] == "updated"),
        "expected every link updated in place: {actions:?}"
    );
    let run = probe.wait();

    let after = links(node);
    let ids = |s: &BTreeSet<(u64, u64)>| s.iter().map(|(l, _)| *l).collect::<BTreeSet<_>>();
    let progs = |s: &BTreeSet<(u64, u64)>| s.iter().map(|(_, p)| *p).collect::<BTreeSet<_>>();
    assert_eq!(
        ids(&after),
        ids(&before),
        "link ids changed: {before:?} → {after:?}"
    );
    assert!(
        progs(&after).is_disjoint(&progs(&before)),
        "programs not replaced: {before:?} → {after:?}"
    );
    let old: BTreeSet<u64> = progs(&before);
    assert_eventually!(
        timeout = Duration::from_secs(5),
        {
            let live = bpftool::prog_ids();
            old.iter().all(|id| !live.contains(&(*id as u32)))
        },
        "old programs {old:?} still loaded"
    );

    // Nothing bypassed the mesh at any moment: a2 never saw a1's own address as peer.
    let a1_ip = a1.addr4(0).ip();
    let direct: Vec<_> = server
        .accepted()
        .into_iter()
        .filter(|a| a.peer_addr().is_some_and(|p| p.ip() == a1_ip))
        .collect();
    assert!(
        direct.is_empty(),
        "connections reached a2 directly during the swap: {direct:?}"
    );
    // Each probe is carried, refused, or — at most one, since the client is sequential —
    // interrupted: carried by the agent up to the hello, then cut by the SIGKILL.
    let ok = run.results.iter().filter(|r| r.echo_ok).count();
    let refused = run
        .results
        .iter()
        .filter(|r| {
            r.hello.is_none()
                && r.error.as_deref().is_some_and(|e| {
                    // Refused while no agent listens; reset if the agent was killed while
                    // holding the connection, or closed (FIN, no hello) when it was killed
                    // after reading the probe — the kernel resets only with unread data.
                    e.contains("Connection refused")
                        || e.contains("Connection reset")
                        || e == "no hello line (got \"\")"
                })
        })
        .count();
    let interrupted = run
        .results
        .iter()
        .filter(|r| {
            !r.echo_ok
                && r.hello.is_some()
                && r.error
                    .as_deref()
                    .is_none_or(|e| e.contains("Connection reset"))
        })
        .count();
    assert!(
        interrupted <= 1 && ok + refused + interrupted == run.results.len(),
        "every probe is carried or refused ({interrupted} interrupted): {:?}",
        run.results
            .iter()
            .filter(|r| !r.echo_ok)
            .take(5)
            .collect::<Vec<_>>()
    );
    assert!(ok > 0, "no probe was carried");
    assert_carried(&agent, a1, a2, "after");
}
