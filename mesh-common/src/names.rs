//! Program, map and pin names (each at most 15 bytes, `BPF_OBJ_NAME_LEN` - 1).

/// `cgroup/connect4`: captures IPv4 connects of enrolled workloads.
pub const PROG_CONNECT4: &str = "mesh_connect4";
/// `cgroup/connect6`: captures IPv6 connects of enrolled workloads.
pub const PROG_CONNECT6: &str = "mesh_connect6";
/// `sockops`: moves cookie-keyed original destinations to 4-tuple keys.
pub const PROG_SOCKOPS: &str = "mesh_sockops";
/// `cgroup_skb/ingress`: refuses (STRICT) or flags (PERMISSIVE) plaintext
/// connection attempts to enrolled workloads that do not come from the mesh.
pub const PROG_INGRESS: &str = "mesh_ingress";

/// Enrolled workload cgroups (`CgroupKey` → `WorkloadValue`).
pub const MAP_WORKLOADS: &str = "mesh_workloads";
/// Mesh destination addresses (`IpKey` → `DestValue`).
pub const MAP_DESTS: &str = "mesh_dests";
/// Agent listener configuration (`u32` slot → `AgentConfig`).
pub const MAP_CONFIG: &str = "mesh_config";
/// Original destination per socket cookie (`u64` → `OrigDst`), LRU.
pub const MAP_COOKIE_DST: &str = "mesh_cookie_dst";
/// Original destination per connection (`ConnKey` → `OrigDst`), LRU.
pub const MAP_CONN_DST: &str = "mesh_conn_dst";
/// Per-CPU counters (`u32` index from [`crate::counters`] → `u64`).
pub const MAP_COUNTERS: &str = "mesh_counters";
/// Kernel → agent events (`Event` records), a ring buffer.
pub const MAP_EVENTS: &str = "mesh_events";
/// This node's agent addresses (`IpKey` → `PeerValue`, a set): sources the inbound
/// STRICT check admits besides the local agent's own listener address.
pub const MAP_PEERS: &str = "mesh_peers";

/// Policy: source class per workload (`PolSrcKey` → `PolSrcValue`).
pub const MAP_POL_SRC: &str = "mesh_pol_src";
/// Policy: policy set per destination workload (`PolDstKey` → `PolDstValue`).
pub const MAP_POL_DST: &str = "mesh_pol_dst";
/// Policy: L4 decision per (set, class, port) (`PolL4Key` → `PolL4Value`).
pub const MAP_POL_L4: &str = "mesh_pol_l4";
/// Policy: request-level clauses (`PolL7Key` → `PolL7Value`).
pub const MAP_POL_L7: &str = "mesh_pol_l7";
/// Policy: operation terms of the clauses (`PolOpKey` → `PolOpValue`).
pub const MAP_POL_OPS: &str = "mesh_pol_ops";
/// Policy: interned strings (`PolStrKey` → `PolStrValue`).
pub const MAP_POL_STRS: &str = "mesh_pol_strs";
/// Policy: source class of plaintext per source prefix (LPM trie, `PolPlainKey` →
/// `PolPlainValue`).
pub const MAP_POL_PLAIN: &str = "mesh_pol_plain";

/// The policy maps.
pub const POLICY_MAPS: [&str; 7] = [
    MAP_POL_PLAIN,
    MAP_POL_SRC,
    MAP_POL_DST,
    MAP_POL_L4,
    MAP_POL_L7,
    MAP_POL_OPS,
    MAP_POL_STRS,
];

/// Every map the agent pins, in load order.
pub const ALL_MAPS: [&str; 15] = [
    MAP_WORKLOADS,
    MAP_DESTS,
    MAP_CONFIG,
    MAP_COOKIE_DST,
    MAP_CONN_DST,
    MAP_COUNTERS,
    MAP_EVENTS,
    MAP_PEERS,
    MAP_POL_SRC,
    MAP_POL_DST,
    MAP_POL_L4,
    MAP_POL_L7,
    MAP_POL_OPS,
    MAP_POL_STRS,
    MAP_POL_PLAIN,
];

/// Every program the agent attaches.
pub const ALL_PROGS: [&str; 4] = [PROG_CONNECT4, PROG_CONNECT6, PROG_SOCKOPS, PROG_INGRESS];

/// Pin of the `bpf_link` attaching each program to the pod cgroup parent, in the pin
/// directory: `link_<program name>`. The pinned links keep the programs attached when no
/// agent runs (the mesh stays closed); only `mesh-agent uninstall` removes them.
pub const LINK_PIN_PREFIX: &str = "link_";

/// Default bpffs directory for pins.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/mesh";

const _: () = {
    let mut i = 0;
    while i < ALL_MAPS.len() {
        assert!(ALL_MAPS[i].len() <= 15);
        i += 1;
    }
    let mut j = 0;
    while j < ALL_PROGS.len() {
        assert!(ALL_PROGS[j].len() <= 15);
        j += 1;
    }
};
