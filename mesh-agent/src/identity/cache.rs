//! The agent's workload certificate cache and its rotation rule.
//!
//! A certificate is due for rotation from half-way through its usable lifetime
//! ([`WorkloadCert::rotation_due_at`], counted from when it was received, not from its
//! back-dated `notBefore`) and stays usable until it expires, so an authority that is
//! briefly unreachable costs nothing: the agent keeps serving with the current certificate and
//! retries. Every method that depends on time takes `now` (the injected clock), so the rules are
//! pure and tested without waiting.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use crate::tls::{SpiffeId, WorkloadCert};

/// Whether a certificate valid from `not_before` to `not_after` should be replaced at `now`.
/// A certificate whose validity period is empty or inverted is always due.
pub fn rotation_due(not_before: SystemTime, not_after: SystemTime, now: SystemTime) -> bool {
    match not_after.duration_since(not_before) {
        Ok(total) if !total.is_zero() => now >= not_before + total / 2,
        _ => true,
    }
}

/// Certificates of the node's workloads, one per identity.
#[derive(Debug, Default, Clone)]
pub struct CertCache {
    certs: HashMap<SpiffeId, WorkloadCert>,
}

impl CertCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores `cert` for its identity, returning the one it replaces. A certificate that
    /// expires earlier than the cached one is not stored (an out-of-order reply) and is
    /// returned instead.
    pub fn insert(&mut self, cert: WorkloadCert) -> Option<WorkloadCert> {
        match self.certs.get(cert.identity()) {
            Some(current) if current.not_after() > cert.not_after() => Some(cert),
            _ => self.certs.insert(cert.identity().clone(), cert),
        }
    }

    pub fn get(&self, id: &SpiffeId) -> Option<&WorkloadCert> {
        self.certs.get(id)
    }

    /// The certificate for `id` if it is valid at `now`.
    pub fn usable(&self, id: &SpiffeId, now: SystemTime) -> Option<&WorkloadCert> {
        self.certs
            .get(id)
            .filter(|c| c.not_before() <= now && !c.is_expired_at(now))
    }

    pub fn remove(&mut self, id: &SpiffeId) -> Option<WorkloadCert> {
        self.certs.remove(id)
    }

    /// Keeps only the identities still wanted (workloads that left the node are dropped).
    pub fn retain(&mut self, mut wanted: impl FnMut(&SpiffeId) -> bool) {
        self.certs.retain(|id, _| wanted(id));
    }

    /// Missing, or past half-life at `now`.
    pub fn needs_rotation(&self, id: &SpiffeId, now: SystemTime) -> bool {
        match self.certs.get(id) {
            None => true,
            Some(c) => now >= c.rotation_due_at() || c.not_after() <= c.not_before(),
        }
    }

    /// Which of the `wanted` identities need a (new) certificate at `now`, sorted.
    pub fn due<'a>(
        &self,
        wanted: impl IntoIterator<Item = &'a SpiffeId>,
        now: SystemTime,
    ) -> Vec<SpiffeId> {
        let mut due: Vec<SpiffeId> = wanted
            .into_iter()
            .filter(|id| self.needs_rotation(id, now))
            .cloned()
            .collect();
        due.sort();
        due.dedup();
        due
    }

    /// The earliest instant at which a cached certificate falls due (to sleep until).
    pub fn next_rotation(&self) -> Option<SystemTime> {
        self.certs.values().map(WorkloadCert::rotation_due_at).min()
    }

    /// Remaining lifetime per identity at `now` (zero once expired), sorted by identity: the
    /// certificate-expiry metric.
    pub fn expiries(&self, now: SystemTime) -> Vec<(SpiffeId, Duration)> {
        let mut out: Vec<_> = self
            .certs
            .iter()
            .map(|(id, c)| (id.clone(), c.remaining_at(now)))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    pub fn len(&self) -> usize {
        self.certs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.certs.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&SpiffeId, &WorkloadCert)> {
        self.certs.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authority::ca::tests::{td, wid, TempDir};
    use crate::authority::Authority;
    use crate::tls::spiffe::PeerId;

    const H: Duration = Duration::from_secs(3600);

    #[test]
    fn half_life_rule() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let t1 = t0 + 24 * H;
        assert!(!rotation_due(t0, t1, t0));
        assert!(!rotation_due(t0, t1, t0 + 12 * H - Duration::from_secs(1)));
        assert!(rotation_due(t0, t1, t0 + 12 * H));
        assert!(rotation_due(t0, t1, t1 + H));
        // A degenerate certificate is always due.
        assert!(rotation_due(t1, t0, t0));
    }

    #[test]
    fn short_lived_back_dated_certificates_are_not_due_on_arrival() {
        let dir = TempDir::new("cache-short");
        let ca = Authority::init(&dir.0, td()).unwrap();
        // 60 s asked, notBefore back-dated by 5 minutes: due after ~30 s, not at once.
        let c = ca
            .issue_workload_cert(&wid("default", "sa-a"), Duration::from_secs(60))
            .unwrap();
        let now = SystemTime::now();
        let mut cache = CertCache::new();
        cache.insert(c.clone());
        assert!(!cache.needs_rotation(c.identity(), now));
        assert!(!cache.needs_rotation(c.identity(), now + Duration::from_secs(25)));
        assert!(cache.needs_rotation(c.identity(), now + Duration::from_secs(31)));
    }

    #[test]
    fn cache_rotates_at_half_life_with_an_injected_clock() {
        let dir = TempDir::new("cache");
        let ca = Authority::init(&dir.0, td()).unwrap();
        let a = wid("default", "sa-a");
        let b = wid("default", "sa-b");
        let t0 = SystemTime::now();
        let issue = |sa: &str, from: SystemTime, life: Duration| {
            let (chain, key) = ca
                .issue_with_validity(&PeerId::Workload(wid("default", sa)), from, from + life)
                .unwrap();
            WorkloadCert::from_pem(&chain, &key).unwrap()
        };

        let mut cache = CertCache::new();
        assert!(cache.needs_rotation(&a, t0));
        assert_eq!(cache.due([&a, &b], t0), vec![a.clone(), b.clone()]);

        let ca1 = issue("sa-a", t0, 2 * H);
        let cb1 = issue("sa-b", t0, 4 * H);
        assert!(cache.insert(ca1.clone()).is_none());
        cache.insert(cb1.clone());
        assert_eq!(cache.len(), 2);
        assert!(cache
            .due([&a, &b], t0 + H - Duration::from_secs(1))
            .is_empty());
        assert_eq!(cache.due([&a, &b], t0 + H), vec![a.clone()]);
        assert_eq!(cache.due([&a, &b], t0 + 2 * H), vec![a.clone(), b.clone()]);
        let next = cache.next_rotation().unwrap();
        assert!(next >= t0 + H - Duration::from_secs(1) && next <= t0 + H);

        // Past half-life but not expired: still usable while the authority is away.
        assert!(cache.usable(&a, t0 + H + Duration::from_secs(60)).is_some());
        assert!(cache
            .usable(&a, t0 + 2 * H + Duration::from_secs(1))
            .is_none());

        // Expiry metric.
        let exp = cache.expiries(t0 + H);
        assert_eq!(exp.len(), 2);
        assert_eq!(exp[0].0, a);
        assert!(exp[0].1 <= H && exp[0].1 >= H - Duration::from_secs(1));
        assert_eq!(cache.expiries(t0 + 5 * H)[1].1, Duration::ZERO);

        // Rotation: the replacement is stored, an out-of-order older one is not.
        let ca2 = issue("sa-a", t0 + H, 2 * H);
        let replaced = cache.insert(ca2.clone()).unwrap();
        assert_eq!(replaced.serial(), ca1.serial());
        assert_eq!(cache.get(&a).unwrap().serial(), ca2.serial());
        let stale = cache.insert(ca1.clone()).unwrap();
        assert_eq!(stale.serial(), ca1.serial());
        assert_eq!(cache.get(&a).unwrap().serial(), ca2.serial());
        assert!(cache.due([&a], t0 + H + Duration::from_secs(60)).is_empty());

        // Workloads leaving the node.
        cache.retain(|id| id == &a);
        assert!(cache.get(&b).is_none());
        assert_eq!(cache.remove(&a).unwrap().serial(), ca2.serial());
        assert!(cache.is_empty());
    }
}
