//! `mesh-agent authority …` as an operator runs it: the real binary, unprivileged, 127.0.0.1.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mesh_agent::identity::{AuthorityClient, NodeCredentials};
use mesh_agent::tls::Serial;

mod common;
use common::{run, s, BIN};

struct TempDir(PathBuf);
impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("mesh-cli-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap()
}

/// The next JSON log line of the authority whose `message` is `message` (earlier ones are
/// skipped); fails after 10 s without one.
fn wait_message(
    rx: &std::sync::mpsc::Receiver<serde_json::Value>,
    message: &str,
) -> serde_json::Value {
    loop {
        let v = rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("no log line {message:?}: {e}"));
        if v["message"] == message {
            return v;
        }
    }
}

const REGISTRY: &str = "workloads:
  - name: a1
    namespace: default
    serviceAccount: sa-a
    node: n1
    ips: [\"10.1.0.2\"]
nodes:
  - name: n1
    address: 10.0.0.1
";

#[test]
fn init_join_serve_revoke_roots() {
    let t = TempDir::new("all");
    let ca = t.0.join("ca");
    let n1 = t.0.join("n1");
    let reg = t.0.join("registry.yaml");
    std::fs::write(&reg, REGISTRY).unwrap();

    // Bad input: exit 2, a message naming the problem, nothing created.
    let (code, _, err) = run(&[
        "authority",
        "init",
        "--dir",
        s(&ca),
        "--trust-domain",
        "Bad/TD",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--trust-domain"), "{err}");
    assert!(!ca.exists());
    let (code, _, err) = run(&[
        "authority",
        "join",
        "--dir",
        s(&ca),
        "--node",
        "n1",
        "--out",
        s(&n1),
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("no authority there"), "{err}");

    let (code, out, err) = run(&[
        "authority",
        "init",
        "--dir",
        s(&ca),
        "--trust-domain",
        "cluster.local",
        "--output",
        "json",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["trust_domain"], "cluster.local");
    let (code, _, _) = run(&[
        "authority",
        "init",
        "--dir",
        s(&ca),
        "--trust-domain",
        "cluster.local",
    ]);
    assert_eq!(code, 2, "refuses to overwrite");
    let (code, _, err) = run(&[
        "authority",
        "join",
        "--dir",
        s(&ca),
        "--node",
        "N_1",
        "--out",
        s(&n1),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(!n1.exists());
    let (code, _, err) = run(&[
        "authority",
        "join",
        "--dir",
        s(&ca),
        "--node",
        "n1",
        "--out",
        s(&n1),
    ]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run(&["authority", "revoke", "--dir", s(&ca), "--serial", "xyz"]);
    assert_eq!(code, 2);
    assert!(err.contains("--serial"), "{err}");
    let (code, _, _) = run(&["authority", "roots", "--dir", s(&ca), "retire", "nothex"]);
    assert_eq!(code, 2);
    let missing = t.0.join("missing.yaml");
    let (code, _, err) = run(&[
        "authority",
        "serve",
        "--dir",
        s(&ca),
        "--listen",
        "127.0.0.1:0",
        "--registry",
        s(&missing),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("missing.yaml"), "{err}");

    // Serve; wait for the readiness line.
    let mut child = Command::new(BIN)
        .args([
            "--log-format",
            "json",
            "authority",
            "serve",
            "--dir",
            s(&ca),
            "--listen",
            "127.0.0.1:0",
            "--registry",
            s(&reg),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<serde_json::Value>();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str(&line) {
                let _ = tx.send(v);
            }
        }
    });
    let ready = wait_message(&rx, "authority ready");
    assert_eq!(ready["trust_domain"], "cluster.local");
    let addr = ready["listen"].as_str().unwrap().to_owned();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let creds = NodeCredentials::load(&n1).unwrap();
    let mut client = rt
        .block_on(AuthorityClient::connect(
            &addr,
            &creds.chain_pem,
            &creds.key_pem,
            &creds.bundle_pem,
        ))
        .unwrap();
    let id = "spiffe://cluster.local/ns/default/sa/sa-a".parse().unwrap();
    let cert = rt
        .block_on(client.sign(&id, Duration::from_secs(120)))
        .unwrap();

    // Revocation by another process is picked up within about a second.
    let serial = cert.serial().to_string();
    let (code, out, _) = run(&[
        "authority",
        "revoke",
        "--dir",
        s(&ca),
        "--serial",
        &serial,
        "--output",
        "json",
    ]);
    assert_eq!(code, 0);
    assert_eq!(json(&out)["newly_revoked"], true);
    let t0 = Instant::now();
    loop {
        let revoked: Vec<Serial> = rt.block_on(client.revocations()).unwrap();
        if revoked.contains(cert.serial()) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "revocation not picked up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Roots: add, list as JSON, served by the running service.
    let (code, out, _) = run(&[
        "authority",
        "roots",
        "--dir",
        s(&ca),
        "add",
        "--output",
        "json",
    ]);
    assert_eq!(code, 0);
    let new_root = json(&out)["root"].as_str().unwrap().to_owned();
    let (code, out, _) = run(&[
        "authority",
        "roots",
        "list",
        "--dir",
        s(&ca),
        "--output",
        "json",
    ]);
    assert_eq!(code, 0);
    assert_eq!(json(&out).as_array().unwrap().len(), 2);
    let t0 = Instant::now();
    while rt
        .block_on(client.bundle())
        .unwrap()
        .matches("BEGIN CERTIFICATE")
        .count()
        != 2
    {
        assert!(t0.elapsed() < Duration::from_secs(3), "new root not served");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, _, _) = run(&["authority", "roots", "--dir", s(&ca), "activate", &new_root]);
    assert_eq!(code, 0);

    // A broken file is logged and ignored; the service keeps its state. The warning is the
    // proof that a reload read the broken file (asserting before it would pass vacuously).
    std::fs::write(ca.join("revoked.txt"), "not a serial\n").unwrap();
    let refused = wait_message(
        &rx,
        "authority state on disk is invalid, keeping the current state",
    );
    let error = refused["error"].as_str().unwrap_or_default();
    assert!(error.contains("revoked.txt"), "{refused}");
    assert!(rt
        .block_on(client.revocations())
        .unwrap()
        .contains(cert.serial()));

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

#[test]
fn audit_key_registration_binds_one_key_per_node() {
    use mesh_agent::audit::checkpoint::AuditKey;
    let t = TempDir::new("auditkey");
    let ca = t.0.join("ca");
    let (code, _, err) = run(&[
        "authority",
        "init",
        "--dir",
        s(&ca),
        "--trust-domain",
        "cluster.local",
    ]);
    assert_eq!(code, 0, "{err}");
    let key = |name: &str| {
        let public = t.0.join(format!("{name}.pub"));
        let k = AuditKey::load_or_generate(&t.0.join(format!("{name}.pk8")), &public).unwrap();
        (public, k.public_hex())
    };
    let (k1, hex1) = key("k1");
    let (k2, hex2) = key("k2");
    let registered = ca.join("audit-nodes/n1/audit-key.pub");
    let register = |k: &Path, extra: &[&str]| {
        let mut args = vec![
            "authority",
            "audit-key",
            "--dir",
            s(&ca),
            "--node",
            "n1",
            "--key",
            s(k),
            "--output",
            "json",
        ];
        args.extend_from_slice(extra);
        run(&args)
    };

    let (code, out, err) = register(&k1, &[]);
    assert_eq!(code, 0, "{err}");
    let v = json(&out);
    assert_eq!(
        (v["changed"].as_bool(), v["key"].as_str()),
        (Some(true), Some(hex1.as_str()))
    );
    assert_eq!(std::fs::read_to_string(&registered).unwrap().trim(), hex1);
    // The same key again: nothing changes.
    let (code, out, _) = register(&k1, &[]);
    assert_eq!((code, json(&out)["changed"].as_bool()), (0, Some(false)));

    // Another key for the same node: refused, exit 2, the registered key kept.
    refused(register(&k2, &[]), "re-keying is an operator action");
    assert_eq!(std::fs::read_to_string(&registered).unwrap().trim(), hex1);

    // Bad input: exit 2 with a message naming it, nothing registered.
    let junk = t.0.join("junk.pub");
    std::fs::write(&junk, "not a key\n").unwrap();
    refused(register(&junk, &[]), "not an audit public key");
    refused(register(&t.0.join("missing.pub"), &[]), "missing.pub");
    refused(
        run(&[
            "authority",
            "audit-key",
            "--dir",
            s(&ca),
            "--node",
            "../n1",
            "--key",
            s(&k1),
        ]),
        "not a node name",
    );
    assert!(!ca.join("n1").exists());
    assert_eq!(std::fs::read_to_string(&registered).unwrap().trim(), hex1);

    // Re-keying is explicit.
    let (code, out, err) = register(&k2, &["--replace"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["replaced"].as_bool(), Some(true));
    assert_eq!(std::fs::read_to_string(&registered).unwrap().trim(), hex2);

    // At join: the key is registered with the credentials; another key later is refused
    // before any credentials are written.
    let join = |node: &str, key: &Path, out: &Path| {
        run(&[
            "authority",
            "join",
            "--dir",
            s(&ca),
            "--node",
            node,
            "--out",
            s(out),
            "--audit-key",
            s(key),
        ])
    };
    let (code, _, err) = join("n2", &k1, &t.0.join("n2"));
    assert_eq!(code, 0, "{err}");
    let n2_key = ca.join("audit-nodes/n2/audit-key.pub");
    assert_eq!(std::fs::read_to_string(&n2_key).unwrap().trim(), hex1);
    refused(
        join("n2", &k2, &t.0.join("n2-again")),
        "re-keying is an operator action",
    );
    assert!(!t.0.join("n2-again").exists());
    assert_eq!(std::fs::read_to_string(&n2_key).unwrap().trim(), hex1);
}

/// A command refused as bad input: exit 2, stderr naming `want`.
#[track_caller]
fn refused((code, _, err): (i32, String, String), want: &str) {
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(want), "{err} lacks {want:?}");
}
