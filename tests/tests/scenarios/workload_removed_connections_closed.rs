//! A workload removed from the mesh state loses its mesh at once, with no restart: a live
//! connection a1→b2 (through HBONE) is closed by the agents, n2 drops b2's certificate (its
//! agent no longer presents it), b2's address stops being a mesh destination on n1, and an
//! unrelated live connection a1→b1 on the same agents keeps working across the change.

use std::time::Duration;

use mesh_tests::{require_privileges, wait_for, ClientRequest, Host, DEFAULT_TIMEOUT};

use crate::cluster;

#[test]
fn workload_removed_connections_closed() {
    require_privileges();
    let cluster = cluster()
        .nodes(2)
        .add_pod(0, "a1")
        .add_pod(1, "b1")
        .add_pod(1, "b2")
        .build();
    let agents = cluster.start_agents();
    let (a1, b1, b2) = (cluster.pod("a1"), cluster.pod("b1"), cluster.pod("b2"));
    let _servers = (b1.serve(&[8080]), b2.serve(&[8080]));

    let doomed = a1.hold(b2.addr4(8080), Duration::from_secs(60));
    let kept = a1.hold(b1.addr4(8080), Duration::from_secs(60));
    for (name, h) in [("b2", &doomed), ("b1", &kept)] {
        let e = wait_for(DEFAULT_TIMEOUT, &format!("a1→{name} established"), || {
            h.established()
                .or_else(|| h.failed().map(|f| panic!("a1→{name}: {f}")))
        });
        assert!(
            e["hello"].as_str().is_some_and(|h| h.starts_with(name)),
            "{e}"
        );
    }

    let entries: Vec<_> = cluster
        .registry_entries()
        .into_iter()
        .filter(|e| e.name != "b2")
        .collect();
    let version = cluster.publish_state(&entries, cluster.services());
    cluster.wait_state_applied(&[0, 1], version);

    // The removed workload's connection is closed by the mesh; the other one lives on.
    let closed = wait_for(DEFAULT_TIMEOUT, "b2's connection closed", || {
        doomed.closed()
    });
    assert!(closed["how"].is_string(), "{closed}");
    assert!(
        kept.closed().is_none() && kept.failed().is_none(),
        "the unrelated connection a1→b1 was closed: {:?}",
        kept.closed()
    );
    crate::assert_carried(&agents[0], a1, b1, "still-meshed");
    // Whichever side noticed first says why: n1's flow record, or n2's closure line.
    let why = "closed: workload removed from the mesh state";
    wait_for(DEFAULT_TIMEOUT, "closure recorded", || {
        let flow = agents[0]
            .flows()
            .into_iter()
            .any(|f| f.raw["dst_workload"] == "default/b2" && f.raw["outcome"] == why);
        let line = agents[1]
            .log_lines()
            .into_iter()
            .any(|l| l["message"] == "connection closed: workload removed from the mesh state");
        (flow || line).then_some(())
    });

    // b2 is no longer a destination on n1: a new connection is not captured (it goes
    // directly, as to any address outside the mesh), and n2 dropped its certificate.
    let run = a1.client(&ClientRequest::new(b2.addr4(8080)).send("after"));
    let r = run.single();
    assert!(r.echo_ok, "{r:?}");
    assert!(
        agents[0]
            .flow_from(
                r.local
                    .as_deref()
                    .and_then(|l| l.parse().ok())
                    .expect("local address")
            )
            .is_none(),
        "a connection to a removed workload was still captured"
    );
    let dropped = wait_for(DEFAULT_TIMEOUT, "certificate dropped on n2", || {
        agents[1].log_lines().into_iter().find(|l| {
            l["message"].as_str().is_some_and(|m| m.contains("dropped"))
                && l.to_string().contains("sa-b2")
        })
    });
    let _ = dropped;
    let expiry =
        r#"mesh_cert_expiry_seconds{identity="spiffe://cluster.local/ns/default/sa/sa-b2"}"#;
    assert!(
        !cluster.node(1).metrics().contains_key(expiry),
        "n2 still reports a certificate for the removed workload"
    );
}
