//! The agent's policy engine: one generation of the policy maps, in memory
//! ([`PolicyView`]), deciding exactly as the kernel's programs decide — L4 for a connection,
//! per request on HTTP ports where the kernel cannot decide. A view is the proxies'
//! [`Authorizer`] directly; the active one is published by the generation watcher
//! ([`super::source::spawn_generation_watcher`]).
//!
//! The request matcher here is the compiled form's own (patterns as stored in the maps); the
//! reference evaluator ([`super::eval`]) is for tests and offline tooling only. Dry-run
//! denials and AUDIT matches are logged here (`dry-run deny`, `audit`); enforced denials are
//! logged by the proxies (`connection denied`).

use std::{collections::HashMap as StdHashMap, net::IpAddr, sync::Arc};

use mesh_common::policy::{
    PolDstKey, PolDstValue, PolL4Key, PolL4Value, PolL7Key, PolL7Value, PolOpKey, PolOpValue,
    PolPlainKey, PolPlainValue, PolSrcKey, PolSrcValue, PolStrKey, PolStrValue, PLAIN_GEN_BITS,
    POL_ACTION_ALLOW, POL_ACTION_AUDIT, POL_ACTION_DENY, POL_ALLOW, POL_DENY, POL_DST_F_PERMISSIVE,
    POL_FIELD_GROUP_SHIFT, POL_FIELD_HEADER, POL_FIELD_HOST, POL_FIELD_MASK, POL_FIELD_METHOD,
    POL_FIELD_NOT_HEADER, POL_FIELD_NOT_HOST, POL_FIELD_NOT_METHOD, POL_FIELD_NOT_PATH,
    POL_FIELD_PATH, POL_F_AUDIT, POL_F_AUDIT_L7, POL_F_DRY_RUN_DENY, POL_F_DRY_RUN_L4_ALLOWED,
    POL_F_DRY_RUN_L7, POL_F_L4_ALLOWED, POL_L7, POL_L7_F_DRY_RUN, POL_MATCH_EXACT,
    POL_MATCH_PREFIX, POL_MATCH_PRESENCE, POL_MATCH_SUFFIX, POL_MATCH_TEMPLATE, POL_STR_MAX,
};
use tracing::info;

use super::{
    authorize::{Authorizer, ConnDecision, ConnInfo, ConnVerdict, RequestAttrs, RequestVerdict},
    compile::CompiledPolicy,
    maps::MapsError,
    model::Pattern,
};

/// The entries of one generation, as read.
#[derive(Clone, Debug, Default)]
pub struct RawGeneration {
    pub src: Vec<(PolSrcKey, PolSrcValue)>,
    pub dst: Vec<(PolDstKey, PolDstValue)>,
    pub l4: Vec<(PolL4Key, PolL4Value)>,
    pub l7: Vec<(PolL7Key, PolL7Value)>,
    pub ops: Vec<(PolOpKey, PolOpValue)>,
    pub strs: Vec<(PolStrKey, PolStrValue)>,
    pub plain: Vec<(PolPlainKey, PolPlainValue)>,
}

impl From<&CompiledPolicy> for RawGeneration {
    fn from(c: &CompiledPolicy) -> Self {
        Self {
            src: c.src.clone(),
            dst: c.dst.clone(),
            l4: c.l4.clone(),
            l7: c.l7.clone(),
            ops: c.ops.clone(),
            strs: c.strs.clone(),
            plain: c.plain.clone(),
        }
    }
}

/// An address family, for the source class.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// One term of a request-level clause.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Term {
    /// `POL_FIELD_*`.
    pub field: u32,
    /// `POL_MATCH_*`.
    pub kind: u32,
    /// The pattern (empty for presence).
    pub pattern: Arc<str>,
}

/// A request-level clause of an L4 entry (`mesh_pol_l7` with its terms).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Clause {
    /// `POL_ACTION_*`.
    pub action: u32,
    /// From a dry-run policy: reported, never enforced.
    pub dry_run: bool,
    /// The policy (`ns/name`).
    pub policy: Option<Arc<str>>,
    pub terms: Vec<Term>,
}

/// A request's header fields, as the policy reads them.
pub trait RequestHeaders {
    /// Calls `f` with every value of header `name` (given lowercase; compare names
    /// case-insensitively), in the order received.
    fn for_each_value(&self, name: &str, f: &mut dyn FnMut(&[u8]));
}

/// A request without header fields (or whose headers no policy reads).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoHeaders;

impl RequestHeaders for NoHeaders {
    fn for_each_value(&self, _: &str, _: &mut dyn FnMut(&[u8])) {}
}

/// Header fields as (name, value) pairs.
impl RequestHeaders for &[(&str, &str)] {
    fn for_each_value(&self, name: &str, f: &mut dyn FnMut(&[u8])) {
        for (n, v) in self.iter() {
            if n.eq_ignore_ascii_case(name) {
                f(v.as_bytes());
            }
        }
    }
}

impl Clause {
    /// [`Self::matches_request`] for a request without header fields.
    pub fn matches(&self, method: &str, path: &str, host: &str) -> bool {
        self.matches_request(&RequestAttrs {
            method,
            path,
            host: Some(host),
            headers: &NoHeaders,
        })
    }

    /// Whether the request matches. Terms are grouped by (field, group) — the field's high
    /// bits (`POL_FIELD_GROUP_SHIFT`) are the group: in a group a positive field (`METHOD`,
    /// `PATH`, `HOST`, `HEADER`) matches when any of its terms does, a negative one (`NOT_*`)
    /// when none does; every group present must match; no terms match every request. An
    /// absent method, path or host is the empty string (which matches no pattern but an
    /// exact `""`); an absent header matches no pattern, not even presence. Hosts compare
    /// ASCII case-insensitively (patterns are stored lowercase), exactly as sent. A clause
    /// with a field or kind this version does not know fails closed: an ALLOW clause never
    /// matches, any other always does (a wider deny or audit).
    pub fn matches_request(&self, req: &RequestAttrs<'_>) -> bool {
        let known = |t: &Term| {
            pattern_of(t.kind, "").is_some()
                && (POL_FIELD_METHOD..=POL_FIELD_NOT_HEADER).contains(&(t.field & POL_FIELD_MASK))
        };
        if !self.terms.iter().all(known) {
            return self.action != POL_ACTION_ALLOW;
        }
        // (positive field, group) of each term; the negative field of a pair shares it.
        let pair = |field: u32| {
            let base = field & POL_FIELD_MASK;
            let group = field >> POL_FIELD_GROUP_SHIFT;
            let positive = match base {
                POL_FIELD_NOT_METHOD => POL_FIELD_METHOD,
                POL_FIELD_NOT_PATH => POL_FIELD_PATH,
                POL_FIELD_NOT_HOST => POL_FIELD_HOST,
                POL_FIELD_NOT_HEADER => POL_FIELD_HEADER,
                b => b,
            };
            (positive, group, base != positive)
        };
        let mut header: Option<(String, Option<Vec<u8>>)> = None;
        let mut hit = |t: &Term| -> bool {
            match t.field & POL_FIELD_MASK {
                POL_FIELD_METHOD | POL_FIELD_NOT_METHOD => t.matches(req.method),
                POL_FIELD_PATH | POL_FIELD_NOT_PATH => t.matches(req.path),
                POL_FIELD_HOST | POL_FIELD_NOT_HOST => t.matches(req.host.unwrap_or("")),
                POL_FIELD_HEADER | POL_FIELD_NOT_HEADER => {
                    let Some((name, pattern)) = t.pattern.split_once(':') else {
                        return false;
                    };
                    // One header looked up per group, joined as Envoy sees repeated fields.
                    if header.as_ref().is_none_or(|(n, _)| n != name) {
                        header = Some((name.to_owned(), joined_header(req.headers, name)));
                    }
                    let value = header.as_ref().and_then(|(_, v)| v.as_deref());
                    match pattern_of(t.kind, pattern) {
                        Some(p) => header_matches(p, value),
                        None => false,
                    }
                }
                _ => false,
            }
        };
        let mut done: Vec<(u32, u32)> = Vec::new();
        for t in &self.terms {
            let (positive, group, _) = pair(t.field);
            if done.contains(&(positive, group)) {
                continue;
            }
            done.push((positive, group));
            let mut any_positive = false;
            let mut positive_hit = false;
            for u in self.terms.iter().filter(|u| {
                let (p, g, _) = pair(u.field);
                (p, g) == (positive, group)
            }) {
                let negative = pair(u.field).2;
                if negative {
                    if hit(u) {
                        return false;
                    }
                } else {
                    any_positive = true;
                    positive_hit = positive_hit || hit(u);
                }
            }
            if any_positive && !positive_hit {
                return false;
            }
        }
        true
    }
}

/// Every value of header `name`, joined with `,` as Envoy sees a repeated field (one buffer);
/// `None` when the request has no such field.
fn joined_header(headers: &dyn RequestHeaders, name: &str) -> Option<Vec<u8>> {
    let mut out: Option<Vec<u8>> = None;
    headers.for_each_value(name, &mut |v| match &mut out {
        Some(buf) => {
            buf.push(b',');
            buf.extend_from_slice(v);
        }
        None => out = Some(v.to_vec()),
    });
    out
}

/// How a `request.headers[...]` pattern matches a header's (joined) value, as Istio's
/// `HeaderMatcher`: case-sensitive; presence matches an empty value; an absent header matches
/// nothing; templates are never produced for headers and never match.
fn header_matches(p: Pattern<'_>, value: Option<&[u8]>) -> bool {
    let Some(v) = value else {
        return false;
    };
    match p {
        Pattern::Exact(s) => v == s.as_bytes(),
        Pattern::Prefix(s) => v.starts_with(s.as_bytes()),
        Pattern::Suffix(s) => v.ends_with(s.as_bytes()),
        Pattern::Presence => true,
        Pattern::Template(_) => false,
    }
}

/// The request path as policies see it: without query string or fragment.
fn policy_path(path: &str) -> &str {
    path.split(['?', '#']).next().unwrap_or("")
}

/// A term's kind and pattern as a [`Pattern`]; `None` for an unknown kind.
fn pattern_of(kind: u32, p: &str) -> Option<Pattern<'_>> {
    Some(match kind {
        POL_MATCH_EXACT => Pattern::Exact(p),
        POL_MATCH_PREFIX => Pattern::Prefix(p),
        POL_MATCH_SUFFIX => Pattern::Suffix(p),
        POL_MATCH_PRESENCE => Pattern::Presence,
        POL_MATCH_TEMPLATE => Pattern::Template(p),
        _ => return None,
    })
}

impl Term {
    fn matches(&self, value: &str) -> bool {
        // Unknown kinds never match (a newer compiler): ALLOW clauses then fail closed.
        let Some(pattern) = pattern_of(self.kind, &self.pattern) else {
            return false;
        };
        let field = self.field & POL_FIELD_MASK;
        if field == POL_FIELD_HOST || field == POL_FIELD_NOT_HOST {
            // Hosts match as the reference evaluator matches them (case-insensitively).
            return pattern.matches_ignore_case(value);
        }
        pattern.matches(value)
    }
}

/// The L4 entry of (set, class, port) with its clauses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct L4Entry {
    pub value: PolL4Value,
    pub clauses: Vec<Clause>,
}

/// What [`PolicyView::decide_l4`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct L4Decision {
    pub verdict: ConnVerdict,
    /// The deciding policy, if one decided (none: no policy selects the destination, or the
    /// default deny of ALLOW policies that matched nothing, or an inconsistency).
    pub policy: Option<Arc<str>>,
    /// A dry-run policy would deny at L4 (the policy, if one is named).
    pub dry_run_deny: Option<Option<Arc<str>>>,
    /// An AUDIT policy matched at L4.
    pub audit: Option<Arc<str>>,
    /// (set, class) to pass to `decide_request`; `None` when no policy selects the
    /// destination.
    pub key: Option<(u32, u32)>,
    /// Requests must be evaluated (the verdict is per request, or a dry-run or AUDIT policy
    /// may match per request).
    pub needs_request: bool,
}

/// What [`PolicyView::decide_request`] found for one request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestDecision {
    pub verdict: RequestVerdict,
    /// The deciding policy, if one decided.
    pub policy: Option<Arc<str>>,
    /// The request is allowed but dry-run policies would deny it (with the policy, if named).
    pub dry_run_deny: Option<Option<Arc<str>>>,
    /// AUDIT policies that matched (L4 and per request, without repetition).
    pub audit: Vec<Arc<str>>,
}

impl RequestDecision {
    /// Whether the request is allowed.
    pub fn allowed(&self) -> bool {
        self.verdict == RequestVerdict::Allow
    }
}

/// One generation of the policy maps, in memory, for the agent's decisions.
#[derive(Clone, Debug, Default)]
pub struct PolicyView {
    gen: u32,
    /// Destination workload → policy set (workloads no policy selects are absent).
    dst: StdHashMap<u32, u32>,
    /// Workloads whose effective PeerAuthentication is PERMISSIVE (`POL_DST_F_PERMISSIVE`).
    permissive: std::collections::HashSet<u32>,
    src: StdHashMap<u32, PolSrcValue>,
    l4: StdHashMap<(u32, u32, u32), L4Entry>,
    strings: StdHashMap<u32, Arc<str>>,
    l4_entries: usize,
    /// `mesh_pol_plain`: (prefix length in the mapped 128-bit space, address, class), longest
    /// prefixes first.
    plain: Vec<(u32, u128, u32)>,
    /// Every decision denies (a generation that could not be read back).
    deny_all: bool,
}

impl PolicyView {
    /// Builds the view of generation `gen` from its entries; refuses an inconsistent one
    /// (a clause, term or string referred to but missing).
    pub fn build(gen: u32, raw: RawGeneration) -> Result<Self, MapsError> {
        let bad = |problem: String| MapsError::Inconsistent { gen, problem };
        let mut strings = StdHashMap::new();
        for (k, v) in &raw.strs {
            let len = (v.len as usize).min(POL_STR_MAX);
            let s = String::from_utf8_lossy(&v.bytes[..len]);
            strings.insert(k.str_id, Arc::<str>::from(s.as_ref()));
        }
        let string = |id: u32| -> Result<Option<Arc<str>>, MapsError> {
            if id == 0 {
                return Ok(None);
            }
            strings
                .get(&id)
                .cloned()
                .map(Some)
                .ok_or_else(|| bad(format!("string {id} missing")))
        };
        let ops: StdHashMap<(u32, u32), PolOpValue> = raw
            .ops
            .iter()
            .map(|(k, v)| ((k.op_id, k.index), *v))
            .collect();
        let l7: StdHashMap<(u32, u32, u32, u32), PolL7Value> = raw
            .l7
            .iter()
            .map(|(k, v)| ((k.set_id, k.class_id, k.port, k.index), *v))
            .collect();
        let mut l4 = StdHashMap::with_capacity(raw.l4.len());
        for (k, v) in &raw.l4 {
            let mut clauses = Vec::with_capacity(v.l7_count as usize);
            for index in 0..v.l7_count {
                let c = l7
                    .get(&(k.set_id, k.class_id, k.port, index))
                    .ok_or_else(|| bad(format!("clause {index} of {k:?} missing")))?;
                let mut terms = Vec::with_capacity(c.op_count as usize);
                for t in 0..c.op_count {
                    let op = ops
                        .get(&(c.op_id, t))
                        .ok_or_else(|| bad(format!("term {t} of operation {} missing", c.op_id)))?;
                    let pattern = string(op.str_id)?.unwrap_or_else(|| Arc::from(""));
                    terms.push(Term {
                        field: op.field,
                        kind: op.kind,
                        pattern,
                    });
                }
                clauses.push(Clause {
                    action: c.action,
                    dry_run: c.flags & POL_L7_F_DRY_RUN != 0,
                    policy: string(c.policy_str)?,
                    terms,
                });
            }
            l4.insert(
                (k.set_id, k.class_id, k.port),
                L4Entry { value: *v, clauses },
            );
        }
        Ok(Self {
            gen,
            dst: raw
                .dst
                .iter()
                .filter(|(_, v)| v.set_id != 0)
                .map(|(k, v)| (k.workload_id, v.set_id))
                .collect(),
            permissive: raw
                .dst
                .iter()
                .filter(|(_, v)| v.flags & POL_DST_F_PERMISSIVE != 0)
                .map(|(k, _)| k.workload_id)
                .collect(),
            src: raw.src.iter().map(|(k, v)| (k.workload_id, *v)).collect(),
            l4_entries: l4.len(),
            l4,
            strings,
            plain: {
                let mut plain: Vec<(u32, u128, u32)> = raw
                    .plain
                    .iter()
                    .map(|(k, v)| {
                        let b = k.data.addr_be;
                        let bytes: Vec<u8> = b.iter().flat_map(|w| w.to_ne_bytes()).collect();
                        let mut a = [0u8; 16];
                        a.copy_from_slice(&bytes);
                        (
                            k.prefix_len.saturating_sub(PLAIN_GEN_BITS).min(128),
                            u128::from_be_bytes(a),
                            v.class_id,
                        )
                    })
                    .collect();
                plain.sort_by_key(|e| std::cmp::Reverse(e.0));
                plain
            },
            deny_all: false,
        })
    }

    /// The view of `compiled` as generation `gen`, built in memory: what
    /// [`PolicyMaps::apply`] writes and [`PolicyMaps::read_view`] reads back, without BPF.
    pub fn from_compiled(gen: u32, compiled: &CompiledPolicy) -> Result<Self, MapsError> {
        Self::build(gen, RawGeneration::from(compiled))
    }

    /// A view of generation `gen` in which everything is denied (fail closed, for a
    /// generation that could not be read back).
    pub fn deny_all(gen: u32) -> Self {
        Self {
            gen,
            deny_all: true,
            ..Self::default()
        }
    }

    /// The generation this view is of (0: no policy).
    pub fn generation(&self) -> u32 {
        self.gen
    }

    /// Number of L4 entries.
    pub fn l4_entries(&self) -> usize {
        self.l4_entries
    }

    /// The string `id` (policy names in events).
    pub fn string(&self, id: u32) -> Option<Arc<str>> {
        self.strings.get(&id).cloned()
    }

    /// Every (destination workload, set) pair, by workload id.
    pub fn destinations(&self) -> Vec<(u32, u32)> {
        let mut out: Vec<(u32, u32)> = self.dst.iter().map(|(w, s)| (*w, *s)).collect();
        out.sort_unstable();
        out
    }

    /// Whether workload `workload_id` is PERMISSIVE in this generation (its effective
    /// PeerAuthentication; `false` for a generation 0 view: the registry decides then).
    pub fn permissive(&self, workload_id: u32) -> bool {
        self.permissive.contains(&workload_id)
    }

    /// Workloads that are PERMISSIVE in this generation, sorted.
    pub fn permissive_workloads(&self) -> Vec<u32> {
        let mut out: Vec<u32> = self.permissive.iter().copied().collect();
        out.sort_unstable();
        out
    }

    /// The policy set of destination workload `workload_id` (`None`: no policy selects it).
    pub fn dst_set(&self, workload_id: u32) -> Option<u32> {
        self.dst.get(&workload_id).copied()
    }

    /// The source class of workload `workload_id` for connections from its `family` address.
    pub fn src_class(&self, workload_id: u32, family: Family) -> Option<u32> {
        self.src.get(&workload_id).map(|v| match family {
            Family::V4 => v.class4,
            Family::V6 => v.class6,
        })
    }

    /// The class of plaintext from `ip`: the longest `mesh_pol_plain` prefix containing it —
    /// the kernel's lookup.
    pub fn plain_class(&self, ip: std::net::IpAddr) -> Option<u32> {
        let v6 = match ip.to_canonical() {
            std::net::IpAddr::V4(a) => a.to_ipv6_mapped(),
            std::net::IpAddr::V6(a) => a,
        };
        let addr = u128::from(v6);
        self.plain
            .iter()
            .find(|(bits, net, _)| {
                let mask = if *bits == 0 {
                    0
                } else {
                    u128::MAX << (128 - bits)
                };
                addr & mask == *net & mask
            })
            .map(|(_, _, class)| *class)
    }

    /// The L4 decision for plaintext (accepted under PERMISSIVE: no principal, no namespace)
    /// from `src_ip` to `dst_workload` port `port`, as the kernel's ingress program decides
    /// it: no policy set → allow; the class by longest prefix; its entry's `POL_ALLOW` allows,
    /// anything else denies — `POL_L7` too (`needs_request` says so), since plaintext cannot
    /// reach the agent for the request (fail closed); a missing class or entry denies.
    pub fn decide_plaintext(
        &self,
        src_ip: std::net::IpAddr,
        dst_workload: u32,
        port: u16,
    ) -> L4Decision {
        self.decide_class(dst_workload, || self.plain_class(src_ip), port, true)
    }

    /// The entry for (set, class, port), else (set, class, 0) — the kernel's lookup.
    pub fn l4_entry(&self, set: u32, class: u32, port: u16) -> Option<&L4Entry> {
        self.l4
            .get(&(set, class, u32::from(port)))
            .or_else(|| self.l4.get(&(set, class, 0)))
    }

    /// The L4 decision for a connection from `src_workload` (its `family` address) to
    /// `dst_workload` port `port`, exactly as the kernel decides it: no policy set → allow;
    /// a missing class or entry, or an unknown verdict → deny (fail closed).
    pub fn decide_l4(
        &self,
        src_workload: u32,
        dst_workload: u32,
        family: Family,
        port: u16,
    ) -> L4Decision {
        self.decide_class(
            dst_workload,
            || self.src_class(src_workload, family),
            port,
            false,
        )
    }

    /// The kernel's L4 lookup for a source of class `class()` (looked up only when a policy
    /// set selects the destination). `plaintext`: only `POL_ALLOW` allows, no dry run or
    /// audit (the ingress program's reading); else the connect program's.
    fn decide_class(
        &self,
        dst_workload: u32,
        class: impl FnOnce() -> Option<u32>,
        port: u16,
        plaintext: bool,
    ) -> L4Decision {
        let deny = |key| L4Decision {
            verdict: ConnVerdict::Deny,
            policy: None,
            dry_run_deny: None,
            audit: None,
            key,
            needs_request: false,
        };
        if self.deny_all {
            return deny(None);
        }
        let Some(set) = self.dst_set(dst_workload) else {
            return L4Decision {
                verdict: ConnVerdict::Allow,
                ..deny(None)
            };
        };
        let Some(class) = class() else {
            return deny(None);
        };
        let Some(entry) = self.l4_entry(set, class, port) else {
            return deny(Some((set, class)));
        };
        let v = entry.value;
        let verdict = match v.verdict {
            POL_ALLOW => ConnVerdict::Allow,
            POL_L7 if !plaintext => ConnVerdict::PerRequest,
            _ => ConnVerdict::Deny,
        };
        if plaintext {
            return L4Decision {
                verdict,
                policy: self.string(v.policy_str),
                key: Some((set, class)),
                needs_request: v.verdict == POL_L7,
                ..deny(None)
            };
        }
        let allowed = verdict != ConnVerdict::Deny;
        L4Decision {
            verdict,
            policy: self.string(v.policy_str),
            dry_run_deny: (allowed && v.flags & POL_F_DRY_RUN_DENY != 0)
                .then(|| self.string(v.dry_run_str)),
            audit: (v.flags & POL_F_AUDIT != 0)
                .then(|| self.string(v.audit_str))
                .flatten(),
            key: Some((set, class)),
            needs_request: allowed
                && (verdict == ConnVerdict::PerRequest
                    || v.flags & (POL_F_DRY_RUN_L7 | POL_F_AUDIT_L7) != 0),
        }
    }

    /// The decision for one HTTP request on a connection of (set, class) to `port`
    /// (from [`L4Decision::key`]); `path` is the request target as sent (its query string
    /// and fragment are ignored), `host` is `Host`/`:authority`; absent values are `""`.
    ///
    /// 1. The entry (port, else port 0); none: denied (fail closed).
    /// 2. Enforced: `POL_DENY` → denied (entry policy); `POL_ALLOW` → allowed (entry policy);
    ///    `POL_L7` → the first non-dry-run DENY clause that matches denies (its policy);
    ///    else with `POL_F_L4_ALLOWED` allowed (entry policy); else the first non-dry-run
    ///    ALLOW clause that matches allows (its policy); else denied (no policy). Any other
    ///    verdict: denied.
    /// 3. Dry run, only for an allowed request: `POL_F_DRY_RUN_DENY` → would deny (entry
    ///    `dry_run_str`); `POL_F_DRY_RUN_L7` → the same as 2 over every clause, dry-run ones
    ///    included, with `POL_F_DRY_RUN_L4_ALLOWED` in place of `POL_F_L4_ALLOWED`; a denial
    ///    there is reported as `dry_run_deny` (the DENY clause's policy, or the first dry-run
    ///    ALLOW clause's policy for a default deny).
    /// 4. Audit: `POL_F_AUDIT` (entry `audit_str`) and every AUDIT clause that matches.
    pub fn decide_request(
        &self,
        set: u32,
        class: u32,
        port: u16,
        method: &str,
        path: &str,
        host: &str,
    ) -> RequestDecision {
        self.decide_request_with(
            set,
            class,
            port,
            &RequestAttrs {
                method,
                path,
                host: Some(host),
                headers: &NoHeaders,
            },
        )
    }

    /// [`Self::decide_request`] with the request's header fields (`when`
    /// `request.headers[...]` conditions read them).
    pub fn decide_request_with(
        &self,
        set: u32,
        class: u32,
        port: u16,
        req: &RequestAttrs<'_>,
    ) -> RequestDecision {
        if self.deny_all {
            return RequestDecision::default();
        }
        let Some(entry) = self.l4_entry(set, class, port) else {
            return RequestDecision::default();
        };
        let v = entry.value;
        let facts = RequestAttrs {
            path: policy_path(req.path),
            ..*req
        };
        let matching = |action: u32, with_dry_run: bool| {
            entry.clauses.iter().find(|c| {
                c.action == action && (with_dry_run || !c.dry_run) && c.matches_request(&facts)
            })
        };
        let (allowed, policy) = match v.verdict {
            POL_ALLOW => (true, self.string(v.policy_str)),
            POL_L7 => {
                if let Some(c) = matching(POL_ACTION_DENY, false) {
                    (false, c.policy.clone())
                } else if v.flags & POL_F_L4_ALLOWED != 0 {
                    (true, self.string(v.policy_str))
                } else if let Some(c) = matching(POL_ACTION_ALLOW, false) {
                    (true, c.policy.clone())
                } else {
                    (false, None)
                }
            }
            POL_DENY => (false, self.string(v.policy_str)),
            _ => (false, None),
        };
        let mut out = RequestDecision {
            verdict: if allowed {
                RequestVerdict::Allow
            } else {
                RequestVerdict::Deny
            },
            policy,
            dry_run_deny: None,
            audit: Vec::new(),
        };
        if allowed {
            if v.flags & POL_F_DRY_RUN_DENY != 0 {
                out.dry_run_deny = Some(self.string(v.dry_run_str));
            } else if v.flags & POL_F_DRY_RUN_L7 != 0 {
                if let Some(c) = matching(POL_ACTION_DENY, true) {
                    out.dry_run_deny = Some(c.policy.clone());
                } else if v.flags & POL_F_DRY_RUN_L4_ALLOWED == 0
                    && matching(POL_ACTION_ALLOW, true).is_none()
                {
                    let named = entry
                        .clauses
                        .iter()
                        .find(|c| c.dry_run && c.action == POL_ACTION_ALLOW)
                        .and_then(|c| c.policy.clone());
                    out.dry_run_deny = Some(named);
                }
            }
        }
        if v.flags & POL_F_AUDIT != 0 {
            out.audit.extend(self.string(v.audit_str));
        }
        for c in &entry.clauses {
            if c.action == POL_ACTION_AUDIT && c.matches_request(&facts) {
                if let Some(p) = &c.policy {
                    if !out.audit.contains(p) {
                        out.audit.push(p.clone());
                    }
                }
            }
        }
        out
    }
}

/// The address family a connection's source class is looked up by.
fn family(c: &ConnInfo) -> Family {
    match c.src_ip().unwrap_or(c.dst.ip().to_canonical()) {
        IpAddr::V4(_) => Family::V4,
        IpAddr::V6(_) => Family::V6,
    }
}

fn name(p: &Option<Arc<str>>) -> &str {
    p.as_deref().unwrap_or("-")
}

impl PolicyView {
    /// The connection decision of [`Authorizer::connection`], without its logs (used by the
    /// proxies through the trait, and by `mesh-agent policy check`).
    pub fn explain_connection(&self, c: &ConnInfo) -> ConnDecision {
        let Some(src) = c.src_workload else {
            // The source is not a known workload of the verified identity (no or a foreign
            // `Forwarded` claim): only a destination without policy accepts it.
            let verdict = match self.dst_set(c.dst_workload) {
                None if c.http && !self.deny_all => ConnVerdict::PerRequest,
                None if !self.deny_all => ConnVerdict::Allow,
                _ => ConnVerdict::Deny,
            };
            return ConnDecision {
                per_request: verdict == ConnVerdict::PerRequest,
                verdict,
                policy: None,
                l4: None,
                generation: self.gen,
            };
        };
        let d = self.decide_l4(src, c.dst_workload, family(c), c.dst.port());
        // A declared HTTP port speaks HTTP/1.1 or h2c only, whatever the policy (registry
        // `httpPorts`: other bytes are refused): an allowed connection there is still served
        // request by request, so non-HTTP bytes never reach the pod.
        let per_request = c.http && d.verdict != ConnVerdict::Deny;
        ConnDecision {
            verdict: if per_request {
                ConnVerdict::PerRequest
            } else {
                d.verdict
            },
            policy: d.policy.clone(),
            l4: Some(d),
            per_request,
            generation: self.gen,
        }
    }

    /// The request decision of [`Authorizer::request`], without its logs.
    pub fn explain_request(&self, c: &ConnInfo, req: &RequestAttrs<'_>) -> RequestDecision {
        let key = match c.src_workload {
            Some(src) => {
                self.decide_l4(src, c.dst_workload, family(c), c.dst.port())
                    .key
            }
            None => None,
        };
        let Some((set, class)) = key else {
            let allowed = self.dst_set(c.dst_workload).is_none() && !self.deny_all;
            return RequestDecision {
                verdict: if allowed {
                    RequestVerdict::Allow
                } else {
                    RequestVerdict::Deny
                },
                ..RequestDecision::default()
            };
        };
        self.decide_request_with(set, class, c.dst.port(), req)
    }
}

impl Authorizer for PolicyView {
    fn connection(&self, c: &ConnInfo) -> ConnDecision {
        let e = self.explain_connection(c);
        if let (Some(d), false) = (&e.l4, e.per_request) {
            if let Some(would) = &d.dry_run_deny {
                info!(layer = "l4", src_identity = %c.src_identity, dst = %c.dst,
                      dst_workload = %c.dst_name, policy = name(would),
                      generation = self.gen, "dry-run deny");
            }
            if let Some(audit) = &d.audit {
                info!(layer = "l4", src_identity = %c.src_identity, dst = %c.dst,
                      dst_workload = %c.dst_name, policy = &**audit,
                      generation = self.gen, "audit");
            }
        }
        e
    }

    fn request(&self, c: &ConnInfo, req: &RequestAttrs<'_>) -> RequestDecision {
        let r = self.explain_request(c, req);
        if let Some(would) = &r.dry_run_deny {
            info!(layer = "l7", src_identity = %c.src_identity, dst = %c.dst,
                  dst_workload = %c.dst_name, method = req.method, path = req.path,
                  policy = name(would), generation = self.gen, "dry-run deny");
        }
        for audit in &r.audit {
            info!(layer = "l7", src_identity = %c.src_identity, dst = %c.dst,
                  dst_workload = %c.dst_name, method = req.method, path = req.path,
                  allowed = r.allowed(), policy = &**audit,
                  generation = self.gen, "audit");
        }
        r
    }

    fn generation(&self) -> u32 {
        self.gen
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn conn(src_workload: Option<u32>, http: bool) -> ConnInfo {
        ConnInfo {
            src_workload,
            src_identity: crate::tls::SpiffeId::parse("spiffe://td/ns/default/sa/a").unwrap(),
            src_addr: Some("10.1.0.2:4000".parse().unwrap()),
            dst: "10.2.0.2:8080".parse().unwrap(),
            dst_workload: 2,
            dst_name: "default/b".into(),
            http,
        }
    }

    #[test]
    fn http_ports_are_served_per_request_even_without_policy() {
        let s = PolicyView::default();
        let req = RequestAttrs {
            method: "GET",
            path: "/",
            host: None,
            headers: &NoHeaders,
        };
        for src in [Some(1), None] {
            assert_eq!(
                s.connection(&conn(src, true)).verdict,
                ConnVerdict::PerRequest
            );
            assert_eq!(s.connection(&conn(src, false)).verdict, ConnVerdict::Allow);
            assert_eq!(
                s.request(&conn(src, true), &req).verdict,
                RequestVerdict::Allow
            );
        }
        let deny = PolicyView::deny_all(4);
        for src in [Some(1), None] {
            assert_eq!(deny.connection(&conn(src, true)).verdict, ConnVerdict::Deny);
            assert_eq!(
                deny.request(&conn(src, true), &req).verdict,
                RequestVerdict::Deny
            );
        }
    }

    #[test]
    fn compiled_hosts_match_like_the_evaluator() {
        let clause = |field, kind, pattern: &str| Clause {
            action: POL_ACTION_ALLOW,
            dry_run: false,
            policy: None,
            terms: vec![Term {
                field,
                kind,
                pattern: Arc::from(pattern),
            }],
        };
        let exact = clause(POL_FIELD_HOST, POL_MATCH_EXACT, "api.shop");
        for host in ["api.shop", "API.Shop"] {
            assert!(exact.matches("GET", "/", host), "{host}");
        }
        // The port is part of the host, as in Istio (ISTIO-SECURITY-2021-008); so is a
        // trailing dot.
        for host in [
            "api.shop:8080",
            "api.shop.",
            "api.shop.evil",
            "api.shop:x",
            "",
        ] {
            assert!(!exact.matches("GET", "/", host), "{host}");
        }
        let suffix = clause(POL_FIELD_HOST, POL_MATCH_SUFFIX, ".shop");
        assert!(suffix.matches("GET", "/", "WEB.SHOP"));
        assert!(!suffix.matches("GET", "/", "WEB.SHOP:80"));
        let not_host = clause(POL_FIELD_NOT_HOST, POL_MATCH_PREFIX, "admin.");
        assert!(!not_host.matches("GET", "/", "Admin.shop:443"));
        assert!(not_host.matches("GET", "/", "api.shop"));
        // Methods stay case-sensitive.
        let method = clause(POL_FIELD_METHOD, POL_MATCH_EXACT, "GET");
        assert!(!method.matches("get", "/", ""));
    }
    use crate::policy::compile::{
        compile,
        tests::{from_principal, policy, registry, to_ports},
    };
    use crate::policy::model::{Action, Operation, PolicyBundle, Rule, StringMatch};

    /// `authz` compiled against the test registry.
    pub(crate) fn compiled(
        authz: Vec<crate::policy::model::AuthorizationPolicy>,
    ) -> CompiledPolicy {
        compile(
            &PolicyBundle {
                authz,
                peer_authn: vec![],
            },
            &registry(),
            "istio-system",
            "cluster.local",
        )
        .unwrap()
    }

    fn view(authz: Vec<crate::policy::model::AuthorizationPolicy>) -> PolicyView {
        PolicyView::build(7, RawGeneration::from(&compiled(authz))).unwrap()
    }

    pub(crate) fn get_api(action: Action, name: &str) -> crate::policy::model::AuthorizationPolicy {
        policy(
            "default",
            name,
            Some("b"),
            action,
            Some(vec![Rule {
                from: vec![from_principal("cluster.local/ns/default/sa/sa-a")],
                to: vec![Operation {
                    methods: vec![StringMatch::Exact("GET".into())],
                    paths: vec![StringMatch::from_pattern("/api/*")],
                    not_paths: vec![StringMatch::Exact("/api/secret".into())],
                    ..Operation::default()
                }],
                when: vec![],
            }]),
        )
    }

    #[test]
    fn no_policy_allows() {
        let v = PolicyView::default();
        let d = v.decide_l4(1, 3, Family::V4, 80);
        assert_eq!(d.verdict, ConnVerdict::Allow);
        assert!(d.key.is_none());
    }

    #[test]
    fn l4_decisions_match_the_kernel_lookup() {
        let v = view(vec![policy(
            "default",
            "allow-a",
            Some("b"),
            Action::Allow,
            Some(vec![Rule {
                from: vec![from_principal("cluster.local/ns/default/sa/sa-a")],
                to: vec![to_ports(&[9000])],
                when: vec![],
            }]),
        )]);
        let d = v.decide_l4(1, 4, Family::V4, 9000);
        assert_eq!(d.verdict, ConnVerdict::Allow);
        assert_eq!(d.policy.as_deref(), Some("default/allow-a"));
        // (source, family, port) → verdict: another port, another source, IPv6 of a1 (the same
        // principal), an unknown source workload (fail closed).
        for (src, family, port, want) in [
            (1, Family::V4, 9001, ConnVerdict::Deny),
            (5, Family::V4, 9000, ConnVerdict::Deny),
            (1, Family::V6, 9000, ConnVerdict::Allow),
            (99, Family::V4, 9000, ConnVerdict::Deny),
        ] {
            assert_eq!(
                v.decide_l4(src, 4, family, port).verdict,
                want,
                "{src} {port}"
            );
        }
    }

    #[test]
    fn allow_per_request() {
        let v = view(vec![get_api(Action::Allow, "allow-get")]);
        let d = v.decide_l4(1, 3, Family::V4, 8080);
        assert_eq!(d.verdict, ConnVerdict::PerRequest);
        assert!(d.needs_request);
        let (set, class) = d.key.unwrap();
        let r = v.decide_request(set, class, 8080, "GET", "/api/x", "b");
        assert!(r.allowed());
        assert_eq!(r.policy.as_deref(), Some("default/allow-get"));
        assert!(!v
            .decide_request(set, class, 8080, "POST", "/api/x", "b")
            .allowed());
        assert!(!v
            .decide_request(set, class, 8080, "GET", "/apx", "b")
            .allowed());
        assert!(!v
            .decide_request(set, class, 8080, "GET", "/api/secret", "b")
            .allowed());
        // c1 is not sa-a: denied at L4.
        assert_eq!(
            v.decide_l4(5, 3, Family::V4, 8080).verdict,
            ConnVerdict::Deny
        );
    }

    #[test]
    fn hosts_ignore_case_keep_port_paths_ignore_query() {
        // Regression (property test): the view compared hosts case-sensitively and without
        // stripping `:port`, and left the query string on the path (the evaluator does not).
        let allow = policy(
            "default",
            "allow-web",
            Some("b"),
            Action::Allow,
            Some(vec![Rule {
                from: vec![],
                to: vec![Operation {
                    hosts: vec![StringMatch::from_pattern("web.svc")],
                    paths: vec![StringMatch::from_pattern("*.json")],
                    ..Operation::default()
                }],
                when: vec![],
            }]),
        );
        let v = view(vec![allow]);
        let (set, class) = v.decide_l4(1, 3, Family::V4, 8080).key.unwrap();
        let allowed = |path, host| {
            v.decide_request(set, class, 8080, "GET", path, host)
                .allowed()
        };
        assert!(allowed("/a.json", "web.svc"));
        assert!(allowed("/a.json", "Web.SVC"));
        assert!(!allowed("/a.json", "web.svc:8080"));
        assert!(allowed("/a.json?x=1", "web.svc"));
        assert!(!allowed("/a.json/x", "web.svc"));
        assert!(!allowed("/a.json", "web.svc:x"));
        assert!(!allowed("/a.json", "other"));
    }

    #[test]
    fn deny_per_request_then_allowed() {
        let v = view(vec![get_api(Action::Deny, "deny-get")]);
        let d = v.decide_l4(1, 3, Family::V4, 8080);
        assert_eq!(d.verdict, ConnVerdict::PerRequest);
        let (set, class) = d.key.unwrap();
        let r = v.decide_request(set, class, 8080, "GET", "/api/x", "");
        assert!(!r.allowed());
        assert_eq!(r.policy.as_deref(), Some("default/deny-get"));
        assert!(v
            .decide_request(set, class, 8080, "POST", "/api/x", "")
            .allowed());
    }

    #[test]
    fn dry_run_and_audit_reported() {
        let mut dry = get_api(Action::Deny, "dry-get");
        dry.dry_run = true;
        let audit = policy(
            "default",
            "audit-post",
            Some("b"),
            Action::Audit,
            Some(vec![Rule {
                from: vec![],
                to: vec![Operation {
                    methods: vec![StringMatch::Exact("POST".into())],
                    ..Operation::default()
                }],
                when: vec![],
            }]),
        );
        let v = view(vec![dry, audit]);
        let d = v.decide_l4(1, 3, Family::V4, 8080);
        assert_eq!(d.verdict, ConnVerdict::Allow);
        assert!(d.needs_request);
        let (set, class) = d.key.unwrap();
        let r = v.decide_request(set, class, 8080, "GET", "/api/x", "");
        assert!(r.allowed());
        assert_eq!(r.dry_run_deny, Some(Some(Arc::from("default/dry-get"))));
        assert!(r.audit.is_empty());
        let r = v.decide_request(set, class, 8080, "POST", "/api/x", "");
        assert!(r.allowed() && r.dry_run_deny.is_none());
        assert_eq!(r.audit, vec![Arc::<str>::from("default/audit-post")]);
        // On b2 (no HTTP port) the AUDIT matches ignoring its method: at L4.
        let d = v.decide_l4(1, 4, Family::V4, 8080);
        assert_eq!(d.audit.as_deref(), Some("default/audit-post"));
    }
}
