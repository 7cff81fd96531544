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

/// Inbound SYN to an enrolled workload from the mesh (the agent's address,
/// a mesh agent's address, or loopback): passed.
pub const INGRESS_MESH: u32 = 7;
/// Inbound plaintext SYN to a STRICT workload from outside the mesh: dropped.
pub const INGRESS_PLAINTEXT_REFUSED: u32 = 8;
/// Inbound plaintext SYN to a PERMISSIVE workload from outside the mesh: passed, flagged.
pub const INGRESS_PLAINTEXT_PERMISSIVE: u32 = 9;
/// Inbound packets the ingress program could not parse: passed (fail open).
pub const INGRESS_ERRORS: u32 = 10;
/// Events lost because the `mesh_events` ring buffer was full.
pub const EVENTS_DROPPED: u32 = 11;

/// connect() denied by L4 policy (failed with EPERM).
pub const CONNECT_DENIED_POLICY: u32 = 12;
/// connect() a dry-run policy would have denied (allowed).
pub const CONNECT_WOULD_DENY: u32 = 13;
/// connect() denied because the policy maps were inconsistent (a destination with a policy
/// set but no source class, or no L4 entry for the pair, or an unknown verdict): fail closed.
pub const POLICY_LOOKUP_ERRORS: u32 = 14;

/// Inbound plaintext SYN to a PERMISSIVE workload refused by authorization policy (dropped).
pub const INGRESS_PLAINTEXT_DENIED_POLICY: u32 = 15;

/// connect() from the pod cgroup tree refused by the safe baseline (`CONFIG_F_BASELINE`).
pub const CONNECT_DENIED_BASELINE: u32 = 16;
/// Inbound SYN to a socket of the pod cgroup tree dropped by the safe baseline.
pub const INGRESS_DROPPED_BASELINE: u32 = 17;

/// Number of counter slots.
pub const COUNT: u32 = 18;

/// Human names, indexed by counter index (for metrics and the CLI).
pub const NAMES: [&str; COUNT as usize] = [
    "connect_redirected",
    "connect_passed_not_enrolled",
    "connect_passed_not_mesh",
    "connect_passed_other",
    "connect_errors",
    "sockops_tracked",
    "sockops_errors",
    "ingress_mesh",
    "ingress_plaintext_refused",
    "ingress_plaintext_permissive",
    "ingress_errors",
    "events_dropped",
    "connect_denied_policy",
    "connect_would_deny",
    "policy_lookup_errors",
    "ingress_plaintext_denied_policy",
    "connect_denied_baseline",
    "ingress_dropped_baseline",
];
