//! Across nodes, a pod's connection travels inside HBONE over mutual TLS 1.3 between the two
//! node agents: the source agent records the HBONE transport and both identities, the
//! destination agent records the *verified* SPIFFE ID of the client workload, and a capture
//! on the link between the nodes sees TLS 1.3 on port 15008 and never the payload.

use mesh_tests::{
    capture::{contains, tcp_segments, Capture},
    cluster::HBONE_PORT,
    require_privileges, wait_for, ClientRequest, Host, DEFAULT_TIMEOUT,
};

use crate::{assert_via_agent, cluster};

#[test]
fn cross_node_mtls_roundtrip() {
    require_privileges();
    let cluster = cluster().nodes(2).add_pod(0, "a1").add_pod(1, "b1").build();
    let agents = cluster.start_agents();
    let (a1, b1) = (cluster.pod("a1"), cluster.pod("b1"));
    let _server = b1.serve(&[8080]);
    let capture = Capture::start(cluster.bridge_netns());

    let sent = "the-known-payload-7f3a9c-never-on-the-wire";
    let run = a1.client(&ClientRequest::new(b1.addr4(8080)).send(sent));
    let flow = assert_via_agent(&agents[0], a1, b1, run.single(), sent);
    let frames = capture.stop();

    let src_id = "spiffe://cluster.local/ns/default/sa/sa-a1";
    let dst_id = "spiffe://cluster.local/ns/default/sa/sa-b1";
    assert_eq!(flow.raw["transport"], "hbone", "{:?}", flow.raw);
    assert_eq!(flow.raw["src_identity"], src_id, "{:?}", flow.raw);
    assert_eq!(flow.raw["dst_identity"], dst_id, "{:?}", flow.raw);

    // The destination agent saw the client workload's verified identity.
    let inbound = wait_for(DEFAULT_TIMEOUT, "inbound record on n2", || {
        agents[1]
            .log_lines()
            .into_iter()
            .find(|l| l["message"] == "inbound" && l["dst"] == b1.addr4(8080).to_string().as_str())
    });
    assert_eq!(inbound["peer_identity"], src_id, "{inbound}");
    assert_eq!(inbound["dst_workload"], "default/b1", "{inbound}");
    assert_eq!(inbound["outcome"], "ok", "{inbound}");
    assert_eq!(
        inbound["bytes_in"].as_u64(),
        Some(sent.len() as u64),
        "{inbound}"
    );

    // On the wire: TLS on 15008, TLS 1.3 negotiated, and never the payload.
    let segments = tcp_segments(&frames);
    let hbone: Vec<_> = segments
        .iter()
        .filter(|s| s.src_port == HBONE_PORT || s.dst_port == HBONE_PORT)
        .filter(|s| !s.payload.is_empty())
        .collect();
    assert!(
        !hbone.is_empty(),
        "no HBONE traffic captured among {} segments",
        segments.len()
    );
    // ServerHello's supported_versions extension selecting TLS 1.3 (0x002b, len 2, 0x0304).
    assert!(
        hbone.iter().any(|s| s.src_port == HBONE_PORT
            && contains(&s.payload, &[0x00, 0x2b, 0x00, 0x02, 0x03, 0x04])),
        "no TLS 1.3 ServerHello from port {HBONE_PORT}"
    );
    // Application data records (type 23, legacy version 0x0303) both ways.
    for dir in [true, false] {
        assert!(
            hbone
                .iter()
                .filter(|s| (s.dst_port == HBONE_PORT) == dir)
                .any(|s| s.payload.starts_with(&[0x17, 0x03, 0x03])),
            "no TLS application data records {} port {HBONE_PORT}",
            if dir { "to" } else { "from" }
        );
    }
    for f in &frames {
        assert!(
            !contains(f, sent.as_bytes()),
            "the payload crossed the link in plaintext"
        );
    }
    // Handshake counters on both sides.
    let ok_server = r#"mesh_tls_handshakes_total{side="server",result="ok"}"#;
    let ok_client = r#"mesh_tls_handshakes_total{side="client",result="ok"}"#;
    assert!(cluster.node(1).metric(ok_server) >= 1.0);
    assert!(cluster.node(0).metric(ok_client) >= 1.0);
    let expiry = format!(r#"mesh_cert_expiry_seconds{{identity="{src_id}"}}"#);
    assert!(
        cluster.node(0).metric(&expiry) > 3600.0,
        "certificate expiry metric"
    );
}
