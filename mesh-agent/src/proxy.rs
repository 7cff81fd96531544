//! The agent's proxies. [`outbound`] accepts the connections the kernel
//! captured from local pods and carries them to their original destination.

pub mod hbone;
pub mod outbound;

use std::net::{IpAddr, SocketAddr};

use mesh_common::{is_mapped_v4, mapped_v4, ConnKey, OrigDst, AF_INET};

/// An IP address as 4 network-order words, IPv4 mapped into IPv6.
pub fn ip_words(ip: IpAddr) -> [u32; 4] {
    match ip {
        IpAddr::V4(v4) => mapped_v4(u32::from_ne_bytes(v4.octets())),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => mapped_v4(u32::from_ne_bytes(v4.octets())),
            None => words_of(v6.octets()),
        },
    }
}

fn words_of(b: [u8; 16]) -> [u32; 4] {
    let w = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

/// The inverse of [`ip_words`]: mapped addresses come back as IPv4.
pub fn ip_from_words(w: [u32; 4]) -> IpAddr {
    if is_mapped_v4(&w) {
        IpAddr::from(w[3].to_ne_bytes())
    } else {
        let mut b = [0u8; 16];
        for (i, word) in w.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        }
        IpAddr::from(b)
    }
}

/// The key the kernel's sock_ops program wrote for a connection that the
/// agent accepted from `peer` on `local`.
pub fn conn_key(peer: SocketAddr, local: SocketAddr) -> ConnKey {
    ConnKey {
        src_addr_be: ip_words(peer.ip()),
        dst_addr_be: ip_words(local.ip()),
        src_port: u32::from(peer.port()),
        dst_port: u32::from(local.port()),
    }
}

/// The original destination as a socket address, in the family the
/// application used.
pub fn orig_dst_addr(orig: &OrigDst) -> SocketAddr {
    let ip = ip_from_words(orig.addr_be);
    let ip = match (orig.family, ip) {
        (AF_INET, ip) => ip,
        (_, IpAddr::V4(v4)) => IpAddr::V6(v4.to_ipv6_mapped()),
        (_, ip) => ip,
    };
    SocketAddr::new(ip, u16::from_be(orig.port_be))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_roundtrip_v4_and_v6() {
        for s in ["10.1.0.2", "fd00:1::2", "::1", "192.168.7.9"] {
            let ip: IpAddr = s.parse().unwrap();
            assert_eq!(ip_from_words(ip_words(ip)), ip, "{s}");
        }
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(ip_from_words(ip_words(mapped)), "10.0.0.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn conn_key_matches_kernel_layout() {
        let k = conn_key("10.1.0.2:40000".parse().unwrap(), "10.0.0.1:15001".parse().unwrap());
        assert_eq!(k.src_port, 40000);
        assert_eq!(k.dst_port, 15001);
        assert_eq!(k.src_addr_be[3].to_ne_bytes(), [10, 1, 0, 2]);
    }

    #[test]
    fn orig_dst_keeps_family_and_port() {
        let o = OrigDst {
            addr_be: ip_words("10.2.0.3".parse().unwrap()),
            port_be: 8080u16.to_be(),
            family: AF_INET,
            src_workload_id: 1,
            dst_workload_id: 2,
        };
        assert_eq!(orig_dst_addr(&o), "10.2.0.3:8080".parse().unwrap());
    }
}
