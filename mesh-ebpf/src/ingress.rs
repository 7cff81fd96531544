//! `cgroup_skb/ingress`: inbound protection of enrolled workloads.
//!
//! Runs for every packet delivered to a socket created in the pod cgroup
//! tree; in `cgroup_skb` programs the packet data starts at the network
//! header. Only a TCP SYN without ACK (a connection attempt) is judged;
//! everything else passes. A SYN to a socket whose cgroup (or an ancestor)
//! is an enrolled workload passes when it comes from the mesh: the local
//! agent's listener address, another address of this node's agent
//! (`mesh_peers`) or loopback. Otherwise it is plaintext from outside the mesh: dropped for a
//! STRICT workload (the client sees its SYN go unanswered); for a PERMISSIVE
//! one it is authorized as Istio authorizes plaintext — with no principal and
//! no namespace, its source address against ipBlocks, the destination port —
//! and passed (flagged) or dropped. Every case is counted and emitted as an
//! event.
//!
//! The safe baseline (`CONFIG_F_BASELINE`, no verified configuration on the node) comes
//! first: a SYN to any socket of the tree from a non-loopback address is dropped, whatever its
//! source (counted `ingress_dropped_baseline`).
//!
//! Plaintext authorization (active policy generation `g`): no `mesh_pol_dst`
//! entry with a set for the destination → no policy selects it, passed. Else
//! the class of the source address is the longest match in `mesh_pol_plain`
//! (every generation has a default per family; none found is an
//! inconsistency: dropped), and the L4 entry for (set, class, port) decides:
//! `POL_ALLOW` passes; `POL_DENY` drops; `POL_L7` drops too — a decision that
//! needs the HTTP request cannot be made here, and a plaintext connection
//! cannot be carried through the agent, so it fails closed (a documented
//! difference from Istio, which would evaluate the request).

use aya_ebpf::btf_maps::lpm_trie::Key;
use aya_ebpf::{
    helpers::generated::{bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id},
    programs::SkBuffContext,
};
use mesh_common::{
    counters as ctr, is_loopback, mapped_v4,
    policy::{PolDstKey, PolPlainData, PLAIN_GEN_BITS, POL_ALLOW},
    AgentConfig, Event, IpKey, AF_INET, AF_INET6, CONFIG_F_IPV6, EVENT_BASELINE_DROPPED,
    EVENT_PLAINTEXT_DENIED, EVENT_PLAINTEXT_PERMISSIVE, EVENT_PLAINTEXT_REFUSED,
    WORKLOAD_F_PERMISSIVE,
};

use crate::{
    connect,
    maps::{count, emit, PEERS, POL_DST, POL_PLAIN},
    workload,
};

/// Deliver the packet.
pub const VERDICT_PASS: i32 = 1;
/// Drop the packet.
pub const VERDICT_DROP: i32 = 0;
/// Fails open: errors are packets this program cannot parse (truncated
/// headers, too many IPv6 extension headers). They are not recognisable
/// connection attempts, and dropping them would break traffic the kernel's
/// own TCP stack still validates; they are counted (`ingress_errors`).
pub const VERDICT_ON_ERROR: i32 = VERDICT_PASS;

const IPPROTO_TCP: u8 = 6;
const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AH: u8 = 51;
const IPV6_DSTOPTS: u8 = 60;
/// IPv6 extension headers walked before giving up (counted as an error).
const MAX_IPV6_EXT_HEADERS: u32 = 6;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;

/// The packet could not be parsed.
pub struct ParseError;

impl From<i64> for ParseError {
    fn from(_: i64) -> Self {
        ParseError
    }
}

/// What the program needs of a TCP SYN.
struct Syn {
    src: [u32; 4],
    dst: [u32; 4],
    src_port_be: u16,
    dst_port_be: u16,
    family: u16,
}

impl Syn {
    /// The event `kind` about this SYN, to workload `workload_id` (0: none known), decided by
    /// policy string `policy_str` of generation `gen` (0: none).
    #[inline(always)]
    fn event(&self, kind: u32, workload_id: u32, policy_str: u32, gen: u32) -> Event {
        Event {
            kind,
            workload_id,
            src_addr_be: self.src,
            dst_addr_be: self.dst,
            src_port_be: self.src_port_be,
            dst_port_be: self.dst_port_be,
            family: u32::from(self.family),
            peer_workload_id: 0,
            policy_str,
            policy_gen: gen,
            _reserved: 0,
        }
    }
}

pub fn try_ingress(ctx: &SkBuffContext) -> Result<i32, ParseError> {
    let version = ctx.load::<u8>(0)? >> 4;
    let syn = match version {
        4 => parse_v4(ctx)?,
        6 => parse_v6(ctx)?,
        _ => return Err(ParseError),
    };
    let Some(syn) = syn else {
        return Ok(VERDICT_PASS);
    };
    let slot = connect::slot();
    if connect::baseline(slot) && !is_loopback(&syn.src) {
        count(ctr::INGRESS_DROPPED_BASELINE);
        emit(&syn.event(EVENT_BASELINE_DROPPED, 0, 0, 0));
        return Ok(VERDICT_DROP);
    }
    // Agent not up: nothing is enforced (capture is off as well).
    let Some(cfg) = connect::ready(slot) else {
        return Ok(VERDICT_PASS);
    };
    let skb = ctx.skb.skb;
    // SAFETY: the program's own __sk_buff; valid in cgroup_skb programs
    // (0 when the packet has no full socket: then nothing is enrolled).
    let own = unsafe { bpf_skb_cgroup_id(skb) };
    let Some(w) = workload::enrolled(own, |level| {
        // SAFETY: as above; returns 0 past the socket cgroup's own level.
        unsafe { bpf_skb_ancestor_cgroup_id(skb, level) }
    }) else {
        return Ok(VERDICT_PASS);
    };
    if from_mesh(&cfg, &syn) {
        count(ctr::INGRESS_MESH);
        return Ok(VERDICT_PASS);
    }
    let permissive = w.flags & WORKLOAD_F_PERMISSIVE != 0;
    let (kind, verdict, policy_str) = if !permissive {
        count(ctr::INGRESS_PLAINTEXT_REFUSED);
        (EVENT_PLAINTEXT_REFUSED, VERDICT_DROP, 0)
    } else {
        match authorize_plaintext(cfg.policy_gen, w.workload_id, &syn) {
            Ok(()) => {
                count(ctr::INGRESS_PLAINTEXT_PERMISSIVE);
                (EVENT_PLAINTEXT_PERMISSIVE, VERDICT_PASS, 0)
            }
            Err(policy_str) => {
                count(ctr::INGRESS_PLAINTEXT_DENIED_POLICY);
                (EVENT_PLAINTEXT_DENIED, VERDICT_DROP, policy_str)
            }
        }
    };
    let gen = if kind == EVENT_PLAINTEXT_DENIED {
        cfg.policy_gen
    } else {
        0
    };
    emit(&syn.event(kind, w.workload_id, policy_str, gen));
    Ok(verdict)
}

/// Authorizes plaintext (no principal, no namespace) from `syn.src` to workload `dst_id` on
/// `syn.dst_port_be`, with generation `gen` (see the module docs). `Err` carries the deciding
/// policy string (0: default deny, a lookup inconsistency, or a decision needing HTTP).
#[inline(always)]
fn authorize_plaintext(gen: u32, dst_id: u32, syn: &Syn) -> Result<(), u32> {
    if gen == 0 {
        return Ok(());
    }
    let dst_key = PolDstKey {
        gen,
        workload_id: dst_id,
    };
    // SAFETY: read-only lookup, value copied out.
    let Some(dst) = (unsafe { POL_DST.get(dst_key) }).copied() else {
        return Ok(());
    };
    if dst.set_id == 0 {
        return Ok(());
    }
    let key = Key::new(
        PLAIN_GEN_BITS + 128,
        PolPlainData {
            gen,
            addr_be: syn.src,
        },
    );
    let Some(class) = POL_PLAIN.get(&key).map(|v| v.class_id) else {
        count(ctr::POLICY_LOOKUP_ERRORS);
        return Err(0);
    };
    let port = u32::from(u16::from_be(syn.dst_port_be));
    match connect::l4_entry(gen, dst.set_id, class, port) {
        Some(e) if e.verdict == POL_ALLOW => Ok(()),
        Some(e) => Err(e.policy_str),
        None => {
            count(ctr::POLICY_LOOKUP_ERRORS);
            Err(0)
        }
    }
}

/// Whether the SYN comes from the mesh: the local agent (its listener address
/// or another address of its node in `mesh_peers`), or loopback (a pod
/// talking to itself).
#[inline(always)]
fn from_mesh(cfg: &AgentConfig, syn: &Syn) -> bool {
    let src = syn.src;
    if src == mapped_v4(cfg.redirect_ip4_be) {
        return true;
    }
    if cfg.flags & CONFIG_F_IPV6 != 0 && src == cfg.redirect_ip6_be {
        return true;
    }
    if is_loopback(&src) {
        return true;
    }
    // SAFETY: read-only lookup; only presence is used.
    unsafe { PEERS.get(IpKey { addr_be: src }) }.is_some()
}

/// An IPv4 packet: `Some` if it is a TCP SYN without ACK.
#[inline(always)]
fn parse_v4(ctx: &SkBuffContext) -> Result<Option<Syn>, ParseError> {
    let ihl = usize::from(ctx.load::<u8>(0)? & 0x0f) * 4;
    if ihl < 20 {
        return Err(ParseError);
    }
    if ctx.load::<u8>(9)? != IPPROTO_TCP {
        return Ok(None);
    }
    // Loaded as bytes: the words hold network order, as the maps do.
    let src = ctx.load::<u32>(12)?;
    let dst = ctx.load::<u32>(16)?;
    tcp_syn(ctx, ihl, mapped_v4(src), mapped_v4(dst), AF_INET)
}

/// An IPv6 packet: `Some` if it is a TCP SYN without ACK (after at most
/// [`MAX_IPV6_EXT_HEADERS`] extension headers).
#[inline(always)]
fn parse_v6(ctx: &SkBuffContext) -> Result<Option<Syn>, ParseError> {
    let mut next = ctx.load::<u8>(6)?;
    let src = ctx.load::<[u32; 4]>(8)?;
    let dst = ctx.load::<[u32; 4]>(24)?;
    let mut off: usize = 40;
    let mut i = 0;
    while i < MAX_IPV6_EXT_HEADERS {
        match next {
            IPPROTO_TCP => return tcp_syn(ctx, off, src, dst, AF_INET6),
            IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS => {
                let len = usize::from(ctx.load::<u8>(off + 1)?);
                next = ctx.load::<u8>(off)?;
                off += (len + 1) * 8;
            }
            IPV6_FRAGMENT => {
                next = ctx.load::<u8>(off)?;
                off += 8;
            }
            IPV6_AH => {
                let len = usize::from(ctx.load::<u8>(off + 1)?);
                next = ctx.load::<u8>(off)?;
                off += (len + 2) * 4;
            }
            // Another transport (UDP, ICMPv6, …): not a TCP connection attempt.
            _ => return Ok(None),
        }
        i += 1;
    }
    if next == IPPROTO_TCP {
        return tcp_syn(ctx, off, src, dst, AF_INET6);
    }
    Err(ParseError)
}

/// The TCP header at `off`: `Some` if SYN is set and ACK is not.
#[inline(always)]
fn tcp_syn(
    ctx: &SkBuffContext,
    off: usize,
    src: [u32; 4],
    dst: [u32; 4],
    family: u16,
) -> Result<Option<Syn>, ParseError> {
    let flags = ctx.load::<u8>(off + 13)?;
    if flags & TCP_FLAG_SYN == 0 || flags & TCP_FLAG_ACK != 0 {
        return Ok(None);
    }
    // Loaded as bytes: network order.
    let src_port_be = ctx.load::<u16>(off)?;
    let dst_port_be = ctx.load::<u16>(off + 2)?;
    Ok(Some(Syn {
        src,
        dst,
        src_port_be,
        dst_port_be,
        family,
    }))
}
