//! Every map of the mesh, as BTF maps so `bpftool map dump` prints field names.
//! Names and capacities come from `mesh_common`; the agent pins them.

use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
    macros::btf_map,
};
use mesh_common::{
    capacity as cap, counters,
    policy::{
        capacity as pcap, PolDstKey, PolDstValue, PolL4Key, PolL4Value, PolL7Key, PolL7Value,
        PolOpKey, PolOpValue, PolPlainData, PolPlainValue, PolSrcKey, PolSrcValue, PolStrKey,
        PolStrValue,
    },
    AgentConfig, CgroupKey, ConnKey, DestValue, Event, IpKey, OrigDst, PeerValue, WorkloadValue,
};

/// Enrolled workload cgroups.
#[btf_map(name = "mesh_workloads")]
pub static WORKLOADS: HashMap<CgroupKey, WorkloadValue, { cap::WORKLOADS as usize }> =
    HashMap::new();

/// Mesh destination addresses.
#[btf_map(name = "mesh_dests")]
pub static DESTS: HashMap<IpKey, DestValue, { cap::DESTINATIONS as usize }> = HashMap::new();

/// Agent listener configuration, slot 0.
#[btf_map(name = "mesh_config")]
pub static CONFIG: Array<AgentConfig, { cap::CONFIG as usize }> = Array::new();

/// Original destination per socket cookie, from connect() until established.
#[btf_map(name = "mesh_cookie_dst")]
pub static COOKIE_DST: LruHashMap<u64, OrigDst, { cap::COOKIE_ORIG_DST as usize }> =
    LruHashMap::new();

/// Original destination per established connection, read (and deleted) by the agent.
#[btf_map(name = "mesh_conn_dst")]
pub static CONN_DST: LruHashMap<ConnKey, OrigDst, { cap::CONN_ORIG_DST as usize }> =
    LruHashMap::new();

/// Per-CPU event counters, indexed by `mesh_common::counters`.
#[btf_map(name = "mesh_counters")]
pub static COUNTERS: PerCpuArray<u64, { counters::COUNT as usize }> = PerCpuArray::new();

/// Kernel → agent events (`mesh_common::Event`).
#[btf_map(name = "mesh_events")]
pub static EVENTS: RingBuf<Event, { cap::EVENTS_BYTES as usize }> = RingBuf::new();

/// This node's agent addresses (a set): sources the inbound STRICT check admits.
#[btf_map(name = "mesh_peers")]
pub static PEERS: HashMap<IpKey, PeerValue, { cap::PEERS as usize }> = HashMap::new();

/// Policy: source class of every workload, per generation.
#[btf_map(name = "mesh_pol_src")]
pub static POL_SRC: HashMap<PolSrcKey, PolSrcValue, { pcap::POL_SRC as usize }> = HashMap::new();

/// Policy: the policy set of every destination a policy selects, per generation.
#[btf_map(name = "mesh_pol_dst")]
pub static POL_DST: HashMap<PolDstKey, PolDstValue, { pcap::POL_DST as usize }> = HashMap::new();

/// Policy: L4 decision per (generation, set, class, port).
#[btf_map(name = "mesh_pol_l4")]
pub static POL_L4: HashMap<PolL4Key, PolL4Value, { pcap::POL_L4 as usize }> = HashMap::new();

/// Policy: request-level clauses. Read by the agent only; declared here so that the one
/// object defines (and the agent pins) every policy map with its BTF.
#[btf_map(name = "mesh_pol_l7")]
pub static POL_L7: HashMap<PolL7Key, PolL7Value, { pcap::POL_L7 as usize }> = HashMap::new();

/// Policy: operation terms of the clauses (agent only, as `mesh_pol_l7`).
#[btf_map(name = "mesh_pol_ops")]
pub static POL_OPS: HashMap<PolOpKey, PolOpValue, { pcap::POL_OPS as usize }> = HashMap::new();

/// Policy: interned strings (agent only, as `mesh_pol_l7`).
#[btf_map(name = "mesh_pol_strs")]
pub static POL_STRS: HashMap<PolStrKey, PolStrValue, { pcap::POL_STRS as usize }> = HashMap::new();

/// Policy: the source class of plaintext per (generation, source prefix), longest match.
#[btf_map(name = "mesh_pol_plain")]
pub static POL_PLAIN: LpmTrie<PolPlainData, PolPlainValue, { pcap::POL_PLAIN as usize }> =
    LpmTrie::new();

/// Sends an event to the agent; a full ring buffer is counted, not retried.
#[inline(always)]
pub fn emit(event: &Event) {
    if EVENTS.output(event, 0).is_err() {
        count(counters::EVENTS_DROPPED);
    }
}

/// Adds one to a counter. Per-CPU slot: no atomics needed.
#[inline(always)]
pub fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot of a live map; programs do not migrate CPUs
        // while running, so nothing else writes this slot concurrently.
        unsafe { *slot += 1 };
    }
}
