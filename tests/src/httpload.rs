//! A small HTTP/1.1 server, one-request client and fixed-rate load generator for the pod side
//! of the benchmark and the demo (they run inside pods, spawned by those binaries).
//!
//! Deliberately narrow: bodies are framed by `Content-Length` only (a chunked message is
//! refused), heads are at most [`MAX_HEAD`] bytes, bodies at most [`MAX_BODY`], and every
//! socket has read and write timeouts, so nothing here can grow or block without bound.
//! Connections are kept alive unless either side says `connection: close`.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use serde_json::{json, Value};

/// Longest request or response head accepted.
pub const MAX_HEAD: usize = 16 * 1024;
/// Largest body accepted.
pub const MAX_BODY: usize = 1024 * 1024;
/// Socket timeouts of the server's connections.
const SERVER_IO_TIMEOUT: Duration = Duration::from_secs(30);

/// A parsed message head: the start line's three parts and the framing headers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Head {
    /// Request: method, target, version. Response: version, status, reason.
    pub start: [String; 3],
    pub content_length: usize,
    /// `connection: close` was sent (or HTTP/1.0 without keep-alive).
    pub close: bool,
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Reads one head. `Ok(None)`: the peer closed cleanly before sending anything.
pub fn read_head(r: &mut impl BufRead) -> io::Result<Option<Head>> {
    let mut total = 0usize;
    let mut lines: Vec<String> = Vec::new();
    loop {
        let mut line = Vec::new();
        let n = r
            .by_ref()
            .take((MAX_HEAD - total + 1) as u64)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            if lines.is_empty() && total == 0 {
                return Ok(None);
            }
            return Err(bad("connection closed inside a head"));
        }
        total += n;
        if total > MAX_HEAD {
            return Err(bad("head too long"));
        }
        if !line.ends_with(b"\n") {
            return Err(bad("connection closed inside a head"));
        }
        let text = String::from_utf8(line).map_err(|_| bad("head is not UTF-8"))?;
        let text = text.trim_end_matches(['\r', '\n']);
        if text.is_empty() {
            break;
        }
        lines.push(text.to_owned());
    }
    let mut parts = lines[0].splitn(3, ' ');
    let start = [(); 3].map(|_| parts.next().unwrap_or("").to_owned());
    if start[0].is_empty() || start[1].is_empty() {
        return Err(bad(format!("bad start line {:?}", lines[0])));
    }
    let mut head = Head {
        close: start[0] == "HTTP/1.0" || start[2] == "HTTP/1.0",
        start,
        content_length: 0,
    };
    for h in &lines[1..] {
        let (name, value) = h.split_once(':').ok_or_else(|| bad("header without ':'"))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            head.content_length = value.parse().map_err(|_| bad("bad content-length"))?;
            if head.content_length > MAX_BODY {
                return Err(bad("body too large"));
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(bad("transfer-encoding is not supported here"));
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    head.close = true;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    head.close = false;
                }
            }
        }
    }
    Ok(Some(head))
}

fn read_body(r: &mut impl Read, len: usize) -> io::Result<Vec<u8>> {
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(body)
}

/// Serves HTTP on every address of `listens` until the process ends: every request is
/// answered `200` with the body `"<name> <METHOD> <target>\n"`, padded with `.` to
/// `resp_size` bytes when that is longer. Emits `{"event":"listening","local":…}` per
/// listener through `emit`. Returns only if a listener cannot be bound.
pub fn serve(listens: &[SocketAddr], name: &str, resp_size: usize, emit: fn(&Value)) -> io::Error {
    let mut listeners = Vec::new();
    for addr in listens {
        match TcpListener::bind(addr) {
            Ok(l) => listeners.push(l),
            Err(e) => return io::Error::new(e.kind(), format!("bind {addr}: {e}")),
        }
    }
    let mut threads = Vec::new();
    for l in listeners {
        let local = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
        emit(&json!({"event": "listening", "local": local}));
        let name = name.to_owned();
        threads.push(std::thread::spawn(move || {
            crate::net::accept_forever(&l, "http-serve", |s, _| {
                let name = name.clone();
                std::thread::spawn(move || {
                    let _ = serve_conn(s, &name, resp_size);
                });
            })
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    io::Error::other("every listener stopped")
}

fn serve_conn(s: TcpStream, name: &str, resp_size: usize) -> io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(SERVER_IO_TIMEOUT))?;
    s.set_write_timeout(Some(SERVER_IO_TIMEOUT))?;
    let mut reader = BufReader::new(s.try_clone()?);
    let mut writer = s;
    loop {
        let head = match read_head(&mut reader) {
            Ok(Some(h)) => h,
            Ok(None) => break,
            Err(e) => {
                let _ = writer.write_all(
                    b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                );
                return Err(e);
            }
        };
        read_body(&mut reader, head.content_length)?;
        let mut body = format!("{name} {} {}\n", head.start[0], head.start[1]).into_bytes();
        if body.len() < resp_size {
            body.resize(resp_size, b'.');
        }
        let mut msg = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{}\r\n",
            body.len(),
            if head.close {
                "connection: close\r\n"
            } else {
                ""
            }
        )
        .into_bytes();
        msg.extend_from_slice(&body);
        writer.write_all(&msg)?;
        if head.close {
            break;
        }
    }
    let _ = writer.shutdown(Shutdown::Write);
    Ok(())
}

/// The request bytes: `method target` with a `Host`, and a body of `body_size` bytes.
pub fn request_bytes(
    method: &str,
    target: &str,
    host: &str,
    body_size: usize,
    close: bool,
) -> Vec<u8> {
    let mut req = format!(
        "{method} {target} HTTP/1.1\r\nhost: {host}\r\nuser-agent: mesh-tests\r\ncontent-length: {body_size}\r\n{}\r\n",
        if close { "connection: close\r\n" } else { "" }
    )
    .into_bytes();
    req.resize(req.len() + body_size, b'x');
    req
}

/// One response: status and body.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
    /// The server (or the mesh) will close the connection after it.
    pub close: bool,
}

/// Reads one response (Content-Length framed, or to EOF when there is none and the
/// connection closes).
pub fn read_response(r: &mut impl BufRead) -> io::Result<Response> {
    let head = read_head(r)?.ok_or_else(|| bad("connection closed before a response"))?;
    let status: u16 = head.start[1]
        .parse()
        .map_err(|_| bad(format!("bad status line {:?}", head.start)))?;
    let body = read_body(r, head.content_length)?;
    Ok(Response {
        status,
        body,
        close: head.close,
    })
}

/// One request on a new connection; the result as one JSON value: `status`, `body` (text,
/// trimmed), `connect_us`, `total_us`, or `error`.
pub fn one_request(to: SocketAddr, method: &str, target: &str, timeout: Duration) -> Value {
    let started = Instant::now();
    let stream = TcpStream::connect_timeout(&to, timeout);
    let connect_us = started.elapsed().as_micros() as u64;
    let result = (|| -> io::Result<(Response, String)> {
        let s = stream?;
        let local = s.local_addr().map(|a| a.to_string()).unwrap_or_default();
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        (&s).write_all(&request_bytes(method, target, &to.to_string(), 0, true))?;
        let mut reader = BufReader::new(&s);
        Ok((read_response(&mut reader)?, local))
    })();
    match result {
        Ok((resp, local)) => json!({
            "to": to.to_string(),
            "local": local,
            "method": method,
            "path": target,
            "status": resp.status,
            "body": String::from_utf8_lossy(&resp.body).trim_end().to_owned(),
            "connect_us": connect_us,
            "total_us": started.elapsed().as_micros() as u64,
        }),
        Err(e) => json!({
            "to": to.to_string(),
            "method": method,
            "path": target,
            "error": e.to_string(),
            "connect_us": connect_us,
        }),
    }
}

/// What [`load`] is asked to do.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    pub to: SocketAddr,
    /// Offered requests per second, in total.
    pub rate: f64,
    /// Measured duration (after the warm-up).
    pub secs: Duration,
    /// Warm-up, not counted.
    pub warmup: Duration,
    /// Keep-alive connections, one sender each.
    pub conns: usize,
    /// Request body size.
    pub size: usize,
    pub method: String,
    pub target: String,
    /// Socket timeouts.
    pub timeout: Duration,
}

#[derive(Default)]
struct Worker {
    lat_ns: Vec<u64>,
    ok: u64,
    non_200: u64,
    errors: u64,
    first_error: Option<String>,
    late: u64,
    connections: u64,
    last_done: Option<Instant>,
}

/// Sends requests at a fixed total rate on `conns` keep-alive connections (each sender has
/// its own schedule, offset so the senders interleave) for `warmup + secs`, and reports as
/// JSON: completed requests and achieved rate over the measured window, latency percentiles
/// of the requests sent in it (from the write of the request to the end of its response; a
/// reconnect is not part of it), non-200 answers, errors, and `late` sends (more than 1 ms
/// behind their slot: the offered rate was not kept up on that connection).
pub fn load(spec: &LoadSpec) -> Value {
    let conns = spec.conns.max(1);
    let interval = Duration::from_secs_f64(conns as f64 / spec.rate.max(1.0));
    let start = Instant::now() + Duration::from_millis(50);
    let warm = start + spec.warmup;
    let end = warm + spec.secs;
    let threads: Vec<_> = (0..conns)
        .map(|k| {
            let spec = spec.clone();
            let first = start + interval.mul_f64(k as f64 / conns as f64);
            std::thread::spawn(move || sender(&spec, first, interval, warm, end))
        })
        .collect();
    let workers: Vec<Worker> = threads.into_iter().filter_map(|t| t.join().ok()).collect();
    let mut lat: Vec<u64> = workers
        .iter()
        .flat_map(|w| w.lat_ns.iter().copied())
        .collect();
    lat.sort_unstable();
    let last = workers
        .iter()
        .filter_map(|w| w.last_done)
        .max()
        .unwrap_or(end);
    let window = last
        .saturating_duration_since(warm)
        .max(spec.secs)
        .as_secs_f64();
    let sum = |f: fn(&Worker) -> u64| workers.iter().map(f).sum::<u64>();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return f64::NAN;
        }
        lat[((lat.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0
    };
    let ok = sum(|w| w.ok);
    json!({
        "offered_rps": spec.rate,
        "conns": conns,
        "secs": spec.secs.as_secs_f64(),
        "request_bytes": spec.size,
        "requests": lat.len(),
        "rps": ok as f64 / window,
        "p50_us": pct(0.50),
        "p90_us": pct(0.90),
        "p99_us": pct(0.99),
        "max_us": pct(1.0),
        "ok": ok,
        "non_200": sum(|w| w.non_200),
        "errors": sum(|w| w.errors),
        "first_error": workers.iter().find_map(|w| w.first_error.clone()),
        "late": sum(|w| w.late),
        "connections": sum(|w| w.connections),
    })
}

/// One connection's sender: a request every `interval` from `first` until `end`; what was
/// sent from `warm` on is counted.
fn sender(
    spec: &LoadSpec,
    first: Instant,
    interval: Duration,
    warm: Instant,
    end: Instant,
) -> Worker {
    let mut w = Worker::default();
    let req = request_bytes(
        &spec.method,
        &spec.target,
        &spec.to.to_string(),
        spec.size,
        false,
    );
    let mut conn: Option<(TcpStream, BufReader<TcpStream>)> = None;
    let mut slot = first;
    while slot < end {
        let now = Instant::now();
        if slot > now {
            std::thread::sleep(slot - now);
        } else if now - slot > Duration::from_millis(1) {
            w.late += 1;
        }
        let counted = slot >= warm;
        slot += interval;
        let result = (|| -> io::Result<(Response, Duration)> {
            if conn.is_none() {
                let s = TcpStream::connect_timeout(&spec.to, spec.timeout)?;
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(spec.timeout))?;
                s.set_write_timeout(Some(spec.timeout))?;
                let r = BufReader::new(s.try_clone()?);
                w.connections += 1;
                conn = Some((s, r));
            }
            let (s, r) = conn.as_mut().expect("connected above");
            let t0 = Instant::now();
            s.write_all(&req)?;
            let resp = read_response(r)?;
            Ok((resp, t0.elapsed()))
        })();
        match result {
            Ok((resp, took)) => {
                if counted {
                    w.lat_ns.push(took.as_nanos() as u64);
                    w.last_done = Some(Instant::now());
                    if resp.status == 200 {
                        w.ok += 1;
                    } else {
                        w.non_200 += 1;
                    }
                }
                if resp.close {
                    conn = None;
                }
            }
            Err(e) => {
                if counted {
                    w.errors += 1;
                    w.first_error.get_or_insert_with(|| e.to_string());
                }
                conn = None;
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
    if let Some((s, _)) = conn {
        let _ = s.shutdown(Shutdown::Both);
    }
    w
}
