//! Node n2's HBONE port shrugs off bad input. From inside node n1's network namespace, 1,000
//! bad attempts, a few at a time, of seven kinds in turn:
//! - random bytes (never a TLS handshake record);
//! - the first half of a real TLS ClientHello, then EOF;
//! - a TCP connect closed at once;
//! - a valid mutual-TLS handshake (a1's legitimately issued certificate), then bytes that are
//!   not the HTTP/2 preface;
//! - valid TLS and HTTP/2, then a CONNECT to an address not on n2 (answered 4xx);
//! - valid TLS and HTTP/2, then a GET instead of a CONNECT (answered 405);
//! - valid TLS and HTTP/2, then a CONNECT whose header block exceeds 16 KiB (refused).
//!
//! No attempt opens a tunnel, and n2 closes every raw connection promptly. Afterwards n2's
//! agent still carries a normal a1 → b1 connection, its open file descriptors come back to
//! within a few of the count before, its resident memory grew by less than 32 MiB, and its log
//! has `hbone rejected` lines with the reasons.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use mesh_agent::authority::Authority;
use mesh_agent::tls::SpiffeId;
use mesh_tests::{cluster::HBONE_PORT, hbone, require_privileges, wait_for, ClientRequest, Host};
use rustls::ClientConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{assert_via_agent, cluster};

const ATTEMPTS: usize = 1000;
const WORKERS: usize = 4;
/// Every step of every attempt.
const STEP: Duration = Duration::from_secs(3);
const KINDS: [&str; 7] = [
    "random bytes",
    "truncated ClientHello",
    "connect then close",
    "mTLS then garbage preface",
    "CONNECT to an address not on n2",
    "GET instead of CONNECT",
    "CONNECT with a 20 KiB header block",
];

/// What every attempt needs; shared by the workers.
struct Ctx {
    hbone: SocketAddr,
    config: Arc<ClientConfig>,
    b1_id: SpiffeId,
    b1: SocketAddr,
    not_on_n2: SocketAddr,
    hello_half: Vec<u8>,
}

/// A small deterministic generator for the random bytes (xorshift64*).
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

/// The first bytes a TLS client sends (its ClientHello record), from rustls itself.
fn client_hello(config: Arc<ClientConfig>, sni: &SpiffeId) -> Vec<u8> {
    let mut conn =
        rustls::ClientConnection::new(config, hbone_server_name(sni)).expect("a client connection");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).expect("writing to a Vec");
    }
    assert!(
        out.len() > 100 && out[0] == 0x16,
        "not a handshake record: {out:?}"
    );
    out
}

fn hbone_server_name(id: &SpiffeId) -> rustls_pki_types::ServerName<'static> {
    mesh_agent::tls::server_name_for(id)
}

/// Reads until the server closes (EOF or error): `Ok` if it did within `STEP`.
async fn closed_by_server(s: &mut (impl AsyncReadExt + Unpin)) -> Result<(), String> {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(()),
            Ok(Ok(_)) => continue,
            Err(_) => return Err(format!("the server kept the connection open for {STEP:?}")),
        }
    }
}

/// One bad attempt of kind `i % 7`: `Ok` if it was refused as it should be.
async fn bad_attempt(ctx: &Ctx, i: usize) -> Result<(), String> {
    let mut tcp = hbone::tcp_connect(ctx.hbone, STEP).await?;
    match i % KINDS.len() {
        0 => {
            let mut bytes = noise(i as u64, 16 + (i * 37) % 1000);
            bytes[0] = 0x47; // never 0x16: not a TLS handshake record the server would wait on
            let _ = tcp.write_all(&bytes).await;
            closed_by_server(&mut tcp).await
        }
        1 => {
            let half = &ctx.hello_half;
            tcp.write_all(half)
                .await
                .map_err(|e| format!("write: {e}"))?;
            let _ = tcp.shutdown().await;
            closed_by_server(&mut tcp).await
        }
        2 => {
            drop(tcp);
            Ok(())
        }
        3 => {
            let mut tls = hbone::tls_handshake(tcp, ctx.config.clone(), &ctx.b1_id, STEP).await?;
            let _ = tls.write_all(&noise(i as u64, 64)).await;
            let _ = tls.flush().await;
            closed_by_server(&mut tls).await
        }
        kind => {
            let tls = hbone::tls_handshake(tcp, ctx.config.clone(), &ctx.b1_id, STEP).await?;
            let send = hbone::h2_handshake(tls, STEP).await?;
            let req = match kind {
                4 => hbone::connect_request(ctx.not_on_n2),
                5 => http::Request::get(format!("http://{}/", ctx.b1))
                    .body(())
                    .expect("a GET request"),
                _ => {
                    let mut req = hbone::connect_request(ctx.b1);
                    let big = "x".repeat(20 * 1024);
                    req.headers_mut().insert(
                        "x-padding",
                        http::HeaderValue::from_str(&big).expect("a header value"),
                    );
                    req
                }
            };
            let answer = hbone::h2_request(send, req, STEP).await;
            match (kind, answer) {
                (4, Ok(s)) if s.is_client_error() => Ok(()),
                (5, Ok(s)) if s == http::StatusCode::METHOD_NOT_ALLOWED => Ok(()),
                // The agent answers 431 and logs why (blocks far larger than its limit are
                // refused by h2 itself, before the agent sees them).
                (6, Ok(http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)) => Ok(()),
                (_, other) => Err(format!("unexpected answer {other:?}")),
            }
        }
    }
}

/// Open file descriptors of `pid`.
fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/fd: {e}"))
        .count()
}

/// Resident set size of `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

#[test]
fn hbone_bad_input_rejected_without_leaks() {
    require_privileges();
    let started = Instant::now();
    let cluster = cluster().nodes(2).add_pod(0, "a1").add_pod(1, "b1").build();
    let mut agents = cluster.start_agents();
    let (a1, b1) = (cluster.pod("a1"), cluster.pod("b1"));
    let _server = b1.serve(&[8080]);
    let n2_pid = agents[1].pid().expect("n2's agent runs");

    // Warm up the normal path (pooled HBONE connection, lazily built state), then measure.
    let sent = "before the storm";
    let run = a1.client(&ClientRequest::new(b1.addr4(8080)).send(sent));
    assert_via_agent(&agents[0], a1, b1, run.single(), sent);
    let fds_before = fd_count(n2_pid);
    let rss_before = rss_kib(n2_pid);

    let a1_id = SpiffeId::parse(&a1.spiffe_id()).expect("a1's SPIFFE ID");
    let b1_id = SpiffeId::parse(&b1.spiffe_id()).expect("b1's SPIFFE ID");
    let ca = Authority::load(cluster.authority().dir()).expect("loading the cluster's authority");
    let cert = ca
        .issue_workload_cert(&a1_id, Duration::from_secs(3600))
        .expect("a1's certificate");
    let config = hbone::client_config(ca.trust_store(), cert.chain_pem(), cert.key_pem(), &b1_id);
    let hello = client_hello(config.clone(), &b1_id);
    let ctx = Arc::new(Ctx {
        hbone: cluster.node(1).addr4(HBONE_PORT),
        config,
        b1_id,
        b1: b1.addr4(8080),
        not_on_n2: a1.addr4(8080),
        hello_half: hello[..hello.len() / 2].to_vec(),
    });

    // The storm: WORKERS threads in n1's namespace, attempt i on worker i % WORKERS.
    let storm = Instant::now();
    let ns = cluster.node(0).netns().path();
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let (ctx, ns) = (ctx.clone(), ns.clone());
            std::thread::spawn(move || {
                hbone::run_in_netns(&ns, move || async move {
                    let mut failures = Vec::new();
                    for i in (w..ATTEMPTS).step_by(WORKERS) {
                        if let Err(e) = bad_attempt(&ctx, i).await {
                            failures.push((i, e));
                        }
                    }
                    failures
                })
            })
        })
        .collect();
    let mut failures: BTreeMap<&str, Vec<(usize, String)>> = BTreeMap::new();
    for w in workers {
        for (i, e) in w.join().expect("a storm worker panicked") {
            failures
                .entry(KINDS[i % KINDS.len()])
                .or_default()
                .push((i, e));
        }
    }
    let storm_took = storm.elapsed();
    assert!(
        failures.is_empty(),
        "attempts not refused as expected: {failures:#?}"
    );

    // Still serving.
    let sent = "after the storm";
    let run = a1.client(&ClientRequest::new(b1.addr4(8080)).send(sent));
    let flow = assert_via_agent(&agents[0], a1, b1, run.single(), sent);
    assert_eq!(flow.raw["transport"], "hbone", "{:?}", flow.raw);

    // No descriptors left behind (connections may take a moment to be torn down).
    let settled = wait_for(
        Duration::from_secs(15),
        "n2's descriptors back to the baseline",
        || {
            let now = fd_count(n2_pid);
            (now <= fds_before + 4).then_some(now)
        },
    );
    let rss_after = rss_kib(n2_pid);
    assert!(
        rss_after < rss_before + 32 * 1024,
        "n2's RSS grew from {rss_before} KiB to {rss_after} KiB"
    );

    // Every kind of refusal that reaches the agent is logged with a reason.
    let rejected: Vec<String> = agents[1]
        .log_lines()
        .into_iter()
        .filter(|l| l["message"] == "hbone rejected")
        .map(|l| l["reason"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(
        rejected.iter().all(|r| !r.is_empty()),
        "`hbone rejected` without a reason"
    );
    for needle in [
        "TLS handshake",
        "HTTP/2 preface",
        "not a workload on this node",
        "is not CONNECT",
        "header block of",
    ] {
        let n = rejected.iter().filter(|r| r.contains(needle)).count();
        assert!(
            n > 0,
            "no `hbone rejected` reason mentions {needle:?} among {} lines",
            rejected.len()
        );
    }
    assert!(agents[1].is_running(), "n2's agent exited");
    eprintln!(
        "hbone_bad_input: {ATTEMPTS} attempts in {storm_took:?}; fds {fds_before} -> {settled}; \
         RSS {rss_before} -> {rss_after} KiB; {} rejections logged; whole test {:?}",
        rejected.len(),
        started.elapsed()
    );
}
