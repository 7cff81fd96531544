//! Node n2's HBONE port refuses every peer it must not trust. From inside node n1's network
//! namespace, a client connects to n2's :15008 asking (by SNI) for workload b1 and presents:
//! (a) a workload certificate of another trust domain (its own authority),
//! (b) an expired workload certificate of the cluster's authority,
//! (c) a revoked one (revoked after issue; n2's agent picks the list up),
//! (d) n1's node certificate instead of a workload certificate;
//! and (e) a valid workload certificate, but verifying the server as a workload other than the
//! one n2 serves under that name. No attempt gets a tunnel; n2 logs `hbone rejected` with the
//! client's address and a reason naming the problem for (a)–(d), and counts server-side
//! handshake errors. A legitimate pod→pod connection still works afterwards.

use std::time::{Duration, SystemTime};

use mesh_agent::authority::Authority;
use mesh_agent::tls::SpiffeId;
use mesh_tests::{
    authority::run_cli,
    cluster::HBONE_PORT,
    hbone::{self, Attempt},
    require_privileges, wait_for, Agent, ClientRequest, Host, DEFAULT_TIMEOUT,
};
use serde_json::Value;

use crate::{assert_via_agent, cluster};

const STEP_TIMEOUT: Duration = Duration::from_secs(5);
const SERVER_ERRORS: &str = r#"mesh_tls_handshakes_total{side="server",result="error"}"#;

/// The `hbone rejected` line n2 logged for the client socket `attempt.local`.
#[track_caller]
fn rejection_for(agent: &Agent, what: &str, attempt: &Attempt) -> Value {
    let local = attempt
        .local
        .unwrap_or_else(|| panic!("{what}: no TCP connection was made: {:?}", attempt.result))
        .to_string();
    wait_for(
        DEFAULT_TIMEOUT,
        &format!("`hbone rejected` for {what} ({local})"),
        || {
            agent.log_lines().into_iter().find(|l| {
                l["message"] == "hbone rejected" && l["peer"].as_str() == Some(local.as_str())
            })
        },
    )
}

#[test]
fn hbone_refuses_untrusted_peers() {
    require_privileges();
    let cluster = cluster().nodes(2).add_pod(0, "a1").add_pod(1, "b1").build();
    let agents = cluster.start_agents();
    let (a1, b1) = (cluster.pod("a1"), cluster.pod("b1"));
    let _server = b1.serve(&[8080]);
    let n1 = cluster.node(0);
    let n2 = cluster.node(1);
    let hbone_addr = n2.addr4(HBONE_PORT);
    let a1_id = SpiffeId::parse(&a1.spiffe_id()).expect("a1's SPIFFE ID");
    let b1_id = SpiffeId::parse(&b1.spiffe_id()).expect("b1's SPIFFE ID");

    // What the attackers hold.
    let ca = Authority::load(cluster.authority().dir()).expect("loading the cluster's authority");
    let trust = ca.trust_store();
    let other_dir = cluster.tmp_dir().join("ca-other");
    run_cli(&[
        "authority",
        "init",
        "--dir",
        &other_dir.to_string_lossy(),
        "--trust-domain",
        "other.example",
    ]);
    let other = Authority::load(&other_dir).expect("loading the other authority");
    let foreign_id =
        SpiffeId::parse("spiffe://other.example/ns/default/sa/sa-a1").expect("foreign ID");
    let foreign = other
        .issue_workload_cert(&foreign_id, Duration::from_secs(3600))
        .expect("foreign certificate");
    let now = SystemTime::now();
    let expired = ca
        .issue_workload_cert_with_validity(
            &a1_id,
            now - Duration::from_secs(7200),
            now - Duration::from_secs(3600),
        )
        .expect("expired certificate");
    let revoked = ca
        .issue_workload_cert(&a1_id, Duration::from_secs(3600))
        .expect("certificate to revoke");
    let valid = ca
        .issue_workload_cert(&a1_id, Duration::from_secs(3600))
        .expect("valid certificate");
    let node_dir = cluster.authority().join("n1");
    let read = |f: &str| {
        std::fs::read_to_string(node_dir.join(f)).unwrap_or_else(|e| panic!("reading {f}: {e}"))
    };
    let (node_chain, node_key) = (read("node.pem"), read("node.key.pem"));

    // Revoke, and wait until n2's agent has the new list.
    cluster.authority().revoke(&revoked.serial().to_string());
    wait_for(DEFAULT_TIMEOUT, "n2 picks up the revocation", || {
        agents[1]
            .log_lines()
            .into_iter()
            .find(|l| l["message"] == "revocation list updated" && l["revoked"].as_u64() >= Some(1))
    });

    let errors_before = n2.metric(SERVER_ERRORS);
    let cases: Vec<(&str, String, String, SpiffeId, &[&str])> = vec![
        // (name, chain, key, server identity expected, words the reason must contain one of)
        (
            "foreign trust domain",
            foreign.chain_pem().into(),
            foreign.key_pem().into(),
            b1_id.clone(),
            &["unknownissuer", "trust domain"],
        ),
        (
            "expired",
            expired.chain_pem().into(),
            expired.key_pem().into(),
            b1_id.clone(),
            &["expired"],
        ),
        (
            "revoked",
            revoked.chain_pem().into(),
            revoked.key_pem().into(),
            b1_id.clone(),
            &["revoked"],
        ),
        (
            "node certificate",
            node_chain,
            node_key,
            b1_id.clone(),
            &["not a workload"],
        ),
        (
            "wrong server identity expected",
            valid.chain_pem().into(),
            valid.key_pem().into(),
            a1_id.clone(),
            &[],
        ),
    ];
    for (what, chain, key, expect, words) in cases {
        let config = hbone::client_config(trust.clone(), &chain, &key, &expect);
        let sni = b1_id.clone();
        let dst = b1.addr4(8080);
        let attempt = hbone::run_in_netns(&n1.netns().path(), move || async move {
            hbone::attempt(
                hbone_addr,
                config,
                &sni,
                hbone::connect_request(dst),
                STEP_TIMEOUT,
            )
            .await
        });
        assert!(
            attempt.result.is_err(),
            "{what}: n2 answered a CONNECT: {attempt:?}"
        );
        if words.is_empty() {
            // (e): the client refuses n2's certificate; n2 sees the handshake fail.
            let err = attempt.result.as_ref().unwrap_err();
            assert!(
                err.starts_with("tls:"),
                "{what}: failed after the handshake: {err}"
            );
            continue;
        }
        let line = rejection_for(&agents[1], what, &attempt);
        let reason = line["reason"].as_str().unwrap_or_default().to_lowercase();
        assert!(
            words.iter().any(|w| reason.contains(w)),
            "{what}: the reason names none of {words:?}: {line}"
        );
    }

    let errors_after = n2.metric(SERVER_ERRORS);
    assert!(
        errors_after - errors_before >= 5.0,
        "server handshake errors moved from {errors_before} to {errors_after}, expected +5"
    );

    // A legitimate connection still works.
    let sent = "still trusted";
    let run = a1.client(&ClientRequest::new(b1.addr4(8080)).send(sent));
    let flow = assert_via_agent(&agents[0], a1, b1, run.single(), sent);
    assert_eq!(flow.raw["transport"], "hbone", "{:?}", flow.raw);
}
