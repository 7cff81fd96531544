//! h2c (prior knowledge) on a declared HTTP port: every stream is decided on its own. On one
//! connection, concurrent streams to an allowed and a denied path get `200` (from the pod)
//! and `403` `RBAC: access denied` (from the agent); the pod sees the allowed streams only;
//! the deciding agent logs the denial (layer l7). Across nodes and on the same node.

use mesh_tests::Host;

use super::{l7_common::l7_mesh, policy_common::wait_line};

#[test]
fn l7_h2c_per_stream_decisions() {
    let mesh = l7_mesh();
    let (cluster, agents) = (&mesh.cluster, &mesh.agents);
    let (b_server, c_server) = (&mesh.b_server, &mesh.c_server);
    let [a1, b1, c1] = ["a1", "b1", "c1"].map(|n| cluster.pod(n));

    for (dst, server, decider, side) in [
        (b1, &b_server, &agents[1], "inbound"),
        (c1, &c_server, &agents[0], "local"),
    ] {
        let addr = dst.addr6(8080);
        let run = a1.h2c(
            addr,
            &[
                "GET /api/one good.example",
                "GET /admin/two good.example",
                "POST /upload good.example +body=h2-body",
                "DELETE /api/three good.example",
                "GET /h good.example",
            ],
        );
        assert!(run.error.is_none(), "{run:?}");
        let name = dst.name();
        assert_eq!(
            run.statuses(),
            vec![
                (200, format!("{name} GET /api/one host=good.example")),
                (403, "RBAC: access denied".to_owned()),
                (200, format!("{name} POST /upload host=good.example body=7")),
                (403, "RBAC: access denied".to_owned()),
                (200, format!("{name} GET /h host=good.example")),
            ],
            "{run:?}"
        );
        let seen: Vec<String> = server
            .http_requests()
            .iter()
            .filter(|v| v["proto"] == "h2c")
            .map(|v| v["path"].as_str().unwrap_or("?").to_owned())
            .collect();
        let mut sorted = seen.clone();
        sorted.sort();
        assert_eq!(
            sorted,
            ["/api/one", "/h", "/upload"],
            "streams that reached {name}"
        );
        let line = wait_line(decider, "connection denied", "h2c /admin/two", |v| {
            v["layer"] == "l7" && v["path"] == "/admin/two" && v["dst"] == addr.to_string().as_str()
        });
        assert_eq!(line["side"], side, "{line}");
        assert_eq!(
            line["policy"],
            format!("default/no-admin-{name}").as_str(),
            "{line}"
        );
        assert_eq!(line["method"], "GET", "{line}");
    }
}
