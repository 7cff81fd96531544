//! A node on stale configuration cannot stay in the mesh. The authority (grace 1 s) publishes
//! version 2 signed by a key no node pins: both nodes refuse it and keep reporting version 1.
//! Past the grace, b1's certificate is revoked: n2 asks for a new one and the authority refuses
//! it (stale configuration), so b1 can no longer be reached. Version 3, signed by the pinned
//! key, is applied; n2 reports it, obtains b1's certificate again, and a1 → b1 works again.

use std::time::Duration;

use mesh_tests::{require_privileges, wait_for, ClientRequest, Host, DEFAULT_TIMEOUT};

use super::signed_common::{publish, signed_cluster_with, wait_active};
use crate::{assert_carried, issued_serials};

#[test]
fn agent_on_stale_config_gets_no_certificates() {
    require_privileges();
    let (cluster, agents, k1) = signed_cluster_with(&["--stale-config-grace-secs", "1"]);
    let (a1, b1) = (cluster.pod("a1"), cluster.pod("b1"));
    let _server = b1.serve(&[8080]);
    assert_carried(&agents[0], a1, b1, "before");

    let k2 = cluster.signer_key("k2");
    cluster.trust_signer(&cluster.authority_signers(), &k2);
    publish(&cluster, &k2, 2, &[]);
    wait_for(DEFAULT_TIMEOUT, "n2 refuses v2 (drift)", || {
        (cluster.node(1).metric("mesh_config_drift") == 1.0).then_some(())
    });
    // Past the authority's grace: v2 was published more than 1 s ago (its own record).
    let published = cluster.authority().dir().join("state/published.json");
    wait_for(DEFAULT_TIMEOUT, "the grace passed", || {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&published).ok()?).ok()?;
        let at = v["publishedUnixMs"].as_u64()?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_millis() as u64;
        (v["version"] == 2 && now > at + 1_200).then_some(())
    });

    let serial = issued_serials(&agents[1], &b1.spiffe_id())
        .last()
        .cloned()
        .expect("b1's certificate serial");
    cluster.authority().revoke(&serial);
    let refusal = wait_for(
        DEFAULT_TIMEOUT,
        "the authority refuses n2 a certificate",
        || {
            cluster.authority().log_lines().into_iter().find(|l| {
                l["message"] == "certificate request refused: stale configuration"
                    && l["node"].as_str().is_some_and(|n| n.ends_with("/n2"))
            })
        },
    );
    assert!(
        refusal["identity"]
            .as_str()
            .is_some_and(|i| i.ends_with("sa-b1")),
        "{refusal}"
    );
    // Once n1 knows the revocation (its next refresh), nothing reaches b1: its certificate
    // is revoked and n2 may not obtain another.
    wait_for(DEFAULT_TIMEOUT, "b1 unreachable", || {
        let run = a1.client(
            &ClientRequest::new(b1.addr4(8080))
                .send("stale?")
                .io_timeout(Duration::from_secs(2)),
        );
        run.results.iter().all(|r| !r.echo_ok).then_some(())
    });
    assert_eq!(
        issued_serials(&agents[1], &b1.spiffe_id()).last(),
        Some(&serial),
        "n2 obtained a certificate on stale configuration"
    );

    publish(&cluster, &k1, 3, &[]);
    wait_active(&cluster, 3);
    wait_for(
        Duration::from_secs(45),
        "b1's certificate issued again",
        || (issued_serials(&agents[1], &b1.spiffe_id()).last() != Some(&serial)).then_some(()),
    );
    assert_carried(&agents[0], a1, b1, "after catching up");
}
