//! The destination path records its decisions in the audit log, through the real mesh: on one
//! HTTP/1.1 keep-alive connection from a1 (n1) to b1 (n2, decided by n2's agent) under the
//! shared L7 policy, every denied request is a record of its own (`layer: l7`, `verdict:
//! deny`, method, normalized path, host, the deciding policy and its generation, the verified
//! source identity), and the connection as a whole is one `allow` record when it ends, with
//! its request counts and bytes. Nothing about the allowed requests is recorded one by one.
//! `audit verify` passes on the log.

use mesh_tests::Host;
use serde_json::Value;

use super::{
    audit_log_records_kernel_denials_and_survives_sigkill::{query_until, verify_ok},
    l7_common::l7_mesh,
};

#[test]
fn audit_records_l7_decisions_at_the_destination() {
    let mesh = l7_mesh();
    let (a1, b1) = (mesh.cluster.pod("a1"), mesh.cluster.pod("b1"));
    let audit_dir = mesh.agents[1].spec().identity_dir.join("state/audit");
    let requests = [
        "GET /api/x",
        "GET /public/../admin/x admin.example",
        "DELETE /nm",
        "GET /h good.example",
    ];
    let run = a1.http1(b1.addr4(8080), &requests, false);
    assert!(run.error.is_none(), "{run:?}");
    let statuses: Vec<_> = (0..requests.len())
        .map(|i| run.response(i).status)
        .collect();
    assert_eq!(
        statuses,
        [Some(200), Some(403), Some(403), Some(200)],
        "{run:?}"
    );

    let src = "spiffe://cluster.local/ns/default/sa/sa-a1";
    let denials = |records: &[Value]| -> Vec<(String, String, String)> {
        records
            .iter()
            .map(|r| {
                assert_eq!(r["layer"], "l7", "{r}");
                assert_eq!(r["src_identity"], src, "{r}");
                assert_eq!(r["dst_workload"], "default/b1", "{r}");
                assert!(r["generation"].as_u64().is_some_and(|g| g > 0), "{r}");
                (
                    r["method"].as_str().unwrap_or("?").to_owned(),
                    r["path"].as_str().unwrap_or("?").to_owned(),
                    r["policy"].as_str().unwrap_or("-").to_owned(),
                )
            })
            .collect()
    };
    let deny = [
        "--kind",
        "connection",
        "--verdict",
        "deny",
        "--dst",
        "default/b1",
    ];
    let denied = query_until(&audit_dir, "two L7 denials in `audit query`", &deny, 2);
    assert_eq!(
        denials(&denied),
        [
            // Matched (and recorded) as normalized: the dot segment is gone.
            (
                "GET".into(),
                "/admin/x".into(),
                "default/no-admin-b1".into()
            ),
            // No ALLOW rule matched: the default decision names no policy.
            ("DELETE".into(), "/nm".into(), "-".into()),
        ],
        "{denied:#?}"
    );
    assert_eq!(denied[0]["host"], "admin.example", "{:#}", denied[0]);
    assert!(
        denied[1].get("host").is_none(),
        "no Host header, no host: {:#}",
        denied[1]
    );

    // The connection itself: one `allow` record when it ended, with its counts.
    let allow = [
        "--kind",
        "connection",
        "--verdict",
        "allow",
        "--dst",
        "default/b1",
    ];
    let allowed = query_until(&audit_dir, "the connection's record", &allow, 1);
    assert_eq!(allowed.len(), 1, "one record per connection: {allowed:#?}");
    let c = &allowed[0];
    assert_eq!(c["layer"], "l7", "{c}");
    assert_eq!(c["src_identity"], src, "{c}");
    assert_eq!(
        (
            c["requests_allowed"].as_u64(),
            c["requests_denied"].as_u64()
        ),
        (Some(2), Some(2)),
        "{c}"
    );
    assert!(
        c["bytes_sent"].as_u64().is_some_and(|b| b > 0)
            && c["bytes_received"].as_u64().is_some_and(|b| b > 0),
        "{c}"
    );
    assert_eq!(c["outcome"], "ok", "{c}");
    verify_ok(&audit_dir);
}
