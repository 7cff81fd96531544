//! Which enrolled workload a cgroup belongs to: shared by every hook that
//! needs it (`connect.rs` asks about the calling task, `ingress.rs` about the
//! receiving socket).

use mesh_common::{CgroupKey, WorkloadValue, MAX_CGROUP_LEVEL};

use crate::maps::WORKLOADS;

/// The enrolled workload of the cgroup `own`: `own` itself first, then its
/// ancestors from the deepest up. `ancestor(level)` returns the id of the
/// ancestor at absolute `level` (root = 0), or 0 past `own`'s own level.
#[inline(always)]
pub fn enrolled(own: u64, ancestor: impl Fn(i32) -> u64) -> Option<WorkloadValue> {
    // SAFETY: read-only lookup; the value is copied out at once.
    if let Some(w) = unsafe { WORKLOADS.get(CgroupKey { cgroup_id: own }) } {
        return Some(*w);
    }
    // Plain integers, not an Option: the verifier refuses spilling the
    // uninitialised payload of a `None`.
    let mut found = WorkloadValue {
        workload_id: 0,
        flags: 0,
    };
    let mut level: i32 = 1;
    while level <= MAX_CGROUP_LEVEL as i32 {
        let id = ancestor(level);
        if id == 0 || id == own {
            break;
        }
        // SAFETY: as above.
        if let Some(w) = unsafe { WORKLOADS.get(CgroupKey { cgroup_id: id }) } {
            found = *w;
        }
        level += 1;
    }
    if found.workload_id == 0 {
        None
    } else {
        Some(found)
    }
}
