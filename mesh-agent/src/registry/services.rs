//! Services of the registry (`services:`), as a Kubernetes Service has them: a
//! `namespace/name`, virtual IPs (`vips:`, IPv4 and/or IPv6), ports (`port` → `targetPort`,
//! optional `name`, `protocol: TCP`) and a label `selector` over the workloads of the same
//! namespace. The selected workloads are the service's endpoints.
//!
//! The proxies read services through one [`ServiceTable`], part of the registry snapshot: a
//! later pushed update replaces the snapshot (and so the table) as a whole.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use serde::Deserialize;
use serde_saphyr::Spanned;

use super::{unusable, Workload};
use crate::names::is_dns_label;
use crate::yaml::line_of;

/// One service of the mesh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    /// 1-based position in `services:` (never 0): the id the kernel's `mesh_dests` carries.
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
    /// Ids of the selected workloads, in registry order.
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

/// Every service of the mesh, indexed by VIP: what the outbound proxy reads.
#[derive(Clone, Debug, Default)]
pub struct ServiceTable {
    /// In file order; `services[i].id == i + 1`.
    pub services: Vec<Service>,
    /// VIP → position in `services`.
    vip_index: HashMap<IpAddr, usize>,
}

impl ServiceTable {
    /// The service that has virtual IP `ip` (IPv4-mapped IPv6 looked up as IPv4).
    pub fn by_vip(&self, ip: IpAddr) -> Option<&Service> {
        self.vip_index
            .get(&ip.to_canonical())
            .and_then(|&i| self.services.get(i))
    }

    /// The service with id `id`.
    pub fn by_id(&self, id: u32) -> Option<&Service> {
        let index = usize::try_from(id).ok()?.checked_sub(1)?;
        self.services.get(index)
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
    name: Option<Spanned<String>>,
    namespace: Option<Spanned<String>>,
    vips: Option<Spanned<Vec<Spanned<String>>>>,
    ports: Option<Spanned<Vec<Spanned<RawPort>>>>,
    selector: Option<Spanned<BTreeMap<String, String>>>,
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
}

/// Validates `services:` against the validated workloads and node addresses. Each error is a
/// (line, service name, problem) for the caller to wrap.
pub(super) struct ServiceValidator<'a> {
    pub workload_ips: &'a HashMap<IpAddr, (String, usize)>,
    pub node_addrs: &'a HashMap<IpAddr, (String, usize)>,
    pub workloads: &'a [Workload],
    key_lines: HashMap<String, usize>,
    vip_lines: HashMap<IpAddr, (String, usize)>,
    services: Vec<Service>,
}

/// A refused service: where, which, what.
pub(super) type Refusal = (usize, String, ServiceProblem);

impl<'a> ServiceValidator<'a> {
    pub fn new(
        workload_ips: &'a HashMap<IpAddr, (String, usize)>,
        node_addrs: &'a HashMap<IpAddr, (String, usize)>,
        workloads: &'a [Workload],
    ) -> Self {
        Self {
            workload_ips,
            node_addrs,
            workloads,
            key_lines: HashMap::new(),
            vip_lines: HashMap::new(),
            services: Vec::new(),
        }
    }

    /// Validates every entry, in order; the first problem refuses the whole registry.
    pub fn run(mut self, raw: Vec<Spanned<RawService>>) -> Result<ServiceTable, Refusal> {
        for entry in raw {
            let line = line_of(&entry, 1);
            let service = self.service(entry.value, line)?;
            self.services.push(service);
        }
        let vip_index = self
            .services
            .iter()
            .enumerate()
            .flat_map(|(i, s)| s.vips.iter().map(move |ip| (*ip, i)))
            .collect();
        Ok(ServiceTable {
            services: self.services,
            vip_index,
        })
    }

    fn service(&mut self, raw: RawService, line: usize) -> Result<Service, Refusal> {
        let position = self.services.len() + 1;
        let provisional = format!("#{position}");
        let id = u32::try_from(position)
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
                    line_of(v, line),
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
        self.key_lines.insert(key.clone(), line);

        let vips = raw
            .vips
            .ok_or_else(|| fail(line, &key, ServiceProblem::MissingField("vips")))?;
        let vips = self.vips(&key, vips, line)?;
        let ports = raw
            .ports
            .ok_or_else(|| fail(line, &key, ServiceProblem::MissingField("ports")))?;
        let ports = ports_of(&key, ports, line)?;
        let selector = raw
            .selector
            .ok_or_else(|| fail(line, &key, ServiceProblem::MissingField("selector")))?;
        if selector.value.is_empty() {
            return Err(fail(
                line_of(&selector, line),
                &key,
                ServiceProblem::EmptySelector,
            ));
        }
        let selector = selector.value;
        let endpoints = self
            .workloads
            .iter()
            .filter(|w| w.namespace == namespace.value && selects(&selector, &w.labels))
            .map(|w| w.id)
            .collect();
        Ok(Service {
            id,
            name: name.value,
            namespace: namespace.value,
            vips,
            ports,
            selector,
            endpoints,
        })
    }

    fn vips(
        &mut self,
        key: &str,
        raw: Spanned<Vec<Spanned<String>>>,
        line: usize,
    ) -> Result<Vec<IpAddr>, Refusal> {
        let list_line = line_of(&raw, line);
        if raw.value.is_empty() {
            return Err((list_line, key.to_owned(), ServiceProblem::NoVips));
        }
        let mut vips = Vec::with_capacity(raw.value.len());
        for v in raw.value {
            let l = line_of(&v, list_line);
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
            if let Some((first, first_line)) = self.vip_lines.get(&ip) {
                return Err(fail(ServiceProblem::DuplicateVip {
                    ip,
                    first: first.clone(),
                    first_line: *first_line,
                }));
            }
            self.vip_lines.insert(ip, (key.to_owned(), l));
            vips.push(ip);
        }
        Ok(vips)
    }
}

/// Validates the `ports:` of service `key`.
fn ports_of(
    key: &str,
    raw: Spanned<Vec<Spanned<RawPort>>>,
    line: usize,
) -> Result<Vec<ServicePort>, Refusal> {
    let list_line = line_of(&raw, line);
    if raw.value.is_empty() {
        return Err((list_line, key.to_owned(), ServiceProblem::NoPorts));
    }
    let mut ports: Vec<ServicePort> = Vec::with_capacity(raw.value.len());
    for entry in raw.value {
        let l = line_of(&entry, list_line);
        let fail = |p| (l, key.to_owned(), p);
        let p = entry.value;
        let number = |field: &'static str, v: Option<Spanned<u64>>| {
            let v = v.ok_or_else(|| fail(ServiceProblem::MissingField(field)))?;
            match u16::try_from(v.value) {
                Ok(n) if n != 0 => Ok(n),
                _ => Err((
                    line_of(&v, l),
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
                    line_of(&proto, l),
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
                    line_of(&n, l),
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
