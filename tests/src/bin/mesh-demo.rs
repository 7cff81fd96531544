//! `mesh-demo` (run by `cargo xtask demo`): a live two-node mesh on this
//! host. Builds the mini-cluster (two nodes, two pods each), starts one agent
//! per node, runs a server in every pod, then once a second sends traffic
//! between pods (across nodes and on the same node, IPv4 and IPv6) and shows
//! what happened: who answered, which agent carried the connection, the
//! agents' flow records, and the kernel state through `bpftool`.
//!
//! Runs until SIGINT/SIGTERM (Ctrl-C) or `--duration SECS`, then tears
//! everything down. Exits non-zero if a connection failed or was not carried
//! by its source node's agent.

use std::{
    net::SocketAddr,
    process::{Command, ExitCode},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use clap::Parser;
use mesh_common::names;
use mesh_tests::{
    bpftool, eventually, require_privileges, Agent, ClientRequest, Cluster, FlowRecord, Host, Node,
    Pod, Server,
};

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
}

/// The port every pod serves on.
const PORT: u16 = 8080;
/// How long a round waits for the agents' flow records of its connections.
const FLOW_WAIT: Duration = Duration::from_secs(2);
/// Flow records shown per agent in a table (the most recent ones).
const TABLE_ROWS: usize = 16;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_sig: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe {
            libc::signal(
                sig,
                on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            )
        };
    }
}

fn stopping() -> bool {
    STOP.load(Ordering::SeqCst)
}

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

fn main() -> ExitCode {
    let args = Args::parse();
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
    let cluster = Cluster::builder().nodes(2).pods_per_node(2).build();
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
    while !stopping() && end.is_none_or(|e| Instant::now() < e) {
        round += 1;
        let next = Instant::now() + Duration::from_secs(1);
        let outcome = traffic_round(&cluster, &agents, started);
        if stopping() {
            // Ctrl-C also reaches the pods' processes: this round says nothing.
            break;
        }
        good += outcome.0;
        bad += outcome.1;
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
    println!("\n== tearing down (agents detach and unpin, then pods, nodes, bridge, cgroups)");
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
                println!("    {}: {id}, expires in {:.1} h", node.name(), secs / 3600.0);
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
