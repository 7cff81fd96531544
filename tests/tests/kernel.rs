//! Kernel-program tests without a cluster: the object the agent embeds
//! (`mesh_agent::bpf::OBJECT`) is loaded here with private, unpinned maps that each test fills
//! itself, and the real kernel runs the programs.
//!
//! - `cgroup_skb/ingress` through `BPF_PROG_TEST_RUN` with hand-built IPv4/IPv6 TCP packets:
//!   the verdict the kernel returns (1 pass, 0 drop) and the counters it bumps. The test run
//!   gives the packet a socket of the calling thread's cgroup, so enrolling that cgroup makes
//!   the packet one for an enrolled workload.
//! - `cgroup/connect4`, `cgroup/connect6` and `sockops` attached to a cgroup tree created per
//!   test under the cgroup2 mount: a forked child moves itself into a leaf and connects; where
//!   the connect lands (which loopback listener accepts it) or the errno it gets is the
//!   verdict, and the original destination is looked up by 4-tuple as the agent does.
//!
//! Everything is released by the guards: programs and their links with the loaded object,
//! cgroups by `mesh_tests::Cgroup`, children by pid. Needs root (fails saying so otherwise).

use std::{
    fs::File,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener},
    os::fd::AsRawFd,
    path::Path,
    time::Duration,
};

use aya::{
    maps::{
        lpm_trie::{Key, LpmTrie},
        Array, HashMap, MapData, PerCpuArray, RingBuf,
    },
    programs::{CgroupAttachMode, CgroupSkb, CgroupSockAddr, Program, ProgramError, SockOps},
    Ebpf, EbpfLoader, Pod, TestRun, TestRunOptions,
};
use mesh_common::{
    counters as ctr, mapped_v4, names,
    policy::{
        PolDstKey, PolDstValue, PolL4Key, PolL4Value, PolPlainData, PolPlainValue, PolSrcKey,
        PolSrcValue, PLAIN_GEN_BITS, POL_ALLOW, POL_DENY, POL_L7,
    },
    AgentConfig, CgroupKey, ConnKey, DestValue, Event, IpKey, OrigDst, PeerValue, WorkloadValue,
    AF_INET, AF_INET6, CONFIG_F_IPV6, CONFIG_F_READY, DEST_F_SERVICE, EVENT_PLAINTEXT_DENIED,
    EVENT_PLAINTEXT_PERMISSIVE, EVENT_PLAINTEXT_REFUSED, WORKLOAD_F_CAPTURE, WORKLOAD_F_PERMISSIVE,
};
use mesh_tests::{cgroup2_mount, unique_id, wait_for, Cgroup};

const PASS: u32 = 1;
const DROP: u32 = 0;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
/// Workload ids the tests enroll: the destination side and the connecting side.
const DST_ID: u32 = 7;
const SRC_ID: u32 = 9;
/// Policy generation, set, class ids used where a test loads policy.
const GEN: u32 = 3;
const SET: u32 = 4;
const CLASS: u32 = 5;
/// How long a child's connect may take before it gives up (SO_SNDTIMEO).
const CONNECT_TIMEOUT_S: i64 = 3;

/// Fails with a clear message unless the test can load programs and create cgroups (root and
/// a cgroup2 mount; nothing is pinned, so no bpffs is needed).
fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "kernel-program tests need root (euid is {euid}): they load eBPF programs and create \
         cgroups; run them with `cargo xtask test` or as root"
    );
    cgroup2_mount();
}

/// The agent's kernel object, loaded with maps of its own (nothing pinned).
struct Kernel {
    ebpf: Ebpf,
}

impl Kernel {
    fn load() -> Self {
        require_root();
        let ebpf = EbpfLoader::new()
            .load(mesh_agent::bpf::OBJECT)
            .unwrap_or_else(|e| panic!("loading the agent's kernel object: {e}"));
        Kernel { ebpf }
    }

    fn hash<K: Pod, V: Pod>(&mut self, name: &str) -> HashMap<&mut MapData, K, V> {
        let map = self
            .ebpf
            .map_mut(name)
            .unwrap_or_else(|| panic!("no map {name}"));
        HashMap::try_from(map).unwrap_or_else(|e| panic!("map {name}: {e}"))
    }

    fn insert<K: Pod, V: Pod>(&mut self, name: &str, key: K, value: V) {
        self.hash::<K, V>(name)
            .insert(key, value, 0)
            .unwrap_or_else(|e| panic!("inserting into {name}: {e}"));
    }

    fn remove<K: Pod, V: Pod>(&mut self, name: &str, key: &K) {
        self.hash::<K, V>(name)
            .remove(key)
            .unwrap_or_else(|e| panic!("removing from {name}: {e}"));
    }

    fn set_config(&mut self, cfg: AgentConfig) {
        let map = self.ebpf.map_mut(names::MAP_CONFIG).expect("no config map");
        let mut config: Array<_, AgentConfig> = Array::try_from(map).expect("config map");
        config.set(0, cfg, 0).expect("setting the config slot");
    }

    fn enroll(&mut self, cgroup_id: u64, workload_id: u32, flags: u32) {
        self.insert(
            names::MAP_WORKLOADS,
            CgroupKey { cgroup_id },
            WorkloadValue { workload_id, flags },
        );
    }

    fn add_dest(&mut self, addr: IpAddr, workload_id: u32) {
        self.add_dest_flagged(addr, workload_id, 0);
    }

    fn add_dest_flagged(&mut self, addr: IpAddr, workload_id: u32, flags: u32) {
        self.insert(
            names::MAP_DESTS,
            ip_key(addr),
            DestValue { workload_id, flags },
        );
    }

    /// The L4 entry of (GEN, SET, CLASS, `port`).
    fn l4(&mut self, port: u32, verdict: u32, policy_str: u32) {
        let key = PolL4Key {
            gen: GEN,
            set_id: SET,
            class_id: CLASS,
            port,
        };
        let value = PolL4Value {
            verdict,
            flags: 0,
            policy_str,
            l7_count: 0,
            dry_run_str: 0,
            audit_str: 0,
        };
        self.insert(names::MAP_POL_L4, key, value);
    }

    /// Policy set SET selects workload `dst`.
    fn select(&mut self, dst: u32) {
        let key = PolDstKey {
            gen: GEN,
            workload_id: dst,
        };
        let value = PolDstValue {
            set_id: SET,
            flags: 0,
        };
        self.insert(names::MAP_POL_DST, key, value);
    }

    fn counter(&self, index: u32) -> u64 {
        let map = self.ebpf.map(names::MAP_COUNTERS).expect("no counters map");
        let counters: PerCpuArray<_, u64> = PerCpuArray::try_from(map).expect("counters map");
        counters
            .get(&index, 0)
            .expect("reading a counter")
            .iter()
            .sum()
    }

    /// The events the programs emitted since the last call.
    fn events(&mut self) -> Vec<Event> {
        let map = self.ebpf.map_mut(names::MAP_EVENTS).expect("no events map");
        let mut ring = RingBuf::try_from(map).expect("events map");
        let mut out = Vec::new();
        while let Some(item) = ring.next() {
            assert_eq!(item.len(), size_of::<Event>(), "event record size");
            // SAFETY: the record is an `Event` written by the programs (size checked above);
            // read unaligned, every bit pattern is a valid `Event` (integers only).
            out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<Event>()) });
        }
        out
    }

    fn ingress(&mut self) -> &CgroupSkb {
        let p: &mut CgroupSkb = self
            .ebpf
            .program_mut(names::PROG_INGRESS)
            .expect("no ingress program")
            .try_into()
            .expect("ingress is cgroup_skb");
        if p.fd().is_err() {
            p.load()
                .unwrap_or_else(|e| panic!("loading {}: {e}", names::PROG_INGRESS));
        }
        p
    }

    /// Runs the ingress program on `packet` (starting at the IP header) and returns its verdict.
    fn run_ingress(&mut self, packet: &[u8]) -> u32 {
        let ethertype: u16 = if packet.first().is_some_and(|b| b >> 4 == 6) {
            0x86dd
        } else {
            0x0800
        };
        // The test run wants an Ethernet frame; cgroup_skb programs see the data after it.
        let mut frame = vec![0u8; 12];
        frame.extend_from_slice(&ethertype.to_be_bytes());
        frame.extend_from_slice(packet);
        let opts = TestRunOptions {
            data_in: Some(&frame),
            ..Default::default()
        };
        self.ingress()
            .test_run(opts)
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN on {}: {e:?}", names::PROG_INGRESS))
            .return_value
    }

    /// Loads connect4, connect6 and sockops and attaches them to `cgroup`, as the agent does
    /// to the pod cgroup parent.
    fn attach_capture(&mut self, cgroup: &Path) {
        let dir = File::open(cgroup).unwrap_or_else(|e| panic!("{}: {e}", cgroup.display()));
        let attached = |prog: &str, e: ProgramError| -> ! {
            panic!("attaching {prog} to {}: {e}", cgroup.display())
        };
        for prog in [names::PROG_CONNECT4, names::PROG_CONNECT6] {
            let p: &mut CgroupSockAddr = self.program(prog);
            p.load().unwrap_or_else(|e| panic!("loading {prog}: {e}"));
            p.attach(&dir, CgroupAttachMode::Single)
                .unwrap_or_else(|e| attached(prog, e));
        }
        let prog = names::PROG_SOCKOPS;
        let p: &mut SockOps = self.program(prog);
        p.load().unwrap_or_else(|e| panic!("loading {prog}: {e}"));
        p.attach(&dir, CgroupAttachMode::Single)
            .unwrap_or_else(|e| attached(prog, e));
    }

    fn program<'a, P>(&'a mut self, prog: &str) -> &'a mut P
    where
        &'a mut P: TryFrom<&'a mut Program, Error = ProgramError>,
    {
        self.ebpf
            .program_mut(prog)
            .unwrap_or_else(|| panic!("no program {prog}"))
            .try_into()
            .unwrap_or_else(|e| panic!("{prog}: {e}"))
    }

    /// Original destinations still keyed by socket cookie (`mesh_cookie_dst`): sockops moves
    /// each to its 4-tuple once the connection is established.
    fn cookie_dsts(&self) -> usize {
        let map = self.ebpf.map(names::MAP_COOKIE_DST).expect("no cookie map");
        let cookies: HashMap<_, u64, OrigDst> = HashMap::try_from(map).expect("cookie map");
        cookies.keys().count()
    }

    /// The original destination of the connection the agent accepted from `client` on
    /// `listener`, looked up as the agent does (`mesh_conn_dst`, by 4-tuple).
    fn conn_dst(&mut self, (client, listener): (SocketAddr, SocketAddr)) -> Option<OrigDst> {
        let key = ConnKey {
            src_addr_be: addr_be(client.ip()),
            dst_addr_be: addr_be(listener.ip()),
            src_port: u32::from(client.port()),
            dst_port: u32::from(listener.port()),
        };
        self.hash::<ConnKey, OrigDst>(names::MAP_CONN_DST)
            .get(&key, 0)
            .ok()
    }
}

/// A map key for `addr` (IPv4 mapped into IPv6, network order).
fn ip_key(addr: IpAddr) -> IpKey {
    IpKey {
        addr_be: addr_be(addr),
    }
}

fn addr_be(addr: IpAddr) -> [u32; 4] {
    match addr {
        IpAddr::V4(a) => mapped_v4(u32::from_ne_bytes(a.octets())),
        IpAddr::V6(a) => {
            let o = a.octets();
            std::array::from_fn(|i| {
                u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
            })
        }
    }
}

/// A ready config: the agent listens on 127.0.0.1 and [::1] at `port`.
fn ready_config(port: u16, policy_gen: u32) -> AgentConfig {
    AgentConfig {
        redirect_ip4_be: u32::from_ne_bytes([127, 0, 0, 1]),
        redirect_port_be: u32::from(port.to_be()),
        redirect_ip6_be: addr_be(IpAddr::V6(Ipv6Addr::LOCALHOST)),
        flags: CONFIG_F_READY | CONFIG_F_IPV6,
        policy_gen,
    }
}

/// The cgroup2 id of the calling thread (what a test run's socket belongs to).
fn own_cgroup_id() -> u64 {
    use std::os::unix::fs::MetadataExt;
    let text = std::fs::read_to_string("/proc/thread-self/cgroup").expect("reading own cgroup");
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("no cgroup2 line in /proc/thread-self/cgroup");
    let path = cgroup2_mount().join(rel.trim_start_matches('/'));
    std::fs::metadata(&path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .ino()
}

// ---- packets -------------------------------------------------------------------------------

/// A TCP header (20 bytes) with `flags`.
fn tcp(src_port: u16, dst_port: u16, flags: u8) -> Vec<u8> {
    let mut h = vec![0u8; 20];
    h[0..2].copy_from_slice(&src_port.to_be_bytes());
    h[2..4].copy_from_slice(&dst_port.to_be_bytes());
    h[12] = 5 << 4;
    h[13] = flags;
    h
}

/// An IPv4 packet: header (with `options`, a multiple of 4 bytes), then `payload`.
fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, options: &[u8], payload: &[u8]) -> Vec<u8> {
    assert_eq!(options.len() % 4, 0);
    let ihl = 5 + options.len() / 4;
    let total = ihl * 4 + payload.len();
    let mut p = vec![0u8; 20];
    p[0] = 0x40 | ihl as u8;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = proto;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p.extend_from_slice(options);
    p.extend_from_slice(payload);
    p
}

/// An IPv6 packet: fixed header with `next`, then `rest` (extension headers and transport).
fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, rest: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 40];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&(rest.len() as u16).to_be_bytes());
    p[6] = next;
    p[7] = 64;
    p[8..24].copy_from_slice(&src.octets());
    p[24..40].copy_from_slice(&dst.octets());
    p.extend_from_slice(rest);
    p
}

/// An IPv6 options-style extension header (hop-by-hop, routing, destination options) of
/// `units` 8-byte units beyond the first, followed by `next`.
fn ext_options(next: u8, units: u8) -> Vec<u8> {
    let mut h = vec![0u8; 8 * (usize::from(units) + 1)];
    h[0] = next;
    h[1] = units;
    h
}

const EXT_HOPOPTS: u8 = 0;
const EXT_ROUTING: u8 = 43;
const EXT_FRAGMENT: u8 = 44;
const EXT_AH: u8 = 51;
const EXT_DSTOPTS: u8 = 60;

fn v4(s: &str) -> Ipv4Addr {
    s.parse().expect("IPv4 literal")
}
fn v6(s: &str) -> Ipv6Addr {
    s.parse().expect("IPv6 literal")
}

/// Outside the mesh, a mesh agent, and the pod receiving.
const OUTSIDER4: &str = "192.0.2.10";
const PEER4: &str = "198.51.100.2";
const POD4: &str = "10.1.0.5";
const OUTSIDER6: &str = "2001:db8::10";
const PEER6: &str = "2001:db8:1::2";
const POD6: &str = "fd00:1::5";

fn syn4(src: &str, port: u16) -> Vec<u8> {
    ipv4(v4(src), v4(POD4), IPPROTO_TCP, &[], &tcp(40000, port, SYN))
}

fn syn6_after(next: u8, exts: &[u8]) -> Vec<u8> {
    let mut rest = exts.to_vec();
    rest.extend_from_slice(&tcp(40000, 8080, SYN));
    ipv6(v6(OUTSIDER6), v6(POD6), next, &rest)
}

/// A kernel with the agent ready and this thread's cgroup enrolled as workload DST_ID with
/// `flags`; a mesh agent at PEER4/PEER6.
fn ingress_kernel(flags: u32, policy_gen: u32) -> Kernel {
    let mut k = Kernel::load();
    k.set_config(ready_config(15001, policy_gen));
    k.enroll(own_cgroup_id(), DST_ID, flags);
    for peer in [IpAddr::V4(v4(PEER4)), IpAddr::V6(v6(PEER6))] {
        k.insert(names::MAP_PEERS, ip_key(peer), PeerValue::default());
    }
    k
}

// ---- ingress -------------------------------------------------------------------------------

#[test]
fn ingress_strict_drops_plaintext_and_admits_the_mesh() {
    let mut k = ingress_kernel(WORKLOAD_F_CAPTURE, 0);

    assert_eq!(
        k.run_ingress(&syn4(OUTSIDER4, 8080)),
        DROP,
        "plaintext SYN to STRICT"
    );
    assert_eq!(k.counter(ctr::INGRESS_PLAINTEXT_REFUSED), 1);
    let events = k.events();
    assert_eq!(events.len(), 1, "one event per refused SYN: {events:?}");
    let e = events[0];
    assert_eq!(e.kind, EVENT_PLAINTEXT_REFUSED);
    assert_eq!(e.workload_id, DST_ID);
    assert_eq!(e.src_addr_be, addr_be(IpAddr::V4(v4(OUTSIDER4))));
    assert_eq!(e.dst_addr_be, addr_be(IpAddr::V4(v4(POD4))));
    assert_eq!(u16::from_be(e.src_port_be), 40000);
    assert_eq!(u16::from_be(e.dst_port_be), 8080);
    assert_eq!(e.family, u32::from(AF_INET));

    // From the mesh: a mesh agent, the local agent's listener address, loopback.
    for src in [PEER4, "127.0.0.1", "127.3.4.5"] {
        assert_eq!(k.run_ingress(&syn4(src, 8080)), PASS, "SYN from {src}");
    }
    assert_eq!(k.counter(ctr::INGRESS_MESH), 3);

    // Only a SYN without ACK is judged.
    for flags in [SYN | ACK, ACK, 0x18] {
        let p = ipv4(v4(OUTSIDER4), v4(POD4), IPPROTO_TCP, &[], &tcp(1, 2, flags));
        assert_eq!(k.run_ingress(&p), PASS, "TCP flags {flags:#x}");
    }
    let udp = ipv4(v4(OUTSIDER4), v4(POD4), IPPROTO_UDP, &[], &[0; 8]);
    assert_eq!(k.run_ingress(&udp), PASS, "UDP");

    // IPv6: the same rules.
    assert_eq!(
        k.run_ingress(&syn6_after(IPPROTO_TCP, &[])),
        DROP,
        "IPv6 plaintext SYN"
    );
    let from_peer = ipv6(v6(PEER6), v6(POD6), IPPROTO_TCP, &tcp(1, 8080, SYN));
    assert_eq!(
        k.run_ingress(&from_peer),
        PASS,
        "IPv6 SYN from a mesh agent"
    );
    let from_lo = ipv6(
        Ipv6Addr::LOCALHOST,
        v6(POD6),
        IPPROTO_TCP,
        &tcp(1, 8080, SYN),
    );
    assert_eq!(k.run_ingress(&from_lo), PASS, "IPv6 SYN from ::1");
    assert_eq!(k.counter(ctr::INGRESS_PLAINTEXT_REFUSED), 2);
    assert_eq!(k.counter(ctr::INGRESS_ERRORS), 0);

    // Not enrolled, or agent not ready: nothing is enforced.
    k.remove::<CgroupKey, WorkloadValue>(
        names::MAP_WORKLOADS,
        &CgroupKey {
            cgroup_id: own_cgroup_id(),
        },
    );
    assert_eq!(k.run_ingress(&syn4(OUTSIDER4, 8080)), PASS, "not enrolled");
    k.enroll(own_cgroup_id(), DST_ID, WORKLOAD_F_CAPTURE);
    k.set_config(AgentConfig {
        flags: 0,
        ..ready_config(15001, 0)
    });
    assert_eq!(
        k.run_ingress(&syn4(OUTSIDER4, 8080)),
        PASS,
        "agent not ready"
    );
    assert_eq!(k.counter(ctr::INGRESS_PLAINTEXT_REFUSED), 2);
}

#[test]
fn ingress_permissive_authorizes_plaintext_by_policy() {
    // No generation: plaintext passes, flagged.
    let mut k = ingress_kernel(WORKLOAD_F_CAPTURE | WORKLOAD_F_PERMISSIVE, 0);
    assert_eq!(k.run_ingress(&syn4(OUTSIDER4, 8080)), PASS);
    assert_eq!(k.counter(ctr::INGRESS_PLAINTEXT_PERMISSIVE), 1);
    let kinds: Vec<u32> = k.events().iter().map(|e| e.kind).collect();
    assert_eq!(kinds, [EVENT_PLAINTEXT_PERMISSIVE]);

    // Generation GEN: no policy selects the workload yet → passes.
    let mut k = ingress_kernel(WORKLOAD_F_CAPTURE | WORKLOAD_F_PERMISSIVE, GEN);
    assert_eq!(k.run_ingress(&syn4(OUTSIDER4, 8080)), PASS, "not selected");
    k.select(DST_ID);
    // Selected, but no plaintext class for the source: an inconsistency, dropped.
    assert_eq!(
        k.run_ingress(&syn4(OUTSIDER4, 8080)),
        DROP,
        "no plaintext class"
    );
    assert_eq!(k.counter(ctr::POLICY_LOOKUP_ERRORS), 1);

    // 192.0.2.0/24 is class CLASS (longest match).
    let prefix = PLAIN_GEN_BITS + 96 + 24;
    let data = PolPlainData {
        gen: GEN,
        addr_be: addr_be(IpAddr::V4(v4("192.0.2.0"))),
    };
    let map = k.ebpf.map_mut(names::MAP_POL_PLAIN).expect("no plain map");
    let mut plain: LpmTrie<_, PolPlainData, PolPlainValue> =
        LpmTrie::try_from(map).expect("plain map");
    plain
        .insert(
            &Key::new(prefix, data),
            PolPlainValue { class_id: CLASS },
            0,
        )
        .expect("inserting a plaintext class");

    k.l4(8080, POL_ALLOW, 11);
    k.l4(8081, POL_DENY, 12);
    k.l4(8082, POL_L7, 13);
    k.events();
    assert_eq!(k.run_ingress(&syn4(OUTSIDER4, 8080)), PASS, "L4 allow");
    assert_eq!(k.run_ingress(&syn4(OUTSIDER4, 8081)), DROP, "L4 deny");
    assert_eq!(
        k.run_ingress(&syn4(OUTSIDER4, 8082)),
        DROP,
        "needs HTTP: fails closed"
    );
    assert_eq!(
        k.run_ingress(&syn4(OUTSIDER4, 9999)),
        DROP,
        "no entry for the port"
    );
    assert_eq!(k.counter(ctr::INGRESS_PLAINTEXT_DENIED_POLICY), 3 + 1);
    assert_eq!(k.counter(ctr::POLICY_LOOKUP_ERRORS), 2);
    let denied: Vec<(u32, u32, u32)> = k
        .events()
        .iter()
        .map(|e| (e.kind, e.policy_str, e.policy_gen))
        .collect();
    assert_eq!(
        denied,
        [
            (EVENT_PLAINTEXT_PERMISSIVE, 0, 0),
            (EVENT_PLAINTEXT_DENIED, 12, GEN),
            (EVENT_PLAINTEXT_DENIED, 13, GEN),
            (EVENT_PLAINTEXT_DENIED, 0, GEN),
        ]
    );

    // The whole-port entry (port 0) applies where no port entry exists.
    k.l4(0, POL_ALLOW, 14);
    assert_eq!(
        k.run_ingress(&syn4(OUTSIDER4, 9999)),
        PASS,
        "whole-port allow"
    );
    // A source outside the prefix has no class: dropped.
    assert_eq!(
        k.run_ingress(&syn4("203.0.113.1", 8080)),
        DROP,
        "unclassified source"
    );
}

#[test]
fn ingress_ipv4_options_and_malformed_headers() {
    let mut k = ingress_kernel(WORKLOAD_F_CAPTURE, 0);

    // Options shift the TCP header: a SYN after 8 bytes of options is judged (dropped), and
    // an ACK there is not mistaken for a SYN (read 8 bytes early, its flags byte would be the
    // sequence number's byte holding the SYN bit).
    let options = [1; 8];
    for (flags, verdict) in [(SYN, DROP), (ACK, PASS)] {
        let mut segment = tcp(1, 8080, flags);
        segment[5] = SYN;
        let p = ipv4(v4(OUTSIDER4), v4(POD4), IPPROTO_TCP, &options, &segment);
        assert_eq!(
            k.run_ingress(&p),
            verdict,
            "TCP flags {flags:#x} after IP options"
        );
    }
    assert_eq!(k.counter(ctr::INGRESS_PLAINTEXT_REFUSED), 1);

    // Packets the program cannot parse pass (fail open) and are counted. (A cut fixed IP
    // header cannot be tried: the test run itself refuses it with EINVAL, as the stack never
    // delivers one to a socket.)
    let full = syn4(OUTSIDER4, 8080);
    let mut bad_ihl = full.clone();
    bad_ihl[0] = 0x44;
    let mut bad_version = full.clone();
    bad_version[0] = 0x55;
    let malformed: [(&str, Vec<u8>); 4] = [
        ("IHL below 5", bad_ihl),
        ("IP version 5", bad_version),
        ("IPv4 header only", full[..20].to_vec()),
        ("TCP header cut before the flags", full[..20 + 13].to_vec()),
    ];
    for (n, (what, packet)) in malformed.iter().enumerate() {
        assert_eq!(k.run_ingress(packet), PASS, "{what}");
        assert_eq!(
            k.counter(ctr::INGRESS_ERRORS),
            n as u64 + 1,
            "{what} counted"
        );
    }
    // Options longer than the packet: the TCP header is past the end.
    let p = ipv4(v4(OUTSIDER4), v4(POD4), IPPROTO_TCP, &[1; 40], &[]);
    assert_eq!(k.run_ingress(&p), PASS, "options to the end");
    assert_eq!(k.counter(ctr::INGRESS_ERRORS), 5);
    assert_eq!(k.counter(ctr::INGRESS_PLAINTEXT_REFUSED), 1);
}

#[test]
fn ingress_ipv6_extension_headers() {
    let mut k = ingress_kernel(WORKLOAD_F_CAPTURE, 0);

    let hop = ext_options(EXT_DSTOPTS, 0);
    let mut chain = hop.clone();
    chain.extend_from_slice(&ext_options(EXT_ROUTING, 1));
    chain.extend_from_slice(&ext_options(EXT_FRAGMENT, 0));
    chain.extend_from_slice(&[EXT_AH, 0, 0, 0, 0, 0, 0, 0]); // fragment header
    let mut ah = vec![0u8; 12]; // AH: (len + 2) * 4 bytes, len = 1
    ah[0] = IPPROTO_TCP;
    ah[1] = 1;
    chain.extend_from_slice(&ah);
    assert_eq!(
        k.run_ingress(&syn6_after(EXT_HOPOPTS, &chain)),
        DROP,
        "SYN after hop-by-hop, destination, routing, fragment and AH headers"
    );

    // Six extension headers are walked; a seventh is an error (passes, counted).
    // `n` destination-options headers, the last followed by TCP.
    let dstopts = |n: usize| -> Vec<u8> {
        (1..=n)
            .flat_map(|i| ext_options(if i == n { IPPROTO_TCP } else { EXT_DSTOPTS }, 0))
            .collect()
    };
    for (n, verdict) in [(6, DROP), (7, PASS)] {
        let p = syn6_after(EXT_DSTOPTS, &dstopts(n));
        assert_eq!(k.run_ingress(&p), verdict, "{n} extension headers");
    }
    assert_eq!(k.counter(ctr::INGRESS_ERRORS), 1);

    // Another transport behind the headers is not a connection attempt (no error).
    let mut to_udp = ext_options(IPPROTO_UDP, 0);
    to_udp.extend_from_slice(&[0; 8]);
    let p = ipv6(v6(OUTSIDER6), v6(POD6), EXT_HOPOPTS, &to_udp);
    assert_eq!(k.run_ingress(&p), PASS, "UDP after hop-by-hop");
    assert_eq!(k.counter(ctr::INGRESS_ERRORS), 1);

    // An extension header longer than the packet, or cut itself, and a TCP header cut
    // before its flags: errors.
    let p = ipv6(
        v6(OUTSIDER6),
        v6(POD6),
        EXT_DSTOPTS,
        &ext_options(IPPROTO_TCP, 4)[..8],
    );
    assert_eq!(k.run_ingress(&p), PASS, "header length past the end");
    let p = ipv6(v6(OUTSIDER6), v6(POD6), EXT_DSTOPTS, &[IPPROTO_TCP]);
    assert_eq!(k.run_ingress(&p), PASS, "extension header cut");
    let full = syn6_after(IPPROTO_TCP, &[]);
    assert_eq!(k.run_ingress(&full[..40 + 13]), PASS, "TCP header cut");
    assert_eq!(k.counter(ctr::INGRESS_ERRORS), 4);
    assert_eq!(k.counter(ctr::INGRESS_PLAINTEXT_REFUSED), 2);
}

// ---- connect -------------------------------------------------------------------------------

/// A cgroup tree for one test: `mesh-<id>` (programs attached), `pod` below it (enrolled),
/// `pod/ctr` (where the connecting child runs: enrolled through its ancestor) and `other`
/// (not enrolled). Fields drop in declaration order: the leaves before `pod` and `top`.
struct Tree {
    ctr: Cgroup,
    other: Cgroup,
    pod: Cgroup,
    top: Cgroup,
}

impl Tree {
    fn create() -> Self {
        let top = Cgroup::create(&cgroup2_mount().join(format!("mesh-{}-kernel", unique_id())));
        let pod = Cgroup::create(&top.path().join("pod"));
        let ctr = Cgroup::create(&pod.path().join("ctr"));
        let other = Cgroup::create(&top.path().join("other"));
        Tree {
            ctr,
            other,
            pod,
            top,
        }
    }
}

/// A child process that was forked to connect; killed and reaped if the test fails first.
struct Child(libc::pid_t);

impl Drop for Child {
    fn drop(&mut self) {
        if self.0 > 0 {
            // SAFETY: our own unreaped child: kill and waitpid have no memory preconditions.
            unsafe {
                libc::kill(self.0, libc::SIGKILL);
                libc::waitpid(self.0, std::ptr::null_mut(), 0);
            }
        }
    }
}

/// Exit codes of the connecting child that are not an errno.
const CHILD_JOIN_FAILED: i32 = 200;
const CHILD_SOCKET_FAILED: i32 = 201;
const CHILD_UNKNOWN_ERRNO: i32 = 202;

/// Forks a child that moves itself into `cgroup` and connects a TCP socket to `addr`.
/// `Ok` if the connect succeeded, else its errno.
fn connect_from(cgroup: &Cgroup, addr: SocketAddr) -> Result<(), i32> {
    let procs = File::options()
        .write(true)
        .open(cgroup.path().join("cgroup.procs"))
        .unwrap_or_else(|e| panic!("opening {}/cgroup.procs: {e}", cgroup.path().display()));
    // Everything the child needs is prepared here: after fork it makes raw syscalls only.
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let (family, len) = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in and suitably aligned.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin) };
            (libc::AF_INET, size_of::<libc::sockaddr_in>())
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin6) };
            (libc::AF_INET6, size_of::<libc::sockaddr_in6>())
        }
    };
    let timeout = libc::timeval {
        tv_sec: CONNECT_TIMEOUT_S,
        tv_usec: 0,
    };
    let procs_fd = procs.as_raw_fd();
    // SAFETY: the child only makes async-signal-safe syscalls on memory prepared above, then
    // _exits; it never returns into Rust code of this (multi-threaded) process.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: see above.
        unsafe {
            if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                libc::_exit(CHILD_JOIN_FAILED);
            }
            let s = libc::socket(family, libc::SOCK_STREAM, 0);
            if s < 0 {
                libc::_exit(CHILD_SOCKET_FAILED);
            }
            libc::setsockopt(
                s,
                libc::SOL_SOCKET,
                libc::SO_SNDTIMEO,
                (&raw const timeout).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            );
            if libc::connect(s, (&raw const storage).cast(), len as libc::socklen_t) == 0 {
                libc::_exit(0);
            }
            let errno = *libc::__errno_location();
            libc::_exit(if (1..CHILD_JOIN_FAILED).contains(&errno) {
                errno
            } else {
                CHILD_UNKNOWN_ERRNO
            });
        }
    }
    assert!(pid > 0, "fork: {}", io::Error::last_os_error());
    let mut child = Child(pid);
    let status = wait_for(
        Duration::from_secs(CONNECT_TIMEOUT_S as u64 + 5),
        "the connecting child to exit",
        || {
            let mut status = 0;
            // SAFETY: our own child; status is a valid out pointer.
            let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            (r == pid).then_some(status)
        },
    );
    child.0 = 0;
    assert!(
        libc::WIFEXITED(status),
        "connecting child died: status {status:#x}"
    );
    match libc::WEXITSTATUS(status) {
        0 => Ok(()),
        CHILD_JOIN_FAILED => panic!("child could not join {}", cgroup.path().display()),
        CHILD_SOCKET_FAILED => panic!("child could not create a socket"),
        CHILD_UNKNOWN_ERRNO => panic!("child's connect failed with an unexpected errno"),
        errno => Err(errno),
    }
}

/// Loopback listeners: the "agent" the config names (IPv4 and IPv6, one port) and another.
struct Listeners {
    agent4: TcpListener,
    agent6: TcpListener,
    other: TcpListener,
}

impl Listeners {
    fn bind() -> Self {
        // The same port on [::1]: retry with another while it is taken there.
        for _ in 0..20 {
            let agent4 = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1");
            let port = agent4.local_addr().expect("local addr").port();
            let Ok(agent6) = TcpListener::bind((Ipv6Addr::LOCALHOST, port)) else {
                continue;
            };
            let other = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1");
            for l in [&agent4, &agent6, &other] {
                l.set_nonblocking(true).expect("nonblocking listener");
            }
            return Listeners {
                agent4,
                agent6,
                other,
            };
        }
        panic!("no port free on both 127.0.0.1 and [::1] (the tests need IPv6 loopback)");
    }

    fn agent_port(&self) -> u16 {
        self.agent4.local_addr().expect("local addr").port()
    }

    fn other_addr(&self) -> SocketAddr {
        self.other.local_addr().expect("local addr")
    }

    /// The connections waiting on each listener (agent4, agent6, other), accepted: (client,
    /// listener) address pairs.
    fn drain(&self) -> [Vec<(SocketAddr, SocketAddr)>; 3] {
        [&self.agent4, &self.agent6, &self.other].map(|l| {
            std::iter::from_fn(|| l.accept().ok())
                .map(|(s, client)| (client, s.local_addr().expect("local addr")))
                .collect()
        })
    }

    /// How many connections each listener had waiting (agent4, agent6, other).
    fn counts(&self) -> [usize; 3] {
        self.drain().map(|v| v.len())
    }

    /// The one connection `listener` (0: agent4, 1: agent6) had waiting, and none elsewhere.
    #[track_caller]
    fn only(&self, listener: usize) -> (SocketAddr, SocketAddr) {
        let mut all = self.drain();
        let counts = all.each_ref().map(Vec::len);
        let mut want = [0; 3];
        want[listener] = 1;
        assert_eq!(counts, want, "connections waiting on agent4, agent6, other");
        all[listener].remove(0)
    }
}

/// A kernel with connect4/6 attached to a fresh tree, the agent listening on `listeners`,
/// `pod` enrolled as SRC_ID, and 127.0.0.3, `fd00:6d65:7368::3` the mesh destination DST_ID.
fn connect_kernel(tree: &Tree, listeners: &Listeners, policy_gen: u32) -> Kernel {
    let mut k = Kernel::load();
    k.set_config(ready_config(listeners.agent_port(), policy_gen));
    k.enroll(tree.pod.id(), SRC_ID, WORKLOAD_F_CAPTURE);
    k.add_dest(IpAddr::V4(v4("127.0.0.3")), DST_ID);
    k.add_dest(IpAddr::V6(v6(MESH_DST6)), DST_ID);
    k.attach_capture(tree.top.path());
    k
}

const MESH_DST6: &str = "fd00:6d65:7368::3";
const ECONNREFUSED: i32 = libc::ECONNREFUSED;

#[test]
fn connect_redirects_enrolled_workloads_to_the_agent() {
    let tree = Tree::create();
    let listeners = Listeners::bind();
    let mut k = connect_kernel(&tree, &listeners, 0);

    // A mesh destination from a workload (enrolled through its ancestor `pod`): redirected
    // to the agent, which finds the original destination under the connection's 4-tuple.
    let mesh4: SocketAddr = "127.0.0.3:9".parse().expect("addr");
    let mesh6 = SocketAddr::new(IpAddr::V6(v6(MESH_DST6)), 9);
    // An IPv4-mapped address on an IPv6 socket is captured as IPv4.
    let mapped = SocketAddr::new(IpAddr::V6(v4("127.0.0.3").to_ipv6_mapped()), 9);
    for (dst, listener, family) in [
        (mesh4, 0, AF_INET),
        (mesh6, 1, AF_INET6),
        (mapped, 0, AF_INET),
    ] {
        assert_eq!(connect_from(&tree.ctr, dst), Ok(()), "connect to {dst}");
        let conn = listeners.only(listener);
        let want = OrigDst {
            addr_be: addr_be(dst.ip().to_canonical()),
            port_be: 9u16.to_be(),
            family,
            src_workload_id: SRC_ID,
            dst_workload_id: DST_ID,
        };
        assert_eq!(
            k.conn_dst(conn),
            Some(want),
            "original destination of {dst}"
        );
    }
    assert_eq!(k.counter(ctr::CONNECT_REDIRECTED), 3);
    assert_eq!(k.counter(ctr::SOCKOPS_TRACKED), 3);
    assert_eq!(
        k.cookie_dsts(),
        0,
        "every cookie entry moved to its 4-tuple"
    );

    // An address not in the map: untouched.
    let other = listeners.other_addr();
    assert_eq!(connect_from(&tree.ctr, other), Ok(()), "connect to {other}");
    assert_eq!(listeners.counts(), [0, 0, 1], "reached its own destination");
    assert_eq!(k.counter(ctr::CONNECT_PASSED_NOT_MESH), 1);

    // A process that is not enrolled: untouched (nothing listens at 127.0.0.3:9).
    assert_eq!(
        connect_from(&tree.other, mesh4),
        Err(ECONNREFUSED),
        "not enrolled"
    );
    assert_eq!(listeners.counts(), [0, 0, 0]);
    assert_eq!(k.counter(ctr::CONNECT_PASSED_NOT_ENROLLED), 1);

    // The agent not ready: a captured connect fails closed (EPERM), nothing is recorded.
    k.set_config(AgentConfig {
        flags: 0,
        ..ready_config(listeners.agent_port(), 0)
    });
    assert_eq!(
        connect_from(&tree.ctr, mesh4),
        Err(libc::EPERM),
        "agent not ready"
    );
    assert_eq!(listeners.counts(), [0, 0, 0]);
    assert_eq!(k.counter(ctr::CONNECT_ERRORS), 1);
    assert_eq!(k.cookie_dsts(), 0);
}

#[test]
fn connect_l4_policy_deny_fails_with_eperm() {
    let tree = Tree::create();
    let listeners = Listeners::bind();
    let mut k = connect_kernel(&tree, &listeners, GEN);
    k.select(DST_ID);
    let src = PolSrcKey {
        gen: GEN,
        workload_id: SRC_ID,
    };
    k.insert(
        names::MAP_POL_SRC,
        src,
        PolSrcValue {
            class4: CLASS,
            class6: CLASS,
        },
    );
    k.l4(9, POL_DENY, 21);
    k.l4(0, POL_ALLOW, 22);

    for addr in [
        SocketAddr::new(IpAddr::V4(v4("127.0.0.3")), 9),
        SocketAddr::new(IpAddr::V6(v6(MESH_DST6)), 9),
    ] {
        assert_eq!(
            connect_from(&tree.ctr, addr),
            Err(libc::EPERM),
            "deny to {addr}"
        );
    }
    assert_eq!(k.counter(ctr::CONNECT_DENIED_POLICY), 2);
    assert_eq!(listeners.counts(), [0, 0, 0], "nothing reached a listener");
    assert_eq!(
        k.cookie_dsts(),
        0,
        "no original destination for a denied connect"
    );

    // Another port falls back to the whole-port entry: allowed and redirected.
    let allowed: SocketAddr = "127.0.0.3:10".parse().expect("addr");
    assert_eq!(
        connect_from(&tree.ctr, allowed),
        Ok(()),
        "allow to {allowed}"
    );
    let conn = listeners.only(0);
    let orig = k
        .conn_dst(conn)
        .expect("original destination of the allowed connect");
    assert_eq!(u16::from_be(orig.port_be), 10);

    // A source with no class in the generation: an inconsistency, denied (fail closed).
    k.remove::<PolSrcKey, PolSrcValue>(names::MAP_POL_SRC, &src);
    assert_eq!(
        connect_from(&tree.ctr, allowed),
        Err(libc::EPERM),
        "no source class"
    );
    assert_eq!(k.counter(ctr::POLICY_LOOKUP_ERRORS), 1);
    assert_eq!(k.counter(ctr::CONNECT_REDIRECTED), 1);
}

#[test]
fn connect_to_service_vip_redirected_without_kernel_l4() {
    let tree = Tree::create();
    let listeners = Listeners::bind();
    let mut k = connect_kernel(&tree, &listeners, GEN);
    // Policy denies every connect to workload DST_ID; the service's id is DST_ID too: a VIP's
    // id is no workload's, so the kernel must not look policy up for it.
    k.select(DST_ID);
    k.insert(
        names::MAP_POL_SRC,
        PolSrcKey {
            gen: GEN,
            workload_id: SRC_ID,
        },
        PolSrcValue {
            class4: CLASS,
            class6: CLASS,
        },
    );
    k.l4(0, POL_DENY, 21);
    let vip4 = IpAddr::V4(v4("127.0.0.4"));
    let vip6 = IpAddr::V6(v6("fd00:6d65:7368::4"));
    k.add_dest_flagged(vip4, DST_ID, DEST_F_SERVICE);
    k.add_dest_flagged(vip6, DST_ID, DEST_F_SERVICE);

    // The control: the workload address is denied.
    let pod: SocketAddr = "127.0.0.3:80".parse().expect("addr");
    assert_eq!(
        connect_from(&tree.ctr, pod),
        Err(libc::EPERM),
        "deny to {pod}"
    );
    assert_eq!(k.counter(ctr::CONNECT_DENIED_POLICY), 1);

    // The VIPs: redirected to the agent, the original destination recovered with no
    // destination workload (the agent chooses the endpoint).
    for (vip, listener, family) in [(vip4, 0, AF_INET), (vip6, 1, AF_INET6)] {
        let dst = SocketAddr::new(vip, 80);
        assert_eq!(connect_from(&tree.ctr, dst), Ok(()), "connect to {dst}");
        let conn = listeners.only(listener);
        let want = OrigDst {
            addr_be: addr_be(vip),
            port_be: 80u16.to_be(),
            family,
            src_workload_id: SRC_ID,
            dst_workload_id: 0,
        };
        assert_eq!(
            k.conn_dst(conn),
            Some(want),
            "original destination of {dst}"
        );
    }
    assert_eq!(k.counter(ctr::CONNECT_REDIRECTED), 2);
    assert_eq!(
        k.counter(ctr::CONNECT_DENIED_POLICY),
        1,
        "no policy for a VIP"
    );
    assert_eq!(k.counter(ctr::POLICY_LOOKUP_ERRORS), 0);

    // A process that is not enrolled: a VIP is not captured for it.
    assert_eq!(
        connect_from(&tree.other, SocketAddr::new(vip4, 80)),
        Err(ECONNREFUSED),
        "not enrolled"
    );
    assert_eq!(listeners.counts(), [0, 0, 0]);
}
