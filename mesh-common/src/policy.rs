//! Authorization policy in the kernel/user ABI (docs/CONTRACTS.md).
//!
//! Every map is keyed by a *generation* (`gen`). `AgentConfig::policy_gen` names the active
//! one; `0` means "no policy loaded" (everything is allowed). An update writes generation
//! `G+1` completely, flips `policy_gen` with one write, waits a grace period and deletes `G`:
//! at most two generations coexist, so the compiler may use at most half of each map
//! ([`budget`]).
//!
//! Identifiers (`set_id`, `class_id`, `op_id`, `str_id`) are generation-local and start at 1;
//! `0` means "none" where a field may be empty (e.g. `policy_str` of a default deny).

/// The source class of one workload (`mesh_pol_src`) key.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct PolSrcKey {
    pub gen: u32,
    /// The workload id of `mesh_workloads`/`mesh_dests` (never 0).
    pub workload_id: u32,
}
const _: () = assert!(core::mem::size_of::<PolSrcKey>() == 8);

/// Value of `mesh_pol_src`: the class of the workload's identity and addresses, per address
/// family (ipBlocks depend on the source address, so an IPv4 and an IPv6 connect of the same
/// workload may fall in different classes). Never 0.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct PolSrcValue {
    /// Class of connects from the workload's IPv4 address (or from no IPv4 address).
    pub class4: u32,
    /// Class of connects from the workload's IPv6 address (or from no IPv6 address).
    pub class6: u32,
}
const _: () = assert!(core::mem::size_of::<PolSrcValue>() == 8);

/// Key of `mesh_pol_dst`: a destination workload in one generation.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct PolDstKey {
    pub gen: u32,
    pub workload_id: u32,
}
const _: () = assert!(core::mem::size_of::<PolDstKey>() == 8);

/// Value of `mesh_pol_dst`: the policy set selecting the destination, and its PeerAuthentication.
/// An absent entry means no policy selects it (allowed) and it is STRICT.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct PolDstValue {
    /// Interned set id: equal policy lists with equal `httpPorts` share one. 0: no policy
    /// selects the destination (allowed); the entry only carries `flags`.
    pub set_id: u32,
    /// `POL_DST_F_*` bits.
    pub flags: u32,
}

/// The destination's effective PeerAuthentication mode is PERMISSIVE (absent: STRICT). The
/// agents derive `WORKLOAD_F_PERMISSIVE` of their local workloads from the active generation.
pub const POL_DST_F_PERMISSIVE: u32 = 1 << 0;
const _: () = assert!(core::mem::size_of::<PolDstValue>() == 8);

/// Key of `mesh_pol_l4`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct PolL4Key {
    pub gen: u32,
    pub set_id: u32,
    pub class_id: u32,
    /// Destination port, host order; 0 = every port without its own entry.
    pub port: u32,
}
const _: () = assert!(core::mem::size_of::<PolL4Key>() == 16);

/// Value of `mesh_pol_l4`: the L4 decision for (set, class, port).
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct PolL4Value {
    /// `POL_ALLOW`, `POL_DENY` or `POL_L7`. Anything else is treated as a deny.
    pub verdict: u32,
    /// `POL_F_*` bits.
    pub flags: u32,
    /// The deciding policy (`ns/name` in `mesh_pol_strs`), 0 if none (default deny: no
    /// ALLOW policy matched).
    pub policy_str: u32,
    /// Number of request-level clauses in `mesh_pol_l7` (indexes `0..l7_count`).
    pub l7_count: u32,
    /// With `POL_F_DRY_RUN_DENY`: the dry-run policy that would deny (0 if the would-be deny
    /// is the default deny of a dry-run ALLOW policy that matched nothing).
    pub dry_run_str: u32,
    /// With `POL_F_AUDIT`: the AUDIT policy that matched at L4.
    pub audit_str: u32,
}
const _: () = assert!(core::mem::size_of::<PolL4Value>() == 24);

/// Key of `mesh_pol_l7`: one request-level clause of an L4 entry.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct PolL7Key {
    pub gen: u32,
    pub set_id: u32,
    pub class_id: u32,
    /// The port of the L4 entry (host order, 0 = other ports).
    pub port: u32,
    /// `0..l7_count`, in evaluation order.
    pub index: u32,
}
const _: () = assert!(core::mem::size_of::<PolL7Key>() == 20);

/// Value of `mesh_pol_l7`: a clause matches a request when every operation term of
/// `op_id` matches (see [`PolOpValue`]); an empty term list matches every request.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct PolL7Value {
    /// `POL_ACTION_ALLOW`, `POL_ACTION_DENY` or `POL_ACTION_AUDIT`.
    pub action: u32,
    /// `POL_L7_F_*` bits.
    pub flags: u32,
    /// The policy the clause comes from.
    pub policy_str: u32,
    /// The operation (term list) in `mesh_pol_ops`.
    pub op_id: u32,
    /// Number of terms of `op_id` (indexes `0..op_count`).
    pub op_count: u32,
}
const _: () = assert!(core::mem::size_of::<PolL7Value>() == 20);

/// Key of `mesh_pol_ops`: one term of an operation.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct PolOpKey {
    pub gen: u32,
    pub op_id: u32,
    pub index: u32,
}
const _: () = assert!(core::mem::size_of::<PolOpKey>() == 12);

/// Value of `mesh_pol_ops`: `field` matched against the pattern `str_id` with `kind`.
///
/// Terms of one field are alternatives: a positive field (`METHOD`, `PATH`, `HOST`) matches
/// when any of its terms matches; a negative one (`NOT_*`) when none does. The operation
/// matches when every field present matches.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct PolOpValue {
    /// `POL_FIELD_*`.
    pub field: u32,
    /// `POL_MATCH_*`.
    pub kind: u32,
    /// The pattern (without `*`) in `mesh_pol_strs`; 0 for `POL_MATCH_PRESENCE`.
    pub str_id: u32,
}
const _: () = assert!(core::mem::size_of::<PolOpValue>() == 12);

/// Key of `mesh_pol_strs`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct PolStrKey {
    pub gen: u32,
    pub str_id: u32,
}
const _: () = assert!(core::mem::size_of::<PolStrKey>() == 8);

/// Longest string `mesh_pol_strs` holds.
pub const POL_STR_MAX: usize = 252;

/// Value of `mesh_pol_strs`: an interned string (policy `ns/name` or a pattern).
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct PolStrValue {
    /// Bytes used in `bytes` (at most [`POL_STR_MAX`]).
    pub len: u32,
    /// UTF-8, zero after `len`.
    pub bytes: [u8; POL_STR_MAX],
}
const _: () = assert!(core::mem::size_of::<PolStrValue>() == 256);

/// Verdict: allowed at L4 (the connection is carried).
pub const POL_ALLOW: u32 = 1;
/// Verdict: denied at L4 (connect() fails with EPERM).
pub const POL_DENY: u32 = 2;
/// Verdict: allowed at L4, decided per request by the destination's agent.
pub const POL_L7: u32 = 3;

/// Some non-dry-run ALLOW policy selects the destination.
pub const POL_F_HAS_ALLOW: u32 = 1 << 0;
/// Were dry-run policies enforced, the connection would be denied at L4 (`dry_run_str`).
pub const POL_F_DRY_RUN_DENY: u32 = 1 << 1;
/// An AUDIT policy matched at L4 (`audit_str`).
pub const POL_F_AUDIT: u32 = 1 << 2;
/// `POL_L7`: once no enforced DENY clause matches, the request is allowed (an ALLOW policy
/// matched at L4, or no ALLOW policy selects the destination); ALLOW clauses are not needed.
pub const POL_F_L4_ALLOWED: u32 = 1 << 3;
/// Were dry-run policies enforced, the decision would depend on the request: the agent
/// evaluates every clause (dry-run ones included) to report a would-be deny.
pub const POL_F_DRY_RUN_L7: u32 = 1 << 4;
/// With `POL_F_DRY_RUN_L7`: with dry-run policies enforced, the request is allowed once no
/// DENY clause matches (the counterpart of `POL_F_L4_ALLOWED`).
pub const POL_F_DRY_RUN_L4_ALLOWED: u32 = 1 << 5;
/// Some AUDIT clause in `mesh_pol_l7` may match per request.
pub const POL_F_AUDIT_L7: u32 = 1 << 6;

/// Clause action: allow.
pub const POL_ACTION_ALLOW: u32 = 1;
/// Clause action: deny.
pub const POL_ACTION_DENY: u32 = 2;
/// Clause action: audit (log only).
pub const POL_ACTION_AUDIT: u32 = 3;

/// The clause comes from a dry-run policy: only reported, never enforced.
pub const POL_L7_F_DRY_RUN: u32 = 1 << 0;

/// Request method.
pub const POL_FIELD_METHOD: u32 = 1;
/// Request method, negated.
pub const POL_FIELD_NOT_METHOD: u32 = 2;
/// Request path.
pub const POL_FIELD_PATH: u32 = 3;
/// Request path, negated.
pub const POL_FIELD_NOT_PATH: u32 = 4;
/// Request host (`Host` / `:authority`).
pub const POL_FIELD_HOST: u32 = 5;
/// Request host, negated.
pub const POL_FIELD_NOT_HOST: u32 = 6;
/// A request header (`when` `request.headers[<name>]` values): the pattern string is
/// `<lowercase name>:<pattern>` (header names have no `:`), also for presence.
pub const POL_FIELD_HEADER: u32 = 7;
/// A request header, negated (`notValues`).
pub const POL_FIELD_NOT_HEADER: u32 = 8;
/// The low bits of `PolOpValue::field` name the field; the high bits a group: terms of one
/// (field, group) are alternatives, groups are ANDed. Methods, paths and hosts use group 0;
/// each `when` condition of a rule has its own group (two conditions on one header must
/// both hold).
pub const POL_FIELD_MASK: u32 = 0xffff;
/// Shift of the group in `PolOpValue::field`.
pub const POL_FIELD_GROUP_SHIFT: u32 = 16;

/// Exact match.
pub const POL_MATCH_EXACT: u32 = 1;
/// Prefix match (`x*`).
pub const POL_MATCH_PREFIX: u32 = 2;
/// Suffix match (`*x`).
pub const POL_MATCH_SUFFIX: u32 = 3;
/// Presence (`*`): any non-empty value (for headers: the header is present).
pub const POL_MATCH_PRESENCE: u32 = 4;
/// A path template with `{*}`/`{**}` (Envoy's URI template match, as Istio uses it).
pub const POL_MATCH_TEMPLATE: u32 = 5;

/// Capacities (`max_entries`) of the policy maps. Two generations coexist during a swap:
/// one compile may use at most [`budget`] of each.
/// Data of a `mesh_pol_plain` key (an LPM trie): the generation, then a source address
/// (IPv4-mapped for IPv4, network order). The trie's `prefix_len` covers both: 32 bits of
/// generation plus the address prefix ([`PLAIN_GEN_BITS`]).
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct PolPlainData {
    pub gen: u32,
    pub addr_be: [u32; 4],
}
const _: () = assert!(core::mem::size_of::<PolPlainData>() == 20);

/// A `mesh_pol_plain` key as the kernel lays it out (`bpf_lpm_trie_key`): prefix length in
/// bits, then the data.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct PolPlainKey {
    pub prefix_len: u32,
    pub data: PolPlainData,
}
const _: () = assert!(core::mem::size_of::<PolPlainKey>() == 24);

/// Bits of a `mesh_pol_plain` prefix taken by the generation.
pub const PLAIN_GEN_BITS: u32 = 32;

/// Value of `mesh_pol_plain`: the source class of plaintext (no mTLS: no principal, no
/// namespace) from the addresses under the prefix. Plaintext accepted under PERMISSIVE is
/// authorized in the kernel with this class: its ipBlocks membership is that of the longest
/// matching block (prefixes nest or are disjoint), and each family has a default entry.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct PolPlainValue {
    pub class_id: u32,
}
const _: () = assert!(core::mem::size_of::<PolPlainValue>() == 4);

pub mod capacity {
    /// `mesh_pol_plain`: one entry per distinct ipBlock/`source.ip` block, plus two.
    pub const POL_PLAIN: u32 = 8_192;
    /// `mesh_pol_src`: one entry per workload of the mesh.
    pub const POL_SRC: u32 = 65_536;
    /// `mesh_pol_dst`: one entry per workload selected by some policy.
    pub const POL_DST: u32 = 65_536;
    /// `mesh_pol_l4`: (set, class, port) triples.
    pub const POL_L4: u32 = 131_072;
    /// `mesh_pol_l7`: request-level clauses.
    pub const POL_L7: u32 = 65_536;
    /// `mesh_pol_ops`: operation terms.
    pub const POL_OPS: u32 = 65_536;
    /// `mesh_pol_strs`: interned strings (256 bytes each): every policy's `ns/name` and
    /// every distinct pattern. 32 768 (16 384 a generation) so that 10 000 policies and
    /// their patterns fit; at 16 384 a bundle of 8 193 policies was refused.
    pub const POL_STRS: u32 = 32_768;
}

/// What one generation may use of a map of `capacity` entries.
#[inline(always)]
pub const fn budget(capacity: u32) -> u32 {
    capacity / 2
}
