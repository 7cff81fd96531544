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

    /// Reads registry `text` entry by entry: a YAML error (bad syntax, a duplicate key), an
    /// unknown top-level field, a top level of the wrong shape or a document over the parser
    /// budgets refuses the whole text; an entry of the wrong shape (an unknown field, a value
    /// of the wrong type) is refused alone (its `Entry::raw` is the error).
    ///
    /// The file is first read as a whole (the common case: nothing is wrong with its shape).
    /// Otherwise each entry is read again from its own text, cut out of the file at the
    /// positions the parser gives and padded to its column, so that it parses as it did in the
    /// file and its errors name the file's lines. A file that uses YAML aliases cannot be cut
    /// so (an entry may refer to an anchor outside it): it is refused as a whole then.
    fn read_each(text: &str, path: &Path) -> Result<Self, RegistryError> {
        let whole = match yaml::from_str::<RawRegistry>(text) {
            Ok(raw) => return Ok(Self::whole(raw)),
            // Over a parser budget: so is the top level (no need to parse it again).
            Err(e) if matches!(e.without_snippet(), serde_saphyr::Error::Budget { .. }) => {
                return Err(syntax_error(path, &e, 0))
            }
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
    /// in [`Parsed::refused`]). Only a YAML error (bad syntax, a duplicate key in any
    /// mapping), an unknown top-level field, a top level of the wrong shape or a document over
    /// the parser budgets refuse the whole text, and so does an entry of the wrong shape (an
    /// unknown field, a value of the wrong type) in a file that uses YAML aliases (see
    /// `Entries::read_each`).
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
        let name = raw.name.as_ref().map(|n| n.value.clone());
        let (entry, claims) = match self.check_node(raw, line, position) {
            Ok(checked) => checked,
            Err(e) => {
                // Workloads on it are refused as on a refused node, not an unknown one (unless
                // a node of that name is kept).
                if let Some(name) = name.filter(|n| is_dns_subdomain(n)) {
                    if !self.node_lines.contains_key(&name) {
                        self.refused_nodes.entry(name).or_insert(line);
                    }
                }
                return Err(e);
            }
        };
        for (ip, l) in claims {
            self.node_addr_lines.insert(ip, (entry.name.clone(), l));
        }
        self.refused_nodes.remove(&entry.name);
        self.node_lines.insert(entry.name.clone(), line);
        Ok(entry)
    }

    /// The checks of [`Validator::node`]: the node, and its addresses with their lines.
    fn check_node(
        &self,
        raw: RawNode,
        line: usize,
        position: usize,
    ) -> Result<(NodeEntry, Vec<(IpAddr, usize)>), RegistryError> {
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
        let addr = self.node_address(&node, "address", &address, line, false, &[])?;
        let addr6 = match &raw.address6 {
            Some(a6) => Some(self.node_address(&node, "address6", a6, line, true, &[addr])?),
            None => None,
        };
        let entry = NodeEntry {
            name: node,
            address: addr.0,
            address6: addr6.map(|(ip, _)| ip),
        };
        Ok((entry, std::iter::once(addr).chain(addr6).collect()))
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

    // ---- Entry by entry (`parse_entries`) ----

    /// Parses `text` entry by entry for node n1 under `root`.
    fn entries(text: &str, root: &TempDir) -> Parsed {
        Registry::parse_entries(text, Path::new(FILE), Some("n1"), &root.0)
            .unwrap_or_else(|e| panic!("whole text refused: {e}"))
    }

    fn keys(r: &Registry) -> Vec<String> {
        r.workloads.iter().map(Workload::key).collect()
    }

    fn node_names(r: &Registry) -> Vec<&str> {
        r.nodes.iter().map(|n| n.name.as_str()).collect()
    }

    fn service_keys(r: &Registry) -> Vec<String> {
        r.services.services.iter().map(Service::key).collect()
    }

    /// Every refusal as (line, message).
    fn refusals(p: &Parsed) -> Vec<(usize, String)> {
        p.refused
            .iter()
            .map(|e| (e.line().unwrap_or(0), e.to_string()))
            .collect()
    }

    /// Good nodes n1 (local), n2; workloads a1 (n1, app: web), b1 (n2, app: web); services
    /// web (app: web) and db (app: db, selects nothing). `bad_node`, `bad_workload` and
    /// `bad_service` go between the good entries of their kind; returns the text and the
    /// line each starts on.
    fn among_good(bad_node: &str, bad_workload: &str, bad_service: &str) -> (String, [usize; 3]) {
        let mut text = String::new();
        let mut starts = [0; 3];
        let mut push = |s: &str| text.push_str(s);
        push("nodes:\n  - name: n1\n    address: 10.0.0.1\n    address6: fd00::1\n");
        let line = |t: &str| t.lines().count() + 1;
        starts[0] = line(&text);
        text.push_str(bad_node);
        text.push_str("  - name: n2\n    address: 10.0.0.2\nworkloads:\n");
        text.push_str(
            "  - name: a1\n    namespace: default\n    serviceAccount: sa-a\n    node: n1\n    \
             ips: [10.1.0.2, \"fd00:1::2\"]\n    cgroup: mesh/n1/pods/a1\n    labels: {app: web}\n",
        );
        starts[1] = line(&text);
        text.push_str(bad_workload);
        text.push_str(
            "  - name: b1\n    namespace: default\n    serviceAccount: sa-b\n    node: n2\n    \
             ips: [10.2.0.2]\n    labels: {app: web}\nservices:\n",
        );
        text.push_str(
            "  - name: web\n    namespace: default\n    vips: [10.96.0.10]\n    \
             ports: [{port: 80, targetPort: 8080}]\n    selector: {app: web}\n",
        );
        starts[2] = line(&text);
        text.push_str(bad_service);
        text.push_str(
            "  - name: db\n    namespace: default\n    vips: [10.96.0.11]\n    \
             ports: [{port: 5432, targetPort: 5432}]\n    selector: {app: db}\n",
        );
        (text, starts)
    }

    /// The good entries of [`among_good`] are all there, with their ids and endpoints.
    fn good_survive(r: &Registry) {
        assert_eq!(node_names(r), ["n1", "n2"]);
        assert_eq!(keys(r), ["default/a1", "default/b1"]);
        assert_eq!(service_keys(r), ["default/web", "default/db"]);
        let ids: Vec<u32> = r.workloads.iter().map(|w| w.id).collect();
        assert_eq!(ids, [1, 2], "positions among the kept workloads");
        assert!(r.workloads[0].cgroup_id.is_some());
        let web = r.services.by_vip("10.96.0.10".parse().unwrap()).unwrap();
        assert_eq!(web.endpoints, [1, 2]);
        let db = r.services.by_id(2).unwrap();
        assert_eq!(db.key(), "default/db");
        assert!(
            db.endpoints.is_empty(),
            "a selector that selects nothing is kept"
        );
    }

    /// A workload entry x1 on n2 (lines 1-5 of the entry) with `field` replaced by
    /// `replacement` (dropped if empty), then `extra` lines.
    fn x1_with(field: &str, replacement: &str, extra: &str) -> String {
        let mut text = String::new();
        for line in [
            "  - name: x1",
            "    namespace: default",
            "    serviceAccount: sa-x",
            "    node: n2",
            "    ips: [10.5.0.1]",
        ] {
            let key = line
                .trim_start_matches([' ', '-'])
                .split(':')
                .next()
                .unwrap();
            let l = if key == field { replacement } else { line };
            if !l.is_empty() {
                text.push_str(l);
                text.push('\n');
            }
        }
        text.push_str(extra);
        text
    }

    /// Checks one bad entry among good ones: exactly one refusal, on `start + rel - 1`,
    /// that `check` accepts; the good entries all kept. Then again with a service of the
    /// wrong shape added, so that every entry is read from its own text: same refusal.
    fn one_bad(kind: usize, bad: &str, rel: usize, check: impl Fn(&RegistryError) -> bool) {
        let root = root();
        fs::write(root.0.join("mesh/n1/pods/file"), b"").unwrap();
        let mut parts = ["", "", ""];
        parts[kind] = bad;
        let (text, starts) = among_good(parts[0], parts[1], parts[2]);
        let want = starts[kind] + rel - 1;
        let p = entries(&text, &root);
        assert_eq!(p.refused.len(), 1, "{bad}: {:?}", refusals(&p));
        let e = &p.refused[0];
        assert_eq!(e.line(), Some(want), "{bad}: {e}");
        assert!(
            e.to_string().starts_with(&format!("{FILE}:{want}: ")),
            "{e}"
        );
        assert!(check(e), "{bad}: unexpected {e}");
        good_survive(&p.registry);

        // Each entry read from its own text: the same lines.
        let shape = "  - name: s\n    colour: blue\n";
        let mut parts2 = parts;
        let shape_at = if kind == 2 {
            // After the bad service: lines of the bad one unchanged.
            let (t, s) = among_good(parts[0], parts[1], &format!("{bad}{shape}"));
            (t, s[2] + bad.lines().count() + 1)
        } else {
            parts2[2] = shape;
            let (t, s) = among_good(parts2[0], parts2[1], parts2[2]);
            (t, s[2] + 1)
        };
        let (text, shape_line) = shape_at;
        let p = entries(&text, &root);
        let lines: Vec<usize> = p.refused.iter().filter_map(RegistryError::line).collect();
        assert_eq!(lines, [want, shape_line], "{bad}: {:?}", refusals(&p));
        assert!(check(&p.refused[0]), "{bad}: {}", p.refused[0]);
        assert!(matches!(p.refused[1], RegistryError::Syntax { .. }));
        good_survive(&p.registry);
    }

    fn problem(e: &RegistryError) -> &Problem {
        e.problem().unwrap_or_else(|| panic!("not a Problem: {e}"))
    }

    #[test]
    fn entries_every_workload_problem_alone() {
        type Check = fn(&Problem) -> bool;
        let cases: Vec<(String, usize, Check)> = vec![
            (
                x1_with("ips", "", ""),
                1,
                |p| matches!(p, Problem::MissingField { field: "ips", workload } if workload == "#2"),
            ),
            (
                x1_with("name", "", "").replacen("    namespace", "  - namespace", 1),
                1,
                |p| matches!(p, Problem::MissingField { field: "name", .. }),
            ),
            (x1_with("name", "  - name: X1", ""), 1, |p| {
                matches!(p, Problem::InvalidName { field: "name", .. })
            }),
            (x1_with("namespace", "    namespace: -x", ""), 2, |p| {
                matches!(
                    p,
                    Problem::InvalidName {
                        field: "namespace",
                        ..
                    }
                )
            }),
            (
                x1_with("serviceAccount", "    serviceAccount: sa_x", ""),
                3,
                |p| matches!(p, Problem::InvalidName { field: "serviceAccount", workload, .. } if workload == "default/x1"),
            ),
            (x1_with("node", "    node: N2", ""), 4, |p| {
                matches!(p, Problem::InvalidNode { .. })
            }),
            (
                x1_with("node", "    node: n9", ""),
                1,
                |p| matches!(p, Problem::UnknownNode { node, .. } if node == "n9"),
            ),
            (x1_with("ips", "    ips: [10.5.0.300]", ""), 5, |p| {
                matches!(p, Problem::InvalidIp { .. })
            }),
            (
                x1_with("ips", "    ips:\n      - 10.5.0.1\n      - \"::1\"", ""),
                7,
                |p| matches!(p, Problem::UnusableIp { .. }),
            ),
            (x1_with("ips", "    ips: []", ""), 5, |p| {
                matches!(p, Problem::NoIps { .. })
            }),
            (
                x1_with("ips", "    ips: [10.5.0.1, \"fd00:1::2\"]", ""),
                5,
                |p| {
                    matches!(p, Problem::DuplicateIp { first, second, .. }
                    if first == "default/a1" && second == "default/x1")
                },
            ),
            (
                x1_with("name", "  - name: a1", ""),
                1,
                |p| matches!(p, Problem::DuplicateWorkload { workload, .. } if workload == "default/a1"),
            ),
            (x1_with("node", "    node: n1", ""), 1, |p| {
                matches!(p, Problem::MissingCgroup { .. })
            }),
            (
                x1_with("node", "    node: n1", "    cgroup: mesh/../../etc\n"),
                6,
                |p| {
                    matches!(
                        p,
                        Problem::Cgroup {
                            source: CgroupError::Escapes { .. },
                            ..
                        }
                    )
                },
            ),
            // Lexically refused on a remote workload too.
            (x1_with("", "", "    cgroup: /\n"), 6, |p| {
                matches!(
                    p,
                    Problem::Cgroup {
                        source: CgroupError::RootCgroup { .. },
                        ..
                    }
                )
            }),
            (
                x1_with("node", "    node: n1", "    cgroup: mesh/n1/pods/file\n"),
                6,
                |p| {
                    matches!(
                        p,
                        Problem::Cgroup {
                            source: CgroupError::NotADirectory { .. },
                            ..
                        }
                    )
                },
            ),
            (
                x1_with("node", "    node: n1", "    cgroup: /mesh/n1/pods/a1\n"),
                6,
                |p| matches!(p, Problem::DuplicateCgroup { first, .. } if first == "default/a1"),
            ),
            (
                x1_with("", "", "    peerAuthentication: MUTUAL\n"),
                6,
                |p| matches!(p, Problem::InvalidPeerAuthentication { .. }),
            ),
            (x1_with("", "", "    httpPorts: [80, 0]\n"), 6, |p| {
                matches!(p, Problem::InvalidHttpPort { value: 0, .. })
            }),
            (
                x1_with("", "", "    httpPorts:\n      - 80\n      - 80\n"),
                8,
                |p| matches!(p, Problem::DuplicateHttpPort { port: 80, .. }),
            ),
        ];
        for (bad, rel, check) in cases {
            one_bad(1, &bad, rel, |e| check(problem(e)));
        }
    }

    #[test]
    fn entries_wrong_shape_refuses_the_entry_alone() {
        let syntax = |needle: &'static str| {
            move |e: &RegistryError| {
                matches!(e, RegistryError::Syntax { .. }) && e.to_string().contains(needle)
            }
        };
        // Unknown field, wrong types, a duplicate key, entries that are no mapping.
        one_bad(
            1,
            &x1_with("", "", "    colour: blue\n"),
            6,
            syntax("colour"),
        );
        one_bad(1, &x1_with("ips", "    ips: 10.5.0.1", ""), 5, |e| {
            matches!(e, RegistryError::Syntax { .. })
        });
        one_bad(1, &x1_with("", "", "    labels: {a: [1]}\n"), 6, |e| {
            matches!(e, RegistryError::Syntax { .. })
        });
        one_bad(1, &x1_with("", "", "    httpPorts: [http]\n"), 6, |e| {
            matches!(e, RegistryError::Syntax { .. })
        });
        one_bad(1, &x1_with("", "", "    id: -1\n"), 6, |e| {
            matches!(e, RegistryError::Syntax { .. })
        });
        one_bad(1, "  - 42\n", 1, |e| {
            matches!(e, RegistryError::Syntax { .. })
        });
        // A null entry is an entry without fields.
        one_bad(1, "  -\n", 1, |e| {
            matches!(
                e.problem(),
                Some(Problem::MissingField { field: "name", .. })
            )
        });
        one_bad(1, "  - [a, b]\n", 1, |e| {
            matches!(e, RegistryError::Syntax { .. })
        });
        // Flow style, over two lines: the unknown field on the second.
        one_bad(
            1,
            "  - {name: x1, namespace: default,\n     colour: blue}\n",
            2,
            syntax("colour"),
        );
        one_bad(
            0,
            "  - name: n3\n    address: 10.0.0.3\n    port: 1\n",
            3,
            syntax("port"),
        );
        one_bad(
            2,
            "  - name: x\n    namespace: default\n    vips: [10.96.0.20]\n    ports: [{port: 80, targetPort: 8080, colour: 1}]\n    selector: {app: web}\n",
            4,
            syntax("colour"),
        );
    }

    #[test]
    fn entries_every_node_problem_alone() {
        type Check = fn(&Problem) -> bool;
        let n3 = |a: &str| format!("  - name: n3\n{a}");
        let cases: Vec<(String, usize, Check)> = vec![
            (
                n3(""),
                1,
                |p| matches!(p, Problem::NodeMissingField { field: "address", node } if node == "#2"),
            ),
            ("  - address: 10.0.0.3\n".into(), 1, |p| {
                matches!(p, Problem::NodeMissingField { field: "name", .. })
            }),
            ("  - name: N3\n    address: 10.0.0.3\n".into(), 1, |p| {
                matches!(p, Problem::InvalidNodeName { .. })
            }),
            (n3("    address: 10.0.0.300\n"), 2, |p| {
                matches!(
                    p,
                    Problem::InvalidNodeAddress {
                        field: "address",
                        ..
                    }
                )
            }),
            (
                n3("    address: 10.0.0.3\n    address6: 10.0.0.4\n"),
                3,
                |p| {
                    matches!(
                        p,
                        Problem::InvalidNodeAddress {
                            field: "address6",
                            ..
                        }
                    )
                },
            ),
            (n3("    address: 127.0.0.1\n"), 2, |p| {
                matches!(p, Problem::UnusableNodeAddress { .. })
            }),
            ("  - name: n1\n    address: 10.0.0.3\n".into(), 1, |p| {
                matches!(p, Problem::DuplicateNode { first_line: 2, .. })
            }),
            (
                n3("    address: 10.0.0.3\n    address6: fd00::1\n"),
                3,
                |p| matches!(p, Problem::DuplicateNodeAddress { first, first_line: 4, .. } if first == "n1"),
            ),
            (
                n3("    address: fd00::3\n    address6: fd00::3\n"),
                3,
                |p| matches!(p, Problem::DuplicateNodeAddress { first, first_line: 6, .. } if first == "n3"),
            ),
        ];
        for (bad, rel, check) in cases {
            one_bad(0, &bad, rel, |e| check(problem(e)));
        }
    }

    #[test]
    fn entries_every_service_problem_alone() {
        type Check = fn(&ServiceProblem) -> bool;
        // The service x (lines 1-5) with `field`'s line replaced (dropped if empty).
        let x = |field: &str, replacement: &str| {
            let mut text = String::new();
            for (f, line) in [
                ("name", "  - name: x"),
                ("namespace", "    namespace: default"),
                ("vips", "    vips: [10.96.0.20]"),
                ("ports", "    ports: [{port: 80, targetPort: 8080}]"),
                ("selector", "    selector: {app: web}"),
            ] {
                let l = if f == field { replacement } else { line };
                if !l.is_empty() {
                    text.push_str(l);
                    text.push('\n');
                }
            }
            text
        };
        let cases: Vec<(String, usize, Check)> = vec![
            (x("selector", ""), 1, |p| matches!(p, ServiceProblem::MissingField("selector"))),
            (x("vips", ""), 1, |p| matches!(p, ServiceProblem::MissingField("vips"))),
            (x("name", "  - name: X"), 1, |p| matches!(p, ServiceProblem::InvalidName { .. })),
            (x("name", "  - name: web"), 1, |p| {
                matches!(p, ServiceProblem::Duplicate { .. })
            }),
            (x("vips", "    vips: []"), 3, |p| matches!(p, ServiceProblem::NoVips)),
            (x("vips", "    vips: [nope]"), 3, |p| matches!(p, ServiceProblem::InvalidVip(_))),
            (x("vips", "    vips: [127.0.0.1]"), 3, |p| {
                matches!(p, ServiceProblem::UnusableVip { .. })
            }),
            (x("vips", "    vips: [10.2.0.2]"), 3, |p| {
                matches!(p, ServiceProblem::VipIsWorkload { workload, .. } if workload == "default/b1")
            }),
            (x("vips", "    vips: [\"fd00::1\"]"), 3, |p| {
                matches!(p, ServiceProblem::VipIsNode { node, .. } if node == "n1")
            }),
            (x("vips", "    vips:\n      - 10.96.0.20\n      - 10.96.0.10"), 5, |p| {
                matches!(p, ServiceProblem::DuplicateVip { first, .. } if first == "default/web")
            }),
            (x("vips", "    vips:\n      - 10.96.0.20\n      - 10.96.0.20"), 5, |p| {
                matches!(p, ServiceProblem::DuplicateVip { first, .. } if first == "default/x")
            }),
            (x("ports", "    ports: []"), 4, |p| matches!(p, ServiceProblem::NoPorts)),
            (x("ports", "    ports: [{port: 0, targetPort: 1}]"), 4, |p| {
                matches!(p, ServiceProblem::InvalidPort { field: "port", .. })
            }),
            (
                x("ports", "    ports:\n      - {port: 80, targetPort: 1}\n      - {port: 80, targetPort: 2}"),
                6,
                |p| matches!(p, ServiceProblem::DuplicatePort { port: 80 }),
            ),
            (x("ports", "    ports: [{port: 53, targetPort: 53, protocol: UDP}]"), 4, |p| {
                matches!(p, ServiceProblem::UnsupportedProtocol(_))
            }),
            (x("ports", "    ports: [{port: 80, targetPort: 1, name: Http}]"), 4, |p| {
                matches!(p, ServiceProblem::InvalidName { field: "ports[].name", .. })
            }),
            (x("selector", "    selector: {}"), 5, |p| matches!(p, ServiceProblem::EmptySelector)),
        ];
        for (bad, rel, check) in cases {
            one_bad(2, &bad, rel, |e| match e.problem() {
                Some(Problem::Service { problem, .. }) => check(problem),
                _ => false,
            });
        }
    }

    #[test]
    fn entries_workload_on_a_refused_node_is_refused() {
        let root = root();
        let (text, starts) = among_good(
            "  - name: n3\n    address: 10.0.0.300\n",
            &x1_with("node", "    node: n3", ""),
            "",
        );
        let p = entries(&text, &root);
        let r = refusals(&p);
        assert_eq!(r.len(), 2, "{r:?}");
        assert_eq!(r[0].0, starts[0] + 1);
        assert_eq!(r[1].0, starts[1]);
        match problem(&p.refused[1]) {
            Problem::RefusedNode {
                workload,
                node,
                node_line,
            } => assert_eq!(
                (workload.as_str(), node.as_str(), *node_line),
                ("default/x1", "n3", starts[0])
            ),
            p => panic!("{p}"),
        }
        assert_eq!(
            r[1].1,
            format!(
                "{FILE}:{}: workload default/x1: node n3 was refused (its entry is on line {})",
                starts[1], starts[0]
            )
        );
        good_survive(&p.registry);
        // Refused for a missing address: the same.
        let (text, starts) = among_good("  - name: n3\n", &x1_with("node", "    node: n3", ""), "");
        let p = entries(&text, &root);
        assert!(
            matches!(problem(&p.refused[1]), Problem::RefusedNode { node_line, .. } if *node_line == starts[0]),
            "{:?}",
            refusals(&p)
        );
        // A later valid entry of the same name takes its place: the workload is kept.
        let (text, _) = among_good(
            "  - name: n3\n    address: 10.0.0.300\n  - name: n3\n    address: 10.0.0.3\n",
            &x1_with("node", "    node: n3", ""),
            "",
        );
        let p = entries(&text, &root);
        assert_eq!(p.refused.len(), 1, "{:?}", refusals(&p));
        assert_eq!(
            keys(&p.registry),
            ["default/a1", "default/x1", "default/b1"]
        );
        // The strict parse refuses the file at the node.
        let e = parse_raw(&text, &root).unwrap_err();
        assert!(
            matches!(e.problem(), Some(Problem::InvalidNodeAddress { .. })),
            "{e}"
        );
    }

    #[test]
    fn entries_refused_entry_releases_its_claims() {
        let root = root();
        // x1 claims its key, IP, id and (local) cgroup before failing on its cgroup, which
        // is checked last; x1 again, valid, takes them all.
        let bad = "  - id: 7\n    name: x1\n    namespace: default\n    serviceAccount: sa\n    \
                   node: n1\n    ips: [10.5.0.1, \"fd00:5::1\"]\n    httpPorts: [80]\n    \
                   cgroup: mesh/../x\n";
        let good = "  - id: 7\n    name: x1\n    namespace: default\n    serviceAccount: sa\n    \
                    node: n1\n    ips: [\"fd00:5::1\", 10.5.0.1]\n    cgroup: mesh/n1/pods/a2\n";
        let text = format!(
            "nodes:\n  - name: n1\n    address: 10.0.0.1\n    address6: 10.0.0.9\n  \
             - name: n1\n    address: 10.0.0.9\nworkloads:\n{bad}{good}services:\n  \
             - name: s\n    namespace: default\n    vips: [10.96.0.1]\n    \
             ports: [{{port: 1, targetPort: 0}}]\n    selector: {{a: b}}\n  \
             - name: s\n    namespace: default\n    vips: [10.96.0.1]\n    \
             ports: [{{port: 1, targetPort: 1}}]\n    selector: {{a: b}}\n"
        );
        let p = entries(&text, &root);
        let lines: Vec<usize> = p.refused.iter().filter_map(RegistryError::line).collect();
        // The first n1 (address6 not IPv6), x1 (cgroup), the first s (targetPort 0).
        assert_eq!(lines, [4, 15, 27], "{:?}", refusals(&p));
        assert_eq!(node_names(&p.registry), ["n1"]);
        assert_eq!(
            p.registry.node("n1").unwrap().address,
            "10.0.0.9".parse::<IpAddr>().unwrap()
        );
        let x1 = &p.registry.workloads[0];
        assert_eq!((x1.key().as_str(), x1.id), ("default/x1", 7));
        assert!(x1.cgroup_id.is_some());
        assert_eq!(p.registry.by_ip("10.5.0.1".parse().unwrap()).unwrap().id, 7);
        assert_eq!(p.registry.by_id(7).unwrap().key(), "default/x1");
        assert_eq!(service_keys(&p.registry), ["default/s"]);
        assert_eq!(p.registry.services.services[0].id, 1);

        // A refused service releases its VIP, key and id.
        let text = with_services(
            "  - id: 3\n    name: web\n    namespace: default\n    vips: [10.96.0.10]\n    \
             ports: [{port: 80, targetPort: 8080}]\n    selector: {}\n  \
             - id: 3\n    name: web\n    namespace: default\n    vips: [10.96.0.10]\n    \
             ports: [{port: 80, targetPort: 8080}]\n    selector: {app: web}\n",
        );
        let p = entries(&format!("{text}{NODES}"), &root);
        assert_eq!(p.refused.len(), 1, "{:?}", refusals(&p));
        let web = p.registry.services.by_id(3).unwrap();
        assert_eq!(web.key(), "default/web");
        assert_eq!(
            p.registry
                .services
                .by_vip("10.96.0.10".parse().unwrap())
                .map(|s| s.id),
            Some(3)
        );
    }

    #[test]
    fn entries_duplicates_refuse_the_second() {
        let root = root();
        let w = |name: &str, ip: &str, node: &str, cgroup: &str| {
            format!(
                "  - name: {name}\n    namespace: default\n    serviceAccount: sa\n    \
                 node: {node}\n    ips: [{ip}]\n{cgroup}"
            )
        };
        let text = format!(
            "nodes:\n  - name: n1\n    address: 10.0.0.1\n  - name: n2\n    address: 10.0.0.1\n  \
             - name: n1\n    address: 10.0.0.3\nworkloads:\n{}{}{}{}",
            w("a1", "10.1.0.1", "n1", "    cgroup: mesh/n1/pods/a1\n"),
            w("a1", "10.1.0.2", "n1", "    cgroup: mesh/n1/pods/a2\n"),
            w("a2", "10.1.0.1", "n1", "    cgroup: mesh/n1/pods/a2\n"),
            w("a3", "10.1.0.3", "n1", "    cgroup: mesh/./n1/pods/a1\n"),
        );
        let p = entries(&text, &root);
        let r = refusals(&p);
        assert_eq!(r.len(), 5, "{r:?}");
        let problems: Vec<&Problem> = p.refused.iter().map(problem).collect();
        assert!(matches!(
            problems[0],
            Problem::DuplicateNodeAddress { first_line: 3, .. }
        ));
        assert!(matches!(
            problems[1],
            Problem::DuplicateNode { first_line: 2, .. }
        ));
        assert!(matches!(
            problems[2],
            Problem::DuplicateWorkload { first_line: 9, .. }
        ));
        assert!(matches!(
            problems[3],
            Problem::DuplicateIp { first_line: 13, .. }
        ));
        assert!(matches!(
            problems[4],
            Problem::DuplicateCgroup { first_line: 14, .. }
        ));
        assert_eq!(node_names(&p.registry), ["n1"]);
        assert_eq!(keys(&p.registry), ["default/a1"]);
    }

    #[test]
    fn entries_a_thousand_bad_entries() {
        let root = root();
        let mut text = String::from("nodes:\n  - name: n2\n    address: 10.0.0.2\nworkloads:\n");
        let mut bad_lines = Vec::new();
        let mut good = Vec::new();
        for i in 0..1_000u32 {
            let line = text.lines().count() + 1;
            // Every problem kind, round robin; a shape error among them, so each entry is
            // read from its own text.
            let (entry, rel) = match i % 5 {
                0 => (format!("  - name: bad{i}\n    namespace: default\n    serviceAccount: sa\n    node: n2\n    ips: [\"10.9.{}.{}\"]\n    colour: red\n", i / 250, i % 250), 6),
                1 => (format!("  - name: bad{i}\n    namespace: default\n    serviceAccount: sa\n    node: n2\n    ips: [\"::1\"]\n"), 5),
                2 => (format!("  - name: bad{i}\n    namespace: default\n    serviceAccount: sa\n    node: n9\n    ips: [\"10.9.{}.{}\"]\n", i / 250, i % 250), 1),
                3 => (format!("  - {{name: Bad{i}, namespace: default, serviceAccount: sa, node: n2, ips: [\"10.9.{}.{}\"]}}\n", i / 250, i % 250), 1),
                _ => (format!("  - name: good\n    namespace: default\n    serviceAccount: sa\n    node: n2\n    ips: [\"10.9.{}.{}\"]\n", i / 250, i % 250), 1),
            };
            text.push_str(&entry);
            bad_lines.push(line + rel - 1);
            if i % 100 == 0 {
                let name = format!("ok{i}");
                text.push_str(&format!(
                    "  - name: {name}\n    namespace: default\n    serviceAccount: sa\n    node: n2\n    ips: [\"10.8.{}.{}\"]\n",
                    i / 250,
                    i % 250
                ));
                good.push(format!("default/{name}"));
            }
        }
        let started = std::time::Instant::now();
        let p = entries(&text, &root);
        let elapsed = started.elapsed();
        // The fifth kind is a duplicate of the first "good" (kept, it is the first one).
        good.insert(1, "default/good".into());
        bad_lines.remove(4);
        let lines: Vec<usize> = p.refused.iter().filter_map(RegistryError::line).collect();
        assert_eq!(lines.len(), 999);
        assert_eq!(lines, bad_lines);
        assert_eq!(keys(&p.registry), good);
        assert!(
            elapsed < std::time::Duration::from_secs(20),
            "1,000 bad entries took {elapsed:?}"
        );
    }

    #[test]
    fn entries_whole_text_refusals() {
        let root = root();
        let whole = |text: &str| {
            Registry::parse_entries(text, Path::new(FILE), Some("n1"), &root.0)
                .map(|p| refusals(&p))
                .unwrap_err()
        };
        // YAML syntax errors.
        for (text, line) in [
            ("workloads:\n  - name: a1\n    ips: [\"10.1.0.2\"\n", 3),
            ("workloads:\n  - name: a1\n    namespace: a: b\n", 3),
            ("workloads:\n  - {name: a1\n", 2),
            ("", 1),
            ("workloads: []\n---\nworkloads: []\n", 3),
        ] {
            let e = whole(text);
            assert!(matches!(e, RegistryError::Syntax { .. }), "{text:?}: {e}");
            assert_eq!(e.line(), Some(line), "{text:?}: {e}");
        }
        // A duplicate key is a YAML error, wherever it is.
        let e = whole(&a1_with("", "").replace("  - name: a1\n", "  - name: a1\n    name: a2\n"));
        assert_eq!(e.line(), Some(3), "{e}");
        // An unknown or missing top-level field, a top level of the wrong shape.
        for (text, needle) in [
            ("workloads: []\ncolour: blue\n", "colour"),
            ("nodes: []\n", "workloads"),
            ("workloads: {a: b}\n", ""),
            ("workloads: []\nnodes: n1\n", ""),
            ("- workloads: []\n", ""),
        ] {
            let e = whole(text);
            assert!(matches!(e, RegistryError::Syntax { .. }), "{text:?}: {e}");
            assert!(e.to_string().contains(needle), "{text:?}: {e}");
        }
        // A file with aliases is read as a whole: a shape error refuses it all.
        let aliased = "workloads:\n  - name: a1\n    namespace: default\n    serviceAccount: sa\n    \
                       node: n2\n    ips: [10.2.0.1]\n    labels: &web {app: web}\n  - name: a2\n    \
                       namespace: default\n    serviceAccount: sa\n    node: n2\n    \
                       ips: [10.2.0.2]\n    labels: *web\nnodes:\n  - name: n2\n    address: 10.0.0.2\n";
        let p = entries(aliased, &root);
        assert!(p.refused.is_empty());
        assert_eq!(p.registry.workloads[1].labels["app"], "web");
        let e = whole(&aliased.replace("  - name: a2\n", "  - name: a2\n    colour: x\n"));
        assert_eq!(e.line(), Some(9), "{e}");
    }

    #[test]
    fn entries_over_the_parser_budgets_are_refused_whole() {
        let root = root();
        let whole = |text: &str| {
            Registry::parse_entries(text, Path::new(FILE), Some("n1"), &root.0)
                .map(|p| refusals(&p))
                .unwrap_err()
        };
        let entry = "workloads:\n  - name: a1\n    namespace: default\n    serviceAccount: sa\n";
        // Nesting deeper than the budget, inside one entry (of the wrong shape anyway).
        let deep = format!("{entry}    labels: {}{}\n", "[".repeat(80), "]".repeat(80));
        let e = whole(&deep);
        assert!(matches!(e, RegistryError::Syntax { line: 5, .. }), "{e}");
        assert!(e.to_string().contains("limits breached"), "{e}");
        // More aliases than the budget.
        let mut aliases = format!("{entry}    node: &n n1\n    ips: [");
        for _ in 0..60_000 {
            aliases.push_str("*n,");
        }
        aliases.push_str("]\n");
        let e = whole(&aliases);
        assert!(e.to_string().contains("limits breached"), "{e}");
        // An alias bomb: each list ten of the one before (stopped at a million events
        // recorded, about 3 s in a debug build).
        let mut bomb =
            format!("{entry}    labels: {{}}\n    ips: &l0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..9 {
            let prev = format!("*l{}", i - 1);
            bomb.push_str(&format!(
                "  - name: b{i}\n    ips: &l{i} [{}]\n",
                [prev.as_str(); 10].join(", ")
            ));
        }
        let e = whole(&bomb);
        assert!(e.to_string().contains("limits breached"), "{e}");
    }

    #[test]
    #[ignore = "parses 4,000,000 parser nodes: about 25 s in a debug build"]
    fn entries_oversize_document_is_refused_whole() {
        let root = root();
        // More parser nodes than the budget, inside one entry.
        let mut text = String::from("workloads:\n  - name: a1\n    ips: [");
        for _ in 0..=yaml::MAX_NODES {
            text.push_str("0,");
        }
        text.push_str("]\n");
        let e = Registry::parse_entries(&text, Path::new(FILE), Some("n1"), &root.0)
            .map(|p| p.refused.len())
            .unwrap_err();
        assert!(matches!(e, RegistryError::Syntax { .. }), "{e}");
        assert!(e.to_string().contains("limits breached"), "{e}");
    }

    #[test]
    fn entries_of_a_valid_file_equal_the_strict_parse() {
        let root = root();
        let strict = parse(VALID, &root).unwrap();
        let p = entries(VALID, &root);
        assert!(p.refused.is_empty());
        assert_eq!(p.registry, strict);
        let text = with_services(WEB);
        let strict = parse(&text, &root).unwrap();
        let p = entries(&format!("{text}{NODES}"), &root);
        assert_eq!(p.registry, strict);
        // The authority's view.
        let all = Registry::parse_all(VALID, Path::new(FILE)).unwrap();
        let p = Registry::parse_entries(VALID, Path::new(FILE), None, Path::new("/")).unwrap();
        assert_eq!(p.registry, all);
        // load_entries reads the file.
        let file = root.0.join("registry.yaml");
        fs::write(&file, VALID).unwrap();
        let p = Registry::load_entries(&file, Some("n1"), &root.0).unwrap();
        assert_eq!(p.registry, strict_valid(&root));
        let e = Registry::load_entries(&root.0.join("absent"), None, &root.0).unwrap_err();
        assert!(matches!(e, RegistryError::Io { .. }));
    }

    fn strict_valid(root: &TempDir) -> Registry {
        parse(VALID, root).unwrap()
    }

    // ---- Pending local workloads ----

    #[test]
    fn local_workload_pending_until_its_cgroup_exists() {
        let root = TempDir::new("registry-pending");
        root.mkdir("mesh/n1/pods/a1");
        // a2's cgroup does not exist yet: the strict parse refuses it, parse_entries keeps it.
        assert!(parse(VALID, &root).is_err());
        let mut r = entries(VALID, &root).registry;
        assert_eq!(r.workloads.len(), 4);
        let pending: Vec<String> = r.pending("n1").map(Workload::key).collect();
        assert_eq!(pending, ["default/a2"]);
        assert!(r.resolve_pending("n1", &root.0).is_empty());
        root.mkdir("mesh/n1/pods/a2");
        assert_eq!(r.resolve_pending("n1", &root.0), [2]);
        let ino = fs::metadata(root.0.join("mesh/n1/pods/a2")).unwrap().ino();
        assert_eq!(r.by_id(2).unwrap().cgroup_id, Some(ino));
        assert_eq!(r.pending("n1").count(), 0);
        assert!(r.resolve_pending("n1", &root.0).is_empty());
        // Now equal to the strict parse.
        assert_eq!(r, parse(VALID, &root).unwrap());
        // Another node's pending list (nothing resolved for it here).
        assert_eq!(r.pending("n2").count(), 1);
    }

    #[test]
    fn pending_cgroup_that_turns_out_a_duplicate_stays_pending() {
        let root = TempDir::new("registry-pending-dup");
        root.mkdir("mesh/n1/pods/a1");
        let text = VALID.replace("cgroup: /mesh/n1/pods/a2", "cgroup: mesh/n1/pods/later");
        let mut r = entries(&text, &root).registry;
        assert_eq!(r.pending("n1").count(), 1);
        // `later` appears as a link to a1's cgroup: the same cgroup id.
        std::os::unix::fs::symlink(
            root.0.join("mesh/n1/pods/a1"),
            root.0.join("mesh/n1/pods/later"),
        )
        .unwrap();
        assert!(r.resolve_pending("n1", &root.0).is_empty());
        assert_eq!(r.pending("n1").count(), 1);
        // Two pending workloads with one cgroup: the first to resolve gets it.
        let text = VALID
            .replace("cgroup: mesh/n1/pods/a1", "cgroup: mesh/n1/pods/new")
            .replace("cgroup: /mesh/n1/pods/a2", "cgroup: /mesh/n1/pods/new");
        let mut r = entries(&text, &root).registry;
        assert_eq!(r.pending("n1").count(), 2);
        root.mkdir("mesh/n1/pods/new");
        assert_eq!(r.resolve_pending("n1", &root.0), [1]);
        let still: Vec<String> = r.pending("n1").map(Workload::key).collect();
        assert_eq!(still, ["default/a2"]);
    }

    #[test]
    fn pending_does_not_excuse_a_bad_cgroup() {
        let root = root();
        fs::write(root.0.join("mesh/n1/pods/file"), b"").unwrap();
        for (cgroup, want) in [
            ("mesh/../../etc", "escapes"),
            ("mesh/n1/pods/file", "not a directory"),
            ("mesh/n1/pods/a1", "already the cgroup"),
        ] {
            let text = VALID.replace("cgroup: /mesh/n1/pods/a2", &format!("cgroup: {cgroup}"));
            let p = entries(&text, &root);
            let r = refusals(&p);
            assert_eq!(r.len(), 1, "{cgroup}: {r:?}");
            assert_eq!(r[0].0, 16);
            assert!(r[0].1.contains(want), "{cgroup}: {r:?}");
            assert_eq!(p.registry.workloads.len(), 3);
        }
        // A link out of the mount that appears later is refused by resolve_pending.
        let text = VALID.replace("cgroup: /mesh/n1/pods/a2", "cgroup: mesh/n1/pods/link");
        let mut r = entries(&text, &root).registry;
        let outside = TempDir::new("registry-outside");
        std::os::unix::fs::symlink(&outside.0, root.0.join("mesh/n1/pods/link")).unwrap();
        assert!(r.resolve_pending("n1", &root.0).is_empty());
        assert_eq!(r.pending("n1").count(), 1);
    }

    // ---- Ids ----

    /// Three workloads with ids 30, 10, 20 (a1, b1, c1) and two services with ids 7, 5.
    const WITH_IDS: &str = "nodes:
  - name: n1
    address: 10.0.0.1
  - name: n2
    address: 10.0.0.2
workloads:
  - id: 30
    name: a1
    namespace: default
    serviceAccount: sa
    node: n1
    ips: [10.1.0.1]
    cgroup: mesh/n1/pods/a1
    labels: {app: web}
  - id: 10
    name: b1
    namespace: default
    serviceAccount: sa
    node: n2
    ips: [10.2.0.1]
    labels: {app: web}
  - id: 20
    name: c1
    namespace: default
    serviceAccount: sa
    node: n2
    ips: [10.2.0.2]
    labels: {app: db}
services:
  - id: 7
    name: web
    namespace: default
    vips: [10.96.0.1]
    ports: [{port: 80, targetPort: 8080}]
    selector: {app: web}
  - id: 5
    name: db
    namespace: default
    vips: [10.96.0.2]
    ports: [{port: 5432, targetPort: 5432}]
    selector: {app: db}
";

    #[test]
    fn explicit_ids() {
        let root = root();
        let r = parse_raw(WITH_IDS, &root).unwrap();
        let ids: Vec<u32> = r.workloads.iter().map(|w| w.id).collect();
        assert_eq!(ids, [30, 10, 20]);
        assert_eq!(r.by_id(10).unwrap().key(), "default/b1");
        assert_eq!(r.by_id(30).unwrap().key(), "default/a1");
        assert!(r.by_id(1).is_none() && r.by_id(0).is_none() && r.by_id(3).is_none());
        assert_eq!(r.services.by_id(5).unwrap().key(), "default/db");
        assert!(r.services.by_id(1).is_none());
        assert_eq!(r.services.by_id(7).unwrap().endpoints, [30, 10]);
        assert_eq!(r.services.by_id(5).unwrap().endpoints, [20]);
        assert_eq!(entries(WITH_IDS, &root).registry, r);
        // Large ids.
        let text = WITH_IDS.replace("id: 30", "id: 4294967295");
        let r = parse_raw(&text, &root).unwrap();
        assert_eq!(r.by_id(u32::MAX).unwrap().key(), "default/a1");
    }

    #[test]
    fn id_problems() {
        let root = root();
        // (from, to, line, check) on WITH_IDS: b1's entry (and id) on line 15, web's on 30,
        // db's on 36.
        type Check = fn(&Problem) -> bool;
        let cases: [(&str, &str, usize, Check); 6] = [
            (
                "  - id: 10\n    name: b1\n",
                "  - name: b1\n",
                15,
                |p| matches!(p, Problem::MissingId { workload } if workload == "default/b1"),
            ),
            ("id: 10\n", "id: 0\n", 15, |p| {
                matches!(p, Problem::InvalidId { value: 0, .. })
            }),
            ("id: 10\n", "id: 4294967296\n", 15, |p| {
                matches!(
                    p,
                    Problem::InvalidId {
                        value: 4_294_967_296,
                        ..
                    }
                )
            }),
            ("id: 10\n", "id: 30\n", 15, |p| {
                matches!(p, Problem::DuplicateId { id: 30, first, first_line: 7, second }
                    if first == "default/a1" && second == "default/b1")
            }),
            ("  - id: 7\n    name: web\n", "  - name: web\n", 30, |p| {
                matches!(
                    p,
                    Problem::Service {
                        problem: ServiceProblem::MissingId,
                        ..
                    }
                )
            }),
            ("id: 5\n", "id: 7\n", 36, |p| {
                matches!(p, Problem::Service { problem: ServiceProblem::DuplicateId { id: 7, first_line: 30, .. }, service }
                    if service == "default/db")
            }),
        ];
        for (from, to, line, check) in cases {
            let text = WITH_IDS.replacen(from, to, 1);
            // Strict: the file is refused with it.
            let e = parse_raw(&text, &root).unwrap_err();
            assert_eq!(e.line(), Some(line), "{to}: {e}");
            assert!(check(problem(&e)), "{to}: {e}");
            // Entry by entry: that entry alone.
            let p = entries(&text, &root);
            assert_eq!(p.refused.len(), 1, "{to}: {:?}", refusals(&p));
            assert_eq!(p.refused[0].line(), Some(line));
            assert!(check(problem(&p.refused[0])), "{to}");
            assert_eq!(
                p.registry.workloads.len() + p.registry.services.services.len(),
                4
            );
        }
        let e = parse_raw(&WITH_IDS.replace("id: 5\n", "id: 0\n"), &root).unwrap_err();
        assert!(
            matches!(
                e.problem(),
                Some(Problem::Service {
                    problem: ServiceProblem::InvalidId(0),
                    ..
                })
            ),
            "{e}"
        );
        // Ids are all or none per kind: workloads without any keep their positions while
        // the services carry theirs (endpoints are the positions then).
        let text = WITH_IDS
            .replace("  - id: 30\n    name", "  - name")
            .replace("  - id: 10\n    name", "  - name")
            .replace("  - id: 20\n    name", "  - name");
        let r = parse_raw(&text, &root).unwrap();
        let ids: Vec<u32> = r.workloads.iter().map(|w| w.id).collect();
        assert_eq!(ids, [1, 2, 3]);
        assert_eq!(r.services.by_id(7).unwrap().endpoints, [1, 2]);
    }

    #[test]
    fn with_ids_renumbers_everything() {
        let root = root();
        let r = parse(&with_services(WEB), &root).unwrap();
        let r = r.with_ids(
            |key| match key {
                "default/a1" => 100,
                "default/b1" => 7,
                "other/w1" => 1,
                k => panic!("{k}"),
            },
            |key| {
                assert_eq!(key, "default/web");
                42
            },
        );
        let ids: Vec<u32> = r.workloads.iter().map(|w| w.id).collect();
        assert_eq!(ids, [100, 7, 1]);
        assert_eq!(r.by_id(100).unwrap().key(), "default/a1");
        assert_eq!(r.by_id(1).unwrap().key(), "other/w1");
        assert!(r.by_id(2).is_none());
        assert_eq!(r.by_ip("10.2.0.2".parse().unwrap()).unwrap().id, 7);
        let web = r.services.by_id(42).unwrap();
        assert_eq!(web.endpoints, [100, 7]);
        assert!(r.services.by_id(1).is_none());
        assert_eq!(
            r.services.by_vip("10.96.0.10".parse().unwrap()).unwrap().id,
            42
        );
        // What it renders reads back with those ids.
        let back = entries(&r.to_yaml(), &root);
        assert!(back.refused.is_empty(), "{:?}", refusals(&back));
        assert_eq!(back.registry, r);
    }

    #[test]
    #[should_panic(expected = "workload ids must be unique")]
    #[cfg(debug_assertions)]
    fn with_ids_asserts_uniqueness() {
        let root = root();
        let _ = parse(VALID, &root).unwrap().with_ids(|_| 1, |_| 1);
    }

    // ---- Rendering ----

    /// Values YAML 1.1 (or YAML syntax) would read as something else unquoted.
    const TRICKY: &[&str] = &[
        "no",
        "No",
        "off",
        "on",
        "yes",
        "y",
        "n",
        "true",
        "False",
        "null",
        "Null",
        "~",
        "",
        " ",
        "1e3",
        "1_000",
        "0x1F",
        "0o17",
        "010",
        ".inf",
        "-.inf",
        ".nan",
        "1.10",
        "12:30:00",
        "2001-12-14",
        "*alias",
        "&anchor",
        "!tag",
        "!!str",
        "a: b",
        "a:b",
        "#comment",
        "a #b",
        "- x",
        "? x",
        "[a]",
        "{a}",
        "|",
        ">",
        "%x",
        "@x",
        "`x",
        "'",
        "''",
        "\"",
        "\\",
        "\\n",
        "\n",
        "\t",
        " lead",
        "trail ",
        "a\nb",
        "é",
        "日本",
        "😀",
        "\u{1}",
        "\u{7f}",
        "\u{85}",
        "\u{a0}",
        "\u{2028}",
        "\u{2029}",
        "\u{feff}",
        "\u{fffe}",
        "---",
        "...",
        "<<",
        "=",
    ];

    /// A registry with a bit of everything, labels from [`TRICKY`].
    fn everything(root: &TempDir) -> Registry {
        let mut labels = String::new();
        for (i, v) in TRICKY.iter().enumerate() {
            labels.push_str(&format!("      k{i}: {}\n", quote(v)));
            labels.push_str(&format!("      {}: v{i}\n", quote(&format!("{v}/key"))));
        }
        let text = format!(
            "nodes:
  - name: n1
    address: 10.0.0.1
    address6: \"fd00::1\"
  - name: node-2.example
    address: \"fd00::2\"
workloads:
  - name: a1
    namespace: default
    serviceAccount: sa-a
    node: n1
    ips: [10.1.0.2, \"fd00:1::2\"]
    cgroup: /mesh/n1/pods/a1
    labels:
{labels}    peerAuthentication: PERMISSIVE
    httpPorts: [9090, 80]
  - name: a2
    namespace: default
    serviceAccount: sa-a
    node: n1
    ips: [\"fd00:1::3\"]
    cgroup: mesh/n1/pods/pending
    labels: {{app: web}}
  - name: b1
    namespace: other
    serviceAccount: sa-b
    node: node-2.example
    ips: [10.2.0.2]
services:
  - name: web
    namespace: default
    vips: [10.96.0.10, \"fd00:96::10\"]
    ports:
      - {{port: 80, targetPort: 8080, name: http, protocol: TCP}}
      - {{port: 443, targetPort: 8443}}
    selector: {{app: web, \"no\": \"1e3\"}}
  - name: quiet
    namespace: other
    vips: [10.96.0.11]
    ports: [{{port: 1, targetPort: 65535}}]
    selector: {{\"~\": \"*a\"}}
"
        );
        let p = entries(&text, root);
        assert!(p.refused.is_empty(), "{:?}", refusals(&p));
        p.registry
    }

    #[test]
    fn to_yaml_round_trips() {
        let root = root();
        let r = everything(&root);
        let a1 = &r.workloads[0];
        for (i, v) in TRICKY.iter().enumerate() {
            assert_eq!(a1.labels[&format!("k{i}")], *v, "label k{i}");
            assert_eq!(a1.labels[&format!("{v}/key")], format!("v{i}"));
        }
        assert!(r.workloads[1].cgroup_id.is_none(), "a2 is pending");
        let yaml = r.to_yaml();
        let back = entries(&yaml, &root);
        assert!(back.refused.is_empty(), "{:?}\n{yaml}", refusals(&back));
        assert_eq!(back.registry, r, "{yaml}");
        // Deterministic: the same registry, the same bytes, and a fixed point.
        assert_eq!(r.clone().to_yaml(), yaml);
        assert_eq!(back.registry.to_yaml(), yaml);
        // The strict parsers read it too.
        root.mkdir("mesh/n1/pods/pending");
        let strict = parse_raw(&yaml, &root).unwrap();
        assert!(strict.workloads[1].cgroup_id.is_some());
        assert_eq!(
            Registry::parse_all(&yaml, Path::new(FILE))
                .unwrap()
                .workloads
                .len(),
            3
        );
        // Every entry has its id.
        assert_eq!(yaml.matches("  - id: ").count(), 5);
    }

    #[test]
    fn to_yaml_shape() {
        let root = root();
        let text = "nodes:\n  - name: n1\n    address: 10.0.0.1\nworkloads:\n  - name: a1\n    \
                    namespace: default\n    serviceAccount: sa\n    node: n1\n    \
                    ips: [10.1.0.2]\n    cgroup: mesh/n1/pods/a1\n    labels: {b: \"no\", a: \"1\"}\n";
        let r = entries(text, &root).registry;
        assert_eq!(
            r.to_yaml(),
            "nodes:\n  - name: \"n1\"\n    address: \"10.0.0.1\"\nworkloads:\n  - id: 1\n    \
             name: \"a1\"\n    namespace: \"default\"\n    serviceAccount: \"sa\"\n    \
             node: \"n1\"\n    ips: [\"10.1.0.2\"]\n    cgroup: \"mesh/n1/pods/a1\"\n    \
             labels: {\"a\": \"1\", \"b\": \"no\"}\n"
        );
        let empty = entries("workloads: []\n", &root).registry;
        assert_eq!(empty.to_yaml(), "nodes: []\nworkloads: []\n");
        assert_eq!(entries(&empty.to_yaml(), &root).registry, empty);
    }

    #[test]
    fn quote_escapes_what_yaml_would_not_read_back() {
        assert_eq!(quote("a\"b\\c"), r#""a\"b\\c""#);
        assert_eq!(quote("a\nb\tc\r"), r#""a\nb\tc\r""#);
        assert_eq!(
            quote("\u{1}\u{85}\u{2028}\u{feff}"),
            r#""\u0001\u0085\u2028\uFEFF""#
        );
        assert_eq!(quote("é日😀"), "\"é日😀\"");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Any label keys and values (any Unicode) read back as they were.
        #[test]
        fn labels_round_trip(labels in proptest::collection::btree_map(".*", ".*", 0..8)) {
            let root = root();
            let text = "nodes:\n  - name: n1\n    address: 10.0.0.1\nworkloads:\n  - name: a1\n    \
                        namespace: default\n    serviceAccount: sa\n    node: n1\n    \
                        ips: [10.1.0.2]\n    cgroup: mesh/n1/pods/a1\n";
            let mut r = entries(text, &root).registry;
            r.workloads[0].labels = labels;
            let yaml = r.to_yaml();
            let back = entries(&yaml, &root);
            proptest::prop_assert!(back.refused.is_empty(), "{:?}\n{}", refusals(&back), yaml);
            proptest::prop_assert_eq!(back.registry, r);
        }
    }
}
