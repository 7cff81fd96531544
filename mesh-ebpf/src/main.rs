//! Kernel programs of the mesh.
//!
//! Thin entry points only: the maps are in [`maps`], the logic per hook in
//! [`connect`], [`sockops`] and [`ingress`]; [`workload`] finds the enrolled
//! workload of a cgroup for all of them.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod connect;
#[cfg(target_arch = "bpf")]
mod ingress;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod sockops;
#[cfg(target_arch = "bpf")]
mod workload;

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        macros::{cgroup_skb, cgroup_sock_addr, sock_ops},
        programs::{SkBuffContext, SockAddrContext, SockOpsContext},
    };

    use crate::{connect, ingress, sockops};

    /// `cgroup/connect4`. Fails closed for an enrolled workload connecting to
    /// a mesh destination (the connect gets EPERM rather than bypassing the
    /// mesh); passes everything else.
    #[cgroup_sock_addr(connect4)]
    pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
        match connect::try_connect4(&ctx) {
            Ok(verdict) => verdict,
            Err(_) => connect::VERDICT_ON_ERROR,
        }
    }

    /// `cgroup/connect6`. Same failure mode as `mesh_connect4`.
    #[cgroup_sock_addr(connect6)]
    pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
        match connect::try_connect6(&ctx) {
            Ok(verdict) => verdict,
            Err(_) => connect::VERDICT_ON_ERROR,
        }
    }

    /// `sockops`. Fails open: sock_ops cannot refuse a connection; a failure
    /// is counted and the agent then refuses the connection it cannot place.
    #[sock_ops]
    pub fn mesh_sockops(ctx: SockOpsContext) -> u32 {
        match sockops::try_sockops(&ctx) {
            Ok(v) => v,
            Err(_) => sockops::VERDICT_ON_ERROR,
        }
    }

    /// `cgroup_skb/ingress`. Drops plaintext SYNs from outside the mesh to
    /// STRICT workloads. Fails open: a packet it cannot parse is not a
    /// recognisable connection attempt; it passes and is counted.
    #[cgroup_skb(ingress)]
    pub fn mesh_ingress(ctx: SkBuffContext) -> i32 {
        match ingress::try_ingress(&ctx) {
            Ok(verdict) => verdict,
            Err(_) => {
                crate::maps::count(mesh_common::counters::INGRESS_ERRORS);
                ingress::VERDICT_ON_ERROR
            }
        }
    }
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

/// GPL-compatible licence: required for the helpers these programs call.
#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

/// Host stub so `cargo clippy/test --workspace` can build this crate.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
