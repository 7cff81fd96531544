//! A client in a1 calls service `default/web` (endpoints a2, b1, b2) at 100 requests/s while
//! b2 leaves the service (its `svc: web` label removed at the authority, as an EndpointSlice
//! drops a terminating pod), and then leaves the mesh state altogether: not one request fails.
//! Once the first change is applied, no new connection reaches b2; the other two endpoints
//! share the traffic.

use std::time::{Duration, Instant};

use mesh_tests::{require_privileges, wait_for, ClientRequest, Host, DEFAULT_TIMEOUT};

use super::service_common::{service_cluster, vip4, ENDPOINTS, PORT, TARGET_PORT};

const REQUESTS: usize = 600;

#[test]
fn endpoint_removed_traffic_moves_without_errors() {
    require_privileges();
    let cluster = service_cluster();
    let _agents = cluster.start_agents();
    let servers: Vec<_> = ENDPOINTS
        .iter()
        .map(|e| cluster.pod(e).serve(&[TARGET_PORT]))
        .collect();
    let served = || -> usize { servers.iter().map(|s| s.accepted().len()).sum() };
    let a1 = cluster.pod("a1");
    let client = a1.spawn_client(
        &ClientRequest::new(vip4(PORT))
            .send("through-the-service")
            .count(REQUESTS)
            .interval(Duration::from_millis(10))
            .io_timeout(Duration::from_secs(5)),
    );
    // Traffic flows through all three endpoints before the change.
    wait_for(DEFAULT_TIMEOUT, "every endpoint served", || {
        servers
            .iter()
            .all(|s| !s.accepted().is_empty())
            .then_some(())
    });

    let deselected: Vec<_> = cluster
        .registry_entries()
        .into_iter()
        .map(|mut e| {
            if e.name == "b2" {
                e.labels.retain(|(k, _)| k != "svc");
            }
            e
        })
        .collect();
    let version = cluster.publish_state(&deselected, cluster.services());
    cluster.wait_state_applied(&[0, 1], version);
    let moved_at = Instant::now();
    // Another 100 requests flow after the change before b2 leaves the mesh too.
    let after_change = served();
    wait_for(DEFAULT_TIMEOUT, "100 requests after the change", || {
        (served() >= after_change + 100).then_some(())
    });
    let gone: Vec<_> = deselected.into_iter().filter(|e| e.name != "b2").collect();
    let version = cluster.publish_state(&gone, cluster.services());
    cluster.wait_state_applied(&[0, 1], version);
    let moved_after = moved_at.elapsed();

    let run = client.wait();
    let failed: Vec<_> = run.results.iter().filter(|r| !r.echo_ok).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed while an endpoint left: {:?}",
        failed.len(),
        run.results.len(),
        failed.iter().take(5).collect::<Vec<_>>()
    );
    assert_eq!(run.results.len(), REQUESTS);
    // The last requests (sent well after both changes) never reached b2; the others did.
    let tail = &run.results[REQUESTS - 100..];
    assert!(
        tail.iter().all(|r| r.hello_name() != Some("b2")),
        "b2 still answered after it left the service ({moved_after:?} in)"
    );
    for e in ["a2", "b1"] {
        assert!(
            tail.iter().any(|r| r.hello_name() == Some(e)),
            "endpoint {e} took none of the last requests"
        );
    }
    assert!(
        run.results.iter().any(|r| r.hello_name() == Some("b2")),
        "b2 answered nothing even before it left"
    );
}
