//! The L7 policy the HTTP scenarios share, its mini-cluster, and its expectations.

use mesh_tests::{require_privileges, Agent, Cluster, ClusterBuilder, Host, Server};

use super::policy_common::{apply, docs, policy};

/// Two nodes: `a1` and `c1` on n1, `b1` on n2; `b1` and `c1` serve HTTP on 8080 (declared in
/// the registry) under [`l7_policy`], applied to both nodes. Fields drop in order: servers,
/// agents, then the cluster.
pub struct L7Mesh {
    pub b_server: Server,
    pub c_server: Server,
    pub agents: Vec<Agent>,
    pub cluster: Cluster,
}

pub fn l7_mesh() -> L7Mesh {
    let mesh = l7_cluster();
    apply(
        &mesh.cluster,
        &mesh.agents,
        "l7",
        &docs(&[l7_policy("b1"), l7_policy("c1")]),
    );
    mesh
}

/// The [`L7Mesh`] cluster as built: `a1` and `c1` on n1, `b1` on n2, HTTP on 8080 declared for
/// `b1` and `c1`.
pub fn l7_builder() -> ClusterBuilder {
    crate::cluster()
        .nodes(2)
        .add_pod(0, "a1")
        .add_pod(0, "c1")
        .add_pod(1, "b1")
        .http_ports("b1", &[8080])
        .http_ports("c1", &[8080])
}

/// The [`L7Mesh`] cluster, agents and servers, with no policy applied yet.
pub fn l7_cluster() -> L7Mesh {
    require_privileges();
    let cluster = l7_builder().build();
    let agents = cluster.start_agents();
    let b_server = cluster.pod("b1").serve_http(&[8080]);
    let c_server = cluster.pod("c1").serve_http(&[8080]);
    L7Mesh {
        b_server,
        c_server,
        agents,
        cluster,
    }
}

/// An ALLOW policy on pod `app` (HTTP on 8080) with one rule per HTTP field kind, and a DENY
/// for `/admin/*`:
/// - GET/HEAD on `/api/*`, `*.json` and exactly `/exact`, except `/api/secret`;
/// - POST on `/upload`;
/// - `/h` only with `Host: good.example`; `/nh` unless `Host: bad.example`;
/// - `/nm` with any method but DELETE.
pub fn l7_policy(app: &str) -> String {
    docs(&[
        policy(
            "default",
            &format!("l7-{app}"),
            Some(app),
            "ALLOW",
            false,
            "  rules:\n\
             \x20 - to:\n\
             \x20   - operation:\n\
             \x20       methods: [\"GET\", \"HEAD\"]\n\
             \x20       paths: [\"/api/*\", \"*.json\", \"/exact\", \"/admin/*\"]\n\
             \x20       notPaths: [\"/api/secret\"]\n\
             \x20   - operation: {methods: [\"POST\"], paths: [\"/upload\"]}\n\
             \x20   - operation: {paths: [\"/h\"], hosts: [\"good.example\"]}\n\
             \x20   - operation: {paths: [\"/nh\"], notHosts: [\"bad.example\"]}\n\
             \x20   - operation: {paths: [\"/nm\"], notMethods: [\"DELETE\"]}\n",
        ),
        policy(
            "default",
            &format!("no-admin-{app}"),
            Some(app),
            "DENY",
            false,
            "  rules:\n  - to:\n    - operation: {paths: [\"/admin/*\"]}\n",
        ),
    ])
}

/// `(request, allowed)` under [`l7_policy`], for one HTTP/1.1 connection.
pub const CASES: &[(&str, bool)] = &[
    ("GET /api/x", true),
    ("GET /api/secret", false),
    ("GET /api/y?q=1", true),
    ("DELETE /api/x", false),
    ("HEAD /api/x", true),
    ("GET /data/report.json", true),
    ("GET /data/report.jsonx", false),
    ("GET /exact", true),
    ("GET /exact/more", false),
    ("POST /upload +chunked=hello-chunked-body", true),
    ("PUT /upload +body=abc", false),
    ("GET /h good.example", true),
    ("GET /h other.example", false),
    ("GET /nh ok.example", true),
    ("GET /nh bad.example", false),
    ("PUT /nm", true),
    ("DELETE /nm", false),
    ("GET /admin/x", false),
    ("GET /", false),
    ("GET /api/last", true),
];
