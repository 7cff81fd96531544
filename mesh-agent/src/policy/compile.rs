//! `PolicyBundle` + `Registry` → the contents of one generation of the policy maps
//! (docs/CONTRACTS.md, issue 4), by partial evaluation.
//!
//! - The **policy set** of a destination workload is the sorted list of the AuthorizationPolicies
//!   that select it (its namespace's, with a matching selector or none, and the root
//!   namespace's, mesh-wide) together with its `httpPorts`; equal sets are interned
//!   (`set_id`). A workload no policy selects has set 0 (no `mesh_pol_dst` entry unless it is
//!   PERMISSIVE).
//! - The **source class** of a workload, per address family, is its principal
//!   (`<td>/ns/<ns>/sa/<sa>`), its namespace and whether its address of that family lies in
//!   each distinct ipBlock of the bundle; equal classes are interned (`class_id`). A workload
//!   without an address of a family gets the class with no address: it lies in no block (so
//!   `ipBlocks` never match and `notIpBlocks` always do).
//! - Every workload whose effective PeerAuthentication ([`permissive`]) is PERMISSIVE has
//!   `POL_DST_F_PERMISSIVE` in its `mesh_pol_dst` entry (with set 0 if no policy selects it):
//!   the generation carries everything the agents derive `WORKLOAD_F_PERMISSIVE` from, so a
//!   generation written by `mesh-agent policy apply` re-programs PeerAuthentication too.
//! - **Ports**: every port an operation of the set's policies names (`ports`, `notPorts`) and
//!   every HTTP port of the set gets its own entry; port 0 stands for all others (neither
//!   named nor HTTP).
//!
//! For every (set, class, port) each rule is decided as far as L4 allows: `from` is decided by
//! the class, `ports`/`notPorts` by the port. HTTP-only fields (methods, paths, hosts): on a
//! non-HTTP port an ALLOW operation using them never matches and a DENY (or AUDIT) one
//! matches ignoring them (Istio's fail-safe); on an HTTP port they are left to the request
//! (a *residual* operation, written as a clause of `mesh_pol_l7`).
//!
//! Verdict (enforced = not dry-run): a DENY matching at L4 → `POL_DENY`; else a DENY that may
//! match per request → `POL_L7`; else no ALLOW policy → `POL_ALLOW`; else an ALLOW matching at
//! L4 → `POL_ALLOW`; else an ALLOW that may match per request → `POL_L7`; else `POL_DENY`.
//! The same evaluation with dry-run policies enforced gives the dry-run flags.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use mesh_common::{
    names,
    policy::{
        budget, capacity, PolDstKey, PolDstValue, PolL4Key, PolL4Value, PolL7Key, PolL7Value,
        PolOpKey, PolOpValue, PolPlainData, PolPlainKey, PolPlainValue, PolSrcKey, PolSrcValue,
        PolStrKey, PolStrValue, PLAIN_GEN_BITS, POL_ACTION_ALLOW, POL_ACTION_AUDIT,
        POL_ACTION_DENY, POL_ALLOW, POL_DENY, POL_DST_F_PERMISSIVE, POL_FIELD_GROUP_SHIFT,
        POL_FIELD_HEADER, POL_FIELD_HOST, POL_FIELD_METHOD, POL_FIELD_NOT_HEADER,
        POL_FIELD_NOT_HOST, POL_FIELD_NOT_METHOD, POL_FIELD_NOT_PATH, POL_FIELD_PATH, POL_F_AUDIT,
        POL_F_AUDIT_L7, POL_F_DRY_RUN_DENY, POL_F_DRY_RUN_L4_ALLOWED, POL_F_DRY_RUN_L7,
        POL_F_HAS_ALLOW, POL_F_L4_ALLOWED, POL_L7, POL_L7_F_DRY_RUN, POL_MATCH_EXACT,
        POL_MATCH_PREFIX, POL_MATCH_PRESENCE, POL_MATCH_SUFFIX, POL_MATCH_TEMPLATE, POL_STR_MAX,
    },
};

use super::eval::{effective_port_mtls, Target};
use super::model::{
    Action, AuthorizationPolicy, Condition, IpNet, MtlsMode, Operation, PolicyBundle, Rule, Source,
    StringMatch, TrustDomains,
};
use crate::registry::{Registry, Workload};

/// Why a bundle could not be compiled. Nothing is written when compiling fails.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// One generation would not fit in a map (at most half of it: two generations coexist
    /// during a swap).
    #[error("policy map {map} would need {needed} entries; one generation may use {capacity}")]
    Capacity {
        map: &'static str,
        needed: usize,
        capacity: u32,
    },
    /// A `portLevelMtls` entry that changes whether plaintext is accepted on one port: the
    /// kernel's inbound check is per workload, so it cannot be enforced exactly (refused
    /// rather than dropped or widened).
    #[error(
        "PeerAuthentication {policy}: spec.portLevelMtls[{port}]: {port_mode:?} on workload \
         {workload} whose mode is {mode:?} is not supported: per-port modes are enforced only \
         where they agree with the workload's on accepting plaintext (STRICT vs \
         PERMISSIVE/DISABLE)"
    )]
    PortLevelMtls {
        policy: String,
        workload: String,
        port: u16,
        port_mode: MtlsMode,
        mode: MtlsMode,
    },
    /// A policy name or pattern longer than `mesh_pol_strs` holds.
    #[error("policy {policy}: value {value:?} is longer than {max} bytes")]
    StringTooLong {
        policy: String,
        value: String,
        max: usize,
    },
}

/// The contents of one generation of the policy maps. Keys carry `gen == 0`: the writer
/// ([`super::maps::PolicyMaps::apply`]) sets the generation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompiledPolicy {
    pub src: Vec<(PolSrcKey, PolSrcValue)>,
    pub dst: Vec<(PolDstKey, PolDstValue)>,
    pub l4: Vec<(PolL4Key, PolL4Value)>,
    pub l7: Vec<(PolL7Key, PolL7Value)>,
    pub ops: Vec<(PolOpKey, PolOpValue)>,
    pub strs: Vec<(PolStrKey, PolStrValue)>,
    /// Source class of plaintext per source prefix (`mesh_pol_plain`), generation 0 in the
    /// key data.
    pub plain: Vec<(PolPlainKey, PolPlainValue)>,
    /// AuthorizationPolicies in the bundle.
    pub policies: usize,
    /// Distinct policy sets.
    pub sets: usize,
    /// Distinct source classes.
    pub classes: usize,
}

impl CompiledPolicy {
    /// Entry counts per map, named, for logs and capacity checks.
    pub fn sizes(&self) -> [(&'static str, usize, u32); 7] {
        [
            (names::MAP_POL_PLAIN, self.plain.len(), capacity::POL_PLAIN),
            (names::MAP_POL_SRC, self.src.len(), capacity::POL_SRC),
            (names::MAP_POL_DST, self.dst.len(), capacity::POL_DST),
            (names::MAP_POL_L4, self.l4.len(), capacity::POL_L4),
            (names::MAP_POL_L7, self.l7.len(), capacity::POL_L7),
            (names::MAP_POL_OPS, self.ops.len(), capacity::POL_OPS),
            (names::MAP_POL_STRS, self.strs.len(), capacity::POL_STRS),
        ]
    }
}

/// Whether policy (or PeerAuthentication) in `namespace` with `selector` applies to `w`.
fn selects(
    namespace: &str,
    selector: Option<&BTreeMap<String, String>>,
    w: &Workload,
    root_ns: &str,
) -> bool {
    if namespace != root_ns && namespace != w.namespace {
        return false;
    }
    selector.is_none_or(|sel| sel.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
}

/// The workload's principal as policies name it: `<td>/ns/<ns>/sa/<sa>`.
pub fn principal(trust_domain: &str, w: &Workload) -> String {
    crate::tls::spiffe::workload_principal(trust_domain, &w.namespace, &w.service_account)
}

/// What the kernel knows of a source: identity and ipBlock membership of one address.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct ClassKey {
    principal: String,
    namespace: String,
    /// Membership in each block of [`Compiler::blocks`], in order.
    in_block: Vec<bool>,
    /// The address family (4 or 6) when some policy has a `destination.ip` condition (the
    /// destination's address then depends on it), else 0.
    family: u8,
}

/// A destination's policy set: the policies selecting it, its HTTP ports, and (for
/// `destination.ip`) its addresses' membership in each destination block, per family.
type SetKey = (Vec<usize>, Vec<u16>, Vec<bool>, Vec<bool>);

/// How far an operation, rule or policy is decided at L4.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    NoMatch,
    Match,
    /// Matches iff one of these request-level term lists matches.
    Residual(Vec<Vec<Term>>),
}

/// One request-level term: (field, kind, pattern).
type Term = (u32, u32, Option<String>);

/// The result of evaluating the L4 part of a set's policies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Decision {
    verdict: u32,
    /// The deciding policy (index into the sorted policies).
    policy: Option<usize>,
    /// `POL_L7`: allowed once no DENY clause matches.
    l4_allowed: bool,
}

struct Compiler<'a> {
    policies: Vec<&'a AuthorizationPolicy>,
    blocks: Vec<IpNet>,
    /// Distinct `destination.ip` blocks.
    dst_blocks: Vec<IpNet>,
    strings: BTreeMap<String, u32>,
    ops: HashMap<Vec<Term>, u32>,
    out: CompiledPolicy,
}

/// Compiles `bundle` for the workloads of `registry` (all of them: every node writes the same
/// maps). `root_ns` is the mesh-wide namespace (`istio-system`), `trust_domain` the one the
/// principals are in (no aliases: [`compile_with`]).
pub fn compile(
    bundle: &PolicyBundle,
    registry: &Registry,
    root_ns: &str,
    trust_domain: &str,
) -> Result<CompiledPolicy, CompileError> {
    compile_with(
        bundle,
        registry,
        root_ns,
        &TrustDomains::new(trust_domain, Vec::new()),
    )
}

/// [`compile`] with the mesh's trust domain and its aliases: principals are rewritten as
/// Istio rewrites them ([`PolicyBundle::for_trust_domains`]) before anything is decided.
pub fn compile_with(
    bundle: &PolicyBundle,
    registry: &Registry,
    root_ns: &str,
    trust_domains: &TrustDomains,
) -> Result<CompiledPolicy, CompileError> {
    let trust_domain = trust_domains.local.as_str();
    let rewritten = bundle.for_trust_domains(trust_domains);
    let bundle = &rewritten;
    let mut policies: Vec<&AuthorizationPolicy> = bundle.authz.iter().collect();
    policies.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let mut blocks: Vec<IpNet> = Vec::new();
    let mut dst_blocks: Vec<IpNet> = Vec::new();
    let add = |list: &mut Vec<IpNet>, b: &IpNet| {
        if !list.contains(b) {
            list.push(*b);
        }
    };
    for p in &policies {
        for r in p.rules.iter().flatten() {
            for s in &r.from {
                for b in s.ip_blocks.iter().chain(&s.not_ip_blocks) {
                    add(&mut blocks, b);
                }
            }
            for cond in &r.when {
                match cond {
                    Condition::SourceIp { values, not_values } => {
                        values
                            .iter()
                            .chain(not_values)
                            .for_each(|b| add(&mut blocks, b));
                    }
                    Condition::DestinationIp { values, not_values } => {
                        values
                            .iter()
                            .chain(not_values)
                            .for_each(|b| add(&mut dst_blocks, b));
                    }
                    _ => {}
                }
            }
        }
    }
    let by_family = !dst_blocks.is_empty();
    let mut c = Compiler {
        policies,
        blocks,
        dst_blocks,
        strings: BTreeMap::new(),
        ops: HashMap::new(),
        out: CompiledPolicy::default(),
    };
    c.out.policies = bundle.authz.len();
    // Policy names first: every policy gets a string even if it selects nothing.
    for i in 0..c.policies.len() {
        let key = c.policies[i].key();
        c.intern_str(&key, &key)?;
    }

    // Source classes of every workload, per family.
    let mut classes: BTreeMap<ClassKey, u32> = BTreeMap::new();
    for w in &registry.workloads {
        let principal = principal(trust_domain, w);
        let mut ids = [0u32; 2];
        for (slot, v4) in [(0, true), (1, false)] {
            let ip = w
                .ips
                .iter()
                .copied()
                .find(|ip| matches!(ip.to_canonical(), IpAddr::V4(_)) == v4);
            let key = ClassKey {
                principal: principal.clone(),
                namespace: w.namespace.clone(),
                in_block: c
                    .blocks
                    .iter()
                    .map(|b| ip.is_some_and(|ip| b.contains(ip)))
                    .collect(),
                family: match (by_family, v4) {
                    (false, _) => 0,
                    (true, true) => 4,
                    (true, false) => 6,
                },
            };
            let next = classes.len() as u32 + 1;
            ids[slot] = *classes.entry(key).or_insert(next);
        }
        c.out.src.push((
            PolSrcKey {
                gen: 0,
                workload_id: w.id,
            },
            PolSrcValue {
                class4: ids[0],
                class6: ids[1],
            },
        ));
    }
    // Plaintext (accepted under PERMISSIVE): no principal, no namespace; its ipBlocks
    // membership depends on the source address only. Prefixes nest or are disjoint, so the
    // longest block containing an address determines its membership in every block (those
    // that contain that block); an address in no block has none. One class per block and a
    // default per family, found in the kernel by longest-prefix match.
    for v4 in [true, false] {
        let family = match (by_family, v4) {
            (false, _) => 0,
            (true, true) => 4,
            (true, false) => 6,
        };
        let mut regions: Vec<Option<IpNet>> = vec![None];
        regions.extend(
            c.blocks
                .iter()
                .filter(|b| matches!(b.addr.to_canonical(), IpAddr::V4(_)) == v4)
                .map(|b| Some(*b)),
        );
        for region in regions {
            let key = ClassKey {
                principal: String::new(),
                namespace: String::new(),
                in_block: c
                    .blocks
                    .iter()
                    .map(|b| region.is_some_and(|r| net_within(&r, b)))
                    .collect(),
                family,
            };
            let next = classes.len() as u32 + 1;
            let class_id = *classes.entry(key).or_insert(next);
            let (prefix_len, addr_be) = plain_prefix(region, v4);
            c.out.plain.push((
                PolPlainKey {
                    prefix_len: PLAIN_GEN_BITS + prefix_len,
                    data: PolPlainData { gen: 0, addr_be },
                },
                PolPlainValue { class_id },
            ));
        }
    }
    let mut class_list: Vec<(&ClassKey, u32)> = classes.iter().map(|(k, v)| (k, *v)).collect();
    class_list.sort_by_key(|(_, id)| *id);
    c.out.classes = class_list.len();

    // Policy sets and PeerAuthentication of the destinations: an entry for every workload a
    // policy selects or that is PERMISSIVE (set 0: no policy, only the flag).
    let mut sets: BTreeMap<SetKey, u32> = BTreeMap::new();
    for w in &registry.workloads {
        let selected: Vec<usize> = (0..c.policies.len())
            .filter(|&i| {
                let p = c.policies[i];
                selects(&p.namespace, p.selector.as_ref(), w, root_ns)
            })
            .collect();
        let (mode, per_port) = effective_mtls_of(bundle, w, root_ns);
        if let Some((port, port_mode)) = per_port
            .iter()
            .find(|(_, m)| m.accepts_plaintext() != mode.accepts_plaintext())
        {
            let policy = workload_peer_authn(bundle, w, root_ns).unwrap_or_default();
            return Err(CompileError::PortLevelMtls {
                policy,
                workload: w.key(),
                port: *port,
                port_mode: *port_mode,
                mode,
            });
        }
        let flags = if mode.accepts_plaintext() {
            POL_DST_F_PERMISSIVE
        } else {
            0
        };
        let set_id = if selected.is_empty() {
            0
        } else {
            let next = sets.len() as u32 + 1;
            let member = |v4: bool| -> Vec<bool> {
                let ip = w
                    .ips
                    .iter()
                    .copied()
                    .find(|ip| matches!(ip.to_canonical(), IpAddr::V4(_)) == v4);
                c.dst_blocks
                    .iter()
                    .map(|b| ip.is_some_and(|ip| b.contains(ip)))
                    .collect()
            };
            *sets
                .entry((
                    selected,
                    w.http_ports().to_vec(),
                    member(true),
                    member(false),
                ))
                .or_insert(next)
        };
        if set_id == 0 && flags == 0 {
            continue;
        }
        c.out.dst.push((
            PolDstKey {
                gen: 0,
                workload_id: w.id,
            },
            PolDstValue { set_id, flags },
        ));
    }
    c.out.sets = sets.len();

    // Ports per set; the L4 entry count is known before anything is evaluated.
    /// (set id, member policies, HTTP ports, destination blocks per family, ports with an
    /// entry).
    type SetPlan<'s> = (u32, &'s [usize], &'s [u16], [&'s [bool]; 2], BTreeSet<u16>);
    let mut plan: Vec<SetPlan<'_>> = Vec::with_capacity(sets.len());
    for ((members, http_ports, dst4, dst6), set_id) in &sets {
        let mut ports: BTreeSet<u16> = http_ports.iter().copied().collect();
        for &i in members {
            for r in c.policies[i].rules.iter().flatten() {
                for op in &r.to {
                    ports.extend(op.ports.iter().chain(&op.not_ports).copied());
                }
                for cond in &r.when {
                    if let Condition::DestinationPort { values, not_values } = cond {
                        ports.extend(values.iter().chain(not_values).copied());
                    }
                }
            }
        }
        ports.insert(0);
        plan.push((*set_id, members, http_ports, [dst4, dst6], ports));
    }
    let l4_needed: usize = plan
        .iter()
        .map(|(_, _, _, _, p)| p.len() * class_list.len())
        .sum();
    if l4_needed > budget(capacity::POL_L4) as usize {
        return Err(CompileError::Capacity {
            map: names::MAP_POL_L4,
            needed: l4_needed,
            capacity: budget(capacity::POL_L4),
        });
    }
    for (set_id, members, http_ports, [dst4, dst6], ports) in &plan {
        for (class, class_id) in &class_list {
            // The destination's address of the class's family (`destination.ip`).
            let dst = if class.family == 6 { *dst6 } else { *dst4 };
            let at = At { class, dst };
            for &port in ports {
                let http = port != 0 && http_ports.contains(&port);
                c.entry(*set_id, members, at, *class_id, port, http)?;
            }
        }
    }

    for (map, needed, cap) in c.out.sizes() {
        if needed > budget(cap) as usize {
            return Err(CompileError::Capacity {
                map,
                needed,
                capacity: budget(cap),
            });
        }
    }
    Ok(c.out)
}

/// Whether block `inner` lies within block `outer` (same family, `outer` no longer, and
/// `outer` contains `inner`'s network address).
fn net_within(inner: &IpNet, outer: &IpNet) -> bool {
    let fam = |n: &IpNet| matches!(n.addr.to_canonical(), IpAddr::V4(_));
    fam(inner) == fam(outer) && outer.prefix <= inner.prefix && outer.contains(inner.addr)
}

/// The `mesh_pol_plain` prefix (bits of the 128-bit, IPv4-mapped address space) and address
/// words of `region`; `None` is the family's default: `::ffff:0:0/96` for IPv4, `::/0` for
/// IPv6 (the longer IPv4 default wins for mapped addresses).
pub fn plain_prefix(region: Option<IpNet>, v4: bool) -> (u32, [u32; 4]) {
    let (bits, addr) = match (region, v4) {
        (None, true) => (96, IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
        (None, false) => (0, IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)),
        (Some(n), _) => match n.addr.to_canonical() {
            IpAddr::V4(a) => (96 + u32::from(n.prefix), IpAddr::V4(a)),
            a => (u32::from(n.prefix), a),
        },
    };
    // The address with its host bits cleared, in the mapped 128-bit space.
    let v6 = match addr {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    };
    let mask = if bits == 0 {
        0
    } else {
        u128::MAX << (128 - bits)
    };
    let masked = std::net::Ipv6Addr::from(u128::from(v6) & mask);
    (bits, crate::proxy::ip_words(IpAddr::V6(masked)))
}

/// What an L4 entry is decided for: the source class and the destination's block
/// membership.
#[derive(Clone, Copy)]
struct At<'a> {
    class: &'a ClassKey,
    dst: &'a [bool],
}

impl Compiler<'_> {
    fn intern_str(&mut self, policy: &str, s: &str) -> Result<u32, CompileError> {
        if let Some(id) = self.strings.get(s) {
            return Ok(*id);
        }
        if s.len() > POL_STR_MAX {
            return Err(CompileError::StringTooLong {
                policy: policy.to_owned(),
                value: s.to_owned(),
                max: POL_STR_MAX,
            });
        }
        let id = self.strings.len() as u32 + 1;
        self.strings.insert(s.to_owned(), id);
        let mut bytes = [0u8; POL_STR_MAX];
        bytes[..s.len()].copy_from_slice(s.as_bytes());
        self.out.strs.push((
            PolStrKey { gen: 0, str_id: id },
            PolStrValue {
                len: s.len() as u32,
                bytes,
            },
        ));
        Ok(id)
    }

    fn policy_str(&self, i: usize) -> u32 {
        // Every policy name was interned first.
        self.strings
            .get(&self.policies[i].key())
            .copied()
            .unwrap_or(0)
    }

    fn intern_op(&mut self, policy: &str, terms: &[Term]) -> Result<(u32, u32), CompileError> {
        if let Some(id) = self.ops.get(terms) {
            return Ok((*id, terms.len() as u32));
        }
        let id = self.ops.len() as u32 + 1;
        for (index, (field, kind, pattern)) in terms.iter().enumerate() {
            let str_id = match pattern {
                Some(p) => self.intern_str(policy, p)?,
                None => 0,
            };
            self.out.ops.push((
                PolOpKey {
                    gen: 0,
                    op_id: id,
                    index: index as u32,
                },
                PolOpValue {
                    field: *field,
                    kind: *kind,
                    str_id,
                },
            ));
        }
        self.ops.insert(terms.to_vec(), id);
        Ok((id, terms.len() as u32))
    }

    /// Writes the L4 entry (and its clauses) for (set, class, port).
    fn entry(
        &mut self,
        set_id: u32,
        members: &[usize],
        at: At<'_>,
        class_id: u32,
        port: u16,
        http: bool,
    ) -> Result<(), CompileError> {
        let outcomes: Vec<(usize, Outcome)> = members
            .iter()
            .map(|&i| (i, self.policy_outcome(i, at, port, http)))
            .collect();
        let real = self.decide(&outcomes, false);
        let shadow = self.decide(&outcomes, true);
        let mut value = PolL4Value {
            verdict: real.verdict,
            flags: 0,
            policy_str: real.policy.map_or(0, |i| self.policy_str(i)),
            l7_count: 0,
            dry_run_str: 0,
            audit_str: 0,
        };
        if members
            .iter()
            .any(|&i| self.policies[i].action == Action::Allow && !self.policies[i].dry_run)
        {
            value.flags |= POL_F_HAS_ALLOW;
        }
        if real.verdict != POL_DENY {
            if shadow.verdict == POL_DENY {
                value.flags |= POL_F_DRY_RUN_DENY;
                let named = shadow.policy.or_else(|| {
                    members.iter().copied().find(|&i| {
                        self.policies[i].dry_run && self.policies[i].action == Action::Allow
                    })
                });
                value.dry_run_str = named.map_or(0, |i| self.policy_str(i));
            } else if shadow.verdict == POL_L7 {
                value.flags |= POL_F_DRY_RUN_L7;
                if shadow.l4_allowed {
                    value.flags |= POL_F_DRY_RUN_L4_ALLOWED;
                }
            }
            if real.verdict == POL_L7 && real.l4_allowed {
                value.flags |= POL_F_L4_ALLOWED;
            }
            for (i, o) in &outcomes {
                if self.policies[*i].action != Action::Audit {
                    continue;
                }
                match o {
                    Outcome::Match if value.flags & POL_F_AUDIT == 0 => {
                        value.flags |= POL_F_AUDIT;
                        value.audit_str = self.policy_str(*i);
                    }
                    Outcome::Residual(_) => value.flags |= POL_F_AUDIT_L7,
                    _ => {}
                }
            }
            let needs_clauses =
                real.verdict == POL_L7 || value.flags & (POL_F_DRY_RUN_L7 | POL_F_AUDIT_L7) != 0;
            if needs_clauses {
                value.l7_count = self.clauses(set_id, class_id, port, &outcomes)?;
            }
        }
        self.out.l4.push((
            PolL4Key {
                gen: 0,
                set_id,
                class_id,
                port: u32::from(port),
            },
            value,
        ));
        Ok(())
    }

    /// Writes every residual clause, DENY first, then ALLOW, then AUDIT; returns how many.
    fn clauses(
        &mut self,
        set_id: u32,
        class_id: u32,
        port: u16,
        outcomes: &[(usize, Outcome)],
    ) -> Result<u32, CompileError> {
        let mut index = 0u32;
        for (action, code) in [
            (Action::Deny, POL_ACTION_DENY),
            (Action::Allow, POL_ACTION_ALLOW),
            (Action::Audit, POL_ACTION_AUDIT),
        ] {
            for (i, o) in outcomes {
                let p = self.policies[*i];
                let Outcome::Residual(ops) = o else { continue };
                if p.action != action {
                    continue;
                }
                let key = p.key();
                let policy_str = self.policy_str(*i);
                for terms in ops {
                    let (op_id, op_count) = self.intern_op(&key, terms)?;
                    self.out.l7.push((
                        PolL7Key {
                            gen: 0,
                            set_id,
                            class_id,
                            port: u32::from(port),
                            index,
                        },
                        PolL7Value {
                            action: code,
                            flags: if p.dry_run { POL_L7_F_DRY_RUN } else { 0 },
                            policy_str,
                            op_id,
                            op_count,
                        },
                    ));
                    index += 1;
                }
            }
        }
        Ok(index)
    }

    /// The L4 decision over `outcomes`, with dry-run policies enforced iff `with_dry_run`.
    fn decide(&self, outcomes: &[(usize, Outcome)], with_dry_run: bool) -> Decision {
        let enforced = |i: usize, action: Action| {
            let p = self.policies[i];
            p.action == action && (with_dry_run || !p.dry_run)
        };
        let find = |action: Action, want_match: bool| {
            outcomes.iter().find_map(|(i, o)| {
                let hit = match o {
                    Outcome::Match => want_match,
                    Outcome::Residual(_) => !want_match,
                    Outcome::NoMatch => false,
                };
                (enforced(*i, action) && hit).then_some(*i)
            })
        };
        if let Some(i) = find(Action::Deny, true) {
            return Decision {
                verdict: POL_DENY,
                policy: Some(i),
                l4_allowed: false,
            };
        }
        let deny_l7 = find(Action::Deny, false).is_some();
        let has_allow = outcomes.iter().any(|(i, _)| enforced(*i, Action::Allow));
        let allowed = |policy: Option<usize>| Decision {
            verdict: if deny_l7 { POL_L7 } else { POL_ALLOW },
            policy,
            l4_allowed: true,
        };
        if !has_allow {
            return allowed(None);
        }
        if let Some(i) = find(Action::Allow, true) {
            return allowed(Some(i));
        }
        if find(Action::Allow, false).is_some() {
            return Decision {
                verdict: POL_L7,
                policy: None,
                l4_allowed: false,
            };
        }
        Decision {
            verdict: POL_DENY,
            policy: None,
            l4_allowed: false,
        }
    }

    /// Policy `i` at (class, port): rules are alternatives.
    fn policy_outcome(&self, i: usize, at: At<'_>, port: u16, http: bool) -> Outcome {
        let p = self.policies[i];
        let mut residual = Vec::new();
        for rule in p.rules.iter().flatten() {
            match self.rule_outcome(rule, p.action, at, port, http) {
                Outcome::Match => return Outcome::Match,
                Outcome::Residual(mut r) => residual.append(&mut r),
                Outcome::NoMatch => {}
            }
        }
        if residual.is_empty() {
            Outcome::NoMatch
        } else {
            Outcome::Residual(residual)
        }
    }

    /// One rule: `from` and the L4 `when` conditions decided by the class, the destination
    /// and the port; operations and HTTP-only conditions left to the request on an HTTP port.
    fn rule_outcome(
        &self,
        rule: &Rule,
        action: Action,
        at: At<'_>,
        port: u16,
        http: bool,
    ) -> Outcome {
        if !(rule.from.is_empty() || rule.from.iter().any(|s| self.source_matches(s, at.class))) {
            return Outcome::NoMatch;
        }
        if !rule.when.iter().all(|c| self.condition_l4(c, at, port)) {
            return Outcome::NoMatch;
        }
        // Istio's fail-safe drops a whole ALLOW rule with an HTTP-only field on a non-HTTP
        // port, even if another of its operations has none.
        if action == Action::Allow && !http && rule.has_http_fields() {
            return Outcome::NoMatch;
        }
        // HTTP-only conditions: terms of every residual operation (ignored off HTTP: DENY and
        // AUDIT rules match wider, as in Istio).
        let when_terms: Vec<Term> = if http {
            condition_terms(&rule.when)
        } else {
            Vec::new()
        };
        let finish = |terms: Vec<Term>| {
            if terms.is_empty() {
                Outcome::Match
            } else {
                Outcome::Residual(vec![terms])
            }
        };
        if rule.to.is_empty() {
            return finish(when_terms);
        }
        let mut residual = Vec::new();
        for op in &rule.to {
            match operation_outcome(op, action, port, http) {
                Outcome::Match if when_terms.is_empty() => return Outcome::Match,
                Outcome::Match => residual.push(when_terms.clone()),
                Outcome::Residual(r) => {
                    for mut terms in r {
                        terms.extend(when_terms.iter().cloned());
                        residual.push(terms);
                    }
                }
                Outcome::NoMatch => {}
            }
        }
        if residual.is_empty() {
            Outcome::NoMatch
        } else {
            Outcome::Residual(residual)
        }
    }

    /// A `when` condition as far as L4 decides it; HTTP-only ones hold here (they become
    /// request terms).
    fn condition_l4(&self, c: &Condition, at: At<'_>, port: u16) -> bool {
        let class = at.class;
        let strings = |pos: &[StringMatch], neg: &[StringMatch], v: &str| {
            (pos.is_empty() || pos.iter().any(|m| m.matches(v)))
                && !neg.iter().any(|m| m.matches(v))
        };
        match c {
            Condition::SourceIp { values, not_values } => {
                (values.is_empty() || self.in_blocks(values, class))
                    && !self.in_blocks(not_values, class)
            }
            Condition::DestinationIp { values, not_values } => {
                let within = |list: &[IpNet]| {
                    list.iter().any(|b| {
                        self.dst_blocks
                            .iter()
                            .position(|x| x == b)
                            .is_some_and(|pos| at.dst.get(pos).copied().unwrap_or(false))
                    })
                };
                (values.is_empty() || within(values)) && !within(not_values)
            }
            Condition::SourceNamespace { values, not_values } => {
                strings(values, not_values, &class.namespace)
            }
            Condition::SourcePrincipal { values, not_values } => {
                strings(values, not_values, &class.principal)
            }
            Condition::SourceServiceAccount { values, not_values } => {
                let hit =
                    |sa: &super::model::ServiceAccount| sa.matches_principal(&class.principal);
                (values.is_empty() || values.iter().any(hit)) && !not_values.iter().any(hit)
            }
            // Port 0 stands for every port no operation or condition names.
            Condition::DestinationPort { values, not_values } => {
                (values.is_empty() || (port != 0 && values.contains(&port)))
                    && !(port != 0 && not_values.contains(&port))
            }
            Condition::RequestHeader { .. } => true,
        }
    }

    /// Whether the class's address lies in one of `list` (blocks of [`Self::blocks`]).
    fn in_blocks(&self, list: &[IpNet], class: &ClassKey) -> bool {
        list.iter().any(|b| {
            self.blocks
                .iter()
                .position(|x| x == b)
                .is_some_and(|pos| class.in_block[pos])
        })
    }

    fn source_matches(&self, s: &Source, class: &ClassKey) -> bool {
        let any = |list: &[StringMatch], v: &str| list.iter().any(|m| m.matches(v));
        let sa = |list: &[super::model::ServiceAccount]| {
            list.iter().any(|sa| sa.matches_principal(&class.principal))
        };
        (s.principals.is_empty() || any(&s.principals, &class.principal))
            && !any(&s.not_principals, &class.principal)
            && (s.namespaces.is_empty() || any(&s.namespaces, &class.namespace))
            && !any(&s.not_namespaces, &class.namespace)
            && (s.ip_blocks.is_empty() || self.in_blocks(&s.ip_blocks, class))
            && !self.in_blocks(&s.not_ip_blocks, class)
            && (s.service_accounts.is_empty() || sa(&s.service_accounts))
            && !sa(&s.not_service_accounts)
            && {
                let td = super::model::principal_trust_domain(&class.principal);
                (s.trust_domains.is_empty() || any(&s.trust_domains, td))
                    && !any(&s.not_trust_domains, td)
            }
    }
}

/// The request-level terms of a rule's HTTP-only conditions: each condition its own group
/// (1, 2, …), its header name in every pattern (`name:pattern`).
fn condition_terms(when: &[Condition]) -> Vec<Term> {
    let mut terms = Vec::new();
    let mut group = 0u32;
    for c in when {
        let Condition::RequestHeader {
            name,
            values,
            not_values,
        } = c
        else {
            continue;
        };
        group += 1;
        for (list, field) in [
            (values, POL_FIELD_HEADER),
            (not_values, POL_FIELD_NOT_HEADER),
        ] {
            for m in list {
                let (kind, pattern) = match_kind(m);
                let field = field | (group << POL_FIELD_GROUP_SHIFT);
                terms.push((
                    field,
                    kind,
                    Some(format!("{name}:{}", pattern.unwrap_or_default())),
                ));
            }
        }
    }
    terms
}

/// `POL_MATCH_*` and the pattern string of a match.
fn match_kind(m: &StringMatch) -> (u32, Option<String>) {
    match m {
        StringMatch::Exact(s) => (POL_MATCH_EXACT, Some(s.clone())),
        StringMatch::Prefix(s) => (POL_MATCH_PREFIX, Some(s.clone())),
        StringMatch::Suffix(s) => (POL_MATCH_SUFFIX, Some(s.clone())),
        StringMatch::Presence => (POL_MATCH_PRESENCE, None),
        StringMatch::Template(s) => (POL_MATCH_TEMPLATE, Some(s.clone())),
    }
}

/// An operation at `port` (0: a port no operation names, not HTTP); `http`: the destination
/// speaks HTTP there.
fn operation_outcome(op: &Operation, action: Action, port: u16, http: bool) -> Outcome {
    if !op.ports.is_empty() && (port == 0 || !op.ports.contains(&port)) {
        return Outcome::NoMatch;
    }
    if port != 0 && op.not_ports.contains(&port) {
        return Outcome::NoMatch;
    }
    if !op.has_http_fields() {
        return Outcome::Match;
    }
    if !http {
        // Istio's fail-safe for HTTP-only fields on a non-HTTP port.
        return match action {
            Action::Allow => Outcome::NoMatch,
            Action::Deny | Action::Audit => Outcome::Match,
        };
    }
    let mut terms: Vec<Term> = Vec::new();
    for (list, field) in [
        (&op.methods, POL_FIELD_METHOD),
        (&op.not_methods, POL_FIELD_NOT_METHOD),
        (&op.paths, POL_FIELD_PATH),
        (&op.not_paths, POL_FIELD_NOT_PATH),
        (&op.hosts, POL_FIELD_HOST),
        (&op.not_hosts, POL_FIELD_NOT_HOST),
    ] {
        for m in list {
            let (kind, pattern) = match_kind(m);
            terms.push((field, kind, pattern));
        }
    }
    Outcome::Residual(vec![terms])
}

/// Whether `w` accepts plaintext from outside the mesh (`WORKLOAD_F_PERMISSIVE`): its
/// effective PeerAuthentication ([`effective_port_mtls`], the registry's
/// `peerAuthentication` as the default) is PERMISSIVE or DISABLE.
pub fn permissive(bundle: &PolicyBundle, w: &Workload, root_ns: &str) -> bool {
    effective_mtls_of(bundle, w, root_ns).0.accepts_plaintext()
}

/// `namespace/name` of the workload-level PeerAuthentication of `w` (the one whose
/// `portLevelMtls` applies), as [`effective_port_mtls`] picks it.
fn workload_peer_authn(bundle: &PolicyBundle, w: &Workload, root_ns: &str) -> Option<String> {
    bundle
        .peer_authn
        .iter()
        .filter(|p| {
            p.namespace != root_ns
                && p.namespace == w.namespace
                && p.selector.as_ref().is_some_and(|s| {
                    !s.is_empty() && s.iter().all(|(k, v)| w.labels.get(k) == Some(v))
                })
        })
        .min_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)))
        .map(|p| format!("{}/{}", p.namespace, p.name))
}

/// The effective PeerAuthentication of `w` (workload mode, per-port modes).
pub fn effective_mtls_of(
    bundle: &PolicyBundle,
    w: &Workload,
    root_ns: &str,
) -> (MtlsMode, BTreeMap<u16, MtlsMode>) {
    let target = Target {
        namespace: &w.namespace,
        labels: &w.labels,
    };
    let default = w.permissive.then_some(MtlsMode::Permissive);
    effective_port_mtls(bundle, root_ns, target, default)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::{Path, PathBuf};

    use mesh_common::policy::POL_STR_MAX;

    use super::*;
    use crate::policy::model::{Origin, PeerAuthentication, Rule};

    const TD: &str = "cluster.local";
    const ROOT: &str = "istio-system";

    pub(crate) fn registry() -> Registry {
        let text = "nodes:\n  - name: n1\n    address: 10.0.0.1\n\
            workloads:\n\
            \x20 - {name: a1, namespace: default, serviceAccount: sa-a, node: n1, ips: [\"10.1.0.2\", \"fd00:1::2\"], labels: {app: a}}\n\
            \x20 - {name: a2, namespace: default, serviceAccount: sa-a, node: n1, ips: [\"10.1.0.3\"], labels: {app: a}}\n\
            \x20 - {name: b1, namespace: default, serviceAccount: sa-b, node: n1, ips: [\"10.2.0.2\"], labels: {app: b}, httpPorts: [8080]}\n\
            \x20 - {name: b2, namespace: default, serviceAccount: sa-b, node: n1, ips: [\"10.2.0.3\"], labels: {app: b}}\n\
            \x20 - {name: c1, namespace: other, serviceAccount: sa-c, node: n1, ips: [\"10.3.0.2\"], labels: {app: c}}\n";
        Registry::parse_all(text, Path::new("registry.yaml")).unwrap()
    }

    pub(crate) fn policy(
        ns: &str,
        name: &str,
        app: Option<&str>,
        action: Action,
        rules: Option<Vec<Rule>>,
    ) -> AuthorizationPolicy {
        AuthorizationPolicy {
            namespace: ns.into(),
            name: name.into(),
            origin: Origin {
                file: PathBuf::from("p.yaml"),
                line: 1,
            },
            selector: app.map(|a| BTreeMap::from([("app".to_owned(), a.to_owned())])),
            action,
            rules,
            dry_run: false,
        }
    }

    pub(crate) fn from_principal(p: &str) -> Source {
        Source {
            principals: vec![StringMatch::from_pattern(p)],
            ..Source::default()
        }
    }

    pub(crate) fn to_ports(ports: &[u16]) -> Operation {
        Operation {
            ports: ports.to_vec(),
            ..Operation::default()
        }
    }

    fn bundle(authz: Vec<AuthorizationPolicy>) -> PolicyBundle {
        PolicyBundle {
            authz,
            peer_authn: vec![],
        }
    }

    /// The L4 entry the kernel would use for src → dst at `port` (v4).
    fn lookup(c: &CompiledPolicy, src: u32, dst: u32, port: u16) -> Option<PolL4Value> {
        let set = c.dst.iter().find(|(k, _)| k.workload_id == dst)?.1.set_id;
        let class = c.src.iter().find(|(k, _)| k.workload_id == src)?.1.class4;
        let get = |port: u32| {
            c.l4.iter()
                .find(|(k, _)| k.set_id == set && k.class_id == class && k.port == port)
                .map(|(_, v)| *v)
        };
        get(u32::from(port)).or_else(|| get(0))
    }

    fn str_of(c: &CompiledPolicy, id: u32) -> String {
        c.strs
            .iter()
            .find(|(k, _)| k.str_id == id)
            .map(|(_, v)| String::from_utf8_lossy(&v.bytes[..v.len as usize]).into_owned())
            .unwrap_or_default()
    }

    // Workload ids: a1 1, a2 2, b1 3, b2 4, c1 5.

    #[test]
    fn no_policy_no_destination_entries() {
        let c = compile(&PolicyBundle::default(), &registry(), ROOT, TD).unwrap();
        assert!(c.dst.is_empty() && c.l4.is_empty());
        assert_eq!(c.src.len(), 5);
    }

    #[test]
    fn deny_at_l4_names_the_policy() {
        let deny = policy(
            "default",
            "deny-a",
            Some("b"),
            Action::Deny,
            Some(vec![Rule {
                from: vec![from_principal("cluster.local/ns/default/sa/sa-a")],
                to: vec![to_ports(&[9090])],
                when: vec![],
            }]),
        );
        let c = compile(&bundle(vec![deny]), &registry(), ROOT, TD).unwrap();
        let v = lookup(&c, 1, 4, 9090).unwrap();
        assert_eq!(v.verdict, POL_DENY);
        assert_eq!(str_of(&c, v.policy_str), "default/deny-a");
        assert_eq!(lookup(&c, 1, 4, 9091).unwrap().verdict, POL_ALLOW);
        assert_eq!(lookup(&c, 5, 4, 9090).unwrap().verdict, POL_ALLOW);
        // a is not selected: no entry.
        assert!(lookup(&c, 4, 1, 9090).is_none());
    }

    #[test]
    fn sets_and_classes_are_interned() {
        let allow = policy(
            "default",
            "allow-b",
            Some("b"),
            Action::Allow,
            Some(vec![Rule::default()]),
        );
        let mesh = policy(
            ROOT,
            "mesh",
            None,
            Action::Audit,
            Some(vec![Rule::default()]),
        );
        let c = compile(&bundle(vec![allow, mesh]), &registry(), ROOT, TD).unwrap();
        let set = |id: u32| {
            c.dst
                .iter()
                .find(|(k, _)| k.workload_id == id)
                .unwrap()
                .1
                .set_id
        };
        // a1, a2 share {mesh}; c1 too (root namespace, mesh-wide).
        assert_eq!(set(1), set(2));
        assert_eq!(set(1), set(5));
        // b1 and b2 have the same policies but different httpPorts.
        assert_ne!(set(3), set(4));
        assert_ne!(set(1), set(4));
        assert_eq!(c.sets, 3);
        // a1 and a2 share principal, namespace and (no blocks) membership.
        let src = |id: u32| c.src.iter().find(|(k, _)| k.workload_id == id).unwrap().1;
        assert_eq!(src(1), src(2));
        assert_ne!(src(1), src(3));
        assert_eq!(src(3), src(4));
        // Three workload classes and plaintext's (no blocks: one class for both families).
        assert_eq!(c.classes, 4);
        assert_eq!(c.plain.len(), 2, "a default per family: {:?}", c.plain);
    }

    #[test]
    fn plaintext_classes_follow_the_longest_block() {
        let from = |nets: &[&str]| Source {
            ip_blocks: nets
                .iter()
                .map(|n| crate::policy::parse::parse_cidr(n).unwrap())
                .collect(),
            ..Source::default()
        };
        let rule = |nets: &[&str]| {
            Some(vec![Rule {
                from: vec![from(nets)],
                to: vec![],
                when: vec![],
            }])
        };
        // Allows 10.0.0.0/8 except (a DENY) 10.9.0.0/16, and the IPv6 fd00:7::/32.
        let allow = policy(
            "default",
            "allow-net",
            Some("b"),
            Action::Allow,
            rule(&["10.0.0.0/8", "fd00:7::/32"]),
        );
        let deny = policy(
            "default",
            "deny-sub",
            Some("b"),
            Action::Deny,
            rule(&["10.9.0.0/16"]),
        );
        let r = registry();
        let c = compile(&bundle(vec![allow, deny]), &r, ROOT, TD).unwrap();
        let view = crate::policy::PolicyView::from_compiled(1, &c).unwrap();
        let b2 = r.workloads.iter().find(|w| w.name == "b2").unwrap().id;
        let decide = |ip: &str| {
            view.decide_plaintext(ip.parse().unwrap(), b2, 9000).verdict
                == crate::policy::ConnVerdict::Allow
        };
        assert!(decide("10.1.2.3"), "inside the allowed block");
        assert!(!decide("10.9.1.1"), "inside the denied sub-block");
        assert!(!decide("192.168.1.1"), "outside every block");
        assert!(
            !decide("::ffff:10.9.1.1"),
            "mapped form of a denied address"
        );
        assert!(
            decide("::ffff:10.1.2.3"),
            "mapped form of an allowed address"
        );
        assert!(decide("fd00:7::1"), "IPv6 inside its block");
        assert!(!decide("fd00:8::1"), "IPv6 outside every block");
        // A workload no policy selects: plaintext passes.
        let c1 = r.workloads.iter().find(|w| w.name == "c1").unwrap().id;
        assert_eq!(
            view.decide_plaintext("192.168.1.1".parse().unwrap(), c1, 9000)
                .verdict,
            crate::policy::ConnVerdict::Allow
        );
    }

    #[test]
    fn ip_blocks_split_classes_per_family() {
        let allow = policy(
            "default",
            "allow-net",
            Some("b"),
            Action::Allow,
            Some(vec![Rule {
                from: vec![Source {
                    ip_blocks: vec![IpNet {
                        addr: "10.1.0.2".parse().unwrap(),
                        prefix: 32,
                    }],
                    ..Source::default()
                }],
                to: vec![],
                when: vec![],
            }]),
        );
        let c = compile(&bundle(vec![allow]), &registry(), ROOT, TD).unwrap();
        let src = |id: u32| c.src.iter().find(|(k, _)| k.workload_id == id).unwrap().1;
        assert_ne!(src(1).class4, src(2).class4);
        // a1's IPv6 address and a2's missing IPv6 address: in no block, same class.
        assert_eq!(src(1).class6, src(2).class6);
        assert_eq!(lookup(&c, 1, 4, 80).unwrap().verdict, POL_ALLOW);
        assert_eq!(lookup(&c, 2, 4, 80).unwrap().verdict, POL_DENY);
        let v6 =
            c.l4.iter()
                .find(|(k, _)| k.class_id == src(1).class6)
                .unwrap()
                .1;
        assert_eq!(v6.verdict, POL_DENY);
        assert_eq!(v6.flags & POL_F_HAS_ALLOW, POL_F_HAS_ALLOW);
        assert_eq!(v6.policy_str, 0);
    }

    #[test]
    fn allow_only_listed_principal_and_port() {
        let allow = policy(
            "default",
            "allow-a",
            Some("b"),
            Action::Allow,
            Some(vec![Rule {
                from: vec![from_principal("cluster.local/ns/default/sa/sa-a")],
                to: vec![to_ports(&[8080])],
                when: vec![],
            }]),
        );
        let c = compile(&bundle(vec![allow]), &registry(), ROOT, TD).unwrap();
        let v = lookup(&c, 1, 4, 8080).unwrap();
        assert_eq!(
            (v.verdict, str_of(&c, v.policy_str).as_str()),
            (POL_ALLOW, "default/allow-a")
        );
        assert_eq!(lookup(&c, 1, 4, 8081).unwrap().verdict, POL_DENY);
        assert_eq!(lookup(&c, 5, 4, 8080).unwrap().verdict, POL_DENY);
        // Ports mentioned get entries, plus 0.
        let ports: BTreeSet<u32> = c.l4.iter().map(|(k, _)| k.port).collect();
        assert_eq!(ports, BTreeSet::from([0, 8080]));
    }

    #[test]
    fn empty_rules_allow_nothing_and_empty_rule_allows_all() {
        let nothing = policy("other", "allow-nothing", None, Action::Allow, None);
        let c = compile(&bundle(vec![nothing]), &registry(), ROOT, TD).unwrap();
        assert_eq!(lookup(&c, 1, 5, 80).unwrap().verdict, POL_DENY);
        let all = policy(
            "other",
            "allow-all",
            None,
            Action::Allow,
            Some(vec![Rule::default()]),
        );
        let c = compile(&bundle(vec![all]), &registry(), ROOT, TD).unwrap();
        assert_eq!(lookup(&c, 1, 5, 80).unwrap().verdict, POL_ALLOW);
        let deny_none = policy("other", "deny-none", None, Action::Deny, Some(vec![]));
        let c = compile(&bundle(vec![deny_none]), &registry(), ROOT, TD).unwrap();
        assert_eq!(lookup(&c, 1, 5, 80).unwrap().verdict, POL_ALLOW);
    }

    fn get_only() -> Operation {
        Operation {
            methods: vec![StringMatch::Exact("GET".into())],
            paths: vec![StringMatch::from_pattern("/api/*")],
            ..Operation::default()
        }
    }

    #[test]
    fn http_fields_per_port_kind() {
        // b1 speaks HTTP on 8080, b2 nowhere.
        let allow = policy(
            "default",
            "allow-get",
            Some("b"),
            Action::Allow,
            Some(vec![Rule {
                from: vec![],
                to: vec![get_only()],
                when: vec![],
            }]),
        );
        let c = compile(&bundle(vec![allow.clone()]), &registry(), ROOT, TD).unwrap();
        let v = lookup(&c, 1, 3, 8080).unwrap();
        assert_eq!(v.verdict, POL_L7);
        assert_eq!(v.flags & POL_F_L4_ALLOWED, 0);
        assert_eq!(v.l7_count, 1);
        let (_, clause) = c.l7.iter().find(|(k, _)| k.port == 8080).unwrap();
        assert_eq!(clause.action, POL_ACTION_ALLOW);
        assert_eq!(clause.op_count, 2);
        let terms: Vec<PolOpValue> = c
            .ops
            .iter()
            .filter(|(k, _)| k.op_id == clause.op_id)
            .map(|(_, v)| *v)
            .collect();
        assert_eq!(terms[0].field, POL_FIELD_METHOD);
        assert_eq!(str_of(&c, terms[0].str_id), "GET");
        assert_eq!(
            (terms[1].field, terms[1].kind),
            (POL_FIELD_PATH, POL_MATCH_PREFIX)
        );
        assert_eq!(str_of(&c, terms[1].str_id), "/api/");
        // Non-HTTP port of b1, and b2 entirely: the ALLOW never matches.
        assert_eq!(lookup(&c, 1, 3, 9000).unwrap().verdict, POL_DENY);
        assert_eq!(lookup(&c, 1, 4, 8080).unwrap().verdict, POL_DENY);

        // The same as DENY: on non-HTTP ports it matches ignoring the HTTP fields.
        let mut deny = allow;
        deny.action = Action::Deny;
        deny.name = "deny-get".into();
        let c = compile(&bundle(vec![deny]), &registry(), ROOT, TD).unwrap();
        let v = lookup(&c, 1, 3, 8080).unwrap();
        assert_eq!(v.verdict, POL_L7);
        assert_eq!(v.flags & POL_F_L4_ALLOWED, POL_F_L4_ALLOWED);
        assert_eq!(lookup(&c, 1, 3, 9000).unwrap().verdict, POL_DENY);
        assert_eq!(lookup(&c, 1, 4, 8080).unwrap().verdict, POL_DENY);
    }

    #[test]
    fn allow_rule_with_http_fields_never_matches_tcp_even_via_another_operation() {
        // Regression (property test): the fail-safe was applied per operation, so the
        // port-only operation let the rule match on a non-HTTP port. Istio drops the rule.
        let allow = policy(
            "default",
            "allow-mixed",
            Some("b"),
            Action::Allow,
            Some(vec![Rule {
                from: vec![],
                to: vec![get_only(), to_ports(&[9000])],
                when: vec![],
            }]),
        );
        let c = compile(&bundle(vec![allow]), &registry(), ROOT, TD).unwrap();
        // b2 speaks no HTTP: denied on 9000 too.
        assert_eq!(lookup(&c, 1, 4, 9000).unwrap().verdict, POL_DENY);
        // b1's HTTP port 8080: per request; 9000 is not HTTP there either.
        assert_eq!(lookup(&c, 1, 3, 8080).unwrap().verdict, POL_L7);
        assert_eq!(lookup(&c, 1, 3, 9000).unwrap().verdict, POL_DENY);
    }

    #[test]
    fn dry_run_and_audit_flags() {
        let mut dry = policy(
            "default",
            "dry-deny",
            Some("b"),
            Action::Deny,
            Some(vec![Rule::default()]),
        );
        dry.dry_run = true;
        let audit = policy(
            "default",
            "audit-all",
            Some("b"),
            Action::Audit,
            Some(vec![Rule::default()]),
        );
        let c = compile(&bundle(vec![dry, audit]), &registry(), ROOT, TD).unwrap();
        let v = lookup(&c, 1, 4, 80).unwrap();
        assert_eq!(v.verdict, POL_ALLOW);
        assert_eq!(v.flags & POL_F_DRY_RUN_DENY, POL_F_DRY_RUN_DENY);
        assert_eq!(str_of(&c, v.dry_run_str), "default/dry-deny");
        assert_eq!(v.flags & POL_F_AUDIT, POL_F_AUDIT);
        assert_eq!(str_of(&c, v.audit_str), "default/audit-all");
        assert_eq!(v.flags & POL_F_HAS_ALLOW, 0);

        // A dry-run ALLOW that matches nothing would deny: named.
        let mut dry_allow = policy("default", "dry-allow", Some("b"), Action::Allow, None);
        dry_allow.dry_run = true;
        let c = compile(&bundle(vec![dry_allow]), &registry(), ROOT, TD).unwrap();
        let v = lookup(&c, 1, 4, 80).unwrap();
        assert_eq!(v.verdict, POL_ALLOW);
        assert_eq!(str_of(&c, v.dry_run_str), "default/dry-allow");

        // Dry-run with HTTP fields on an HTTP port: per request, clauses flagged.
        let mut dry_get = policy(
            "default",
            "dry-get",
            Some("b"),
            Action::Deny,
            Some(vec![Rule {
                from: vec![],
                to: vec![get_only()],
                when: vec![],
            }]),
        );
        dry_get.dry_run = true;
        let c = compile(&bundle(vec![dry_get]), &registry(), ROOT, TD).unwrap();
        let v = lookup(&c, 1, 3, 8080).unwrap();
        assert_eq!(v.verdict, POL_ALLOW);
        assert_eq!(
            v.flags & (POL_F_DRY_RUN_L7 | POL_F_DRY_RUN_L4_ALLOWED),
            POL_F_DRY_RUN_L7 | POL_F_DRY_RUN_L4_ALLOWED
        );
        assert_eq!(v.l7_count, 1);
        assert_eq!(c.l7[0].1.flags, POL_L7_F_DRY_RUN);
    }

    #[test]
    fn capacity_is_refused() {
        // Every port: 65536 entries per (set, class), over the L4 budget.
        let ports: Vec<u16> = (1..=u16::MAX).collect();
        let deny = policy(
            "default",
            "many-ports",
            Some("b"),
            Action::Deny,
            Some(vec![Rule {
                from: vec![],
                to: vec![to_ports(&ports)],
                when: vec![],
            }]),
        );
        let e = compile(&bundle(vec![deny]), &registry(), ROOT, TD).unwrap_err();
        match e {
            CompileError::Capacity {
                map,
                needed,
                capacity,
            } => {
                assert_eq!(map, names::MAP_POL_L4);
                assert!(needed > capacity as usize);
                assert_eq!(capacity, budget(mesh_common::policy::capacity::POL_L4));
            }
            e => panic!("{e}"),
        }
    }

    #[test]
    fn long_pattern_is_refused() {
        let long = "/".repeat(POL_STR_MAX + 1);
        let p = policy(
            "default",
            "long",
            Some("b"),
            Action::Allow,
            Some(vec![Rule {
                from: vec![],
                to: vec![Operation {
                    paths: vec![StringMatch::Exact(long.clone())],
                    ..Operation::default()
                }],
                when: vec![],
            }]),
        );
        match compile(&bundle(vec![p]), &registry(), ROOT, TD).unwrap_err() {
            CompileError::StringTooLong { policy, value, .. } => {
                assert_eq!((policy.as_str(), value), ("default/long", long));
            }
            e => panic!("{e}"),
        }
    }

    #[test]
    fn peer_authentication_precedence() {
        let r = registry();
        let pa = |ns: &str, name: &str, app: Option<&str>, mode| PeerAuthentication {
            namespace: ns.into(),
            name: name.into(),
            origin: Origin {
                file: PathBuf::from("pa.yaml"),
                line: 1,
            },
            selector: app.map(|a| BTreeMap::from([("app".to_owned(), a.to_owned())])),
            mode,
            port_level: BTreeMap::new(),
        };
        let a1 = &r.workloads[0];
        let c1 = &r.workloads[4];
        let mut b = PolicyBundle::default();
        assert!(!permissive(&b, a1, ROOT));
        b.peer_authn
            .push(pa(ROOT, "mesh", None, MtlsMode::Permissive));
        assert!(permissive(&b, a1, ROOT) && permissive(&b, c1, ROOT));
        b.peer_authn
            .push(pa("default", "ns", None, MtlsMode::Strict));
        assert!(!permissive(&b, a1, ROOT) && permissive(&b, c1, ROOT));
        b.peer_authn
            .push(pa("default", "sel", Some("a"), MtlsMode::Permissive));
        assert!(permissive(&b, a1, ROOT));
        assert!(!permissive(&b, &r.workloads[2], ROOT));
    }

    #[test]
    fn port_level_mtls_refused_where_the_kernel_cannot_enforce_it() {
        let r = registry();
        let pa = |mode, ports: &[(u16, MtlsMode)]| PeerAuthentication {
            namespace: "default".into(),
            name: "b-ports".into(),
            origin: Origin {
                file: PathBuf::from("pa.yaml"),
                line: 1,
            },
            selector: Some(BTreeMap::from([("app".to_owned(), "b".to_owned())])),
            mode,
            port_level: ports.iter().copied().collect(),
        };
        let with = |p| PolicyBundle {
            authz: vec![],
            peer_authn: vec![p],
        };
        // Agreeing on plaintext: accepted (PERMISSIVE and DISABLE both accept it).
        let c = compile(
            &with(pa(MtlsMode::Permissive, &[(8080, MtlsMode::Disable)])),
            &r,
            ROOT,
            TD,
        )
        .unwrap();
        assert!(c
            .dst
            .iter()
            .all(|(_, v)| v.flags & POL_DST_F_PERMISSIVE != 0));
        assert!(compile(
            &with(pa(MtlsMode::Strict, &[(8080, MtlsMode::Unset)])),
            &r,
            ROOT,
            TD
        )
        .is_ok());
        // A port that would accept plaintext on a STRICT workload, or refuse it on a
        // PERMISSIVE one: refused, naming the PeerAuthentication and the port.
        for (mode, port_mode) in [
            (MtlsMode::Strict, MtlsMode::Permissive),
            (MtlsMode::Permissive, MtlsMode::Strict),
            (MtlsMode::Disable, MtlsMode::Strict),
        ] {
            let e = compile(&with(pa(mode, &[(8080, port_mode)])), &r, ROOT, TD).unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.contains("default/b-ports") && msg.contains("portLevelMtls[8080]"),
                "{msg}"
            );
        }
    }

    #[test]
    fn headers_conditions_compile_to_grouped_request_terms() {
        use crate::policy::model::Condition;
        use crate::policy::ConnVerdict;
        use crate::policy::{engine::PolicyView, RequestAttrs};
        let header = |name: &str, v: &[&str], nv: &[&str]| Condition::RequestHeader {
            name: name.into(),
            values: v.iter().map(|p| StringMatch::from_pattern(p)).collect(),
            not_values: nv.iter().map(|p| StringMatch::from_pattern(p)).collect(),
        };
        // Two conditions on one header: both must hold (not either).
        let allow = policy(
            "default",
            "allow-hdr",
            Some("b"),
            Action::Allow,
            Some(vec![Rule {
                from: vec![],
                to: vec![],
                when: vec![
                    header("x-a", &["yes*"], &[]),
                    header("x-a", &["*ok"], &["yes-no-ok"]),
                ],
            }]),
        );
        let c = compile(&bundle(vec![allow]), &registry(), ROOT, TD).unwrap();
        let v = PolicyView::from_compiled(1, &c).unwrap();
        // b1 speaks HTTP on 8080: per request; b2 not: the ALLOW never matches (fail-safe).
        let d = v.decide_l4(1, 3, crate::policy::engine::Family::V4, 8080);
        assert_eq!(d.verdict, ConnVerdict::PerRequest);
        assert_eq!(
            v.decide_l4(1, 4, crate::policy::engine::Family::V4, 8080)
                .verdict,
            ConnVerdict::Deny
        );
        let (set, class) = d.key.unwrap();
        let decide = |headers: &[(&str, &str)]| {
            let headers: &[(&str, &str)] = headers;
            v.decide_request_with(
                set,
                class,
                8080,
                &RequestAttrs {
                    method: "GET",
                    path: "/",
                    host: Some("b"),
                    headers: &headers,
                },
            )
            .allowed()
        };
        assert!(decide(&[("X-A", "yes-ok")]));
        assert!(!decide(&[("x-a", "yes")]), "second condition fails");
        assert!(!decide(&[("x-a", "ok")]), "first condition fails");
        assert!(!decide(&[("x-a", "yes-no-ok")]), "notValues");
        assert!(!decide(&[]), "absent header");
        assert!(!decide(&[("x-b", "yes-ok")]), "another header");
        // Two fields are joined with `,`: `yes,ok` satisfies both.
        assert!(decide(&[("x-a", "yes"), ("x-a", "ok")]));
    }

    #[test]
    fn peer_authentication_empty_selector_is_namespace_wide() {
        // Regression (property test): `matchLabels: {}` was taken for a selector policy and
        // won over the namespace policy (and a root one was ignored).
        let r = registry();
        let a1 = &r.workloads[0];
        let pa =
            |ns: &str, name: &str, selector: Option<&[(&str, &str)]>, mode| PeerAuthentication {
                namespace: ns.into(),
                name: name.into(),
                origin: Origin {
                    file: PathBuf::from("pa.yaml"),
                    line: 1,
                },
                selector: selector.map(|s| {
                    s.iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect()
                }),
                mode,
                port_level: BTreeMap::new(),
            };
        let b = PolicyBundle {
            authz: vec![],
            peer_authn: vec![
                pa("default", "a-ns", None, MtlsMode::Permissive),
                pa("default", "b-empty", Some(&[]), MtlsMode::Strict),
            ],
        };
        // Both namespace-wide: the first by name decides.
        assert!(permissive(&b, a1, ROOT));
        let b = PolicyBundle {
            authz: vec![],
            peer_authn: vec![pa(ROOT, "mesh", Some(&[]), MtlsMode::Permissive)],
        };
        assert!(permissive(&b, a1, ROOT));
    }
}
