//! With its agent dead, a node's mesh stays closed. Node n1 runs a1, a2 (STRICT) and node n2
//! runs b1 and b2 (PERMISSIVE) and an unregistered x1; a DENY forbids a1 → a2:9090. Live
//! same-node and cross-node traffic runs when n1's agent is killed (SIGKILL, then, after a
//! restart, SIGTERM). With no agent on n1, the pinned programs keep working:
//! - new captured connects (same node, cross node to STRICT and to PERMISSIVE) fail at once
//!   with ECONNREFUSED (under 100 ms), never a hang;
//! - the L4 DENY still fails with EPERM at once;
//! - plaintext from outside the mesh (x1) to the STRICT pod a2 is still dropped;
//! - captures on the bridge and in n1's namespace (every pod veth) never see the payload sent
//!   after the agent died, and the bridge never sees the live traffic's payload in clear.

use std::time::Duration;

use mesh_tests::{
    capture::{self, Capture},
    require_privileges, ClientRequest, Host,
};

use super::policy_common::{authz, expect_denied, principal};
use crate::{assert_carried, cluster, expect_refused};

#[test]
fn agent_sigkill_keeps_mesh_closed() {
    require_privileges();
    let cluster = cluster()
        .nodes(2)
        .add_pod(0, "a1")
        .add_pod(0, "a2")
        .add_pod(1, "b1")
        .add_pod(1, "b2")
        .add_unregistered_pod(1, "x1")
        .permissive("b2")
        .build();
    let deny = authz(
        "deny-a1-9090",
        "a2",
        "DENY",
        &format!(
            "  rules:\n  - from:\n    - source: {{principals: [\"{}\"]}}\n    to:\n    - operation: {{ports: [\"9090\"]}}\n",
            principal("a1")
        ),
    );
    let dir = cluster.write_policy_dir("policy", &[("deny.yaml", &deny)]);
    let mut n1 = cluster.start_agent_with_policy(0, &dir);
    let _n2 = cluster.start_agent_with_policy(1, &dir);
    let (a1, a2, b1, b2, x1) = (
        cluster.pod("a1"),
        cluster.pod("a2"),
        cluster.pod("b1"),
        cluster.pod("b2"),
        cluster.pod("x1"),
    );
    let _sa2 = a2.serve(&[8080, 9090]);
    let _sb1 = b1.serve(&[8080]);
    let _sb2 = b2.serve(&[8080]);

    for (round, how) in [(1, "SIGKILL"), (2, "SIGTERM")] {
        assert_carried(&n1, a1, a2, "warm");
        let live_marker = format!("live-payload-{round}-7f3a");
        let dead_marker = format!("after-agent-death-{round}-c91e");
        let bridge = Capture::start(cluster.bridge_netns());
        let node_ns = Capture::start(cluster.node(0).netns().path());
        // Live traffic, same node and cross node, while the agent dies.
        let live: Vec<_> = [a2.addr4(8080), b1.addr4(8080), b2.addr4(8080)]
            .into_iter()
            .map(|dst| {
                a1.spawn_client(
                    &ClientRequest::new(dst)
                        .send(&live_marker)
                        .count(40)
                        .interval(Duration::from_millis(25))
                        .io_timeout(Duration::from_secs(2)),
                )
            })
            .collect();
        for c in &live {
            c.wait_results(3, mesh_tests::DEFAULT_TIMEOUT);
        }
        if how == "SIGKILL" {
            n1.kill_sigkill();
        } else {
            let status = n1.stop();
            assert_eq!(status.code(), Some(0), "exit after SIGTERM: {status}");
        }
        assert!(!n1.is_running());

        // The kernel side is still there.
        assert_eq!(
            cluster.node(0).attached_progs().len(),
            mesh_common::names::ALL_PROGS.len(),
            "programs detached after {how}: {:?}",
            cluster.node(0).attached_progs()
        );
        for dst in [
            a2.addr4(8080),
            b1.addr4(8080),
            b2.addr4(8080),
            a2.addr6(8080),
        ] {
            expect_refused(a1, dst, &dead_marker);
        }
        expect_denied(a1, a2.addr4(9090));
        // Plaintext from outside the mesh to the STRICT pod of the dead agent's node.
        let run = x1.client(
            &ClientRequest::new(a2.addr4(8080))
                .send(&dead_marker)
                .io_timeout(Duration::from_millis(1500)),
        );
        assert!(
            !run.success() && run.results.iter().all(|r| r.hello.is_none()),
            "x1 reached STRICT a2 in plaintext with n1's agent down: {:?}",
            run.results
        );

        let runs: Vec<_> = live.into_iter().map(|c| c.wait()).collect();
        let bridge_frames = bridge.stop();
        let node_frames = node_ns.stop();
        for (what, frames) in [("bridge", &bridge_frames), ("n1", &node_frames)] {
            let seen = frames
                .iter()
                .filter(|f| capture::contains(f, dead_marker.as_bytes()))
                .count();
            assert_eq!(
                seen, 0,
                "{what}: the payload sent after {how} was seen in clear"
            );
        }
        let live_clear = bridge_frames
            .iter()
            .filter(|f| capture::contains(f, live_marker.as_bytes()))
            .count();
        assert_eq!(live_clear, 0, "bridge: live payload in clear around {how}");
        // Some live connections succeeded before the death; none after reached a pod
        // without the agent (every success went through it: no plaintext bypass).
        let ok: usize = runs
            .iter()
            .map(|r| r.results.iter().filter(|x| x.echo_ok).count())
            .sum();
        assert!(
            ok > 0,
            "no live connection succeeded before {how}: {runs:?}"
        );

        n1.restart();
    }
}
