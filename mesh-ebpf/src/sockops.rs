//! `sockops`: when a captured connection is established on the client side,
//! move its original destination from the cookie key to the 4-tuple key the
//! agent can compute from its accepted socket.

use core::ptr::{addr_of, read_volatile};

use aya_ebpf::{
    bindings::BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, helpers::generated::bpf_get_socket_cookie,
    programs::SockOpsContext,
};
use mesh_common::{counters as ctr, mapped_v4, ConnKey, AF_INET as AF_INET16};

use crate::maps::{count, CONN_DST, COOKIE_DST};

/// sock_ops return value for "handled".
const SOCKOPS_OK: u32 = 1;
/// sock_ops cannot refuse a connection: on error it reports success and the
/// agent, finding no original destination, refuses the connection itself.
pub const VERDICT_ON_ERROR: u32 = SOCKOPS_OK;

const AF_INET: u32 = AF_INET16 as u32;

pub fn try_sockops(ctx: &SockOpsContext) -> Result<u32, i64> {
    if ctx.op() != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        return Ok(SOCKOPS_OK);
    }
    // SAFETY: the context pointer is the program's own bpf_sock_ops.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    // SAFETY: read-only lookup, value copied out.
    let Some(orig) = (unsafe { COOKIE_DST.get(cookie) }).copied() else {
        return Ok(SOCKOPS_OK);
    };
    let ops = ctx.ops;
    let (src, dst) = if ctx.family() == AF_INET {
        (mapped_v4(ctx.local_ip4()), mapped_v4(ctx.remote_ip4()))
    } else {
        // SAFETY: 4-byte reads at constant offsets of the program's own
        // context (the verifier refuses reads through a moved ctx pointer).
        unsafe {
            (
                [
                    read_volatile(addr_of!((*ops).local_ip6[0])),
                    read_volatile(addr_of!((*ops).local_ip6[1])),
                    read_volatile(addr_of!((*ops).local_ip6[2])),
                    read_volatile(addr_of!((*ops).local_ip6[3])),
                ],
                [
                    read_volatile(addr_of!((*ops).remote_ip6[0])),
                    read_volatile(addr_of!((*ops).remote_ip6[1])),
                    read_volatile(addr_of!((*ops).remote_ip6[2])),
                    read_volatile(addr_of!((*ops).remote_ip6[3])),
                ],
            )
        }
    };
    let key = ConnKey {
        src_addr_be: src,
        dst_addr_be: dst,
        src_port: ctx.local_port(),
        // remote_port holds the network-order port in its upper 16 bits.
        dst_port: u32::from_be(ctx.remote_port()),
    };
    let inserted = CONN_DST.insert(key, orig, 0);
    let _ = COOKIE_DST.remove(cookie);
    match inserted {
        Ok(()) => {
            count(ctr::SOCKOPS_TRACKED);
            Ok(SOCKOPS_OK)
        }
        Err(e) => {
            count(ctr::SOCKOPS_ERRORS);
            Err(e.into())
        }
    }
}
