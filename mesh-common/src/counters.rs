//! Indices of the per-CPU counter array `mesh_counters`.

/// connect() of an enrolled workload to a mesh destination, rewritten to the agent.
pub const CONNECT_REDIRECTED: u32 = 0;
/// connect() from a cgroup that is not enrolled: passed untouched.
pub const CONNECT_PASSED_NOT_ENROLLED: u32 = 1;
/// connect() of an enrolled workload to a non-mesh destination: passed untouched.
pub const CONNECT_PASSED_NOT_MESH: u32 = 2;
/// connect() that is not TCP, or to the agent itself: passed untouched.
pub const CONNECT_PASSED_OTHER: u32 = 3;
/// connect() refused because capture was required but failed (fail closed).
pub const CONNECT_ERRORS: u32 = 4;
/// Established captured connections whose original destination was moved to the 4-tuple map.
pub const SOCKOPS_TRACKED: u32 = 5;
/// sock_ops failures (map update failed): the agent will not find the original destination.
pub const SOCKOPS_ERRORS: u32 = 6;

/// Number of counter slots.
pub const COUNT: u32 = 7;

/// Human names, indexed by counter index (for metrics and the CLI).
pub const NAMES: [&str; COUNT as usize] = [
    "connect_redirected",
    "connect_passed_not_enrolled",
    "connect_passed_not_mesh",
    "connect_passed_other",
    "connect_errors",
    "sockops_tracked",
    "sockops_errors",
];
