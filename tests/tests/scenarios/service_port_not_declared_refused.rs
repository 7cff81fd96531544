//! A connect to a service VIP on a port the service does not declare is captured (never sent
//! in plaintext toward the VIP) and refused by the agent: the connection is closed, the flow
//! record names the service and the refusal, no endpoint sees a connection.

use mesh_tests::{assert_eventually, require_privileges, ClientRequest, Host};

use super::service_common::{
    service_cluster, service_connections, service_flows, vip4, ENDPOINTS, TARGET_PORT,
};

#[test]
fn service_port_not_declared_refused() {
    require_privileges();
    let cluster = service_cluster();
    let agents = cluster.start_agents();
    let servers: Vec<_> = ENDPOINTS
        .iter()
        .map(|e| cluster.pod(e).serve(&[TARGET_PORT, 81]))
        .collect();
    let a1 = cluster.pod("a1");

    // Port 81 (every endpoint listens there, but the service does not declare it) and the
    // targetPort itself on the VIP: both refused.
    for port in [81, TARGET_PORT] {
        let run = a1.client(&ClientRequest::new(vip4(port)).send("nope"));
        assert!(!run.success(), "a connection to {} succeeded", vip4(port));
        assert!(
            run.results.iter().all(|r| r.hello.is_none()),
            "an endpoint answered: {:?}",
            run.results
        );
    }
    assert_eventually!(
        service_flows(&agents[0]).len() >= 2,
        "refusals logged as flows"
    );
    for f in service_flows(&agents[0]) {
        let outcome = f.outcome.clone().unwrap_or_default();
        assert!(outcome.contains("not a port of the service"), "{:?}", f.raw);
    }
    assert_eq!(service_connections(&cluster, 0, "refused"), 2.0);
    for s in &servers {
        assert!(s.accepted().is_empty(), "an endpoint accepted a connection");
    }
}
