//! One of a service's three endpoints (b2, on the other node) has no server: its agent
//! refuses the HBONE CONNECT before any byte of the client's was sent, and the source agent
//! tries another endpoint. 100 connections, 0 failures, none answered by b2. The same for a
//! same-node endpoint (a2) whose server is stopped.

use mesh_tests::{require_privileges, ClientRequest, Host};

use super::service_common::{service_cluster, service_connections, vip4, PORT, TARGET_PORT};

#[test]
fn service_endpoint_down_retried() {
    require_privileges();
    let cluster = service_cluster();
    let agents = cluster.start_agents();
    let a1 = cluster.pod("a1");
    let _b1 = cluster.pod("b1").serve(&[TARGET_PORT]);
    let mut a2 = Some(cluster.pod("a2").serve(&[TARGET_PORT]));

    for (round, down) in [(0, "b2"), (1, "a2")] {
        if down == "a2" {
            // Stop a2's server too: b1 is then the only endpoint left.
            drop(a2.take());
        }
        let run = a1.client(
            &ClientRequest::new(vip4(PORT))
                .send("retry-me")
                .count(100)
                .concurrency(10),
        );
        for r in run.expect_ok() {
            let name = r.hello_name().expect("a hello line");
            assert_ne!(name, "b2", "round {round}: answered by a stopped endpoint");
            if round == 1 {
                assert_eq!(name, "b1", "round {round}: {r:?}");
            }
        }
    }
    assert_eq!(service_connections(&cluster, 0, "ok"), 200.0);
    // The stopped endpoints were chosen, and replaced: both kinds of failure were retried.
    let retried: Vec<String> = agents[0]
        .log_lines()
        .into_iter()
        .filter(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("service endpoint failed before any byte"))
        })
        .map(|l| l["endpoint"].as_str().unwrap_or_default().to_owned())
        .collect();
    for down in ["b2", "a2"] {
        let addr = cluster.pod(down).addr4(TARGET_PORT).to_string();
        assert!(
            retried.contains(&addr),
            "no retry away from {down} ({addr}) logged: {retried:?}"
        );
    }
    assert_eq!(service_connections(&cluster, 0, "failed"), 0.0);
}
