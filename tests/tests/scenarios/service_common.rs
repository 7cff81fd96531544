//! Shared set-up of the service scenarios: a client pod a1 and three endpoints (a2 on the
//! client's node, b1 and b2 on the other) labelled `svc: web`, selected by service
//! `default/web` at 10.96.0.10 / fd00:96::10, port 80 → targetPort 8080.

use std::net::{IpAddr, SocketAddr};

use mesh_tests::{Agent, Cluster, ServiceEntry};

use crate::cluster;

/// The service's IPv4 virtual IP (no interface has it: only the kernel capture leads there).
pub const VIP4: &str = "10.96.0.10";
/// The service's IPv6 virtual IP.
pub const VIP6: &str = "fd00:96::10";
/// The service port clients connect to.
pub const PORT: u16 = 80;
/// The endpoints' port.
pub const TARGET_PORT: u16 = 8080;
/// The endpoint pods.
pub const ENDPOINTS: [&str; 3] = ["a2", "b1", "b2"];
/// The service as flow records and metrics name it.
pub const SERVICE: &str = "default/web";

/// The cluster (not started): 2 nodes, a1 and a2 on n1, b1 and b2 on n2, the service.
pub fn service_cluster() -> Cluster {
    let mut b = cluster()
        .nodes(2)
        .add_pod(0, "a1")
        .add_pod(0, "a2")
        .add_pod(1, "b1")
        .add_pod(1, "b2")
        .service(ServiceEntry {
            name: "web".into(),
            namespace: "default".into(),
            vips: vec![VIP4.parse().expect("vip"), VIP6.parse().expect("vip")],
            ports: vec![(PORT, TARGET_PORT)],
            selector: vec![("svc".into(), "web".into())],
        });
    for e in ENDPOINTS {
        b = b.label(e, "svc", "web");
    }
    b.build()
}

/// The service's IPv4 VIP at `port`.
pub fn vip4(port: u16) -> SocketAddr {
    SocketAddr::new(VIP4.parse::<IpAddr>().expect("vip"), port)
}

/// The source agent's `mesh_service_connections_total` for the service and `result`.
pub fn service_connections(cluster: &Cluster, node: usize, result: &str) -> f64 {
    cluster.node(node).metric(&format!(
        r#"mesh_service_connections_total{{service="{SERVICE}",result="{result}"}}"#
    ))
}

/// The flow records of `agent` that name the service.
pub fn service_flows(agent: &Agent) -> Vec<mesh_tests::FlowRecord> {
    agent
        .flows()
        .into_iter()
        .filter(|f| f.raw["service"] == SERVICE)
        .collect()
}
