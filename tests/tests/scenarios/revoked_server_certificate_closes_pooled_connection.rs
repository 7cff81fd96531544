//! Revocation is enforced by the client side too. Pod a1 holds a connection to b1 through the
//! mesh; the operator revokes the certificate n2 presents for b1 (its serial from n2's
//! `workload certificate issued` line). n1's pool closes the HBONE connection whose server
//! certificate is now revoked (`connection closed: peer certificate revoked`, naming the
//! serial), a1 sees its connection end, n2 obtains a new certificate for b1, and new
//! a1 → b1 connections work with it.

use std::time::Duration;

use mesh_tests::{require_privileges, wait_for, ClientRequest, Host, DEFAULT_TIMEOUT};

use crate::{assert_via_agent, cluster, issued_serials};

const CLOSE_WITHIN: Duration = Duration::from_secs(8);

#[test]
fn revoked_server_certificate_closes_pooled_connection() {
    require_privileges();
    let cluster = cluster().nodes(2).add_pod(0, "a1").add_pod(1, "b1").build();
    let agents = cluster.start_agents();
    let (a1, b1) = (cluster.pod("a1"), cluster.pod("b1"));
    let _server = b1.serve(&[8080]);
    let b1_id = b1.spiffe_id();
    let serials = issued_serials(&agents[1], &b1_id);
    let serial = serials.last().expect("n2 logged b1's certificate").clone();

    let held = a1.hold(b1.addr4(8080), Duration::from_secs(60));
    wait_for(DEFAULT_TIMEOUT, "a1's connection to b1 established", || {
        if let Some(f) = held.failed() {
            panic!("a1 → b1 failed: {f}");
        }
        held.established()
    });

    cluster.authority().revoke(&serial);
    let line = wait_for(CLOSE_WITHIN, "n1 closes the pooled connection", || {
        agents[0]
            .log_lines()
            .into_iter()
            .find(|l| l["message"] == "connection closed: peer certificate revoked")
    });
    assert_eq!(line["serial"].as_str(), Some(serial.as_str()), "{line}");
    assert_eq!(line["dst"].as_str(), Some(b1_id.as_str()), "{line}");
    let closed = wait_for(CLOSE_WITHIN, "a1 sees its connection closed", || {
        held.closed()
    });
    assert!(closed["how"].is_string(), "{closed}");

    wait_for(DEFAULT_TIMEOUT, "a new certificate for b1 on n2", || {
        issued_serials(&agents[1], &b1_id)
            .into_iter()
            .skip(serials.len())
            .find(|s| *s != serial)
    });
    let sent = "after the server's revocation";
    let run = a1.client(&ClientRequest::new(b1.addr4(8080)).send(sent));
    let flow = assert_via_agent(&agents[0], a1, b1, run.single(), sent);
    assert_eq!(
        flow.raw["dst_identity"].as_str(),
        Some(b1_id.as_str()),
        "{:?}",
        flow.raw
    );
}
