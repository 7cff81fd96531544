//! Endpoint choice for connections to a service virtual IP: power of two choices on this
//! agent's count of active connections per endpoint workload.
//!
//! The counts live in a map by workload id (ids are the authority's, stable but sparse): a
//! connection costs a read lock and two atomic operations; an endpoint's counter is created on
//! its first connection and dropped with its last once the workload left the state.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering},
        Arc, RwLock,
    },
};

use crate::registry::{Registry, Service};

/// At most this many distinct endpoints are tried for one connection (each only when the
/// previous one failed before any byte of the client's was sent).
pub const MAX_ENDPOINT_TRIES: usize = 3;

/// Active connections per endpoint workload, and the choice among a service's endpoints.
pub struct Balancer {
    /// By workload id.
    active: RwLock<HashMap<u32, Arc<AtomicU32>>>,
    /// State of the choice's pseudo-random sequence (splitmix64).
    seed: AtomicU64,
}

/// One active connection to an endpoint: its count drops when this does.
pub struct EndpointGuard {
    count: Arc<AtomicU32>,
}

impl Drop for EndpointGuard {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Default for Balancer {
    fn default() -> Self {
        Self::new()
    }
}

impl Balancer {
    pub fn new() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x9e37_79b9, |d| d.as_nanos() as u64);
        Self {
            active: RwLock::new(HashMap::new()),
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

    /// The active connections this agent has to endpoint workload `id`.
    pub fn active(&self, id: u32) -> u32 {
        self.active
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .map_or(0, |c| c.load(Ordering::Relaxed))
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
    pub fn hold(&self, id: u32) -> EndpointGuard {
        let found = self
            .active
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned();
        let count = found.unwrap_or_else(|| {
            let mut map = self.active.write().unwrap_or_else(|p| p.into_inner());
            Arc::clone(map.entry(id).or_default())
        });
        count.fetch_add(1, Ordering::Relaxed);
        EndpointGuard { count }
    }

    /// Drops the counters of endpoints without connections that are not in `live`.
    pub fn retain(&self, live: impl Fn(u32) -> bool) {
        self.active
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|id, c| live(*id) || c.load(Ordering::Relaxed) > 0);
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
        let b = Balancer::new();
        let eps = [1, 2, 3];
        // Load 1 and 2 heavily: 3 is chosen whenever it is one of the two picks (2/3 of the
        // time for three endpoints), never less loaded ones skipped for it.
        let _held: Vec<_> = (0..10).flat_map(|_| [b.hold(1), b.hold(2)]).collect();
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
        let b = Balancer::new();
        let mut hits = [0usize; 3];
        for _ in 0..3000 {
            let id = b.choose(&[1, 2, 3], &[]).unwrap();
            hits[id as usize - 1] += 1;
        }
        for h in hits {
            assert!((800..=1200).contains(&h), "{hits:?}");
        }
        let g = b.hold(2);
        assert_eq!(b.active(2), 1);
        // Sparse ids are fine; a counter in use survives a retain that drops its workload.
        let far = b.hold(1_000_000);
        b.retain(|_| false);
        assert_eq!((b.active(2), b.active(1_000_000)), (1, 1));
        drop((g, far));
        assert_eq!(b.active(2), 0);
        b.retain(|_| false);
        assert!(b.active.read().unwrap().is_empty());
    }
}
