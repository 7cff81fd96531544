//! 1,000 connections from pod a1 to a service VIP with three endpoints on two nodes: the
//! source agent balances them (each endpoint gets 20–47 %), every one is carried by the agent
//! (a flow record naming the service and the chosen endpoint; HBONE for the remote endpoints,
//! the same-node destination path for a2), and the payload never crosses the link in
//! plaintext. The IPv6 VIP reaches the same endpoints.

use std::collections::BTreeMap;

use mesh_tests::{
    assert_eventually,
    capture::{contains, tcp_segments, Capture},
    cluster::HBONE_PORT,
    require_privileges, ClientRequest, Host,
};

use super::service_common::{
    service_cluster, service_connections, service_flows, vip4, ENDPOINTS, PORT, SERVICE,
    TARGET_PORT, VIP6,
};

const CONNECTIONS: usize = 1000;

#[test]
fn service_vip_balances_across_endpoints() {
    require_privileges();
    let cluster = service_cluster();
    let agents = cluster.start_agents();
    let _servers: Vec<_> = ENDPOINTS
        .iter()
        .map(|e| cluster.pod(e).serve(&[TARGET_PORT]))
        .collect();
    let a1 = cluster.pod("a1");
    let capture = Capture::start(cluster.bridge_netns());

    let sent = "service-payload-5b1e-never-on-the-wire";
    let run = a1.client(
        &ClientRequest::new(vip4(PORT))
            .send(sent)
            .count(CONNECTIONS)
            .concurrency(20),
    );
    let results = run.expect_ok();
    let frames = capture.stop();

    // Balanced: every endpoint answered 20–47 % of the connections, at targetPort.
    let mut per_endpoint: BTreeMap<String, usize> = BTreeMap::new();
    for r in results {
        let name = r.hello_name().expect("a hello line").to_owned();
        assert!(
            ENDPOINTS.contains(&name.as_str()),
            "answered by {name}: {r:?}"
        );
        assert_eq!(r.hello_addr().map(|a| a.port()), Some(TARGET_PORT), "{r:?}");
        *per_endpoint.entry(name).or_default() += 1;
    }
    for e in ENDPOINTS {
        let n = per_endpoint.get(e).copied().unwrap_or(0);
        assert!(
            (CONNECTIONS * 20 / 100..=CONNECTIONS * 47 / 100).contains(&n),
            "endpoint {e} got {n} of {CONNECTIONS}: {per_endpoint:?}"
        );
    }

    // Every connection went through the source agent: a flow record naming the service, the
    // VIP as the original destination and the endpoint chosen (HBONE when remote).
    assert_eventually!(
        service_flows(&agents[0]).len() >= CONNECTIONS,
        "{} of {CONNECTIONS} service flows logged",
        service_flows(&agents[0]).len()
    );
    for f in service_flows(&agents[0]) {
        assert_eq!(f.orig_dst(), Some(vip4(PORT)), "{:?}", f.raw);
        assert_eq!(f.outcome.as_deref(), Some("ok"), "{:?}", f.raw);
        let endpoint = f.dst_workload.clone().unwrap_or_default();
        let want = if endpoint == "default/a2" {
            "local"
        } else {
            "hbone"
        };
        assert_eq!(f.raw["transport"], want, "{:?}", f.raw);
        let pod = cluster.pod(endpoint.trim_start_matches("default/"));
        assert_eq!(
            f.raw["endpoint"],
            pod.addr4(TARGET_PORT).to_string().as_str(),
            "{:?}",
            f.raw
        );
    }
    for r in results {
        let local = r.local_addr().expect("local address");
        let f = agents[0].flow_from(local).expect("a flow per connection");
        assert_eq!(
            f.dst_workload
                .as_deref()
                .map(|w| w.trim_start_matches("default/")),
            r.hello_name(),
            "the flow names the endpoint that answered: {:?}",
            f.raw
        );
    }
    assert_eq!(service_connections(&cluster, 0, "ok"), CONNECTIONS as f64);

    // On the wire: HBONE to n2, never the payload.
    let segments = tcp_segments(&frames);
    assert!(
        segments
            .iter()
            .any(|s| s.dst_port == HBONE_PORT && !s.payload.is_empty()),
        "no HBONE traffic among {} segments",
        segments.len()
    );
    for f in &frames {
        assert!(
            !contains(f, sent.as_bytes()),
            "the payload crossed the link in plaintext"
        );
    }

    // The IPv6 VIP: the same service, its endpoints reached.
    let v6 = std::net::SocketAddr::new(VIP6.parse().expect("vip"), PORT);
    let run6 = a1.client(&ClientRequest::new(v6).send(sent).count(30).concurrency(10));
    for r in run6.expect_ok() {
        let name = r.hello_name().expect("a hello line");
        assert!(ENDPOINTS.contains(&name), "answered by {name}: {r:?}");
    }
    assert_eq!(
        service_connections(&cluster, 0, "ok"),
        (CONNECTIONS + 30) as f64,
        "{SERVICE}"
    );
}
