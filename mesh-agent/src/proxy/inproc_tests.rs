//! In-process proxy tests: the outbound proxy, HBONE, the pool and the destination path run
//! in one process over loopback, with real TLS 1.3 handshakes (workload certificates issued
//! by a real authority, keys made by rcgen) and a fixed set of certificates in place of the
//! identity manager. Only the kernel's original-destination table is replaced (filled by the
//! test, keyed exactly as sock_ops keys it).
//!
//! Each test runs on a thread of its own in a private network namespace (`unshare`, root),
//! where the workload addresses (not loopback: the registry refuses those) are put on `lo`;
//! nothing of the host's network is touched.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use mesh_common::{ConnKey, OrigDst, AF_INET};
use rustls::{ClientConfig, ServerConfig};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::watch,
};

use super::{
    conn_key,
    destination::{Destination, Downstream},
    hbone::HBONE_PORT,
    inbound::{Inbound, InboundConfig},
    ip_words,
    limits::{Admission, ConnectionLimits},
    outbound::{OrigDsts, Outbound, OutboundConfig},
    record::Outcome,
    Identities, ProxyDeps, SourceAddrs,
};
use crate::{
    authority::Authority,
    cgroup::tests::TempDir,
    identity::IdentityError,
    metrics::Metrics,
    policy::{allow_all, compile::compile, model::PolicyBundle, ConnInfo, PolicyView},
    registry::Registry,
    state::live::{Closed, MeshHandle},
    tls::{
        cert::WorkloadCert,
        verify::{client_config, server_config, SniCertResolver, TrustStore},
        SpiffeId, TrustDomain,
    },
};

const TD: &str = "cluster.local";
const A1: &str = "10.99.1.11";
const B1: &str = "10.99.2.12";
const C1: &str = "10.99.1.13";
/// Where the outbound and HBONE listeners bind (the nodes' addresses).
const N1: &str = "10.99.0.1";
const N2: &str = "10.99.0.2";

/// Runs `test` on a thread of its own, in a new network namespace where `lo` is up and holds
/// the nodes' and workloads' addresses, on a current-thread runtime (every socket is made on
/// that thread, so in that namespace).
fn in_netns<F: std::future::Future<Output = ()>>(test: impl FnOnce(Logs) -> F + Send + 'static) {
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect(
            "in-process proxy tests need a private network namespace (unshare CLONE_NEWNET: run as root)",
        );
        let ip = |args: &[&str]| {
            let st = std::process::Command::new("ip")
                .args(args)
                .status()
                .expect("running ip(8) (iproute2) to set up the test namespace");
            assert!(st.success(), "ip {args:?} failed");
        };
        ip(&["link", "set", "lo", "up"]);
        for a in [N1, N2, A1, B1, C1] {
            ip(&["addr", "add", &format!("{a}/32"), "dev", "lo"]);
        }
        // The agent's log lines, as JSON (every task runs on this thread).
        let logs = Logs::default();
        let _logging = tracing::subscriber::set_default(
            tracing_subscriber::fmt()
                .json()
                .flatten_event(true)
                .with_writer(logs.clone())
                .finish(),
        );
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(test(logs));
    })
    .join()
    .map_err(|p| std::panic::resume_unwind(p))
    .unwrap();
}

/// The log lines of a test's agent code.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Logs {
    /// Every line whose `message` is `message`, waiting (bounded) until there are `n`.
    async fn wait_for(&self, message: &str, n: usize) -> Vec<serde_json::Value> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&self.0.lock().unwrap())
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .filter(|v: &serde_json::Value| v["message"] == message)
                .collect();
            if lines.len() >= n {
                return lines;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} `{message}` lines of {n}: {lines:?}",
                lines.len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Fixed workload certificates: the identity layer as the proxies see it, without the
/// manager (no authority service, no rotation).
struct FixedIdentities {
    trust: Arc<TrustStore>,
    certs: HashMap<SpiffeId, WorkloadCert>,
    server: Arc<ServerConfig>,
    /// One client config per (source, destination), as the manager keeps them: the pool
    /// reuses a connection only for the config it was made with.
    clients: Mutex<HashMap<(SpiffeId, SpiffeId), Arc<ClientConfig>>>,
    revocations: watch::Sender<u64>,
}

impl FixedIdentities {
    fn new(ca: &Authority, ids: &[SpiffeId]) -> Arc<Self> {
        let trust = TrustStore::from_bundle_pem(ca.trust_domain().clone(), &ca.bundle_pem())
            .expect("trust store");
        let resolver = SniCertResolver::new();
        let mut certs = HashMap::new();
        for id in ids {
            let cert = ca
                .issue_workload_cert(id, Duration::from_secs(3600))
                .expect("workload certificate");
            resolver.insert(&cert);
            certs.insert(id.clone(), cert);
        }
        let server = server_config(Arc::clone(&trust), resolver).expect("server config");
        Arc::new(Self {
            trust,
            certs,
            server,
            clients: Mutex::default(),
            revocations: watch::channel(0).0,
        })
    }
}

impl Identities for FixedIdentities {
    fn server_config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.server)
    }

    fn client_config(
        &self,
        src: &SpiffeId,
        dst: &SpiffeId,
    ) -> Result<Arc<ClientConfig>, IdentityError> {
        let mut clients = self.clients.lock().unwrap();
        if let Some(c) = clients.get(&(src.clone(), dst.clone())) {
            return Ok(Arc::clone(c));
        }
        let cert = self
            .certs
            .get(src)
            .expect("a fixed certificate for the source");
        let config = client_config(Arc::clone(&self.trust), cert, dst)?;
        clients.insert((src.clone(), dst.clone()), Arc::clone(&config));
        Ok(config)
    }

    fn trust(&self) -> Arc<TrustStore> {
        Arc::clone(&self.trust)
    }

    fn revocations(&self) -> watch::Receiver<u64> {
        self.revocations.subscribe()
    }
}

/// The kernel's original-destination records, filled by the test.
#[derive(Default)]
struct Table(Mutex<HashMap<ConnKey, OrigDst>>);

impl OrigDsts for Table {
    fn take_orig_dst(&self, key: &ConnKey) -> Option<OrigDst> {
        self.0.lock().unwrap().remove(key)
    }
}

/// Two nodes on loopback: a1 on n1 (the client), b1 on n2 (over HBONE), c1 on n1 (same
/// node).
fn registry() -> Arc<Registry> {
    let text = format!(
        "nodes:\n  - {{name: n1, address: {N1}}}\n  - {{name: n2, address: {N2}}}\n\
         workloads:\n\
         \x20 - {{name: a1, namespace: default, serviceAccount: sa-a, node: n1, ips: [\"{A1}\"], labels: {{app: a}}}}\n\
         \x20 - {{name: b1, namespace: default, serviceAccount: sa-b, node: n2, ips: [\"{B1}\"], labels: {{app: b}}}}\n\
         \x20 - {{name: c1, namespace: default, serviceAccount: sa-c, node: n1, ips: [\"{C1}\"], labels: {{app: c}}}}\n"
    );
    Arc::new(Registry::parse_all(&text, Path::new("registry.yaml")).expect("registry"))
}

fn spiffe(sa: &str) -> SpiffeId {
    SpiffeId::new(TrustDomain::new(TD).unwrap(), "default", sa).unwrap()
}

/// A pod: echoes what it reads, then closes its write side at EOF.
async fn echo_pod(ip: &str) -> SocketAddr {
    let l = TcpListener::bind((ip.parse::<IpAddr>().unwrap(), 0))
        .await
        .unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

struct Mesh {
    _dir: TempDir,
    registry: Arc<Registry>,
    table: Arc<Table>,
    metrics: Arc<Metrics>,
    policies: watch::Sender<Arc<PolicyView>>,
    outbound: SocketAddr,
    _stop: watch::Sender<bool>,
}

impl Mesh {
    async fn start(tag: &str) -> Self {
        let dir = TempDir::new(tag);
        let ca = Authority::init(&dir.0, TrustDomain::new(TD).unwrap()).expect("authority");
        let identities =
            FixedIdentities::new(&ca, &[spiffe("sa-a"), spiffe("sa-b"), spiffe("sa-c")]);
        let registry = registry();
        let metrics = Arc::new(Metrics::new());
        let (policies, policy_rx) = allow_all();
        let (stop, stop_rx) = watch::channel(false);
        let mesh = MeshHandle::fixed((*registry).clone(), &TrustDomain::new(TD).unwrap());
        let deps = |node: &str| ProxyDeps {
            node: node.to_owned(),
            mesh: mesh.clone(),
            identities: identities.clone() as Arc<dyn Identities>,
            trust_domain: TrustDomain::new(TD).unwrap(),
            metrics: Arc::clone(&metrics),
            policies: policy_rx.clone(),
            source: SourceAddrs { v4: None, v6: None },
            path_normalization: Default::default(),
            admission: Admission::new(limits(), Arc::clone(&metrics)),
            audit: None,
        };
        // n2's agent, where the registry's node address says (the test's own namespace).
        let hbone = TcpListener::bind((N2.parse::<IpAddr>().unwrap(), HBONE_PORT))
            .await
            .unwrap();
        let inbound = Inbound::new(hbone, deps("n2"), InboundConfig::default());
        tokio::spawn(inbound.run(stop_rx.clone()));
        let out = TcpListener::bind((N1.parse::<IpAddr>().unwrap(), 0))
            .await
            .unwrap();
        let outbound_addr = out.local_addr().unwrap();
        let table = Arc::new(Table::default());
        let outbound = Outbound::new(
            vec![out],
            Arc::clone(&table) as Arc<dyn OrigDsts>,
            deps("n1"),
            OutboundConfig::default(),
        );
        tokio::spawn(outbound.run(stop_rx));
        Self {
            _dir: dir,
            registry,
            table,
            metrics,
            policies,
            outbound: outbound_addr,
            _stop: stop,
        }
    }

    /// Connects from a1's address to `dst` as the kernel would capture it: the record is
    /// written first, then the connection goes to the outbound listener.
    async fn connect(&self, dst: SocketAddr) -> TcpStream {
        let sock = TcpSocket::new_v4().unwrap();
        sock.bind((A1.parse::<IpAddr>().unwrap(), 0).into())
            .unwrap();
        let local = sock.local_addr().unwrap();
        let src = self.registry.by_ip(local.ip()).expect("a1").id;
        let dst_w = self
            .registry
            .by_ip(dst.ip())
            .expect("destination workload")
            .id;
        let record = OrigDst {
            addr_be: ip_words(dst.ip()),
            port_be: dst.port().to_be(),
            family: AF_INET,
            src_workload_id: src,
            dst_workload_id: dst_w,
        };
        self.table
            .0
            .lock()
            .unwrap()
            .insert(conn_key(local, self.outbound), record);
        sock.connect(self.outbound).await.unwrap()
    }

    fn deny_all_to(&self, app: &str) {
        let bundle = PolicyBundle {
            authz: vec![crate::policy::compile::tests::policy(
                "default",
                "deny-all",
                Some(app),
                crate::policy::model::Action::Deny,
                Some(vec![crate::policy::model::Rule::default()]),
            )],
            peer_authn: vec![],
        };
        let compiled = compile(&bundle, &self.registry, "istio-system", TD).unwrap();
        let gen = self.policies.borrow().generation() + 1;
        let view = PolicyView::from_compiled(gen, &compiled).unwrap();
        self.policies.send_replace(Arc::new(view));
    }
}

fn limits() -> ConnectionLimits {
    ConnectionLimits {
        max_connections: 1024,
        per_source: 1024,
        pending_heads_per_source: 64,
        head_timeout: Duration::from_secs(5),
    }
}

async fn roundtrip(s: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    s.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back))
        .await
        .expect("echo in time")
        .unwrap();
    back
}

/// Waits (bounded) until the metrics text contains `needle`.
async fn metric(metrics: &Metrics, needle: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = metrics.render();
        if text.contains(needle) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {needle} in:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[test]
fn outbound_hbone_destination_roundtrip_and_pool_reuse() {
    in_netns(|logs| async move {
        let mesh = Mesh::start("roundtrip").await;
        let pod = echo_pod(B1).await;
        for i in 0..3 {
            let mut c = mesh.connect(pod).await;
            let msg = format!("hello over hbone {i}");
            assert_eq!(roundtrip(&mut c, msg.as_bytes()).await, msg.as_bytes());
            c.shutdown().await.unwrap();
            let mut rest = Vec::new();
            c.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
        }
        // Three tunnels, one mTLS connection: the pool reused it.
        metric(
            &mesh.metrics,
            r#"mesh_hbone_streams_total{side="server",result="ok"} 3"#,
        )
        .await;
        let text = mesh.metrics.render();
        assert!(
            text.contains(r#"mesh_tls_handshakes_total{side="client",result="ok"} 1"#),
            "{text}"
        );
        // One record per connection on each side, with the bytes that crossed.
        for (message, sent, received) in [
            ("flow", "bytes_sent", "bytes_received"),
            ("inbound", "bytes_in", "bytes_out"),
        ] {
            let lines = logs.wait_for(message, 3).await;
            for (i, l) in lines.iter().enumerate() {
                let len = format!("hello over hbone {i}").len() as u64;
                assert_eq!(l["outcome"], "ok", "{l}");
                assert_eq!(l[sent].as_u64(), Some(len), "{l}");
                assert_eq!(l[received].as_u64(), Some(len), "{l}");
            }
        }
    });
}

#[test]
fn same_node_connections_take_the_destination_path() {
    in_netns(|logs| async move {
        let mesh = Mesh::start("local").await;
        let pod = echo_pod(C1).await;
        let mut c = mesh.connect(pod).await;
        assert_eq!(roundtrip(&mut c, b"local bytes").await, b"local bytes");
        // A deny for c at the destination: the next connection is closed without a byte.
        mesh.deny_all_to("c");
        let mut denied = mesh.connect(pod).await;
        let _ = denied.write_all(b"x").await;
        let mut buf = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(10), denied.read_to_end(&mut buf))
            .await
            .expect("closed in time");
        assert!(
            n.map_or(true, |n| n == 0),
            "denied connection carried bytes"
        );
        metric(
            &mesh.metrics,
            r#"mesh_policy_denials_total{layer="l4",side="local"} 1"#,
        )
        .await;
        // Both went through the destination path, each with one `flow` record: the live one
        // was closed by the new generation, with the bytes that had crossed.
        let flows = logs.wait_for("flow", 2).await;
        let with = |outcome: &str| {
            flows
                .iter()
                .find(|f| f["outcome"] == outcome)
                .unwrap_or_else(|| panic!("no flow with outcome {outcome}: {flows:?}"))
        };
        let closed = with("closed: no longer allowed by policy");
        assert_eq!(closed["transport"], "local", "{closed}");
        assert_eq!(closed["bytes_sent"].as_u64(), Some(11), "{closed}");
        assert_eq!(closed["bytes_received"].as_u64(), Some(11), "{closed}");
        let denied = with("denied by policy default/deny-all");
        assert_eq!(denied["bytes_sent"].as_u64(), Some(0), "{denied}");
    });
}

/// The destination path on its own: a policy that denies a live connection closes it with
/// the typed outcome, and the bytes that flowed before are counted; the audit log holds one
/// record of the closed connection (its bytes, the generation) and one of the next connection
/// denied at connect, with the deciding policy.
#[test]
fn a_policy_close_reports_its_outcome_and_the_bytes_that_flowed() {
    in_netns(|_| async {
        let mesh = Mesh::start("revoke").await;
        let audit_dir = TempDir::new("inproc-audit");
        let audit =
            crate::audit::AuditLog::start(crate::audit::AuditConfig::new("n1", &audit_dir.0))
                .expect("audit log");
        let pod = echo_pod(C1).await;
        let registry = &mesh.registry;
        let (src, dst) = (
            registry.by_ip(A1.parse().unwrap()).unwrap(),
            registry.by_ip(C1.parse().unwrap()).unwrap(),
        );
        let dest = Destination {
            policies: mesh.policies.subscribe(),
            metrics: Arc::clone(&mesh.metrics),
            admission: Admission::new(limits(), Arc::clone(&mesh.metrics)),
            source: SourceAddrs { v4: None, v6: None },
            connect_timeout: Duration::from_secs(5),
            path_normalization: Default::default(),
            audit: Some(audit.clone()),
        };
        let info = ConnInfo {
            src_workload: Some(src.id),
            src_identity: spiffe("sa-a"),
            src_addr: None,
            dst: pod,
            dst_workload: dst.id,
            dst_name: dst.key(),
            http: false,
        };
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (client, server) =
            tokio::join!(TcpStream::connect(l.local_addr().unwrap()), l.accept());
        let mut client = client.unwrap();
        let mut server = server.unwrap().0;
        let serving = async {
            dest.serve(
                Downstream::Local(&mut server),
                &info,
                A1.parse().unwrap(),
                1,
                Closed::never(),
            )
            .await
            .expect("admitted")
        };
        let driving = async {
            assert_eq!(roundtrip(&mut client, b"12345").await, b"12345");
            mesh.deny_all_to("c");
        };
        let (served, ()) = tokio::join!(serving, driving);
        assert_eq!(served.carried.outcome, Outcome::Revoked);
        assert_eq!(
            (served.carried.bytes_sent, served.carried.bytes_received),
            (5, 5)
        );
        // The next connection is denied at connect.
        let (_c2, s2) = tokio::join!(TcpStream::connect(l.local_addr().unwrap()), l.accept());
        let mut s2 = s2.unwrap().0;
        let denied = dest
            .serve(
                Downstream::Local(&mut s2),
                &info,
                A1.parse().unwrap(),
                2,
                Closed::never(),
            )
            .await
            .expect("admitted");
        assert!(matches!(denied.carried.outcome, Outcome::Denied { .. }));

        audit.shutdown("test").await;
        let records: Vec<serde_json::Value> =
            crate::audit::segment::list_segments(&audit_dir.0.join("audit"))
                .expect("segments")
                .iter()
                .flat_map(|(_, p)| {
                    std::fs::read_to_string(p)
                        .expect("segment")
                        .lines()
                        .map(str::to_owned)
                        .collect::<Vec<_>>()
                })
                .map(|l| serde_json::from_str(&l).expect("a JSON record"))
                .filter(|r: &serde_json::Value| r["kind"] == "connection")
                .collect();
        assert_eq!(records.len(), 2, "{records:#?}");
        let closed = &records[0];
        assert_eq!(closed["verdict"], "deny", "{closed}");
        assert_eq!(
            closed["outcome"], "closed: no longer allowed by policy",
            "{closed}"
        );
        assert_eq!(
            (
                closed["bytes_sent"].as_u64(),
                closed["bytes_received"].as_u64()
            ),
            (Some(5), Some(5)),
            "{closed}"
        );
        assert_eq!(closed["dst_workload"], dst.key(), "{closed}");
        let refused = &records[1];
        assert_eq!(
            (refused["verdict"].as_str(), refused["layer"].as_str()),
            (Some("deny"), Some("l4")),
            "{refused}"
        );
        assert_eq!(refused["policy"], "default/deny-all", "{refused}");
        assert!(
            refused["generation"].as_u64().is_some_and(|g| g > 0),
            "{refused}"
        );
        assert_eq!(
            refused["src_identity"],
            spiffe("sa-a").to_string(),
            "{refused}"
        );
    });
}

#[test]
fn connect_failure_upstream_is_reported_and_closes_the_client() {
    in_netns(|logs| async move {
        let mesh = Mesh::start("connect-fail").await;
        // Nothing listens there: the pod refuses.
        let closed = {
            let l = TcpListener::bind((B1.parse::<IpAddr>().unwrap(), 0))
                .await
                .unwrap();
            l.local_addr().unwrap()
        };
        let mut c = mesh.connect(closed).await;
        let _ = c.write_all(b"anyone?").await;
        let mut buf = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut buf))
            .await
            .expect("closed in time");
        assert!(n.map_or(true, |n| n == 0), "no pod, no bytes back");
        // The tunnel was refused by the destination (503 to the CONNECT).
        metric(
            &mesh.metrics,
            r#"mesh_hbone_streams_total{side="server",result="error"} 1"#,
        )
        .await;
        let inbound = &logs.wait_for("inbound", 1).await[0];
        let outcome = inbound["outcome"].as_str().unwrap_or_default();
        assert!(outcome.starts_with("connect to"), "{inbound}");
        let flow = &logs.wait_for("flow", 1).await[0];
        assert_ne!(flow["outcome"], "ok", "{flow}");
    });
}
