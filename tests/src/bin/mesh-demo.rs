//! `mesh-demo` (run by `cargo xtask demo`): a live two-node mesh on this
//! host. Builds the mini-cluster (two nodes, two pods each), starts one agent
//! per node, runs a server in every pod, then once a second sends traffic
//! between pods (across nodes and on the same node, IPv4 and IPv6) and shows
//! what happened: who answered, which agent carried the connection, the
//! agents' flow records, and the kernel state through `bpftool`.
//!
//! Authorization policy, live: b1 also serves HTTP on port 8081 (declared in
//! the registry's `httpPorts`). From round 3 on, a sample policy set is applied
//! with `mesh-agent policy apply` to both nodes while traffic flows, and every
//! round also probes it: a2 → b1:8080 (denied in n1's kernel: connect() fails
//! with EPERM at once, and n1's agent logs `connection denied`), and two HTTP
//! requests a1 → b1:8081 (`GET /public/hello` allowed, `GET /admin/config`
//! answered 403 by n2's agent). Every 5 rounds the policy changes live (v2
//! lets a2 in and opens `/admin/*`, then v1 again, …), and the next round shows
//! the effect. The compiled policy is shown with `bpftool map dump pinned
//! …/mesh_pol_l4` once it is applied.
//!
//! Runs until SIGINT/SIGTERM (Ctrl-C) or `--duration SECS`, then tears
//! everything down. Exits non-zero if a connection failed or was not carried
//! by its source node's agent, or a probe's outcome differs from what the
//! policy in force says.

use std::{
    net::SocketAddr,
    process::{Command, ExitCode},
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use mesh_common::names;
use mesh_tests::{
    bpftool, eventually, httpload, require_privileges, Agent, ClientRequest, Cluster, FlowRecord,
    Host, Node, Pod, Proc, Server, ServiceEntry,
};
use serde_json::Value;

/// A live two-node mesh on this host, with traffic, until Ctrl-C.
#[derive(Parser, Debug)]
#[command(name = "mesh-demo")]
struct Args {
    /// Stop after this many seconds (default: run until SIGINT/SIGTERM).
    #[arg(long, value_name = "SECS")]
    duration: Option<u64>,
    /// Print the agents' flow tables every this many rounds.
    #[arg(long, default_value_t = 10)]
    table_every: u32,
    #[command(subcommand)]
    pod_cmd: Option<PodCmd>,
}

/// What runs inside the pods (this binary, spawned into a pod).
#[derive(Subcommand, Debug)]
enum PodCmd {
    /// HTTP/1.1 server: every request is answered 200 with `<name> <METHOD> <path>`.
    #[command(hide = true)]
    HttpServe {
        #[arg(long, required = true)]
        listen: Vec<SocketAddr>,
        #[arg(long)]
        name: String,
    },
    /// One HTTP request on a new connection; one JSON line.
    #[command(hide = true)]
    HttpGet {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value = "GET")]
        method: String,
        #[arg(long)]
        path: String,
    },
}

/// The port every pod serves on.
const PORT: u16 = 8080;
/// How long a round waits for the agents' flow records of its connections.
const FLOW_WAIT: Duration = Duration::from_secs(2);
/// Flow records shown per agent in a table (the most recent ones).
const TABLE_ROWS: usize = 16;

use mesh_tests::stop::{install_signal_handlers, stopping};

/// Sleeps until `deadline` unless a stop is requested first.
fn sleep_until(deadline: Instant) {
    while !stopping() {
        let now = Instant::now();
        if now >= deadline {
            return;
        }
        std::thread::sleep((deadline - now).min(Duration::from_millis(100)));
    }
}

/// One kind of connection the demo makes every round.
struct Route {
    from: &'static str,
    to: &'static str,
    ipv6: bool,
    what: &'static str,
}

const ROUTES: [Route; 5] = [
    Route {
        from: "a1",
        to: "b1",
        ipv6: false,
        what: "cross-node IPv4",
    },
    Route {
        from: "a1",
        to: "b2",
        ipv6: true,
        what: "cross-node IPv6",
    },
    Route {
        from: "b2",
        to: "a2",
        ipv6: false,
        what: "cross-node IPv4",
    },
    Route {
        from: "a2",
        to: "a1",
        ipv6: false,
        what: "same-node  IPv4",
    },
    Route {
        from: "b1",
        to: "b2",
        ipv6: true,
        what: "same-node  IPv6",
    },
];

/// b1's HTTP port (`httpPorts` in the registry): L7 policy applies there.
const HTTP_PORT: u16 = 8081;
/// The round before which the sample policy is first applied.
const POLICY_ROUND: u32 = 3;
/// The round at which pod b3 is added to the mesh state (live), and the round it is removed.
const ADD_ROUND: u32 = 2;
const REMOVE_ROUND: u32 = 6;
/// Service `default/web` (endpoints a2, b1, b2), port 80 → 8080.
const SERVICE_VIP: &str = "10.96.0.10";
/// The policy changes every this many rounds after that.
const POLICY_EVERY: u32 = 5;
/// Lines of `bpftool map dump pinned …/mesh_pol_l4` shown.
const DUMP_LINES: usize = 24;

/// One JSON line to stdout, flushed.
fn emit(v: &Value) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

fn main() -> ExitCode {
    let args = Args::parse();
    match args.pod_cmd {
        Some(PodCmd::HttpServe { listen, name }) => {
            let e = httpload::serve(&listen, &name, 0, emit);
            eprintln!("mesh-demo http-serve: {e}");
            return ExitCode::FAILURE;
        }
        Some(PodCmd::HttpGet { to, method, path }) => {
            let v = httpload::one_request(to, &method, &path, Duration::from_secs(3));
            emit(&v);
            return if v.get("status").is_some() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
        None => {}
    }
    install_signal_handlers();
    require_privileges();
    let ok = run(&args);
    println!("\n== done: everything this demo created is torn down");
    report_leftovers();
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The demo proper; every guard is dropped (teardown) when it returns or
/// panics. Returns whether every connection went as expected.
fn run(args: &Args) -> bool {
    println!("== building a two-node mesh (network namespaces, veths, a bridge, cgroups)");
    let mut builder = Cluster::builder()
        .nodes(2)
        .pods_per_node(2)
        .http_ports("b1", &[HTTP_PORT])
        // b3 runs from the start but joins the mesh only when the demo adds it (live).
        .add_unregistered_pod(1, "b3")
        .service(ServiceEntry {
            name: "web".into(),
            namespace: "default".into(),
            vips: vec![SERVICE_VIP.parse().expect("vip")],
            ports: vec![(80, PORT)],
            selector: vec![("svc".into(), "web".into())],
        });
    for endpoint in ["a2", "b1", "b2"] {
        builder = builder.label(endpoint, "svc", "web");
    }
    let cluster = builder.build();
    print_topology(&cluster);
    if stopping() {
        return true;
    }

    println!(
        "\n== starting one mesh-agent per node ({})",
        mesh_tests::agent_bin().display()
    );
    // Declared after the cluster: dropped (stopped) before it.
    let agents = cluster.start_agents();
    for (node, agent) in cluster.nodes().iter().zip(&agents) {
        println!(
            "  {}: pid {}, outbound {} / {}, pins {}",
            node.name(),
            agent.pid().unwrap_or_default(),
            node.outbound(),
            node.outbound6(),
            agent.pin_dir().display()
        );
    }
    println!(
        "  authority (CA) at {}, trust domain {}; workload certificates per node:",
        cluster.authority().addr(),
        mesh_tests::authority::TRUST_DOMAIN
    );
    print_certificates(&cluster);
    let _servers: Vec<Server> = cluster.pods().iter().map(|p| p.serve(&[PORT])).collect();
    println!("  every pod serves on port {PORT} (greets with its name, then echoes)");
    let _http = start_http_server(cluster.pod("b1"));
    println!("  b1 also serves HTTP on port {HTTP_PORT} (declared in the registry: httpPorts: [{HTTP_PORT}])");
    print_kernel_state(&cluster);
    if stopping() {
        return true;
    }

    let how_long = match args.duration {
        Some(s) => format!("for {s} s"),
        None => "until Ctrl-C".into(),
    };
    println!("\n== traffic, one round a second {how_long}");
    let started = Instant::now();
    let end = args.duration.map(|s| started + Duration::from_secs(s));
    let (mut good, mut bad) = (0u64, 0u64);
    let mut round = 0u32;
    let mut counters = counters_snapshot(&cluster);
    let mut policy = Phase::None;
    let mut b3_meshed = false;
    while !stopping() && end.is_none_or(|e| Instant::now() < e) {
        round += 1;
        if round >= POLICY_ROUND && (round - POLICY_ROUND).is_multiple_of(POLICY_EVERY) {
            let next_phase = if policy == Phase::V1 {
                Phase::V2
            } else {
                Phase::V1
            };
            if apply_phase(&cluster, &agents, next_phase, policy == Phase::None) {
                policy = next_phase;
            } else if !stopping() {
                bad += 1;
            }
            if stopping() {
                break;
            }
        }
        let next = Instant::now() + Duration::from_secs(1);
        let live = mercurial_round(&cluster, &agents, started, round, &mut b3_meshed);
        good += live.0;
        bad += live.1;
        let outcome = traffic_round(&cluster, &agents, started);
        if stopping() {
            break;
        }
        let probes = policy_probes(&cluster, &agents, started, policy);
        if stopping() {
            // Ctrl-C also reaches the pods' processes: this round says nothing.
            break;
        }
        good += outcome.0 + probes.0;
        bad += outcome.1 + probes.1;
        counters = counters_snapshot(&cluster);
        if args.table_every > 0 && round.is_multiple_of(args.table_every) {
            print_flow_tables(&cluster, &agents);
        }
        sleep_until(end.map_or(next, |e| e.min(next)));
    }

    println!(
        "\n== stopping after {round} rounds: {good} connections carried as expected, {bad} not"
    );
    print_flow_tables(&cluster, &agents);
    print_inbound_tables(&agents);
    println!("\n-- workload certificates now");
    print_certificates(&cluster);
    for line in &counters {
        println!("{line}");
    }
    println!("\n== tearing down: agents stop (the kernel keeps their programs attached: the mesh stays closed), `mesh-agent uninstall` takes the mesh off each node, then pods, nodes, bridge, cgroups");
    bad == 0
}

fn print_topology(cluster: &Cluster) {
    println!(
        "  cluster id {} (every namespace, cgroup and pin is named after it)",
        cluster.id()
    );
    for node in cluster.nodes() {
        println!(
            "  node {}  netns {:<16} {:<10} {:<8} pod cgroup {}",
            node.name(),
            node.netns().name(),
            node.ip4().to_string(),
            node.ip6().to_string(),
            node.pod_cgroup().display()
        );
        for pod in cluster.pods_of(node.index()) {
            println!(
                "    pod {:<3} netns {:<16} {:<10} {:<10} workload {} (sa-{})",
                pod.name(),
                pod.netns().name(),
                pod.ip4().to_string(),
                pod.ip6().to_string(),
                pod.workload(),
                pod.name()
            );
        }
    }
}

/// Runs `bpftool <args>` and prints its text output, indented.
fn show_bpftool(args: &[&str]) {
    println!("\n$ bpftool {}", args.join(" "));
    match Command::new("bpftool").args(args).output() {
        Ok(out) => {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                println!("  {line}");
            }
            let err = String::from_utf8_lossy(&out.stderr);
            if !out.status.success() || !err.trim().is_empty() {
                println!("  ({}) {}", out.status, err.trim());
            }
        }
        Err(e) => println!("  cannot run bpftool: {e}"),
    }
}

fn path_str(p: &std::path::Path) -> String {
    p.to_string_lossy().into_owned()
}

fn print_kernel_state(cluster: &Cluster) {
    println!("\n== kernel state (what an operator sees with bpftool)");
    for node in cluster.nodes() {
        println!(
            "\n-- node {}: programs attached to its pod cgroup",
            node.name()
        );
        show_bpftool(&["cgroup", "show", &path_str(node.pod_cgroup())]);
    }
    for node in cluster.nodes() {
        println!(
            "\n-- node {}: pinned maps under {}",
            node.name(),
            node.pin_dir().display()
        );
        for map in names::ALL_MAPS {
            show_bpftool(&[
                "map",
                "show",
                "pinned",
                &path_str(&node.pin_dir().join(map)),
            ]);
        }
    }
    for node in cluster.nodes() {
        println!(
            "\n-- node {}: the workloads map (enrolled pod cgroups)",
            node.name()
        );
        show_bpftool(&[
            "map",
            "dump",
            "pinned",
            &path_str(&node.pin_dir().join(names::MAP_WORKLOADS)),
        ]);
    }
}

/// The per-CPU counters maps of every node, summed over CPUs and named
/// (`bpftool map dump pinned …/mesh_counters` shows them per CPU). Taken
/// after every round: on Ctrl-C the agents (same process group) stop and
/// unpin at once, so the end of the demo shows the last snapshot.
fn counters_snapshot(cluster: &Cluster) -> Vec<String> {
    let mut lines = Vec::new();
    for node in cluster.nodes() {
        let pin = path_str(&node.pin_dir().join(names::MAP_COUNTERS));
        lines.push(format!(
            "\n-- node {}: kernel counters, summed over CPUs (bpftool map dump pinned {pin})",
            node.name()
        ));
        let out = Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned", &pin])
            .output();
        let Some(dump) = out
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
        else {
            lines.push("  (could not read the counters)".into());
            continue;
        };
        for entry in dump.as_array().into_iter().flatten() {
            // With -j, the BTF-typed view is under "formatted".
            let entry = entry.get("formatted").unwrap_or(entry);
            let Some(key) = entry.get("key").and_then(serde_json::Value::as_u64) else {
                continue;
            };
            let total: u64 = entry
                .get("values")
                .and_then(serde_json::Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|v| v.get("value").and_then(serde_json::Value::as_u64))
                .sum();
            let name = mesh_common::counters::NAMES
                .get(key as usize)
                .copied()
                .unwrap_or("?");
            lines.push(format!("  {name:<28} {total}"));
        }
    }
    lines
}

/// One connection per route; prints a line each. Returns (good, bad).
fn traffic_round(cluster: &Cluster, agents: &[Agent], started: Instant) -> (u64, u64) {
    let t = started.elapsed().as_secs();
    let mut results = Vec::new();
    for route in &ROUTES {
        if stopping() {
            return (0, 0);
        }
        let (src, dst) = (cluster.pod(route.from), cluster.pod(route.to));
        let to = if route.ipv6 {
            dst.addr6(PORT)
        } else {
            dst.addr4(PORT)
        };
        let mut req = ClientRequest::new(to).send(&format!("hello from {} at t={t}s", src.name()));
        req.io_timeout = Duration::from_secs(3);
        let run = src.client(&req);
        results.push((route, src, dst, to, run));
    }
    let (mut good, mut bad) = (0, 0);
    for (route, src, dst, to, run) in results {
        let agent = &agents[src.node_index()];
        let node = cluster.node(src.node_index());
        let line = describe(route, src, dst, to, &run, agent, node);
        if line.0 {
            good += 1;
        } else {
            bad += 1;
        }
        println!("[t={t:>3}s] {}", line.1);
    }
    (good, bad)
}

/// One line about one connection, and whether it went as expected: answered
/// by the pod it was addressed to, and carried by the source node's agent.
fn describe(
    route: &Route,
    src: &Pod,
    dst: &Pod,
    to: SocketAddr,
    run: &mesh_tests::ClientRun,
    agent: &Agent,
    node: &Node,
) -> (bool, String) {
    let head = format!(
        "{:<2} → {:<2} {:<22} {}",
        src.name(),
        dst.name(),
        to.to_string(),
        route.what
    );
    let Some(res) = run.results.first().filter(|_| run.success()) else {
        let why = run
            .results
            .first()
            .and_then(|r| r.error.clone())
            .unwrap_or_else(|| {
                format!("client {}: {}", run.output.status, run.output.stderr.trim())
            });
        return (false, format!("{head}  FAILED: {why}"));
    };
    let answered = res.hello_name().unwrap_or("?").to_owned();
    let flow: Option<FlowRecord> = res
        .local_addr()
        .and_then(|local| eventually(FLOW_WAIT, || agent.flow_from(local)));
    let ok = answered == dst.name() && flow.is_some();
    let via = match &flow {
        Some(f) => format!(
            "via agent {} {} (conn {}, {} B sent, {} B received, {})",
            node.name(),
            match f.raw["transport"].as_str() {
                Some("hbone") => format!(
                    "over HBONE mTLS as {}",
                    f.raw["src_identity"].as_str().unwrap_or("?")
                ),
                Some(t) => format!("({t})"),
                None => String::new(),
            },
            f.conn_id.map_or("?".into(), |c| c.to_string()),
            f.bytes_sent.unwrap_or(0),
            f.bytes_received.unwrap_or(0),
            f.outcome.as_deref().unwrap_or("?")
        ),
        None => format!("NOT seen by agent {}", node.name()),
    };
    (ok, format!("{head}  answered by {answered}, {via}"))
}

/// Each node's workload certificates and their remaining lifetime (from its metrics).
fn print_certificates(cluster: &Cluster) {
    for node in cluster.nodes() {
        for (key, secs) in node.metrics() {
            if let Some(id) = key
                .strip_prefix("mesh_cert_expiry_seconds{identity=\"")
                .and_then(|r| r.strip_suffix("\"}"))
            {
                println!(
                    "    {}: {id}, expires in {:.1} h",
                    node.name(),
                    secs / 3600.0
                );
            }
        }
    }
}

/// The inbound side of HBONE: what each destination agent verified.
fn print_inbound_tables(agents: &[Agent]) {
    for agent in agents {
        let records: Vec<_> = agent
            .log_lines()
            .into_iter()
            .filter(|l| l["message"] == "inbound")
            .collect();
        let shown = &records[records.len().saturating_sub(TABLE_ROWS)..];
        println!(
            "\n-- agent {}: {} inbound HBONE tunnels, client identity verified by mTLS (last {} shown)",
            agent.spec().node,
            records.len(),
            shown.len()
        );
        println!(
            "  {:<44} {:<24} {:<12} {:>6} {:>6}  outcome",
            "verified peer identity", "destination", "workload", "in", "out"
        );
        for r in shown {
            println!(
                "  {:<44} {:<24} {:<12} {:>6} {:>6}  {}",
                r["peer_identity"].as_str().unwrap_or("-"),
                r["dst"].as_str().unwrap_or("-"),
                r["dst_workload"].as_str().unwrap_or("-"),
                r["bytes_in"].as_u64().unwrap_or(0),
                r["bytes_out"].as_u64().unwrap_or(0),
                r["outcome"].as_str().unwrap_or("-"),
            );
        }
    }
}

fn print_flow_tables(cluster: &Cluster, agents: &[Agent]) {
    for (node, agent) in cluster.nodes().iter().zip(agents) {
        let flows = agent.flows();
        let shown = &flows[flows.len().saturating_sub(TABLE_ROWS)..];
        println!(
            "\n-- agent {}: {} flow records (last {} shown)",
            node.name(),
            flows.len(),
            shown.len()
        );
        println!(
            "  {:>6}  {:<12} {:<24} {:<24} {:<12} {:<6} {:>7} {:>7} {:>5}  outcome",
            "conn", "source", "source addr", "original dst", "dest", "via", "sent", "recv", "ms"
        );
        for f in shown {
            println!(
                "  {:>6}  {:<12} {:<24} {:<24} {:<12} {:<6} {:>7} {:>7} {:>5}  {}",
                f.conn_id.map_or("-".into(), |c| c.to_string()),
                f.src_workload.as_deref().unwrap_or("-"),
                f.src_addr.as_deref().unwrap_or("-"),
                f.orig_dst.as_deref().unwrap_or("-"),
                f.dst_workload.as_deref().unwrap_or("-"),
                f.raw["transport"].as_str().unwrap_or("-"),
                f.bytes_sent.map_or("-".into(), |b| b.to_string()),
                f.bytes_received.map_or("-".into(), |b| b.to_string()),
                f.duration_ms.map_or("-".into(), |b| b.to_string()),
                f.outcome.as_deref().unwrap_or("-")
            );
        }
    }
}

/// After teardown: any program of ours still loaded anywhere on the host
/// (another run on this host would show up here too).
fn report_leftovers() {
    let ours: Vec<String> = bpftool::progs()
        .iter()
        .filter_map(|p| {
            let name = p.get("name")?.as_str()?;
            name.starts_with("mesh_").then(|| {
                format!(
                    "{name} (id {})",
                    p.get("id").map_or(String::new(), |v| v.to_string())
                )
            })
        })
        .collect();
    if ours.is_empty() {
        println!("   bpftool prog show: no mesh_ program loaded");
    } else {
        println!(
            "   bpftool prog show: still loaded (another run on this host?): {}",
            ours.join(", ")
        );
    }
}

// ---------------------------------------------------------------------------
// Authorization policy, live

/// Which sample policy set is in force.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Phase {
    /// Nothing applied: everything allowed.
    None,
    /// a2 denied on b1:8080 (DENY); on b1's HTTP port a1 may `GET /public/*` only.
    V1,
    /// The live change: the DENY is gone (a2 is let in) and `GET /admin/*` is opened too.
    V2,
}

/// The principal of demo pod `name`.
fn principal(name: &str) -> String {
    mesh_agent::tls::spiffe::workload_principal(
        mesh_tests::authority::TRUST_DOMAIN,
        "default",
        &format!("sa-{name}"),
    )
}

/// The sample policy set of `phase`, as `(file, YAML)`.
fn policy_files(phase: Phase) -> Vec<(&'static str, String)> {
    let paths = match phase {
        Phase::V2 => r#"["/public/*", "/admin/*"]"#,
        _ => r#"["/public/*"]"#,
    };
    let allow = format!(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: b1-allow
  namespace: default
spec:
  selector:
    matchLabels: {{app: b1}}
  action: ALLOW
  rules:
  - from:
    - source: {{principals: [\"{a1}\", \"{a2}\"]}}
    to:
    - operation: {{ports: [\"{PORT}\"]}}
  - from:
    - source: {{principals: [\"{a1}\"]}}
    to:
    - operation: {{ports: [\"{HTTP_PORT}\"], methods: [\"GET\"], paths: {paths}}}
",
        a1 = principal("a1"),
        a2 = principal("a2"),
    );
    let deny = format!(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-a2
  namespace: default
spec:
  selector:
    matchLabels: {{app: b1}}
  action: DENY
  rules:
  - from:
    - source: {{principals: [\"{a2}\"]}}
    to:
    - operation: {{ports: [\"{PORT}\"]}}
",
        a2 = principal("a2"),
    );
    match phase {
        Phase::None => Vec::new(),
        Phase::V1 => vec![("b1-allow.yaml", allow), ("deny-a2.yaml", deny)],
        Phase::V2 => vec![("b1-allow.yaml", allow)],
    }
}

/// b1's HTTP server (this binary's `http-serve`), ready.
fn start_http_server(pod: &Pod) -> Proc {
    let exe = std::env::current_exe().expect("current_exe");
    let mut cmd = Command::new(exe);
    cmd.arg("http-serve")
        .arg("--listen")
        .arg(pod.addr4(HTTP_PORT).to_string())
        .arg("--name")
        .arg(pod.name());
    let mut proc = pod.spawn(cmd, "http-serve");
    let ok = eventually(Duration::from_secs(10), || {
        if !proc.is_running() {
            return Some(false);
        }
        proc.stdout_lines()
            .iter()
            .any(|l| l.contains("listening"))
            .then_some(true)
    });
    if ok != Some(true) {
        panic!(
            "the HTTP server in {} did not start\nstdout:\n{}\nstderr:\n{}",
            pod.name(),
            proc.stdout(),
            proc.stderr()
        );
    }
    proc
}

/// Applies the policy set of `phase` to every node with `mesh-agent policy apply`, waits
/// until every agent reports the new generation, and shows it. Returns whether it worked.
fn apply_phase(cluster: &Cluster, agents: &[Agent], phase: Phase, first: bool) -> bool {
    let files = policy_files(phase);
    let what = match phase {
        Phase::V1 if first => "the sample policy set (v1), with traffic flowing",
        Phase::V1 => "a live policy change back to v1: a2 denied on b1:8080 again, /admin/* closed",
        Phase::V2 => "a live policy change (v2): deny-a2 removed, GET /admin/* opened to a1",
        Phase::None => "no policy",
    };
    println!("\n== applying {what}");
    if first {
        for (file, text) in &files {
            println!("-- {file}");
            for line in text.lines() {
                println!("   {line}");
            }
        }
    }
    let refs: Vec<(&str, &str)> = files.iter().map(|(f, t)| (*f, t.as_str())).collect();
    let dir = cluster.write_policy_dir(
        match phase {
            Phase::V2 => "policy-v2",
            _ => "policy-v1",
        },
        &refs,
    );
    let mut ok = true;
    for (i, agent) in agents.iter().enumerate() {
        let node = cluster.node(i);
        let started = Instant::now();
        let applied = cluster.policy_apply(i, &dir);
        let took = started.elapsed();
        let Some(generation) = applied.generation() else {
            println!(
                "$ mesh-agent policy apply {} --pin-dir {}  FAILED ({:?}): {}",
                dir.display(),
                node.pin_dir().display(),
                applied.code,
                applied.stderr.trim()
            );
            ok = false;
            continue;
        };
        let active = eventually(Duration::from_secs(5), || {
            agent.log_lines().into_iter().find(|v| {
                v["message"] == "policy generation active"
                    && v["generation"].as_u64().is_some_and(|g| g >= generation)
            })
        });
        let out: Value = serde_json::from_str(applied.stdout.trim()).unwrap_or(Value::Null);
        println!(
            "$ mesh-agent policy apply {} --registry … --pin-dir {}\n  applied generation {generation}: {} policies, {} L4 entries ({} ms); agent {}: {}",
            dir.display(),
            node.pin_dir().display(),
            out["policies"],
            out["l4_entries"],
            took.as_millis(),
            node.name(),
            match &active {
                Some(v) => format!(
                    "`policy generation active` generation={} l4_entries={} at {}",
                    v["generation"],
                    v["l4_entries"],
                    v["timestamp"].as_str().unwrap_or("?")
                ),
                None => "did NOT report the new generation within 5 s".into(),
            }
        );
        ok &= active.is_some();
    }
    if first {
        show_compiled_policy(cluster);
    }
    ok
}

/// What an operator sees of the compiled policy on n1: the raw `bpftool map dump` of
/// `mesh_pol_l4` (first lines), then every entry of the active generation on one line, with
/// the policy names resolved through `mesh_pol_strs`.
fn show_compiled_policy(cluster: &Cluster) {
    let pin_dir = cluster.node(0).pin_dir();
    let l4 = path_str(&pin_dir.join(names::MAP_POL_L4));
    println!("\n-- node n1: the compiled policy as the kernel reads it");
    println!("$ bpftool map dump pinned {l4}   (first {DUMP_LINES} lines)");
    match Command::new("bpftool")
        .args(["map", "dump", "pinned", &l4])
        .output()
    {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout);
            let lines: Vec<&str> = text.lines().collect();
            for line in lines.iter().take(DUMP_LINES) {
                println!("  {line}");
            }
            if lines.len() > DUMP_LINES {
                println!("  … ({} more lines)", lines.len() - DUMP_LINES);
            }
        }
        Err(e) => println!("  cannot run bpftool: {e}"),
    }
    let dump = |map: &str| -> Vec<Value> {
        match bpftool::json(&["map", "dump", "pinned", &path_str(&pin_dir.join(map))]) {
            Value::Array(a) => a
                .into_iter()
                .map(|e| e.get("formatted").cloned().unwrap_or(e))
                .collect(),
            _ => Vec::new(),
        }
    };
    let strs: std::collections::BTreeMap<(u64, u64), String> = dump(names::MAP_POL_STRS)
        .iter()
        .filter_map(|e| {
            let key = (e["key"]["gen"].as_u64()?, e["key"]["str_id"].as_u64()?);
            let len = e["value"]["len"].as_u64()? as usize;
            let bytes: Vec<u8> = e["value"]["bytes"]
                .as_array()?
                .iter()
                .take(len)
                .filter_map(|b| b.as_u64().map(|b| b as u8))
                .collect();
            Some((key, String::from_utf8_lossy(&bytes).into_owned()))
        })
        .collect();
    let gen = dump(names::MAP_CONFIG)
        .first()
        .and_then(|e| e["value"]["policy_gen"].as_u64())
        .unwrap_or(0);
    let mut entries: Vec<Value> = dump(names::MAP_POL_L4)
        .into_iter()
        .filter(|e| e["key"]["gen"].as_u64() == Some(gen))
        .collect();
    entries
        .sort_by_key(|e| ["set_id", "class_id", "port"].map(|k| e["key"][k].as_u64().unwrap_or(0)));
    println!("-- decoded: generation {gen} (mesh_config.policy_gen), one line per (set, source class, port); policy names from mesh_pol_strs");
    for e in &entries {
        let (k, v) = (&e["key"], &e["value"]);
        let verdict = match v["verdict"].as_u64() {
            Some(1) => "ALLOW",
            Some(2) => "DENY",
            Some(3) => "per request (L7)",
            _ => "?",
        };
        let policy = v["policy_str"]
            .as_u64()
            .and_then(|id| strs.get(&(gen, id)))
            .map_or("-".to_owned(), Clone::clone);
        let port = match k["port"].as_u64() {
            Some(0) => "other".to_owned(),
            Some(p) => p.to_string(),
            None => "?".into(),
        };
        println!(
            "  set {} class {} port {:<5} → {:<16} flags {:<3} policy {}",
            k["set_id"], k["class_id"], port, verdict, v["flags"], policy
        );
    }
    println!("  (source classes: `bpftool map dump pinned …/mesh_pol_src`; destinations: `mesh-agent policy show --pin-dir …`)");
}

/// The policy probes of one round: a2 → b1:8080 (L4), and a1's two HTTP requests to b1.
/// Prints a line each; returns (as expected, not).
fn policy_probes(
    cluster: &Cluster,
    agents: &[Agent],
    started: Instant,
    phase: Phase,
) -> (u64, u64) {
    let t = started.elapsed().as_secs();
    let (a1, a2, b1) = (cluster.pod("a1"), cluster.pod("a2"), cluster.pod("b1"));
    let (mut good, mut bad) = (0, 0);
    let mut tally = |ok: bool, line: String| {
        if ok {
            good += 1;
        } else {
            bad += 1;
        }
        println!(
            "[t={t:>3}s] {line}{}",
            if ok { "" } else { "   <-- UNEXPECTED" }
        );
    };

    // L4: a2 → b1:8080, denied in n1's kernel under v1.
    let dst = b1.addr4(PORT);
    let denied_before = denied_lines(&agents[0], "l4", &dst.to_string()).len();
    let req = ClientRequest::new(dst)
        .send(&format!("hello from a2 at t={t}s"))
        .io_timeout(Duration::from_secs(2));
    let run = a2.client(&req);
    let expect_denied = phase == Phase::V1;
    let head = format!("a2 → b1 {:<22} policy probe L4  ", dst.to_string());
    match run.results.first() {
        Some(r)
            if r.error
                .as_deref()
                .is_some_and(|e| e.contains("Operation not permitted")) =>
        {
            let line = eventually(Duration::from_secs(2), || {
                denied_lines(&agents[0], "l4", &dst.to_string())
                    .get(denied_before)
                    .cloned()
            });
            let log = match &line {
                Some(v) => format!(
                    "agent n1: connection denied layer={} side={} src={} dst_workload={} port={} policy={} generation={}",
                    v["layer"], v["side"], v["src_workload"], v["dst_workload"], v["port"], v["policy"], v["generation"]
                ),
                None => "agent n1 logged NO `connection denied`".into(),
            };
            tally(
                expect_denied && line.is_some(),
                format!(
                    "{head}DENIED in the kernel: connect() → EPERM after {} µs; {log}",
                    r.connect_us.unwrap_or(0)
                ),
            );
        }
        Some(r) if run.success() => tally(
            !expect_denied,
            format!(
                "{head}allowed: answered by {} (connect() {} µs)",
                r.hello_name().unwrap_or("?"),
                r.connect_us.unwrap_or(0)
            ),
        ),
        other => tally(
            false,
            format!(
                "{head}FAILED: {}",
                other.and_then(|r| r.error.clone()).unwrap_or_else(|| run
                    .output
                    .stderr
                    .trim()
                    .to_owned())
            ),
        ),
    }

    // L7: a1's HTTP requests to b1:8081, decided per request by n2's agent.
    let to = b1.addr4(HTTP_PORT);
    for (path, allowed) in [
        ("/public/hello", true),
        ("/admin/config", phase != Phase::V1),
    ] {
        let before = denied_lines(&agents[1], "l7", &to.to_string()).len();
        let v = http_get(a1, to, path);
        let head = format!("a1 → b1 {:<22} HTTP GET {path:<14}", to.to_string());
        match v["status"].as_u64() {
            Some(200) => tally(
                allowed,
                format!("{head}200 OK: {:?}", v["body"].as_str().unwrap_or("")),
            ),
            Some(403) => {
                let line = eventually(Duration::from_secs(2), || {
                    denied_lines(&agents[1], "l7", &to.to_string())
                        .get(before)
                        .cloned()
                });
                let log = match &line {
                    Some(l) => format!(
                        "agent n2: connection denied layer={} side={} method={} path={} policy={}",
                        l["layer"],
                        l["side"],
                        l["method"],
                        l["path"],
                        match l["policy"].as_str() {
                            Some("-") | None => "- (no ALLOW rule matched)".to_owned(),
                            Some(p) => p.to_owned(),
                        }
                    ),
                    None => "agent n2 logged NO `connection denied`".into(),
                };
                tally(
                    !allowed && line.is_some(),
                    format!(
                        "{head}403 {:?} from agent n2; {log}",
                        v["body"].as_str().unwrap_or("")
                    ),
                );
            }
            _ => tally(false, format!("{head}FAILED: {v}")),
        }
    }
    (good, bad)
}

/// `connection denied` lines of `layer` for destination `dst` (`ip:port`), in log order.
fn denied_lines(agent: &Agent, layer: &str, dst: &str) -> Vec<Value> {
    agent
        .log_lines()
        .into_iter()
        .filter(|v| {
            v["message"] == "connection denied"
                && v["layer"] == layer
                && (v["dst"] == dst || v["dst"].is_null())
        })
        .collect()
}

/// One HTTP request from `pod` (this binary's `http-get`); its JSON result.
fn http_get(pod: &Pod, to: SocketAddr, path: &str) -> Value {
    let exe = std::env::current_exe().expect("current_exe");
    let mut cmd = Command::new(exe);
    cmd.arg("http-get")
        .arg("--to")
        .arg(to.to_string())
        .arg("--path")
        .arg(path);
    let out = pod.run(cmd, "http-get", Duration::from_secs(10));
    out.stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
        .unwrap_or_else(|| serde_json::json!({"error": out.stderr.trim()}))
}

/// The live part of a round: at [`ADD_ROUND`] pod b3 joins the mesh state at the authority, at
/// [`REMOVE_ROUND`] it leaves (no agent restarts); every round a1 calls b3 (carried over HBONE
/// while b3 is in the mesh, not captured once it left) and the service `default/web` four times
/// (the source agent picks an endpoint each time). Returns (as expected, not).
fn mercurial_round(
    cluster: &Cluster,
    agents: &[Agent],
    started: Instant,
    round: u32,
    b3_meshed: &mut bool,
) -> (u64, u64) {
    let t = started.elapsed().as_secs();
    let b3 = cluster.pod("b3");
    if round == ADD_ROUND || round == REMOVE_ROUND {
        let mut entries = cluster.registry_entries();
        let adding = round == ADD_ROUND;
        if adding {
            entries.push(b3.registry_entry());
        }
        let version = cluster.publish_state(&entries, cluster.services());
        cluster.wait_state_applied(&[0, 1], version);
        *b3_meshed = adding;
        println!(
            "[t={t:>3}s] == mesh state v{version}: pod b3 {} the registry at the authority; both agents applied it live (pids {:?})",
            if adding { "added to" } else { "removed from" },
            agents.iter().map(|a| a.pid().unwrap_or_default()).collect::<Vec<_>>()
        );
    }
    let (mut good, mut bad) = (0, 0);
    if round >= ADD_ROUND {
        let a1 = cluster.pod("a1");
        let mut req = ClientRequest::new(b3.addr4(PORT)).send("hello b3");
        req.io_timeout = Duration::from_secs(3);
        let run = a1.client(&req);
        let flow = run
            .results
            .first()
            .and_then(|r| r.local_addr())
            .and_then(|local| eventually(FLOW_WAIT, || agents[0].flow_from(local)));
        let answered = run.results.first().is_some_and(|r| r.echo_ok);
        let carried = flow.as_ref().is_some_and(|f| f.raw["transport"] == "hbone");
        let ok = answered && (carried == *b3_meshed);
        println!(
            "[t={t:>3}s] a1 → b3 {:<22} {}",
            b3.addr4(PORT).to_string(),
            match (answered, carried) {
                (true, true) => "answered, carried over HBONE mTLS (b3 is in the mesh)".to_owned(),
                (true, false) =>
                    "answered directly, not captured (b3 is not in the mesh)".to_owned(),
                (false, _) => "FAILED".to_owned(),
            }
        );
        if ok {
            good += 1;
        } else {
            bad += 1;
        }
    }
    let a1 = cluster.pod("a1");
    let vip = SocketAddr::new(SERVICE_VIP.parse().expect("vip"), 80);
    let mut req = ClientRequest::new(vip).send("hello web").count(4);
    req.io_timeout = Duration::from_secs(3);
    let run = a1.client(&req);
    let answered: Vec<&str> = run.results.iter().filter_map(|r| r.hello_name()).collect();
    let ok = run.results.iter().all(|r| r.echo_ok) && answered.len() == 4;
    println!(
        "[t={t:>3}s] a1 → service default/web {vip}: 4 connections answered by {:?}{}",
        answered,
        if ok { "" } else { "  FAILED" }
    );
    if ok {
        good += 1;
    } else {
        bad += 1;
    }
    (good, bad)
}
