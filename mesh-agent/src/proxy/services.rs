//! Endpoint choice for connections to a service virtual IP: power of two choices on this
//! agent's count of active connections per endpoint workload.
//!
//! The counts live in one fixed array indexed by workload id, allocated with the balancer: a
//! connection costs two atomic operations and no allocation.

use std::{
    net::{IpAddr, SocketAddr},
    sync::atomic::{AtomicU32, AtomicU64, Ordering},
};

use crate::registry::{Registry, Service};

/// At most this many distinct endpoints are tried for one connection (each only when the
/// previous one failed before any byte of the client's was sent).
pub const MAX_ENDPOINT_TRIES: usize = 3;

/// Active connections per endpoint workload, and the choice among a service's endpoints.
pub struct Balancer {
    /// Indexed by workload id − 1.
    active: Vec<AtomicU32>,
    /// State of the choice's pseudo-random sequence (splitmix64).
    seed: AtomicU64,
}

/// One active connection to an endpoint: its count drops when this does.
pub struct EndpointGuard<'a> {
    count: &'a AtomicU32,
}

impl Drop for EndpointGuard<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Balancer {
    /// A balancer for the `workloads` workloads of a registry.
    pub fn new(workloads: usize) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x9e37_79b9, |d| d.as_nanos() as u64);
        Self {
            active: (0..workloads).map(|_| AtomicU32::new(0)).collect(),
            seed: AtomicU64::new(seed),
        }
    }

    fn random(&self) -> u64 {
        // splitmix64 over an atomic counter: distinct values for concurrent callers.
        let mut z = self
            .seed
            .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
            .wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn count(&self, id: u32) -> Option<&AtomicU32> {
        self.active.get(usize::try_from(id).ok()?.checked_sub(1)?)
    }

    /// The active connections this agent has to endpoint workload `id`.
    pub fn active(&self, id: u32) -> u32 {
        self.count(id).map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Chooses an endpoint of `candidates` (workload ids), skipping those in `tried`: two at
    /// random, the one with fewer active connections. `None` when none is left.
    pub fn choose(&self, candidates: &[u32], tried: &[u32]) -> Option<u32> {
        let left = candidates.iter().filter(|id| !tried.contains(id)).count();
        if left == 0 {
            return None;
        }
        let nth = |n: usize| {
            candidates
                .iter()
                .copied()
                .filter(|id| !tried.contains(id))
                .nth(n)
        };
        let r = self.random();
        let a = nth((r % left as u64) as usize)?;
        if left == 1 {
            return Some(a);
        }
        // A second pick distinct from the first.
        let offset = 1 + ((r >> 32) % (left as u64 - 1)) as usize;
        let first = (r % left as u64) as usize;
        let b = nth((first + offset) % left)?;
        Some(if self.active(b) < self.active(a) {
            b
        } else {
            a
        })
    }

    /// Counts one active connection to endpoint `id` until the guard is dropped.
    pub fn hold(&self, id: u32) -> Option<EndpointGuard<'_>> {
        let count = self.count(id)?;
        count.fetch_add(1, Ordering::Relaxed);
        Some(EndpointGuard { count })
    }
}

/// Where a connection to endpoint workload `id` goes: its first address of the VIP's family
/// (else its first address), port `target_port`.
pub fn endpoint_addr(
    registry: &Registry,
    id: u32,
    vip: IpAddr,
    target_port: u16,
) -> Option<SocketAddr> {
    let w = registry.by_id(id)?;
    let v4 = vip.to_canonical().is_ipv4();
    let ip = w
        .ips
        .iter()
        .find(|ip| ip.is_ipv4() == v4)
        .or_else(|| w.ips.first())?;
    Some(SocketAddr::new(*ip, target_port))
}

/// The service of a VIP:port, and the target port, when `dst` is a declared service port.
pub fn lookup(registry: &Registry, dst: SocketAddr) -> Result<(&Service, u16), ServiceRefusal> {
    let service = registry
        .services
        .by_vip(dst.ip())
        .ok_or(ServiceRefusal::NotAService)?;
    let port = service
        .port(dst.port())
        .ok_or(ServiceRefusal::NotAServicePort)?;
    Ok((service, port.target_port))
}

/// Why a connection to a service address was refused before any endpoint was tried.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ServiceRefusal {
    #[error("the address is no service's virtual IP")]
    NotAService,
    #[error("the port is not a port of the service")]
    NotAServicePort,
    #[error("the service has no endpoint")]
    NoEndpoint,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choose_prefers_the_less_loaded_and_skips_tried() {
        let b = Balancer::new(4);
        let eps = [1, 2, 3];
        // Load 1 and 2 heavily: 3 is chosen whenever it is one of the two picks (2/3 of the
        // time for three endpoints), never less loaded ones skipped for it.
        let _held: Vec<_> = (0..10)
            .flat_map(|_| [b.hold(1).unwrap(), b.hold(2).unwrap()])
            .collect();
        let threes = (0..3000).filter(|_| b.choose(&eps, &[]) == Some(3)).count();
        assert!((1800..=2200).contains(&threes), "{threes}");
        // Tried endpoints are never chosen again; none left: None.
        for _ in 0..100 {
            assert_eq!(b.choose(&eps, &[3, 1]), Some(2));
        }
        assert_eq!(b.choose(&eps, &[1, 2, 3]), None);
        assert_eq!(b.choose(&[], &[]), None);
    }

    #[test]
    fn equal_loads_spread_evenly_and_guards_count() {
        let b = Balancer::new(3);
        let mut hits = [0usize; 3];
        for _ in 0..3000 {
            let id = b.choose(&[1, 2, 3], &[]).unwrap();
            hits[id as usize - 1] += 1;
        }
        for h in hits {
            assert!((800..=1200).contains(&h), "{hits:?}");
        }
        let g = b.hold(2).unwrap();
        assert_eq!(b.active(2), 1);
        drop(g);
        assert_eq!(b.active(2), 0);
        assert!(b.hold(0).is_none());
        assert!(b.hold(4).is_none());
    }
}
