//! Istio's semantics for `hosts` with a port and for `when` conditions, through the real mesh,
//! across nodes (b1 on n2: decided by its agent) and on the same node (c1 on n1: decided by
//! the source agent), on one HTTP/1.1 keep-alive connection each:
//! - `hosts: ["good.example"]` matches `Host: good.example` (any case) but not
//!   `Host: good.example:8080` (ISTIO-SECURITY-2021-008): the port is part of the host;
//!   `hosts: ["good.example:8080"]` matches only with the port;
//! - `when` `request.headers[x-token]` (values) and a DENY on `request.headers[x-evil]`
//!   (presence) decide per request;
//! - `when` `source.ip` (values and notValues) is decided from the source's address.
//!
//! Denied requests get `403`; the pod sees exactly the allowed ones.

use mesh_tests::{Host, Pod, Server};

use super::policy_common::{apply, docs, policy};

fn policies(app: &str, src_ip: &str) -> String {
    docs(&[
        policy(
            "default",
            &format!("when-{app}"),
            Some(app),
            "ALLOW",
            false,
            &format!(
                "  rules:\n\
                 \x20 - to: [{{operation: {{paths: [\"/h\"], hosts: [\"good.example\"]}}}}]\n\
                 \x20 - to: [{{operation: {{paths: [\"/hp\"], hosts: [\"good.example:8080\"]}}}}]\n\
                 \x20 - to: [{{operation: {{paths: [\"/tok\"]}}}}]\n\
                 \x20   when: [{{key: \"request.headers[X-Token]\", values: [\"s3cret\"]}}]\n\
                 \x20 - to: [{{operation: {{paths: [\"/ip\"]}}}}]\n\
                 \x20   when: [{{key: source.ip, values: [\"{src_ip}/32\"]}}]\n\
                 \x20 - to: [{{operation: {{paths: [\"/ipn\"]}}}}]\n\
                 \x20   when: [{{key: remote.ip, notValues: [\"{src_ip}\"]}}]\n"
            ),
        ),
        policy(
            "default",
            &format!("no-evil-{app}"),
            Some(app),
            "DENY",
            false,
            "  rules:\n  - when: [{key: \"request.headers[x-evil]\", values: [\"*\"]}]\n",
        ),
    ])
}

/// `(request, allowed)`.
const CASES: &[(&str, bool)] = &[
    ("GET /h good.example", true),
    ("GET /h GOOD.Example", true),
    ("GET /h good.example:8080", false),
    ("GET /h good.example.", false),
    ("GET /hp good.example:8080", true),
    ("GET /hp good.example", false),
    ("GET /tok x +h:X-Token=s3cret", true),
    ("GET /tok x +h:x-token=wrong", false),
    ("GET /tok x", false),
    ("GET /h good.example +h:X-Evil=1", false),
    ("GET /ip", true),
    ("GET /ipn", false),
    ("GET /h good.example", true),
];

#[track_caller]
fn check(src: &Pod, dst: &Pod, server: &Server) {
    let addr = dst.addr4(8080);
    let requests: Vec<&str> = CASES.iter().map(|(r, _)| *r).collect();
    let before = server.http_requests().len();
    let run = src.http1(addr, &requests, false);
    assert!(run.error.is_none(), "{run:?}");
    assert_eq!(run.responses.len(), CASES.len(), "{run:?}");
    for (i, (req, allowed)) in CASES.iter().enumerate() {
        let r = run.response(i);
        if *allowed {
            assert_eq!(r.status, Some(200), "{req} to {}: {r:?}", dst.name());
        } else {
            assert!(
                r.is_rbac_denied(),
                "{req} to {}: expected 403 RBAC: access denied, got {r:?}",
                dst.name()
            );
        }
    }
    let seen: Vec<String> = server
        .http_requests()
        .split_off(before)
        .iter()
        .map(|v| v["path"].as_str().unwrap_or("?").to_owned())
        .collect();
    let want: Vec<&str> = CASES
        .iter()
        .filter(|(_, a)| *a)
        .map(|(r, _)| r.split_whitespace().nth(1).unwrap())
        .collect();
    assert_eq!(seen, want, "requests that reached {}", dst.name());
}

#[test]
fn l7_when_conditions_and_hosts_with_port() {
    let mesh = super::l7_common::l7_cluster();
    let (cluster, agents) = (&mesh.cluster, &mesh.agents);
    let (b_server, c_server) = (&mesh.b_server, &mesh.c_server);
    let [a1, b1, c1] = ["a1", "b1", "c1"].map(|n| cluster.pod(n));
    let a1_ip = a1.addr4(0).ip().to_string();
    apply(
        cluster,
        agents,
        "when",
        &docs(&[policies("b1", &a1_ip), policies("c1", &a1_ip)]),
    );
    check(a1, b1, b_server);
    check(a1, c1, c_server);
}
