//! The admin port (`/metrics`, `/healthz`) listens on the node address, which pods can reach.
//! Only the node itself (its own addresses) and the `--admin-allow` networks may read it: an
//! enrolled pod and an unregistered pod get their connection closed without a byte of metrics,
//! over IPv4 and with a pipelined request; the node still reads `/metrics`.

use mesh_tests::{require_privileges, Host};

use crate::cluster;

#[test]
fn admin_port_refuses_pods() {
    require_privileges();
    let cluster = cluster()
        .nodes(1)
        .add_pod(0, "a1")
        .add_unregistered_pod(0, "x1")
        .build();
    let _agent = cluster.start_agent(0);
    let node = cluster.node(0);
    let admin = node.addr4(15020);
    for pod in [cluster.pod("a1"), cluster.pod("x1")] {
        let run = pod.raw(
            admin,
            "GET /metrics HTTP/1.1\r\nhost: a\r\n\r\nGET /healthz HTTP/1.1\r\nhost: a\r\n\r\n",
        );
        let received = run
            .raw
            .as_ref()
            .and_then(|v| v.get("received"))
            .and_then(|v| v.as_str())
            .unwrap_or("");
        assert!(
            received.is_empty(),
            "{} received from the admin port: {received:?}",
            pod.name()
        );
        assert!(
            run.responses.is_empty(),
            "{} read the admin port: {:?}",
            pod.name(),
            run.responses
        );
        assert!(
            !run.output.stdout.contains("mesh_"),
            "metrics leaked to {}: {}",
            pod.name(),
            run.output.stdout
        );
    }
    // The node itself still scrapes.
    let metrics = node.metrics();
    assert!(
        metrics.keys().any(|k| k.starts_with("mesh_")),
        "the node cannot read its own metrics: {metrics:?}"
    );
}
