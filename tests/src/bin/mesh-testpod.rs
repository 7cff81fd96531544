//! `mesh-testpod`: the process the harness runs inside pods.
//!
//! - `serve --listen ADDR:PORT [--listen …] --name POD`: for every accepted
//!   connection, writes `"<name> <local_addr>\n"`, then echoes what it reads
//!   until EOF and closes. Logs `{"event":"listening",…}` once per bound
//!   listener and `{"event":"accepted","local":…,"peer":…}` per connection.
//! - `client --connect ADDR:PORT --send TEXT [--count N] [--concurrency C]`:
//!   connects, reads the hello line, sends TEXT, half-closes, reads the echo
//!   to EOF; prints one JSON line per connection
//!   (`{"connect","local","hello","echo_ok","error"}`); exits 1 on any error.
//!   The first connection of every worker is held open until all workers
//!   have theirs, so `C` connections really are open at the same time.
//!   `--interval-ms MS`: each worker pauses between two of its connections.
//! - `hold --connect ADDR:PORT [--hold-ms MS]`: one connection; reads the hello, sends a line
//!   and reads its echo, logs `{"event":"established","local","hello"}`, then holds the
//!   connection open reading until the peer closes it: `{"event":"closed","how":"eof"|"error: …",
//!   "held_ms"}` (exit 0). `{"event":"failed","error"}` (exit 1) if the exchange fails, and
//!   `{"event":"held","held_ms"}` (exit 1) if nothing closed it within `--hold-ms`.
//! - `serve-many …` and `hold-many …`: tens of thousands of connections from one thread
//!   (see `mesh-testpod/many.rs`).
//! - `http-serve --listen ADDR:PORT [--listen …] --name POD`: HTTP/1.1 keep-alive, and h2c
//!   when the prior-knowledge preface arrives, on the same ports; every request is answered
//!   `200` with body `<pod> <METHOD> <path> host=<host>[ body=<n>]`. Logs `listening`,
//!   `accepted`, one `{"event":"request","proto","method","path","host","body_len"}` per request
//!   and `closed`.
//! - `http1 --connect ADDR:PORT --request "METHOD PATH [HOST] [+body=T|+chunked=T]
//!   [+header=NAME:VALUE]…" … [--pipeline]`:
//!   one connection; one `{"index","status","body","connection"}` line per response, then
//!   `{"event":"done","error","open","responses","connect_us"}` (`open`: the server kept the
//!   connection after the last response).
//! - `h2c --connect ADDR:PORT --request … `: prior knowledge, every request a concurrent
//!   stream; `{"index","status","body"}` (or `{"index","error"}`) per stream, then `done`.
//! - `raw --connect ADDR:PORT --send TEXT`: sends the bytes, reads until the server closes:
//!   `{"event":"raw","how":"eof"|"reset"|"open","received"}`, then `done`.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Barrier,
    },
    time::Duration,
};

use clap::{Parser, Subcommand};
use serde_json::json;

#[path = "mesh-testpod/many.rs"]
mod many;
#[path = "mesh-testpod/web.rs"]
mod web;

#[derive(Parser, Debug)]
#[command(
    name = "mesh-testpod",
    about = "Test server and client run inside mesh-tests pods"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Greet, then echo, every connection.
    Serve {
        /// Address to listen on (repeatable).
        #[arg(long, required = true)]
        listen: Vec<SocketAddr>,
        /// Name announced in the hello line.
        #[arg(long)]
        name: String,
    },
    /// Connect, check the echo, report as JSON lines.
    Client {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        send: String,
        /// Connections in total.
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// Connections at a time.
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        /// Connect and per-read/write timeout.
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
        /// Pause of each worker between two of its connections.
        #[arg(long, default_value_t = 0)]
        interval_ms: u64,
    },
    /// One connection, one line exchanged, then held open until the peer closes it.
    Hold {
        #[arg(long)]
        connect: SocketAddr,
        /// How long to hold the connection at most.
        #[arg(long, default_value_t = 60_000)]
        hold_ms: u64,
    },
    /// Like `serve`, for tens of thousands of connections (one thread; no line per connection).
    ServeMany {
        #[arg(long, required = true)]
        listen: Vec<SocketAddr>,
        #[arg(long)]
        name: String,
    },
    /// Open COUNT connections (CONCURRENCY at a time), exchange a line on each, report, hold.
    HoldMany {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 100)]
        concurrency: usize,
        /// Per-connection limit for connect + hello + echo.
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
        /// How long to hold the connections at most.
        #[arg(long, default_value_t = 120_000)]
        hold_ms: u64,
    },
    /// Open COUNT connections at once, send TEXT (a half-sent head) on each, report how each
    /// ended.
    HalfHeads {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        send: String,
        #[arg(long, default_value_t = 15_000)]
        timeout_ms: u64,
    },
    /// Answer HTTP/1.1 and h2c requests with 200 and a body naming the request.
    HttpServe {
        #[arg(long, required = true)]
        listen: Vec<SocketAddr>,
        #[arg(long)]
        name: String,
    },
    /// HTTP/1.1 requests on one connection.
    Http1 {
        #[arg(long)]
        connect: SocketAddr,
        /// `METHOD PATH [HOST] [+body=TEXT|+chunked=TEXT]` (repeatable, in order).
        #[arg(long, required = true)]
        request: Vec<web::RequestSpec>,
        /// Write every request before reading any response.
        #[arg(long)]
        pipeline: bool,
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
    /// h2c (prior knowledge) requests as concurrent streams of one connection.
    H2c {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, required = true)]
        request: Vec<web::RequestSpec>,
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
    /// Arbitrary bytes; reports whether the server closed.
    Raw {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        send: String,
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Cmd::Serve { listen, name } => serve(&listen, &name),
        Cmd::Client {
            connect,
            send,
            count,
            concurrency,
            timeout_ms,
            interval_ms,
        } => client(
            connect,
            &send,
            count,
            concurrency.max(1),
            Duration::from_millis(timeout_ms),
            Duration::from_millis(interval_ms),
        ),
        Cmd::Hold { connect, hold_ms } => hold(connect, Duration::from_millis(hold_ms)),
        Cmd::ServeMany { listen, name } => many::serve(&listen, &name),
        Cmd::HoldMany {
            connect,
            count,
            concurrency,
            timeout_ms,
            hold_ms,
        } => many::hold(
            connect,
            count,
            concurrency,
            Duration::from_millis(timeout_ms),
            Duration::from_millis(hold_ms),
        ),
        Cmd::HalfHeads {
            connect,
            count,
            send,
            timeout_ms,
        } => many::half_heads(connect, count, &send, Duration::from_millis(timeout_ms)),
        Cmd::HttpServe { listen, name } => web::serve(&listen, &name),
        Cmd::Http1 {
            connect,
            request,
            pipeline,
            timeout_ms,
        } => web::http1(
            connect,
            &request,
            pipeline,
            Duration::from_millis(timeout_ms),
        ),
        Cmd::H2c {
            connect,
            request,
            timeout_ms,
        } => web::h2c(connect, &request, Duration::from_millis(timeout_ms)),
        Cmd::Raw {
            connect,
            send,
            timeout_ms,
        } => web::raw(connect, send.as_bytes(), Duration::from_millis(timeout_ms)),
    }
}

/// One JSON line to stdout, whole (stdout is a file; lines must not interleave).
fn emit(v: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

fn serve(listen: &[SocketAddr], name: &str) -> ExitCode {
    let mut threads = Vec::new();
    for addr in listen {
        let listener = match TcpListener::bind(addr) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("mesh-testpod: bind {addr}: {e}");
                return ExitCode::from(1);
            }
        };
        emit(&json!({"event": "listening", "local": addr.to_string()}));
        let name = name.to_owned();
        threads.push(std::thread::spawn(move || accept_loop(&listener, &name)));
    }
    for t in threads {
        let _ = t.join();
    }
    ExitCode::from(1)
}

fn accept_loop(listener: &TcpListener, name: &str) {
    mesh_tests::net::accept_forever(listener, "mesh-testpod", |stream, peer| {
        let name = name.to_owned();
        std::thread::spawn(move || {
            if let Err(e) = handle(stream, peer, &name) {
                eprintln!("mesh-testpod: connection from {peer}: {e}");
            }
        });
    });
}

fn handle(mut stream: TcpStream, peer: SocketAddr, name: &str) -> std::io::Result<()> {
    let local = stream.local_addr()?;
    emit(&json!({"event": "accepted", "local": local.to_string(), "peer": peer.to_string()}));
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.set_write_timeout(Some(Duration::from_secs(30)))?;
    stream.write_all(format!("{name} {local}\n").as_bytes())?;
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        stream.write_all(&buf[..n])?;
    }
    stream.shutdown(Shutdown::Write)
}

struct Conn {
    local: Option<SocketAddr>,
    hello: Option<String>,
    echo_ok: bool,
    /// How long `connect()` took (success or failure), in microseconds.
    connect_us: Option<u64>,
}

fn client(
    connect: SocketAddr,
    send: &str,
    count: usize,
    concurrency: usize,
    timeout: Duration,
    interval: Duration,
) -> ExitCode {
    let workers = concurrency.min(count).max(1);
    let next = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicBool::new(false));
    let barrier = Arc::new(Barrier::new(workers));
    let mut threads = Vec::new();
    for _ in 0..workers {
        let (next, failed, barrier) = (next.clone(), failed.clone(), barrier.clone());
        let send = send.to_owned();
        threads.push(std::thread::spawn(move || {
            let mut first = true;
            while next.fetch_add(1, Ordering::Relaxed) < count {
                if !first && !interval.is_zero() {
                    std::thread::sleep(interval);
                }
                let mut conn = Conn { local: None, hello: None, echo_ok: false, connect_us: None };
                let sync = if first { Some(&*barrier) } else { None };
                first = false;
                let res = one(connect, &send, timeout, &mut conn, sync);
                if res.is_err() || !conn.echo_ok {
                    failed.store(true, Ordering::Relaxed);
                }
                emit(&json!({
                    "connect": connect.to_string(),
                    "local": conn.local.map(|a| a.to_string()),
                    "hello": conn.hello,
                    "echo_ok": conn.echo_ok,
                    "connect_us": conn.connect_us,
                    "error": res.err().or(if conn.echo_ok { None } else { Some("echo mismatch".to_owned()) }),
                }));
            }
            if first {
                // Never got a connection (count < workers cannot happen, but
                // the barrier must not wait for us forever).
                barrier.wait();
            }
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    if failed.load(Ordering::Relaxed) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// One connection. If `sync` is given, every path passes it exactly once
/// (after the hello, or on error) so that no worker waits forever.
fn one(
    connect: SocketAddr,
    send: &str,
    timeout: Duration,
    conn: &mut Conn,
    sync: Option<&Barrier>,
) -> Result<(), String> {
    let mut sync = sync;
    let mut pass = || {
        if let Some(b) = sync.take() {
            b.wait();
        }
    };
    let res = (|| {
        let started = std::time::Instant::now();
        let stream = TcpStream::connect_timeout(&connect, timeout);
        conn.connect_us = Some(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX));
        let stream = stream.map_err(|e| format!("connect: {e}"))?;
        conn.local = stream.local_addr().ok();
        stream
            .set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        stream
            .set_write_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        let mut reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
        let mut hello = String::new();
        reader
            .read_line(&mut hello)
            .map_err(|e| format!("reading hello: {e}"))?;
        if !hello.ends_with('\n') {
            return Err(format!("no hello line (got {hello:?})"));
        }
        conn.hello = Some(hello.trim_end().to_owned());
        Ok((stream, reader))
    })();
    pass();
    let (mut stream, mut reader) = res?;
    stream
        .write_all(send.as_bytes())
        .map_err(|e| format!("sending: {e}"))?;
    stream
        .shutdown(Shutdown::Write)
        .map_err(|e| format!("half-close: {e}"))?;
    let mut echo = Vec::new();
    reader
        .read_to_end(&mut echo)
        .map_err(|e| format!("reading echo: {e}"))?;
    conn.echo_ok = echo == send.as_bytes();
    Ok(())
}

/// The `hold` command (see the module documentation).
fn hold(connect: SocketAddr, max_hold: Duration) -> ExitCode {
    const LINE: &[u8] = b"hold this line\n";
    let io = Duration::from_secs(5);
    let setup = (|| {
        let stream =
            TcpStream::connect_timeout(&connect, io).map_err(|e| format!("connect: {e}"))?;
        let local = stream.local_addr().map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(io))
            .map_err(|e| e.to_string())?;
        let mut reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
        let mut hello = String::new();
        reader
            .read_line(&mut hello)
            .map_err(|e| format!("reading hello: {e}"))?;
        (&stream)
            .write_all(LINE)
            .map_err(|e| format!("sending: {e}"))?;
        let mut echo = vec![0u8; LINE.len()];
        reader
            .read_exact(&mut echo)
            .map_err(|e| format!("reading echo: {e}"))?;
        if echo != LINE {
            return Err(format!(
                "echo mismatch: {:?}",
                String::from_utf8_lossy(&echo)
            ));
        }
        Ok((stream, reader, local, hello.trim_end().to_owned()))
    })();
    let (stream, mut reader, local, hello) = match setup {
        Ok(v) => v,
        Err(e) => {
            emit(&json!({"event": "failed", "error": e}));
            return ExitCode::from(1);
        }
    };
    emit(&json!({"event": "established", "local": local.to_string(), "hello": hello}));
    let started = std::time::Instant::now();
    let _ = stream.set_read_timeout(Some(max_hold));
    let mut buf = [0u8; 1024];
    let how = loop {
        match reader.read(&mut buf) {
            Ok(0) => break "eof".to_owned(),
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                emit(&json!({"event": "held", "held_ms": started.elapsed().as_millis() as u64}));
                return ExitCode::from(1);
            }
            Err(e) => break format!("error: {e}"),
        }
    };
    emit(&json!({"event": "closed", "how": how, "held_ms": started.elapsed().as_millis() as u64}));
    ExitCode::SUCCESS
}
