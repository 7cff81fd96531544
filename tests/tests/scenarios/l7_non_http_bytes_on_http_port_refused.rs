//! Bytes that are not HTTP on a declared HTTP port under request-level policy: the deciding
//! agent closes the connection without ever connecting to the pod (its server accepts
//! nothing), across nodes and on the same node. A well-formed request on the same port still
//! works afterwards. A TLS ClientHello is refused the same way. The port speaks HTTP whatever
//! the policy: the same holds for d1 (n2), which no policy selects, and for e1 (n1), whose
//! only policy is an L4 allow-all (`rules: [{}]`).

use mesh_tests::{require_privileges, Host};

use super::{
    l7_common::l7_policy,
    policy_common::{apply, docs, policy},
};
use crate::cluster;

#[test]
fn l7_non_http_bytes_on_http_port_refused() {
    require_privileges();
    let cluster = cluster()
        .nodes(2)
        .add_pod(0, "a1")
        .add_pod(0, "c1")
        .add_pod(0, "e1")
        .add_pod(1, "b1")
        .add_pod(1, "d1")
        .http_ports("b1", &[8080])
        .http_ports("c1", &[8080])
        .http_ports("d1", &[8080])
        .http_ports("e1", &[8080])
        .build();
    let agents = cluster.start_agents();
    let [a1, b1, c1, d1, e1] = ["a1", "b1", "c1", "d1", "e1"].map(|n| cluster.pod(n));
    let servers = [b1, c1, d1, e1].map(|p| (p, p.serve_http(&[8080])));
    let allow_all = policy(
        "default",
        "all-e1",
        Some("e1"),
        "ALLOW",
        false,
        "  rules:\n  - {}\n",
    );
    apply(
        &cluster,
        &agents,
        "l7",
        &docs(&[l7_policy("b1"), l7_policy("c1"), allow_all]),
    );

    for (dst, server) in &servers {
        for garbage in [
            "this is not http at all\r\n\r\n",
            "\u{16}\u{3}\u{1}\u{2}\u{5}hello",
            "GET /api/x HTTP/9 garbage garbage\r\n\r\n",
        ] {
            let run = a1.raw(dst.addr4(8080), garbage);
            let raw = run.raw.clone().expect("raw result");
            assert!(run.error.is_none(), "{run:?}");
            assert_ne!(
                raw["how"],
                "open",
                "{garbage:?} to {}: not closed: {run:?}",
                dst.name()
            );
            let received = raw["received"].as_str().unwrap_or_default();
            assert!(
                !received.contains(dst.name()),
                "{garbage:?} reached {}: {received:?}",
                dst.name()
            );
        }
        assert!(
            server.accepted().is_empty(),
            "{} saw a connection: {:?}",
            dst.name(),
            server.accepted()
        );
        // The port still serves HTTP.
        let run = a1.http1(dst.addr6(8080), &["GET /api/after"], false);
        assert_eq!(
            run.statuses(),
            vec![(200, format!("{} GET /api/after host=-", dst.name()))]
        );
    }
}
