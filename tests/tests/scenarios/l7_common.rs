//! The L7 policy the HTTP scenarios share, and its expectations.

use super::policy_common::{docs, policy};

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
