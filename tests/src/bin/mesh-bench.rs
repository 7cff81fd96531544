//! `mesh-bench` (run by `cargo xtask bench`): pod→pod across nodes, direct
//! vs through the mesh, in one run.
//!
//! Topology: the mini-cluster of the demo, two nodes with two pods each. On
//! node n1, `client` is enrolled (in the registry: its connects are captured
//! and carried by n1's agent) and `direct` is not (not in the registry: its
//! connects go straight to the destination); on node n2, `server` runs the
//! servers and `peer` idles. The two configurations are measured from the
//! same node to the same server, alternated metric by metric and repetition
//! by repetition (the order flips every repetition), and the median of the
//! repetitions is reported with the ratio mesh/direct:
//!
//! - throughput: one TCP stream, `iperf3 -c … -t 10` (3 s with `--quick`);
//! - latency: 1 KiB request/response round trips on one connection, p50,
//!   p90, p99 (this binary's `rr` client against its `serve` echo port);
//! - connection rate: connect, 1-byte exchange, close, per second, with 1 and
//!   8 concurrent clients (this binary's `cps` client against its one-shot
//!   port, which closes first so no client port lingers in TIME_WAIT).
//!
//! Each mesh measurement is checked to have produced flow records on n1's
//! agent, and each direct one to have produced none. Every measurement is
//! bounded in time; all traffic stays inside the namespaces this run creates.
//! The hidden subcommands `serve`, `rr` and `cps` are what runs inside pods.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Barrier, Mutex,
    },
    time::{Duration, Instant, SystemTime},
};

use clap::{Parser, Subcommand};
use mesh_tests::{
    eventually, httpload, require_privileges, Agent, Cluster, Host, NodeEntry, Pod, Proc,
    ServiceEntry, WorkloadEntry,
};
use serde_json::{json, Value};

/// Direct vs through-the-mesh pod→pod benchmark; prints a table, writes JSON.
#[derive(Parser, Debug)]
#[command(name = "mesh-bench")]
struct Args {
    /// Where the JSON results go.
    #[arg(long, default_value = "target/bench/bench.json")]
    out: PathBuf,
    /// Repetitions of every measurement in each configuration (at least 3).
    #[arg(long, default_value_t = 3)]
    reps: u32,
    /// Short measurements: 3 s throughput, 2 s latency and connection rate.
    #[arg(long)]
    quick: bool,
    /// Only the held-connections figures: agent RSS with 10,000 idle held connections and
    /// after they close (JSON beside `--out`, `*.held.json`).
    #[arg(long)]
    held_only: bool,
    /// Only the audit log's writer and query figures, no cluster (JSON beside `--out`,
    /// `*.audit.json`).
    #[arg(long)]
    audit_only: bool,
    /// Leave out the audit log's figures (e.g. to run this benchmark against an agent built
    /// before the audit log, which knows no `--audit-off`, beside the current one).
    #[arg(long)]
    skip_audit: bool,
    /// Leave out the mesh state figures (propagation, 10,000 workloads; e.g. against an agent
    /// built before the state stream).
    #[arg(long)]
    skip_state: bool,
    /// Only the signed-configuration figures: verify + apply of a bundle of 10,000 policies and
    /// 10,000 workloads on its own two-node cluster (JSON beside `--out`, `*.signed.json`).
    #[arg(long)]
    signed_only: bool,
    /// Leave out the signed-configuration figures.
    #[arg(long)]
    skip_signed: bool,
    #[command(subcommand)]
    pod_cmd: Option<PodCmd>,
}

/// What runs inside the pods.
#[derive(Subcommand, Debug)]
enum PodCmd {
    /// Echo server on `--echo` and one-shot server on `--oneshot`.
    #[command(hide = true)]
    Serve {
        #[arg(long)]
        echo: SocketAddr,
        #[arg(long)]
        oneshot: SocketAddr,
    },
    /// Request/response round trips on one connection; prints one JSON line.
    #[command(hide = true)]
    Rr {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1024)]
        size: usize,
        #[arg(long)]
        secs: f64,
    },
    /// New connections per second with `--clients` clients; one JSON line.
    #[command(hide = true)]
    Cps {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        clients: usize,
        #[arg(long)]
        secs: f64,
    },
    /// HTTP/1.1 server (keep-alive; `200` with a body of `--resp-size` bytes) on every `--listen`.
    #[command(hide = true)]
    HttpServe {
        #[arg(long, required = true)]
        listen: Vec<SocketAddr>,
        #[arg(long, default_value = "server")]
        name: String,
        #[arg(long, default_value_t = 1024)]
        resp_size: usize,
    },
    /// HTTP requests at a fixed rate on keep-alive connections; one JSON line.
    #[command(hide = true)]
    HttpLoad {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        rate: f64,
        #[arg(long)]
        secs: f64,
        #[arg(long, default_value_t = 8)]
        conns: usize,
        #[arg(long, default_value_t = 1024)]
        size: usize,
        #[arg(long, default_value = "POST")]
        method: String,
        #[arg(long, default_value = "/bench/echo")]
        path: String,
    },
    /// Connections at a fixed offered rate (`--rate` per second over `--clients` threads) for
    /// `--secs`; counts those that failed. One JSON line.
    #[command(hide = true)]
    Paced {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        rate: f64,
        #[arg(long)]
        secs: f64,
        #[arg(long, default_value_t = 4)]
        clients: usize,
    },
    /// `--count` connections one after the other (connect, 1-byte exchange, close), the
    /// `connect()` call timed; one JSON line.
    #[command(hide = true)]
    Connect {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        count: usize,
    },
}

const ECHO_PORT: u16 = 7001;
const ONESHOT_PORT: u16 = 7002;
const IPERF_PORT: u16 = 5201;
/// Connect and I/O timeout of the pod clients.
const IO_TIMEOUT: Duration = Duration::from_secs(3);
/// Round trips in the first part of an `rr` run are warm-up, not counted.
const RR_WARMUP: Duration = Duration::from_millis(200);
/// HTTP port of the server under an L7 policy (methods and paths) for the client.
const HTTP_L7_PORT: u16 = 8080;
/// A port of the server that is not declared HTTP, where the client is allowed at L4: through
/// the mesh the agents splice its bytes (the "mesh without L7" baseline). Every connection to a
/// declared HTTP port is parsed request by request, policy or not, so this one stays undeclared.
const HTTP_L4_PORT: u16 = 8081;
/// Offered HTTP request rate, requests per second.
const HTTP_RATE: f64 = 1000.0;
/// Keep-alive connections of the HTTP load.
const HTTP_CONNS: usize = 8;
/// HTTP request (and response) body size.
const HTTP_BODY: usize = 1024;
/// The first part of an HTTP load run is warm-up, not counted.
const HTTP_WARMUP: Duration = Duration::from_millis(500);
/// The two policy counts of the scale measurement.
const SCALE_COUNTS: [usize; 2] = [10, 10_000];
/// Filler policies name ports `FILLER_PORT_BASE + i % FILLER_PORTS`.
const FILLER_PORT_BASE: u16 = 20_000;
const FILLER_PORTS: usize = 500;
/// Connections of one connect-latency run not counted (first ones after a policy swap).
const CONNECT_WARMUP: usize = 20;

fn main() -> ExitCode {
    let args = Args::parse();
    match args.pod_cmd {
        Some(PodCmd::Serve { echo, oneshot }) => serve(echo, oneshot),
        Some(PodCmd::Rr { to, size, secs }) => rr_client(to, size, Duration::from_secs_f64(secs)),
        Some(PodCmd::Cps { to, clients, secs }) => {
            cps_client(to, clients.max(1), Duration::from_secs_f64(secs))
        }
        Some(PodCmd::HttpServe {
            listen,
            name,
            resp_size,
        }) => {
            let e = httpload::serve(&listen, &name, resp_size, emit);
            eprintln!("mesh-bench http-serve: {e}");
            ExitCode::FAILURE
        }
        Some(PodCmd::HttpLoad {
            to,
            rate,
            secs,
            conns,
            size,
            method,
            path,
        }) => {
            let v = httpload::load(&httpload::LoadSpec {
                to,
                rate,
                secs: Duration::from_secs_f64(secs),
                warmup: HTTP_WARMUP,
                conns,
                size,
                method,
                target: path,
                timeout: IO_TIMEOUT,
            });
            let ok = v.get("ok").and_then(Value::as_u64).unwrap_or(0) > 0;
            emit(&v);
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Some(PodCmd::Connect { to, count }) => connect_client(to, count),
        Some(PodCmd::Paced {
            to,
            rate,
            secs,
            clients,
        }) => paced_client(to, rate, Duration::from_secs_f64(secs), clients),
        None => {
            if args.reps < 3 {
                eprintln!("mesh-bench: --reps must be at least 3");
                return ExitCode::from(2);
            }
            install_signal_handlers();
            require_privileges();
            if args.held_only {
                return held_bench(&args.out);
            }
            if args.audit_only {
                return audit_only_bench(&args);
            }
            if args.signed_only {
                return signed_bench(&args.out);
            }
            let code = orchestrate(&args);
            if stopping() {
                return code;
            }
            // Its own cluster: the agents start fresh under a soft open-files limit of 1024.
            let code = match held_bench(&args.out) {
                c if c == ExitCode::SUCCESS => code,
                c => c,
            };
            if stopping() || args.skip_signed {
                return code;
            }
            // Its own cluster too: the nodes require signed configuration.
            match signed_bench(&args.out) {
                c if c == ExitCode::SUCCESS => code,
                c => c,
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Orchestration (the test process; never joins a pod itself)

use mesh_tests::stop::{install_signal_handlers, stopping};

#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Config {
    Direct,
    Mesh,
}

impl Config {
    fn name(self) -> &'static str {
        match self {
            Config::Direct => "direct",
            Config::Mesh => "mesh",
        }
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Test {
    Throughput,
    Rr,
    Cps1,
    Cps8,
}

const TESTS: [Test; 4] = [Test::Throughput, Test::Rr, Test::Cps1, Test::Cps8];

/// A reported figure: key, label, unit, whether higher is better.
struct Metric {
    key: &'static str,
    label: &'static str,
    higher_is_better: bool,
}

const METRICS: [Metric; 6] = [
    Metric {
        key: "throughput_gbit_s",
        label: "throughput, 1 stream (Gbit/s)",
        higher_is_better: true,
    },
    Metric {
        key: "rr_p50_us",
        label: "1 KiB round trip p50 (µs)",
        higher_is_better: false,
    },
    Metric {
        key: "rr_p90_us",
        label: "1 KiB round trip p90 (µs)",
        higher_is_better: false,
    },
    Metric {
        key: "rr_p99_us",
        label: "1 KiB round trip p99 (µs)",
        higher_is_better: false,
    },
    Metric {
        key: "conn_per_s_1",
        label: "connections/s, 1 client",
        higher_is_better: true,
    },
    Metric {
        key: "conn_per_s_8",
        label: "connections/s, 8 clients",
        higher_is_better: true,
    },
];

#[derive(Clone, Copy)]
struct Durations {
    throughput: u64,
    rr: f64,
    cps: f64,
    /// Measured seconds of one HTTP load run.
    http: f64,
    /// Connections of one connect-latency run.
    connects: usize,
}

/// Everything a measurement needs.
struct Bench<'a> {
    exe: PathBuf,
    cluster: &'a Cluster,
    agent_n1: &'a Agent,
    /// Both nodes' agents: through the mesh, both do work (HBONE client and server).
    agents: &'a [Agent],
    server: &'a Pod,
    durations: Durations,
    cost: std::cell::RefCell<Cost>,
    /// The registry the policy commands compile against.
    registry: PathBuf,
}

/// Agent CPU time spent on mesh runs, and what it carried.
#[derive(Default, Debug)]
struct Cost {
    throughput_cpu_secs: f64,
    throughput_gb: f64,
    cps_cpu_secs: f64,
    cps_connections: f64,
}

/// User + system CPU seconds a process has used (`/proc/<pid>/stat`).
fn cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<f64>().ok())
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks / hz
}

/// Peak resident set size in MiB (`VmHWM`).
fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// One measurement's result.
struct Run {
    rep: u32,
    config: Config,
    test: Test,
    values: BTreeMap<&'static str, f64>,
    /// Flow records n1's agent logged during the measurement.
    agent_flows: usize,
    detail: Value,
}

fn orchestrate(args: &Args) -> ExitCode {
    let exe = std::env::current_exe().expect("current_exe");
    let durations = if args.quick {
        Durations {
            throughput: 3,
            rr: 2.0,
            cps: 2.0,
            http: 2.0,
            connects: 200,
        }
    } else {
        Durations {
            throughput: 10,
            rr: 5.0,
            cps: 5.0,
            http: 5.0,
            connects: 1000,
        }
    };

    println!("== mesh-bench: building the cluster (2 nodes; n1: client [enrolled], direct [not enrolled]; n2: server, peer)");
    let cluster = Cluster::builder()
        .nodes(2)
        .add_pod(0, "client")
        .add_unregistered_pod(0, "direct")
        .add_pod(1, "server")
        .add_pod(1, "peer")
        .http_ports("server", &[HTTP_L7_PORT])
        // The direct baseline is plaintext from outside the mesh: a STRICT
        // server would refuse it in the kernel.
        .permissive("server")
        .build();
    let agents = cluster.start_agents();
    let server = cluster.pod("server");
    let _servers = start_servers(&exe, server);
    println!(
        "   agents ready ({}); servers on {} (echo {ECHO_PORT}, one-shot {ONESHOT_PORT}, iperf3 {IPERF_PORT})",
        mesh_tests::agent_bin().display(),
        server.ip4()
    );
    let bench = Bench {
        exe,
        cluster: &cluster,
        agent_n1: &agents[0],
        agents: &agents,
        server,
        durations,
        cost: std::cell::RefCell::new(Cost::default()),
        registry: cluster
            .write_registry_file("policy-registry.yaml", &cluster.registry_entries())
            .0,
    };

    let mut runs: Vec<Run> = Vec::new();
    // Problems fail the run (a measurement that does not measure what it
    // says); warnings are reported beside the figures.
    let mut problems: Vec<String> = Vec::new();
    let mut warnings: Vec<String> = Vec::new();
    'reps: for rep in 1..=args.reps {
        let order = if rep % 2 == 1 {
            [Config::Direct, Config::Mesh]
        } else {
            [Config::Mesh, Config::Direct]
        };
        for test in TESTS {
            for config in order {
                if stopping() {
                    break 'reps;
                }
                let run = bench.measure(rep, config, test);
                let figures: Vec<String> = run
                    .values
                    .iter()
                    .map(|(k, v)| format!("{k}={v:.2}"))
                    .collect();
                println!(
                    "   rep {rep}/{} {:<6} {:<10} {}  (agent flows: {})",
                    args.reps,
                    config.name(),
                    format!("{test:?}"),
                    figures.join(" "),
                    run.agent_flows
                );
                if let Some(e) = run
                    .detail
                    .get("errors")
                    .and_then(Value::as_u64)
                    .filter(|&e| e > 0)
                {
                    let first = run
                        .detail
                        .get("first_error")
                        .and_then(Value::as_str)
                        .unwrap_or("?");
                    warnings.push(format!(
                        "rep {rep} {} {test:?}: {e} failed connections (first: {first})",
                        config.name()
                    ));
                }
                match (config, run.agent_flows) {
                    (Config::Mesh, 0) => problems.push(format!(
                        "rep {rep} {test:?}: mesh run left no flow record on n1's agent"
                    )),
                    (Config::Direct, n) if n > 0 => problems.push(format!(
                        "rep {rep} {test:?}: direct run produced {n} flow records"
                    )),
                    _ => {}
                }
                runs.push(run);
            }
        }
    }
    let mut http_runs: Vec<HttpRun> = Vec::new();
    if !stopping() {
        http_phase(&bench, args, &mut http_runs, &mut problems, &mut warnings);
    }
    let mut scale_runs: Vec<ScaleRun> = Vec::new();
    if !stopping() {
        scale_phase(&bench, args, &mut scale_runs, &mut problems, &mut warnings);
    }
    let rss: Vec<f64> = agents
        .iter()
        .filter_map(Agent::pid)
        .map(peak_rss_mib)
        .collect();
    let state = if stopping() || args.skip_state {
        json!(null)
    } else {
        state_phase(&bench, args, &mut problems)
    };
    let exe = bench.exe.clone();
    let cost = bench.cost.take();
    let Bench { durations, .. } = bench;
    let mut agents = agents;
    let lifecycle = if stopping() {
        json!(null)
    } else {
        lifecycle_phase(&exe, &cluster, &mut agents, args, &mut problems)
    };
    let audit_overhead = if stopping() || args.skip_audit {
        json!(null)
    } else {
        audit_overhead_phase(&exe, &cluster, &mut agents, durations, args, &mut problems)
    };
    let audit = if stopping() || args.skip_audit {
        json!(null)
    } else {
        audit_log_phase(&audit_work_dir(&args.out), args.quick, &mut problems)
    };
    if stopping() {
        println!("== interrupted: tearing down without a summary");
        return ExitCode::from(130);
    }

    let summary = summarize(&runs);
    print_table(&summary, args, &durations);
    let http_summary = summarize_http(&http_runs);
    print_http_table(&http_summary, args, &durations);
    let scale_summary = summarize_scale(&scale_runs);
    print_scale_table(&scale_summary, args, &durations);
    print_state(&state);
    print_lifecycle(&lifecycle);
    print_audit_overhead(&audit_overhead);
    print_audit(&audit);
    let per_gb = cost.throughput_cpu_secs / cost.throughput_gb.max(f64::MIN_POSITIVE);
    let per_kconn = cost.cps_cpu_secs / (cost.cps_connections / 1000.0).max(f64::MIN_POSITIVE);
    println!("agent cost through the mesh (both agents, summed over all mesh runs):");
    println!(
        "  CPU seconds per GB carried        {per_gb:>8.2}   ({:.1} s for {:.1} GB)",
        cost.throughput_cpu_secs, cost.throughput_gb
    );
    println!(
        "  CPU seconds per 1000 connections  {per_kconn:>8.3}   ({:.1} s for {:.0} connections)",
        cost.cps_cpu_secs, cost.cps_connections
    );
    println!(
        "  peak RSS (MiB)                    {}",
        rss.iter()
            .map(|r| format!("{r:.1}"))
            .collect::<Vec<_>>()
            .join(" / ")
    );
    println!();
    for w in &warnings {
        println!("warning: {w}");
    }
    for p in &problems {
        println!("PROBLEM: {p}");
    }
    let doc = json!({
        "benchmark": "pod-to-pod across nodes, direct vs through the mesh (HBONE: HTTP/2 CONNECT over mTLS 1.3 between the node agents)",
        "settings": {
            "repetitions": args.reps,
            "quick": args.quick,
            "throughput_secs": durations.throughput,
            "rr_secs": durations.rr,
            "rr_size_bytes": 1024,
            "cps_secs": durations.cps,
            "http_secs": durations.http,
            "http_warmup_secs": HTTP_WARMUP.as_secs_f64(),
            "http_offered_rps": HTTP_RATE,
            "http_connections": HTTP_CONNS,
            "http_body_bytes": HTTP_BODY,
            "connect_count": durations.connects,
            "connect_warmup": CONNECT_WARMUP,
            "scale_policy_counts": SCALE_COUNTS,
            "order": "alternated per measurement; the order flips every repetition",
            "agent_bin": mesh_tests::agent_bin().display().to_string(),
        },
        "host": host_info(),
        "topology": {
            "cluster": cluster.id(),
            "client_mesh": pod_json(cluster.pod("client")),
            "client_direct": pod_json(cluster.pod("direct")),
            "server": pod_json(server),
        },
        "summary": summary,
        "http": {
            "what": "HTTP/1.1 POST, 1 KiB body each way, at a fixed offered rate on keep-alive connections, client pod on n1 to server pod on n2: direct (not enrolled), mesh on a port not declared HTTP where the client is allowed at L4 (spliced), mesh on a declared HTTP port under an L7 policy (methods and paths; every request parsed and authorised by n2's agent)",
            "summary": http_summary,
            "runs": http_runs.iter().map(|r| json!({
                "rep": r.rep,
                "config": r.config.name(),
                "values": r.values,
                "agent_flows": r.agent_flows,
                "l7_requests": r.l7_requests,
                "detail": r.detail,
            })).collect::<Vec<_>>(),
        },
        "scale": {
            "what": "N ALLOW policies all selecting the server (one allows the client on the probed port; the others each allow one other principal on one of 500 other ports), applied to both nodes with `mesh-agent policy apply`; connect() of the client timed (the kernel of n1 decides: src class, dst set, (set, class, port) hash lookups)",
            "summary": scale_summary,
            "runs": scale_runs.iter().map(ScaleRun::to_json).collect::<Vec<_>>(),
        },
        "state": state,
        "lifecycle": lifecycle,
        "audit": {
            "what": "audit_records_per_sec: the real AuditLog (queue, writer thread, segments, signed checkpoints, indexer thread) fed from one thread pinned to one core, the writer thread on the same core, the indexer thread on the same core (record_await, emit), on the other cores (record_await_indexer_other_cores) or off (record_await_no_indexer); audit_query_10m: `mesh-agent audit query` (src + dst + verdict) over a log written by the real writer with its indexer on the other cores, `first` = the first query ever run on it (it indexes only what the indexer had not); audit_overhead: the HTTP 1 KiB POST benchmark under the L7 policy with agents run with the audit log and with --audit-off",
            "audit_records_per_sec": audit["audit_records_per_sec"],
            "audit_query_10m": audit["audit_query_10m"],
            "audit_overhead": audit_overhead,
        },
        "cost": {
            "agent_cpu_secs_per_gb": finite(per_gb),
            "agent_cpu_secs_per_1000_connections": finite(per_kconn),
            "throughput_cpu_secs": finite(cost.throughput_cpu_secs),
            "throughput_gb": finite(cost.throughput_gb),
            "cps_cpu_secs": finite(cost.cps_cpu_secs),
            "cps_connections": finite(cost.cps_connections),
            "agent_peak_rss_mib": rss.iter().map(|r| finite(*r)).collect::<Vec<_>>(),
        },
        "runs": runs.iter().map(|r| json!({
            "rep": r.rep,
            "config": r.config.name(),
            "test": format!("{:?}", r.test),
            "values": r.values,
            "agent_flows": r.agent_flows,
            "detail": r.detail,
        })).collect::<Vec<_>>(),
        "problems": problems,
        "warnings": warnings,
    });
    if let Err(e) = write_json(&args.out, &doc) {
        eprintln!("mesh-bench: writing {}: {e}", args.out.display());
        return ExitCode::FAILURE;
    }
    println!("== JSON written to {}", args.out.display());
    println!("== tearing down");
    if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Offered connection rates during an upgrade.
const UPGRADE_RATES: [f64; 2] = [100.0, 1000.0];
/// Repetitions of the SIGKILL → serving measurement.
const RESTART_REPS: usize = 5;

/// The agent's life cycle on n1 (mesh traffic from `client` to `server`):
/// - time from SIGKILL of n1's agent to the first connection carried again (a new agent started
///   at once, as a supervisor would), median of 5; the connect attempts poll every 10 ms and
///   each attempt is a process spawned in the pod (a few ms of the figure);
/// - connections that fail while n1's and then n2's agents are upgraded (listener handoff)
///   under a fixed offered rate of 100 and 1,000 connections per second.
fn lifecycle_phase(
    exe: &Path,
    cluster: &Cluster,
    agents: &mut [Agent],
    args: &Args,
    problems: &mut Vec<String>,
) -> Value {
    println!(
        "== life cycle: SIGKILL → serving (x{RESTART_REPS}), failed connections during upgrades"
    );
    let client = cluster.pod("client");
    let server = cluster.pod("server");
    let to = server.addr4(ONESHOT_PORT);
    let one = |label: &str| {
        let mut cmd = Command::new(exe);
        cmd.args(["connect", "--to", &to.to_string(), "--count", "1"]);
        client
            .run(cmd, label, Duration::from_secs(10))
            .status
            .success()
    };
    let mut restart_ms = Vec::new();
    for rep in 1..=RESTART_REPS {
        if stopping() {
            return json!(null);
        }
        let agent = &mut agents[0];
        let killed = Instant::now();
        agent.kill_sigkill();
        // The agent is restarted from this thread and the probes run on another: a process
        // the harness spawns dies with the thread that spawned it (PR_SET_PDEATHSIG).
        let served = std::thread::scope(|s| {
            let probing = s.spawn(|| {
                while killed.elapsed() < Duration::from_secs(60) {
                    if one("restart-probe") {
                        return Some(killed.elapsed());
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                None
            });
            agent.restart();
            probing.join().unwrap_or(None)
        });
        match served {
            Some(d) => {
                println!(
                    "   rep {rep}/{RESTART_REPS}: serving again {:.0} ms after SIGKILL",
                    d.as_secs_f64() * 1e3
                );
                restart_ms.push(d.as_secs_f64() * 1e3);
            }
            None => problems.push(format!(
                "restart rep {rep}: not serving within 60 s of SIGKILL"
            )),
        }
    }
    let secs = if args.quick { 4.0 } else { 8.0 };
    let mut upgrades = Vec::new();
    for rate in UPGRADE_RATES {
        if stopping() {
            return json!(null);
        }
        let mut cmd = Command::new(exe);
        cmd.args([
            "paced",
            "--to",
            &to.to_string(),
            "--rate",
            &rate.to_string(),
            "--secs",
            &secs.to_string(),
        ]);
        // The upgrade starts once the load is carried (its first flow records on n1).
        let flows_before = agents[0].flows().len();
        let load = client.spawn(cmd, &format!("paced-{rate}"));
        if eventually(Duration::from_secs(10), || {
            (agents[0].flows().len() > flows_before + 5).then_some(())
        })
        .is_none()
        {
            problems.push(format!(
                "upgrade at {rate}/s: the load was not carried before the upgrade"
            ));
        }
        let mut old_exit = Vec::new();
        for agent in agents.iter_mut() {
            old_exit.push(agent.upgrade(Duration::from_secs(5)).code());
        }
        let out = load.wait_output(Duration::from_secs_f64(secs + 30.0));
        let v = out
            .stdout
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str::<Value>(l).ok())
            .unwrap_or(json!({"errors": null, "stdout": out.stdout}));
        let failed = v.get("errors").and_then(Value::as_u64);
        println!(
            "   upgrade of both agents under {rate:.0} connects/s: {} connections, {} failed{}",
            v.get("connections").and_then(Value::as_u64).unwrap_or(0),
            failed.map_or("?".into(), |f| f.to_string()),
            v.get("first_error")
                .and_then(Value::as_str)
                .map(|e| format!(" (first: {e})"))
                .unwrap_or_default()
        );
        if old_exit.iter().any(|c| *c != Some(0)) {
            problems.push(format!(
                "upgrade at {rate}/s: old agents exited with {old_exit:?}"
            ));
        }
        upgrades
            .push(json!({"offered_per_sec": rate, "result": v, "old_agent_exit_codes": old_exit}));
    }
    let mut sorted = restart_ms.clone();
    json!({
        "sigkill_to_serving_ms": {"median": finite(median(&mut sorted)), "runs": restart_ms},
        "upgrade_failed_connections": upgrades,
        "upgrade_load_secs": secs,
    })
}

fn print_lifecycle(v: &Value) {
    if v.is_null() {
        return;
    }
    println!("agent life cycle (n1; mesh client → server):");
    println!(
        "  SIGKILL → serving again (median of {RESTART_REPS})   {:>8.0} ms",
        v["sigkill_to_serving_ms"]["median"]
            .as_f64()
            .unwrap_or(f64::NAN)
    );
    for u in v["upgrade_failed_connections"]
        .as_array()
        .into_iter()
        .flatten()
    {
        println!(
            "  failed connections, upgrade of both agents at {:>5.0}/s   {} of {}",
            u["offered_per_sec"].as_f64().unwrap_or(f64::NAN),
            u["result"]["errors"],
            u["result"]["connections"].as_u64().unwrap_or(0)
                + u["result"]["errors"].as_u64().unwrap_or(0)
        );
    }
    println!();
}

fn pod_json(p: &Pod) -> Value {
    json!({"name": p.name(), "node": p.node_name(), "ip4": p.ip4().to_string(), "enrolled": p.registered()})
}

fn host_info() -> Value {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let iperf = Command::new("iperf3")
        .arg("--version")
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_owned()
        });
    json!({"kernel": kernel.trim(), "cpus": cpus, "iperf3": iperf})
}

fn write_json(path: &Path, doc: &Value) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let text = serde_json::to_string_pretty(doc).map_err(std::io::Error::other)?;
    std::fs::write(path, text + "\n")
}

/// The bench servers and iperf3 in the server pod, ready to accept.
fn start_servers(exe: &Path, server: &Pod) -> Vec<Proc> {
    let mut cmd = Command::new(exe);
    cmd.arg("serve")
        .arg("--echo")
        .arg(server.addr4(ECHO_PORT).to_string())
        .arg("--oneshot")
        .arg(server.addr4(ONESHOT_PORT).to_string());
    let mut bench_server = server.spawn(cmd, "bench-serve");
    let mut iperf = Command::new("iperf3");
    iperf.args([
        "-s",
        "--forceflush",
        "-p",
        &IPERF_PORT.to_string(),
        "-B",
        &server.ip4().to_string(),
    ]);
    let mut iperf_server = server.spawn(iperf, "iperf3-server");
    let mut http = Command::new(exe);
    http.arg("http-serve")
        .arg("--listen")
        .arg(server.addr4(HTTP_L7_PORT).to_string())
        .arg("--listen")
        .arg(server.addr4(HTTP_L4_PORT).to_string())
        .arg("--resp-size")
        .arg(HTTP_BODY.to_string());
    let mut http_server = server.spawn(http, "http-serve");
    for (proc, ready) in [
        (&mut bench_server, "\"ready\""),
        (&mut iperf_server, "Server listening"),
        (&mut http_server, "listening"),
    ] {
        let ok = eventually(Duration::from_secs(10), || {
            if !proc.is_running() {
                return Some(false);
            }
            proc.stdout_lines()
                .iter()
                .any(|l| l.contains(ready))
                .then_some(true)
        });
        if ok != Some(true) {
            panic!(
                "{} did not start\nstdout:\n{}\nstderr:\n{}",
                proc.label(),
                proc.stdout(),
                proc.stderr()
            );
        }
    }
    vec![bench_server, iperf_server, http_server]
}

impl Bench<'_> {
    fn client_pod(&self, config: Config) -> &Pod {
        self.cluster.pod(match config {
            Config::Direct => "direct",
            Config::Mesh => "client",
        })
    }

    fn measure(&self, rep: u32, config: Config, test: Test) -> Run {
        let pod = self.client_pod(config);
        let before = self.agent_n1.flows().len();
        let cpu = || -> f64 {
            self.agents
                .iter()
                .filter_map(Agent::pid)
                .map(cpu_secs)
                .sum()
        };
        let cpu_before = cpu();
        let (values, detail, expect_flows) = match test {
            Test::Throughput => self.throughput(pod),
            Test::Rr => self.rr(pod),
            Test::Cps1 => self.cps(pod, 1, "conn_per_s_1"),
            Test::Cps8 => self.cps(pod, 8, "conn_per_s_8"),
        };
        let agent_flows = self.new_flows(before, (config == Config::Mesh).then_some(expect_flows));
        if config == Config::Mesh {
            let spent = cpu() - cpu_before;
            let mut cost = self.cost.borrow_mut();
            match test {
                Test::Throughput => {
                    cost.throughput_cpu_secs += spent;
                    cost.throughput_gb += values.get("throughput_gbit_s").copied().unwrap_or(0.0)
                        * self.durations.throughput as f64
                        / 8.0;
                }
                Test::Cps1 | Test::Cps8 => {
                    cost.cps_cpu_secs += spent;
                    cost.cps_connections +=
                        values.values().copied().sum::<f64>() * self.durations.cps;
                }
                Test::Rr => {}
            }
        }
        Run {
            rep,
            config,
            test,
            values,
            agent_flows,
            detail,
        }
    }

    /// Flow records n1's agent logged since `before` (records are written when connections
    /// end). `Some(n)`: a mesh run, waits (bounded) until there are `n`. `None`: a direct run,
    /// which should leave none; waits a short bounded while for any to show up and returns as
    /// soon as one does.
    fn new_flows(&self, before: usize, expect: Option<usize>) -> usize {
        let count = || self.agent_n1.flows().len() - before;
        let (limit, enough) = match expect {
            Some(n) => (Duration::from_secs(5), n),
            None => (Duration::from_millis(300), 1),
        };
        eventually(limit, || {
            let n = count();
            (n >= enough).then_some(n)
        })
        .unwrap_or_else(count)
    }

    /// Runs a pod command to completion and parses its last stdout line as JSON.
    fn run_json(&self, pod: &Pod, cmd: Command, label: &str, timeout: Duration) -> Value {
        let out = pod.run(cmd, label, timeout);
        let parsed = out
            .stdout
            .lines()
            .rev()
            .find(|l| l.trim_start().starts_with('{'))
            .and_then(|l| serde_json::from_str::<Value>(l).ok());
        match (out.status.success(), parsed) {
            (true, Some(v)) => v,
            _ => panic!(
                "{label} in {} failed ({})\nstdout:\n{}\nstderr:\n{}",
                pod.name(),
                out.status,
                out.stdout,
                out.stderr
            ),
        }
    }

    fn throughput(&self, pod: &Pod) -> (BTreeMap<&'static str, f64>, Value, usize) {
        let secs = self.durations.throughput;
        // iperf3 may still be closing the previous test: retry a busy server.
        for attempt in 1..=3 {
            let mut cmd = Command::new("iperf3");
            cmd.args([
                "-c",
                &self.server.ip4().to_string(),
                "-p",
                &IPERF_PORT.to_string(),
            ])
            .args(["-t", &secs.to_string(), "-J"]);
            let out = pod.run(cmd, "iperf3", Duration::from_secs(secs + 30));
            let v: Value = serde_json::from_str(&out.stdout).unwrap_or(Value::Null);
            let bps = v
                .pointer("/end/sum_received/bits_per_second")
                .and_then(Value::as_f64);
            if let (true, Some(bps)) = (out.status.success(), bps) {
                let sent = v
                    .pointer("/end/sum_sent/bits_per_second")
                    .and_then(Value::as_f64);
                let retr = v
                    .pointer("/end/sum_sent/retransmits")
                    .and_then(Value::as_u64);
                let detail = json!({"bits_per_second_received": bps, "bits_per_second_sent": sent, "retransmits": retr});
                // A control and a data connection.
                return (
                    BTreeMap::from([("throughput_gbit_s", bps / 1e9)]),
                    detail,
                    2,
                );
            }
            let err = v
                .get("error")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| out.stderr.clone());
            if attempt == 3 || stopping() {
                panic!(
                    "iperf3 in {} failed ({}): {err}\nstdout:\n{}",
                    pod.name(),
                    out.status,
                    out.stdout
                );
            }
            eprintln!("   iperf3 attempt {attempt} failed ({err}); retrying");
            std::thread::sleep(Duration::from_secs(1));
        }
        unreachable!("the loop returns or panics")
    }

    fn rr(&self, pod: &Pod) -> (BTreeMap<&'static str, f64>, Value, usize) {
        let secs = self.durations.rr;
        let mut cmd = Command::new(&self.exe);
        cmd.arg("rr")
            .arg("--to")
            .arg(self.server.addr4(ECHO_PORT).to_string())
            .args(["--size", "1024", "--secs", &secs.to_string()]);
        let v = self.run_json(pod, cmd, "rr", Duration::from_secs_f64(secs + 20.0));
        let get = |k: &str| v.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
        let values = BTreeMap::from([
            ("rr_p50_us", get("p50_us")),
            ("rr_p90_us", get("p90_us")),
            ("rr_p99_us", get("p99_us")),
        ]);
        (values, v, 1)
    }

    fn cps(
        &self,
        pod: &Pod,
        clients: usize,
        key: &'static str,
    ) -> (BTreeMap<&'static str, f64>, Value, usize) {
        let secs = self.durations.cps;
        let mut cmd = Command::new(&self.exe);
        cmd.arg("cps")
            .arg("--to")
            .arg(self.server.addr4(ONESHOT_PORT).to_string())
            .args([
                "--clients",
                &clients.to_string(),
                "--secs",
                &secs.to_string(),
            ]);
        let v = self.run_json(
            pod,
            cmd,
            &format!("cps-{clients}"),
            Duration::from_secs_f64(secs + 20.0),
        );
        let rate = v.get("per_sec").and_then(Value::as_f64).unwrap_or(f64::NAN);
        let ok = v.get("connections").and_then(Value::as_u64).unwrap_or(0) as usize;
        (BTreeMap::from([(key, rate)]), v, ok)
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// The median of `key` over the runs `values`, and its JSON `{median, runs}`.
fn median_entry<'a>(
    values: impl Iterator<Item = &'a BTreeMap<&'static str, f64>>,
    key: &str,
) -> (f64, Value) {
    let mut vals: Vec<f64> = values.filter_map(|v| v.get(key).copied()).collect();
    let all = vals.clone();
    let med = median(&mut vals);
    (med, json!({"median": finite(med), "runs": all}))
}

/// `{metric: {direct: {median, runs}, mesh: {median, runs}, ratio_mesh_over_direct}}`.
fn summarize(runs: &[Run]) -> Value {
    let mut out = serde_json::Map::new();
    for m in &METRICS {
        let mut entry = serde_json::Map::new();
        let mut medians = BTreeMap::new();
        for config in [Config::Direct, Config::Mesh] {
            let (med, json) = median_entry(
                runs.iter()
                    .filter(|r| r.config == config)
                    .map(|r| &r.values),
                m.key,
            );
            medians.insert(config, med);
            entry.insert(config.name().into(), json);
        }
        let (d, me) = (medians[&Config::Direct], medians[&Config::Mesh]);
        entry.insert("ratio_mesh_over_direct".into(), finite(me / d));
        if !m.higher_is_better {
            entry.insert("added_by_mesh".into(), finite(me - d));
        }
        entry.insert("label".into(), json!(m.label));
        entry.insert("higher_is_better".into(), json!(m.higher_is_better));
        out.insert(m.key.into(), Value::Object(entry));
    }
    Value::Object(out)
}

fn finite(v: f64) -> Value {
    if v.is_finite() {
        json!((v * 1000.0).round() / 1000.0)
    } else {
        Value::Null
    }
}

fn print_table(summary: &Value, args: &Args, d: &Durations) {
    println!();
    println!(
        "pod→pod across nodes, direct vs through the mesh: medians of {} repetitions \
         (iperf3 {} s, round trips {} s, connection rate {} s per run)",
        args.reps, d.throughput, d.rr, d.cps
    );
    println!(
        "{:<32} {:>12} {:>12} {:>12}",
        "metric", "direct", "mesh", "mesh/direct"
    );
    for m in &METRICS {
        let e = &summary[m.key];
        let num = |v: &Value| v.as_f64().map_or("-".into(), |x| format!("{x:.2}"));
        let extra = match e.get("added_by_mesh").and_then(Value::as_f64) {
            Some(a) => format!("(+{a:.1} µs)"),
            None => String::new(),
        };
        let row = format!(
            "{:<32} {:>12} {:>12} {:>12}  {}",
            m.label,
            num(&e["direct"]["median"]),
            num(&e["mesh"]["median"]),
            num(&e["ratio_mesh_over_direct"]),
            extra
        );
        println!("{}", row.trim_end());
    }
    println!();
}

// ---------------------------------------------------------------------------
// Policy: applying it timed, and the agents' view of it

/// One `mesh-agent policy apply` to one node, timed.
#[derive(Clone, Debug)]
struct Applied {
    node: usize,
    generation: u64,
    l4_entries: u64,
    /// Wall time of the command (process start, parse, compile, write, swap, 50 ms grace,
    /// delete of the old generation).
    wall: Duration,
    /// From the start of the command until the node's agent logged `policy generation
    /// active` for the generation (its log timestamp; the agent polls every 200 ms and then
    /// reads the whole generation back); `None`: not within 10 s.
    active: Option<Duration>,
}

impl Applied {
    fn to_json(&self) -> Value {
        json!({
            "node": format!("n{}", self.node + 1),
            "generation": self.generation,
            "l4_entries": self.l4_entries,
            "apply_wall_ms": ms(self.wall),
            "agent_active_ms": self.active.map(ms),
        })
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// Waits until the agent log at `log` (read from byte `offset`) says `policy generation
/// active` for `generation` or a later one. Returns the time from `since` (the start of the
/// apply, as a wall-clock time) to that line's `timestamp` (the agent may report the
/// generation before the apply command has finished: it deletes the old generation after
/// the swap); if the timestamp cannot be read, the time from `since` until the line was seen.
fn wait_generation(
    log: &Path,
    offset: u64,
    generation: u64,
    since: SystemTime,
    timeout: Duration,
) -> Option<Duration> {
    wait_logged(log, offset, since, timeout, |v| {
        v["message"] == "policy generation active"
            && v["generation"].as_u64().is_some_and(|g| g >= generation)
    })
}

/// The time from `since` to the first line of `log` past `offset` that `matches`, by the
/// line's own timestamp (so the poll interval does not blur the figure); `None` after
/// `timeout` or on Ctrl-C.
fn wait_logged(
    log: &Path,
    offset: u64,
    since: SystemTime,
    timeout: Duration,
    matches: impl Fn(&Value) -> bool,
) -> Option<Duration> {
    let v = logged_line(log, offset, timeout, matches)?;
    let logged = v["timestamp"].as_str().and_then(parse_utc_timestamp);
    let at = logged.unwrap_or_else(SystemTime::now);
    Some(at.duration_since(since).unwrap_or(Duration::ZERO))
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction]Z` (the agent's JSON log timestamps) as a wall-clock time.
fn parse_utc_timestamp(s: &str) -> Option<SystemTime> {
    let (date, time) = s.strip_suffix('Z')?.split_once('T')?;
    let num = |x: &str| x.parse::<i64>().ok();
    let mut d = date.split('-');
    let (y, m, day) = (num(d.next()?)?, num(d.next()?)?, num(d.next()?)?);
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.split(':');
    let (h, min, sec) = (num(t.next()?)?, num(t.next()?)?, num(t.next()?)?);
    let nanos: u32 = if frac.is_empty() {
        0
    } else {
        let digits: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
        digits.parse().ok()?
    };
    // Days since 1970-01-01 of a proleptic Gregorian date (March-based years, 400-year eras).
    let yy = if m <= 2 { y - 1 } else { y };
    let era = yy.div_euclid(400);
    let year_of_era = yy - era * 400;
    let day_of_year = (153 * ((m + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    let secs = u64::try_from(days * 86_400 + h * 3_600 + min * 60 + sec).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::new(secs, nanos))
}

/// A `mesh-agent policy …` command with the registry and trust domain of this cluster.
fn policy_cmd(verb: &str, dir: &Path, registry: &Path) -> Command {
    let mut cmd = Command::new(mesh_tests::agent_bin());
    cmd.arg("policy")
        .arg(verb)
        .arg(dir)
        .arg("--registry")
        .arg(registry)
        .arg("--trust-domain")
        .arg(mesh_tests::authority::TRUST_DOMAIN)
        .arg("--output")
        .arg("json");
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("MESH_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

const POLICY_TIMEOUT: Duration = Duration::from_secs(120);

impl Bench<'_> {
    /// `mesh-agent policy apply DIR` on node `index`, timed, and the time until its agent
    /// reports the generation. Panics if the command fails.
    fn apply_policy(&self, index: usize, dir: &Path) -> Applied {
        let node = self.cluster.node(index);
        let agent = &self.agents[index];
        let log = agent.stdout_path().expect("the agent runs").to_owned();
        let offset = file_len(&log);
        let mut cmd = policy_cmd("apply", dir, &self.registry);
        cmd.arg("--pin-dir").arg(node.pin_dir());
        let (started, started_at) = (Instant::now(), SystemTime::now());
        let out = node.run(cmd, "policy-apply", POLICY_TIMEOUT);
        let wall = started.elapsed();
        let v: Value = serde_json::from_str(out.stdout.trim()).unwrap_or(Value::Null);
        let (Some(generation), true) = (v["generation"].as_u64(), out.status.success()) else {
            panic!(
                "policy apply {} on {} failed ({})\nstdout:\n{}\nstderr:\n{}",
                dir.display(),
                node.name(),
                out.status,
                out.stdout,
                out.stderr
            );
        };
        let active = wait_generation(
            &log,
            offset,
            generation,
            started_at,
            Duration::from_secs(10),
        );
        Applied {
            node: index,
            generation,
            l4_entries: v["l4_entries"].as_u64().unwrap_or(0),
            wall,
            active,
        }
    }

    /// Applies `dir` to every node (n1, then n2).
    fn apply_everywhere(&self, dir: &Path) -> Vec<Applied> {
        (0..self.agents.len())
            .map(|i| self.apply_policy(i, dir))
            .collect()
    }

    /// `mesh-agent policy lint DIR --registry R`: parse and compile only, timed.
    fn compile_only(&self, dir: &Path) -> (Duration, Option<u64>) {
        let cmd = policy_cmd("lint", dir, &self.registry);
        let started = Instant::now();
        let out = self.cluster.node(0).run(cmd, "policy-lint", POLICY_TIMEOUT);
        let took = started.elapsed();
        if !out.status.success() {
            panic!(
                "policy lint {} failed ({})\nstdout:\n{}\nstderr:\n{}",
                dir.display(),
                out.status,
                out.stdout,
                out.stderr
            );
        }
        let v: Value = serde_json::from_str(out.stdout.trim()).unwrap_or(Value::Null);
        (took, v["l4_entries"].as_u64())
    }

    /// Inbound records of n2's agent so far.
    fn inbound_records(&self) -> Vec<Value> {
        self.agents[1]
            .log_lines()
            .into_iter()
            .filter(|v| v["message"] == "inbound")
            .collect()
    }
}

fn principal_of(pod: &Pod) -> String {
    mesh_agent::tls::spiffe::workload_principal(
        mesh_tests::authority::TRUST_DOMAIN,
        "default",
        pod.service_account(),
    )
}

/// An ALLOW policy selecting `app: <app>` with one rule: `principal` on `operation`.
fn allow_doc(name: &str, app: &str, principal: &str, operation: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  \
         name: {name}\n  namespace: default\nspec:\n  selector:\n    matchLabels: {{app: {app}}}\n  \
         action: ALLOW\n  rules:\n  - from:\n    - source: {{principals: [\"{principal}\"]}}\n    \
         to:\n    - operation: {operation}\n"
    )
}

/// `n` ALLOW policies selecting the server: `bench-client` lets the client in on the
/// one-shot port (what the connect measurement uses); `filler-i` lets principal
/// `…/sa/filler-i` (no such workload) in on port `FILLER_PORT_BASE + i % FILLER_PORTS`.
fn scale_policy_yaml(n: usize, client: &str) -> String {
    let mut out = String::with_capacity(n * 320);
    out.push_str(&allow_doc(
        "bench-client",
        "server",
        client,
        &format!("{{ports: [\"{ONESHOT_PORT}\"]}}"),
    ));
    for i in 1..n {
        let port = FILLER_PORT_BASE + (i % FILLER_PORTS) as u16;
        out.push_str(&allow_doc(
            &format!("filler-{i:05}"),
            "server",
            &format!(
                "{}/ns/default/sa/filler-{i:05}",
                mesh_tests::authority::TRUST_DOMAIN
            ),
            &format!("{{ports: [\"{port}\"]}}"),
        ));
    }
    out
}

/// The HTTP measurement's policy: the client is allowed on `HTTP_L4_PORT` at L4, and on
/// `HTTP_L7_PORT` for `GET`/`POST` on `/bench/*` (request-level: n2's agent parses and
/// authorises every request).
/// The HTTP phase's policies: the mesh client on the L4 port, and on the L7 port with methods
/// and paths; and the `direct` baseline pod (plaintext from outside the mesh, which PERMISSIVE
/// authorizes too) by its address, at L4, so the baseline measures the network alone.
fn http_policy_yaml(client: &str, direct_ip: std::net::Ipv4Addr) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  \
         name: bench-http-direct\n  namespace: default\nspec:\n  selector:\n    matchLabels: {{app: server}}\n  \
         action: ALLOW\n  rules:\n  - from:\n    - source: {{ipBlocks: [\"{direct_ip}/32\"]}}\n"
    ) + &allow_doc(
        "bench-http-l4",
        "server",
        client,
        &format!("{{ports: [\"{HTTP_L4_PORT}\"]}}"),
    ) + &allow_doc(
        "bench-http-l7",
        "server",
        client,
        &format!(
            "{{ports: [\"{HTTP_L7_PORT}\"], methods: [\"GET\", \"POST\"], paths: [\"/bench/*\"]}}"
        ),
    )
}

// ---------------------------------------------------------------------------
// HTTP at a fixed rate: direct, mesh (no L7 policy), mesh with an L7 policy

#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum HttpConfig {
    Direct,
    Mesh,
    MeshL7,
    /// As `MeshL7`, with a request path the agent must normalize (dot segments, a doubled
    /// slash, an encoded unreserved character) to the same `/bench/echo`.
    MeshL7Norm,
}

/// The `MeshL7Norm` request path: normalizes to `/bench/echo`.
const HTTP_NORM_PATH: &str = "/bench//x/../%65cho";

impl HttpConfig {
    fn name(self) -> &'static str {
        match self {
            HttpConfig::Direct => "direct",
            HttpConfig::Mesh => "mesh",
            HttpConfig::MeshL7 => "mesh_l7",
            HttpConfig::MeshL7Norm => "mesh_l7_norm",
        }
    }
}

const HTTP_CONFIGS: [HttpConfig; 4] = [
    HttpConfig::Direct,
    HttpConfig::Mesh,
    HttpConfig::MeshL7,
    HttpConfig::MeshL7Norm,
];

const HTTP_METRICS: [Metric; 3] = [
    Metric {
        key: "http_rps",
        label: "requests/s (achieved)",
        higher_is_better: true,
    },
    Metric {
        key: "http_p50_us",
        label: "latency p50 (µs)",
        higher_is_better: false,
    },
    Metric {
        key: "http_p99_us",
        label: "latency p99 (µs)",
        higher_is_better: false,
    },
];

struct HttpRun {
    rep: u32,
    config: HttpConfig,
    values: BTreeMap<&'static str, f64>,
    agent_flows: usize,
    /// Requests n2's agent authorised one by one (inbound records' `requests`).
    l7_requests: u64,
    detail: Value,
}

fn http_phase(
    bench: &Bench<'_>,
    args: &Args,
    runs: &mut Vec<HttpRun>,
    problems: &mut Vec<String>,
    warnings: &mut Vec<String>,
) {
    let client = bench.cluster.pod("client");
    let dir = bench.cluster.write_policy_dir(
        "policy-http",
        &[(
            "http.yaml",
            &http_policy_yaml(&principal_of(client), bench.cluster.pod("direct").ip4()),
        )],
    );
    let applied = bench.apply_everywhere(&dir);
    println!(
        "== HTTP: {HTTP_RATE} req/s offered, {HTTP_CONNS} keep-alive connections, {HTTP_BODY} B bodies, {} s per run; policy applied (generation {} on n1)",
        bench.durations.http, applied[0].generation
    );
    for rep in 1..=args.reps {
        let mut order = HTTP_CONFIGS;
        if rep % 2 == 0 {
            order.reverse();
        }
        for config in order {
            if stopping() {
                return;
            }
            let run = bench.http_run(rep, config);
            println!(
                "   rep {rep}/{} {:<8} rps={:.1} p50={:.1}µs p99={:.1}µs  (agent flows: {}, requests authorised by n2: {}, non-200: {}, errors: {}, late sends: {})",
                args.reps,
                config.name(),
                run.values["http_rps"],
                run.values["http_p50_us"],
                run.values["http_p99_us"],
                run.agent_flows,
                run.l7_requests,
                run.detail["non_200"],
                run.detail["errors"],
                run.detail["late"],
            );
            let name = config.name();
            let count = |k: &str| run.detail[k].as_u64().unwrap_or(0);
            if count("non_200") > 0 || count("errors") > 0 {
                problems.push(format!(
                    "rep {rep} http {name}: {} non-200 answers, {} errors (first: {})",
                    count("non_200"),
                    count("errors"),
                    run.detail["first_error"]
                ));
            }
            if count("late") > 0 {
                warnings.push(format!(
                    "rep {rep} http {name}: {} requests sent more than 1 ms late (offered rate not kept up)",
                    count("late")
                ));
            }
            match (config, run.agent_flows, run.l7_requests) {
                (HttpConfig::Direct, n, _) if n > 0 => problems.push(format!(
                    "rep {rep} http direct: {n} flow records on n1's agent"
                )),
                (HttpConfig::Mesh | HttpConfig::MeshL7 | HttpConfig::MeshL7Norm, 0, _) => problems
                    .push(format!(
                        "rep {rep} http {name}: no flow record on n1's agent"
                    )),
                (HttpConfig::MeshL7 | HttpConfig::MeshL7Norm, _, 0) => problems.push(format!(
                    "rep {rep} http {name}: n2's agent authorised no request (L7 not in the path)"
                )),
                (HttpConfig::Mesh, _, n) if n > 0 => problems.push(format!(
                    "rep {rep} http mesh: n2's agent parsed {n} requests on the L4-only port"
                )),
                _ => {}
            }
            runs.push(run);
        }
    }
}

impl Bench<'_> {
    fn http_run(&self, rep: u32, config: HttpConfig) -> HttpRun {
        let (pod, port) = match config {
            HttpConfig::Direct => (self.cluster.pod("direct"), HTTP_L7_PORT),
            HttpConfig::Mesh => (self.cluster.pod("client"), HTTP_L4_PORT),
            HttpConfig::MeshL7 | HttpConfig::MeshL7Norm => {
                (self.cluster.pod("client"), HTTP_L7_PORT)
            }
        };
        let flows_before = self.agent_n1.flows().len();
        let inbound_before = self.inbound_records().len();
        let secs = self.durations.http;
        let mut cmd = Command::new(&self.exe);
        cmd.arg("http-load")
            .arg("--to")
            .arg(self.server.addr4(port).to_string())
            .args([
                "--rate",
                &HTTP_RATE.to_string(),
                "--secs",
                &secs.to_string(),
                "--conns",
                &HTTP_CONNS.to_string(),
                "--size",
                &HTTP_BODY.to_string(),
            ]);
        if config == HttpConfig::MeshL7Norm {
            cmd.args(["--path", HTTP_NORM_PATH]);
        }
        let v = self.run_json(pod, cmd, "http-load", Duration::from_secs_f64(secs + 30.0));
        let get = |k: &str| v.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
        let values = BTreeMap::from([
            ("http_rps", get("rps")),
            ("http_p50_us", get("p50_us")),
            ("http_p99_us", get("p99_us")),
        ]);
        let opened = v["connections"].as_u64().unwrap_or(0) as usize;
        let (agent_flows, l7_requests) = match config {
            HttpConfig::Direct => (self.new_flows(flows_before, None), 0),
            _ => {
                let flows = self.new_flows(flows_before, Some(opened));
                let _ = eventually(Duration::from_secs(5), || {
                    (self.inbound_records().len() - inbound_before >= opened).then_some(())
                });
                let requests = self.inbound_records()[inbound_before..]
                    .iter()
                    .filter_map(|r| r["requests"].as_u64())
                    .sum();
                (flows, requests)
            }
        };
        HttpRun {
            rep,
            config,
            values,
            agent_flows,
            l7_requests,
            detail: v,
        }
    }
}

/// `{metric: {direct: {median, runs}, mesh: {…}, mesh_l7: {…}, ratio_mesh_over_direct,
/// ratio_mesh_l7_over_direct}}`.
fn summarize_http(runs: &[HttpRun]) -> Value {
    let mut out = serde_json::Map::new();
    for m in &HTTP_METRICS {
        let mut entry = serde_json::Map::new();
        let mut medians = BTreeMap::new();
        for config in HTTP_CONFIGS {
            let (med, json) = median_entry(
                runs.iter()
                    .filter(|r| r.config == config)
                    .map(|r| &r.values),
                m.key,
            );
            medians.insert(config, med);
            entry.insert(config.name().into(), json);
        }
        let d = medians[&HttpConfig::Direct];
        for config in [HttpConfig::Mesh, HttpConfig::MeshL7, HttpConfig::MeshL7Norm] {
            entry.insert(
                format!("ratio_{}_over_direct", config.name()),
                finite(medians[&config] / d),
            );
        }
        entry.insert("label".into(), json!(m.label));
        entry.insert("higher_is_better".into(), json!(m.higher_is_better));
        out.insert(m.key.into(), Value::Object(entry));
    }
    Value::Object(out)
}

fn print_http_table(summary: &Value, args: &Args, d: &Durations) {
    println!(
        "HTTP pod→pod across nodes, 1 KiB POST (1 KiB answer) at {HTTP_RATE} req/s offered on {HTTP_CONNS} keep-alive connections, {} s per run: medians of {}",
        d.http, args.reps
    );
    println!(
        "{:<26} {:>10} {:>10} {:>8} {:>10} {:>8} {:>10} {:>8}",
        "metric", "direct", "mesh", "/direct", "mesh+L7", "/direct", "L7+norm", "/direct"
    );
    for m in &HTTP_METRICS {
        let e = &summary[m.key];
        let num = |v: &Value| v.as_f64().map_or("-".into(), |x| format!("{x:.1}"));
        let ratio = |v: &Value| v.as_f64().map_or("-".into(), |x| format!("{x:.2}"));
        println!(
            "{:<26} {:>10} {:>10} {:>8} {:>10} {:>8} {:>10} {:>8}",
            m.label,
            num(&e["direct"]["median"]),
            num(&e["mesh"]["median"]),
            ratio(&e["ratio_mesh_over_direct"]),
            num(&e["mesh_l7"]["median"]),
            ratio(&e["ratio_mesh_l7_over_direct"]),
            num(&e["mesh_l7_norm"]["median"]),
            ratio(&e["ratio_mesh_l7_norm_over_direct"]),
        );
    }
    println!("  (mesh: a port not declared HTTP, allowed at L4, spliced; mesh+L7: a declared HTTP port with methods/paths rules, every request parsed and authorised by n2's agent, path normalization on (the default) — /bench/echo takes its no-copy path; L7+norm: the same with {HTTP_NORM_PATH}, which the agent must normalize and rewrite before matching and forwarding)");
    println!();
}

// ---------------------------------------------------------------------------
// Scale: connect() and policy updates with 10 and 10,000 policies

struct ScaleRun {
    rep: u32,
    policies: usize,
    compile: Duration,
    applied: Vec<Applied>,
    connect: Value,
}

impl ScaleRun {
    fn to_json(&self) -> Value {
        json!({
            "rep": self.rep,
            "policies": self.policies,
            "compile_only_ms": ms(self.compile),
            "applied": self.applied.iter().map(Applied::to_json).collect::<Vec<_>>(),
            "connect": self.connect,
        })
    }

    /// The figures summarised, by key.
    fn values(&self) -> BTreeMap<&'static str, f64> {
        let get = |k: &str| {
            self.connect
                .get(k)
                .and_then(Value::as_f64)
                .unwrap_or(f64::NAN)
        };
        let n1 = &self.applied[0];
        let mut v = BTreeMap::from([
            ("connect_p50_us", get("p50_us")),
            ("connect_p99_us", get("p99_us")),
            ("apply_wall_ms", ms(n1.wall)),
            ("agent_active_ms", n1.active.map_or(f64::NAN, ms)),
            ("compile_only_ms", ms(self.compile)),
            ("l4_entries", n1.l4_entries as f64),
        ]);
        if let Some(n2) = self.applied.get(1) {
            v.insert("apply_wall_ms_n2", ms(n2.wall));
            v.insert("agent_active_ms_n2", n2.active.map_or(f64::NAN, ms));
        }
        v
    }
}

const SCALE_METRICS: [(&str, &str); 8] = [
    ("connect_p50_us", "connect() p50 (µs)"),
    ("connect_p99_us", "connect() p99 (µs)"),
    ("apply_wall_ms", "policy apply, n1 (ms)"),
    ("agent_active_ms", "… agent n1 reports it (ms)"),
    ("apply_wall_ms_n2", "policy apply, n2 (ms)"),
    ("agent_active_ms_n2", "… agent n2 reports it (ms)"),
    ("compile_only_ms", "compile only (lint) (ms)"),
    ("l4_entries", "L4 map entries"),
];

fn scale_phase(
    bench: &Bench<'_>,
    args: &Args,
    runs: &mut Vec<ScaleRun>,
    problems: &mut Vec<String>,
    warnings: &mut Vec<String>,
) {
    let client = bench.cluster.pod("client");
    let dirs: Vec<(usize, PathBuf)> = SCALE_COUNTS
        .iter()
        .map(|&n| {
            let yaml = scale_policy_yaml(n, &principal_of(client));
            (
                n,
                bench
                    .cluster
                    .write_policy_dir(&format!("policy-scale-{n}"), &[("policies.yaml", &yaml)]),
            )
        })
        .collect();
    println!(
        "== scale: connect() of the client ({} connections per run) with {} policies loaded, applied with `mesh-agent policy apply` to both nodes",
        bench.durations.connects,
        SCALE_COUNTS.map(|n| n.to_string()).join(" / ")
    );
    for rep in 1..=args.reps {
        let mut order: Vec<&(usize, PathBuf)> = dirs.iter().collect();
        if rep % 2 == 0 {
            order.reverse();
        }
        for (n, dir) in order {
            if stopping() {
                return;
            }
            let (compile, _) = bench.compile_only(dir);
            let applied = bench.apply_everywhere(dir);
            let connect = bench.connect_run(client);
            let run = ScaleRun {
                rep,
                policies: *n,
                compile,
                applied,
                connect,
            };
            let v = run.values();
            println!(
                "   rep {rep}/{} {n:>6} policies: connect p50={:.1}µs p99={:.1}µs; apply n1 {:.0} ms (agent {:.0} ms), n2 {:.0} ms (agent {:.0} ms); compile only {:.0} ms; {} L4 entries",
                args.reps,
                v["connect_p50_us"],
                v["connect_p99_us"],
                v["apply_wall_ms"],
                v["agent_active_ms"],
                v.get("apply_wall_ms_n2").copied().unwrap_or(f64::NAN),
                v.get("agent_active_ms_n2").copied().unwrap_or(f64::NAN),
                v["compile_only_ms"],
                v["l4_entries"],
            );
            let errors = run.connect["errors"].as_u64().unwrap_or(0);
            if errors > 0 {
                problems.push(format!(
                    "rep {rep} scale {n}: {errors} failed connections (first: {})",
                    run.connect["first_error"]
                ));
            }
            for a in &run.applied {
                if a.active.is_none() {
                    warnings.push(format!(
                        "rep {rep} scale {n}: agent n{} did not report generation {} within 10 s",
                        a.node + 1,
                        a.generation
                    ));
                }
            }
            runs.push(run);
        }
    }
}

impl Bench<'_> {
    /// The connect-latency client in `pod` against the server's one-shot port.
    fn connect_run(&self, pod: &Pod) -> Value {
        let mut cmd = Command::new(&self.exe);
        cmd.arg("connect")
            .arg("--to")
            .arg(self.server.addr4(ONESHOT_PORT).to_string())
            .arg("--count")
            .arg(self.durations.connects.to_string());
        self.run_json(pod, cmd, "connect", Duration::from_secs(60))
    }
}

/// `{"10": {metric: {median, runs}}, "10000": {…}, "ratio_10000_over_10": {metric: r}}`.
fn summarize_scale(runs: &[ScaleRun]) -> Value {
    let mut out = serde_json::Map::new();
    let mut medians: BTreeMap<(usize, &str), f64> = BTreeMap::new();
    for n in SCALE_COUNTS {
        let mut entry = serde_json::Map::new();
        for (key, label) in SCALE_METRICS {
            let mut vals: Vec<f64> = runs
                .iter()
                .filter(|r| r.policies == n)
                .filter_map(|r| r.values().get(key).copied())
                .collect();
            let all = vals.clone();
            let med = median(&mut vals);
            medians.insert((n, key), med);
            entry.insert(
                key.into(),
                json!({"median": finite(med), "runs": all.iter().map(|v| finite(*v)).collect::<Vec<_>>(), "label": label}),
            );
        }
        out.insert(n.to_string(), Value::Object(entry));
    }
    let [small, large] = SCALE_COUNTS;
    let ratios: serde_json::Map<String, Value> = SCALE_METRICS
        .iter()
        .map(|(key, _)| {
            (
                (*key).to_owned(),
                finite(medians[&(large, *key)] / medians[&(small, *key)]),
            )
        })
        .collect();
    out.insert(format!("ratio_{large}_over_{small}"), Value::Object(ratios));
    Value::Object(out)
}

fn print_scale_table(summary: &Value, args: &Args, d: &Durations) {
    let [small, large] = SCALE_COUNTS;
    println!(
        "scale: the client's connect() through n1's kernel, {} connections per run, and policy updates: medians of {}",
        d.connects, args.reps
    );
    println!(
        "{:<30} {:>14} {:>14} {:>10}",
        "metric",
        format!("{small} policies"),
        format!("{large} policies"),
        format!("{large}/{small}")
    );
    let ratios = &summary[format!("ratio_{large}_over_{small}")];
    for (key, label) in SCALE_METRICS {
        let num = |n: usize| {
            summary[n.to_string()][key]["median"]
                .as_f64()
                .map_or("-".into(), |x| format!("{x:.1}"))
        };
        println!(
            "{:<30} {:>14} {:>14} {:>10}",
            label,
            num(small),
            num(large),
            ratios[key]
                .as_f64()
                .map_or("-".into(), |x| format!("{x:.2}")),
        );
    }
    println!("  (apply: wall time of `mesh-agent policy apply` (parse, compile, write, swap, 50 ms grace, delete the old generation); agent: from the start of the apply to the agent's `policy generation active` log line (it polls every 200 ms, then reads the generation back); compile only: `mesh-agent policy lint --registry`)");
    println!();
}

// ---------------------------------------------------------------------------
// Pod side: servers and clients (spawned into pod namespaces and cgroups)

/// One JSON line to stdout, flushed (stdout is a file the harness reads).
fn emit(v: &Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

fn serve(echo: SocketAddr, oneshot: SocketAddr) -> ExitCode {
    let (echo_l, oneshot_l) = match (TcpListener::bind(echo), TcpListener::bind(oneshot)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("mesh-bench serve: bind: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut threads = Vec::new();
    threads.push(std::thread::spawn(move || {
        mesh_tests::net::accept_forever(&echo_l, "mesh-bench serve", |s, _| {
            std::thread::spawn(move || echo_conn(s));
        })
    }));
    // Short connections: a few threads accept and answer inline.
    for _ in 0..8 {
        let l = oneshot_l.try_clone().expect("cloning the listener");
        threads.push(std::thread::spawn(move || {
            mesh_tests::net::accept_forever(&l, "mesh-bench serve", |s, _| oneshot_conn(s))
        }));
    }
    emit(&json!({"event": "ready", "echo": echo.to_string(), "oneshot": oneshot.to_string()}));
    for t in threads {
        let _ = t.join();
    }
    ExitCode::FAILURE
}

fn echo_conn(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = s.shutdown(Shutdown::Write);
}

/// Read one byte, answer one byte, close (the server closes first).
fn oneshot_conn(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(IO_TIMEOUT));
    let mut b = [0u8; 1];
    if s.read_exact(&mut b).is_ok() {
        let _ = s.write_all(&b);
    }
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[idx] as f64 / 1000.0
}

fn rr_client(to: SocketAddr, size: usize, secs: Duration) -> ExitCode {
    let result = (|| -> std::io::Result<Value> {
        let mut s = TcpStream::connect_timeout(&to, IO_TIMEOUT)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        let req = vec![0x5a_u8; size];
        let mut resp = vec![0u8; size];
        let start = Instant::now();
        let (warm, end) = (start + RR_WARMUP, start + RR_WARMUP + secs);
        let mut lat_ns: Vec<u64> = Vec::with_capacity(1 << 16);
        loop {
            let t0 = Instant::now();
            if t0 >= end {
                break;
            }
            s.write_all(&req)?;
            s.read_exact(&mut resp)?;
            if t0 >= warm {
                lat_ns.push(t0.elapsed().as_nanos() as u64);
            }
        }
        s.shutdown(Shutdown::Write)?;
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        lat_ns.sort_unstable();
        let mean = lat_ns.iter().sum::<u64>() as f64 / lat_ns.len().max(1) as f64 / 1000.0;
        Ok(json!({
            "round_trips": lat_ns.len(),
            "p50_us": percentile(&lat_ns, 0.50),
            "p90_us": percentile(&lat_ns, 0.90),
            "p99_us": percentile(&lat_ns, 0.99),
            "max_us": percentile(&lat_ns, 1.0),
            "mean_us": mean,
        }))
    })();
    match result {
        Ok(v) => {
            emit(&v);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mesh-bench rr {to}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Connect, send 1 byte, read 1 byte, read the server's close, close.
fn one_connection(to: SocketAddr) -> std::io::Result<()> {
    exchange_one(TcpStream::connect_timeout(&to, IO_TIMEOUT)?)
}

/// Send 1 byte, read 1 byte, read the server's close, close.
fn exchange_one(mut s: TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.write_all(&[1])?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    let mut rest = [0u8; 16];
    match s.read(&mut rest)? {
        0 => Ok(()),
        _ => Err(std::io::Error::other("server sent more than one byte")),
    }
}

/// Outcomes of connections made by several threads: successes, failures, the first error.
#[derive(Default)]
struct ConnTally {
    ok: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl ConnTally {
    /// Counts one connection; `false` if it failed.
    fn record(&self, result: std::io::Result<()>) -> bool {
        match result {
            Ok(()) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(e) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                self.first_error
                    .lock()
                    .unwrap()
                    .get_or_insert_with(|| e.to_string());
                false
            }
        }
    }

    fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    fn first_error(&self) -> Option<String> {
        self.first_error.lock().unwrap().clone()
    }
}

/// Connections at a fixed offered rate; every failure counted (with the first error).
fn paced_client(to: SocketAddr, rate: f64, secs: Duration, clients: usize) -> ExitCode {
    let clients = clients.max(1);
    let interval = Duration::from_secs_f64(clients as f64 / rate.max(1.0));
    let tally = Arc::new(ConnTally::default());
    let start = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|i| {
            let tally = tally.clone();
            std::thread::spawn(move || {
                // Staggered starts spread the clients over one interval.
                let mut next = start + interval.mul_f64(i as f64 / clients as f64);
                while next < start + secs {
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    }
                    next += interval;
                    tally.record(one_connection(to));
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    emit(&json!({
        "offered_per_sec": rate,
        "connections": tally.ok(),
        "errors": tally.errors(),
        "first_error": tally.first_error(),
        "elapsed_secs": start.elapsed().as_secs_f64(),
    }));
    ExitCode::SUCCESS
}

fn cps_client(to: SocketAddr, clients: usize, secs: Duration) -> ExitCode {
    let tally = Arc::new(ConnTally::default());
    let barrier = Arc::new(Barrier::new(clients + 1));
    let mut threads = Vec::new();
    for _ in 0..clients {
        let (tally, barrier) = (tally.clone(), barrier.clone());
        threads.push(std::thread::spawn(move || {
            barrier.wait();
            let end = Instant::now() + secs;
            while Instant::now() < end {
                if !tally.record(one_connection(to)) {
                    // A failed connect returns at once: do not spin on it.
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }));
    }
    barrier.wait();
    let start = Instant::now();
    for t in threads {
        let _ = t.join();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let n = tally.ok();
    let e = tally.errors();
    emit(&json!({
        "clients": clients,
        "connections": n,
        "errors": e,
        "first_error": tally.first_error(),
        "secs": elapsed,
        "per_sec": n as f64 / elapsed,
    }));
    if n == 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// `count` connections one after the other to the one-shot port, `connect()` timed.
fn connect_client(to: SocketAddr, count: usize) -> ExitCode {
    let mut connect_ns: Vec<u64> = Vec::with_capacity(count);
    let mut errors = 0u64;
    let mut first_error: Option<String> = None;
    for i in 0..count + CONNECT_WARMUP {
        let t0 = Instant::now();
        let result = TcpStream::connect_timeout(&to, IO_TIMEOUT).and_then(|s| {
            let took = t0.elapsed();
            exchange_one(s).map(|()| took)
        });
        match result {
            Ok(took) if i >= CONNECT_WARMUP => connect_ns.push(took.as_nanos() as u64),
            Ok(_) => {}
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| e.to_string());
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    connect_ns.sort_unstable();
    let mean = connect_ns.iter().sum::<u64>() as f64 / connect_ns.len().max(1) as f64 / 1000.0;
    emit(&json!({
        "connections": connect_ns.len(),
        "errors": errors,
        "first_error": first_error,
        "p50_us": percentile(&connect_ns, 0.50),
        "p90_us": percentile(&connect_ns, 0.90),
        "p99_us": percentile(&connect_ns, 0.99),
        "max_us": percentile(&connect_ns, 1.0),
        "mean_us": mean,
    }));
    if connect_ns.is_empty() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

// ---------------------------------------------------------------------------------------------
// Held connections: agent RSS with 10,000 idle cross-node connections, and after they close

/// Held connections in all, from two enrolled client pods on n1 (each source stays within its
/// default share of the budget, half of it) to one server pod on n2.
const HELD: usize = 10_000;
const HELD_PORT: u16 = 7000;
/// How long RSS is sampled after the connections close (jemalloc returns memory after its
/// ~10 s decay).
const HELD_SETTLE: Duration = Duration::from_secs(20);

fn rss_mib(pid: Option<u32>) -> f64 {
    pid.map_or(0.0, |p| mesh_tests::rss_kib(p) as f64 / 1024.0)
}

/// Agents started under a soft `RLIMIT_NOFILE` of 1024 (they raise it), 10,000 connections
/// held idle through them, RSS of both agents before, while held and after close; a table and
/// `<out>.held.json`.
fn held_bench(out: &Path) -> ExitCode {
    println!("== held connections: {HELD} idle cross-node connections, agents started under soft RLIMIT_NOFILE 1024");
    let hard = mesh_tests::raise_nofile();
    let cluster = Cluster::builder()
        .nodes(2)
        .add_pod(0, "client-a")
        .add_pod(0, "client-b")
        .add_pod(1, "server")
        .build();
    let agents: Vec<Agent> = (0..2)
        .map(|n| {
            let mut spec = cluster.agent_spec(n);
            spec.nofile = Some((1024, hard));
            Agent::start(spec)
        })
        .collect();
    let server = cluster.pod("server");
    let _srv = server.serve_many(HELD_PORT);
    let rss = |agents: &[Agent]| -> Vec<f64> { agents.iter().map(|a| rss_mib(a.pid())).collect() };
    let active = |n: usize, dir: &str| {
        cluster
            .node(n)
            .metric(&format!("mesh_connections_active{{direction=\"{dir}\"}}"))
    };
    let baseline = rss(&agents);
    let started = Instant::now();
    let mut held: Vec<_> = ["client-a", "client-b"]
        .iter()
        .map(|p| {
            cluster
                .pod(p)
                .hold_many(server.addr4(HELD_PORT), HELD / 2, 100)
        })
        .collect();
    let mut ok = 0;
    let mut problems = Vec::new();
    for h in &mut held {
        let s = h.wait_established(Duration::from_secs(120));
        ok += s.ok;
        if s.failed > 0 {
            problems.push(format!("{} connections failed: {:?}", s.failed, s.errors));
        }
    }
    let opened_secs = started.elapsed().as_secs_f64();
    let settled = eventually(Duration::from_secs(30), || {
        (active(0, "outbound") >= ok as f64 && active(1, "inbound") >= ok as f64).then_some(())
    });
    if settled.is_none() {
        problems.push("the agents did not report every connection active".to_owned());
    }
    let with_held = rss(&agents);
    for h in &mut held {
        h.close();
    }
    let _ = eventually(Duration::from_secs(30), || {
        (active(0, "outbound") == 0.0 && active(1, "inbound") == 0.0).then_some(())
    });
    let closed = Instant::now();
    let after = eventually(HELD_SETTLE, || {
        let now = rss(&agents);
        now.iter()
            .zip(&baseline)
            .all(|(a, b)| *a <= b + 16.0)
            .then_some(now)
    })
    .unwrap_or_else(|| rss(&agents));
    let after_secs = closed.elapsed().as_secs_f64();
    let fmt = |v: &[f64]| {
        v.iter()
            .map(|r| format!("{r:.1}"))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    println!("agent RSS, MiB (n1 outbound / n2 inbound):");
    println!(
        "  baseline                                     {}",
        fmt(&baseline)
    );
    println!("  with {ok} idle held connections             {}   (goal <= 100; opened in {opened_secs:.1} s)", fmt(&with_held));
    println!(
        "  after they close ({after_secs:.0} s later)                {}",
        fmt(&after)
    );
    for p in &problems {
        println!("PROBLEM: {p}");
    }
    let doc = json!({
        "what": "agent RSS with 10,000 idle held cross-node connections (two enrolled client pods on n1, 5,000 each, to one server pod on n2; one line echoed on each), agents started under a soft RLIMIT_NOFILE of 1024, and after the connections close (sampled until within 16 MiB of the baseline, at most 20 s)",
        "agent_bin": mesh_tests::agent_bin().display().to_string(),
        "held": ok,
        "opened_secs": finite(opened_secs),
        "rss_mib": {
            "baseline": baseline.iter().map(|v| finite(*v)).collect::<Vec<_>>(),
            "held": with_held.iter().map(|v| finite(*v)).collect::<Vec<_>>(),
            "after_close": after.iter().map(|v| finite(*v)).collect::<Vec<_>>(),
            "after_close_secs": finite(after_secs),
        },
        "problems": problems,
    });
    write_side_json(&out.with_extension("held.json"), &doc, problems.is_empty())
}

/// Writes a `--*-only` run's JSON; success when it was written and `ok`.
fn write_side_json(path: &Path, doc: &Value, ok: bool) -> ExitCode {
    if let Err(e) = write_json(path, doc) {
        eprintln!("mesh-bench: writing {}: {e}", path.display());
        return ExitCode::FAILURE;
    }
    println!("== JSON written to {}", path.display());
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

// ---------------------------------------------------------------------------
// Audit log figures (issue 13): the writer's sustained rate on one core and the query time
// over a large log, with no cluster; the added HTTP latency with agents run with and without
// the log is `audit_overhead_phase`.

use mesh_agent::audit::{
    AuditConfig, AuditLog, Body, ConnectionFields, Entry, Kind, Layer, Verdict,
};

/// Records written for the sustained rate (with `--quick`: the second).
const AUDIT_RATE_RECORDS: [u64; 2] = [2_000_000, 300_000];
/// Records in the queried log (with `--quick`: the second).
const AUDIT_QUERY_RECORDS: [u64; 2] = [10_000_000, 1_000_000];
/// The selective filter: 1 source of 40, 1 destination of 20, `deny` (~10%).
const AUDIT_QUERY_SRC: &str = "team1/app3";
const AUDIT_QUERY_DST: &str = "bank/ledger";
/// Bound on one `audit query` run (the first builds the index).
const AUDIT_QUERY_TIMEOUT: Duration = Duration::from_secs(1800);
/// Free space kept beyond the log's estimated size.
const AUDIT_DISK_MARGIN: u64 = 1 << 30;

/// Record `i` of a realistic mix: 90% connection decisions (40 source workloads in 5
/// namespaces, 20 destinations, 6 ports, L7 on the HTTP ports; 85% allow, 10% deny, 3%
/// dry-run deny, 2% audit), 4% plaintext, 3% configuration, 3% certificate events.
fn audit_entry(i: u64) -> Entry {
    let h = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 16;
    let pick = |shift: u32, n: u64| (h >> shift) % n;
    let src = format!("team{}/app{}", pick(0, 5), pick(3, 8));
    let dst_ns = ["shop", "bank", "web", "data"][pick(6, 4) as usize];
    let dst = format!(
        "{dst_ns}/{}",
        ["ledger", "cart", "api", "db", "cache"][pick(8, 5) as usize]
    );
    let port = [80u16, 443, 8080, 5432, 9090, 6379][pick(11, 6) as usize];
    let spiffe = |w: &str| {
        let (ns, name) = w.split_once('/').unwrap_or(("default", w));
        format!("spiffe://cluster.local/ns/{ns}/sa/{name}")
    };
    let class = pick(14, 100);
    let fields = |verdict: Verdict, layer: Layer| ConnectionFields {
        layer: Some(layer),
        verdict: Some(verdict),
        src_identity: Some(spiffe(&src)),
        dst_identity: Some(spiffe(&dst)),
        src_workload: Some(src.clone()),
        dst_workload: Some(dst.clone()),
        src_addr: Some(SocketAddr::from((
            [10, 0, 1, pick(20, 200) as u8 + 2],
            40_000 + pick(24, 20_000) as u16,
        ))),
        dst_addr: Some(SocketAddr::from((
            [10, 0, 2, pick(40, 200) as u8 + 2],
            port,
        ))),
        port: Some(port),
        policy: Some(format!("{dst_ns}/allow-{}", pick(30, 6))),
        generation: Some(7),
        bytes_sent: Some(200 + pick(33, 50_000)),
        bytes_received: Some(100 + pick(17, 200_000)),
        ..ConnectionFields::default()
    };
    match class {
        0..=89 => {
            let verdict = match pick(36, 100) {
                0..=84 => Verdict::Allow,
                85..=94 => Verdict::Deny,
                95..=97 => Verdict::DryRunDeny,
                _ => Verdict::Audit,
            };
            let mut f = if matches!(port, 80 | 8080) {
                let mut f = fields(verdict, Layer::L7);
                f.method = Some(["GET", "POST", "DELETE"][pick(2, 3) as usize].into());
                f.path = Some(format!("/items/{}", pick(5, 10_000)));
                f.host = Some(dst.replace('/', "."));
                f.requests_allowed = Some(pick(9, 20));
                f.requests_denied = Some(u64::from(verdict == Verdict::Deny));
                f
            } else {
                fields(verdict, Layer::L4)
            };
            f.outcome = Some("closed".into());
            f.entry(Kind::Connection)
        }
        90..=93 => {
            let verdict = if pick(2, 2) == 0 {
                Verdict::Refused
            } else {
                Verdict::Flagged
            };
            fields(verdict, Layer::L4).entry(Kind::Plaintext)
        }
        94..=96 => Entry {
            kind: Kind::Config,
            body: Body {
                action: Some("accepted".into()),
                subject: Some(format!("/etc/mesh/policy/{dst_ns}.yaml")),
                generation: Some(i),
                ..Body::default()
            },
        },
        _ => Entry {
            kind: Kind::Cert,
            body: Body {
                action: Some("rotated".into()),
                subject: Some(spiffe(&src)),
                ..Body::default()
            },
        },
    }
}

/// Where the audit log's indexer thread runs while the bench feeds the log.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum IndexerAt {
    /// No indexer (`AuditConfig::index = false`): the writer alone.
    Off,
    /// On the one core the feeder and the writer are pinned to.
    SameCore,
    /// On the other cores (none shared with the feeder and the writer).
    OtherCores,
}

impl IndexerAt {
    fn label(self) -> &'static str {
        match self {
            IndexerAt::Off => "no indexer",
            IndexerAt::SameCore => "indexer on the same core",
            IndexerAt::OtherCores => "indexer on the other cores",
        }
    }
}

/// How one run of the writer went.
struct AuditWrite {
    /// Feeding `n` records, from the first to the last call returning.
    feed: Duration,
    /// Feeding and draining: until `shutdown` (agent_stop, final checkpoint) returned.
    total: Duration,
    written: u64,
    lost: u64,
    checkpoints: u64,
    cpu: Option<usize>,
    /// Records written but not yet indexed when the last call returned, and after `shutdown`
    /// (which gives the indexer up to 2 s to catch up).
    lag_at_feed_end: u64,
    lag_after_stop: u64,
    /// With `catch_up`: from the last call returning until the index covered the log.
    catch_up: Option<Duration>,
    /// Where the indexer thread ran (CPUs it was allowed), if it ran.
    indexer_cpus: Option<Vec<usize>>,
}

/// Pins the calling thread to the first CPU it may run on; returns it.
fn pin_to_one_cpu() -> Option<usize> {
    // SAFETY: cpu_set_t is plain data; the calls only read/write `set`, sized as passed.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        let size = std::mem::size_of::<libc::cpu_set_t>();
        if libc::sched_getaffinity(0, size, &mut set) != 0 {
            return None;
        }
        let cpu = (0..libc::CPU_SETSIZE as usize).find(|&c| libc::CPU_ISSET(c, &set))?;
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        (libc::sched_setaffinity(0, size, &set) == 0).then_some(cpu)
    }
}

/// The CPUs the calling process may run on.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; the call only writes `set`, sized as passed.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        let size = std::mem::size_of::<libc::cpu_set_t>();
        if libc::sched_getaffinity(0, size, &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// Moves this process's thread named `name` onto `cpus` (waits up to 2 s for it to exist).
fn pin_thread_named(name: &str, cpus: &[usize]) -> bool {
    let tid = eventually(Duration::from_secs(2), || {
        std::fs::read_dir("/proc/self/task").ok().and_then(|rd| {
            rd.filter_map(Result::ok).find_map(|t| {
                let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
                (comm.trim_end() == name)
                    .then(|| t.file_name().to_str()?.parse::<libc::pid_t>().ok())
                    .flatten()
            })
        })
    });
    let Some(tid) = tid else {
        return false;
    };
    // SAFETY: cpu_set_t is plain data; the call reads `set`, sized as passed.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// Writes `n` records of [`audit_entry`] through the real [`AuditLog`] (its queue, writer
/// thread, segments and signed checkpoints) under `state`, from one thread pinned to one CPU;
/// the writer thread, started from it, inherits the pinning: the log's writer runs on one
/// core. The indexer thread (started by the writer) shares that core, or is moved to the
/// other cores, or is off: `indexer`.
/// `wait`: fail closed and `record().await` (nothing may be lost); else best effort `emit`.
fn audit_write(
    state: &Path,
    n: u64,
    wait: bool,
    indexer: IndexerAt,
    catch_up: bool,
) -> Result<AuditWrite, String> {
    let state = state.to_owned();
    let all_cpus = allowed_cpus();
    std::thread::spawn(move || {
        let cpu = pin_to_one_cpu();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("tokio runtime: {e}"))?;
        rt.block_on(async move {
            let cfg = AuditConfig {
                fail_closed: wait,
                index: indexer != IndexerAt::Off,
                ..AuditConfig::new("bench", &state)
            };
            let log = AuditLog::start(cfg).map_err(|e| format!("starting the audit log: {e}"))?;
            let indexer_cpus = match indexer {
                IndexerAt::Off => None,
                IndexerAt::SameCore => Some(cpu.into_iter().collect::<Vec<_>>()),
                IndexerAt::OtherCores => {
                    let others: Vec<usize> = all_cpus
                        .iter()
                        .copied()
                        .filter(|c| Some(*c) != cpu)
                        .collect();
                    if others.is_empty() || !pin_thread_named("audit-indexer", &others) {
                        return Err(
                            "could not move the audit-indexer thread to the other cores".into()
                        );
                    }
                    Some(others)
                }
            };
            let t = Instant::now();
            for i in 0..n {
                if wait {
                    log.record(audit_entry(i))
                        .await
                        .map_err(|_| format!("audit log unavailable at record {i}"))?;
                } else {
                    log.emit(audit_entry(i));
                }
            }
            let feed = t.elapsed();
            let lag_at_feed_end = log.stats().index.lag();
            // Bounded: the indexer ingests at least ~50,000 records/s.
            let catch_up = if catch_up && indexer != IndexerAt::Off {
                let limit = Duration::from_secs(60 + n / 50_000);
                let t = Instant::now();
                while log.stats().index.lag() > 0 && t.elapsed() < limit {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Some(t.elapsed())
            } else {
                None
            };
            log.shutdown("bench").await;
            let total = t.elapsed();
            let s = log.stats();
            Ok(AuditWrite {
                feed,
                total,
                written: s.written.load(Ordering::Relaxed),
                lost: s.lost.load(Ordering::Relaxed),
                checkpoints: s.checkpoints.load(Ordering::Relaxed),
                cpu,
                lag_at_feed_end: if indexer == IndexerAt::Off {
                    0
                } else {
                    lag_at_feed_end
                },
                lag_after_stop: if indexer == IndexerAt::Off {
                    0
                } else {
                    s.index.lag()
                },
                catch_up,
                indexer_cpus,
            })
        })
    })
    .join()
    .map_err(|_| "the audit writer thread panicked".to_owned())?
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt as _;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: `path` is NUL-terminated and `st` a plain struct the call fills in.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        (libc::statvfs(path.as_ptr(), &mut st) == 0).then(|| st.f_bavail * st.f_frsize)
    }
}

/// `audit_records_per_sec` and `audit_query_10m` in a fresh directory `work` (removed after).
fn audit_log_phase(work: &Path, quick: bool, problems: &mut Vec<String>) -> Value {
    let _ = std::fs::remove_dir_all(work);
    if let Err(e) = std::fs::create_dir_all(work) {
        problems.push(format!("audit: creating {}: {e}", work.display()));
        return json!(null);
    }
    let q = usize::from(quick);
    let rate = audit_rate(work, AUDIT_RATE_RECORDS[q], problems);
    let emit_ns = audit_emit_latency(&work.join("emit-latency"), problems);
    let query = audit_query(work, AUDIT_QUERY_RECORDS[q], &rate, problems);
    let _ = std::fs::remove_dir_all(work);
    json!({ "audit_records_per_sec": rate, "audit_emit_ns": emit_ns, "audit_query_10m": query })
}

/// `emit()` calls timed one by one.
const AUDIT_EMIT_CALLS: u64 = 200_000;
/// Their pace: an agent under load, below what the writer sustains (nothing dropped).
const AUDIT_EMIT_RATE: u64 = 50_000;

/// What the audit log adds to a decision's own path: the duration of each `emit()` (the one
/// call a proxy makes; formatting, hashing, writing and indexing happen on the writer's and
/// the indexer's threads), at a steady pace with the writer and the indexer running. With
/// `--audit-off` nothing is called, so these are the added latencies.
fn audit_emit_latency(state: &Path, problems: &mut Vec<String>) -> Value {
    println!("== audit emit(): {AUDIT_EMIT_CALLS} calls at {AUDIT_EMIT_RATE}/s, each timed, writer and indexer running");
    let run = || -> Result<Vec<u64>, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("tokio runtime: {e}"))?;
        rt.block_on(async {
            let log = AuditLog::start(AuditConfig::new("bench", state))
                .map_err(|e| format!("starting the audit log: {e}"))?;
            let mut ns = Vec::with_capacity(AUDIT_EMIT_CALLS as usize);
            let start = Instant::now();
            for i in 0..AUDIT_EMIT_CALLS {
                let entry = audit_entry(i);
                let t = Instant::now();
                log.emit(entry);
                ns.push(t.elapsed().as_nanos() as u64);
                // Paced in steps of 100 calls (2 ms).
                if i % 100 == 99 {
                    let due = start + Duration::from_micros((i + 1) * 1_000_000 / AUDIT_EMIT_RATE);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                }
            }
            let lost = log.stats().lost.load(std::sync::atomic::Ordering::Relaxed);
            log.shutdown("bench").await;
            if lost > 0 {
                return Err(format!("{lost} records dropped at {AUDIT_EMIT_RATE}/s"));
            }
            Ok(ns)
        })
    };
    let mut ns = match run() {
        Ok(ns) => ns,
        Err(e) => {
            problems.push(format!("audit emit latency: {e}"));
            return json!(null);
        }
    };
    let _ = std::fs::remove_dir_all(state);
    ns.sort_unstable();
    let at = |p: f64| ns[((ns.len() - 1) as f64 * p).round() as usize];
    let v = json!({
        "calls": ns.len(), "rate_per_sec": AUDIT_EMIT_RATE,
        "p50": at(0.5), "p99": at(0.99), "p999": at(0.999), "max": at(1.0),
    });
    println!(
        "   emit() p50 {} ns, p99 {} ns, p99.9 {} ns, max {} ns",
        v["p50"], v["p99"], v["p999"], v["max"]
    );
    v
}

fn audit_rate(work: &Path, n: u64, problems: &mut Vec<String>) -> Value {
    println!("== audit log: {n} records through the real writer, one thread pinned to one core (the writer thread inherits it; the indexer thread on that core, on the other cores, or off)");
    let mut out = serde_json::Map::new();
    // About 600 bytes of log per record: a full disk would only measure the failure.
    let free = free_bytes(work).unwrap_or(0);
    if free < n * 600 + AUDIT_DISK_MARGIN {
        problems.push(format!(
            "audit rate: {n} records need about {:.1} GB on disk (with 1 GiB kept free), {:.1} GB free: not measured",
            (n * 600 + AUDIT_DISK_MARGIN) as f64 / 1e9,
            free as f64 / 1e9
        ));
        return Value::Object(out);
    }
    for (key, wait, indexer) in [
        ("record_await", true, IndexerAt::SameCore),
        (
            "record_await_indexer_other_cores",
            true,
            IndexerAt::OtherCores,
        ),
        ("record_await_no_indexer", true, IndexerAt::Off),
        ("emit", false, IndexerAt::SameCore),
    ] {
        let state = work.join(format!("rate-{key}"));
        match audit_write(&state, n, wait, indexer, false) {
            Ok(w) => {
                // Best effort drops what the queue cannot hold: count what was written.
                let per_sec = w.written.min(n) as f64 / w.total.as_secs_f64();
                let feed_per_sec = n as f64 / w.feed.as_secs_f64();
                println!(
                    "   {key:<33} {per_sec:>10.0} records/s sustained (written and checkpointed), calls at {feed_per_sec:.0}/s; lost {}, written {}, checkpoints {}, feeder+writer on CPU {:?}, {} (CPUs {:?}); index lag at the end of the feed {} records, after stop {}",
                    w.lost, w.written, w.checkpoints, w.cpu, indexer.label(), w.indexer_cpus, w.lag_at_feed_end, w.lag_after_stop
                );
                if wait && w.lost > 0 {
                    problems.push(format!(
                        "audit: {} records lost with record().await",
                        w.lost
                    ));
                }
                out.insert(
                    key.into(),
                    json!({
                        "records": n,
                        "records_per_sec": finite(per_sec),
                        "calls_per_sec": finite(feed_per_sec),
                        "feed_secs": w.feed.as_secs_f64(),
                        "total_secs": w.total.as_secs_f64(),
                        "written": w.written,
                        "lost": w.lost,
                        "checkpoints": w.checkpoints,
                        "log_bytes": dir_bytes(&state.join("audit")),
                        "cpu": w.cpu,
                        "indexer": indexer.label(),
                        "indexer_cpus": w.indexer_cpus,
                        "index_lag_at_feed_end": w.lag_at_feed_end,
                        "index_lag_after_stop": w.lag_after_stop,
                    }),
                );
            }
            Err(e) => problems.push(format!("audit rate ({key}): {e}")),
        }
        let _ = std::fs::remove_dir_all(&state);
    }
    Value::Object(out)
}

fn audit_query(work: &Path, wanted: u64, rate: &Value, problems: &mut Vec<String>) -> Value {
    // Bytes per record (log and index) from the rate run's log, with a margin for the WAL.
    let per_record = rate["record_await"]["log_bytes"].as_u64().unwrap_or(0) as f64
        / rate["record_await"]["records"].as_f64().unwrap_or(1.0);
    let needed = (wanted as f64 * per_record * 1.3) as u64 + AUDIT_DISK_MARGIN;
    let free = free_bytes(work).unwrap_or(0);
    let mut note = Value::Null;
    let n = if free >= needed {
        wanted
    } else {
        let fits = ((free.saturating_sub(AUDIT_DISK_MARGIN)) as f64 / (per_record * 1.3)) as u64;
        let n = fits / 100_000 * 100_000;
        let msg = format!(
            "audit query: {wanted} records need about {:.1} GB on disk, {:.1} GB free: measured over {n} records instead",
            needed as f64 / 1e9,
            free as f64 / 1e9
        );
        println!("   NOTE: {msg}");
        problems.push(msg.clone());
        note = json!(msg);
        n
    };
    if n == 0 {
        return json!({ "records": 0, "note": note });
    }
    let indexer = IndexerAt::OtherCores;
    println!("== audit query: building a log of {n} records (real writer, record().await, {}; the bench waits for the indexer to cover the log before stopping it; no query before the first below)", indexer.label());
    let state = work.join("query");
    let write = match audit_write(&state, n, true, indexer, true) {
        Ok(w) => w,
        Err(e) => {
            problems.push(format!("audit query: building the log: {e}"));
            return json!(null);
        }
    };
    let dir = state.join("audit");
    let log_bytes = dir_bytes(&dir);
    let index_bytes = ["index.sqlite", "index.sqlite-wal"]
        .iter()
        .map(|f| std::fs::metadata(dir.join(f)).map(|m| m.len()).unwrap_or(0))
        .sum::<u64>();
    println!(
        "   written in {:.1} s ({:.0} records/s, {:.2} GB with the index's {:.2} GB, lost {}); index lag at the end of the feed {} records, caught up {:.1} s later, after stop {}",
        write.feed.as_secs_f64(),
        n as f64 / write.feed.as_secs_f64(),
        log_bytes as f64 / 1e9,
        index_bytes as f64 / 1e9,
        write.lost,
        write.lag_at_feed_end,
        write.catch_up.unwrap_or_default().as_secs_f64(),
        write.lag_after_stop
    );
    let mut runs = Vec::new();
    for label in ["first", "second"] {
        let mut cmd = Command::new(mesh_tests::agent_bin());
        cmd.arg("audit")
            .arg("query")
            .arg(&dir)
            .args([
                "--src",
                AUDIT_QUERY_SRC,
                "--dst",
                AUDIT_QUERY_DST,
                "--verdict",
                "deny",
            ])
            .args(["--output", "json"]);
        let base = work.join(format!("query-{}", runs.len() + 1));
        let t = Instant::now();
        let out = mesh_tests::process::spawn(cmd, &Default::default(), "audit-query", &base)
            .wait_output(AUDIT_QUERY_TIMEOUT);
        let secs = t.elapsed().as_secs_f64();
        let hits = out.stdout.lines().filter(|l| l.starts_with('{')).count();
        println!("   {label:<20} {:>9.1} ms, {hits} hits", secs * 1e3);
        if !out.status.success() {
            problems.push(format!(
                "audit query ({label}) failed: {}: {}",
                out.status,
                out.stderr.lines().last().unwrap_or("")
            ));
        }
        runs.push(json!({ "secs": secs, "hits": hits, "exit": out.status.code() }));
    }
    if runs.iter().any(|r| r["hits"] == 0) {
        problems.push("audit query: the selective filter matched nothing".into());
    }
    json!({
        "records": n,
        "wanted": wanted,
        "note": note,
        "filter": { "src": AUDIT_QUERY_SRC, "dst": AUDIT_QUERY_DST, "verdict": "deny" },
        "build_secs": write.total.as_secs_f64(),
        "feed_secs": write.feed.as_secs_f64(),
        "records_per_sec": finite(n as f64 / write.feed.as_secs_f64()),
        "index_catch_up_secs": write.catch_up.map(|d| d.as_secs_f64()),
        "indexer": indexer.label(),
        "indexer_cpus": write.indexer_cpus,
        "index_lag_at_feed_end": write.lag_at_feed_end,
        "index_lag_after_stop": write.lag_after_stop,
        "log_bytes": log_bytes,
        "index_bytes": index_bytes,
        "first": runs[0],
        "second": runs[1],
    })
}

fn print_audit(v: &Value) {
    if v.is_null() {
        return;
    }
    println!("audit log:");
    let e = &v["audit_emit_ns"];
    println!(
        "  added to a decision's path: emit() p50 {} ns, p99 {} ns, p99.9 {} ns at {}/s (goal: added p99 under 5 µs)",
        e["p50"], e["p99"], e["p999"], e["rate_per_sec"]
    );
    let r = &v["audit_records_per_sec"];
    for (k, what) in [
        ("record_await", "indexer sharing the core"),
        (
            "record_await_indexer_other_cores",
            "indexer on the other core",
        ),
        ("record_await_no_indexer", "no indexer"),
    ] {
        println!(
            "  records/s sustained, one core, record().await, {what:<26} {:>10.0}   (lost {}, index lag at feed end {})",
            r[k]["records_per_sec"].as_f64().unwrap_or(f64::NAN),
            r[k]["lost"],
            r[k]["index_lag_at_feed_end"]
        );
    }
    println!(
        "  records/s sustained, one core, emit(), indexer sharing the core        {:>10.0}   (calls/s {:.0}, lost {})",
        r["emit"]["records_per_sec"].as_f64().unwrap_or(f64::NAN),
        r["emit"]["calls_per_sec"].as_f64().unwrap_or(f64::NAN),
        r["emit"]["lost"]
    );
    let q = &v["audit_query_10m"];
    println!(
        "  query log: {} records/s written, {}; index lag at the end of the feed {} records, caught up {:.1} s later, after stop {}",
        q["records_per_sec"].as_f64().map_or("?".into(), |r| format!("{r:.0}")),
        q["indexer"].as_str().unwrap_or("?"),
        q["index_lag_at_feed_end"],
        q["index_catch_up_secs"].as_f64().unwrap_or(f64::NAN),
        q["index_lag_after_stop"]
    );
    for k in ["first", "second"] {
        println!(
            "  query src+dst+verdict over {} records, {k:<6}  {:>8.1} ms   ({} hits; goal < 1 s)",
            q["records"],
            q[k]["secs"].as_f64().unwrap_or(f64::NAN) * 1e3,
            q[k]["hits"]
        );
    }
}

/// n2's audit records written (`agent_start` included); 0 with `--audit-off`.
const AUDIT_WRITTEN: &str = "mesh_audit_records_total{result=\"written\"}";

/// `audit_overhead`: the HTTP benchmark's `mesh_l7` run (1 KiB POSTs under the L7 policy, every
/// request authorised by n2's agent) with both agents run with the audit log and with
/// `--audit-off`, alternated (the order flips every repetition; agents restarted on each
/// switch, the HTTP policy applied again). Checks that the log records when on and that the
/// agents said `audit log disabled` when off.
fn audit_overhead_phase(
    exe: &Path,
    cluster: &Cluster,
    agents: &mut [Agent],
    durations: Durations,
    args: &Args,
    problems: &mut Vec<String>,
) -> Value {
    println!("== audit overhead: HTTP 1 KiB POSTs under the L7 policy, agents with the audit log vs --audit-off");
    let dir = cluster.write_policy_dir(
        "policy-http-audit",
        &[(
            "http.yaml",
            &http_policy_yaml(
                &principal_of(cluster.pod("client")),
                cluster.pod("direct").ip4(),
            ),
        )],
    );
    let base_args: Vec<Vec<String>> = agents.iter().map(|a| a.spec().extra_args.clone()).collect();
    let mut current: Option<bool> = None;
    let mut runs: Vec<Value> = Vec::new();
    'reps: for rep in 1..=args.reps {
        let order = if rep % 2 == 1 {
            [true, false]
        } else {
            [false, true]
        };
        for on in order {
            if stopping() {
                break 'reps;
            }
            if current != Some(on) {
                for (a, base) in agents.iter_mut().zip(&base_args) {
                    let extra = &mut a.spec_mut().extra_args;
                    *extra = base.clone();
                    if !on {
                        extra.extend(["--audit-off".to_owned(), "true".to_owned()]);
                    }
                    a.restart();
                    let said_off = a.log_lines().iter().any(|v| {
                        v["message"]
                            .as_str()
                            .is_some_and(|m| m.starts_with("audit log disabled"))
                    });
                    if said_off == on {
                        problems.push(format!(
                            "audit overhead: agent {} (audit {}) {} `audit log disabled`",
                            a.spec().node,
                            if on { "on" } else { "off" },
                            if on { "said" } else { "did not say" }
                        ));
                    }
                }
                current = Some(on);
            }
            let bench = Bench {
                exe: exe.to_owned(),
                cluster,
                agent_n1: &agents[0],
                agents,
                server: cluster.pod("server"),
                durations,
                cost: std::cell::RefCell::new(Cost::default()),
                registry: cluster
                    .write_registry_file("policy-registry.yaml", &cluster.registry_entries())
                    .0,
            };
            bench.apply_everywhere(&dir);
            let written_before = cluster.node(1).metric(AUDIT_WRITTEN);
            let run = bench.http_run(rep, HttpConfig::MeshL7);
            let written = if on {
                eventually(Duration::from_secs(5), || {
                    let w = cluster.node(1).metric(AUDIT_WRITTEN);
                    (w > written_before).then_some(w)
                })
                .unwrap_or(written_before)
            } else {
                cluster.node(1).metric(AUDIT_WRITTEN)
            } - written_before;
            let config = if on { "audit_on" } else { "audit_off" };
            println!(
                "   rep {rep}/{} {config:<9} rps={:.1} p50={:.1}µs p99={:.1}µs  (requests authorised by n2: {}, audit records written by n2: {written})",
                args.reps,
                run.values["http_rps"],
                run.values["http_p50_us"],
                run.values["http_p99_us"],
                run.l7_requests,
            );
            let count = |k: &str| run.detail[k].as_u64().unwrap_or(0);
            if count("non_200") > 0 || count("errors") > 0 || run.l7_requests == 0 {
                problems.push(format!(
                    "audit overhead rep {rep} {config}: {} non-200, {} errors, {} requests authorised by n2",
                    count("non_200"),
                    count("errors"),
                    run.l7_requests
                ));
            }
            if on == (written == 0.0) {
                problems.push(format!(
                    "audit overhead rep {rep} {config}: n2 wrote {written} audit records"
                ));
            }
            runs.push(json!({
                "rep": rep,
                "config": config,
                "values": run.values,
                "l7_requests": run.l7_requests,
                "audit_records_written_n2": written,
                "detail": run.detail,
            }));
        }
    }
    // Leave the agents as the rest of the run had them.
    if current == Some(false) {
        for (a, base) in agents.iter_mut().zip(&base_args) {
            a.spec_mut().extra_args = base.clone();
            a.restart();
        }
    }
    let median_of = |config: &str, key: &str| {
        let mut v: Vec<f64> = runs
            .iter()
            .filter(|r| r["config"] == config)
            .filter_map(|r| r["values"][key].as_f64())
            .collect();
        median(&mut v)
    };
    let mut summary = serde_json::Map::new();
    for key in ["http_rps", "http_p50_us", "http_p99_us"] {
        let (on, off) = (median_of("audit_on", key), median_of("audit_off", key));
        summary.insert(
            key.into(),
            json!({ "audit_on": finite(on), "audit_off": finite(off), "added": finite(on - off) }),
        );
    }
    json!({ "summary": summary, "goal_added_p99_us": 5.0, "runs": runs })
}

fn print_audit_overhead(v: &Value) {
    let s = &v["summary"];
    if s.is_null() {
        return;
    }
    println!("audit overhead, HTTP 1 KiB POSTs under the L7 policy (medians):");
    println!(
        "  {:<24} {:>10} {:>10} {:>10}",
        "", "audit on", "audit off", "added"
    );
    for (key, label) in [
        ("http_rps", "requests/s (achieved)"),
        ("http_p50_us", "latency p50 (µs)"),
        ("http_p99_us", "latency p99 (µs)"),
    ] {
        let f = |k: &str| s[key][k].as_f64().unwrap_or(f64::NAN);
        println!(
            "  {label:<24} {:>10.1} {:>10.1} {:>+10.1}",
            f("audit_on"),
            f("audit_off"),
            f("added")
        );
    }
    println!("  (goal: added p99 under 5 µs)");
}

/// Where the audit phases write their logs: beside the JSON (under the target dir).
fn audit_work_dir(out: &Path) -> PathBuf {
    out.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .join("audit-work")
}

/// `--audit-only`: the writer and query figures, `<out>.audit.json`.
fn audit_only_bench(args: &Args) -> ExitCode {
    let mut problems = Vec::new();
    let audit = audit_log_phase(&audit_work_dir(&args.out), args.quick, &mut problems);
    print_audit(&audit);
    for p in &problems {
        println!("PROBLEM: {p}");
    }
    let doc = json!({
        "settings": { "quick": args.quick, "agent_bin": mesh_tests::agent_bin().display().to_string() },
        "host": host_info(),
        "audit": audit,
        "problems": problems,
    });
    write_side_json(
        &args.out.with_extension("audit.json"),
        &doc,
        problems.is_empty(),
    )
}

// ---------------------------------------------------------------------------------------------
// Signed configuration (issue 12): verify + apply of a large bundle on nodes that require it

/// Policies and workloads of the large signed bundle.
const SIGNED_SCALE: usize = 10_000;
/// Groups the policies select (10 policies each) and service accounts they allow: the kernel's
/// L4 table is (policy set × source class), so the shape is what fits one generation.
const SIGNED_GROUPS: usize = 1_000;
const SIGNED_ACCOUNTS: usize = 25;
/// Bundles applied (the first one is the cluster's own state with no policy).
const SIGNED_ROUNDS: u64 = 3;

/// A workload of the large bundle: on node n9 (listed, never started).
fn signed_phantom(i: usize) -> WorkloadEntry {
    let mut w = phantom(i);
    w.service_account = format!("sa-{}", i % SIGNED_ACCOUNTS);
    w.labels = vec![("group".into(), format!("g{}", i % SIGNED_GROUPS))];
    w
}

fn signed_policy(i: usize) -> (String, String) {
    (
        format!("p{i:05}.yaml"),
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: allow-{i}\n  namespace: scale\nspec:\n  selector:\n    matchLabels:\n      group: g{}\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/scale/sa/sa-{}\"]\n    to:\n    - operation:\n        ports: [\"8080\"]\n",
            i % SIGNED_GROUPS,
            i % SIGNED_ACCOUNTS
        ),
    )
}

/// The first log line of `log` past `offset` that `matches`, waited for (bounded).
fn logged_line(
    log: &Path,
    offset: u64,
    timeout: Duration,
    matches: impl Fn(&Value) -> bool,
) -> Option<Value> {
    use std::io::{Seek, SeekFrom};
    eventually(timeout, || {
        if stopping() {
            return Some(None);
        }
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(log) {
            if f.seek(SeekFrom::Start(offset)).is_ok() {
                let _ = f.read_to_string(&mut text);
            }
        }
        text.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| matches(v))
            .map(Some)
    })
    .flatten()
}

fn signed_bench(out: &Path) -> ExitCode {
    println!("== signed configuration: {SIGNED_SCALE} policies and {SIGNED_SCALE} workloads in one bundle, verified and applied on two nodes that require signed configuration");
    let mut problems = Vec::new();
    let cluster = Cluster::builder()
        .nodes(2)
        .add_pod(0, "a1")
        .add_pod(1, "b1")
        .build();
    let k1 = cluster.signer_key("k1");
    cluster.trust_signer(&cluster.authority_signers(), &k1);
    for i in 0..2 {
        cluster.trust_signer(&cluster.node_signers(i), &k1);
    }
    cluster.publish_bundle_file(&k1, 1, &cluster.registry_entries(), cluster.services(), &[]);
    cluster.follow_bundle_afresh(&[]);
    let agents = cluster.start_agents();
    let active =
        |v: u64| (0..2).all(|i| cluster.node(i).metric("mesh_config_active_version") as u64 == v);
    if eventually(Duration::from_secs(60), || active(1).then_some(())).is_none() {
        problems.push("signed: version 1 not applied".into());
    }
    let n9 = NodeEntry {
        name: "n9".into(),
        address: "10.0.0.9".parse().expect("ip"),
        address6: None,
    };
    let mut workloads = cluster.registry_entries();
    workloads.extend((0..SIGNED_SCALE).map(signed_phantom));
    let policies: Vec<(String, String)> = (0..SIGNED_SCALE).map(signed_policy).collect();
    let refs: Vec<(&str, &str)> = policies
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    let mut rounds = Vec::new();
    for version in 2..2 + SIGNED_ROUNDS {
        if stopping() {
            break;
        }
        // One workload more each round: every round is a new version with all of it.
        workloads.push(signed_phantom(SIGNED_SCALE + version as usize));
        let built = Instant::now();
        let bundle = cluster.build_bundle_file_with(
            &k1,
            version,
            &mesh_tests::signing::BundleSpec {
                extra_nodes: std::slice::from_ref(&n9),
                workloads: &workloads,
                services: cluster.services(),
                policies: &refs,
                args: &[],
            },
        );
        let build_secs = built.elapsed().as_secs_f64();
        let bytes = std::fs::metadata(&bundle).map(|m| m.len()).unwrap_or(0);
        let offsets: Vec<u64> = agents
            .iter()
            .map(|a| a.stdout_path().map_or(0, file_len))
            .collect();
        let installed = Instant::now();
        cluster.install_bundle(&bundle);
        let mut per_node = Vec::new();
        for (agent, &offset) in agents.iter().zip(&offsets) {
            let Some(log) = agent.stdout_path() else {
                continue;
            };
            let applied = logged_line(log, offset, Duration::from_secs(120), |v| {
                v["message"] == "state applied" && v["version"].as_u64() == Some(version)
            });
            let policy = logged_line(log, offset, Duration::from_secs(120), |v| {
                v["message"] == "policy applied"
                    && v["policies"].as_u64() == Some(SIGNED_SCALE as u64)
            });
            match (applied, policy) {
                (Some(a), Some(p)) => {
                    let n = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
                    let verify = n(&a, "verify_ms");
                    let state = n(&a, "apply_ms");
                    let policy_ms = n(&p, "apply_ms");
                    let apply = state - verify + policy_ms;
                    per_node.push(json!({
                        "verify_ms": verify,
                        "parse_ms": n(&a, "parse_ms"),
                        "maps_ms": n(&a, "maps_ms"),
                        "state_apply_ms": state,
                        "policy_compile_ms": n(&p, "compile_ms"),
                        "policy_apply_ms": policy_ms,
                        "apply_without_verify_ms": apply,
                        "verify_share_pct": finite(100.0 * verify / apply),
                        "l4_entries": p["l4_entries"],
                    }));
                }
                _ => problems.push(format!("signed v{version}: not applied within 120 s")),
            }
        }
        let end_to_end = installed.elapsed().as_secs_f64();
        rounds.push(json!({
            "version": version,
            "bundle_bytes": bytes,
            "build_and_sign_secs": build_secs,
            "install_to_policy_active_secs": end_to_end,
            "nodes": per_node,
        }));
        // Each round starts from the previous one fully applied.
        if eventually(Duration::from_secs(60), || active(version).then_some(())).is_none() {
            problems.push(format!("signed v{version}: not active on both nodes"));
        }
    }
    drop(agents);
    println!("signed configuration ({SIGNED_SCALE} policies, {SIGNED_SCALE} workloads; per node: verify / apply without it):");
    for r in &rounds {
        let nodes: Vec<String> = r["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|n| {
                format!(
                    "verify {:.0} ms / apply {:.0} ms ({:.1} %; policy compile {:.0} ms)",
                    n["verify_ms"].as_f64().unwrap_or(f64::NAN),
                    n["apply_without_verify_ms"].as_f64().unwrap_or(f64::NAN),
                    n["verify_share_pct"].as_f64().unwrap_or(f64::NAN),
                    n["policy_compile_ms"].as_f64().unwrap_or(f64::NAN)
                )
            })
            .collect();
        println!(
            "  v{} ({:.1} MB): {}; bundle installed → policy active on both: {:.2} s",
            r["version"],
            r["bundle_bytes"].as_f64().unwrap_or(0.0) / 1e6,
            nodes.join(" | "),
            r["install_to_policy_active_secs"]
                .as_f64()
                .unwrap_or(f64::NAN)
        );
    }
    println!("  (goal: verification adds under 10 % to the apply)");
    for p in &problems {
        println!("PROBLEM: {p}");
    }
    let doc = json!({
        "settings": {
            "policies": SIGNED_SCALE, "workloads": SIGNED_SCALE, "groups": SIGNED_GROUPS,
            "service_accounts": SIGNED_ACCOUNTS,
            "agent_bin": mesh_tests::agent_bin().display().to_string(),
        },
        "host": host_info(),
        "rounds": rounds,
        "problems": problems,
    });
    write_side_json(
        &out.with_extension("signed.json"),
        &doc,
        problems.is_empty(),
    )
}

// ---------------------------------------------------------------------------------------------
// The mesh state: propagation of a change, and a state of 10,000 workloads and 1,000 services

/// Changes timed for the propagation figure.
const PROPAGATION_CHANGES: usize = 30;
const STATE_SCALE_WORKLOADS: usize = 10_000;
const STATE_SCALE_SERVICES: usize = 1_000;
/// The bench's own service: the server's one-shot port behind a VIP (connect() to a VIP).
const BENCH_VIP: &str = "10.96.255.1";

/// A workload that never runs: on node `n9` (listed, never started), its cgroup never created.
fn phantom(i: usize) -> WorkloadEntry {
    WorkloadEntry {
        name: format!("w-{i}"),
        namespace: "scale".into(),
        service_account: format!("sa-{}", i % 500),
        node: "n9".into(),
        ips: vec![
            format!("10.{}.{}.{}", 50 + i / 62_500, (i / 250) % 250, 1 + i % 250)
                .parse()
                .expect("ip"),
        ],
        cgroup: None,
        labels: vec![("group".into(), format!("g{}", i % STATE_SCALE_SERVICES))],
        peer_authentication: None,
        extra_lines: Vec::new(),
    }
}

/// What the bench publishes: the cluster's workloads and nodes, node n9, `extra` workloads,
/// and services (the bench's VIP service, and one per group when `groups`).
fn state_text(cluster: &Cluster, extra: &[WorkloadEntry], groups: bool) -> String {
    let mut nodes = cluster.registry_nodes();
    nodes.push(NodeEntry {
        name: "n9".into(),
        address: "10.0.0.9".parse().expect("ip"),
        address6: None,
    });
    let mut workloads = cluster.registry_entries();
    workloads.extend_from_slice(extra);
    let mut services = vec![ServiceEntry {
        name: "bench".into(),
        namespace: "default".into(),
        vips: vec![BENCH_VIP.parse().expect("vip")],
        ports: vec![(ONESHOT_PORT, ONESHOT_PORT)],
        selector: vec![("app".into(), "server".into())],
    }];
    if groups {
        services.extend((0..STATE_SCALE_SERVICES).map(|g| ServiceEntry {
            name: format!("s-{g}"),
            namespace: "scale".into(),
            vips: vec![format!("10.97.{}.{}", g / 250, 1 + g % 250).parse().expect("vip")],
            ports: vec![(80, 8080)],
            selector: vec![("group".into(), format!("g{g}"))],
        }));
    }
    mesh_tests::registry::render_with_services(&nodes, &workloads, &services).text
}

impl Bench<'_> {
    /// Writes `text` as the registry the authority follows; returns when it was written and
    /// the version the authority published for it.
    fn publish(&self, text: &str) -> Option<(SystemTime, u64)> {
        let dir = self.cluster.tmp_dir();
        let before = self.cluster.published_version();
        let tmp = dir.join(".registry.yaml.tmp");
        std::fs::write(&tmp, text).ok()?;
        let at = SystemTime::now();
        std::fs::rename(&tmp, dir.join("registry.yaml")).ok()?;
        let version = eventually(Duration::from_secs(60), || {
            let v = self.cluster.published_version();
            (v > before).then_some(v)
        })?;
        Some((at, version))
    }

    /// For each agent, the time from `since` to its `state applied` line for `version` (the
    /// line's own timestamp).
    fn applied(&self, offsets: &[u64], version: u64, since: SystemTime) -> Vec<Option<Duration>> {
        self.agents
            .iter()
            .zip(offsets)
            .map(|(agent, &offset)| {
                wait_logged(
                    agent.stdout_path()?,
                    offset,
                    since,
                    Duration::from_secs(60),
                    |v| {
                        v["message"] == "state applied"
                            && v["version"].as_u64().is_some_and(|g| g >= version)
                    },
                )
            })
            .collect()
    }

    fn log_offsets(&self) -> Vec<u64> {
        self.agents
            .iter()
            .map(|a| a.stdout_path().map_or(0, file_len))
            .collect()
    }

    /// Publishes `text` and returns (write → applied on every agent, version).
    fn propagate(&self, text: &str) -> Option<(Duration, u64)> {
        let offsets = self.log_offsets();
        let (at, version) = self.publish(text)?;
        let each = self.applied(&offsets, version, at);
        let all: Option<Vec<Duration>> = each.into_iter().collect();
        Some((all?.into_iter().max()?, version))
    }

    fn connect_to(&self, pod: &Pod, to: SocketAddr) -> Value {
        let mut cmd = Command::new(&self.exe);
        cmd.arg("connect")
            .arg("--to")
            .arg(to.to_string())
            .arg("--count")
            .arg(self.durations.connects.to_string());
        self.run_json(pod, cmd, "connect", Duration::from_secs(60))
    }
}

/// Kernel memory of the node's pinned maps (`bytes_memlock` summed, `bpftool map show`).
fn map_memory_kib(pin_dir: &Path) -> f64 {
    let ids: Vec<u64> = std::fs::read_dir(pin_dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        // The pinned links (`link_*`) are not maps.
        .filter(|e| !e.file_name().to_string_lossy().starts_with("link_"))
        .filter_map(|e| {
            let v =
                mesh_tests::bpftool::json(&["map", "show", "pinned", &e.path().to_string_lossy()]);
            v.get("id")?.as_u64()
        })
        .collect();
    let maps = mesh_tests::bpftool::json(&["map", "show"]);
    maps.as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["id"].as_u64().is_some_and(|id| ids.contains(&id)))
        .filter_map(|m| m["bytes_memlock"].as_u64())
        .sum::<u64>() as f64
        / 1024.0
}

fn state_phase(bench: &Bench<'_>, args: &Args, problems: &mut Vec<String>) -> Value {
    let cluster = bench.cluster;
    let changes = if args.quick { 10 } else { PROPAGATION_CHANGES };
    println!("== mesh state: propagation of {changes} changes (registry file → applied on both agents), then {STATE_SCALE_WORKLOADS} workloads and {STATE_SCALE_SERVICES} services");
    // Small state: one workload added and removed, alternately.
    let mut small_ms = Vec::new();
    for i in 0..changes {
        if stopping() {
            return json!(null);
        }
        let extra: Vec<WorkloadEntry> = if i % 2 == 0 { vec![phantom(0)] } else { vec![] };
        match bench.propagate(&state_text(cluster, &extra, false)) {
            Some((d, _)) => small_ms.push(ms(d)),
            None => problems.push(format!(
                "state change {i}: not applied on every agent within 60 s"
            )),
        }
    }
    let rss_before: Vec<f64> = bench.agents.iter().map(|a| rss_mib(a.pid())).collect();
    let maps_before = map_memory_kib(cluster.node(0).pin_dir());
    let client = cluster.pod("client");
    let pod_connect = bench.connect_to(client, bench.server.addr4(ONESHOT_PORT));
    let vip: SocketAddr = SocketAddr::new(BENCH_VIP.parse().expect("vip"), ONESHOT_PORT);
    let vip_connect_small = bench.connect_to(client, vip);

    // Large state: 10,000 workloads, 1,000 services.
    let many: Vec<WorkloadEntry> = (0..STATE_SCALE_WORKLOADS).map(phantom).collect();
    let large_text = state_text(cluster, &many, true);
    let large = bench.propagate(&large_text);
    if large.is_none() {
        problems.push("the 10,000-workload state was not applied within 60 s".into());
    }
    let mut one_change_ms = Vec::new();
    for i in 0..5 {
        let mut more = many.clone();
        if i % 2 == 0 {
            more.push(phantom(STATE_SCALE_WORKLOADS));
        }
        match bench.propagate(&state_text(cluster, &more, true)) {
            Some((d, _)) => one_change_ms.push(ms(d)),
            None => problems.push(format!("large state change {i}: not applied within 60 s")),
        }
    }
    let rss_large: Vec<f64> = bench.agents.iter().map(|a| rss_mib(a.pid())).collect();
    let maps_large = map_memory_kib(cluster.node(0).pin_dir());
    let pod_connect_large = bench.connect_to(client, bench.server.addr4(ONESHOT_PORT));
    let vip_connect_large = bench.connect_to(client, vip);
    // Back to the cluster's own state.
    if bench.propagate(&state_text(cluster, &[], false)).is_none() {
        problems.push("restoring the small state: not applied within 60 s".into());
    }
    let pct = |v: &[f64], p: f64| {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        if s.is_empty() {
            f64::NAN
        } else {
            s[((s.len() - 1) as f64 * p).round() as usize]
        }
    };
    let v = json!({
        "propagation_ms": {"p50": finite(pct(&small_ms, 0.5)), "p99": finite(pct(&small_ms, 0.99)), "max": finite(pct(&small_ms, 1.0)), "runs": small_ms},
        "large": {
            "workloads": STATE_SCALE_WORKLOADS, "services": STATE_SCALE_SERVICES,
            "first_apply_ms": large.map(|(d, _)| ms(d)),
            "one_change_ms": {"p50": finite(pct(&one_change_ms, 0.5)), "max": finite(pct(&one_change_ms, 1.0)), "runs": one_change_ms},
            "agent_rss_mib": rss_large, "map_memory_kib_n1": maps_large,
        },
        "small": {"agent_rss_mib": rss_before, "map_memory_kib_n1": maps_before},
        "connect_us": {
            "pod_ip": {"p50": pod_connect["p50_us"], "p99": pod_connect["p99_us"]},
            "service_vip": {"p50": vip_connect_small["p50_us"], "p99": vip_connect_small["p99_us"]},
            "pod_ip_large_state": {"p50": pod_connect_large["p50_us"], "p99": pod_connect_large["p99_us"]},
            "service_vip_large_state": {"p50": vip_connect_large["p50_us"], "p99": vip_connect_large["p99_us"]},
        },
    });
    for c in [
        &pod_connect,
        &vip_connect_small,
        &pod_connect_large,
        &vip_connect_large,
    ] {
        if c["errors"].as_u64().unwrap_or(0) > 0 {
            problems.push(format!(
                "state phase connect: {} errors (first: {})",
                c["errors"], c["first_error"]
            ));
        }
    }
    v
}

fn print_state(v: &Value) {
    if v.is_null() {
        return;
    }
    let f = |x: &Value| x.as_f64().map_or("-".into(), |x| format!("{x:.1}"));
    println!("mesh state (registry file at the authority → `state applied` on both agents):");
    println!(
        "  propagation of one change, small state   p50 {} ms  p99 {} ms  (goal p99 ≤ 250 ms)",
        f(&v["propagation_ms"]["p50"]),
        f(&v["propagation_ms"]["p99"])
    );
    println!(
        "  {} workloads + {} services: first apply {} ms; one change p50 {} ms (max {} ms)",
        v["large"]["workloads"],
        v["large"]["services"],
        f(&v["large"]["first_apply_ms"]),
        f(&v["large"]["one_change_ms"]["p50"]),
        f(&v["large"]["one_change_ms"]["max"])
    );
    let mib = |x: &Value| {
        x.as_array()
            .into_iter()
            .flatten()
            .map(f)
            .collect::<Vec<_>>()
            .join(" / ")
    };
    println!(
        "  agent RSS (n1 / n2): small {} MiB, large {} MiB; n1 map memory: small {} KiB, large {} KiB",
        mib(&v["small"]["agent_rss_mib"]),
        mib(&v["large"]["agent_rss_mib"]),
        f(&v["small"]["map_memory_kib_n1"]),
        f(&v["large"]["map_memory_kib_n1"])
    );
    for (k, label) in [
        ("pod_ip", "connect() to a pod IP"),
        ("service_vip", "connect() to a service VIP"),
        ("pod_ip_large_state", "connect() to a pod IP, large state"),
        (
            "service_vip_large_state",
            "connect() to a service VIP, large state",
        ),
    ] {
        println!(
            "  {label:<42} p50 {} µs  p99 {} µs",
            f(&v["connect_us"][k]["p50"]),
            f(&v["connect_us"][k]["p99"])
        );
    }
    println!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_timestamps_parse() {
        let t = parse_utc_timestamp("2026-11-23T04:31:02.123456Z").expect("parses");
        let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap();
        assert_eq!(d.as_secs(), 1_795_408_262);
        assert_eq!(d.subsec_micros(), 123_456);
        let epoch = parse_utc_timestamp("1970-01-01T00:00:00Z").unwrap();
        assert_eq!(epoch, SystemTime::UNIX_EPOCH);
        let leap = parse_utc_timestamp("2024-02-29T12:00:00.5Z").unwrap();
        assert_eq!(
            leap.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_millis(),
            1_709_208_000_500
        );
        assert!(parse_utc_timestamp("2026-11-23 04:31:02").is_none());
    }

    #[test]
    fn scale_policies_are_counted() {
        let yaml = scale_policy_yaml(10, "cluster.local/ns/default/sa/sa-client");
        assert_eq!(yaml.matches("kind: AuthorizationPolicy").count(), 10);
        assert!(yaml.contains("name: bench-client"));
        assert!(yaml.contains("name: filler-00009"));
    }
}
