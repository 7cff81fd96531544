//! HTTP framing edges (beside the path bypass forms), through the real mesh, across nodes (b1 on n2) and on
//! the same node (c1 on n1), under the shared L7 policy (POST `/upload` and GET `/api/*`
//! allowed):
//! - repeated identical `Content-Length` → `400`, nothing reaches the pod;
//! - framing or routing fields in a request's chunked trailers → `400`, the request never
//!   completes at the pod;
//! - a malformed chunk after an allowed head → `400` (not a bare EOF), the request never
//!   completes at the pod;
//! - lower-case methods, `%00` and invalid percent-encoding → `400`;
//! - h2c: a `host` header that disagrees with `:authority` → `400`; one that agrees is served.

use mesh_tests::{Host, Pod, Server};

use super::l7_common::l7_mesh;

/// `(request bytes, what it is)`: each answered `400`, none completes at the pod.
const REFUSED: &[(&str, &str)] = &[
    (
        "POST /upload HTTP/1.1\r\ncontent-length: 3\r\ncontent-length: 3\r\n\r\nabc",
        "repeated identical content-length",
    ),
    (
        "POST /upload HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nhost: evil.example\r\n\r\n",
        "host in trailers",
    ),
    (
        "POST /upload HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\ncontent-length: 9\r\n\r\n",
        "content-length in trailers",
    ),
    (
        "POST /upload HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n\r\n",
        "malformed chunk after an allowed head",
    ),
    ("get /api/x HTTP/1.1\r\n\r\n", "lower-case method"),
    ("Get /api/x HTTP/1.1\r\n\r\n", "mixed-case method"),
    ("GET /api/x%00 HTTP/1.1\r\n\r\n", "%00"),
    ("GET /api/%zz HTTP/1.1\r\n\r\n", "invalid percent-encoding"),
    ("GET /api/x%4 HTTP/1.1\r\n\r\n", "truncated percent-encoding"),
    ("GET * HTTP/1.1\r\n\r\n", "asterisk-form without OPTIONS"),
    ("GET b1:8080 HTTP/1.1\r\n\r\n", "authority-form without CONNECT"),
];

#[track_caller]
fn check(src: &Pod, dst: &Pod, server: &Server) {
    let addr = dst.addr4(8080);
    for (bytes, what) in REFUSED {
        let before = server.http_requests().len();
        let run = src.raw(addr, bytes);
        let raw = run.raw.clone().expect("raw result");
        let received = raw["received"].as_str().unwrap_or_default();
        assert!(
            received.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{} {what}: {run:?}",
            dst.name()
        );
        assert_ne!(raw["how"], "open", "{} {what}: not closed", dst.name());
        assert_eq!(
            server.http_requests().len(),
            before,
            "{} {what}: a request completed at the pod: {:?}",
            dst.name(),
            server.http_requests()
        );
    }

    // h2c: `host` must agree with `:authority` (the client sends `:authority` = the address).
    let before = server.http_requests().len();
    let run = src.h2c(
        addr,
        &[
            "GET /api/h +header=host:evil.example",
            &format!("GET /api/h2 +header=host:{addr}"),
        ],
    );
    assert_eq!(run.response(0).status, Some(400), "{run:?}");
    assert_eq!(run.response(1).status, Some(200), "{run:?}");
    let seen: Vec<_> = server.http_requests().split_off(before);
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0]["path"], "/api/h2", "{seen:?}");

    // The port still serves.
    let run = src.http1(addr, &["POST /upload +chunked=fine"], false);
    assert_eq!(run.response(0).status, Some(200), "{run:?}");
}

#[test]
fn l7_http_framing_edges_refused() {
    let mesh = l7_mesh();
    let cluster = &mesh.cluster;
    let [a1, b1, c1] = ["a1", "b1", "c1"].map(|n| cluster.pod(n));
    check(a1, b1, &mesh.b_server);
    check(a1, c1, &mesh.c_server);
}
