//! Revocation reaches connections that are already open. Pod a1 holds a connection to b1
//! through the mesh (HBONE from n1 to n2, presenting a1's workload certificate). The
//! operator revokes that certificate's serial (taken from n1's `workload certificate issued`
//! line): within seconds n2 closes the live connection (`connection closed: peer certificate
//! revoked`, naming the serial) and a1 sees its connection end; n1's identity manager obtains
//! a new certificate for a1, and new a1→b1 connections work with it.

use std::time::{Duration, Instant};

use mesh_tests::{require_privileges, wait_for, ClientRequest, Host, DEFAULT_TIMEOUT};
use serde_json::Value;

use crate::{assert_via_agent, cluster, issued_serials};

/// How long after the revocation the live connection must be closed.
const CLOSE_WITHIN: Duration = Duration::from_secs(8);

#[test]
fn revoked_certificate_closes_live_connection() {
    require_privileges();
    let cluster = cluster().nodes(2).add_pod(0, "a1").add_pod(1, "b1").build();
    let agents = cluster.start_agents();
    let (a1, b1) = (cluster.pod("a1"), cluster.pod("b1"));
    let _server = b1.serve(&[8080]);
    let a1_id = a1.spiffe_id();

    let serials = issued_serials(&agents[0], &a1_id);
    let serial = serials
        .last()
        .unwrap_or_else(|| panic!("n1 logged no certificate for {a1_id}"))
        .clone();

    // The live connection: a line exchanged end to end, then held open.
    let held = a1.hold(b1.addr4(8080), Duration::from_secs(60));
    let established = wait_for(DEFAULT_TIMEOUT, "a1's connection to b1 established", || {
        if let Some(f) = held.failed() {
            panic!("a1 → b1 failed: {f}");
        }
        held.established()
    });
    assert_eq!(
        established["hello"].as_str(),
        Some(format!("b1 {}", b1.addr4(8080)).as_str()),
        "{established}"
    );
    // n2 carries it as an open inbound tunnel.
    let active = r#"mesh_connections_active{direction="inbound"}"#;
    wait_for(DEFAULT_TIMEOUT, "an open inbound tunnel on n2", || {
        (cluster.node(1).metric(active) >= 1.0).then_some(())
    });
    assert!(
        held.closed().is_none(),
        "closed before the revocation: {:?}",
        held.closed()
    );

    let revoked_at = Instant::now();
    cluster.authority().revoke(&serial);

    // n2 closes the connection that presented the revoked certificate …
    let line = wait_for(
        CLOSE_WITHIN,
        "n2 closes the connection of the revoked certificate",
        || {
            agents[1]
                .log_lines()
                .into_iter()
                .find(|l| l["message"] == "connection closed: peer certificate revoked")
        },
    );
    assert_eq!(line["serial"].as_str(), Some(serial.as_str()), "{line}");
    assert_eq!(
        line["peer_identity"].as_str(),
        Some(a1_id.as_str()),
        "{line}"
    );
    // … and a1 sees it end, within a few seconds of the revocation.
    let closed: Value = wait_for(
        CLOSE_WITHIN.saturating_sub(revoked_at.elapsed()) + Duration::from_millis(500),
        "a1 sees its connection closed",
        || held.closed(),
    );
    assert!(
        revoked_at.elapsed() < CLOSE_WITHIN + Duration::from_secs(1),
        "closed only after {:?}: {closed}",
        revoked_at.elapsed()
    );

    // n1 replaced a1's revoked certificate …
    let fresh = wait_for(DEFAULT_TIMEOUT, "a new certificate for a1 on n1", || {
        issued_serials(&agents[0], &a1_id)
            .into_iter()
            .skip(serials.len())
            .find(|s| *s != serial)
    });
    assert_ne!(fresh, serial);
    // … and new connections work with it.
    let sent = "after the revocation";
    let run = a1.client(&ClientRequest::new(b1.addr4(8080)).send(sent));
    let flow = assert_via_agent(&agents[0], a1, b1, run.single(), sent);
    assert_eq!(flow.raw["transport"], "hbone", "{:?}", flow.raw);
    assert_eq!(
        flow.raw["src_identity"].as_str(),
        Some(a1_id.as_str()),
        "{:?}",
        flow.raw
    );
}
