//! Authorization through a service is decided for the chosen endpoint workload, at its
//! destination side (b1 on the other node: its agent; c1 on the client's node: the source
//! agent's same-node path), and L7 `hosts` sees the `Host` header as the client sent it: the
//! endpoints' HTTP policy (the L7 scenarios' one) allows `/h` only for `Host: good.example`
//! and denies `/admin/*`, and the same requests to the service VIP get the same answers from
//! whichever endpoint served them.

use std::collections::BTreeSet;

use mesh_tests::{require_privileges, Host, ServiceEntry};

use super::{
    l7_common::{l7_builder, l7_policy},
    policy_common::{apply, docs},
};

/// (request, allowed) on one keep-alive connection to the VIP.
const REQUESTS: &[(&str, bool)] = &[
    ("GET /h good.example", true),
    ("GET /h other.example", false),
    ("GET /admin/x", false),
    ("GET /api/x", true),
];

#[test]
fn service_policy_decided_for_endpoint() {
    require_privileges();
    let cluster = l7_builder()
        .label("b1", "svc", "api")
        .label("c1", "svc", "api")
        .service(ServiceEntry {
            name: "api".into(),
            namespace: "default".into(),
            vips: vec!["10.96.0.20".parse().expect("vip")],
            ports: vec![(80, 8080)],
            selector: vec![("svc".into(), "api".into())],
        })
        .build();
    let agents = cluster.start_agents();
    let _b = cluster.pod("b1").serve_http(&[8080]);
    let _c = cluster.pod("c1").serve_http(&[8080]);
    apply(
        &cluster,
        &agents,
        "l7",
        &docs(&[l7_policy("b1"), l7_policy("c1")]),
    );
    let a1 = cluster.pod("a1");
    let vip = "10.96.0.20:80".parse().expect("vip");
    let requests: Vec<&str> = REQUESTS.iter().map(|(r, _)| *r).collect();

    let mut served_by = BTreeSet::new();
    for _ in 0..30 {
        let run = a1.http1(vip, &requests, false);
        assert!(run.error.is_none(), "{run:?}");
        assert_eq!(run.responses.len(), REQUESTS.len(), "{run:?}");
        for (i, (req, allowed)) in REQUESTS.iter().enumerate() {
            let r = run.response(i);
            if *allowed {
                assert_eq!(r.status, Some(200), "{req}: {r:?}");
                let body = r.body.as_deref().unwrap_or_default();
                let name = body
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                assert!(name == "b1" || name == "c1", "{req}: {body:?}");
                if req.ends_with("good.example") {
                    assert!(body.contains("host=good.example"), "{req}: {body:?}");
                }
                served_by.insert(name);
            } else {
                assert!(r.is_rbac_denied(), "{req}: expected a 403, got {r:?}");
            }
        }
    }
    assert_eq!(
        served_by,
        BTreeSet::from(["b1".to_owned(), "c1".to_owned()]),
        "both endpoints (both sides of the decision) were exercised"
    );
}
