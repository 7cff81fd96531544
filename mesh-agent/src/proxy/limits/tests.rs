use std::time::Duration;

use tokio::io::AsyncReadExt;

use super::*;

fn admission(max: usize, per_source: usize, heads: usize) -> (Arc<Admission>, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let limits = ConnectionLimits {
        max_connections: max,
        per_source,
        pending_heads_per_source: heads,
        head_timeout: Duration::from_secs(10),
    };
    (Admission::new(limits, Arc::clone(&metrics)), metrics)
}

fn refused(metrics: &Metrics, proxy: &str, reason: &str) -> u64 {
    let needle =
        format!("mesh_connections_refused_total{{proxy=\"{proxy}\",reason=\"{reason}\"}} ");
    metrics
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(&needle).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

fn peer() -> SocketAddr {
    "10.1.0.2:40000".parse().unwrap()
}

#[test]
fn budget_follows_the_open_files_limit() {
    // 1024 − (128 + 64)
    assert_eq!(default_max_connections(1024), 832);
    assert_eq!(default_max_connections(20_000), 20_000 - 128 - 1250);
    // Never more than the limit carries (one descriptor each), with the reserve kept.
    for nofile in [256u64, 1024, 4096, 20_000, 1 << 20] {
        let n = default_max_connections(nofile) as u64;
        let reserve = FD_RESERVE_BASE + nofile / FD_RESERVE_DIVISOR;
        assert_eq!(n + reserve, nofile, "{nofile}: {n}");
    }
    // A tiny or zero limit still gives a usable floor; a huge one does not overflow.
    assert_eq!(default_max_connections(0), MIN_DERIVED_CONNECTIONS);
    assert_eq!(default_max_connections(100), MIN_DERIVED_CONNECTIONS);
    assert!(default_max_connections(u64::MAX) > 0);
}

#[test]
fn options_resolve_with_defaults_and_are_validated() {
    let d = LimitOptions::default().resolve(1024).unwrap();
    assert_eq!(d.max_connections, 832);
    assert_eq!(d.per_source, 416);
    assert_eq!(d.pending_heads_per_source, DEFAULT_PENDING_HEADS_PER_SOURCE);
    assert_eq!(
        d.head_timeout,
        Duration::from_secs(DEFAULT_HEAD_TIMEOUT_SECS)
    );
    assert_eq!(ConnectionLimits::for_nofile(1024), d);

    let explicit = LimitOptions {
        max_connections: Some(50),
        max_connections_per_source: Some(7),
        max_pending_heads_per_source: 3,
        request_head_timeout_secs: 2,
    }
    .resolve(1024)
    .unwrap();
    assert_eq!(
        (
            explicit.max_connections,
            explicit.per_source,
            explicit.pending_heads_per_source
        ),
        (50, 7, 3)
    );
    // Odd budgets round the per-source default up (a budget of 1 still admits one).
    let one = LimitOptions {
        max_connections: Some(1),
        ..LimitOptions::default()
    };
    assert_eq!(one.resolve(1024).unwrap().per_source, 1);

    for bad in [
        LimitOptions {
            max_connections: Some(0),
            ..LimitOptions::default()
        },
        LimitOptions {
            max_connections_per_source: Some(0),
            ..LimitOptions::default()
        },
        LimitOptions {
            max_pending_heads_per_source: 0,
            ..LimitOptions::default()
        },
        LimitOptions {
            request_head_timeout_secs: 0,
            ..LimitOptions::default()
        },
        LimitOptions {
            max_connections: Some(10),
            max_connections_per_source: Some(11),
            ..LimitOptions::default()
        },
    ] {
        assert!(bad.resolve(1024).is_err(), "{bad:?} accepted");
    }
}

#[test]
fn the_flags_parse_as_documented() {
    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        limits: LimitOptions,
    }
    use clap::Parser as _;
    let cli = Cli::try_parse_from(["x"]).unwrap();
    assert_eq!(cli.limits, LimitOptions::default());
    let cli = Cli::try_parse_from([
        "x",
        "--max-connections",
        "100",
        "--max-connections-per-source",
        "10",
        "--max-pending-heads-per-source",
        "4",
        "--request-head-timeout-secs",
        "3",
    ])
    .unwrap();
    assert_eq!(cli.limits.max_connections, Some(100));
    assert_eq!(cli.limits.max_connections_per_source, Some(10));
    assert_eq!(cli.limits.max_pending_heads_per_source, 4);
    assert_eq!(cli.limits.request_head_timeout_secs, 3);
    for bad in ["-1", "ten", "", "1e3"] {
        assert!(
            Cli::try_parse_from(["x", "--max-connections", bad]).is_err(),
            "{bad:?} accepted"
        );
    }
}

#[test]
fn slots_are_capped_counted_and_given_back() {
    let (a, metrics) = admission(3, 3, 1);
    let guards: Vec<Guard> = (0..3)
        .map(|_| a.admit(Direction::Outbound, peer()).unwrap())
        .collect();
    assert_eq!(a.in_use(), 3);
    let err = a.admit(Direction::Outbound, peer()).unwrap_err();
    assert_eq!(err.reason, RefusalReason::Cap);
    assert_eq!(err.limit, 3);
    assert!(
        a.admit(Direction::Inbound, peer()).is_err(),
        "one budget for both proxies"
    );
    assert_eq!(refused(&metrics, "outbound", "cap"), 1);
    assert_eq!(refused(&metrics, "inbound", "cap"), 1);
    drop(guards);
    assert_eq!(a.in_use(), 0);
    let again = a.admit(Direction::Inbound, peer()).unwrap();
    assert_eq!(a.in_use(), 1);
    drop(again);
    assert!(metrics.render().contains("mesh_connections_limit 3"));
}

#[test]
fn slots_never_exceed_the_cap_under_contention() {
    let (a, metrics) = admission(100, 100, 1);
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let a = Arc::clone(&a);
            std::thread::spawn(move || {
                let mut held = Vec::new();
                let mut refusals = 0u64;
                for i in 0..1000 {
                    match a.admit(Direction::Outbound, peer()) {
                        Ok(g) => held.push(g),
                        Err(_) => refusals += 1,
                    }
                    assert!(a.in_use() <= 100);
                    if i % 3 == 0 {
                        held.pop();
                    }
                }
                refusals
            })
        })
        .collect();
    let refusals: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(a.in_use(), 0, "every guard gave its slot back");
    assert_eq!(refused(&metrics, "outbound", "cap"), refusals);
}

#[test]
fn sources_are_capped_separately_and_the_table_empties() {
    let (a, metrics) = admission(100, 2, 1);
    let w1 = SourceKey::Workload(1);
    let w2 = SourceKey::Workload(2);
    let ip: IpAddr = "10.1.0.2".parse().unwrap();
    let g1 = a.admit_source(Direction::Outbound, w1, peer()).unwrap();
    let g2 = a.admit_source(Direction::Outbound, w1, peer()).unwrap();
    let err = a.admit_source(Direction::Outbound, w1, peer()).unwrap_err();
    assert_eq!(err.reason, RefusalReason::SourceCap);
    // Other sources, and the same address under another role, are not affected.
    let g3 = a.admit_source(Direction::Outbound, w2, peer()).unwrap();
    let g4 = a
        .admit_source(Direction::Inbound, SourceKey::Peer(ip), peer())
        .unwrap();
    let g5 = a
        .admit_source(Direction::Inbound, SourceKey::Addr(ip), peer())
        .unwrap();
    assert_eq!(refused(&metrics, "outbound", "source_cap"), 1);
    drop(g1);
    let g6 = a.admit_source(Direction::Outbound, w1, peer()).unwrap();
    drop((g2, g3, g4, g5, g6));
    // Refused and released sources leave nothing behind: the table is bounded by live ones.
    assert!(a.sources.lock().unwrap().is_empty());
}

#[test]
fn pending_heads_are_capped_per_source_address() {
    let (a, metrics) = admission(100, 100, 2);
    let src: IpAddr = "10.1.0.2".parse().unwrap();
    let other: IpAddr = "fd00:1::2".parse().unwrap();
    let gate = a.head_gate(Direction::Inbound, src);
    let h1 = gate.enter().unwrap();
    let h2 = gate.clone().enter().unwrap();
    assert_eq!(
        gate.enter().unwrap_err().reason,
        RefusalReason::PendingHeads
    );
    let h3 = a.head_gate(Direction::Inbound, other).enter().unwrap();
    assert_eq!(refused(&metrics, "inbound", "pending_heads"), 1);
    drop(h1);
    let h4 = gate.enter().unwrap();
    drop((h2, h3, h4));
    assert!(a.heads.lock().unwrap().is_empty());
    // A source with a cap of 0 in use cannot leave an entry behind either.
    let (z, _) = admission(1, 1, 1);
    let g = z.head_gate(Direction::Outbound, src).enter().unwrap();
    assert!(z.head_gate(Direction::Outbound, src).enter().is_err());
    drop(g);
    assert!(z.heads.lock().unwrap().is_empty());
}

#[test]
fn refusal_logs_are_rate_limited_and_count_what_they_skip() {
    let l = LogLimiter::default();
    assert_eq!(l.allow(), Some(0));
    for _ in 0..5 {
        assert_eq!(l.allow(), None);
    }
    // Pretend the interval passed.
    l.next_ms.store(0, Ordering::Release);
    assert_eq!(l.allow(), Some(5));
}

#[tokio::test]
async fn past_the_cap_a_connection_is_reset_at_once() {
    let (a, metrics) = admission(1, 1, 1);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = {
        let a = Arc::clone(&a);
        tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                match accept(std::slice::from_ref(&listener), &a, Direction::Outbound).await {
                    Accepted::Admitted(s, _, g) => held.push((s, g)),
                    Accepted::Refused(s, _) => reset(s),
                }
            }
        })
    };
    let first = tokio::net::TcpStream::connect(addr).await.unwrap();
    // Wait for the first to be admitted before the second arrives.
    tokio::time::timeout(Duration::from_secs(5), async {
        while a.in_use() < 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    let mut second = tokio::net::TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), second.read(&mut buf))
        .await
        .expect("the refused connection must end at once, not hang");
    let err = read.expect_err("a reset, not data or a clean EOF");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(refused(&metrics, "outbound", "cap"), 1);
    assert_eq!(a.in_use(), 1);
    drop(first);
    server.abort();
}

/// Runs in a child process (it lowers its own open-files limit): the accept loop survives
/// EMFILE, refuses the pending connection with its reserve descriptor, counts it, and serves
/// again once descriptors are free.
#[test]
fn accept_survives_descriptor_exhaustion() {
    const CHILD: &str = "MESH_LIMITS_EMFILE_CHILD";
    if std::env::var_os(CHILD).is_none() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "proxy::limits::tests::accept_survives_descriptor_exhaustion",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "child failed:\n{text}");
        assert!(text.contains("1 passed"), "child ran no test:\n{text}");
        return;
    }
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, 256, hard).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (a, metrics) = admission(1000, 1000, 1);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Client sockets made before the table fills (connect needs no new descriptor).
        let refused_client = tokio::net::TcpSocket::new_v4().unwrap();
        let later_client = tokio::net::TcpSocket::new_v4().unwrap();
        let mut filler = Vec::new();
        loop {
            match std::fs::File::open("/dev/null") {
                Ok(f) => filler.push(f),
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(libc::EMFILE), "{e}");
                    break;
                }
            }
        }
        let server = {
            let a = Arc::clone(&a);
            tokio::spawn(async move {
                let mut held = Vec::new();
                loop {
                    match accept(std::slice::from_ref(&listener), &a, Direction::Inbound).await {
                        Accepted::Admitted(s, _, g) => held.push((s, g)),
                        Accepted::Refused(s, _) => reset(s),
                    }
                }
            })
        };
        let mut c = refused_client.connect(addr).await.unwrap();
        let mut buf = [0u8; 8];
        let read = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
            .await
            .expect("refused at once with the reserve descriptor, not left queued");
        assert!(
            matches!(&read, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
            "{read:?}"
        );
        assert_eq!(refused(&metrics, "inbound", "fd_limit"), 1);
        // Descriptors free again: the same loop serves.
        drop(filler);
        let _c2 = later_client.connect(addr).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), async {
            while a.in_use() < 1 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the listener is still serving after EMFILE");
        // Only the connection that was really refused is counted.
        assert_eq!(refused(&metrics, "inbound", "fd_limit"), 1);
        server.abort();
    });
}

/// The L7 head reader holds one of its source's pending heads from the first byte until the
/// head is complete: half-sent heads past the cap are refused at once, the rest time out
/// (408), and the count returns to zero.
#[tokio::test]
async fn l7_half_sent_heads_are_capped_per_source_and_time_out() {
    use crate::proxy::l7::{self, L7Limits, RequestVerdict, RequestView};
    use tokio::io::{duplex, AsyncWriteExt, DuplexStream};

    let (a, metrics) = admission(100, 100, 2);
    let src: IpAddr = "10.1.0.2".parse().unwrap();
    let limits = L7Limits {
        header_timeout: Duration::from_millis(300),
        head_gate: Some(a.head_gate(Direction::Inbound, src)),
        ..L7Limits::default()
    };
    let pending = |a: &Admission| a.heads.lock().unwrap().get(&src).copied().unwrap_or(0);
    let open = |limits: L7Limits| {
        let (client, server) = duplex(16 * 1024);
        tokio::spawn(async move {
            let allow = |_: &RequestView<'_>| RequestVerdict::Allow;
            let no_upstream =
                || async { Err::<DuplexStream, _>(io::Error::other("no upstream in this test")) };
            l7::serve(server, no_upstream, &allow, &limits).await
        });
        client
    };
    let read_all = |mut c: DuplexStream| async move {
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut out))
            .await
            .expect("answered or closed, not left hanging")
            .unwrap();
        String::from_utf8_lossy(&out).into_owned()
    };
    let half = b"GET /slow HTTP/1.1\r\nhost: x\r\n";
    let mut c1 = open(limits.clone());
    c1.write_all(half).await.unwrap();
    let mut c2 = open(limits.clone());
    c2.write_all(half).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), async {
        while pending(&a) < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("both half-sent heads are counted");
    // A third from the same source is refused at once: closed before anything is read.
    let mut c3 = open(limits.clone());
    let _ = c3.write_all(half).await;
    let started = Instant::now();
    assert_eq!(read_all(c3).await, "");
    assert!(
        started.elapsed() < Duration::from_millis(250),
        "refused before the timeout"
    );
    assert_eq!(refused(&metrics, "inbound", "pending_heads"), 1);
    // The two held ones time out with 408.
    for c in [c1, c2] {
        assert!(
            read_all(c).await.starts_with("HTTP/1.1 408"),
            "slowloris answered 408"
        );
    }
    assert_eq!(pending(&a), 0, "timed-out heads give their place back");
    // A complete head passes (and is no longer pending once read; here the pod is down: 502).
    let mut c4 = open(limits);
    c4.write_all(b"GET /ok HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(read_all(c4).await.starts_with("HTTP/1.1 502"));
    assert_eq!(pending(&a), 0);
    assert_eq!(refused(&metrics, "inbound", "pending_heads"), 1);
}
