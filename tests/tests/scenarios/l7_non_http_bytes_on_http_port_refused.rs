//! Bytes that are not HTTP on a declared HTTP port under request-level policy: the deciding
//! agent closes the connection without ever connecting to the pod (its server accepts
//! nothing), across nodes and on the same node. A well-formed request on the same port still
//! works afterwards. A TLS ClientHello is refused the same way.

use mesh_tests::{require_privileges, Host};

use super::{
    l7_common::l7_policy,
    policy_common::{apply, docs},
};
use crate::cluster;

#[test]
fn l7_non_http_bytes_on_http_port_refused() {
    require_privileges();
    let cluster = cluster()
        .nodes(2)
        .add_pod(0, "a1")
        .add_pod(0, "c1")
        .add_pod(1, "b1")
        .http_ports("b1", &[8080])
        .http_ports("c1", &[8080])
        .build();
    let agents = cluster.start_agents();
    let [a1, b1, c1] = ["a1", "b1", "c1"].map(|n| cluster.pod(n));
    let b_server = b1.serve_http(&[8080]);
    let c_server = c1.serve_http(&[8080]);
    apply(&cluster, &agents, "l7", &docs(&[l7_policy("b1"), l7_policy("c1")]));

    for (dst, server) in [(b1, &b_server), (c1, &c_server)] {
        for garbage in [
            "this is not http at all\r\n\r\n",
            "\u{16}\u{3}\u{1}\u{2}\u{5}hello",
            "GET /api/x HTTP/9 garbage garbage\r\n\r\n",
        ] {
            let run = a1.raw(dst.addr4(8080), garbage);
            let raw = run.raw.clone().expect("raw result");
            assert!(run.error.is_none(), "{run:?}");
            assert_ne!(raw["how"], "open", "{garbage:?} to {}: not closed: {run:?}", dst.name());
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
        let run = a1.http1(dst.addr4(8080), &["GET /api/after"], false);
        assert_eq!(run.statuses(), vec![(200, format!("{} GET /api/after host=-", dst.name()))]);
    }
}
