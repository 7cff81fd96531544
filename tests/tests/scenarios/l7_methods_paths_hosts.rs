//! Per-request HTTP/1.1 decisions on a declared HTTP port, across nodes (b1 on n2: decided by
//! its agent, side `inbound`) and on the same node (c1 on n1: decided by the source agent,
//! side `local`, transport `local`). One keep-alive connection carries allowed and denied
//! requests — methods, notMethods, exact/prefix/suffix paths, notPaths, hosts/notHosts, a
//! chunked body, a DENY beating the ALLOW — and:
//! - a denied request gets `403` `RBAC: access denied` and the NEXT request on the same
//!   connection is served; the connection stays open;
//! - the pod sees exactly the allowed requests (a chunked body arrives whole);
//! - pipelined allowed/denied/allowed come back in order;
//! - the deciding agent logs `connection denied` (layer l7) with method, path and policy.

use mesh_tests::{wait_for, Agent, Host, Pod, Server, DEFAULT_TIMEOUT};

use super::{
    l7_common::{l7_mesh, CASES},
    policy_common::wait_line,
};

#[track_caller]
fn check(src: &Pod, dst: &Pod, server: &Server, decider: &Agent, side: &str) {
    let addr = dst.addr4(8080);
    let requests: Vec<&str> = CASES.iter().map(|(r, _)| *r).collect();
    let before = server.http_requests().len();
    let run = src.http1(addr, &requests, false);
    assert!(run.error.is_none(), "{run:?}");
    assert_eq!(run.responses.len(), CASES.len(), "{run:?}");
    for (i, (req, allowed)) in CASES.iter().enumerate() {
        let r = run.response(i);
        if *allowed {
            let mut words = req.split_whitespace();
            let (method, path) = (words.next().unwrap(), words.next().unwrap());
            assert_eq!(r.status, Some(200), "{req}: {r:?}");
            let body = r.body.as_deref().unwrap_or_default();
            if method != "HEAD" {
                assert!(
                    body.starts_with(&format!("{} {method} {path} host=", dst.name())),
                    "{req}: {body:?}"
                );
            }
        } else {
            assert!(
                r.is_rbac_denied(),
                "{req}: expected 403 RBAC: access denied, got {r:?}"
            );
        }
    }
    assert!(
        run.open,
        "the connection was closed after the last response: {run:?}"
    );
    // The pod saw the allowed requests only, in order, the chunked body whole.
    let seen: Vec<_> = server.http_requests().split_off(before);
    let want: Vec<&str> = CASES
        .iter()
        .filter(|(_, a)| *a)
        .map(|(r, _)| r.split_whitespace().nth(1).unwrap())
        .collect();
    let got: Vec<&str> = seen
        .iter()
        .map(|v| v["path"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(got, want, "requests that reached {}", dst.name());
    let upload = seen
        .iter()
        .find(|v| v["path"] == "/upload")
        .expect("upload reached the pod");
    assert_eq!(upload["body_len"], "hello-chunked-body".len(), "{upload}");

    // Denials are logged by the deciding agent, with the request and the policy.
    let admin_policy = format!("default/no-admin-{}", dst.name());
    let line = wait_line(decider, "connection denied", "l7 /admin/x", |v| {
        v["layer"] == "l7" && v["path"] == "/admin/x" && v["dst"] == addr.to_string().as_str()
    });
    assert_eq!(line["side"], side, "{line}");
    assert_eq!(line["method"], "GET", "{line}");
    assert_eq!(line["policy"], admin_policy.as_str(), "{line}");
    assert_eq!(line["src_identity"], src.spiffe_id().as_str(), "{line}");
    assert_eq!(line["dst_workload"], dst.workload().as_str(), "{line}");
    let line = wait_line(decider, "connection denied", "l7 DELETE /api/x", |v| {
        v["layer"] == "l7"
            && v["method"] == "DELETE"
            && v["path"] == "/api/x"
            && v["dst"] == addr.to_string().as_str()
    });
    assert_eq!(line["policy"], "-", "default deny of the ALLOW: {line}");

    // Pipelined: all three written at once, answered in order.
    let run = src.http1(
        addr,
        &["GET /api/p1", "GET /admin/p2", "POST /upload +body=xyz"],
        true,
    );
    assert!(run.error.is_none(), "{run:?}");
    let statuses = run.statuses();
    assert_eq!(statuses.len(), 3, "{run:?}");
    assert_eq!(
        statuses[0],
        (200, format!("{} GET /api/p1 host=-", dst.name()))
    );
    assert_eq!(statuses[1], (403, "RBAC: access denied".to_owned()));
    assert_eq!(
        statuses[2],
        (200, format!("{} POST /upload host=- body=3", dst.name()))
    );
    assert!(run.open, "{run:?}");
}

#[test]
fn l7_methods_paths_hosts() {
    let mesh = l7_mesh();
    let (cluster, agents) = (&mesh.cluster, &mesh.agents);
    let (b_server, c_server) = (&mesh.b_server, &mesh.c_server);
    let [a1, b1, c1] = ["a1", "b1", "c1"].map(|n| cluster.pod(n));

    check(a1, b1, b_server, &agents[1], "inbound");
    check(a1, c1, c_server, &agents[0], "local");
    // The same-node connections (the two of `check`) were carried locally by n1's agent, never
    // over HBONE.
    let c1_addr = c1.addr4(8080).to_string();
    let to_c1 = wait_for(DEFAULT_TIMEOUT, "n1's agent to log the flows to c1", || {
        let flows: Vec<_> = agents[0]
            .flows()
            .into_iter()
            .filter(|f| f.raw["orig_dst"] == c1_addr.as_str())
            .collect();
        (flows.len() >= 2).then_some(flows)
    });
    assert_eq!(to_c1.len(), 2, "{to_c1:?}");
    assert!(
        to_c1.iter().all(|f| f.raw["transport"] == "local"),
        "{to_c1:?}"
    );
    assert!(!agents[1]
        .log_lines()
        .iter()
        .any(|v| v["message"] == "inbound" && v["dst"] == c1.addr4(8080).to_string().as_str()));
}
