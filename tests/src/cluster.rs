//! The mini-cluster: nodes (network namespaces joined by a bridge) and pods
//! (network namespaces with a veth to their node, and their own cgroup under
//! the node's pod-cgroup parent).
//!
//! Addressing, for node index `i` (0-based; the node is named `n{i+1}`):
//! - node fabric: `10.0.0.{i+1}/24` and `fd00::{i+1}/64` on `eth0`, a port of
//!   bridge `br0` in the cluster's own bridge namespace;
//! - its pods `k = 2, 3, …`: `10.{i+1}.0.{k}/32` and `fd00:{i+1}::{k}/128` on
//!   the pod's `eth0`, default routes via `10.{i+1}.0.1` and `fe80::1`, which
//!   sit on the node end `v<pod>` of every pod veth (`/32` and `/128` routes
//!   per pod on the node; forwarding on);
//! - node routes `10.{j+1}.0.0/24 via 10.0.0.{j+1}` and
//!   `fd00:{j+1}::/64 via fd00::{j+1}` to every other node `j`.
//!
//! cgroups: `<cgroup2>/mesh-<id>/<node>/pods/<pod>`; the node's pod-cgroup
//! parent (where its agent attaches) is `<cgroup2>/mesh-<id>/<node>/pods`.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use crate::{
    agent::{Agent, AgentSpec},
    authority::Authority,
    cgroup::Cgroup,
    netns::{Netns, Veth},
    process::{self, Output, Proc, Target},
    registry::{self, NodeEntry, RenderedRegistry, ServiceEntry, WorkloadEntry},
    sys,
    testpod::{self, ClientProc, ClientRequest, ClientRun, HttpRun, Server},
    tmp::TempDir,
};

/// The port of every agent's admin endpoint (`/metrics`), on the node IP.
pub const ADMIN_PORT: u16 = 15020;
/// The port every agent's inbound HBONE listener uses.
pub const HBONE_PORT: u16 = 15008;

/// The port every agent's outbound listener uses.
pub const OUTBOUND_PORT: u16 = 15001;
/// The namespace of every pod in the registry.
pub const POD_NAMESPACE: &str = "default";

/// Shared by every place of a cluster: where logs go, which testpod to run.
#[derive(Debug)]
struct Ctx {
    tmp: PathBuf,
    testpod: PathBuf,
    seq: AtomicUsize,
}

impl Ctx {
    /// A fresh, ordered log file stem in the cluster's temp dir.
    fn log_base(&self, label: &str) -> PathBuf {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let clean: String = label
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self.tmp.join(format!("{n:04}-{clean}"))
    }
}

/// Somewhere processes run: a node's network namespace (outside the pod
/// cgroups) or a pod's network namespace and cgroup.
#[derive(Clone, Debug)]
pub struct Place {
    name: String,
    target: Target,
    ip4: Ipv4Addr,
    ip6: Ipv6Addr,
    ctx: Arc<Ctx>,
}

impl Place {
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Spawns `cmd` here; stdout/stderr go to files in the cluster's temp dir.
    #[track_caller]
    pub fn spawn(&self, cmd: Command, label: &str) -> Proc {
        let label = format!("{}-{label}", self.name);
        process::spawn(cmd, &self.target, &label, &self.ctx.log_base(&label))
    }

    /// Runs `cmd` here to completion (killed, and a panic, after `timeout`).
    #[track_caller]
    pub fn run(&self, cmd: Command, label: &str, timeout: Duration) -> Output {
        self.spawn(cmd, label).wait_output(timeout)
    }

    /// Starts `mesh-testpod serve` on this place's IPv4 and IPv6 addresses,
    /// on each of `ports`, and waits until every listener is bound. Every
    /// connection is greeted with `"<name> <local_addr>\n"` and then echoed.
    #[track_caller]
    pub fn serve(&self, ports: &[u16]) -> Server {
        assert!(!ports.is_empty(), "serve needs at least one port");
        let mut listens = Vec::new();
        for &p in ports {
            listens.push(SocketAddr::new(IpAddr::V4(self.ip4), p));
            listens.push(SocketAddr::new(IpAddr::V6(self.ip6), p));
        }
        self.serve_on(&listens)
    }

    /// Like [`Place::serve`] but on explicit addresses.
    #[track_caller]
    pub fn serve_on(&self, listens: &[SocketAddr]) -> Server {
        let mut cmd = Command::new(&self.ctx.testpod);
        cmd.arg("serve").arg("--name").arg(&self.name);
        for l in listens {
            cmd.arg("--listen").arg(l.to_string());
        }
        let proc = self.spawn(cmd, "serve");
        let mut server = Server {
            proc,
            listens: listens.to_vec(),
        };
        let want = listens.len();
        let ok = crate::poll::eventually(crate::poll::DEFAULT_TIMEOUT, || {
            if !server.proc.is_running() {
                return Some(false);
            }
            (server.events("listening").len() >= want).then_some(true)
        });
        if ok != Some(true) {
            panic!(
                "server {} did not bind {listens:?} (exited or timed out)\nstdout:\n{}\nstderr:\n{}",
                self.name,
                server.proc.stdout(),
                server.proc.stderr()
            );
        }
        server
    }

    /// Starts `mesh-testpod serve-many` (one thread, for tens of thousands of connections) on
    /// this place's IPv4 address and `port`, and waits until it is bound. Greets and echoes
    /// like [`Place::serve`], without a log line per connection.
    #[track_caller]
    pub fn serve_many(&self, port: u16) -> Server {
        let listen = SocketAddr::new(IpAddr::V4(self.ip4), port);
        let mut cmd = Command::new(&self.ctx.testpod);
        cmd.arg("serve-many")
            .arg("--name")
            .arg(&self.name)
            .arg("--listen")
            .arg(listen.to_string());
        let proc = self.spawn(cmd, "serve-many");
        let mut server = Server {
            proc,
            listens: vec![listen],
        };
        let ok = crate::poll::eventually(crate::poll::DEFAULT_TIMEOUT, || {
            if !server.proc.is_running() {
                return Some(false);
            }
            (!server.events("listening").is_empty()).then_some(true)
        });
        if ok != Some(true) {
            panic!(
                "server {} did not bind {listen} (exited or timed out)\nstderr:\n{}",
                self.name,
                server.proc.stderr()
            );
        }
        server
    }

    /// Starts `mesh-testpod hold-many` here: `count` connections to `connect`, `concurrency`
    /// at a time, a line exchanged on each, then held until the guard is closed or dropped.
    #[track_caller]
    pub fn hold_many(
        &self,
        connect: SocketAddr,
        count: usize,
        concurrency: usize,
    ) -> testpod::HeldMany {
        let mut cmd = Command::new(&self.ctx.testpod);
        cmd.arg("hold-many")
            .arg("--connect")
            .arg(connect.to_string())
            .arg("--count")
            .arg(count.to_string())
            .arg("--concurrency")
            .arg(concurrency.to_string());
        let proc = self.spawn(cmd, &format!("hold-many-{connect}"));
        testpod::HeldMany { proc }
    }

    /// Runs `mesh-testpod half-heads` here: `count` connections to `connect` at once, `send`
    /// written on each (an incomplete request head), each read until the server closes it (at
    /// most 15 s). Returns `(milliseconds to the close, first line answered)` per connection,
    /// by time; the line is `""` when nothing was answered, `"open"` if never closed.
    #[track_caller]
    pub fn half_heads(&self, connect: SocketAddr, count: usize, send: &str) -> Vec<(u64, String)> {
        let mut cmd = Command::new(&self.ctx.testpod);
        cmd.arg("half-heads")
            .arg("--connect")
            .arg(connect.to_string())
            .arg("--count")
            .arg(count.to_string())
            .arg("--send")
            .arg(send);
        let out = self.run(cmd, "half-heads", Duration::from_secs(60));
        let line = out
            .stdout
            .lines()
            .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .unwrap_or_else(|| panic!("half-heads reported nothing: {out:?}"));
        line["results"]
            .as_array()
            .map(|rs| {
                rs.iter()
                    .map(|r| {
                        (
                            r["ms"].as_u64().unwrap_or(u64::MAX),
                            r["answer"].as_str().unwrap_or("").to_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Starts `mesh-testpod http-serve` (HTTP/1.1 and h2c) on this place's IPv4 and IPv6
    /// addresses, on each of `ports`, and waits until every listener is bound. Every request
    /// is answered `200` with body `<name> <METHOD> <path> host=<host>[ body=<n>]`.
    #[track_caller]
    pub fn serve_http(&self, ports: &[u16]) -> Server {
        assert!(!ports.is_empty(), "serve_http needs at least one port");
        let mut listens = Vec::new();
        for &p in ports {
            listens.push(SocketAddr::new(IpAddr::V4(self.ip4), p));
            listens.push(SocketAddr::new(IpAddr::V6(self.ip6), p));
        }
        let mut cmd = Command::new(&self.ctx.testpod);
        cmd.arg("http-serve").arg("--name").arg(&self.name);
        for l in &listens {
            cmd.arg("--listen").arg(l.to_string());
        }
        let proc = self.spawn(cmd, "http-serve");
        let mut server = Server { proc, listens };
        let want = server.listens.len();
        let ok = crate::poll::eventually(crate::poll::DEFAULT_TIMEOUT, || {
            if !server.proc.is_running() {
                return Some(false);
            }
            (server.events("listening").len() >= want).then_some(true)
        });
        assert!(
            ok == Some(true),
            "http server {} did not bind (exited or timed out)\nstdout:\n{}\nstderr:\n{}",
            self.name,
            server.proc.stdout(),
            server.proc.stderr()
        );
        server
    }

    /// HTTP/1.1 on one connection to `connect`: `requests` are `METHOD PATH [HOST]
    /// [+body=TEXT|+chunked=TEXT]`, sent one after the other, or all at once (`pipeline`).
    #[track_caller]
    pub fn http1(&self, connect: SocketAddr, requests: &[&str], pipeline: bool) -> HttpRun {
        let mut cmd = Command::new(&self.ctx.testpod);
        cmd.arg("http1").arg("--connect").arg(connect.to_string());
        for r in requests {
            cmd.arg("--request").arg(r);
        }
        if pipeline {
            cmd.arg("--pipeline");
        }
        self.http_run(cmd, &format!("http1-{connect}"), requests.len())
    }

    /// h2c (prior knowledge) on one connection to `connect`: every request a concurrent stream.
    #[track_caller]
    pub fn h2c(&self, connect: SocketAddr, requests: &[&str]) -> HttpRun {
        let mut cmd = Command::new(&self.ctx.testpod);
        cmd.arg("h2c").arg("--connect").arg(connect.to_string());
        for r in requests {
            cmd.arg("--request").arg(r);
        }
        self.http_run(cmd, &format!("h2c-{connect}"), requests.len())
    }

    /// Sends `bytes` on one connection to `connect` and reads until the server closes (at
    /// most 3 s).
    #[track_caller]
    pub fn raw(&self, connect: SocketAddr, bytes: &str) -> HttpRun {
        let mut cmd = Command::new(&self.ctx.testpod);
        cmd.arg("raw")
            .arg("--connect")
            .arg(connect.to_string())
            .arg("--send")
            .arg(bytes);
        self.http_run(cmd, &format!("raw-{connect}"), 1)
    }

    #[track_caller]
    fn http_run(&self, cmd: Command, label: &str, requests: usize) -> HttpRun {
        // 5 s per response at most, plus the connect, plus slack.
        let deadline = Duration::from_secs(5 * (requests as u64 + 1) + 5);
        let output = self.spawn(cmd, label).wait_output(deadline);
        HttpRun::from_output(format!("{}-{label}", self.name), output)
    }

    /// Starts a `mesh-testpod client` here without waiting for it.
    #[track_caller]
    pub fn spawn_client(&self, req: &ClientRequest) -> ClientProc {
        let mut cmd = Command::new(&self.ctx.testpod);
        cmd.args(req.args());
        let label = format!("{}-client", self.name);
        let proc = self.spawn(cmd, &format!("client-{}", req.connect));
        ClientProc {
            proc,
            label,
            request: req.clone(),
        }
    }

    /// Starts `mesh-testpod hold` here: one connection to `connect` that exchanges a line and
    /// is then held open (at most `max_hold`) until the peer closes it.
    #[track_caller]
    pub fn hold(&self, connect: SocketAddr, max_hold: Duration) -> testpod::HeldConnection {
        let mut cmd = Command::new(&self.ctx.testpod);
        cmd.arg("hold")
            .arg("--connect")
            .arg(connect.to_string())
            .arg("--hold-ms")
            .arg(max_hold.as_millis().to_string());
        let proc = self.spawn(cmd, &format!("hold-{connect}"));
        testpod::HeldConnection { proc, connect }
    }

    /// Runs a `mesh-testpod client` here to completion.
    #[track_caller]
    pub fn client(&self, req: &ClientRequest) -> ClientRun {
        self.spawn_client(req).wait()
    }
}

/// What nodes and pods have in common: a [`Place`] with addresses.
pub trait Host {
    fn place(&self) -> &Place;

    fn ip4(&self) -> Ipv4Addr {
        self.place().ip4
    }
    fn ip6(&self) -> Ipv6Addr {
        self.place().ip6
    }
    fn addr4(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.ip4()), port)
    }
    fn addr6(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V6(self.ip6()), port)
    }
    #[track_caller]
    fn spawn(&self, cmd: Command, label: &str) -> Proc {
        self.place().spawn(cmd, label)
    }
    #[track_caller]
    fn run(&self, cmd: Command, label: &str, timeout: Duration) -> Output {
        self.place().run(cmd, label, timeout)
    }
    #[track_caller]
    fn serve(&self, ports: &[u16]) -> Server {
        self.place().serve(ports)
    }
    #[track_caller]
    fn spawn_client(&self, req: &ClientRequest) -> ClientProc {
        self.place().spawn_client(req)
    }
    #[track_caller]
    fn client(&self, req: &ClientRequest) -> ClientRun {
        self.place().client(req)
    }
    #[track_caller]
    fn hold(&self, connect: SocketAddr, max_hold: Duration) -> testpod::HeldConnection {
        self.place().hold(connect, max_hold)
    }
    #[track_caller]
    fn serve_many(&self, port: u16) -> Server {
        self.place().serve_many(port)
    }
    #[track_caller]
    fn hold_many(
        &self,
        connect: SocketAddr,
        count: usize,
        concurrency: usize,
    ) -> testpod::HeldMany {
        self.place().hold_many(connect, count, concurrency)
    }
    #[track_caller]
    fn half_heads(&self, connect: SocketAddr, count: usize, send: &str) -> Vec<(u64, String)> {
        self.place().half_heads(connect, count, send)
    }
    #[track_caller]
    fn serve_http(&self, ports: &[u16]) -> Server {
        self.place().serve_http(ports)
    }
    #[track_caller]
    fn http1(&self, connect: SocketAddr, requests: &[&str], pipeline: bool) -> HttpRun {
        self.place().http1(connect, requests, pipeline)
    }
    #[track_caller]
    fn h2c(&self, connect: SocketAddr, requests: &[&str]) -> HttpRun {
        self.place().h2c(connect, requests)
    }
    #[track_caller]
    fn raw(&self, connect: SocketAddr, bytes: &str) -> HttpRun {
        self.place().raw(connect, bytes)
    }
}

/// A node: a network namespace on the fabric, a pod-cgroup parent, and
/// (when started) an agent. Processes spawned on the node stay outside the
/// pod cgroups (that is where the agent and "not enrolled" clients run).
#[derive(Debug)]
pub struct Node {
    index: usize,
    name: String,
    place: Place,
    pin_dir: PathBuf,
    // Teardown order is field order.
    _fabric: Veth,
    netns: Netns,
    pods_cgroup: Cgroup,
    _node_cgroup: Cgroup,
}

impl Node {
    pub fn index(&self) -> usize {
        self.index
    }
    /// `n{index+1}`.
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn netns(&self) -> &Netns {
        &self.netns
    }
    /// The pod-cgroup parent, absolute.
    pub fn pod_cgroup(&self) -> &Path {
        self.pods_cgroup.path()
    }
    /// The pod-cgroup parent relative to the cgroup2 mount (`--pod-cgroup`).
    pub fn pod_cgroup_rel(&self) -> PathBuf {
        self.pods_cgroup.relative()
    }
    /// The pod-cgroup parent's cgroup id.
    pub fn pod_cgroup_id(&self) -> u64 {
        self.pods_cgroup.id()
    }
    /// This node's agent pin directory, `/sys/fs/bpf/mesh-<id>-<node>`.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }
    pub fn outbound(&self) -> SocketAddr {
        self.addr4(OUTBOUND_PORT)
    }
    pub fn outbound6(&self) -> SocketAddr {
        self.addr6(OUTBOUND_PORT)
    }
    /// `GET <path>` on this node's `port` (from inside the node's namespace): the body.
    #[track_caller]
    pub fn http_get(&self, port: u16, path: &str) -> String {
        let addr = self.addr4(port);
        let request = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
        let response = crate::netns::in_netns(&self.netns.path(), move || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            s.write_all(request.as_bytes()).expect("write request");
            let mut out = String::new();
            s.read_to_string(&mut out).expect("read response");
            out
        });
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        assert!(
            head.starts_with("HTTP/1.1 200"),
            "GET {path} on {addr}: {head}"
        );
        body.to_owned()
    }

    /// This node's agent's Prometheus metrics: `name{labels}` → value.
    #[track_caller]
    pub fn metrics(&self) -> std::collections::BTreeMap<String, f64> {
        self.http_get(ADMIN_PORT, "/metrics")
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_owned(), v.parse().ok()?))
            })
            .collect()
    }

    /// One metric of this node's agent (`0` if absent), e.g.
    /// `mesh_tls_handshakes_total{side="server",result="ok"}`.
    #[track_caller]
    pub fn metric(&self, key: &str) -> f64 {
        self.metrics().get(key).copied().unwrap_or(0.0)
    }

    /// Programs attached directly to the pod-cgroup parent (`bpftool cgroup show`).
    pub fn attached_progs(&self) -> Vec<crate::bpftool::CgroupProg> {
        crate::bpftool::cgroup_progs(self.pod_cgroup())
    }
    /// BPF links attached to the pod-cgroup parent (`bpftool link show`).
    pub fn attached_links(&self) -> Vec<serde_json::Value> {
        crate::bpftool::cgroup_links(self.pod_cgroup_id())
    }
}

impl Host for Node {
    fn place(&self) -> &Place {
        &self.place
    }
}

/// A pod: its own network namespace (veth to its node) and cgroup.
#[derive(Debug)]
pub struct Pod {
    name: String,
    namespace: String,
    node: usize,
    node_name: String,
    registered: bool,
    permissive: bool,
    /// `httpPorts` in the registry (left out when empty).
    http_ports: Vec<u16>,
    /// Labels besides `app: <name>`.
    labels: Vec<(String, String)>,
    service_account: String,
    place: Place,
    // Teardown order is field order.
    _veth: Veth,
    netns: Netns,
    cgroup: Cgroup,
}

impl Pod {
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The pod's namespace ([`POD_NAMESPACE`] unless [`ClusterBuilder::namespace`] said otherwise).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }
    /// `<namespace>/<name>`: how the agent names the workload.
    pub fn workload(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
    /// The pod's policy principal, `cluster.local/ns/<namespace>/sa/sa-<name>` (the SPIFFE ID
    /// without `spiffe://`).
    pub fn principal(&self) -> String {
        mesh_agent::tls::spiffe::workload_principal(
            crate::authority::TRUST_DOMAIN,
            &self.namespace,
            &self.service_account,
        )
    }
    pub fn node_index(&self) -> usize {
        self.node
    }
    pub fn node_name(&self) -> &str {
        &self.node_name
    }
    /// Whether the pod is `peerAuthentication: PERMISSIVE` in the registry.
    pub fn permissive(&self) -> bool {
        self.permissive
    }
    /// The pod's service account (`sa-<name>`), the last part of its SPIFFE ID.
    pub fn service_account(&self) -> &str {
        &self.service_account
    }
    /// The pod's workload identity, `spiffe://cluster.local/ns/<namespace>/sa/sa-<name>`.
    pub fn spiffe_id(&self) -> String {
        format!("spiffe://{}", self.principal())
    }
    /// Whether the pod is listed in the registry.
    pub fn registered(&self) -> bool {
        self.registered
    }
    pub fn netns(&self) -> &Netns {
        &self.netns
    }
    /// The pod's cgroup, absolute.
    pub fn cgroup(&self) -> &Path {
        self.cgroup.path()
    }
    pub fn cgroup_rel(&self) -> PathBuf {
        self.cgroup.relative()
    }
    /// The registry entry of this pod (whether or not it is registered).
    pub fn registry_entry(&self) -> WorkloadEntry {
        WorkloadEntry {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            service_account: self.service_account.clone(),
            node: self.node_name.clone(),
            ips: vec![IpAddr::V4(self.ip4()), IpAddr::V6(self.ip6())],
            cgroup: Some(self.cgroup_rel().to_string_lossy().into_owned()),
            labels: std::iter::once(("app".into(), self.name.clone()))
                .chain(self.labels.iter().cloned())
                .collect(),
            peer_authentication: self.permissive.then(|| "PERMISSIVE".into()),
            extra_lines: if self.http_ports.is_empty() {
                Vec::new()
            } else {
                let ports: Vec<String> = self.http_ports.iter().map(u16::to_string).collect();
                vec![format!("httpPorts: [{}]", ports.join(", "))]
            },
        }
    }
}

impl Host for Pod {
    fn place(&self) -> &Place {
        &self.place
    }
}

#[derive(Clone, Debug)]
struct PodSpec {
    node: usize,
    name: String,
    namespace: String,
    registered: bool,
    permissive: bool,
    http_ports: Vec<u16>,
    labels: Vec<(String, String)>,
}

/// What `mesh-agent policy apply` did.
#[derive(Clone, Debug)]
pub struct PolicyApply {
    /// Exit code (`None`: killed).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl PolicyApply {
    /// The applied generation (`--output json`), if it succeeded.
    pub fn generation(&self) -> Option<u64> {
        let v: serde_json::Value = serde_json::from_str(&self.stdout).ok()?;
        v.get("generation")?.as_u64()
    }
}

/// Builds a [`Cluster`]. Pods are named by the caller, or `a1, a2, …` on the
/// first node, `b1, …` on the second with [`ClusterBuilder::pods_per_node`].
#[derive(Clone, Debug, Default)]
pub struct ClusterBuilder {
    nodes: usize,
    pods_per_node: usize,
    pods: Vec<PodSpec>,
    /// Pods registered with `peerAuthentication: PERMISSIVE`.
    permissive: Vec<String>,
    /// Pods registered with `httpPorts`.
    http_ports: Vec<(String, Vec<u16>)>,
    /// Pods in a namespace other than [`POD_NAMESPACE`].
    namespaces: Vec<(String, String)>,
    /// Extra labels: (pod, key, value).
    labels: Vec<(String, String, String)>,
    /// The registry's `services:`.
    services: Vec<ServiceEntry>,
    testpod: Option<PathBuf>,
}

impl ClusterBuilder {
    pub fn nodes(mut self, n: usize) -> Self {
        self.nodes = n;
        self
    }

    pub fn pods_per_node(mut self, n: usize) -> Self {
        self.pods_per_node = n;
        self
    }

    /// Registers pod `name` (added by any means) with `peerAuthentication:
    /// PERMISSIVE`; every other pod is STRICT (the default).
    pub fn permissive(mut self, name: &str) -> Self {
        self.permissive.push(name.into());
        self
    }

    /// Registers pod `name` (added by any means) with `httpPorts: ports`.
    pub fn http_ports(mut self, name: &str, ports: &[u16]) -> Self {
        self.http_ports.push((name.into(), ports.to_vec()));
        self
    }

    /// Registers pod `name` (added by any means) in namespace `namespace` instead of
    /// [`POD_NAMESPACE`]: its workload is `<namespace>/<name>`, its identity
    /// `spiffe://cluster.local/ns/<namespace>/sa/sa-<name>`.
    pub fn namespace(mut self, name: &str, namespace: &str) -> Self {
        self.namespaces.push((name.into(), namespace.into()));
        self
    }

    /// Labels pod `name` (added by any means) `key: value` in the registry, besides its
    /// `app: <name>`.
    pub fn label(mut self, name: &str, key: &str, value: &str) -> Self {
        self.labels.push((name.into(), key.into(), value.into()));
        self
    }

    /// Lists `service` in the registry's `services:`.
    pub fn service(mut self, service: ServiceEntry) -> Self {
        self.services.push(service);
        self
    }

    /// A pod on node `node` (0-based), listed in the registry.
    pub fn add_pod(mut self, node: usize, name: &str) -> Self {
        self.pods.push(PodSpec {
            node,
            name: name.into(),
            namespace: POD_NAMESPACE.into(),
            registered: true,
            permissive: false,
            http_ports: Vec::new(),
            labels: Vec::new(),
        });
        self
    }

    /// A pod on node `node` that is *not* in the registry: its cgroup is
    /// under the node's pod-cgroup parent (the programs see its sockets) but
    /// it is not enrolled, and its IPs are not mesh destinations.
    pub fn add_unregistered_pod(mut self, node: usize, name: &str) -> Self {
        self.pods.push(PodSpec {
            node,
            name: name.into(),
            namespace: POD_NAMESPACE.into(),
            registered: false,
            permissive: false,
            http_ports: Vec::new(),
            labels: Vec::new(),
        });
        self
    }

    /// The `mesh-testpod` binary (default: [`testpod::testpod_bin`]).
    pub fn testpod_bin(mut self, path: impl Into<PathBuf>) -> Self {
        self.testpod = Some(path.into());
        self
    }

    /// Creates everything; on a panic half-way, what exists is torn down.
    #[track_caller]
    pub fn build(self) -> Cluster {
        sys::require_privileges();
        assert!(
            (1..=9).contains(&self.nodes),
            "1 to 9 nodes, not {}",
            self.nodes
        );
        let mut specs = Vec::new();
        for node in 0..self.nodes {
            for k in 1..=self.pods_per_node {
                let letter = (b'a' + node as u8) as char;
                specs.push(PodSpec {
                    node,
                    name: format!("{letter}{k}"),
                    namespace: POD_NAMESPACE.into(),
                    registered: true,
                    permissive: false,
                    http_ports: Vec::new(),
                    labels: Vec::new(),
                });
            }
        }
        specs.extend(self.pods.iter().cloned());
        for name in &self.permissive {
            let spec = specs
                .iter_mut()
                .find(|s| &s.name == name)
                .unwrap_or_else(|| panic!("permissive({name}): no such pod"));
            spec.permissive = true;
        }
        for (name, ports) in &self.http_ports {
            let spec = specs
                .iter_mut()
                .find(|s| &s.name == name)
                .unwrap_or_else(|| panic!("http_ports({name}): no such pod"));
            spec.http_ports = ports.clone();
        }
        for (name, key, value) in &self.labels {
            let spec = specs
                .iter_mut()
                .find(|s| &s.name == name)
                .unwrap_or_else(|| panic!("label({name}): no such pod"));
            spec.labels.push((key.clone(), value.clone()));
        }
        for (name, namespace) in &self.namespaces {
            let spec = specs
                .iter_mut()
                .find(|s| &s.name == name)
                .unwrap_or_else(|| panic!("namespace({name}): no such pod"));
            spec.namespace = namespace.clone();
        }
        for (i, s) in specs.iter().enumerate() {
            assert!(
                s.node < self.nodes,
                "pod {} on node {} of {}",
                s.name,
                s.node,
                self.nodes
            );
            assert!(
                !s.name.is_empty()
                    && s.name.len() <= 14
                    && s.name
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    && !s.name.starts_with('-'),
                "pod name {:?}: a DNS label of at most 14 characters",
                s.name
            );
            assert!(
                !specs[..i].iter().any(|o| o.name == s.name),
                "pod name {} used twice",
                s.name
            );
        }
        let testpod = self.testpod.clone().unwrap_or_else(testpod::testpod_bin);
        assert!(
            testpod.is_file(),
            "mesh-testpod binary {} does not exist",
            testpod.display()
        );

        let id = sys::unique_id();
        let tmp = TempDir::create(&format!("mesh-{id}"));
        let ctx = Arc::new(Ctx {
            tmp: tmp.path().to_owned(),
            testpod,
            seq: AtomicUsize::new(0),
        });
        let cgroup2 = sys::cgroup2_mount();
        let bpffs = sys::bpffs_mount();
        let mut cluster = Cluster {
            authority: None,
            id: id.clone(),
            bpffs,
            ctx: ctx.clone(),
            pods: Vec::new(),
            nodes: Vec::new(),
            services: self.services.clone(),
            bridge: None,
            root_cgroup: None,
            tmp,
        };
        cluster.root_cgroup = Some(Cgroup::create(&cgroup2.join(format!("mesh-{id}"))));

        let bridge = Netns::create(&format!("{id}-br"));
        bridge.ip(&[
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "forward_delay",
            "0",
            "mcast_snooping",
            "0",
        ]);
        bridge.ip(&["link", "set", "br0", "up"]);
        cluster.bridge = Some(bridge);

        for i in 0..self.nodes {
            let node = cluster.make_node(i);
            cluster.nodes.push(node);
        }
        for i in 0..self.nodes {
            for j in 0..self.nodes {
                if i != j {
                    let ns = &cluster.nodes[i].netns;
                    ns.ip(&[
                        "route",
                        "add",
                        &format!("10.{}.0.0/24", j + 1),
                        "via",
                        &format!("10.0.0.{}", j + 1),
                    ]);
                    ns.ip(&[
                        "-6",
                        "route",
                        "add",
                        &format!("fd00:{}::/64", j + 1),
                        "via",
                        &format!("fd00::{}", j + 1),
                    ]);
                }
            }
        }
        let mut next_k = vec![2u8; self.nodes];
        for s in specs {
            let k = next_k[s.node];
            assert!(k < 255, "too many pods on node {}", s.node);
            next_k[s.node] += 1;
            let pod = cluster.make_pod(&s, k);
            cluster.pods.push(pod);
        }
        let registry = cluster.write_registry();
        let bridge = cluster.bridge.as_ref().expect("bridge exists");
        let mut authority = Authority::create(&id, bridge, cluster.tmp.path(), &registry);
        authority.start();
        // Every node joins now, before a scenario adds configuration signers at the authority
        // (`authority join` pins the authority's signers on the node): each scenario says
        // what each node pins.
        for node in &cluster.nodes {
            authority.join(&node.name);
        }
        cluster.authority = Some(std::sync::Mutex::new(authority));
        cluster
    }
}

/// A running mini-cluster; everything is torn down on drop. Agents are
/// separate guards ([`Cluster::start_agent`]) so a scenario can kill and
/// restart them; declare them after the cluster so they drop first.
#[derive(Debug)]
pub struct Cluster {
    /// Stopped first: the authority serves every agent.
    authority: Option<std::sync::Mutex<Authority>>,
    id: String,
    bpffs: PathBuf,
    ctx: Arc<Ctx>,
    // Teardown order is field order: pods, nodes, bridge, cgroup root, temp dir.
    pods: Vec<Pod>,
    nodes: Vec<Node>,
    /// The registry's `services:`.
    services: Vec<ServiceEntry>,
    bridge: Option<Netns>,
    root_cgroup: Option<Cgroup>,
    tmp: TempDir,
}

impl Cluster {
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder::default()
    }

    /// The unique prefix of everything this cluster created.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn tmp_dir(&self) -> &Path {
        self.tmp.path()
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    #[track_caller]
    pub fn node(&self, index: usize) -> &Node {
        self.nodes
            .get(index)
            .unwrap_or_else(|| panic!("no node {index}"))
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    #[track_caller]
    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// The pods of node `index`.
    pub fn pods_of(&self, index: usize) -> impl Iterator<Item = &Pod> {
        self.pods.iter().filter(move |p| p.node == index)
    }

    /// Registry entries of every registered pod, all nodes.
    pub fn registry_entries(&self) -> Vec<WorkloadEntry> {
        self.pods
            .iter()
            .filter(|p| p.registered)
            .map(Pod::registry_entry)
            .collect()
    }

    /// The registry's `nodes:`: node `i` is `n{i+1}` at `10.0.0.{i+1}` and
    /// `fd00::{i+1}` (its agent's outbound addresses).
    pub fn registry_nodes(&self) -> Vec<NodeEntry> {
        self.nodes
            .iter()
            .map(|n| NodeEntry {
                name: n.name.clone(),
                address: IpAddr::V4(n.ip4()),
                address6: Some(IpAddr::V6(n.ip6())),
            })
            .collect()
    }

    /// The registry's `services:` (from [`ClusterBuilder::service`]).
    pub fn services(&self) -> &[ServiceEntry] {
        &self.services
    }

    /// Writes `entries` (and [`Cluster::registry_nodes`], and the services) as a registry file `file_name` in the temp dir.
    #[track_caller]
    pub fn write_registry_file(
        &self,
        file_name: &str,
        entries: &[WorkloadEntry],
    ) -> (PathBuf, RenderedRegistry) {
        let rendered =
            registry::render_with_services(&self.registry_nodes(), entries, &self.services);
        let path = self.tmp.path().join(file_name);
        // Through a rename: the authority follows this file and must never read half of it.
        let tmp = self.tmp.path().join(format!(".{file_name}.tmp"));
        std::fs::write(&tmp, &rendered.text)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        (path, rendered)
    }

    /// Replaces the mesh state at its source: writes `workloads` and `services` (with
    /// [`Cluster::registry_nodes`]) as `<tmp>/registry.yaml`, which the authority follows, and
    /// waits (bounded) until the authority published the change. Returns the new version.
    #[track_caller]
    pub fn publish_state(&self, workloads: &[WorkloadEntry], services: &[ServiceEntry]) -> u64 {
        self.publish_state_with(&self.registry_nodes(), workloads, services)
    }

    /// [`Cluster::publish_state`] with the nodes given.
    #[track_caller]
    pub fn publish_state_with(
        &self,
        nodes: &[NodeEntry],
        workloads: &[WorkloadEntry],
        services: &[ServiceEntry],
    ) -> u64 {
        self.publish_state_text(&registry::render_with_services(nodes, workloads, services).text)
    }

    /// [`Cluster::publish_state`] with the registry text as given (bad entries included).
    #[track_caller]
    pub fn publish_state_text(&self, text: &str) -> u64 {
        let before = self.published_version();
        let path = self.tmp.path().join("registry.yaml");
        let tmp = self.tmp.path().join(".registry.yaml.tmp");
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        crate::poll::eventually(crate::DEFAULT_TIMEOUT, || {
            let now = self.published_version();
            (now > before).then_some(now)
        })
        .unwrap_or_else(|| {
            panic!(
                "the authority did not publish a new state version (still {before}); its log:\n{}",
                self.authority().log_tail(30)
            )
        })
    }

    /// The state version the authority last published (`<ca>/state/ids.json`; 0: none).
    pub fn published_version(&self) -> u64 {
        let path = self.authority().dir().join("state/ids.json");
        std::fs::read_to_string(path)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v.get("version")?.as_u64())
            .unwrap_or(0)
    }

    /// Waits (bounded) until the agents of `nodes` have applied state `version` or later
    /// (their `mesh_state_version`).
    #[track_caller]
    pub fn wait_state_applied(&self, nodes: &[usize], version: u64) {
        for &i in nodes {
            let node = self.node(i);
            let applied = crate::poll::eventually(crate::DEFAULT_TIMEOUT, || {
                let v = node.metric("mesh_state_version") as u64;
                (v >= version).then_some(v)
            });
            assert!(
                applied.is_some(),
                "node {} did not apply state version {version} (mesh_state_version {})",
                node.name(),
                node.metric("mesh_state_version")
            );
        }
    }

    /// Writes the cluster's registry (every registered pod) to
    /// `<tmp>/registry.yaml` and returns its path.
    #[track_caller]
    pub fn write_registry(&self) -> PathBuf {
        self.write_registry_file("registry.yaml", &self.registry_entries())
            .0
    }

    /// The bridge namespace (every frame between nodes crosses it).
    pub fn bridge_netns(&self) -> PathBuf {
        self.bridge.as_ref().expect("bridge exists").path()
    }

    /// The cluster's authority (CA): stop, start, revoke, read its log.
    pub fn authority(&self) -> std::sync::MutexGuard<'_, Authority> {
        self.authority
            .as_ref()
            .expect("the authority is created with the cluster")
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// How node `index`'s agent is started (the mesh state from the authority's stream, which
    /// follows `<tmp>/registry.yaml`; node credentials from `node csr` + `authority join
    /// --csr`); adjust it before [`Agent::start`].
    #[track_caller]
    pub fn agent_spec(&self, index: usize) -> AgentSpec {
        let node = self.node(index);
        let (identity_dir, authority) = {
            let a = self.authority();
            (a.join(&node.name), a.addr())
        };
        AgentSpec {
            identity_dir,
            authority,
            admin: node.addr4(ADMIN_PORT),
            cert_lifetime_secs: None,
            node: node.name.clone(),
            netns: node.netns.path(),
            registry: None,
            pod_cgroup: node.pod_cgroup_rel(),
            pod_cgroup_abs: node.pod_cgroup().to_owned(),
            outbound: node.outbound(),
            outbound6: Some(node.outbound6()),
            pin_dir: node.pin_dir.clone(),
            log_dir: self.tmp.path().to_owned(),
            policy_dir: None,
            extra_args: Vec::new(),
            nofile: None,
        }
    }

    /// Writes a policy directory `<tmp>/<name>/` holding `files` (`(file name, YAML)`),
    /// replacing whatever it held, and returns its path.
    #[track_caller]
    pub fn write_policy_dir(&self, name: &str, files: &[(&str, &str)]) -> PathBuf {
        let dir = self.tmp.path().join(name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .unwrap_or_else(|e| panic!("clearing {}: {e}", dir.display()));
        }
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        for (file, text) in files {
            let path = dir.join(file);
            std::fs::write(&path, text)
                .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        }
        dir
    }

    /// Starts node `index`'s agent with `--policy-dir dir` and waits until it is ready.
    #[track_caller]
    pub fn start_agent_with_policy(&self, index: usize, dir: &Path) -> Agent {
        let mut spec = self.agent_spec(index);
        spec.policy_dir = Some(dir.to_owned());
        Agent::start(spec)
    }

    /// Runs `mesh-agent policy apply DIR --state-dir <the node's> --pin-dir <node's>
    /// --trust-domain <the cluster's> --output json` and returns its output (exit status,
    /// stdout, stderr); bounded by [`crate::DEFAULT_TIMEOUT`].
    #[track_caller]
    pub fn policy_apply(&self, index: usize, dir: &Path) -> PolicyApply {
        // Compiled against the mesh state the node's agent applied (the ids its maps carry);
        // before its agent ever ran, against the build-time registry (written beside, never
        // over, the file the authority follows).
        let state_dir = self.agent_spec(index).identity_dir.join("state");
        let mut cmd = Command::new(crate::agent::agent_bin());
        cmd.arg("policy").arg("apply").arg(dir);
        if state_dir.join("mesh-state.json").is_file() {
            cmd.arg("--state-dir").arg(&state_dir);
        } else {
            let (registry, _) =
                self.write_registry_file("policy-registry.yaml", &self.registry_entries());
            cmd.arg("--registry").arg(registry);
        }
        cmd.arg("--pin-dir")
            .arg(self.node(index).pin_dir())
            .arg("--trust-domain")
            .arg(crate::authority::TRUST_DOMAIN)
            .arg("--output")
            .arg("json");
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("MESH_") {
                cmd.env_remove(k);
            }
        }
        let out = self
            .node(index)
            .run(cmd, "policy-apply", crate::DEFAULT_TIMEOUT);
        PolicyApply {
            code: out.status.code(),
            stdout: out.stdout,
            stderr: out.stderr,
        }
    }

    /// Starts node `index`'s agent and waits until it is ready.
    #[track_caller]
    pub fn start_agent(&self, index: usize) -> Agent {
        Agent::start(self.agent_spec(index))
    }

    /// Starts one agent per node, in node order.
    #[track_caller]
    pub fn start_agents(&self) -> Vec<Agent> {
        (0..self.nodes.len()).map(|i| self.start_agent(i)).collect()
    }

    #[track_caller]
    fn make_node(&self, i: usize) -> Node {
        let name = format!("n{}", i + 1);
        let ip4 = Ipv4Addr::new(10, 0, 0, i as u8 + 1);
        let ip6 = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, i as u16 + 1);
        let root = self.root_cgroup.as_ref().expect("root cgroup exists");
        let node_cgroup = Cgroup::create(&root.path().join(&name));
        let pods_cgroup = Cgroup::create(&node_cgroup.path().join("pods"));
        let netns = Netns::create(&format!("{}-{name}", self.id));
        netns.sysctl(
            &[
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
            ],
            self.tmp.path(),
        );
        let bridge = self.bridge.as_ref().expect("bridge exists");
        let port = format!("p{name}");
        let fabric = Veth::create(bridge, &port, &netns, "eth0");
        bridge.ip(&["link", "set", &port, "master", "br0"]);
        netns.ip(&["addr", "add", &format!("{ip4}/24"), "dev", "eth0"]);
        netns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{ip6}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        let place = Place {
            name: name.clone(),
            target: Target {
                netns: Some(netns.path()),
                cgroup: None,
            },
            ip4,
            ip6,
            ctx: self.ctx.clone(),
        };
        Node {
            index: i,
            pin_dir: self.bpffs.join(format!("mesh-{}-{name}", self.id)),
            name,
            place,
            _fabric: fabric,
            netns,
            pods_cgroup,
            _node_cgroup: node_cgroup,
        }
    }

    #[track_caller]
    fn make_pod(&self, spec: &PodSpec, k: u8) -> Pod {
        let node = &self.nodes[spec.node];
        let n = spec.node as u8 + 1;
        let ip4 = Ipv4Addr::new(10, n, 0, k);
        let ip6 = Ipv6Addr::new(0xfd00, u16::from(n), 0, 0, 0, 0, 0, u16::from(k));
        let gw4 = Ipv4Addr::new(10, n, 0, 1);
        let cgroup = Cgroup::create(&node.pods_cgroup.path().join(&spec.name));
        let netns = Netns::create(&format!("{}-{}", self.id, spec.name));
        let host_if = format!("v{}", spec.name);
        let veth = Veth::create(&node.netns, &host_if, &netns, "eth0");
        // Node side: the gateway addresses, and a host route to the pod.
        let nn = &node.netns;
        nn.ip(&["addr", "add", &format!("{gw4}/32"), "dev", &host_if]);
        nn.ip(&["-6", "addr", "add", "fe80::1/64", "dev", &host_if, "nodad"]);
        nn.ip(&["route", "add", &format!("{ip4}/32"), "dev", &host_if]);
        nn.ip(&["-6", "route", "add", &format!("{ip6}/128"), "dev", &host_if]);
        // Pod side.
        netns.ip(&["addr", "add", &format!("{ip4}/32"), "dev", "eth0"]);
        netns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{ip6}/128"),
            "dev",
            "eth0",
            "nodad",
        ]);
        netns.ip(&[
            "route",
            "add",
            &gw4.to_string(),
            "dev",
            "eth0",
            "scope",
            "link",
        ]);
        netns.ip(&[
            "route",
            "add",
            "default",
            "via",
            &gw4.to_string(),
            "dev",
            "eth0",
        ]);
        netns.ip(&[
            "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0",
        ]);
        let place = Place {
            name: spec.name.clone(),
            target: Target {
                netns: Some(netns.path()),
                cgroup: Some(cgroup.path().to_owned()),
            },
            ip4,
            ip6,
            ctx: self.ctx.clone(),
        };
        Pod {
            name: spec.name.clone(),
            namespace: spec.namespace.clone(),
            node: spec.node,
            node_name: node.name.clone(),
            registered: spec.registered,
            permissive: spec.permissive,
            http_ports: spec.http_ports.clone(),
            labels: spec.labels.clone(),
            service_account: format!("sa-{}", spec.name),
            place,
            _veth: veth,
            netns,
            cgroup,
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Agents are guards of their own and normally gone by now; pins an
        // agent killed with SIGKILL left behind are removed here.
        for node in &self.nodes {
            crate::agent::remove_pin_dir(&node.pin_dir);
        }
        // The fields then drop in order: pods, nodes, bridge, cgroups, temp dir.
    }
}
