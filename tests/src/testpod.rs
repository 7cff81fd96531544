//! Driving `mesh-testpod` (src/bin/mesh-testpod.rs) from the harness: servers
//! that say who they are, clients that report what answered.

use std::{net::SocketAddr, time::Duration};

use serde::Deserialize;
use serde_json::Value;

use crate::process::{Output, Proc};

/// Finds the `mesh-testpod` binary: `$MESH_TESTPOD_BIN`, else next to the
/// running executable or one directory up (`target/debug/deps/…` for tests).
/// Integration tests pass `env!("CARGO_BIN_EXE_mesh-testpod")` instead.
pub fn testpod_bin() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("MESH_TESTPOD_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
    let mut dir = exe.parent().map(std::path::Path::to_path_buf);
    for _ in 0..2 {
        let Some(d) = dir else { break };
        let candidate = d.join("mesh-testpod");
        if candidate.is_file() {
            return candidate;
        }
        dir = d.parent().map(std::path::Path::to_path_buf);
    }
    panic!(
        "mesh-testpod not found next to {} (build it with `cargo build -p mesh-tests --bins` or set MESH_TESTPOD_BIN)",
        exe.display()
    )
}

/// What a client process should do: `count` connections to `connect`, at
/// most `concurrency` at a time, each sending `send` and expecting it back.
#[derive(Clone, Debug)]
pub struct ClientRequest {
    pub connect: SocketAddr,
    pub send: String,
    pub count: usize,
    pub concurrency: usize,
    /// Per-connection I/O timeout inside the client.
    pub io_timeout: Duration,
    /// Pause of each worker between two of its connections (traffic spread over time).
    pub interval: Duration,
}

impl ClientRequest {
    pub fn new(connect: SocketAddr) -> Self {
        ClientRequest {
            connect,
            send: "ping through the mesh".into(),
            count: 1,
            concurrency: 1,
            io_timeout: Duration::from_secs(5),
            interval: Duration::ZERO,
        }
    }

    /// Each worker pauses this long between two of its connections.
    pub fn interval(mut self, pause: Duration) -> Self {
        self.interval = pause;
        self
    }

    pub fn send(mut self, text: &str) -> Self {
        self.send = text.into();
        self
    }

    /// The client's connect and per-read/write timeout (short for
    /// connections that are expected to fail).
    pub fn io_timeout(mut self, t: Duration) -> Self {
        self.io_timeout = t;
        self
    }

    pub fn count(mut self, n: usize) -> Self {
        self.count = n;
        self
    }

    pub fn concurrency(mut self, c: usize) -> Self {
        self.concurrency = c;
        self
    }

    pub(crate) fn args(&self) -> Vec<String> {
        vec![
            "client".into(),
            "--connect".into(),
            self.connect.to_string(),
            "--send".into(),
            self.send.clone(),
            "--count".into(),
            self.count.to_string(),
            "--concurrency".into(),
            self.concurrency.to_string(),
            "--timeout-ms".into(),
            self.io_timeout.as_millis().to_string(),
            "--interval-ms".into(),
            self.interval.as_millis().to_string(),
        ]
    }

    /// How long the whole client process may take.
    pub(crate) fn deadline(&self) -> Duration {
        let rounds = self.count.div_ceil(self.concurrency.max(1)) as u32;
        (self.io_timeout * 3 + self.interval) * rounds.max(1) + Duration::from_secs(5)
    }
}

/// One connection's outcome, as the client prints it (one JSON line each).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct ClientResult {
    /// The address the client connected to (the original destination).
    pub connect: String,
    /// The client socket's local address (matches a flow record's `src_addr`).
    #[serde(default)]
    pub local: Option<String>,
    /// The server's first line: `<name> <local_addr>`.
    pub hello: Option<String>,
    pub echo_ok: bool,
    pub error: Option<String>,
    /// How long `connect()` took (success or failure), in microseconds.
    #[serde(default)]
    pub connect_us: Option<u64>,
}

impl ClientResult {
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local.as_deref()?.parse().ok()
    }

    pub fn connect_addr(&self) -> Option<SocketAddr> {
        self.connect.parse().ok()
    }

    /// The name in the hello line.
    pub fn hello_name(&self) -> Option<&str> {
        self.hello.as_deref()?.split_once(' ').map(|(n, _)| n)
    }

    /// The server-side local address in the hello line: where the connection
    /// really arrived.
    pub fn hello_addr(&self) -> Option<SocketAddr> {
        self.hello.as_deref()?.split_once(' ')?.1.parse().ok()
    }
}

/// A finished client process.
#[derive(Clone, Debug)]
pub struct ClientRun {
    pub label: String,
    pub request: ClientRequest,
    pub output: Output,
    pub results: Vec<ClientResult>,
}

impl ClientRun {
    pub(crate) fn from_output(label: String, request: ClientRequest, output: Output) -> Self {
        let results = output
            .stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| {
                    panic!(
                        "{label}: unparsable client line ({e}): {l}\nstderr: {}",
                        output.stderr
                    )
                })
            })
            .collect();
        ClientRun {
            label,
            request,
            output,
            results,
        }
    }

    pub fn success(&self) -> bool {
        self.output.status.success()
            && self.results.len() == self.request.count
            && self.results.iter().all(|r| r.echo_ok && r.error.is_none())
    }

    /// Panics (with everything the client printed) unless every connection
    /// succeeded and echoed; returns the results.
    #[track_caller]
    pub fn expect_ok(&self) -> &[ClientResult] {
        if !self.success() {
            panic!(
                "{} → {}: client failed ({}), {} of {} results\nstdout:\n{}\nstderr:\n{}",
                self.label,
                self.request.connect,
                self.output.status,
                self.results.len(),
                self.request.count,
                self.output.stdout,
                self.output.stderr
            );
        }
        &self.results
    }

    /// The only result of a one-connection run, which must have succeeded.
    #[track_caller]
    pub fn single(&self) -> &ClientResult {
        let r = self.expect_ok();
        assert_eq!(r.len(), 1, "{}: expected one connection", self.label);
        &r[0]
    }
}

/// A client process still running.
#[derive(Debug)]
pub struct ClientProc {
    pub(crate) proc: Proc,
    pub(crate) label: String,
    pub(crate) request: ClientRequest,
}

impl ClientProc {
    /// Whether the client is still running.
    pub fn is_running(&mut self) -> bool {
        self.proc.is_running()
    }

    /// The connections reported so far (one JSON line each, as they finish).
    pub fn results_so_far(&self) -> Vec<ClientResult> {
        self.proc
            .stdout_lines()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits (bounded by `timeout`, panicking past it) until the client has reported `n`
    /// connections: its traffic is flowing.
    #[track_caller]
    pub fn wait_results(&self, n: usize, timeout: std::time::Duration) {
        crate::poll::wait_for(timeout, &format!("{n} results of {}", self.label), || {
            (self.results_so_far().len() >= n).then_some(())
        });
    }

    /// Waits (bounded by the request's own deadline) for the client to finish.
    #[track_caller]
    pub fn wait(self) -> ClientRun {
        let deadline = self.request.deadline();
        let output = self.proc.wait_output(deadline);
        ClientRun::from_output(self.label, self.request, output)
    }
}

/// A `mesh-testpod hold` process: one connection that exchanged a line and is held open until
/// the peer closes it (or the hold limit passes). Killed on drop.
#[derive(Debug)]
pub struct HeldConnection {
    pub(crate) proc: Proc,
    pub(crate) connect: SocketAddr,
}

impl HeldConnection {
    pub fn connect_addr(&self) -> SocketAddr {
        self.connect
    }

    pub fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }

    /// The `established` event (`local`, `hello`), once the line was exchanged.
    pub fn established(&self) -> Option<Value> {
        self.event("established")
    }

    /// The `closed` event (`how`: `eof` or `error: …`, `held_ms`), once the peer closed.
    pub fn closed(&self) -> Option<Value> {
        self.event("closed")
    }

    /// The `failed` event, if the connection could not be made or the line not exchanged.
    pub fn failed(&self) -> Option<Value> {
        self.event("failed")
    }

    fn event(&self, kind: &str) -> Option<Value> {
        self.proc
            .stdout_lines()
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v.get("event").and_then(Value::as_str) == Some(kind))
    }
}

/// A `mesh-testpod hold-many` process: many connections, each of which exchanged a line, held
/// open until [`HeldMany::close`] (SIGTERM: the kernel closes them all) or drop.
#[derive(Debug)]
pub struct HeldMany {
    pub(crate) proc: Proc,
}

/// What `hold-many` reported once every connection was tried.
#[derive(Clone, Debug, Deserialize)]
pub struct HoldSummary {
    /// Connections that exchanged their line and are held.
    pub ok: usize,
    pub failed: usize,
    pub elapsed_ms: u64,
    /// Longest time from a failed connection's start to its failure.
    pub max_failure_ms: u64,
    /// Failure kinds (`reset`, `eof`, `timeout`, …) and their counts.
    pub errors: std::collections::BTreeMap<String, u64>,
}

impl HeldMany {
    /// Waits (at most `timeout`) for the summary line; panics if the process exits first.
    #[track_caller]
    pub fn wait_established(&mut self, timeout: Duration) -> HoldSummary {
        let found = crate::poll::eventually(timeout, || {
            let line = self
                .proc
                .stdout_lines()
                .into_iter()
                .filter_map(|l| serde_json::from_str::<Value>(&l).ok())
                .find(|v| v.get("event").and_then(Value::as_str) == Some("established"));
            match line {
                Some(v) => Some(Ok(v)),
                None if !self.proc.is_running() => Some(Err(())),
                None => None,
            }
        });
        match found {
            Some(Ok(v)) => serde_json::from_value(v.clone())
                .unwrap_or_else(|e| panic!("hold-many summary {v}: {e}")),
            Some(Err(())) => panic!(
                "hold-many exited before reporting\nstderr:\n{}",
                self.proc.stderr()
            ),
            None => panic!("hold-many reported nothing within {timeout:?}"),
        }
    }

    /// Closes every connection (the process ends; the kernel sends the FINs).
    pub fn close(&mut self) {
        self.proc.terminate(Duration::from_secs(5));
    }
}

/// A connection a server accepted: its local address and the peer it saw.
/// A connection the mesh did not redirect has the client's own address as peer.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Accepted {
    pub local: String,
    pub peer: String,
}

impl Accepted {
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer.parse().ok()
    }
}

/// A running `mesh-testpod serve`; stopped on drop.
#[derive(Debug)]
pub struct Server {
    pub(crate) proc: Proc,
    pub(crate) listens: Vec<SocketAddr>,
}

impl Server {
    pub fn listens(&self) -> &[SocketAddr] {
        &self.listens
    }

    pub fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> Vec<Accepted> {
        self.events("accepted")
            .into_iter()
            .filter_map(|v| serde_json::from_value(v).ok())
            .collect()
    }

    /// The connection accepted from the client address `client`, if any.
    pub fn accepted_from(&self, client: SocketAddr) -> Option<Accepted> {
        self.accepted()
            .into_iter()
            .find(|a| a.peer_addr() == Some(client))
    }

    pub(crate) fn events(&self, kind: &str) -> Vec<Value> {
        self.proc
            .stdout_lines()
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v.get("event").and_then(Value::as_str) == Some(kind))
            .collect()
    }
}

/// One HTTP response as a `mesh-testpod http1|h2c` client printed it.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct HttpResponse {
    /// The request it answers (position in the request list).
    pub index: usize,
    #[serde(default)]
    pub status: Option<u16>,
    #[serde(default)]
    pub body: Option<String>,
    /// The `connection` header (HTTP/1.1).
    #[serde(default)]
    pub connection: Option<String>,
    /// The stream failed (h2c).
    #[serde(default)]
    pub error: Option<String>,
}

impl HttpResponse {
    /// `403` with the agent's denial body.
    pub fn is_rbac_denied(&self) -> bool {
        self.status == Some(403) && self.body.as_deref() == Some("RBAC: access denied")
    }
}

/// A finished `mesh-testpod http1|h2c|raw` run: its responses and its `done` line.
#[derive(Clone, Debug)]
pub struct HttpRun {
    pub label: String,
    pub output: Output,
    pub responses: Vec<HttpResponse>,
    /// `raw` only: `{"how": "eof"|"reset"|"open", "received"}`.
    pub raw: Option<Value>,
    /// The connection failed (`connect: …`) or a response did not come (`response N: …`).
    pub error: Option<String>,
    /// The server kept the connection open after the last response (`raw`: never closed it).
    pub open: bool,
    /// How long `connect()` took, in microseconds.
    pub connect_us: Option<u64>,
}

impl HttpRun {
    pub(crate) fn from_output(label: String, output: Output) -> Self {
        let mut run = HttpRun {
            label,
            responses: Vec::new(),
            raw: None,
            error: None,
            open: false,
            connect_us: None,
            output,
        };
        let mut done = false;
        for line in run.output.stdout.lines().filter(|l| !l.trim().is_empty()) {
            let v: Value = serde_json::from_str(line).unwrap_or_else(|e| {
                panic!(
                    "{}: unparsable line ({e}): {line}\nstderr: {}",
                    run.label, run.output.stderr
                )
            });
            match v.get("event").and_then(Value::as_str) {
                Some("done") => {
                    done = true;
                    run.error = v["error"].as_str().map(str::to_owned);
                    run.open = v["open"].as_bool().unwrap_or(false);
                    run.connect_us = v["connect_us"].as_u64();
                }
                Some("raw") => run.raw = Some(v),
                _ => run.responses.push(
                    serde_json::from_value(v)
                        .unwrap_or_else(|e| panic!("{}: not a response ({e}): {line}", run.label)),
                ),
            }
        }
        assert!(
            done,
            "{}: the client printed no `done` line ({})\nstdout:\n{}\nstderr:\n{}",
            run.label, run.output.status, run.output.stdout, run.output.stderr
        );
        run
    }

    /// The response to request `index`; panics (with the whole run) if there is none.
    #[track_caller]
    pub fn response(&self, index: usize) -> &HttpResponse {
        self.responses
            .iter()
            .find(|r| r.index == index)
            .unwrap_or_else(|| panic!("{}: no response to request {index}: {self:?}", self.label))
    }

    /// `(status, body)` of every response, in request order.
    pub fn statuses(&self) -> Vec<(u16, String)> {
        let mut rs = self.responses.clone();
        rs.sort_by_key(|r| r.index);
        rs.iter()
            .map(|r| (r.status.unwrap_or(0), r.body.clone().unwrap_or_default()))
            .collect()
    }
}

impl Server {
    /// The requests an `http-serve` server received:
    /// `{"proto","peer","method","path","host","body_len"}`.
    pub fn http_requests(&self) -> Vec<Value> {
        self.events("request")
    }
}
