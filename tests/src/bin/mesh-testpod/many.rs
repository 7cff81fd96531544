//! Many-connection modes of `mesh-testpod` (one thread, tokio): a greeting echo server that
//! holds tens of thousands of connections cheaply, and a client that opens and holds them.
//!
//! - `serve-many --listen ADDR:PORT [--listen …] --name POD`: like `serve` (hello line
//!   `"<name> <local_addr>\n"`, then echo until EOF), without a line per connection. Logs
//!   `{"event":"listening","local"}` per listener.
//! - `hold-many --connect ADDR:PORT --count N [--concurrency C] [--timeout-ms T] [--hold-ms H]`:
//!   opens N connections, C at a time; on each reads the hello, sends a numbered line and
//!   reads its echo; then prints one `{"event":"established","ok","failed","elapsed_ms",
//!   "max_failure_ms","errors":{kind: count}}` line and holds every good connection open until
//!   it is killed (or `--hold-ms` passes: exit 1). `max_failure_ms` is the longest time from
//!   the start of a failed connection to its failure (a refusal must be prompt).
//! - `half-heads --connect ADDR:PORT --count N --send TEXT [--timeout-ms T]`: opens N
//!   connections at once and sends TEXT on each (an incomplete request head), then reads each
//!   until the server closes it; prints `{"event":"half-heads","results":[{"ms","answer"}…]}`
//!   sorted by time (`answer`: the first line the server sent, `""` for none, `"open"` if
//!   still open after T).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    process::ExitCode,
    time::{Duration, Instant},
};

use serde_json::json;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
    task::JoinSet,
};

use super::emit;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Raises this process's open-files soft limit to its hard limit (many connections).
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

pub fn serve(listen: &[SocketAddr], name: &str) -> ExitCode {
    raise_nofile();
    runtime().block_on(async {
        let mut tasks = JoinSet::new();
        for addr in listen {
            let listener = match TcpListener::bind(addr).await {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("mesh-testpod: bind {addr}: {e}");
                    return ExitCode::from(1);
                }
            };
            emit(&json!({"event": "listening", "local": addr.to_string()}));
            let name = name.to_owned();
            tasks.spawn(async move {
                loop {
                    match listener.accept().await {
                        Ok((stream, _)) => {
                            let name = name.clone();
                            tokio::spawn(async move {
                                let _ = echo(stream, &name).await;
                            });
                        }
                        Err(e) => {
                            eprintln!("mesh-testpod: accept: {e}");
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
            });
        }
        while tasks.join_next().await.is_some() {}
        ExitCode::from(1)
    })
}

async fn echo(mut stream: TcpStream, name: &str) -> std::io::Result<()> {
    let local = stream.local_addr()?;
    stream
        .write_all(format!("{name} {local}\n").as_bytes())
        .await?;
    let mut buf = [0u8; 512];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        stream.write_all(&buf[..n]).await?;
    }
    stream.shutdown().await
}

/// How one connection failed, as a short kind.
fn kind(e: &std::io::Error) -> String {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionReset => "reset".into(),
        ConnectionRefused => "refused".into(),
        UnexpectedEof => "eof".into(),
        TimedOut => "timeout".into(),
        _ => format!("{e}"),
    }
}

async fn one(connect: SocketAddr, i: usize, timeout: Duration) -> Result<TcpStream, String> {
    let work = async {
        let stream = TcpStream::connect(connect).await.map_err(|e| kind(&e))?;
        let mut reader = BufReader::new(stream);
        let mut hello = String::new();
        let n = reader.read_line(&mut hello).await.map_err(|e| kind(&e))?;
        if n == 0 || !hello.ends_with('\n') {
            return Err("eof".to_owned());
        }
        let line = format!("line {i}\n");
        reader
            .get_mut()
            .write_all(line.as_bytes())
            .await
            .map_err(|e| kind(&e))?;
        let mut echo = vec![0u8; line.len()];
        reader.read_exact(&mut echo).await.map_err(|e| kind(&e))?;
        if echo != line.as_bytes() {
            return Err("echo mismatch".to_owned());
        }
        Ok(reader.into_inner())
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| Err("timeout".to_owned()))
}

pub fn hold(
    connect: SocketAddr,
    count: usize,
    concurrency: usize,
    timeout: Duration,
    max_hold: Duration,
) -> ExitCode {
    raise_nofile();
    runtime().block_on(async {
        let started = Instant::now();
        let mut held = Vec::with_capacity(count);
        let mut errors: BTreeMap<String, u64> = BTreeMap::new();
        let mut max_failure = Duration::ZERO;
        let mut running = JoinSet::new();
        let mut next = 0;
        while next < count || !running.is_empty() {
            while next < count && running.len() < concurrency.max(1) {
                let i = next;
                next += 1;
                running.spawn(async move {
                    let t = Instant::now();
                    (one(connect, i, timeout).await, t.elapsed())
                });
            }
            if let Some(done) = running.join_next().await {
                match done {
                    Ok((Ok(stream), _)) => held.push(stream),
                    Ok((Err(kind), took)) => {
                        *errors.entry(kind).or_default() += 1;
                        max_failure = max_failure.max(took);
                    }
                    Err(e) => *errors.entry(format!("task: {e}")).or_default() += 1,
                }
            }
        }
        emit(&json!({
            "event": "established",
            "ok": held.len(),
            "failed": count - held.len(),
            "elapsed_ms": started.elapsed().as_millis() as u64,
            "max_failure_ms": max_failure.as_millis() as u64,
            "errors": errors,
        }));
        tokio::time::sleep(max_hold).await;
        drop(held);
        ExitCode::from(1)
    })
}

pub fn half_heads(connect: SocketAddr, count: usize, send: &str, timeout: Duration) -> ExitCode {
    raise_nofile();
    runtime().block_on(async {
        let mut running = JoinSet::new();
        for _ in 0..count {
            let send = send.as_bytes().to_vec();
            running.spawn(async move {
                let started = Instant::now();
                let work = async {
                    let mut stream = TcpStream::connect(connect).await?;
                    stream.write_all(&send).await?;
                    let mut got = Vec::new();
                    let _ = stream.read_to_end(&mut got).await;
                    Ok::<_, std::io::Error>(got)
                };
                let answer = match tokio::time::timeout(timeout, work).await {
                    Ok(Ok(got)) => String::from_utf8_lossy(&got)
                        .lines()
                        .next()
                        .unwrap_or("")
                        .to_owned(),
                    Ok(Err(e)) => format!("error: {}", kind(&e)),
                    Err(_) => "open".to_owned(),
                };
                (started.elapsed().as_millis() as u64, answer)
            });
        }
        let mut results = Vec::with_capacity(count);
        while let Some(done) = running.join_next().await {
            if let Ok(r) = done {
                results.push(r);
            }
        }
        results.sort();
        let results: Vec<_> = results
            .into_iter()
            .map(|(ms, answer)| json!({"ms": ms, "answer": answer}))
            .collect();
        emit(&json!({"event": "half-heads", "results": results}));
        ExitCode::SUCCESS
    })
}
