//! The authority only signs a workload's certificate for the node the registry places it on.
//! With node n1's own credentials (`authority join --node n1`), from inside n1's network
//! namespace, a client asks the authority for b1's certificate (b1 runs on n2): refused, and
//! the authority logs `certificate request refused` naming n1 and b1's identity. The same
//! client then obtains a1's certificate (a1 runs on n1).

use std::time::Duration;

use mesh_agent::identity::{AuthorityClient, IdentityError};
use mesh_agent::tls::SpiffeId;
use mesh_tests::{hbone::run_in_netns, require_privileges, wait_for, DEFAULT_TIMEOUT};

use crate::cluster;

#[test]
fn node_cannot_obtain_certificate_for_other_nodes_workload() {
    require_privileges();
    let cluster = cluster().nodes(2).add_pod(0, "a1").add_pod(1, "b1").build();
    let a1_id = SpiffeId::parse(&cluster.pod("a1").spiffe_id()).expect("a1's SPIFFE ID");
    let b1_id = SpiffeId::parse(&cluster.pod("b1").spiffe_id()).expect("b1's SPIFFE ID");
    let (creds, addr) = {
        let authority = cluster.authority();
        (authority.join("n1"), authority.addr())
    };
    let read = |f: &str| {
        std::fs::read_to_string(creds.join(f)).unwrap_or_else(|e| panic!("reading {f}: {e}"))
    };
    let (chain, key, bundle) = (read("node.pem"), read("node.key.pem"), read("bundle.pem"));

    let (want_b1, want_a1) = (b1_id.clone(), a1_id.clone());
    let (for_b1, for_a1) = run_in_netns(&cluster.node(0).netns().path(), move || async move {
        let mut client = AuthorityClient::connect(&addr.to_string(), &chain, &key, &bundle)
            .await
            .unwrap_or_else(|e| panic!("n1 connecting to the authority: {e}"));
        let lifetime = Duration::from_secs(3600);
        let for_b1 = client.sign(&want_b1, lifetime).await;
        let for_a1 = client.sign(&want_a1, lifetime).await;
        (for_b1, for_a1)
    });

    match &for_b1 {
        Err(IdentityError::Refused { message }) => {
            assert!(
                message.contains("n1"),
                "the refusal does not name the node: {message}"
            )
        }
        Err(e) => panic!("b1's certificate was not refused by the authority but failed with: {e}"),
        Ok(cert) => panic!(
            "n1 obtained a certificate for {} (serial {}), a workload of n2",
            cert.identity(),
            cert.serial()
        ),
    }
    let line = wait_for(
        DEFAULT_TIMEOUT,
        "`certificate request refused` on the authority",
        || {
            cluster
                .authority()
                .log_lines()
                .into_iter()
                .find(|l| l["message"] == "certificate request refused")
        },
    );
    let node = line["node"].as_str().unwrap_or_default();
    assert!(
        node == "n1" || node.ends_with("/node/n1"),
        "the refusal names node {node:?}: {line}"
    );
    assert_eq!(
        line["identity"].as_str(),
        Some(b1_id.to_string().as_str()),
        "{line}"
    );

    let cert = for_a1.unwrap_or_else(|e| panic!("n1 could not obtain a1's certificate: {e}"));
    assert_eq!(cert.identity(), &a1_id);
    assert!(cert.remaining() > Duration::from_secs(3000), "{cert:?}");
    // Exactly one refusal: a1's request was granted.
    let refusals = cluster
        .authority()
        .log_lines()
        .into_iter()
        .filter(|l| l["message"] == "certificate request refused")
        .count();
    assert_eq!(refusals, 1);
}
