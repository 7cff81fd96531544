//! Services of the registry (`services:`), as a Kubernetes Service has them: a
//! `namespace/name`, virtual IPs (`vips:`, IPv4 and/or IPv6), ports (`port` → `targetPort`,
//! optional `name`, `protocol: TCP`) and a label `selector` over the workloads of the same
//! namespace. The selected workloads are the service's endpoints.
//!
//! The proxies read services through one [`ServiceTable`], part of the registry snapshot: a
//! later pushed update replaces the snapshot (and so the table) as a whole.
//!
//! Like workloads, each entry is validated against the services kept before it and claims its
//! `namespace/name`, VIPs and id only once kept, so that a refused entry blocks no later one.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    net::IpAddr,
};

use serde::Deserialize;
use serde_saphyr::Spanned;

use super::{file_line, flow_list, flow_map, quote, unusable, Workload};
use crate::names::is_dns_label;

/// One service of the mesh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    /// The id the kernel's `mesh_dests` carries (never 0, unique): the `id:` of the entry, or
    /// without `id:` fields its 1-based position among the kept services.
    pub id: u32,
    /// The service's name (a DNS-1123 label).
    pub name: String,
    /// Its namespace (a DNS-1123 label).
    pub namespace: String,
    /// Its virtual IPs (at least one; unique across services, never a workload or node address).
    pub vips: Vec<IpAddr>,
    /// Its ports (at least one; `port` unique within the service).
    pub ports: Vec<ServicePort>,
    /// The label selector (never empty): a workload of the same namespace whose labels include
    /// every pair is an endpoint.
    pub selector: BTreeMap<String, String>,
    /// Ids of the selected workloads (whatever they are), in registry order.
    pub endpoints: Vec<u32>,
}

/// One port of a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// Optional port name (a DNS-1123 label).
    pub name: Option<String>,
    /// The port clients connect to on a VIP.
    pub port: u16,
    /// The port of the endpoint workloads the connection is carried to.
    pub target_port: u16,
}

impl Service {
    /// `namespace/name`, the name flow records, metrics and errors use.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The port entry for a client's destination `port`, if the service declares it.
    pub fn port(&self, port: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == port)
    }
}

/// Every service of the mesh, indexed by VIP and id: what the outbound proxy reads.
#[derive(Clone, Debug, Default)]
pub struct ServiceTable {
    /// In file order (ids unique).
    pub services: Vec<Service>,
    /// VIP → position in `services`.
    vip_index: HashMap<IpAddr, usize>,
    /// Id → position in `services`.
    id_index: HashMap<u32, usize>,
}

/// Equal when the services are (the indexes follow from them).
impl PartialEq for ServiceTable {
    fn eq(&self, other: &Self) -> bool {
        self.services == other.services
    }
}

impl Eq for ServiceTable {}

impl ServiceTable {
    /// The table of `services`, indexed.
    fn new(services: Vec<Service>) -> Self {
        let mut table = Self {
            services,
            vip_index: HashMap::new(),
            id_index: HashMap::new(),
        };
        table.reindex();
        table
    }

    fn reindex(&mut self) {
        self.vip_index = self
            .services
            .iter()
            .enumerate()
            .flat_map(|(i, s)| s.vips.iter().map(move |ip| (*ip, i)))
            .collect();
        self.id_index = self
            .services
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id, i))
            .collect();
    }

    /// Every service's id replaced by `service(key)`, and every endpoint (a workload id) by
    /// its entry in `workloads` (old id → new id): see [`super::Registry::with_ids`].
    pub(super) fn renumber(
        &mut self,
        mut service: impl FnMut(&str) -> u32,
        workloads: &HashMap<u32, u32>,
    ) {
        for s in &mut self.services {
            s.id = service(&s.key());
            debug_assert_ne!(s.id, 0, "with_ids: service {} given id 0", s.key());
            for e in &mut s.endpoints {
                debug_assert!(workloads.contains_key(e), "endpoint {e} is no workload");
                *e = workloads.get(e).copied().unwrap_or(*e);
            }
        }
        self.reindex();
        debug_assert_eq!(
            self.id_index.len(),
            self.services.len(),
            "with_ids: service ids must be unique"
        );
    }

    /// Writes `services:` (nothing without services) as [`super::Registry::to_yaml`] does.
    pub(super) fn write_yaml(&self, out: &mut String) {
        if self.services.is_empty() {
            return;
        }
        out.push_str("services:\n");
        for s in &self.services {
            let _ = writeln!(out, "  - id: {}", s.id);
            let _ = writeln!(out, "    name: {}", quote(&s.name));
            let _ = writeln!(out, "    namespace: {}", quote(&s.namespace));
            let vips = flow_list(s.vips.iter().map(|ip| quote(&ip.to_string())));
            let _ = writeln!(out, "    vips: {vips}");
            out.push_str("    ports:\n");
            for p in &s.ports {
                let _ = write!(
                    out,
                    "      - {{port: {}, targetPort: {}",
                    p.port, p.target_port
                );
                if let Some(name) = &p.name {
                    let _ = write!(out, ", name: {}", quote(name));
                }
                out.push_str("}\n");
            }
            let _ = writeln!(out, "    selector: {}", flow_map(&s.selector));
        }
    }

    /// The service that has virtual IP `ip` (IPv4-mapped IPv6 looked up as IPv4).
    pub fn by_vip(&self, ip: IpAddr) -> Option<&Service> {
        self.vip_index
            .get(&ip.to_canonical())
            .and_then(|&i| self.services.get(i))
    }

    /// The service with id `id`.
    pub fn by_id(&self, id: u32) -> Option<&Service> {
        self.id_index.get(&id).and_then(|&i| self.services.get(i))
    }

    /// Whether the mesh has no service.
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }
}

/// One service as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawService {
    /// Optional; all services have one or none does.
    id: Option<Spanned<u64>>,
    name: Option<Spanned<String>>,
    namespace: Option<Spanned<String>>,
    vips: Option<Spanned<Vec<Spanned<String>>>>,
    ports: Option<Spanned<Vec<Spanned<RawPort>>>>,
    selector: Option<Spanned<BTreeMap<String, String>>>,
}

impl RawService {
    /// Whether the entry carries `id:`.
    pub(super) fn has_id(&self) -> bool {
        self.id.is_some()
    }
}

/// One service port as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawPort {
    name: Option<Spanned<String>>,
    port: Option<Spanned<u64>>,
    target_port: Option<Spanned<u64>>,
    protocol: Option<Spanned<String>>,
}

/// What is wrong with one service (the registry error names the file and line).
#[derive(Debug, thiserror::Error)]
pub enum ServiceProblem {
    #[error("missing required field `{0}`")]
    MissingField(&'static str),
    #[error(
        "{field} {value:?} is not a DNS-1123 label (1-63 lowercase letters, digits or '-', \
         starting and ending with a letter or digit)"
    )]
    InvalidName { field: &'static str, value: String },
    #[error("is listed twice (first on line {first_line})")]
    Duplicate { first_line: usize },
    #[error("has no virtual IPs (`vips` needs at least one)")]
    NoVips,
    #[error("{0:?} is not an IP address")]
    InvalidVip(String),
    #[error("{ip} cannot be a virtual IP ({reason})")]
    UnusableVip { ip: IpAddr, reason: &'static str },
    #[error("virtual IP {ip} is the address of workload {workload}")]
    VipIsWorkload { ip: IpAddr, workload: String },
    #[error("virtual IP {ip} is the address of node {node}")]
    VipIsNode { ip: IpAddr, node: String },
    #[error("virtual IP {ip} is already a virtual IP of service {first} (line {first_line})")]
    DuplicateVip {
        ip: IpAddr,
        first: String,
        first_line: usize,
    },
    #[error("has no ports (`ports` needs at least one)")]
    NoPorts,
    #[error("{field} {value} is not a port (1..=65535)")]
    InvalidPort { field: &'static str, value: u64 },
    #[error("port {port} is listed twice (each VIP:port leads to one targetPort)")]
    DuplicatePort { port: u16 },
    #[error("protocol {0:?} is not supported (only TCP)")]
    UnsupportedProtocol(String),
    #[error("is one service too many (at most {} services)", u32::MAX)]
    TooMany,
    #[error("has an empty selector (it would select every workload of its namespace)")]
    EmptySelector,
    #[error("has no `id` while other services have one (all or none)")]
    MissingId,
    #[error("id {0} is not a service id (1..=4294967295)")]
    InvalidId(u64),
    #[error("id {id} is already the id of service {first} (line {first_line})")]
    DuplicateId {
        id: u32,
        first: String,
        first_line: usize,
    },
}

/// Validates `services:`, entry by entry, against the kept workloads and node addresses. Each
/// refusal is a (line, service name, problem) for the caller to wrap.
pub(super) struct ServiceValidator<'a> {
    workload_ips: &'a HashMap<IpAddr, (String, usize)>,
    node_addrs: &'a HashMap<IpAddr, (String, usize)>,
    workloads: &'a [Workload],
    /// Whether services carry `id:` (then every one must).
    explicit_ids: bool,
    /// Lines of the file before the text the current entry was read from.
    base: usize,
    key_lines: HashMap<String, usize>,
    vip_lines: HashMap<IpAddr, (String, usize)>,
    /// Explicit id → (service key, line of its `id`).
    id_lines: HashMap<u32, (String, usize)>,
    services: Vec<Service>,
    /// (namespace, label key, label value) → positions of the workloads that have it, in
    /// order: built on the first service, so 1,000 selectors over 10,000 workloads do not
    /// compare every pair.
    label_index: std::cell::OnceCell<LabelIndex<'a>>,
}

/// (namespace, label key, label value) → positions of the workloads that have it.
type LabelIndex<'a> = HashMap<(&'a str, &'a str, &'a str), Vec<usize>>;

/// A refused service: where, which, what.
pub(super) type Refusal = (usize, String, ServiceProblem);

impl<'a> ServiceValidator<'a> {
    pub fn new(
        workload_ips: &'a HashMap<IpAddr, (String, usize)>,
        node_addrs: &'a HashMap<IpAddr, (String, usize)>,
        workloads: &'a [Workload],
        explicit_ids: bool,
    ) -> Self {
        Self {
            workload_ips,
            node_addrs,
            workloads,
            explicit_ids,
            base: 0,
            key_lines: HashMap::new(),
            vip_lines: HashMap::new(),
            id_lines: HashMap::new(),
            services: Vec::new(),
            label_index: std::cell::OnceCell::new(),
        }
    }

    /// The ids of the workloads of `namespace` that `selector` (not empty) selects, in order.
    fn endpoints(&self, namespace: &str, selector: &BTreeMap<String, String>) -> Vec<u32> {
        let workloads = self.workloads;
        let index = self.label_index.get_or_init(|| {
            let mut index = LabelIndex::new();
            for (i, w) in workloads.iter().enumerate() {
                for (k, v) in &w.labels {
                    index
                        .entry((w.namespace.as_str(), k.as_str(), v.as_str()))
                        .or_default()
                        .push(i);
                }
            }
            index
        });
        // The rarest pair's workloads, checked against the whole selector.
        let candidates = selector
            .iter()
            .map(|(k, v)| {
                index
                    .get(&(namespace, k.as_str(), v.as_str()))
                    .map_or(&[][..], Vec::as_slice)
            })
            .min_by_key(|c| c.len())
            .unwrap_or(&[]);
        candidates
            .iter()
            .map(|&i| &workloads[i])
            .filter(|w| selects(selector, &w.labels))
            .map(|w| w.id)
            .collect()
    }

    /// Validates the `position`th (1-based) entry of `services:`, read from a text that
    /// starts after `base` lines of the file, and keeps it; or says why not (then it
    /// claims nothing).
    pub fn entry(
        &mut self,
        raw: Spanned<RawService>,
        base: usize,
        position: usize,
    ) -> Result<(), Refusal> {
        self.base = base;
        let line = self.at(&raw, 1);
        let service = self.service(raw.value, line, position)?;
        self.services.push(service);
        Ok(())
    }

    /// The kept services, indexed.
    pub fn finish(self) -> ServiceTable {
        ServiceTable::new(self.services)
    }

    /// The file line of `v` (read in the current entry), or `fallback` (a file line).
    fn at<T>(&self, v: &Spanned<T>, fallback: usize) -> usize {
        file_line(self.base, v, fallback)
    }

    fn service(
        &mut self,
        raw: RawService,
        line: usize,
        position: usize,
    ) -> Result<Service, Refusal> {
        let provisional = format!("#{position}");
        let next_id = u32::try_from(self.services.len() + 1)
            .map_err(|_| (line, provisional.clone(), ServiceProblem::TooMany))?;
        let fail = |l: usize, who: &str, p: ServiceProblem| (l, who.to_owned(), p);
        let name = raw
            .name
            .ok_or_else(|| fail(line, &provisional, ServiceProblem::MissingField("name")))?;
        let namespace = raw.namespace.ok_or_else(|| {
            fail(
                line,
                &provisional,
                ServiceProblem::MissingField("namespace"),
            )
        })?;
        for (field, v) in [("namespace", &namespace), ("name", &name)] {
            if !is_dns_label(&v.value) {
                return Err(fail(
                    self.at(v, line),
                    &provisional,
                    ServiceProblem::InvalidName {
                        field,
                        value: v.value.clone(),
                    },
                ));
            }
        }
        let key = format!("{}/{}", namespace.value, name.value);
        if let Some(&first_line) = self.key_lines.get(&key) {
            return Err(fail(line, &key, ServiceProblem::Duplicate { first_line }));
        }
        let (id, id_line) = match (self.explicit_ids, raw.id) {
            (false, _) => (next_id, None),
            (true, None) => return Err(fail(line, &key, ServiceProblem::MissingId)),
            (true, Some(v)) => {
                let id_line = self.at(&v, line);
                let id = match u32::try_from(v.value) {
                    Ok(id) if id != 0 => id,
                    _ => return Err(fail(id_line, &key, ServiceProblem::InvalidId(v.value))),
                };
                if let Some((first, first_line)) = self.id_lines.get(&id) {
                    return Err(fail(
                        id_line,
                        &key,
                        ServiceProblem::DuplicateId {
                            id,
                            first: first.clone(),
                            first_line: *first_line,
                        },
                    ));
                }
                (id, Some(id_line))
            }
        };

        let vips = raw
            .vips
            .ok_or_else(|| fail(line, &key, ServiceProblem::MissingField("vips")))?;
        let vips = self.vips(&key, vips, line)?;
        let ports = raw
            .ports
            .ok_or_else(|| fail(line, &key, ServiceProblem::MissingField("ports")))?;
        let ports = ports_of(&key, ports, line, self.base)?;
        let selector = raw
            .selector
            .ok_or_else(|| fail(line, &key, ServiceProblem::MissingField("selector")))?;
        if selector.value.is_empty() {
            return Err(fail(
                self.at(&selector, line),
                &key,
                ServiceProblem::EmptySelector,
            ));
        }
        let selector = selector.value;
        let endpoints = self.endpoints(&namespace.value, &selector);

        // Kept: claim.
        for &(ip, l) in &vips {
            self.vip_lines.insert(ip, (key.clone(), l));
        }
        if let Some(id_line) = id_line {
            self.id_lines.insert(id, (key.clone(), id_line));
        }
        self.key_lines.insert(key, line);
        Ok(Service {
            id,
            name: name.value,
            namespace: namespace.value,
            vips: vips.into_iter().map(|(ip, _)| ip).collect(),
            ports,
            selector,
            endpoints,
        })
    }

    /// The VIPs of service `key`, each with its line.
    fn vips(
        &self,
        key: &str,
        raw: Spanned<Vec<Spanned<String>>>,
        line: usize,
    ) -> Result<Vec<(IpAddr, usize)>, Refusal> {
        let list_line = self.at(&raw, line);
        if raw.value.is_empty() {
            return Err((list_line, key.to_owned(), ServiceProblem::NoVips));
        }
        let mut vips: Vec<(IpAddr, usize)> = Vec::with_capacity(raw.value.len());
        for v in raw.value {
            let l = self.at(&v, list_line);
            let fail = |p| (l, key.to_owned(), p);
            let ip: IpAddr = v
                .value
                .trim()
                .parse()
                .map_err(|_| fail(ServiceProblem::InvalidVip(v.value.clone())))?;
            if let Some(reason) = unusable(ip) {
                return Err(fail(ServiceProblem::UnusableVip { ip, reason }));
            }
            if let Some((workload, _)) = self.workload_ips.get(&ip) {
                return Err(fail(ServiceProblem::VipIsWorkload {
                    ip,
                    workload: workload.clone(),
                }));
            }
            if let Some((node, _)) = self.node_addrs.get(&ip) {
                return Err(fail(ServiceProblem::VipIsNode {
                    ip,
                    node: node.clone(),
                }));
            }
            let first = match self.vip_lines.get(&ip) {
                Some((first, first_line)) => Some((first.clone(), *first_line)),
                None => vips
                    .iter()
                    .find(|(o, _)| *o == ip)
                    .map(|&(_, first_line)| (key.to_owned(), first_line)),
            };
            if let Some((first, first_line)) = first {
                return Err(fail(ServiceProblem::DuplicateVip {
                    ip,
                    first,
                    first_line,
                }));
            }
            vips.push((ip, l));
        }
        Ok(vips)
    }
}

/// Validates the `ports:` of service `key`.
fn ports_of(
    key: &str,
    raw: Spanned<Vec<Spanned<RawPort>>>,
    line: usize,
    base: usize,
) -> Result<Vec<ServicePort>, Refusal> {
    let list_line = file_line(base, &raw, line);
    if raw.value.is_empty() {
        return Err((list_line, key.to_owned(), ServiceProblem::NoPorts));
    }
    let mut ports: Vec<ServicePort> = Vec::with_capacity(raw.value.len());
    for entry in raw.value {
        let l = file_line(base, &entry, list_line);
        let fail = |p| (l, key.to_owned(), p);
        let p = entry.value;
        let number = |field: &'static str, v: Option<Spanned<u64>>| {
            let v = v.ok_or_else(|| fail(ServiceProblem::MissingField(field)))?;
            match u16::try_from(v.value) {
                Ok(n) if n != 0 => Ok(n),
                _ => Err((
                    file_line(base, &v, l),
                    key.to_owned(),
                    ServiceProblem::InvalidPort {
                        field,
                        value: v.value,
                    },
                )),
            }
        };
        let port = number("port", p.port)?;
        let target_port = number("targetPort", p.target_port)?;
        if let Some(proto) = p.protocol {
            if proto.value != "TCP" {
                return Err((
                    file_line(base, &proto, l),
                    key.to_owned(),
                    ServiceProblem::UnsupportedProtocol(proto.value),
                ));
            }
        }
        let name = match p.name {
            None => None,
            Some(n) if is_dns_label(&n.value) => Some(n.value),
            Some(n) => {
                return Err((
                    file_line(base, &n, l),
                    key.to_owned(),
                    ServiceProblem::InvalidName {
                        field: "ports[].name",
                        value: n.value,
                    },
                ))
            }
        };
        if ports.iter().any(|q| q.port == port) {
            return Err(fail(ServiceProblem::DuplicatePort { port }));
        }
        ports.push(ServicePort {
            name,
            port,
            target_port,
        });
    }
    Ok(ports)
}

/// Whether `labels` include every pair of `selector`.
fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}
