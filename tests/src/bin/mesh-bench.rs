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
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use mesh_tests::{eventually, require_privileges, Agent, Cluster, Host, Pod, Proc};
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
}

const ECHO_PORT: u16 = 7001;
const ONESHOT_PORT: u16 = 7002;
const IPERF_PORT: u16 = 5201;
/// Connect and I/O timeout of the pod clients.
const IO_TIMEOUT: Duration = Duration::from_secs(3);
/// Round trips in the first part of an `rr` run are warm-up, not counted.
const RR_WARMUP: Duration = Duration::from_millis(200);

fn main() -> ExitCode {
    let args = Args::parse();
    match args.pod_cmd {
        Some(PodCmd::Serve { echo, oneshot }) => serve(echo, oneshot),
        Some(PodCmd::Rr { to, size, secs }) => rr_client(to, size, Duration::from_secs_f64(secs)),
        Some(PodCmd::Cps { to, clients, secs }) => {
            cps_client(to, clients.max(1), Duration::from_secs_f64(secs))
        }
        None => {
            if args.reps < 3 {
                eprintln!("mesh-bench: --reps must be at least 3");
                return ExitCode::from(2);
            }
            install_signal_handlers();
            require_privileges();
            orchestrate(&args)
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

struct Durations {
    throughput: u64,
    rr: f64,
    cps: f64,
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
        }
    } else {
        Durations {
            throughput: 10,
            rr: 5.0,
            cps: 5.0,
        }
    };

    println!("== mesh-bench: building the cluster (2 nodes; n1: client [enrolled], direct [not enrolled]; n2: server, peer)");
    let cluster = Cluster::builder()
        .nodes(2)
        .add_pod(0, "client")
        .add_unregistered_pod(0, "direct")
        .add_pod(1, "server")
        .add_pod(1, "peer")
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
    if stopping() {
        println!("== interrupted: tearing down without a summary");
        return ExitCode::from(130);
    }

    let summary = summarize(&runs);
    print_table(&summary, args, &bench.durations);
    let cost = bench.cost.borrow();
    let per_gb = cost.throughput_cpu_secs / cost.throughput_gb.max(f64::MIN_POSITIVE);
    let per_kconn = cost.cps_cpu_secs / (cost.cps_connections / 1000.0).max(f64::MIN_POSITIVE);
    let rss: Vec<f64> = agents.iter().filter_map(Agent::pid).map(peak_rss_mib).collect();
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
        rss.iter().map(|r| format!("{r:.1}")).collect::<Vec<_>>().join(" / ")
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
            "throughput_secs": bench.durations.throughput,
            "rr_secs": bench.durations.rr,
            "rr_size_bytes": 1024,
            "cps_secs": bench.durations.cps,
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
    for (proc, ready) in [
        (&mut bench_server, "\"ready\""),
        (&mut iperf_server, "Server listening"),
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
    vec![bench_server, iperf_server]
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
        let cpu = || -> f64 { self.agents.iter().filter_map(Agent::pid).map(cpu_secs).sum() };
        let cpu_before = cpu();
        let (values, detail, expect_flows) = match test {
            Test::Throughput => self.throughput(pod),
            Test::Rr => self.rr(pod),
            Test::Cps1 => self.cps(pod, 1, "conn_per_s_1"),
            Test::Cps8 => self.cps(pod, 8, "conn_per_s_8"),
        };
        // Flow records are written when connections end: wait (bounded) for
        // the mesh ones; give direct runs a moment to show any they made.
        let agent_flows = match config {
            Config::Mesh => eventually(Duration::from_secs(5), || {
                let n = self.agent_n1.flows().len() - before;
                (n >= expect_flows).then_some(n)
            })
            .unwrap_or_else(|| self.agent_n1.flows().len() - before),
            Config::Direct => {
                std::thread::sleep(Duration::from_millis(300));
                self.agent_n1.flows().len() - before
            }
        };
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
                    cost.cps_connections += values.values().copied().sum::<f64>() * self.durations.cps;
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

/// `{metric: {direct: {median, runs}, mesh: {median, runs}, ratio_mesh_over_direct}}`.
fn summarize(runs: &[Run]) -> Value {
    let mut out = serde_json::Map::new();
    for m in &METRICS {
        let mut entry = serde_json::Map::new();
        let mut medians = BTreeMap::new();
        for config in [Config::Direct, Config::Mesh] {
            let mut vals: Vec<f64> = runs
                .iter()
                .filter(|r| r.config == config)
                .filter_map(|r| r.values.get(m.key).copied())
                .collect();
            let all = vals.clone();
            let med = median(&mut vals);
            medians.insert(config, med);
            entry.insert(
                config.name().into(),
                json!({"median": finite(med), "runs": all}),
            );
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
    threads.push(std::thread::spawn(move || loop {
        match echo_l.accept() {
            Ok((s, _)) => {
                std::thread::spawn(move || echo_conn(s));
            }
            Err(e) => {
                eprintln!("mesh-bench serve: accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }));
    // Short connections: a few threads accept and answer inline.
    for _ in 0..8 {
        let l = oneshot_l.try_clone().expect("cloning the listener");
        threads.push(std::thread::spawn(move || loop {
            match l.accept() {
                Ok((s, _)) => oneshot_conn(s),
                Err(e) => {
                    eprintln!("mesh-bench serve: accept: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
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
    let mut s = TcpStream::connect_timeout(&to, IO_TIMEOUT)?;
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

fn cps_client(to: SocketAddr, clients: usize, secs: Duration) -> ExitCode {
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let first_error: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let barrier = Arc::new(Barrier::new(clients + 1));
    let mut threads = Vec::new();
    for _ in 0..clients {
        let (ok, errors, first_error, barrier) = (
            ok.clone(),
            errors.clone(),
            first_error.clone(),
            barrier.clone(),
        );
        threads.push(std::thread::spawn(move || {
            barrier.wait();
            let end = Instant::now() + secs;
            while Instant::now() < end {
                match one_connection(to) {
                    Ok(()) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        first_error
                            .lock()
                            .unwrap()
                            .get_or_insert_with(|| e.to_string());
                        std::thread::sleep(Duration::from_millis(1));
                    }
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
    let n = ok.load(Ordering::Relaxed);
    let e = errors.load(Ordering::Relaxed);
    emit(&json!({
        "clients": clients,
        "connections": n,
        "errors": e,
        "first_error": *first_error.lock().unwrap(),
        "secs": elapsed,
        "per_sec": n as f64 / elapsed,
    }));
    if n == 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
