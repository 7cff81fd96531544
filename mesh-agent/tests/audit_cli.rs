//! `mesh-agent audit verify|query` as a script sees it: exit codes, output, the key given.

use std::{fs, path::Path, process::Command, time::Duration};

use mesh_agent::audit::{
    checkpoint::AuditKey,
    record::{Entry, Kind, Verdict},
    segment::{list_segments, SegmentConfig, SegmentWriter, CHECKPOINTS_FILE, PUBLIC_KEY_FILE},
    ConnectionFields,
};

mod common;
use common::{run, BIN};

/// The log's writer (the key under `root/state/`, generated on first use).
fn writer(root: &Path, dir: &Path) -> SegmentWriter {
    let key = AuditKey::load_or_generate(
        &root.join("state/audit-key.pk8"),
        &dir.join(PUBLIC_KEY_FILE),
    )
    .unwrap();
    SegmentWriter::open(
        SegmentConfig {
            dir: dir.to_owned(),
            node: "n1".into(),
            max_bytes: 4096,
            max_age: Duration::from_secs(3600),
            checkpoint_interval: Duration::from_secs(3600),
            checkpoints: dir.join(CHECKPOINTS_FILE),
            forward: None,
        },
        key,
    )
    .unwrap()
    .0
}

/// A log of 30 records in several segments; the key under `state/`, public key exported.
fn log(root: &Path) -> std::path::PathBuf {
    let dir = root.join("audit");
    let mut w = writer(root, &dir);
    for i in 0..30u16 {
        let entry: Entry = ConnectionFields {
            verdict: Some(if i % 2 == 0 {
                Verdict::Allow
            } else {
                Verdict::Deny
            }),
            src_workload: Some("client/c".into()),
            dst_workload: Some(
                if i % 5 == 0 {
                    "shop/ledger"
                } else {
                    "front/web"
                }
                .into(),
            ),
            port: Some(8000 + i % 3),
            method: Some("DELETE".into()),
            policy: Some("shop/allow-ledger".into()),
            ..ConnectionFields::default()
        }
        .entry(Kind::Connection);
        w.append(&[entry]).unwrap();
    }
    w.checkpoint().unwrap();
    dir
}

#[test]
fn verify_exit_codes_ok_tampered_and_error() {
    let root = tempfile::tempdir().unwrap();
    let dir = log(root.path());
    let d = dir.to_str().unwrap();
    let key = root.path().join("registered.pub");
    fs::copy(dir.join(PUBLIC_KEY_FILE), &key).unwrap();
    let k = key.to_str().unwrap();

    let (code, out, err) = run(&["audit", "verify", d, "--key", k]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("ok: 30 records"), "{out}");

    let (code, out, _) = run(&["audit", "verify", d, "--key", k, "--output", "json"]);
    assert_eq!(code, 0);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["ok"], true);
    assert_eq!(report["records"], 30);

    // One byte edited in the middle segment.
    let seg = &list_segments(&dir).unwrap()[1].1;
    let text = fs::read_to_string(seg).unwrap();
    fs::write(seg, text.replacen("DELETE", "DELETF", 1)).unwrap();
    let (code, out, _) = run(&["audit", "verify", d, "--key", k, "--output", "json"]);
    assert_eq!(code, 1, "{out}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["first_bad"]["kind"], "chain_broken");
    assert_eq!(report["first_bad"]["file"], seg.display().to_string());
    assert_eq!(report["first_bad"]["line"], 1);
    let (code, out, _) = run(&["audit", "verify", d, "--key", k]);
    assert_eq!(code, 1);
    assert!(out.starts_with("TAMPERED: first bad record at "), "{out}");
    fs::write(seg, text).unwrap();

    // Usage and I/O errors: exit 2, with a message.
    let (code, _, err) = run(&["audit", "verify", "/nonexistent/audit"]);
    assert_eq!(code, 2);
    assert!(err.contains("not a directory"), "{err}");
    fs::write(root.path().join("bad.pub"), "not a key").unwrap();
    let bad = root.path().join("bad.pub");
    let (code, _, err) = run(&["audit", "verify", d, "--key", bad.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("Ed25519 public key"), "{err}");
    let (code, _, _) = run(&["audit", "verify"]);
    assert_eq!(code, 2);

    // Another key than the registered one: every checkpoint fails.
    let other = root.path().join("other");
    AuditKey::load_or_generate(&other.join("k.pk8"), &other.join("k.pub")).unwrap();
    let other_pub = other.join("k.pub");
    let (code, out, _) = run(&["audit", "verify", d, "--key", other_pub.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("not signed by the node's audit key"), "{out}");
}

#[test]
fn query_filters_and_prints_json_lines_as_written() {
    let root = tempfile::tempdir().unwrap();
    let dir = log(root.path());
    let d = dir.to_str().unwrap();
    let (code, out, err) = run(&[
        "audit",
        "query",
        d,
        "--dst",
        "shop/ledger",
        "--verdict",
        "allow",
        "--output",
        "json",
    ]);
    assert_eq!(code, 0, "{err}");
    let seqs: Vec<u64> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(seqs, [0, 10, 20]);
    // The lines are the records as written (a pipeline can ship them; they still chain).
    let seg0 = fs::read_to_string(&list_segments(&dir).unwrap()[0].1).unwrap();
    assert!(seg0.starts_with(out.lines().next().unwrap()));

    let (code, out, _) = run(&[
        "audit",
        "query",
        d,
        "--namespace",
        "front",
        "--port",
        "8001",
        "--kind",
        "connection",
        "--since",
        "2000-01-01T00:00:00Z",
        "--until",
        "2999-01-01T00:00:00Z",
    ]);
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 8, "{out}");
    assert!(
        lines[0].contains("#1 connection verdict=deny src=client/c dst=front/web port=8001"),
        "{out}"
    );

    let (code, out, _) = run(&["audit", "query", d, "--until", "2000-01-01T00:00:00Z"]);
    assert_eq!((code, out.as_str()), (0, ""));
    let (code, _, err) = run(&["audit", "query", d, "--since", "yesterday"]);
    assert_eq!(code, 2);
    assert!(err.contains("RFC 3339"), "{err}");
    let (code, _, _) = run(&["audit", "query", d, "--verdict", "maybe"]);
    assert_eq!(code, 2);
    let (code, _, err) = run(&["audit", "query", "/nonexistent/audit"]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn query_follow_prints_records_as_they_are_appended() {
    use std::io::BufRead as _;
    let root = tempfile::tempdir().unwrap();
    let dir = log(root.path());
    let mut child = Command::new(BIN)
        .args([
            "audit",
            "query",
            dir.to_str().unwrap(),
            "--follow",
            "--output",
            "json",
        ])
        .args(["--dst", "shop/ledger"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    // The first pass: every 5th record.
    for want in [0, 5, 10, 15, 20, 25] {
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the first pass");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["seq"], want);
    }
    // Appended after the first pass: only the follow loop can print it.
    let mut w = writer(root.path(), &dir);
    let entry = ConnectionFields {
        dst_workload: Some("shop/ledger".into()),
        method: Some("POST".into()),
        ..ConnectionFields::default()
    }
    .entry(Kind::Connection);
    w.append(&[entry]).unwrap();
    let line = rx.recv_timeout(Duration::from_secs(10));
    child.kill().unwrap();
    child.wait().unwrap();
    let line = line.expect("--follow printed the appended record within 10 s");
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        (v["seq"].as_u64(), v["method"].as_str()),
        (Some(30), Some("POST"))
    );
}
