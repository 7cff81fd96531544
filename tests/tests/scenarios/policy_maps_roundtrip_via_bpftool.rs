//! The policy maps round trip: `mesh-agent policy apply` writes a generation with an L7
//! part (b1 speaks HTTP on 8080: an ALLOW for `GET /api/*` from a1 becomes a per-request
//! clause), bpftool dumps every map with named fields (generation, verdict, action, field,
//! strings), the agent reads the same generation back (`policy generation active` with the
//! compiled number of L4 entries), and the kernel passes a1 (per request: allowed at L4)
//! while denying a2.

use mesh_common::{
    names,
    policy::{POL_ACTION_ALLOW, POL_FIELD_METHOD, POL_FIELD_PATH, POL_L7},
};
use mesh_tests::{require_privileges, wait_for, ClientRequest, Host, DEFAULT_TIMEOUT};
use serde_json::Value;

use super::policy_common::{authz, dump, expect_denied, principal};
use crate::cluster;

/// The string of a dumped `mesh_pol_strs` value.
fn text(v: &Value) -> String {
    let len = v["len"].as_u64().unwrap_or(0) as usize;
    let bytes: Vec<u8> = v["bytes"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|b| b.as_u64().map(|b| b as u8))
                .collect()
        })
        .unwrap_or_default();
    String::from_utf8_lossy(&bytes[..len.min(bytes.len())]).into_owned()
}

#[test]
fn policy_maps_roundtrip_via_bpftool() {
    require_privileges();
    let cluster = cluster()
        .nodes(1)
        .add_pod(0, "a1")
        .add_pod(0, "a2")
        .add_pod(0, "b1")
        .http_ports("b1", &[8080])
        .build();
    let agent = cluster.start_agent(0);
    let (a1, a2, b1) = (cluster.pod("a1"), cluster.pod("a2"), cluster.pod("b1"));
    let _server = b1.serve(&[8080]);
    let allow = authz(
        "allow-get",
        "b1",
        "ALLOW",
        &format!(
            "  rules:\n  - from:\n    - source: {{principals: [\"{}\"]}}\n    to:\n    - operation: {{methods: [\"GET\"], paths: [\"/api/*\"]}}\n",
            principal("a1")
        ),
    );
    let dir = cluster.write_policy_dir("policy", &[("allow.yaml", &allow)]);
    let applied = cluster.policy_apply(0, &dir);
    assert_eq!(applied.code, Some(0), "{applied:?}");
    let gen = applied.generation().expect("generation");
    let out: Value = serde_json::from_str(&applied.stdout).expect("JSON output");
    let l4_entries = out["l4_entries"].as_u64().expect("l4_entries");

    let l4 = dump(&cluster, 0, names::MAP_POL_L4);
    assert_eq!(l4.len() as u64, l4_entries, "{l4:?}");
    assert!(
        l4.iter().all(|e| e["key"]["gen"].as_u64() == Some(gen)),
        "{l4:?}"
    );
    let per_request: Vec<&Value> = l4
        .iter()
        .filter(|e| e["value"]["verdict"].as_u64() == Some(u64::from(POL_L7)))
        .collect();
    assert_eq!(per_request.len(), 1, "{l4:?}");
    assert_eq!(per_request[0]["key"]["port"], 8080);
    assert_eq!(per_request[0]["value"]["l7_count"], 1);

    let l7 = dump(&cluster, 0, names::MAP_POL_L7);
    assert_eq!(l7.len(), 1, "{l7:?}");
    assert_eq!(
        l7[0]["value"]["action"].as_u64(),
        Some(u64::from(POL_ACTION_ALLOW))
    );
    let strs: Vec<(u64, String)> = dump(&cluster, 0, names::MAP_POL_STRS)
        .iter()
        .map(|e| (e["key"]["str_id"].as_u64().unwrap_or(0), text(&e["value"])))
        .collect();
    let name_of = |id: &Value| {
        strs.iter()
            .find(|(i, _)| Some(*i) == id.as_u64())
            .map(|(_, s)| s.clone())
            .unwrap_or_default()
    };
    assert_eq!(name_of(&l7[0]["value"]["policy_str"]), "default/allow-get");
    let mut ops: Vec<(u64, String)> = dump(&cluster, 0, names::MAP_POL_OPS)
        .iter()
        .map(|e| {
            (
                e["value"]["field"].as_u64().unwrap_or(0),
                name_of(&e["value"]["str_id"]),
            )
        })
        .collect();
    ops.sort();
    assert_eq!(
        ops,
        vec![
            (u64::from(POL_FIELD_METHOD), "GET".to_owned()),
            (u64::from(POL_FIELD_PATH), "/api/".to_owned())
        ]
    );

    // The agent read the same generation back.
    let line = wait_for(DEFAULT_TIMEOUT, "`policy generation active`", || {
        agent.log_lines().into_iter().find(|v| {
            v["message"] == "policy generation active" && v["generation"].as_u64() == Some(gen)
        })
    });
    assert_eq!(line["l4_entries"].as_u64(), Some(l4_entries), "{line}");

    // The kernel: a1 passes (decided per request by the agent; whatever the agent then
    // makes of these non-HTTP bytes, connect() itself is not refused), a2 is denied.
    let run = a1.client(&ClientRequest::new(b1.addr4(8080)).send("GET?"));
    let r = &run.results[0];
    assert!(
        !r.error
            .as_deref()
            .unwrap_or("")
            .contains("Operation not permitted"),
        "a1 refused by the kernel: {r:?}"
    );
    expect_denied(a2, b1.addr4(8080));
}
