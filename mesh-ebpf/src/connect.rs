//! `cgroup/connect4` and `cgroup/connect6`: capture connects of enrolled
//! workloads to mesh destinations.
//!
//! A connect is captured when (1) it is TCP, (2) the calling task's cgroup or
//! one of its ancestors is in `mesh_workloads`, and (3) the destination
//! address is in `mesh_dests`. The original destination is saved under the
//! socket cookie and the destination rewritten to the agent's outbound
//! listener. Everything else passes untouched. A destination flagged `DEST_F_SERVICE` (a
//! service virtual IP) is captured the same way, with no destination workload: the agent
//! chooses the endpoint.
//!
//! The safe baseline comes first (`CONFIG_F_BASELINE`: the node has no verified
//! configuration): every TCP connect from the tree to a non-loopback address fails with EPERM,
//! enrolled or not, mesh destination or not (counted `connect_denied_baseline`).
//!
//! Before the rewrite (of a connect to a workload address, not a service VIP), L4 policy (`mesh_pol_*`, generation `AgentConfig::policy_gen`) is
//! checked when a generation is active: the destination's policy set (absent: no policy
//! selects it, allowed), the source workload's class for the connect's address family, then
//! the entry for (set, class, port) or else (set, class, 0). `POL_DENY` fails the connect
//! with EPERM at once (counted, `EVENT_L4_DENIED`); a dry-run deny is counted and reported
//! (`EVENT_L4_WOULD_DENY`) and the connect proceeds. A missing class or entry, or an unknown
//! verdict, is an inconsistency of the maps: denied (fail closed), counted as
//! `policy_lookup_errors`.

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    helpers::generated::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_socket_cookie,
    },
    programs::SockAddrContext,
};
use mesh_common::{
    counters as ctr, is_loopback, is_mapped_v4, mapped_v4,
    policy::{
        PolDstKey, PolL4Key, PolL4Value, PolSrcKey, POL_ALLOW, POL_DENY, POL_F_DRY_RUN_DENY, POL_L7,
    },
    AgentConfig, Event, IpKey, OrigDst, WorkloadValue, AF_INET, AF_INET6, CONFIG_F_BASELINE,
    CONFIG_F_IPV6, CONFIG_F_READY, DEST_F_SERVICE, EVENT_BASELINE_DENIED, EVENT_L4_DENIED,
    EVENT_L4_WOULD_DENY,
};

use crate::{
    maps::{count, emit, CONFIG, COOKIE_DST, DESTS, POL_DST, POL_L4, POL_SRC},
    workload,
};

/// Let the connect proceed (with or without a rewritten destination).
pub const VERDICT_ALLOW: i32 = 1;
/// Refuse the connect: the caller sees EPERM.
pub const VERDICT_REJECT: i32 = 0;
/// Errors only arise once a connect is known to need capture (enrolled
/// workload, mesh destination): refusing it keeps the traffic off the wire
/// instead of letting it bypass the mesh.
pub const VERDICT_ON_ERROR: i32 = VERDICT_REJECT;

const SOCK_STREAM: u32 = 1;

/// Why a captured connect could not be recorded.
pub enum CaptureError {
    /// The agent has not published its listener (or not for this family).
    NotReady,
    /// The cookie map refused the entry.
    MapFull,
    /// L4 policy, or the safe baseline, denies the connect (counted and reported already).
    PolicyDenied,
}

/// Sends an `EVENT_L4_*` record: the connecting workload, the destination workload and
/// address, the deciding policy string of generation `gen`.
#[inline(always)]
fn emit_policy_event(kind: u32, gen: u32, orig: &OrigDst, policy_str: u32) {
    let event = Event {
        kind,
        workload_id: orig.src_workload_id,
        src_addr_be: [0; 4],
        dst_addr_be: orig.addr_be,
        src_port_be: 0,
        dst_port_be: orig.port_be,
        family: u32::from(orig.family),
        peer_workload_id: orig.dst_workload_id,
        policy_str,
        policy_gen: gen,
        _reserved: 0,
    };
    emit(&event);
}

/// The L4 entry for (set, class, port), else (set, class, 0).
#[inline(always)]
pub fn l4_entry(gen: u32, set_id: u32, class_id: u32, port: u32) -> Option<PolL4Value> {
    let key = PolL4Key {
        gen,
        set_id,
        class_id,
        port,
    };
    // SAFETY: read-only lookup, value copied out.
    if let Some(v) = unsafe { POL_L4.get(key) } {
        return Some(*v);
    }
    let other = PolL4Key {
        gen,
        set_id,
        class_id,
        port: 0,
    };
    // SAFETY: as above.
    unsafe { POL_L4.get(other) }.copied()
}

/// Checks L4 policy for a captured connect (generation `gen`, never 0). `Ok` when allowed;
/// every deny is counted and reported here.
#[inline(always)]
fn check_policy(gen: u32, orig: &OrigDst) -> Result<(), CaptureError> {
    let dst_key = PolDstKey {
        gen,
        workload_id: orig.dst_workload_id,
    };
    // SAFETY: read-only lookup, value copied out.
    let Some(dst) = (unsafe { POL_DST.get(dst_key) }).copied() else {
        // No policy selects the destination.
        return Ok(());
    };
    if dst.set_id == 0 {
        // No policy selects it either: the entry only carries its PeerAuthentication flags.
        return Ok(());
    }
    let src_key = PolSrcKey {
        gen,
        workload_id: orig.src_workload_id,
    };
    // SAFETY: read-only lookup, value copied out.
    let Some(src) = (unsafe { POL_SRC.get(src_key) }).copied() else {
        count(ctr::POLICY_LOOKUP_ERRORS);
        emit_policy_event(EVENT_L4_DENIED, gen, orig, 0);
        return Err(CaptureError::PolicyDenied);
    };
    let class_id = if orig.family == AF_INET {
        src.class4
    } else {
        src.class6
    };
    let port = u32::from(u16::from_be(orig.port_be));
    let Some(entry) = l4_entry(gen, dst.set_id, class_id, port) else {
        count(ctr::POLICY_LOOKUP_ERRORS);
        emit_policy_event(EVENT_L4_DENIED, gen, orig, 0);
        return Err(CaptureError::PolicyDenied);
    };
    match entry.verdict {
        POL_DENY => {
            count(ctr::CONNECT_DENIED_POLICY);
            emit_policy_event(EVENT_L4_DENIED, gen, orig, entry.policy_str);
            Err(CaptureError::PolicyDenied)
        }
        POL_ALLOW | POL_L7 => {
            if entry.flags & POL_F_DRY_RUN_DENY != 0 {
                count(ctr::CONNECT_WOULD_DENY);
                emit_policy_event(EVENT_L4_WOULD_DENY, gen, orig, entry.dry_run_str);
            }
            Ok(())
        }
        _ => {
            count(ctr::POLICY_LOOKUP_ERRORS);
            emit_policy_event(EVENT_L4_DENIED, gen, orig, 0);
            Err(CaptureError::PolicyDenied)
        }
    }
}

/// The enrolled workload of the calling task (its cgroup or an ancestor).
#[inline(always)]
fn enrolled_workload() -> Option<WorkloadValue> {
    // SAFETY: helper with no arguments, valid in cgroup_sock_addr programs.
    let own = unsafe { bpf_get_current_cgroup_id() };
    workload::enrolled(own, |level| {
        // SAFETY: helper valid in cgroup_sock_addr programs; returns 0 past
        // the task's own level.
        unsafe { bpf_get_current_ancestor_cgroup_id(level) }
    })
}

/// The config slot as the agent wrote it (one lookup per hook run).
#[inline(always)]
pub fn slot() -> Option<AgentConfig> {
    CONFIG.get(0).copied()
}

/// Whether the safe baseline is on in `slot` (whether or not it is marked ready).
#[inline(always)]
pub fn baseline(slot: Option<AgentConfig>) -> bool {
    slot.is_some_and(|c| c.flags & CONFIG_F_BASELINE != 0)
}

/// The agent's published configuration in `slot`, if it is ready.
#[inline(always)]
pub fn ready(slot: Option<AgentConfig>) -> Option<AgentConfig> {
    slot.filter(|c| c.flags & CONFIG_F_READY != 0)
}

/// Common part of both hooks once the destination is known: decide and
/// record. Returns the redirect target (address, port) or `None` to pass.
#[inline(always)]
fn capture(
    ctx: &SockAddrContext,
    sock_type: u32,
    dst: [u32; 4],
    port_be: u16,
    family: u16,
) -> Result<Option<AgentConfig>, CaptureError> {
    if sock_type != SOCK_STREAM {
        count(ctr::CONNECT_PASSED_OTHER);
        return Ok(None);
    }
    let slot = slot();
    if baseline(slot) && !is_loopback(&dst) {
        count(ctr::CONNECT_DENIED_BASELINE);
        emit(&Event {
            kind: EVENT_BASELINE_DENIED,
            workload_id: 0,
            src_addr_be: [0; 4],
            dst_addr_be: dst,
            src_port_be: 0,
            dst_port_be: port_be,
            family: u32::from(family),
            peer_workload_id: 0,
            policy_str: 0,
            policy_gen: 0,
            _reserved: 0,
        });
        return Err(CaptureError::PolicyDenied);
    }
    let Some(workload) = enrolled_workload() else {
        count(ctr::CONNECT_PASSED_NOT_ENROLLED);
        return Ok(None);
    };
    // SAFETY: read-only lookup, value copied out.
    let Some(dest) = (unsafe { DESTS.get(IpKey { addr_be: dst }) }).copied() else {
        count(ctr::CONNECT_PASSED_NOT_MESH);
        return Ok(None);
    };
    let cfg = ready(slot).ok_or(CaptureError::NotReady)?;
    let service = dest.flags & DEST_F_SERVICE != 0;
    let orig = OrigDst {
        addr_be: dst,
        port_be,
        family,
        src_workload_id: workload.workload_id,
        // A service VIP: the agent chooses the endpoint workload (and its destination side
        // decides policy for it).
        dst_workload_id: if service { 0 } else { dest.workload_id },
    };
    if !service && cfg.policy_gen != 0 {
        check_policy(cfg.policy_gen, &orig)?;
    }
    // SAFETY: the context pointer is the program's own bpf_sock_addr.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    COOKIE_DST
        .insert(cookie, orig, 0)
        .map_err(|_| CaptureError::MapFull)?;
    Ok(Some(cfg))
}

pub fn try_connect4(ctx: &SockAddrContext) -> Result<i32, CaptureError> {
    let sa = ctx.sock_addr;
    // SAFETY: 4-byte reads of context fields the verifier allows for connect4.
    let (ip4, port, sock_type) = unsafe {
        (
            read_volatile(addr_of!((*sa).user_ip4)),
            read_volatile(addr_of!((*sa).user_port)),
            read_volatile(addr_of!((*sa).type_)),
        )
    };
    let port_be = port as u16;
    match capture(ctx, sock_type, mapped_v4(ip4), port_be, AF_INET) {
        Ok(None) => Ok(VERDICT_ALLOW),
        Ok(Some(cfg)) => {
            if ip4 == cfg.redirect_ip4_be && port == cfg.redirect_port_be {
                return Ok(VERDICT_ALLOW);
            }
            // SAFETY: 4-byte writes of context fields connect4 may rewrite.
            unsafe {
                write_volatile(addr_of_mut!((*sa).user_ip4), cfg.redirect_ip4_be);
                write_volatile(addr_of_mut!((*sa).user_port), cfg.redirect_port_be);
            }
            count(ctr::CONNECT_REDIRECTED);
            Ok(VERDICT_ALLOW)
        }
        Err(CaptureError::PolicyDenied) => Ok(VERDICT_REJECT),
        Err(e) => {
            count(ctr::CONNECT_ERRORS);
            Err(e)
        }
    }
}

pub fn try_connect6(ctx: &SockAddrContext) -> Result<i32, CaptureError> {
    let sa = ctx.sock_addr;
    // SAFETY: 4-byte reads of context fields the verifier allows for connect6.
    let (ip6, port, sock_type) = unsafe {
        (
            [
                read_volatile(addr_of!((*sa).user_ip6[0])),
                read_volatile(addr_of!((*sa).user_ip6[1])),
                read_volatile(addr_of!((*sa).user_ip6[2])),
                read_volatile(addr_of!((*sa).user_ip6[3])),
            ],
            read_volatile(addr_of!((*sa).user_port)),
            read_volatile(addr_of!((*sa).type_)),
        )
    };
    let mapped = is_mapped_v4(&ip6);
    let family = if mapped { AF_INET } else { AF_INET6 };
    match capture(ctx, sock_type, ip6, port as u16, family) {
        Ok(None) => Ok(VERDICT_ALLOW),
        Ok(Some(cfg)) => {
            let target = if mapped {
                mapped_v4(cfg.redirect_ip4_be)
            } else if cfg.flags & CONFIG_F_IPV6 != 0 {
                cfg.redirect_ip6_be
            } else {
                count(ctr::CONNECT_ERRORS);
                return Err(CaptureError::NotReady);
            };
            // SAFETY: 4-byte writes of context fields connect6 may rewrite.
            unsafe {
                write_volatile(addr_of_mut!((*sa).user_ip6[0]), target[0]);
                write_volatile(addr_of_mut!((*sa).user_ip6[1]), target[1]);
                write_volatile(addr_of_mut!((*sa).user_ip6[2]), target[2]);
                write_volatile(addr_of_mut!((*sa).user_ip6[3]), target[3]);
                write_volatile(addr_of_mut!((*sa).user_port), cfg.redirect_port_be);
            }
            count(ctr::CONNECT_REDIRECTED);
            Ok(VERDICT_ALLOW)
        }
        Err(CaptureError::PolicyDenied) => Ok(VERDICT_REJECT),
        Err(e) => {
            count(ctr::CONNECT_ERRORS);
            Err(e)
        }
    }
}
