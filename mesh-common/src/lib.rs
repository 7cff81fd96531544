//! The kernel/user ABI of the mesh.
//!
//! Everything the eBPF programs (`mesh-ebpf`) and the node agent (`mesh-agent`)
//! exchange through BPF maps is declared here and nowhere else: map and
//! program names, capacities, and the `#[repr(C)]` keys and values.
//!
//! Rules for the types below:
//! - fixed-width integers and arrays of them only, explicit padding, no
//!   `bool`/`Option`/enums (use `u32` plus named consts);
//! - byte order is in the field name (`_be` = network order);
//! - every IP address is stored as 16 bytes: IPv4 as an IPv4-mapped IPv6
//!   address (`::ffff:a.b.c.d`), so one key type serves both families.
#![no_std]
#![deny(unsafe_code)]

pub mod counters;
pub mod names;
pub mod policy;

/// Address family values used in [`OrigDst::family`] (Linux `AF_*`).
pub const AF_INET: u16 = 2;
/// IPv6 address family.
pub const AF_INET6: u16 = 10;

/// Capacities of the maps (`max_entries`).
pub mod capacity {
    /// Enrolled workload cgroups on one node.
    pub const WORKLOADS: u32 = 16_384;
    /// Mesh destination addresses (pod IPs and service virtual IPs of the whole mesh).
    pub const DESTINATIONS: u32 = 65_536;
    /// In-flight redirected connects, keyed by socket cookie (LRU).
    pub const COOKIE_ORIG_DST: u32 = 65_536;
    /// Established redirected connections, keyed by 4-tuple (LRU).
    pub const CONN_ORIG_DST: u32 = 65_536;
    /// Slots of the config array.
    pub const CONFIG: u32 = 1;
    /// Bytes of the `mesh_events` ring buffer (a power of two, page multiple):
    /// 4096 events of 64 bytes (plus 8-byte record headers) before the
    /// kernel drops (and counts) new ones.
    pub const EVENTS_BYTES: u32 = 256 * 1024;
    /// This node's agent addresses (its registry `address` and `address6`).
    pub const PEERS: u32 = 4_096;
}

/// Deepest absolute cgroup level (root = 0) whose ancestors the kernel checks
/// for an enrolled workload. Kubernetes pod containers sit at level 4 or 5
/// (`kubepods.slice/…/pod.slice/container.scope`).
pub const MAX_CGROUP_LEVEL: u32 = 16;

/// Key of `mesh_workloads`: a cgroup v2 id (the inode number of the cgroup
/// directory), as returned by `bpf_get_current_cgroup_id`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct CgroupKey {
    pub cgroup_id: u64,
}
const _: () = assert!(core::mem::size_of::<CgroupKey>() == 8);

/// Value of `mesh_workloads`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct WorkloadValue {
    /// Interned workload id (index into the agent's registry, never 0).
    pub workload_id: u32,
    /// `WORKLOAD_F_*` bits.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<WorkloadValue>() == 8);

/// The workload's outbound connections are captured by the mesh.
pub const WORKLOAD_F_CAPTURE: u32 = 1 << 0;
/// PERMISSIVE peer authentication: inbound plaintext from outside the mesh is
/// allowed and flagged. Without it the workload is STRICT: refused.
pub const WORKLOAD_F_PERMISSIVE: u32 = 1 << 1;

/// An IP address in network byte order, IPv4 mapped into IPv6.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct IpKey {
    pub addr_be: [u32; 4],
}
const _: () = assert!(core::mem::size_of::<IpKey>() == 16);

/// Value of `mesh_dests`: what the mesh knows about a destination address.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct DestValue {
    /// Interned id of the workload owning the address (never 0); with `DEST_F_SERVICE`, the
    /// id of the service whose virtual IP the address is (never 0).
    pub workload_id: u32,
    /// `DEST_F_*` bits.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<DestValue>() == 8);

/// The address is a service's virtual IP, not a workload's: connects to it are captured, but
/// kernel L4 policy (keyed on the destination workload) does not apply, since the endpoint
/// workload is chosen by the agent (whose destination side decides for that endpoint).
/// Captured with `OrigDst::dst_workload_id` 0. (Bit 0, once a never-read "local" flag, stays
/// unused so that a map written by an older agent is never read as services.)
pub const DEST_F_SERVICE: u32 = 1 << 1;

/// Slot 0 of `mesh_config`: where captured connections are sent.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct AgentConfig {
    /// The agent's outbound listener, IPv4, network order.
    pub redirect_ip4_be: u32,
    /// The agent's outbound listener port, network order in the low 16 bits
    /// (the layout of `bpf_sock_addr.user_port`).
    pub redirect_port_be: u32,
    /// The agent's outbound listener, IPv6, network order.
    pub redirect_ip6_be: [u32; 4],
    /// `CONFIG_F_*` bits. 0 means "agent not ready": nothing is captured.
    pub flags: u32,
    /// The active policy generation (`mesh_pol_*` keys); 0: no policy loaded, all allowed.
    /// Written on its own (one 32-byte update of the slot) when a generation is swapped in.
    pub policy_gen: u32,
}
const _: () = assert!(core::mem::size_of::<AgentConfig>() == 32);

/// Value of `mesh_peers`. The map is a set of this node's agent addresses: the kernel only
/// checks that a key is present; the value carries nothing.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerValue {
    /// Zero.
    pub _reserved: u32,
}
const _: () = assert!(core::mem::size_of::<PeerValue>() == 4);

/// The config slot is filled in; capture is active.
pub const CONFIG_F_READY: u32 = 1 << 0;
/// `redirect_ip6_be` is valid; IPv6 connects are captured.
pub const CONFIG_F_IPV6: u32 = 1 << 1;
/// The safe baseline: the node has no verified configuration (first boot before any, or the
/// persisted one failed verification). Every TCP connect from the pod cgroup tree to a
/// non-loopback address fails with EPERM, and every inbound SYN to a socket of the tree from a
/// non-loopback address is dropped: nothing in the tree sends or receives mesh traffic. Set by
/// the agent when it starts with nothing verified (and on fresh pins before anything is
/// programmed), cleared only once a configuration is programmed; pinned, so it holds while
/// no agent runs.
pub const CONFIG_F_BASELINE: u32 = 1 << 2;

/// The original destination of a captured connection.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct OrigDst {
    /// Original destination address (IPv4 mapped), network order.
    pub addr_be: [u32; 4],
    /// Original destination port, network order.
    pub port_be: u16,
    /// `AF_INET` or `AF_INET6`: the family the application used.
    pub family: u16,
    /// Workload id of the connecting socket's workload.
    pub src_workload_id: u32,
    /// Workload id of the destination address; 0 for a service virtual IP (`DEST_F_SERVICE`).
    pub dst_workload_id: u32,
}
const _: () = assert!(core::mem::size_of::<OrigDst>() == 28);

/// Key of `mesh_conn_dst`: a captured connection as the client sees it
/// (client address and port, agent listener address and port).
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// Client (pod) address, network order, IPv4 mapped.
    pub src_addr_be: [u32; 4],
    /// Agent listener address, network order, IPv4 mapped.
    pub dst_addr_be: [u32; 4],
    /// Client port, host order.
    pub src_port: u32,
    /// Agent listener port, host order.
    pub dst_port: u32,
}
const _: () = assert!(core::mem::size_of::<ConnKey>() == 40);

/// A record of the `mesh_events` ring buffer (kernel → agent).
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// `EVENT_*`.
    pub kind: u32,
    /// Workload id of the enrolled workload the event is about (never 0): the destination
    /// for `EVENT_PLAINTEXT_*`, the source (connecting) workload for `EVENT_L4_*`.
    pub workload_id: u32,
    /// Source address of the packet, network order, IPv4 mapped.
    pub src_addr_be: [u32; 4],
    /// Destination address of the packet, network order, IPv4 mapped.
    pub dst_addr_be: [u32; 4],
    /// Source port, network order.
    pub src_port_be: u16,
    /// Destination port, network order.
    pub dst_port_be: u16,
    /// `AF_INET` or `AF_INET6`: the IP version of the packet.
    pub family: u32,
    /// `EVENT_L4_*`: the destination workload id; 0 otherwise.
    pub peer_workload_id: u32,
    /// `EVENT_L4_*` and `EVENT_PLAINTEXT_DENIED`: the deciding policy, a `str_id` of `mesh_pol_strs` in generation
    /// `policy_gen` (0: none, the default deny); 0 otherwise.
    pub policy_str: u32,
    /// `EVENT_L4_*`: the policy generation the kernel decided with; 0 otherwise.
    pub policy_gen: u32,
    /// Zero.
    pub _reserved: u32,
}
const _: () = assert!(core::mem::size_of::<Event>() == 64);

/// A plaintext connection attempt to a STRICT workload from outside the mesh
/// was refused (its SYN dropped).
pub const EVENT_PLAINTEXT_REFUSED: u32 = 1;
/// A plaintext connection from outside the mesh reached a PERMISSIVE workload.
pub const EVENT_PLAINTEXT_PERMISSIVE: u32 = 2;
/// A connect was denied by L4 policy (it failed with EPERM). `src_addr_be`/`src_port_be` are
/// zero (the socket is not bound yet); `dst_*` are the original destination.
pub const EVENT_L4_DENIED: u32 = 3;
/// A connect would have been denied by a dry-run policy; it was allowed.
pub const EVENT_L4_WOULD_DENY: u32 = 4;
/// Plaintext from outside the mesh to a PERMISSIVE workload was refused by authorization
/// policy (its SYN dropped): `policy_str`/`policy_gen` name the deciding policy (0: a default
/// deny, or a decision that needs the HTTP request, which plaintext cannot reach the agent for).
pub const EVENT_PLAINTEXT_DENIED: u32 = 5;
/// A connect from the pod tree was refused by the safe baseline (`CONFIG_F_BASELINE`); it
/// failed with EPERM. `src_*` are zero; `dst_*` the destination; `workload_id` 0.
pub const EVENT_BASELINE_DENIED: u32 = 6;
/// A SYN to a socket of the pod tree was dropped by the safe baseline; `src_*`/`dst_*` are the
/// packet's; `workload_id` 0.
pub const EVENT_BASELINE_DROPPED: u32 = 7;

/// `::ffff:a.b.c.d` in network order, from an IPv4 address in network order.
#[inline(always)]
pub const fn mapped_v4(ip4_be: u32) -> [u32; 4] {
    // Word 2 is 0x0000ffff in network order.
    [0, 0, u32::from_be(0x0000_ffff), ip4_be]
}

/// Whether an address (network order; IPv4 mapped or IPv6) is loopback: `127.0.0.0/8` or `::1`.
#[inline(always)]
pub const fn is_loopback(addr_be: &[u32; 4]) -> bool {
    if is_mapped_v4(addr_be) {
        return u32::from_be(addr_be[3]) >> 24 == 127;
    }
    addr_be[0] == 0 && addr_be[1] == 0 && addr_be[2] == 0 && addr_be[3] == u32::from_be(1)
}

/// Whether an address (network order) is IPv4 mapped.
#[inline(always)]
pub const fn is_mapped_v4(addr_be: &[u32; 4]) -> bool {
    addr_be[0] == 0 && addr_be[1] == 0 && addr_be[2] == u32::from_be(0x0000_ffff)
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY (all impls): repr(C), integers and integer arrays only, sizes
    // asserted above so there is no implicit padding.
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for CgroupKey {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for WorkloadValue {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for IpKey {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for DestValue {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for AgentConfig {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for OrigDst {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for ConnKey {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for PeerValue {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for Event {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for policy::PolSrcKey {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for policy::PolSrcValue {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for policy::PolDstKey {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for policy::PolDstValue {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for policy::PolL4Key {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for policy::PolL4Value {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for policy::PolL7Key {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for policy::PolL7Value {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for policy::PolOpKey {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for policy::PolOpValue {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for policy::PolStrKey {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for policy::PolStrValue {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for policy::PolPlainData {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for policy::PolPlainKey {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for policy::PolPlainValue {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_v4_roundtrip() {
        let ip = u32::from_ne_bytes([10, 1, 2, 3]);
        let m = mapped_v4(ip);
        assert!(is_mapped_v4(&m));
        let bytes: [u8; 4] = m[2].to_ne_bytes();
        assert_eq!(bytes, [0, 0, 0xff, 0xff]);
        assert!(!is_mapped_v4(&[0, 0, 0, 1]));
    }

    #[test]
    fn loopback_forms() {
        let v4 = |a: [u8; 4]| mapped_v4(u32::from_ne_bytes(a));
        assert!(is_loopback(&v4([127, 0, 0, 1])));
        assert!(is_loopback(&v4([127, 255, 1, 9])));
        assert!(!is_loopback(&v4([128, 0, 0, 1])));
        assert!(!is_loopback(&v4([10, 0, 0, 127])));
        let v6 = |a: core::net::Ipv6Addr| {
            let o = a.octets();
            core::array::from_fn(|i| {
                u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
            })
        };
        assert!(is_loopback(&v6(core::net::Ipv6Addr::LOCALHOST)));
        assert!(!is_loopback(&v6(core::net::Ipv6Addr::UNSPECIFIED)));
        assert!(!is_loopback(&v6("::2".parse().unwrap())));
        assert!(!is_loopback(&v6("fd00::1".parse().unwrap())));
        // ::127.0.0.1 (IPv4-compatible, deprecated) is not loopback.
        assert!(!is_loopback(&v6("::7f00:1".parse().unwrap())));
    }
}
