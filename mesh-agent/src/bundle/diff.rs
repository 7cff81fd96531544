//! What changes between two bundles: nodes, workloads, services and policies added, removed or
//! changed (which fields), and for each changed policy the workloads it selects before and
//! after — "for which workloads" a change matters.
//!
//! The comparison is of meaning, not text: both registries are parsed and both policy sets
//! loaded, so comments, formatting, key order and a policy moved to another file are no
//! differences. A policy whose text did not change but whose selection did (a workload's
//! labels changed, a workload came or went) is listed as changed, with no fields.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use serde::Serialize;

use super::Bundle;
use crate::{
    policy::{
        eval::{self, Target},
        model::{AuthorizationPolicy, PeerAuthentication, PolicyBundle},
        parse::PolicyError,
    },
    registry::{NodeEntry, Registry, RegistryError, Service, Workload},
};

/// Why two bundles could not be compared.
#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    #[error("{side} bundle: {source}")]
    Registry {
        side: &'static str,
        #[source]
        source: RegistryError,
    },
    #[error("{side} bundle: {source}")]
    Policy {
        side: &'static str,
        #[source]
        source: Box<PolicyError>,
    },
}

/// One side of the comparison.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Side {
    pub version: u64,
    pub digest: String,
    pub created: String,
    pub source_revision: Option<String>,
    /// Its rollout (activation time, canaries), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rollout: Option<super::Rollout>,
}

/// Entries of one kind added, removed and changed (sorted by name).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Changes {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<Changed>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// An entry present on both sides with different fields.
#[derive(Clone, Debug, Serialize)]
pub struct Changed {
    pub name: String,
    pub fields: Vec<&'static str>,
}

/// A policy present on one side only, and the workloads it selects there.
#[derive(Clone, Debug, Serialize)]
pub struct PolicyEntry {
    pub kind: &'static str,
    /// `namespace/name`.
    pub policy: String,
    pub workloads: Vec<String>,
}

/// A policy on both sides whose fields or selection differ.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyChange {
    pub kind: &'static str,
    /// `namespace/name`.
    pub policy: String,
    /// The fields that differ (empty: only the selection changed).
    pub fields: Vec<&'static str>,
    /// Workloads (`namespace/name`) it selects in the old bundle.
    pub workloads_before: Vec<String>,
    /// Workloads it selects in the new bundle.
    pub workloads_after: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct PolicyChanges {
    pub added: Vec<PolicyEntry>,
    pub removed: Vec<PolicyEntry>,
    pub changed: Vec<PolicyChange>,
}

impl PolicyChanges {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// The difference between two bundles.
#[derive(Clone, Debug, Serialize)]
pub struct Diff {
    pub old: Side,
    pub new: Side,
    /// No node, workload, service or policy differs.
    pub identical: bool,
    pub nodes: Changes,
    pub workloads: Changes,
    pub services: Changes,
    pub policies: PolicyChanges,
}

/// Compares `old` with `new`; `root_ns` is Istio's root namespace (its policies select
/// workloads of every namespace).
pub fn diff(old: &Bundle, new: &Bundle, root_ns: &str) -> Result<Diff, DiffError> {
    let (old_reg, old_pol) = load(old, "old")?;
    let (new_reg, new_pol) = load(new, "new")?;
    let nodes = compare(
        &old_reg.nodes,
        &new_reg.nodes,
        |n| n.name.clone(),
        node_fields,
    );
    let workloads = compare(
        &old_reg.workloads,
        &new_reg.workloads,
        Workload::key,
        workload_fields,
    );
    let old_services = services(&old_reg);
    let new_services = services(&new_reg);
    let services = compare(&old_services, &new_services, |s| s.0.key(), service_fields);
    let policies = compare_policies((&old_pol, &old_reg), (&new_pol, &new_reg), root_ns);
    let identical =
        nodes.is_empty() && workloads.is_empty() && services.is_empty() && policies.is_empty();
    Ok(Diff {
        old: side(old),
        new: side(new),
        identical,
        nodes,
        workloads,
        services,
        policies,
    })
}

fn side(b: &Bundle) -> Side {
    Side {
        version: b.version(),
        digest: b.digest().to_owned(),
        created: b.created().to_owned(),
        source_revision: b.source_revision().map(str::to_owned),
        rollout: b.rollout().cloned(),
    }
}

fn load(b: &Bundle, side: &'static str) -> Result<(Registry, PolicyBundle), DiffError> {
    let registry = Registry::parse_all(b.registry_text(), Path::new(super::build::REGISTRY_FILE))
        .map_err(|source| DiffError::Registry { side, source })?;
    let policies = b.parse_policies().map_err(|source| DiffError::Policy {
        side,
        source: Box::new(source),
    })?;
    Ok((registry, policies))
}

/// Entries keyed by `key`, compared field by field with `fields`.
fn compare<T>(
    old: &[T],
    new: &[T],
    key: impl Fn(&T) -> String,
    fields: impl Fn(&T, &T) -> Vec<&'static str>,
) -> Changes {
    let old: BTreeMap<String, &T> = old.iter().map(|e| (key(e), e)).collect();
    let new: BTreeMap<String, &T> = new.iter().map(|e| (key(e), e)).collect();
    let mut out = Changes::default();
    for (name, o) in &old {
        match new.get(name) {
            None => out.removed.push(name.clone()),
            Some(n) => {
                let f = fields(o, n);
                if !f.is_empty() {
                    out.changed.push(Changed {
                        name: name.clone(),
                        fields: f,
                    });
                }
            }
        }
    }
    out.added = new
        .keys()
        .filter(|k| !old.contains_key(*k))
        .cloned()
        .collect();
    out
}

/// Field names whose values differ: `differ!(a, b; "name" => expr, …)` with `expr` a closure
/// over an entry.
macro_rules! differing {
    ($a:expr, $b:expr; $($name:literal => $f:expr),+ $(,)?) => {{
        let mut out = Vec::new();
        $( if $f($a) != $f($b) { out.push($name); } )+
        out
    }};
}

fn node_fields(a: &NodeEntry, b: &NodeEntry) -> Vec<&'static str> {
    differing!(a, b;
        "address" => |n: &NodeEntry| n.address,
        "address6" => |n: &NodeEntry| n.address6,
    )
}

fn workload_fields(a: &Workload, b: &Workload) -> Vec<&'static str> {
    differing!(a, b;
        "serviceAccount" => |w: &Workload| w.service_account.clone(),
        "node" => |w: &Workload| w.node.clone(),
        "ips" => |w: &Workload| w.ips.clone(),
        "cgroup" => |w: &Workload| w.cgroup.clone(),
        "labels" => |w: &Workload| w.labels.clone(),
        "peerAuthentication" => |w: &Workload| w.permissive,
        "httpPorts" => |w: &Workload| w.http_ports.clone(),
    )
}

/// A service with its endpoints named (`namespace/name`), not numbered: ids are positions in
/// a hand-written registry and say nothing across two bundles.
struct NamedService<'a>(&'a Service, BTreeSet<String>);

fn services(r: &Registry) -> Vec<NamedService<'_>> {
    r.services
        .services
        .iter()
        .map(|s| {
            let endpoints = s
                .endpoints
                .iter()
                .filter_map(|id| r.by_id(*id).map(Workload::key))
                .collect();
            NamedService(s, endpoints)
        })
        .collect()
}

fn service_fields(a: &NamedService<'_>, b: &NamedService<'_>) -> Vec<&'static str> {
    differing!(a, b;
        "vips" => |s: &NamedService<'_>| s.0.vips.clone(),
        "ports" => |s: &NamedService<'_>| s.0.ports.clone(),
        "selector" => |s: &NamedService<'_>| s.0.selector.clone(),
        "endpoints" => |s: &NamedService<'_>| s.1.clone(),
    )
}

/// One policy of either kind, for comparison.
enum Policy<'a> {
    Authz(&'a AuthorizationPolicy),
    Peer(&'a PeerAuthentication),
}

impl Policy<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Self::Authz(_) => "AuthorizationPolicy",
            Self::Peer(_) => "PeerAuthentication",
        }
    }

    fn fields(&self, other: &Self) -> Vec<&'static str> {
        match (self, other) {
            (Self::Authz(a), Self::Authz(b)) => differing!(*a, *b;
                "selector" => |p: &AuthorizationPolicy| p.selector.clone(),
                "action" => |p: &AuthorizationPolicy| p.action,
                "rules" => |p: &AuthorizationPolicy| p.rules.clone(),
                "dryRun" => |p: &AuthorizationPolicy| p.dry_run,
            ),
            (Self::Peer(a), Self::Peer(b)) => differing!(*a, *b;
                "selector" => |p: &PeerAuthentication| p.selector.clone(),
                "mtls" => |p: &PeerAuthentication| p.mode,
                "portLevelMtls" => |p: &PeerAuthentication| p.port_level.clone(),
            ),
            _ => vec!["kind"],
        }
    }

    /// The workloads of `r` the policy applies to (`namespace/name`, sorted).
    fn selects(&self, r: &Registry, root_ns: &str) -> Vec<String> {
        let mut out: Vec<String> = r
            .workloads
            .iter()
            .filter(|w| {
                let target = Target {
                    namespace: &w.namespace,
                    labels: &w.labels,
                };
                match self {
                    Self::Authz(p) => eval::selects(p, root_ns, target),
                    Self::Peer(p) => peer_selects(p, root_ns, target),
                }
            })
            .map(Workload::key)
            .collect();
        out.sort();
        out
    }
}

/// Whether PeerAuthentication `p` is in scope for `target`, as `eval::effective_port_mtls`
/// composes them: the root namespace's without a selector (mesh-wide), a namespace's without
/// a selector, a namespace's with a selector over the labels. A selector policy in the root
/// namespace applies to nothing.
fn peer_selects(p: &PeerAuthentication, root_ns: &str, target: Target<'_>) -> bool {
    let selector = p.selector.as_ref().filter(|s| !s.is_empty());
    match selector {
        None => p.namespace == root_ns || p.namespace == target.namespace,
        Some(sel) => {
            p.namespace != root_ns
                && p.namespace == target.namespace
                && sel.iter().all(|(k, v)| target.labels.get(k) == Some(v))
        }
    }
}

fn policies(b: &PolicyBundle) -> BTreeMap<(&'static str, String), Policy<'_>> {
    let authz = b
        .authz
        .iter()
        .map(|p| (("AuthorizationPolicy", p.key()), Policy::Authz(p)));
    let peer = b.peer_authn.iter().map(|p| {
        (
            ("PeerAuthentication", format!("{}/{}", p.namespace, p.name)),
            Policy::Peer(p),
        )
    });
    authz.chain(peer).collect()
}

fn compare_policies(
    (old, old_reg): (&PolicyBundle, &Registry),
    (new, new_reg): (&PolicyBundle, &Registry),
    root_ns: &str,
) -> PolicyChanges {
    let old = policies(old);
    let new = policies(new);
    let mut out = PolicyChanges::default();
    let entry = |p: &Policy<'_>, key: &str, r: &Registry| PolicyEntry {
        kind: p.kind(),
        policy: key.to_owned(),
        workloads: p.selects(r, root_ns),
    };
    for ((_, key), o) in &old {
        match new.get(&(o.kind(), key.clone())) {
            None => out.removed.push(entry(o, key, old_reg)),
            Some(n) => {
                let fields = o.fields(n);
                let before = o.selects(old_reg, root_ns);
                let after = n.selects(new_reg, root_ns);
                if !fields.is_empty() || before != after {
                    out.changed.push(PolicyChange {
                        kind: o.kind(),
                        policy: key.clone(),
                        fields,
                        workloads_before: before,
                        workloads_after: after,
                    });
                }
            }
        }
    }
    for ((kind, key), n) in &new {
        if !old.contains_key(&(*kind, key.clone())) {
            out.added.push(entry(n, key, new_reg));
        }
    }
    out
}
