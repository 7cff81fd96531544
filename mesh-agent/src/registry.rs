//! The workload registry: every workload of the mesh, on every node (format
//! in docs/CONTRACTS.md, "Workload registry").
//!
//! Two ways to read it. [`Registry::load`] / [`Registry::parse`] (and the authority's
//! [`Registry::load_all`]) validate the file as a whole: any problem refuses the whole
//! registry. [`Registry::load_entries`] / [`Registry::parse_entries`] refuse entry by entry
//! (a bad node, workload or service is dropped and named, the rest is kept), as a registry
//! that is applied live must: one typo cannot take the whole mesh down. Either way every
//! refusal names `file:line: problem` so an operator can go straight to it. The IPs of all
//! workloads are mesh destinations; only the workloads on the local node have their cgroups
//! resolved (and enrolled).
//!
//! Ids: a workload's (a service's) id is what the kernel maps carry. Without `id:` fields it
//! is the entry's 1-based position among the kept workloads (services); with them (the
//! authority assigns them, stable per `namespace/name`) it is the `id:` of every entry.
//! [`Registry::to_yaml`] writes a registry back as registry YAML, ids included.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    fs, io,
    net::IpAddr,
    ops::Range,
    path::{Path, PathBuf},
};

use serde::{de::DeserializeOwned, de::IgnoredAny, Deserialize};
use serde_saphyr::Spanned;
use tracing::{debug, warn};

use crate::cgroup::{self, CgroupError};
use crate::names::{is_dns_label, is_dns_subdomain};
use crate::tls::{SpiffeId, SpiffeIdError, TrustDomain};
use crate::yaml::{self, line_of};

mod services;
pub use services::{Service, ServicePort, ServiceProblem, ServiceTable};

/// All workloads and nodes of the mesh, in file order.
#[derive(Clone, Debug)]
pub struct Registry {
    /// The nodes in file order (names and addresses unique).
    pub nodes: Vec<NodeEntry>,
    /// The workloads in file order (ids and IPs unique). Read-only once loaded:
    /// [`Registry::by_ip`] and [`Registry::by_id`] use indexes built by the loader.
    pub workloads: Vec<Workload>,
    /// IP → position in `workloads`.
    ip_index: HashMap<IpAddr, usize>,
    /// Id → position in `workloads`.
    id_index: HashMap<u32, usize>,
    /// The services (`services:`), indexed by virtual IP.
    pub services: ServiceTable,
}

/// Two registries are equal when their nodes, workloads and services are (the indexes follow
/// from those).
impl PartialEq for Registry {
    fn eq(&self, other: &Self) -> bool {
        self.nodes == other.nodes
            && self.workloads == other.workloads
            && self.services == other.services
    }
}

impl Eq for Registry {}

/// What [`Registry::parse_entries`] kept, and every entry it refused.
#[derive(Debug)]
pub struct Parsed {
    /// The valid entries.
    pub registry: Registry,
    /// One error per refused entry (`file:line: problem`), in file order within each of
    /// `nodes:`, `workloads:` and `services:` (read in that order).
    pub refused: Vec<RegistryError>,
}

/// One node of the mesh: where its agent is reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeEntry {
    /// The node's name (a DNS-1123 subdomain), as workloads' `node:` name it.
    pub name: String,
    /// The node agent's address (IPv4 or IPv6): HBONE peers dial it.
    pub address: IpAddr,
    /// The node agent's IPv6 address, if it has one besides `address`.
    pub address6: Option<IpAddr>,
}

impl NodeEntry {
    /// `address` and `address6`, whichever are set.
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        std::iter::once(self.address).chain(self.address6)
    }
}

/// One workload (a pod) of the mesh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// The id the kernel maps carry (never 0, unique): the `id:` of the entry, or without
    /// `id:` fields its 1-based position among the kept workloads.
    pub id: u32,
    /// The workload's name (a DNS-1123 label).
    pub name: String,
    /// Its namespace (a DNS-1123 label).
    pub namespace: String,
    /// Its service account (a DNS-1123 label): with the namespace, its identity.
    pub service_account: String,
    /// The node it runs on.
    pub node: String,
    /// Its addresses (at least one; unique across the registry).
    pub ips: Vec<IpAddr>,
    /// Its cgroup as written, relative to the cgroup2 mount (a leading `/`
    /// also means relative to the mount). Required for local workloads.
    pub cgroup: Option<PathBuf>,
    /// The cgroup v2 id of `cgroup`, resolved only for workloads on the local node. `None`
    /// for a local workload read by [`Registry::parse_entries`] whose cgroup did not exist
    /// yet ("pending", see [`Registry::resolve_pending`]).
    pub cgroup_id: Option<u64>,
    /// Free-form labels.
    pub labels: BTreeMap<String, String>,
    /// `peerAuthentication: PERMISSIVE`: inbound plaintext from outside the
    /// mesh is allowed (and flagged). `false` (the default, `STRICT`): refused.
    pub permissive: bool,
    /// `httpPorts`: ports on which the workload speaks HTTP/1.1 or h2c (L7 policy applies
    /// there), sorted, unique, each in 1..=65535. Empty by default.
    pub http_ports: Vec<u16>,
}

impl Workload {
    /// The ports on which the workload speaks HTTP (sorted, unique).
    pub fn http_ports(&self) -> &[u16] {
        &self.http_ports
    }

    /// Whether `port` is one of the workload's HTTP ports.
    pub fn is_http_port(&self, port: u16) -> bool {
        self.http_ports.binary_search(&port).is_ok()
    }

    /// `namespace/name`, the name flow records and errors use.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The workload's SPIFFE ID: `spiffe://<trust_domain>/ns/<namespace>/sa/<service account>`.
    pub fn spiffe_id(&self, trust_domain: &str) -> String {
        crate::tls::spiffe::workload_uri(trust_domain, &self.namespace, &self.service_account)
    }

    /// The workload's SPIFFE ID, validated.
    pub fn identity(&self, trust_domain: &TrustDomain) -> Result<SpiffeId, SpiffeIdError> {
        SpiffeId::new(trust_domain.clone(), &self.namespace, &self.service_account)
    }
}

/// Why a registry (or one of its entries) was refused. Displays as `<file>:<line>: <problem>`
/// (the line 1-based), except when the file cannot be read at all.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The file could not be read.
    #[error("{}: reading the workload registry: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Not valid YAML, or not the registry's shape: an unknown field, a
    /// duplicate key, a value of the wrong type.
    #[error("{}:{line}: {message} (column {column})", path.display())]
    Syntax {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// Well-formed, but inconsistent or incomplete.
    #[error("{}:{line}: {problem}", path.display())]
    Invalid {
        path: PathBuf,
        line: usize,
        /// Boxed to keep the `Result`s of the loader small.
        #[source]
        problem: Box<Problem>,
    },
}

impl RegistryError {
    /// The registry file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            Self::Io { path, .. } | Self::Syntax { path, .. } | Self::Invalid { path, .. } => path,
        }
    }

    /// The 1-based line the error names, if it names one.
    pub fn line(&self) -> Option<usize> {
        match self {
            Self::Io { .. } => None,
            Self::Syntax { line, .. } | Self::Invalid { line, .. } => Some(*line),
        }
    }

    /// What is wrong, for a well-formed but invalid registry.
    pub fn problem(&self) -> Option<&Problem> {
        match self {
            Self::Invalid { problem, .. } => Some(problem),
            Self::Io { .. } | Self::Syntax { .. } => None,
        }
    }
}

/// What is wrong with a well-formed registry. Workloads are named
/// `namespace/name`, or `#<position>` while their name is not yet known valid.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    /// A required field is absent or null.
    #[error("workload {workload}: missing required field `{field}`")]
    MissingField {
        workload: String,
        field: &'static str,
    },
    /// `name`, `namespace` or `serviceAccount` is not a DNS-1123 label.
    #[error(
        "workload {workload}: {field} {value:?} is not a DNS-1123 label (1-63 lowercase \
         letters, digits or '-', starting and ending with a letter or digit)"
    )]
    InvalidName {
        workload: String,
        field: &'static str,
        value: String,
    },
    /// `node` is not a DNS-1123 subdomain.
    #[error(
        "workload {workload}: node {value:?} is not a valid node name (a DNS-1123 subdomain: \
         lowercase letters, digits, '-' and '.', at most 253)"
    )]
    InvalidNode { workload: String, value: String },
    /// An entry of `ips` is not an IP address.
    #[error("workload {workload}: {value:?} is not an IP address")]
    InvalidIp { workload: String, value: String },
    /// An entry of `ips` is an address no workload can have.
    #[error("workload {workload}: {ip} cannot be a workload address ({reason})")]
    UnusableIp {
        workload: String,
        ip: IpAddr,
        reason: &'static str,
    },
    /// `ips` is empty.
    #[error("workload {workload} has no IPs (`ips` needs at least one)")]
    NoIps { workload: String },
    /// An IP is listed twice (by two workloads, or twice by one).
    #[error(
        "IP {ip} of workload {second} is already used by workload {first} (line {first_line})"
    )]
    DuplicateIp {
        ip: IpAddr,
        first: String,
        first_line: usize,
        second: String,
    },
    /// The same `namespace/name` is listed twice.
    #[error("workload {workload} is listed twice (first on line {first_line})")]
    DuplicateWorkload { workload: String, first_line: usize },
    /// Some workloads carry `id:`, this one does not: ids are all assigned or none is (a
    /// position-based id could collide with an assigned one).
    #[error("workload {workload} has no `id` while other workloads have one (all or none)")]
    MissingId { workload: String },
    /// `id` outside 1..=4294967295 (0 is no workload in the kernel maps).
    #[error("workload {workload}: id {value} is not a workload id (1..=4294967295)")]
    InvalidId { workload: String, value: u64 },
    /// Two workloads carry the same `id`.
    #[error(
        "id {id} of workload {second} is already the id of workload {first} (line {first_line})"
    )]
    DuplicateId {
        id: u32,
        first: String,
        first_line: usize,
        second: String,
    },
    /// A workload of the local node has no `cgroup` to enrol.
    #[error("workload {workload} runs on this node ({node}) but has no `cgroup` field")]
    MissingCgroup { workload: String, node: String },
    /// The `cgroup` is unusable: it escapes the cgroup2 mount, or (for a
    /// local workload) it does not exist or is not a directory.
    #[error("workload {workload}: cgroup {}: {source}", cgroup.display())]
    Cgroup {
        workload: String,
        cgroup: PathBuf,
        #[source]
        source: CgroupError,
    },
    /// Two local workloads resolve to the same cgroup.
    #[error(
        "workload {second}: cgroup {} is already the cgroup of workload {first} (line {first_line})",
        cgroup.display()
    )]
    DuplicateCgroup {
        cgroup: PathBuf,
        first: String,
        first_line: usize,
        second: String,
    },
    /// `peerAuthentication` is neither `STRICT` nor `PERMISSIVE`.
    #[error("workload {workload}: peerAuthentication {value:?} is not STRICT or PERMISSIVE")]
    InvalidPeerAuthentication { workload: String, value: String },
    /// An `httpPorts` entry outside 1..=65535.
    #[error("workload {workload}: httpPorts entry {value} is not a port (1..=65535)")]
    InvalidHttpPort { workload: String, value: u64 },
    /// An `httpPorts` entry listed twice.
    #[error("workload {workload}: httpPorts lists port {port} twice")]
    DuplicateHttpPort { workload: String, port: u16 },
    /// A workload runs on a node that `nodes:` does not list.
    #[error("workload {workload}: node {node} is not listed in `nodes:`")]
    UnknownNode { workload: String, node: String },
    /// A workload runs on a node whose entry was refused ([`Registry::parse_entries`]).
    #[error("workload {workload}: node {node} was refused (its entry is on line {node_line})")]
    RefusedNode {
        workload: String,
        node: String,
        node_line: usize,
    },
    /// A required field of a `nodes:` entry is absent or null.
    #[error("node {node}: missing required field `{field}`")]
    NodeMissingField { node: String, field: &'static str },
    /// A `nodes:` entry's name is not a DNS-1123 subdomain.
    #[error(
        "node {value:?} is not a valid node name (a DNS-1123 subdomain: lowercase letters, \
         digits, '-' and '.', at most 253)"
    )]
    InvalidNodeName { value: String },
    /// A node address is not an IP address, or not the right family.
    #[error("node {node}: {field} {value:?} is not {expected}")]
    InvalidNodeAddress {
        node: String,
        field: &'static str,
        value: String,
        expected: &'static str,
    },
    /// A node address no agent can have.
    #[error("node {node}: {ip} cannot be a node address ({reason})")]
    UnusableNodeAddress {
        node: String,
        ip: IpAddr,
        reason: &'static str,
    },
    /// The same node name is listed twice.
    #[error("node {node} is listed twice (first on line {first_line})")]
    DuplicateNode { node: String, first_line: usize },
    /// Two nodes (or one node twice) have the same address.
    #[error("address {ip} of node {second} is already used by node {first} (line {first_line})")]
    DuplicateNodeAddress {
        ip: IpAddr,
        first: String,
        first_line: usize,
        second: String,
    },
    /// More workloads than ids.
    #[error("too many workloads (at most {max})")]
    TooMany { max: u32 },
    /// A `services:` entry is invalid.
    #[error("service {service}: {problem}")]
    Service {
        service: String,
        problem: ServiceProblem,
    },
}

/// The file as written: every value spanned so errors can name its line.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegistry {
    /// Required when any workload is listed: every workload's node must be here.
    nodes: Option<Vec<Spanned<RawNode>>>,
    workloads: Vec<Spanned<RawWorkload>>,
    /// Services over the workloads (optional).
    services: Option<Vec<Spanned<services::RawService>>>,
}

/// The top level alone, entries unread: what must hold for [`Registry::parse_entries`] to
/// read the entries one by one.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // Only the shape is checked.
struct RawShape {
    nodes: Option<Vec<IgnoredAny>>,
    workloads: Vec<IgnoredAny>,
    services: Option<Vec<IgnoredAny>>,
}

/// One node as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: Option<Spanned<String>>,
    address: Option<Spanned<String>>,
    address6: Option<Spanned<String>>,
}

/// One workload as written. Required fields are `Option`s so that a missing
/// one is reported with the workload's line rather than the end of its map.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawWorkload {
    /// Optional; all workloads have one or none does. `u64` so that an out-of-range id is
    /// named with its line rather than as a type error.
    id: Option<Spanned<u64>>,
    name: Option<Spanned<String>>,
    namespace: Option<Spanned<String>>,
    service_account: Option<Spanned<String>>,
    node: Option<Spanned<String>>,
    ips: Option<Spanned<Vec<Spanned<String>>>>,
    cgroup: Option<Spanned<String>>,
    labels: Option<BTreeMap<String, String>>,
    /// `STRICT` (default) or `PERMISSIVE`.
    peer_authentication: Option<Spanned<String>>,
    /// Ports that speak HTTP (L7 policy applies there).
    http_ports: Option<Vec<Spanned<u64>>>,
}

/// One entry of `nodes:`, `workloads:` or `services:` as read.
struct Entry<T> {
    /// The entry, or why its text is not an entry of that kind (an unknown field, a value of
    /// the wrong type) when the entries were read one by one.
    raw: Result<Spanned<T>, RegistryError>,
    /// Lines of the file before the text the entry was read from: 0 when the file was read
    /// as a whole, else the lines before the entry (its spans count from its own first line).
    base: usize,
}

/// Every entry of a registry file, as read.
struct Entries {
    nodes: Vec<Entry<RawNode>>,
    workloads: Vec<Entry<RawWorkload>>,
    services: Vec<Entry<services::RawService>>,
}

impl Entries {
    /// The entries of a file read as a whole.
    fn whole(raw: RawRegistry) -> Self {
        fn all<T>(v: Vec<Spanned<T>>) -> Vec<Entry<T>> {
            v.into_iter()
                .map(|raw| Entry {
                    raw: Ok(raw),
                    base: 0,
                })
                .collect()
        }
        Self {
            nodes: all(raw.nodes.unwrap_or_default()),
            workloads: all(raw.workloads),
            services: all(raw.services.unwrap_or_default()),
        }
    }

    /// Reads registry `text` as a whole: any problem of shape refuses it.
    fn read_whole(text: &str, path: &Path) -> Result<Self, RegistryError> {
        let raw: RawRegistry = yaml::from_str(text).map_err(|e| syntax_error(path, &e, 0))?;
        Ok(Self::whole(raw))
    }

    /// Reads registry `text` entry by entry: a YAML syntax error, an unknown top-level field,
    /// a top level of the wrong shape or a document over the parser budgets refuses the whole
    /// text; an entry of the wrong shape is refused alone (its `Entry::raw` is the error).
    ///
    /// The file is first read as a whole (the common case: nothing is wrong with its shape).
    /// Otherwise each entry is read again from its own text, cut out of the file at the
    /// positions the parser gives and padded to its column, so that it parses as it did in the
    /// file and its errors name the file's lines. A file that uses YAML aliases cannot be cut
    /// so (an entry may refer to an anchor outside it): it is refused as a whole then.
    fn read_each(text: &str, path: &Path) -> Result<Self, RegistryError> {
        let whole = match yaml::from_str::<RawRegistry>(text) {
            Ok(raw) => return Ok(Self::whole(raw)),
            Err(e) => syntax_error(path, &e, 0),
        };
        yaml::from_str::<RawShape>(text).map_err(|e| syntax_error(path, &e, 0))?;
        let Some(spans) = EntrySpans::of(text) else {
            return Err(whole);
        };
        fn each<T: DeserializeOwned>(
            spans: &[EntrySpan],
            text: &str,
            path: &Path,
        ) -> Vec<Entry<T>> {
            spans.iter().map(|span| span.read(text, path)).collect()
        }
        Ok(Self {
            nodes: each(&spans.nodes, text, path),
            workloads: each(&spans.workloads, text, path),
            services: each(&spans.services, text, path),
        })
    }
}

/// Where one entry is in the file.
struct EntrySpan {
    /// Its bytes (from its first token to its last, or to the next token for a block mapping).
    bytes: Range<usize>,
    /// The 1-based line it starts on.
    line: usize,
    /// The 0-based column (in characters) it starts at.
    column: usize,
}

impl EntrySpan {
    /// Reads the entry from its own text: the column's worth of spaces then the entry, so
    /// that a block mapping keeps its indentation.
    fn read<T: DeserializeOwned>(&self, text: &str, path: &Path) -> Entry<T> {
        let base = self.line.saturating_sub(1);
        let mut own = " ".repeat(self.column);
        own.push_str(&text[self.bytes.clone()]);
        Entry {
            raw: yaml::from_str::<Spanned<T>>(&own).map_err(|e| syntax_error(path, &e, base)),
            base,
        }
    }
}

/// The entries of `nodes:`, `workloads:` and `services:`, in file order.
#[derive(Default)]
struct EntrySpans {
    nodes: Vec<EntrySpan>,
    workloads: Vec<EntrySpan>,
    services: Vec<EntrySpan>,
}

impl EntrySpans {
    /// Walks the parser's events of `text` (already known to be valid YAML of the registry's
    /// top-level shape). `None` if the text uses an alias, or is not what was expected.
    fn of(text: &str) -> Option<Self> {
        use serde_saphyr::granit_parser::{Event, Parser};

        let mut parser = Parser::new_from_str(text);
        // The next event that is part of the structure (comments and anchor metadata are
        // not); `None` at an error or an alias.
        let mut next = move || loop {
            let (event, span) = parser.next_event()?.ok()?;
            match event {
                Event::Alias(_) | Event::UnresolvedAlias(_) => return None,
                e if e.is_node()
                    || matches!(
                        e,
                        Event::StreamStart
                            | Event::StreamEnd
                            | Event::DocumentStart(..)
                            | Event::DocumentEnd
                            | Event::SequenceEnd
                            | Event::MappingEnd
                    ) =>
                {
                    return Some((e, span))
                }
                _ => {}
            }
        };
        // Skips the rest of the node that `first` starts; returns the byte its text ends at.
        fn skip<'i>(
            first: &Event<'i>,
            end: usize,
            next: &mut impl FnMut() -> Option<(Event<'i>, serde_saphyr::granit_parser::Span)>,
        ) -> Option<usize> {
            if !matches!(first, Event::MappingStart(..) | Event::SequenceStart(..)) {
                return Some(end);
            }
            let mut depth = 1usize;
            loop {
                let (event, span) = next()?;
                match event {
                    Event::MappingStart(..) | Event::SequenceStart(..) => depth += 1,
                    Event::MappingEnd | Event::SequenceEnd => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(span.byte_range()?.end);
                        }
                    }
                    _ => {}
                }
            }
        }

        let mut spans = Self::default();
        loop {
            match next()?.0 {
                Event::StreamStart | Event::DocumentStart(..) => {}
                Event::MappingStart(..) => break,
                _ => return None,
            }
        }
        loop {
            let (key, _) = next()?;
            let list = match &key {
                Event::MappingEnd => return Some(spans),
                Event::Scalar(k, ..) => match &**k {
                    "nodes" => Some(&mut spans.nodes),
                    "workloads" => Some(&mut spans.workloads),
                    "services" => Some(&mut spans.services),
                    _ => None,
                },
                _ => None,
            }?;
            let (value, span) = next()?;
            if !matches!(value, Event::SequenceStart(..)) {
                // `nodes:` / `services:` left null.
                skip(&value, span.byte_range()?.end, &mut next)?;
                continue;
            }
            loop {
                let (item, span) = next()?;
                if matches!(item, Event::SequenceEnd) {
                    break;
                }
                let range = span.byte_range()?;
                let end = skip(&item, range.end, &mut next)?;
                list.push(EntrySpan {
                    bytes: range.start..end.max(range.start),
                    line: span.start.line(),
                    column: span.start.col(),
                });
            }
        }
    }
}

impl Registry {
    /// Reads, parses and validates the registry at `path`. The cgroups of
    /// the workloads on `local_node` are resolved under the cgroup2 mount
    /// `cgroup_root`.
    pub fn load(path: &Path, local_node: &str, cgroup_root: &Path) -> Result<Self, RegistryError> {
        Self::parse(&read(path)?, path, local_node, cgroup_root)
    }

    /// Parses and validates registry `text`; `path` only names the file in
    /// errors. See [`Registry::load`].
    pub fn parse(
        text: &str,
        path: &Path,
        local_node: &str,
        cgroup_root: &Path,
    ) -> Result<Self, RegistryError> {
        Self::parse_for(text, path, Some(local_node), cgroup_root)
    }

    /// Reads, parses and validates the registry at `path` as seen from no node in particular
    /// (the authority's view): every check of [`Registry::load`] except those that need the
    /// local cgroup tree, so no cgroup is resolved and no `cgroup_id` is set.
    pub fn load_all(path: &Path) -> Result<Self, RegistryError> {
        Self::parse_all(&read(path)?, path)
    }

    /// [`Registry::load_all`] on registry `text`; `path` only names the file in errors.
    pub fn parse_all(text: &str, path: &Path) -> Result<Self, RegistryError> {
        // Cgroup paths are still checked lexically (relative to the mount, never escaping it);
        // `/` stands in for the mount since nothing is resolved.
        Self::parse_for(text, path, None, Path::new("/"))
    }

    fn parse_for(
        text: &str,
        path: &Path,
        local_node: Option<&str>,
        cgroup_root: &Path,
    ) -> Result<Self, RegistryError> {
        let entries = Entries::read_whole(text, path)?;
        let (registry, refused) = Validator::new(path, local_node, cgroup_root, false).run(entries);
        match refused.into_iter().next() {
            Some(first) => Err(first),
            None => Ok(registry),
        }
    }

    /// Reads the registry at `path` entry by entry: see [`Registry::parse_entries`].
    pub fn load_entries(
        path: &Path,
        local_node: Option<&str>,
        cgroup_root: &Path,
    ) -> Result<Parsed, RegistryError> {
        Self::parse_entries(&read(path)?, path, local_node, cgroup_root)
    }

    /// Parses and validates registry `text` entry by entry (`path` only names the file in
    /// errors): every node, workload and service that passes the checks of
    /// [`Registry::parse`] is kept, every other one is refused on its own (one error each
    /// in [`Parsed::refused`]). Only a YAML syntax error, an unknown top-level field, a top
    /// level of the wrong shape or a document over the parser budgets refuse the whole text.
    ///
    /// A refused entry claims nothing (its IPs, `namespace/name`, id, cgroup, node name and
    /// addresses stay free for a later entry); of two entries that claim the same, the
    /// second is refused. A workload on a refused or unlisted node is refused; a service
    /// whose selector selects no kept workload is kept (without endpoints).
    ///
    /// `local_node`: the node whose workloads' cgroups are resolved under the cgroup2 mount
    /// `cgroup_root` (`None`: the authority's view, as [`Registry::parse_all`]). Unlike
    /// [`Registry::parse`], a local workload whose cgroup does not exist yet is kept,
    /// pending (`cgroup_id: None`): the pod may not have started. See
    /// [`Registry::resolve_pending`].
    pub fn parse_entries(
        text: &str,
        path: &Path,
        local_node: Option<&str>,
        cgroup_root: &Path,
    ) -> Result<Parsed, RegistryError> {
        let entries = Entries::read_each(text, path)?;
        let (registry, refused) = Validator::new(path, local_node, cgroup_root, true).run(entries);
        Ok(Parsed { registry, refused })
    }

    /// No nodes, workloads or services (an agent that has no state yet).
    pub fn empty() -> Self {
        Self {
            nodes: Vec::new(),
            workloads: Vec::new(),
            ip_index: HashMap::new(),
            id_index: HashMap::new(),
            services: ServiceTable::default(),
        }
    }

    /// The node named `name`.
    pub fn node(&self, name: &str) -> Option<&NodeEntry> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The workloads on `node`.
    pub fn local<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Workload> + 'a {
        self.workloads.iter().filter(move |w| w.node == node)
    }

    /// The workloads on `node` whose cgroup is not resolved yet: for a registry read by
    /// [`Registry::parse_entries`] for `node`, its workloads whose cgroup did not exist.
    /// (In a registry read for another node, or for none, no cgroup is resolved: every
    /// workload of `node` with a `cgroup` is listed.)
    pub fn pending<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Workload> + 'a {
        self.local(node)
            .filter(|w| w.cgroup.is_some() && w.cgroup_id.is_none())
    }

    /// Tries again to resolve the cgroups of the pending workloads of `local_node` (see
    /// [`Registry::pending`]) under the cgroup2 mount `cgroup_root`; returns the ids of
    /// the workloads resolved now. A cgroup that still does not exist stays pending quietly;
    /// one that now resolves to another local workload's cgroup, escapes the mount or is not
    /// a directory stays pending too, with a warning (each time it is tried).
    pub fn resolve_pending(&mut self, local_node: &str, cgroup_root: &Path) -> Vec<u32> {
        let mut taken: HashMap<u64, usize> = self
            .workloads
            .iter()
            .enumerate()
            .filter(|(_, w)| w.node == local_node)
            .filter_map(|(i, w)| w.cgroup_id.map(|id| (id, i)))
            .collect();
        let mut resolved = Vec::new();
        for i in 0..self.workloads.len() {
            let w = &self.workloads[i];
            let rel = match &w.cgroup {
                Some(rel) if w.node == local_node && w.cgroup_id.is_none() => rel,
                _ => continue,
            };
            let id = match cgroup::resolve(cgroup_root, rel).and_then(|d| cgroup::cgroup_id(&d)) {
                Ok(id) => id,
                Err(CgroupError::NotFound { .. }) => continue,
                Err(e) => {
                    warn!(workload = %w.key(), cgroup = %rel.display(), error = %e,
                        "pending workload's cgroup is unusable; still pending");
                    continue;
                }
            };
            if let Some(&other) = taken.get(&id) {
                warn!(workload = %w.key(), cgroup = %rel.display(),
                    other = %self.workloads[other].key(),
                    "pending workload's cgroup is already another workload's; still pending");
                continue;
            }
            debug!(workload = %w.key(), cgroup = %rel.display(), cgroup_id = id,
                "resolved pending workload cgroup");
            taken.insert(id, i);
            resolved.push(w.id);
            self.workloads[i].cgroup_id = Some(id);
        }
        resolved
    }

    /// The workload with id `id`.
    pub fn by_id(&self, id: u32) -> Option<&Workload> {
        self.id_index.get(&id).and_then(|&i| self.workloads.get(i))
    }

    /// The workload that has address `ip` (IPv4-mapped IPv6 addresses are
    /// looked up as IPv4).
    pub fn by_ip(&self, ip: IpAddr) -> Option<&Workload> {
        let ip = ip.to_canonical();
        self.ip_index
            .get(&ip)
            .and_then(|&i| self.workloads.get(i))
            .filter(|w| w.ips.contains(&ip))
    }

    /// The registry with every workload's id replaced by `workload(key)` and every
    /// service's by `service(key)` (keys are `namespace/name`), every index and every
    /// service's `endpoints` following: how the authority gives entries ids that stay the
    /// same across versions of the file. The new ids must be unique within each kind and
    /// never 0 (checked in debug builds only: the callers assign them).
    pub fn with_ids(
        mut self,
        mut workload: impl FnMut(&str) -> u32,
        service: impl FnMut(&str) -> u32,
    ) -> Registry {
        let mut renamed = HashMap::with_capacity(self.workloads.len());
        for w in &mut self.workloads {
            let id = workload(&w.key());
            debug_assert_ne!(id, 0, "with_ids: workload {} given id 0", w.key());
            renamed.insert(w.id, id);
            w.id = id;
        }
        self.id_index = id_index(&self.workloads);
        debug_assert_eq!(
            self.id_index.len(),
            self.workloads.len(),
            "with_ids: workload ids must be unique"
        );
        self.ip_index = ip_index(&self.workloads);
        self.services.renumber(service, &renamed);
        self
    }

    /// The registry as registry YAML (`nodes:`, `workloads:`, `services:`), every entry with
    /// its `id:`: what the authority sends. Deterministic (the same registry gives the same
    /// bytes: entries in their order, labels and selectors sorted) and read back by
    /// [`Registry::parse_entries`] as an equal registry. Every string is double-quoted, so no
    /// value reads back as another type (`no`, `1e3`, `~`) or as YAML syntax (`*a`, `#`).
    pub fn to_yaml(&self) -> String {
        let mut out = String::new();
        if self.nodes.is_empty() {
            out.push_str("nodes: []\n");
        } else {
            out.push_str("nodes:\n");
        }
        for n in &self.nodes {
            let _ = writeln!(out, "  - name: {}", quote(&n.name));
            let _ = writeln!(out, "    address: {}", quote(&n.address.to_string()));
            if let Some(a6) = n.address6 {
                let _ = writeln!(out, "    address6: {}", quote(&a6.to_string()));
            }
        }
        if self.workloads.is_empty() {
            out.push_str("workloads: []\n");
        } else {
            out.push_str("workloads:\n");
        }
        for w in &self.workloads {
            let _ = writeln!(out, "  - id: {}", w.id);
            let _ = writeln!(out, "    name: {}", quote(&w.name));
            let _ = writeln!(out, "    namespace: {}", quote(&w.namespace));
            let _ = writeln!(out, "    serviceAccount: {}", quote(&w.service_account));
            let _ = writeln!(out, "    node: {}", quote(&w.node));
            let _ = writeln!(
                out,
                "    ips: {}",
                flow_list(w.ips.iter().map(|ip| quote(&ip.to_string())))
            );
            if let Some(cg) = &w.cgroup {
                let _ = writeln!(out, "    cgroup: {}", quote(&cg.to_string_lossy()));
            }
            if !w.labels.is_empty() {
                let _ = writeln!(out, "    labels: {}", flow_map(&w.labels));
            }
            if w.permissive {
                out.push_str("    peerAuthentication: \"PERMISSIVE\"\n");
            }
            if !w.http_ports.is_empty() {
                let _ = writeln!(
                    out,
                    "    httpPorts: {}",
                    flow_list(w.http_ports.iter().map(u16::to_string))
                );
            }
        }
        self.services.write_yaml(&mut out);
        out
    }
}

/// Reads the registry file at `path`.
fn read(path: &Path) -> Result<String, RegistryError> {
    fs::read_to_string(path).map_err(|source| RegistryError::Io {
        path: path.to_owned(),
        source,
    })
}

/// IP → position in `workloads`.
fn ip_index(workloads: &[Workload]) -> HashMap<IpAddr, usize> {
    workloads
        .iter()
        .enumerate()
        .flat_map(|(i, w)| w.ips.iter().map(move |ip| (*ip, i)))
        .collect()
}

/// Id → position in `workloads`.
fn id_index(workloads: &[Workload]) -> HashMap<u32, usize> {
    workloads
        .iter()
        .enumerate()
        .map(|(i, w)| (w.id, i))
        .collect()
}

/// `s` as a YAML double-quoted scalar: `"` and `\` escaped, and every character YAML does not
/// take as is in a quoted scalar (controls, line and paragraph separators, the byte-order mark,
/// non-characters) as an escape, so the value reads back byte for byte.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control()
                || matches!(
                    c,
                    '\u{2028}' | '\u{2029}' | '\u{FEFF}' | '\u{FFFE}' | '\u{FFFF}'
                ) =>
            {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `[a, b, …]` of already rendered items.
fn flow_list(items: impl Iterator<Item = String>) -> String {
    let items: Vec<String> = items.collect();
    format!("[{}]", items.join(", "))
}

/// `{"k": "v", …}`, keys in order.
fn flow_map(map: &BTreeMap<String, String>) -> String {
    let pairs: Vec<String> = map
        .iter()
        .map(|(k, v)| format!("{}: {}", quote(k), quote(v)))
        .collect();
    format!("{{{}}}", pairs.join(", "))
}

/// A serde-saphyr error as [`RegistryError::Syntax`], its line counted from the file's start
/// (`base` lines before the text that was parsed).
fn syntax_error(path: &Path, e: &serde_saphyr::Error, base: usize) -> RegistryError {
    let yaml::SyntaxError {
        line,
        column,
        message,
    } = yaml::SyntaxError::of(e);
    RegistryError::Syntax {
        path: path.to_owned(),
        line: line + base,
        column,
        message,
    }
}

/// The file line of `v`, read from a text that starts after `base` lines of the file, or
/// `fallback` (a file line) if the parser recorded none.
fn file_line<T>(base: usize, v: &Spanned<T>, fallback: usize) -> usize {
    match line_of(v, 0) {
        0 => fallback,
        l => l + base,
    }
}

/// A [`RegistryError::Invalid`].
fn invalid(path: &Path, line: usize, problem: Problem) -> RegistryError {
    RegistryError::Invalid {
        path: path.to_owned(),
        line,
        problem: Box::new(problem),
    }
}

/// Validation state: what the entries kept so far claim, and where.
///
/// Each entry is checked against the claims of the entries kept before it, and claims
/// (its name, IPs, id, cgroup) only once it is kept: a refused entry leaves no trace.
struct Validator<'a> {
    path: &'a Path,
    /// `None`: the authority's view, no workload is local.
    local_node: Option<&'a str>,
    cgroup_root: &'a Path,
    /// Entry by entry ([`Registry::parse_entries`]): go on past a refused entry, and keep a
    /// local workload whose cgroup does not exist yet. Otherwise the first refusal ends it.
    each: bool,
    /// Lines of the file before the text the current entry was read from.
    base: usize,
    /// IP → (workload key, line of the IP).
    ip_lines: HashMap<IpAddr, (String, usize)>,
    /// `namespace/name` → line of the workload.
    key_lines: HashMap<String, usize>,
    /// Explicit id → (workload key, line of its `id`).
    id_lines: HashMap<u32, (String, usize)>,
    /// Resolved cgroup id → (workload key, line of its `cgroup`).
    cgroup_lines: HashMap<u64, (String, usize)>,
    /// Node name → line of its entry.
    node_lines: HashMap<String, usize>,
    /// Name → line of a node entry that was refused, while no entry of that name is kept.
    refused_nodes: HashMap<String, usize>,
    /// Node address → (node name, line of the address).
    node_addr_lines: HashMap<IpAddr, (String, usize)>,
    nodes: Vec<NodeEntry>,
    workloads: Vec<Workload>,
    refused: Vec<RegistryError>,
}

impl<'a> Validator<'a> {
    fn new(path: &'a Path, local_node: Option<&'a str>, cgroup_root: &'a Path, each: bool) -> Self {
        Self {
            path,
            local_node,
            cgroup_root,
            each,
            base: 0,
            ip_lines: HashMap::new(),
            key_lines: HashMap::new(),
            id_lines: HashMap::new(),
            cgroup_lines: HashMap::new(),
            node_lines: HashMap::new(),
            refused_nodes: HashMap::new(),
            node_addr_lines: HashMap::new(),
            nodes: Vec::new(),
            workloads: Vec::new(),
            refused: Vec::new(),
        }
    }

    /// Whether to stop: read as a whole, the first refusal refuses the registry.
    fn done(&self) -> bool {
        !self.each && !self.refused.is_empty()
    }

    /// The file line of `v` (read in the current entry), or `fallback` (a file line).
    fn at<T>(&self, v: &Spanned<T>, fallback: usize) -> usize {
        file_line(self.base, v, fallback)
    }

    fn invalid(&self, line: usize, problem: Problem) -> RegistryError {
        invalid(self.path, line, problem)
    }

    /// Validates every entry: the kept ones make the registry, the others are refused.
    fn run(mut self, entries: Entries) -> (Registry, Vec<RegistryError>) {
        for (i, entry) in entries.nodes.into_iter().enumerate() {
            if self.done() {
                break;
            }
            self.base = entry.base;
            let result = entry.raw.and_then(|raw| {
                let line = self.at(&raw, 1);
                self.node(raw.value, line, i + 1)
            });
            match result {
                Ok(node) => self.nodes.push(node),
                Err(e) => self.refused.push(e),
            }
        }
        // All or none: with one `id:`, an entry without one is refused (not given its position).
        let explicit_ids = entries
            .workloads
            .iter()
            .any(|e| matches!(&e.raw, Ok(w) if w.value.id.is_some()));
        self.workloads.reserve(entries.workloads.len());
        for (i, entry) in entries.workloads.into_iter().enumerate() {
            if self.done() {
                break;
            }
            self.base = entry.base;
            let result = entry.raw.and_then(|raw| {
                let line = self.at(&raw, 1);
                self.workload(raw.value, line, i + 1, explicit_ids)
            });
            match result {
                Ok(workload) => self.workloads.push(workload),
                Err(e) => self.refused.push(e),
            }
        }

        let explicit_ids = entries
            .services
            .iter()
            .any(|e| matches!(&e.raw, Ok(s) if s.value.has_id()));
        let mut services = services::ServiceValidator::new(
            &self.ip_lines,
            &self.node_addr_lines,
            &self.workloads,
            explicit_ids,
        );
        for (i, entry) in entries.services.into_iter().enumerate() {
            if !self.each && !self.refused.is_empty() {
                break;
            }
            match entry.raw {
                Ok(raw) => {
                    if let Err((line, service, problem)) = services.entry(raw, entry.base, i + 1) {
                        let e = invalid(self.path, line, Problem::Service { service, problem });
                        self.refused.push(e);
                    }
                }
                Err(e) => self.refused.push(e),
            }
        }
        let services = services.finish();
        debug!(
            registry = %self.path.display(),
            workloads = self.workloads.len(),
            nodes = self.nodes.len(),
            services = services.services.len(),
            refused = self.refused.len(),
            "workload registry validated"
        );
        let registry = Registry {
            ip_index: ip_index(&self.workloads),
            id_index: id_index(&self.workloads),
            nodes: self.nodes,
            workloads: self.workloads,
            services,
        };
        (registry, self.refused)
    }

    /// Validates one `nodes:` entry that starts on `line`, the `position`th (1-based).
    fn node(
        &mut self,
        raw: RawNode,
        line: usize,
        position: usize,
    ) -> Result<NodeEntry, RegistryError> {
        let missing = |field: &'static str| {
            self.invalid(
                line,
                Problem::NodeMissingField {
                    node: format!("#{position}"),
                    field,
                },
            )
        };
        let name = raw.name.ok_or_else(|| missing("name"))?;
        let address = raw.address.ok_or_else(|| missing("address"))?;
        if !is_dns_subdomain(&name.value) {
            return Err(self.invalid(
                self.at(&name, line),
                Problem::InvalidNodeName { value: name.value },
            ));
        }
        let node = name.value;
        if let Some(&first_line) = self.node_lines.get(&node) {
            return Err(self.invalid(line, Problem::DuplicateNode { node, first_line }));
        }
        let (addr, addr6) = match self.node_addresses(&node, &address, raw.address6.as_ref(), line)
        {
            Ok(addresses) => addresses,
            Err(e) => {
                // Workloads on this node are refused as on a refused node, not an unknown one.
                self.refused_nodes.entry(node).or_insert(line);
                return Err(e);
            }
        };
        let entry = NodeEntry {
            name: node.clone(),
            address: addr.0,
            address6: addr6.map(|(ip, _)| ip),
        };
        for (ip, l) in std::iter::once(addr).chain(addr6) {
            self.node_addr_lines.insert(ip, (node.clone(), l));
        }
        self.refused_nodes.remove(&node);
        self.node_lines.insert(node, line);
        Ok(entry)
    }

    /// Parses and checks `address` and `address6` of node `node` (entry on `line`); returns
    /// each with its line.
    #[allow(clippy::type_complexity)]
    fn node_addresses(
        &self,
        node: &str,
        address: &Spanned<String>,
        address6: Option<&Spanned<String>>,
        line: usize,
    ) -> Result<((IpAddr, usize), Option<(IpAddr, usize)>), RegistryError> {
        let addr = self.node_address(node, "address", address, line, false, &[])?;
        let addr6 = match address6 {
            Some(a6) => Some(self.node_address(node, "address6", a6, line, true, &[addr])?),
            None => None,
        };
        Ok((addr, addr6))
    }

    /// Parses and checks one address of node `node` (unique across nodes, and not one of
    /// `claimed`, the node's addresses checked before); returns it with its line.
    fn node_address(
        &self,
        node: &str,
        field: &'static str,
        raw: &Spanned<String>,
        line: usize,
        v6_only: bool,
        claimed: &[(IpAddr, usize)],
    ) -> Result<(IpAddr, usize), RegistryError> {
        let line = self.at(raw, line);
        let expected = if v6_only {
            "an IPv6 address"
        } else {
            "an IP address"
        };
        let ip = match raw.value.trim().parse::<IpAddr>() {
            Ok(ip) if !v6_only || ip.is_ipv6() => ip,
            _ => {
                return Err(self.invalid(
                    line,
                    Problem::InvalidNodeAddress {
                        node: node.to_owned(),
                        field,
                        value: raw.value.clone(),
                        expected,
                    },
                ))
            }
        };
        match check_ip(&self.node_addr_lines, ip, node, claimed) {
            Ok(()) => Ok((ip, line)),
            Err(IpClaim::Unusable(reason)) => Err(self.invalid(
                line,
                Problem::UnusableNodeAddress {
                    node: node.to_owned(),
                    ip,
                    reason,
                },
            )),
            Err(IpClaim::Taken { first, first_line }) => Err(self.invalid(
                line,
                Problem::DuplicateNodeAddress {
                    ip,
                    first,
                    first_line,
                    second: node.to_owned(),
                },
            )),
        }
    }

    /// Validates one workload that starts on `line`, the `position`th (1-based) of
    /// `workloads:`. `explicit_ids`: whether workloads carry `id:` (then every one must).
    fn workload(
        &mut self,
        raw: RawWorkload,
        line: usize,
        position: usize,
        explicit_ids: bool,
    ) -> Result<Workload, RegistryError> {
        let next_id = u32::try_from(self.workloads.len() + 1)
            .map_err(|_| self.invalid(line, Problem::TooMany { max: u32::MAX }))?;
        let provisional = format!("#{position}");

        let required = |field: &'static str, v: Option<Spanned<String>>| {
            v.ok_or_else(|| {
                self.invalid(
                    line,
                    Problem::MissingField {
                        workload: provisional.clone(),
                        field,
                    },
                )
            })
        };
        let name = required("name", raw.name)?;
        let namespace = required("namespace", raw.namespace)?;
        let service_account = required("serviceAccount", raw.service_account)?;
        let node = required("node", raw.node)?;
        let ips = raw.ips.ok_or_else(|| {
            self.invalid(
                line,
                Problem::MissingField {
                    workload: provisional.clone(),
                    field: "ips",
                },
            )
        })?;

        for (field, v) in [("namespace", &namespace), ("name", &name)] {
            if !is_dns_label(&v.value) {
                return Err(self.invalid(
                    self.at(v, line),
                    Problem::InvalidName {
                        workload: provisional,
                        field,
                        value: v.value.clone(),
                    },
                ));
            }
        }
        let key = format!("{}/{}", namespace.value, name.value);
        if let Some(&first_line) = self.key_lines.get(&key) {
            return Err(self.invalid(
                line,
                Problem::DuplicateWorkload {
                    workload: key,
                    first_line,
                },
            ));
        }
        let (id, id_line) = match (explicit_ids, raw.id) {
            (false, _) => (next_id, None),
            (true, None) => {
                return Err(self.invalid(line, Problem::MissingId { workload: key }));
            }
            (true, Some(v)) => {
                let id_line = self.at(&v, line);
                let id = match u32::try_from(v.value) {
                    Ok(id) if id != 0 => id,
                    _ => {
                        return Err(self.invalid(
                            id_line,
                            Problem::InvalidId {
                                workload: key,
                                value: v.value,
                            },
                        ))
                    }
                };
                if let Some((first, first_line)) = self.id_lines.get(&id) {
                    return Err(self.invalid(
                        id_line,
                        Problem::DuplicateId {
                            id,
                            first: first.clone(),
                            first_line: *first_line,
                            second: key,
                        },
                    ));
                }
                (id, Some(id_line))
            }
        };
        if !is_dns_label(&service_account.value) {
            return Err(self.invalid(
                self.at(&service_account, line),
                Problem::InvalidName {
                    workload: key,
                    field: "serviceAccount",
                    value: service_account.value,
                },
            ));
        }
        if !is_dns_subdomain(&node.value) {
            return Err(self.invalid(
                self.at(&node, line),
                Problem::InvalidNode {
                    workload: key,
                    value: node.value,
                },
            ));
        }
        if !self.node_lines.contains_key(&node.value) {
            let problem = match self.refused_nodes.get(&node.value) {
                Some(&node_line) => Problem::RefusedNode {
                    workload: key,
                    node: node.value,
                    node_line,
                },
                None => Problem::UnknownNode {
                    workload: key,
                    node: node.value,
                },
            };
            return Err(self.invalid(line, problem));
        }
        let permissive = match raw.peer_authentication {
            None => false,
            Some(pa) => match pa.value.as_str() {
                "STRICT" => false,
                "PERMISSIVE" => true,
                _ => {
                    return Err(self.invalid(
                        self.at(&pa, line),
                        Problem::InvalidPeerAuthentication {
                            workload: key,
                            value: pa.value,
                        },
                    ))
                }
            },
        };

        let mut http_ports: Vec<u16> = Vec::new();
        for p in raw.http_ports.unwrap_or_default() {
            let p_line = self.at(&p, line);
            let port = match u16::try_from(p.value) {
                Ok(port) if port != 0 => port,
                _ => {
                    return Err(self.invalid(
                        p_line,
                        Problem::InvalidHttpPort {
                            workload: key,
                            value: p.value,
                        },
                    ))
                }
            };
            if http_ports.contains(&port) {
                return Err(self.invalid(
                    p_line,
                    Problem::DuplicateHttpPort {
                        workload: key,
                        port,
                    },
                ));
            }
            http_ports.push(port);
        }
        http_ports.sort_unstable();

        let ips_line = self.at(&ips, line);
        let ips = self.ips(&key, ips.value, ips_line)?;

        let is_local = self.local_node == Some(node.value.as_str());
        let (cgroup, cgroup_id) = match raw.cgroup {
            None if is_local => {
                return Err(self.invalid(
                    line,
                    Problem::MissingCgroup {
                        workload: key,
                        node: node.value,
                    },
                ));
            }
            None => (None, None),
            Some(cg) => {
                let cg_line = self.at(&cg, line);
                let rel = PathBuf::from(cg.value);
                let id = self.cgroup(&key, &rel, cg_line, is_local)?;
                (Some(rel), id.map(|id| (id, cg_line)))
            }
        };

        // Kept: claim.
        for &(ip, l) in &ips {
            self.ip_lines.insert(ip, (key.clone(), l));
        }
        if let Some((cgroup_id, cg_line)) = cgroup_id {
            self.cgroup_lines.insert(cgroup_id, (key.clone(), cg_line));
        }
        if let Some(id_line) = id_line {
            self.id_lines.insert(id, (key.clone(), id_line));
        }
        self.key_lines.insert(key, line);
        Ok(Workload {
            id,
            name: name.value,
            namespace: namespace.value,
            service_account: service_account.value,
            node: node.value,
            ips: ips.into_iter().map(|(ip, _)| ip).collect(),
            cgroup,
            cgroup_id: cgroup_id.map(|(id, _)| id),
            labels: raw.labels.unwrap_or_default(),
            permissive,
            http_ports,
        })
    }

    /// Parses and checks the IPs of workload `key`; `ips_line` is the line of
    /// the list itself. Returns each with its line.
    fn ips(
        &self,
        key: &str,
        raw: Vec<Spanned<String>>,
        ips_line: usize,
    ) -> Result<Vec<(IpAddr, usize)>, RegistryError> {
        if raw.is_empty() {
            return Err(self.invalid(
                ips_line,
                Problem::NoIps {
                    workload: key.to_owned(),
                },
            ));
        }
        let mut ips = Vec::with_capacity(raw.len());
        for v in raw {
            let line = self.at(&v, ips_line);
            let ip: IpAddr = v.value.trim().parse().map_err(|_| {
                self.invalid(
                    line,
                    Problem::InvalidIp {
                        workload: key.to_owned(),
                        value: v.value.clone(),
                    },
                )
            })?;
            match check_ip(&self.ip_lines, ip, key, &ips) {
                Ok(()) => ips.push((ip, line)),
                Err(IpClaim::Unusable(reason)) => {
                    return Err(self.invalid(
                        line,
                        Problem::UnusableIp {
                            workload: key.to_owned(),
                            ip,
                            reason,
                        },
                    ))
                }
                Err(IpClaim::Taken { first, first_line }) => {
                    return Err(self.invalid(
                        line,
                        Problem::DuplicateIp {
                            ip,
                            first,
                            first_line,
                            second: key.to_owned(),
                        },
                    ))
                }
            }
        }
        Ok(ips)
    }

    /// Checks the cgroup `rel` of workload `key` (on `line`); for a local
    /// workload resolves it and returns its cgroup id (`None` if it does not exist yet
    /// and the registry is read entry by entry: pending).
    fn cgroup(
        &self,
        key: &str,
        rel: &Path,
        line: usize,
        is_local: bool,
    ) -> Result<Option<u64>, RegistryError> {
        let cgroup_problem = |source: CgroupError| {
            self.invalid(
                line,
                Problem::Cgroup {
                    workload: key.to_owned(),
                    cgroup: rel.to_owned(),
                    source,
                },
            )
        };
        // Lexically for every workload, so every node refuses the same file.
        cgroup::normalize(self.cgroup_root, rel).map_err(cgroup_problem)?;
        if !is_local {
            return Ok(None);
        }
        let id = match cgroup::resolve(self.cgroup_root, rel).and_then(|d| cgroup::cgroup_id(&d)) {
            Ok(id) => id,
            Err(CgroupError::NotFound { path }) if self.each => {
                debug!(workload = key, cgroup = %path.display(),
                    "workload cgroup does not exist yet: pending");
                return Ok(None);
            }
            Err(e) => return Err(cgroup_problem(e)),
        };
        if let Some((first, first_line)) = self.cgroup_lines.get(&id) {
            return Err(self.invalid(
                line,
                Problem::DuplicateCgroup {
                    cgroup: rel.to_owned(),
                    first: first.clone(),
                    first_line: *first_line,
                    second: key.to_owned(),
                },
            ));
        }
        debug!(workload = key, cgroup = %rel.display(), cgroup_id = id, "resolved workload cgroup");
        Ok(Some(id))
    }
}

/// Why an address could not be claimed.
enum IpClaim {
    Unusable(&'static str),
    Taken { first: String, first_line: usize },
}

/// Checks that `owner` may claim `ip`: usable, not claimed in `claims` (by the entries kept
/// so far), not in `own` (the owner's addresses checked before, with their lines). Workload
/// IPs and node addresses are each unique among their kind this way.
fn check_ip(
    claims: &HashMap<IpAddr, (String, usize)>,
    ip: IpAddr,
    owner: &str,
    own: &[(IpAddr, usize)],
) -> Result<(), IpClaim> {
    if let Some(reason) = unusable(ip) {
        return Err(IpClaim::Unusable(reason));
    }
    if let Some((first, first_line)) = claims.get(&ip) {
        return Err(IpClaim::Taken {
            first: first.clone(),
            first_line: *first_line,
        });
    }
    if let Some(&(_, first_line)) = own.iter().find(|(o, _)| *o == ip) {
        return Err(IpClaim::Taken {
            first: owner.to_owned(),
            first_line,
        });
    }
    Ok(())
}

/// Why `ip` cannot be a workload's (node's, service's) address, if it cannot.
fn unusable(ip: IpAddr) -> Option<&'static str> {
    if ip.is_unspecified() {
        return Some("unspecified address");
    }
    if ip.is_loopback() {
        return Some("loopback address");
    }
    if ip.is_multicast() {
        return Some("multicast address");
    }
    match ip {
        IpAddr::V4(v4) if v4.is_broadcast() => Some("broadcast address"),
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => {
            Some("IPv4-mapped IPv6 address; write it as IPv4")
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;
    use crate::cgroup::tests::TempDir;

    const FILE: &str = "/etc/mesh/registry.yaml";

    /// A cgroup root with the cgroups of a1 and a2 (node n1).
    fn root() -> TempDir {
        let root = TempDir::new("registry");
        root.mkdir("mesh/n1/pods/a1");
        root.mkdir("mesh/n1/pods/a2");
        root
    }

    /// The nodes of the test mesh (n1, n2, node-3.example).
    const NODES: &str = "nodes:
  - name: n1
    address: 10.0.0.1
    address6: fd00::1
  - name: n2
    address: 10.0.0.2
  - name: node-3.example
    address: fd00::3
";

    /// Parses `text` as is.
    fn parse_raw(text: &str, root: &TempDir) -> Result<Registry, RegistryError> {
        Registry::parse(text, Path::new(FILE), "n1", &root.0)
    }

    /// Parses `text`, with [`NODES`] appended if it has no `nodes:` of its
    /// own (after the workloads: their line numbers stay put).
    fn parse(text: &str, root: &TempDir) -> Result<Registry, RegistryError> {
        if text.starts_with("nodes:") || text.contains("\nnodes:") {
            parse_raw(text, root)
        } else {
            parse_raw(&format!("{text}{NODES}"), root)
        }
    }

    /// Parses `text`, expects an `Invalid` error on `line`, returns its problem.
    fn invalid(text: &str, root: &TempDir, line: usize) -> Problem {
        match parse(text, root) {
            Err(RegistryError::Invalid {
                path,
                line: l,
                problem,
            }) => {
                assert_eq!(path, Path::new(FILE));
                assert_eq!(l, line, "wrong line for: {problem}");
                *problem
            }
            other => panic!("expected an Invalid error on line {line}, got {other:?}"),
        }
    }

    /// Parses `text`, expects a `Syntax` error on `line`, returns its message.
    fn syntax(text: &str, root: &TempDir, line: usize) -> String {
        match parse_raw(text, root) {
            Err(e @ RegistryError::Syntax { .. }) => {
                assert_eq!(e.line(), Some(line), "wrong line: {e}");
                assert!(
                    e.to_string().starts_with(&format!("{FILE}:{line}: ")),
                    "{e}"
                );
                e.to_string()
            }
            other => panic!("expected a Syntax error on line {line}, got {other:?}"),
        }
    }

    const VALID: &str = r#"# the test mesh
workloads:
  - name: a1
    namespace: default
    serviceAccount: sa-a
    node: n1
    ips: ["10.1.0.2", "fd00:1::2"]
    cgroup: mesh/n1/pods/a1
    labels: {app: a, version: 1}
  - name: a2
    namespace: default
    serviceAccount: sa-a
    node: n1
    ips:
      - 10.1.0.3
    cgroup: /mesh/n1/pods/a2
  - name: b1
    namespace: other
    serviceAccount: sa-b
    node: n2
    ips: ["10.2.0.2"]
    cgroup: mesh/n2/pods/b1
  - name: c1
    namespace: other
    serviceAccount: sa-c
    node: node-3.example
    ips: ["10.3.0.2"]
    peerAuthentication: PERMISSIVE
nodes:
  - name: n1
    address: 10.0.0.1
    address6: fd00::1
  - name: n2
    address: 10.0.0.2
  - name: node-3.example
    address: fd00::3
"#;

    #[test]
    fn valid_registry() {
        let root = root();
        let r = parse(VALID, &root).unwrap();
        assert_eq!(r.workloads.len(), 4);

        let a1 = &r.workloads[0];
        assert_eq!(a1.id, 1);
        assert_eq!(a1.key(), "default/a1");
        assert_eq!(a1.service_account, "sa-a");
        assert_eq!(
            a1.spiffe_id("mesh.local"),
            "spiffe://mesh.local/ns/default/sa/sa-a"
        );
        assert_eq!(
            a1.ips,
            vec![
                "10.1.0.2".parse::<IpAddr>().unwrap(),
                "fd00:1::2".parse().unwrap()
            ]
        );
        assert_eq!(a1.cgroup.as_deref(), Some(Path::new("mesh/n1/pods/a1")));
        let ino = fs::metadata(root.0.join("mesh/n1/pods/a1")).unwrap().ino();
        assert_eq!(a1.cgroup_id, Some(ino));
        assert_eq!(
            a1.labels,
            BTreeMap::from([("app".into(), "a".into()), ("version".into(), "1".into())])
        );

        let a2 = &r.workloads[1];
        assert_eq!(a2.id, 2);
        assert_eq!(a2.cgroup.as_deref(), Some(Path::new("/mesh/n1/pods/a2")));
        let ino = fs::metadata(root.0.join("mesh/n1/pods/a2")).unwrap().ino();
        assert_eq!(a2.cgroup_id, Some(ino));
        assert!(a2.labels.is_empty());

        // Other nodes' cgroups are neither required nor resolved.
        let b1 = &r.workloads[2];
        assert_eq!((b1.id, b1.node.as_str()), (3, "n2"));
        assert_eq!(b1.cgroup.as_deref(), Some(Path::new("mesh/n2/pods/b1")));
        assert_eq!(b1.cgroup_id, None);
        let c1 = &r.workloads[3];
        assert_eq!((c1.id, c1.cgroup.as_ref(), c1.cgroup_id), (4, None, None));

        let local: Vec<u32> = r.local("n1").map(|w| w.id).collect();
        assert_eq!(local, vec![1, 2]);
        assert_eq!(r.local("n2").count(), 1);
        assert_eq!(r.local("nowhere").count(), 0);

        assert_eq!(r.by_id(3).map(Workload::key).as_deref(), Some("other/b1"));
        assert!(r.by_id(0).is_none());
        assert!(r.by_id(5).is_none());

        let key = |ip: &str| r.by_ip(ip.parse().unwrap()).map(Workload::key);
        assert_eq!(key("10.1.0.3").as_deref(), Some("default/a2"));
        assert_eq!(key("fd00:1::2").as_deref(), Some("default/a1"));
        assert_eq!(key("::ffff:10.2.0.2").as_deref(), Some("other/b1"));
        assert_eq!(key("10.9.9.9"), None);

        // peerAuthentication: STRICT unless PERMISSIVE.
        let permissive: Vec<bool> = r.workloads.iter().map(|w| w.permissive).collect();
        assert_eq!(permissive, [false, false, false, true]);

        let n1 = r.node("n1").unwrap();
        assert_eq!(n1.address, "10.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(n1.address6, Some("fd00::1".parse().unwrap()));
        assert_eq!(n1.addresses().count(), 2);
        let n3 = r.node("node-3.example").unwrap();
        assert_eq!(
            (n3.address, n3.address6),
            ("fd00::3".parse().unwrap(), None)
        );
        assert!(r.node("n4").is_none());
        assert_eq!(r.nodes.len(), 3);
    }

    #[test]
    fn peer_authentication_values() {
        let root = root();
        let with = |v: &str| format!("{}    peerAuthentication: {v}\n", a1_with("", ""));
        assert!(!parse(&with("STRICT"), &root).unwrap().workloads[0].permissive);
        assert!(parse(&with("PERMISSIVE"), &root).unwrap().workloads[0].permissive);
        for bad in ["strict", "permissive", "DISABLE", "\"\""] {
            match invalid(&with(bad), &root, 8) {
                Problem::InvalidPeerAuthentication { workload, .. } => {
                    assert_eq!(workload, "default/a1", "{bad}");
                }
                p => panic!("{bad}: {p}"),
            }
        }
        let e = parse(&with("MUTUAL"), &root).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{FILE}:8: workload default/a1: peerAuthentication \"MUTUAL\" is not STRICT or PERMISSIVE")
        );
    }

    #[test]
    fn workload_on_an_unlisted_node() {
        let root = root();
        let text = a1_with("node", "    node: n9");
        match invalid(&text, &root, 2) {
            Problem::UnknownNode { workload, node } => {
                assert_eq!((workload.as_str(), node.as_str()), ("default/a1", "n9"));
            }
            p => panic!("{p}"),
        }
        // Without any `nodes:`, the first workload names the problem.
        let text = format!("{}nodes: []\n", a1_with("", ""));
        assert!(matches!(
            invalid(&text, &root, 2),
            Problem::UnknownNode { .. }
        ));
        let e = parse(&a1_with("", ""), &root);
        assert!(e.is_ok());
        let e = parse_raw(&a1_with("", ""), &root).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{FILE}:2: workload default/a1: node n1 is not listed in `nodes:`")
        );
    }

    /// `workloads: []` and then `nodes` as given (node entries from line 3).
    fn nodes_only(nodes: &str) -> String {
        format!("workloads: []\nnodes:\n{nodes}")
    }

    #[test]
    fn node_entry_errors() {
        let root = root();
        // Missing fields.
        match invalid(&nodes_only("  - name: n1\n"), &root, 3) {
            Problem::NodeMissingField { node, field } => {
                assert_eq!((node.as_str(), field), ("#1", "address"));
            }
            p => panic!("{p}"),
        }
        assert!(matches!(
            invalid(&nodes_only("  - address: 10.0.0.1\n"), &root, 3),
            Problem::NodeMissingField { field: "name", .. }
        ));
        // Invalid name.
        assert!(matches!(
            invalid(
                &nodes_only("  - name: N1\n    address: 10.0.0.1\n"),
                &root,
                3
            ),
            Problem::InvalidNodeName { .. }
        ));
        // Addresses: not an IP, address6 not IPv6, unusable.
        for (entry, line, field) in [
            ("  - name: n1\n    address: 10.0.0.300\n", 4, "address"),
            (
                "  - name: n1\n    address: 10.0.0.1\n    address6: 10.0.0.2\n",
                5,
                "address6",
            ),
        ] {
            match invalid(&nodes_only(entry), &root, line) {
                Problem::InvalidNodeAddress { node, field: f, .. } => {
                    assert_eq!((node.as_str(), f), ("n1", field));
                }
                p => panic!("{entry}: {p}"),
            }
        }
        for bad in ["127.0.0.1", "0.0.0.0", "::ffff:10.0.0.1", "ff02::1"] {
            let entry = format!("  - name: n1\n    address: \"{bad}\"\n");
            assert!(
                matches!(
                    invalid(&nodes_only(&entry), &root, 4),
                    Problem::UnusableNodeAddress { .. }
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn duplicate_nodes_and_node_addresses() {
        let root = root();
        let text = nodes_only(
            "  - name: n1\n    address: 10.0.0.1\n  - name: n1\n    address: 10.0.0.2\n",
        );
        match invalid(&text, &root, 5) {
            Problem::DuplicateNode { node, first_line } => {
                assert_eq!((node.as_str(), first_line), ("n1", 3));
            }
            p => panic!("{p}"),
        }
        let text = nodes_only(
            "  - name: n1\n    address: 10.0.0.1\n    address6: fd00::1\n  \
             - name: n2\n    address: fd00::1\n",
        );
        let e = parse(&text, &root).unwrap_err();
        assert_eq!(e.line(), Some(7));
        assert_eq!(
            e.to_string(),
            format!("{FILE}:7: address fd00::1 of node n2 is already used by node n1 (line 5)")
        );
        // The same address twice in one node.
        let text = nodes_only("  - name: n1\n    address: fd00::1\n    address6: fd00::1\n");
        assert!(matches!(
            invalid(&text, &root, 5),
            Problem::DuplicateNodeAddress { .. }
        ));
    }

    #[test]
    fn node_unknown_fields() {
        let root = root();
        let msg = syntax(
            &nodes_only("  - name: n1\n    address: 10.0.0.1\n    port: 15008\n"),
            &root,
            5,
        );
        assert!(msg.contains("unknown field `port`"), "{msg}");
    }

    #[test]
    fn load_all_resolves_no_cgroup_but_checks_everything_else() {
        // No cgroup tree at all: the authority's view needs none.
        let r = Registry::parse_all(VALID, Path::new("reg.yaml")).unwrap();
        assert_eq!(r.workloads.len(), 4);
        assert!(r.workloads.iter().all(|w| w.cgroup_id.is_none()));
        assert_eq!(r.local("n1").count(), 2);
        let escaping = VALID.replace("cgroup: mesh/n2/pods/b1", "cgroup: mesh/../../b1");
        let e = Registry::parse_all(&escaping, Path::new("reg.yaml")).unwrap_err();
        assert_eq!(e.line(), Some(22), "{e}");
        let dup = VALID.replace("10.3.0.2", "10.2.0.2");
        assert!(Registry::parse_all(&dup, Path::new("reg.yaml")).is_err());
        let missing = Registry::load_all(Path::new("/nonexistent/reg.yaml")).unwrap_err();
        assert!(matches!(missing, RegistryError::Io { .. }));
    }

    #[test]
    fn cgroup_as_absolute_path_inside_the_mount() {
        let root = root();
        let abs = root.0.join("mesh/n1/pods/a1");
        let text = format!(
            "workloads:\n  - name: a1\n    namespace: default\n    serviceAccount: sa\n    \
             node: n1\n    ips: [\"10.1.0.2\"]\n    cgroup: {}\n",
            abs.display()
        );
        let r = parse(&text, &root).unwrap();
        assert_eq!(
            r.workloads[0].cgroup_id,
            Some(fs::metadata(&abs).unwrap().ino())
        );
    }

    #[test]
    fn empty_registry_is_valid() {
        let root = root();
        assert!(parse("workloads: []\n", &root)
            .unwrap()
            .workloads
            .is_empty());
    }

    #[test]
    fn load_reads_the_file_and_names_it() {
        let root = root();
        let file = root.0.join("registry.yaml");
        fs::write(&file, VALID).unwrap();
        let r = Registry::load(&file, "n1", &root.0).unwrap();
        assert_eq!(r.workloads.len(), 4);

        fs::write(&file, "workloads:\n  - name: a1\n    colour: blue\n").unwrap();
        let e = Registry::load(&file, "n1", &root.0).unwrap_err();
        assert_eq!(e.path(), file);
        assert!(
            e.to_string()
                .starts_with(&format!("{}:3: ", file.display())),
            "{e}"
        );

        let absent = root.0.join("absent.yaml");
        let e = Registry::load(&absent, "n1", &root.0).unwrap_err();
        assert!(matches!(&e, RegistryError::Io { path, .. } if *path == absent));
        assert_eq!(e.line(), None);
        assert!(
            e.to_string()
                .starts_with(&format!("{}: ", absent.display())),
            "{e}"
        );
    }

    #[test]
    fn yaml_syntax_errors() {
        let root = root();
        syntax(
            "workloads:\n  - name: a1\n    ips: [\"10.1.0.2\"\n",
            &root,
            3,
        );
        syntax("workloads:\n  - name: a1\n    namespace: a: b\n", &root, 3);
        syntax("workloads:\n  - name: a1\n    name: a2\n", &root, 3);
        syntax("workloads:\n  - name: a1\n    labels: {a: [1]}\n", &root, 3);
        syntax("workloads:\n  - name: a1\n    ips: 10.1.0.2\n", &root, 3);
        syntax("", &root, 1);
        // The second document starts on line 3.
        syntax("workloads: []\n---\nworkloads: []\n", &root, 3);
    }

    #[test]
    fn unknown_fields() {
        let root = root();
        let text = "workloads:\n  - name: a1\n    namespace: default\n    colour: blue\n";
        let msg = syntax(text, &root, 4);
        assert!(msg.contains("unknown field `colour`"), "{msg}");
        let msg = syntax("# c\nworkload: []\n", &root, 2);
        assert!(msg.contains("unknown field `workload`"), "{msg}");
        // Field names are camelCase: the snake_case spelling is unknown.
        let msg = syntax("workloads:\n  - service_account: sa\n", &root, 2);
        assert!(msg.contains("service_account"), "{msg}");
    }

    /// The valid a1 entry (lines 2-7) with `field` replaced by `replacement`
    /// (dropped if empty), after a `workloads:` line.
    fn a1_with(field: &str, replacement: &str) -> String {
        let mut text = String::from("workloads:\n");
        for line in [
            "  - name: a1",
            "    namespace: default",
            "    serviceAccount: sa-a",
            "    node: n1",
            "    ips: [\"10.1.0.2\"]",
            "    cgroup: mesh/n1/pods/a1",
        ] {
            let key = line
                .trim_start_matches([' ', '-'])
                .split(':')
                .next()
                .unwrap_or("");
            let l = if key == field { replacement } else { line };
            if !l.is_empty() {
                text.push_str(l);
                text.push('\n');
            }
        }
        text
    }

    #[test]
    fn missing_required_fields() {
        let root = root();
        // A valid first workload, then the defective one from line 7.
        let first =
            "workloads:\n  - name: a0\n    namespace: default\n    serviceAccount: sa\n    \
                     node: n2\n    ips: [\"10.0.0.9\"]\n";
        for field in ["namespace", "serviceAccount", "node", "ips"] {
            let second = a1_with(field, "").replace("workloads:\n", "");
            let text = format!("{first}{second}");
            match invalid(&text, &root, 7) {
                Problem::MissingField { workload, field: f } => {
                    assert_eq!((workload.as_str(), f), ("#2", field));
                }
                p => panic!("{field}: {p}"),
            }
        }
        // Without `name` the entry starts on the `namespace` line.
        let text =
            a1_with("name", "  - namespace: default").replace("    namespace: default\n", "");
        assert!(matches!(
            invalid(&text, &root, 2),
            Problem::MissingField { field: "name", .. }
        ));
        // Null counts as missing.
        let text = a1_with("node", "    node:");
        assert!(matches!(
            invalid(&text, &root, 2),
            Problem::MissingField { field: "node", .. }
        ));
    }

    #[test]
    fn invalid_names() {
        let root = root();
        let cases: &[(&str, &str, usize, &str)] = &[
            ("name", "  - name: A1", 2, "name"),
            ("name", "  - name: \"\"", 2, "name"),
            ("name", "  - name: a1-", 2, "name"),
            ("namespace", "    namespace: -default", 3, "namespace"),
            ("namespace", "    namespace: my_ns", 3, "namespace"),
            (
                "serviceAccount",
                "    serviceAccount: sa.a",
                4,
                "serviceAccount",
            ),
            (
                "serviceAccount",
                "    serviceAccount: \"sa a\"",
                4,
                "serviceAccount",
            ),
        ];
        for &(field, line_text, line, want) in cases {
            let text = a1_with(field, line_text);
            match invalid(&text, &root, line) {
                Problem::InvalidName { field, .. } => assert_eq!(field, want, "{line_text}"),
                p => panic!("{line_text}: {p}"),
            }
        }
        let long = format!("  - name: {}", "a".repeat(64));
        assert!(matches!(
            invalid(&a1_with("name", &long), &root, 2),
            Problem::InvalidName { field: "name", .. }
        ));
        let ok = format!("  - name: {}", "a".repeat(63));
        assert!(parse(&a1_with("name", &ok), &root).is_ok());

        let text = a1_with("node", "    node: N1");
        assert!(matches!(
            invalid(&text, &root, 5),
            Problem::InvalidNode { .. }
        ));
    }

    #[test]
    fn invalid_ips() {
        let root = root();
        let text = a1_with("ips", "    ips:\n      - 10.1.0.2\n      - 10.1.0.300");
        match invalid(&text, &root, 8) {
            Problem::InvalidIp { workload, value } => {
                assert_eq!(
                    (workload.as_str(), value.as_str()),
                    ("default/a1", "10.1.0.300")
                );
            }
            p => panic!("{p}"),
        }
        for bad in [
            "0.0.0.0",
            "127.0.0.1",
            "::1",
            "224.0.0.1",
            "255.255.255.255",
            "::ffff:10.1.0.2",
        ] {
            let text = a1_with("ips", &format!("    ips: [\"{bad}\"]"));
            assert!(
                matches!(invalid(&text, &root, 6), Problem::UnusableIp { .. }),
                "{bad}"
            );
        }
    }

    #[test]
    fn workload_without_ips() {
        let root = root();
        let text = a1_with("ips", "    ips: []");
        match invalid(&text, &root, 6) {
            Problem::NoIps { workload } => assert_eq!(workload, "default/a1"),
            p => panic!("{p}"),
        }
    }

    #[test]
    fn duplicate_ip_names_both_workloads_and_the_second_line() {
        let root = root();
        let text = VALID.replace("ips: [\"10.2.0.2\"]", "ips: [\"10.2.0.2\", \"fd00:1::2\"]");
        let e = parse(&text, &root).unwrap_err();
        assert_eq!(e.line(), Some(21));
        match e.problem() {
            Some(Problem::DuplicateIp {
                ip,
                first,
                first_line,
                second,
            }) => {
                assert_eq!(*ip, "fd00:1::2".parse::<IpAddr>().unwrap());
                assert_eq!((first.as_str(), *first_line), ("default/a1", 7));
                assert_eq!(second, "other/b1");
            }
            _ => panic!("{e}"),
        }
        assert_eq!(
            e.to_string(),
            format!(
                "{FILE}:21: IP fd00:1::2 of workload other/b1 is already used by workload \
                 default/a1 (line 7)"
            )
        );

        // Twice in the same workload.
        let text = a1_with("ips", "    ips:\n      - 10.1.0.2\n      - 10.1.0.2");
        assert!(matches!(
            invalid(&text, &root, 8),
            Problem::DuplicateIp { .. }
        ));
    }

    #[test]
    fn duplicate_workload() {
        let root = root();
        let text = VALID.replace("  - name: a2\n", "  - name: a1\n");
        match invalid(&text, &root, 10) {
            Problem::DuplicateWorkload {
                workload,
                first_line,
            } => assert_eq!((workload.as_str(), first_line), ("default/a1", 3)),
            p => panic!("{p}"),
        }
        // The same name in another namespace is a different workload.
        let text = VALID.replace("  - name: b1\n", "  - name: a1\n");
        assert!(parse(&text, &root).is_ok());
    }

    #[test]
    fn local_workload_without_cgroup() {
        let root = root();
        let text = VALID.replace("    cgroup: /mesh/n1/pods/a2\n", "");
        match invalid(&text, &root, 10) {
            Problem::MissingCgroup { workload, node } => {
                assert_eq!((workload.as_str(), node.as_str()), ("default/a2", "n1"));
            }
            p => panic!("{p}"),
        }
        // The same registry is fine on n2, where a2 is remote.
        let r = Registry::parse(&text, Path::new(FILE), "n2", &root.0);
        assert!(r.is_err(), "b1's cgroup does not exist under this root");
        root.mkdir("mesh/n2/pods/b1");
        let r = Registry::parse(&text, Path::new(FILE), "n2", &root.0).unwrap();
        assert_eq!(r.local("n2").filter_map(|w| w.cgroup_id).count(), 1);
    }

    #[test]
    fn local_cgroup_that_does_not_exist() {
        let root = root();
        let text = VALID.replace(
            "cgroup: /mesh/n1/pods/a2",
            "cgroup: mesh/n1/pods/a2-does-not-exist",
        );
        let e = parse(&text, &root).unwrap_err();
        assert_eq!(e.line(), Some(16));
        assert!(matches!(
            e.problem(),
            Some(Problem::Cgroup {
                source: CgroupError::NotFound { .. },
                ..
            })
        ));
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!("{FILE}:16: workload default/a2: cgroup ")),
            "{msg}"
        );
        assert!(msg.contains("a2-does-not-exist"), "{msg}");

        // A file is not a cgroup.
        fs::write(root.0.join("mesh/n1/pods/file"), b"").unwrap();
        let text = VALID.replace("cgroup: /mesh/n1/pods/a2", "cgroup: mesh/n1/pods/file");
        let e = parse(&text, &root).unwrap_err();
        assert_eq!(e.line(), Some(16));
        assert!(e.to_string().contains("not a directory"), "{e}");
    }

    #[test]
    fn cgroup_escaping_the_root() {
        let root = root();
        for cg in ["../../etc", "/../etc", "mesh/../../etc", "/"] {
            let text = VALID.replace("cgroup: /mesh/n1/pods/a2", &format!("cgroup: {cg}"));
            assert!(
                matches!(
                    invalid(&text, &root, 16),
                    Problem::Cgroup {
                        source: CgroupError::Escapes { .. } | CgroupError::RootCgroup { .. },
                        ..
                    }
                ),
                "{cg}"
            );
        }
        // Refused for a remote workload too, so every node refuses the file.
        let text = VALID.replace("cgroup: mesh/n2/pods/b1", "cgroup: mesh/../../b1");
        assert!(matches!(
            invalid(&text, &root, 22),
            Problem::Cgroup {
                source: CgroupError::Escapes { .. },
                ..
            }
        ));
        // A symbolic link out of the root.
        let outside = TempDir::new("registry-outside");
        std::os::unix::fs::symlink(&outside.0, root.0.join("mesh/n1/pods/link")).unwrap();
        let text = VALID.replace("cgroup: /mesh/n1/pods/a2", "cgroup: mesh/n1/pods/link");
        assert!(matches!(
            invalid(&text, &root, 16),
            Problem::Cgroup {
                source: CgroupError::Escapes { .. },
                ..
            }
        ));
    }

    #[test]
    fn two_local_workloads_in_one_cgroup() {
        let root = root();
        let text = VALID.replace("cgroup: /mesh/n1/pods/a2", "cgroup: mesh/./n1/pods/a1");
        match invalid(&text, &root, 16) {
            Problem::DuplicateCgroup {
                first,
                first_line,
                second,
                ..
            } => assert_eq!(
                (first.as_str(), first_line, second.as_str()),
                ("default/a1", 8, "default/a2")
            ),
            p => panic!("{p}"),
        }
    }

    #[test]
    fn display_is_file_line_problem() {
        let root = root();
        let text = a1_with("ips", "    ips: []");
        let e = parse(&text, &root).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{FILE}:6: workload default/a1 has no IPs (`ips` needs at least one)")
        );
        let e = parse("workloads:\n  - name: a1\n    colour: blue\n", &root).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!("{FILE}:3: unknown field `colour`")),
            "{msg}"
        );
        assert!(msg.ends_with("(column 5)"), "{msg}");
        let e = parse(&a1_with("cgroup", ""), &root).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "{FILE}:2: workload default/a1 runs on this node (n1) but has no `cgroup` field"
            )
        );
    }

    #[test]
    fn http_ports() {
        let root = root();
        let with = |v: &str| format!("{}    httpPorts: {v}\n", a1_with("", ""));
        let r = parse(&with("[9090, 8080]"), &root).unwrap();
        assert_eq!(r.workloads[0].http_ports(), &[8080, 9090]);
        assert!(r.workloads[0].is_http_port(8080));
        assert!(!r.workloads[0].is_http_port(80));
        assert!(parse(&a1_with("", ""), &root).unwrap().workloads[0]
            .http_ports()
            .is_empty());
        for bad in ["[0]", "[65536]"] {
            assert!(
                matches!(
                    invalid(&with(bad), &root, 8),
                    Problem::InvalidHttpPort { .. }
                ),
                "{bad}"
            );
        }
        match invalid(&with("[80, 80]"), &root, 8) {
            Problem::DuplicateHttpPort { workload, port } => {
                assert_eq!((workload.as_str(), port), ("default/a1", 80));
            }
            p => panic!("{p}"),
        }
    }

    #[test]
    fn names_are_dns_labels() {
        for ok in ["a", "a1", "sa-a", "0", "a-b-c", &"x".repeat(63)] {
            assert!(is_dns_label(ok), "{ok}");
        }
        for bad in ["", "A", "a_b", "-a", "a-", "a.b", "é", &"x".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad}");
        }
        assert!(is_dns_subdomain("node-1.example.com"));
        assert!(!is_dns_subdomain("node..x"));
        assert!(!is_dns_subdomain(".x"));
    }

    /// Workloads a1 (app: web, n1), b1 (app: web, n2), c1 (app: db, n2), all in `default`,
    /// w1 (app: web) in `other`; then `services`, which start on line 22.
    fn with_services(services: &str) -> String {
        format!(
            "workloads:
  - name: a1
    namespace: default
    serviceAccount: sa-a
    node: n1
    ips: [10.1.0.2]
    cgroup: mesh/n1/pods/a1
    labels: {{app: web, tier: front}}
  - name: b1
    namespace: default
    serviceAccount: sa-b
    node: n2
    ips: [10.2.0.2]
    labels: {{app: web}}
  - name: w1
    namespace: other
    serviceAccount: sa-b
    node: n2
    ips: [10.2.0.3]
    labels: {{app: web}}
services:
{services}"
        )
    }

    const WEB: &str = "  - name: web
    namespace: default
    vips: [10.96.0.10, fd00:96::10]
    ports:
      - {port: 80, targetPort: 8080, name: http, protocol: TCP}
      - {port: 443, targetPort: 8443}
    selector: {app: web}
";

    fn service_problem(services: &str, line: usize) -> (String, ServiceProblem) {
        let root = root();
        match invalid(&with_services(services), &root, line) {
            Problem::Service { service, problem } => (service, problem),
            p => panic!("expected a service problem, got {p}"),
        }
    }

    #[test]
    fn services_parse_and_select_endpoints() {
        let root = root();
        let r = parse(&with_services(WEB), &root).unwrap();
        let web = r.services.by_vip("10.96.0.10".parse().unwrap()).unwrap();
        assert_eq!(web.key(), "default/web");
        assert_eq!(web.id, 1);
        let v6 = r.services.by_vip("fd00:96::10".parse().unwrap()).unwrap();
        assert_eq!(v6.id, 1);
        // IPv4-mapped lookups find the IPv4 VIP.
        assert!(r
            .services
            .by_vip("::ffff:10.96.0.10".parse().unwrap())
            .is_some());
        assert!(r.services.by_vip("10.1.0.2".parse().unwrap()).is_none());
        assert_eq!(web.port(80).unwrap().target_port, 8080);
        assert_eq!(web.port(80).unwrap().name.as_deref(), Some("http"));
        assert_eq!(web.port(443).unwrap().target_port, 8443);
        assert!(web.port(8080).is_none());
        // a1 and b1 (same namespace, labels include app=web); not w1 (other namespace).
        let names: Vec<String> = web
            .endpoints
            .iter()
            .map(|&id| r.by_id(id).unwrap().key())
            .collect();
        assert_eq!(names, ["default/a1", "default/b1"]);
        // A registry without `services:` has none.
        assert!(parse(VALID, &root).unwrap().services.is_empty());
    }

    #[test]
    fn services_refused_with_their_line() {
        let svc = |body: &str| format!("  - name: web\n    namespace: default\n{body}");
        let ok_ports = "    ports: [{port: 80, targetPort: 8080}]\n";
        let ok_sel = "    selector: {app: web}\n";
        // A VIP that is a workload's IP.
        let (name, p) = service_problem(
            &svc(&format!("    vips: [10.2.0.2]\n{ok_ports}{ok_sel}")),
            24,
        );
        assert_eq!(name, "default/web");
        assert!(
            matches!(&p, ServiceProblem::VipIsWorkload { workload, .. } if workload == "default/b1"),
            "{p}"
        );
        // A VIP that is a node's address.
        let (_, p) = service_problem(
            &svc(&format!("    vips: [10.0.0.2]\n{ok_ports}{ok_sel}")),
            24,
        );
        assert!(matches!(p, ServiceProblem::VipIsNode { .. }), "{p}");
        // The same VIP in two services (so the same VIP:port twice).
        let two = format!(
            "{WEB}  - name: web2\n    namespace: default\n    vips: [10.96.0.10]\n{ok_ports}{ok_sel}"
        );
        let (name, p) = service_problem(&two, 31);
        assert_eq!(name, "default/web2");
        assert!(
            matches!(p, ServiceProblem::DuplicateVip { first_line: 24, .. }),
            "{p}"
        );
        // The same port twice in one service.
        let dup = svc(&format!(
            "    vips: [10.96.0.10]\n    ports:\n      - {{port: 80, targetPort: 1}}\n      - {{port: 80, targetPort: 2}}\n{ok_sel}"
        ));
        let (_, p) = service_problem(&dup, 27);
        assert!(
            matches!(p, ServiceProblem::DuplicatePort { port: 80 }),
            "{p}"
        );
        // targetPort 0, port 65536.
        let (_, p) = service_problem(
            &svc(&format!(
                "    vips: [10.96.0.10]\n    ports: [{{port: 80, targetPort: 0}}]\n{ok_sel}"
            )),
            25,
        );
        assert!(
            matches!(
                p,
                ServiceProblem::InvalidPort {
                    field: "targetPort",
                    value: 0
                }
            ),
            "{p}"
        );
        let (_, p) = service_problem(
            &svc(&format!(
                "    vips: [10.96.0.10]\n    ports: [{{port: 65536, targetPort: 1}}]\n{ok_sel}"
            )),
            25,
        );
        assert!(
            matches!(p, ServiceProblem::InvalidPort { field: "port", .. }),
            "{p}"
        );
        // An empty selector, a missing one.
        let (_, p) = service_problem(
            &svc(&format!(
                "    vips: [10.96.0.10]\n{ok_ports}    selector: {{}}\n"
            )),
            26,
        );
        assert!(matches!(p, ServiceProblem::EmptySelector), "{p}");
        let (_, p) = service_problem(&svc(&format!("    vips: [10.96.0.10]\n{ok_ports}")), 22);
        assert!(matches!(p, ServiceProblem::MissingField("selector")), "{p}");
        // UDP, no VIPs, a bad VIP, a loopback VIP.
        let (_, p) = service_problem(
            &svc(&format!(
                "    vips: [10.96.0.10]\n    ports: [{{port: 53, targetPort: 53, protocol: UDP}}]\n{ok_sel}"
            )),
            25,
        );
        assert!(matches!(p, ServiceProblem::UnsupportedProtocol(_)), "{p}");
        let (_, p) = service_problem(&svc(&format!("    vips: []\n{ok_ports}{ok_sel}")), 24);
        assert!(matches!(p, ServiceProblem::NoVips), "{p}");
        let (_, p) = service_problem(&svc(&format!("    vips: [nope]\n{ok_ports}{ok_sel}")), 24);
        assert!(matches!(p, ServiceProblem::InvalidVip(_)), "{p}");
        let (_, p) = service_problem(
            &svc(&format!("    vips: [127.0.0.1]\n{ok_ports}{ok_sel}")),
            24,
        );
        assert!(matches!(p, ServiceProblem::UnusableVip { .. }), "{p}");
        // Listed twice.
        let (_, p) = service_problem(&format!("{WEB}{WEB}"), 29);
        assert!(
            matches!(p, ServiceProblem::Duplicate { first_line: 22 }),
            "{p}"
        );
        // The message names the file, line and service.
        let root = root();
        let e = parse(
            &with_services(&svc(&format!("    vips: [10.2.0.2]\n{ok_ports}{ok_sel}"))),
            &root,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with(&format!("{FILE}:24: service default/web: virtual IP 10.2.0.2 is the address of workload default/b1")),
            "{e}"
        );
    }
}
