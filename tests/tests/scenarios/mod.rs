//! One module per scenario, named after what it proves.

mod agent_sigkill_restart_recovers;
mod agent_sigterm_leaves_nothing;
mod concurrent_200_connections_no_crosstalk;
mod cross_node_mtls_roundtrip;
mod cross_node_pod_to_pod_goes_through_agent;
mod harness_cluster_routes_and_tears_down;
mod ipv6_pod_to_pod_redirected;
mod malformed_registry_refused;
mod non_mesh_destination_not_redirected;
mod same_node_pod_to_pod_goes_through_agent;
mod unenrolled_process_not_redirected;
