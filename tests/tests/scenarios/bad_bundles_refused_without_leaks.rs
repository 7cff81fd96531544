//! 1,000 bad configuration bundles reach the authority one after the other (what a broken or
//! hostile pipeline could publish): truncated at every length step, one byte flipped at every
//! position step, junk appended, not JSON, empty, deeply nested, over the size limit, signed by
//! a key nobody trusts, and validly signed but older than the published version. Each one is
//! refused with a reason on its own log line; the published version stays; the authority's
//! descriptors and memory stay flat; both agents keep running version 1 with no refusal of
//! their own (nothing bad ever reached them). A good version 2 afterwards is applied at once.

use mesh_tests::{require_privileges, wait_for, DEFAULT_TIMEOUT};

use super::signed_common::{deny_a1, publish, signed_cluster, wait_active};

const REFUSED: &str = "state source refused as a whole; the published version stays";

fn refusals(cluster: &mesh_tests::Cluster) -> usize {
    cluster
        .authority()
        .log_lines()
        .iter()
        .filter(|l| l["message"] == REFUSED)
        .count()
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

#[test]
fn bad_bundles_refused_without_leaks() {
    require_privileges();
    let (cluster, agents, k1) = signed_cluster();
    let deny = deny_a1();
    // Version 2, well-formed and signed: what the bad ones are made from (never installed).
    let good = std::fs::read(cluster.build_bundle_file(
        &k1,
        2,
        &cluster.registry_entries(),
        cluster.services(),
        &[("deny.yaml", &deny)],
    ))
    .expect("read v2");
    let stranger = cluster.signer_key("stranger");
    let unknown = std::fs::read(cluster.build_bundle_file(
        &stranger,
        3,
        &cluster.registry_entries(),
        cluster.services(),
        &[],
    ))
    .expect("read stranger's");
    // Validly signed, but version 1 with other content than the published version 1.
    let replay = std::fs::read(cluster.build_bundle_file(
        &k1,
        1,
        &cluster.registry_entries(),
        cluster.services(),
        &[("deny.yaml", &deny)],
    ))
    .expect("read replay");

    let mut inputs: Vec<(String, Vec<u8>)> = Vec::new();
    let n = good.len();
    for i in 0..400 {
        let len = i * n / 400;
        inputs.push((format!("truncated to {len}"), good[..len].to_vec()));
    }
    for i in 0..500 {
        let at = i * n / 500;
        let mut b = good.clone();
        b[at] ^= 0x01;
        inputs.push((format!("byte {at} flipped"), b));
    }
    for (i, junk) in [
        "x",
        "}",
        "{}",
        "\0",
        "[]",
        "null",
        ",",
        "\"",
        "\u{feff}",
        "{\"bundle\":1}",
    ]
    .iter()
    .enumerate()
    {
        for copies in 1..=5 {
            let mut b = good.clone();
            b.extend(junk.repeat(copies).as_bytes());
            inputs.push((format!("junk {i} x{copies} appended"), b));
        }
    }
    let shapes: [(&str, Vec<u8>); 8] = [
        ("empty", Vec::new()),
        ("not JSON", b"nodes: []\nworkloads: []\n".to_vec()),
        ("a JSON string", b"\"bundle\"".to_vec()),
        (
            "deep nesting",
            format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)).into_bytes(),
        ),
        ("binary", (0..=255u8).cycle().take(4096).collect()),
        ("over 64 MiB", {
            let mut b = good.clone();
            b.resize(64 * 1024 * 1024 + 1, b'x');
            b
        }),
        ("stranger's signature", unknown),
        ("replayed version 1", replay),
    ];
    inputs.extend(shapes.into_iter().map(|(w, b)| (w.to_owned(), b)));
    while inputs.len() < 1000 {
        // More flips, at odd positions the even steps missed.
        let at = (inputs.len() * 7919) % n;
        let mut b = good.clone();
        b[at] ^= 0x20;
        inputs.push((format!("byte {at} case-flipped"), b));
    }
    assert!(inputs.len() >= 1000);

    let pid = cluster.authority().pid().expect("authority runs");
    // Warm up the refusal path once before measuring.
    let warm = cluster.tmp_dir().join("warm.json");
    std::fs::write(&warm, b"{").expect("write");
    let mut seen = refusals(&cluster);
    cluster.install_bundle(&warm);
    wait_for(DEFAULT_TIMEOUT, "the warm-up refusal", || {
        (refusals(&cluster) > seen).then_some(())
    });
    seen = refusals(&cluster);
    let (fds_before, rss_before) = (fds(pid), mesh_tests::sys::rss_kib(pid));
    let file = cluster.tmp_dir().join("bad.json");
    for (what, bytes) in &inputs {
        std::fs::write(&file, bytes).expect("write");
        cluster.install_bundle(&file);
        seen = wait_for(
            DEFAULT_TIMEOUT,
            &format!("the authority refuses: {what}"),
            || {
                let now = refusals(&cluster);
                (now > seen).then_some(now)
            },
        );
        assert_eq!(
            cluster.published_version(),
            1,
            "{what} was published: {}",
            cluster.authority().log_tail(5)
        );
    }
    // Every refusal says why.
    let reasons: Vec<String> = cluster
        .authority()
        .log_lines()
        .iter()
        .filter(|l| l["message"] == REFUSED)
        .map(|l| l["error"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(
        reasons.iter().all(|r| r.len() > 10),
        "a refusal without a reason"
    );
    for want in ["digest", "signer", "oversized", "rollback", "malformed"] {
        assert!(
            reasons.iter().any(|r| r.to_lowercase().contains(want)),
            "no refusal mentions {want:?}"
        );
    }
    let (fds_after, rss_after) = (fds(pid), mesh_tests::sys::rss_kib(pid));
    assert!(
        fds_after <= fds_before + 2,
        "authority descriptors grew: {fds_before} → {fds_after}"
    );
    assert!(
        rss_after < rss_before + 32 * 1024,
        "authority memory grew: {rss_before} → {rss_after} KiB"
    );
    assert_eq!(
        cluster.authority().pid(),
        Some(pid),
        "the authority restarted"
    );
    for i in 0..2 {
        assert_eq!(cluster.node(i).metric("mesh_config_active_version"), 1.0);
        assert_eq!(
            cluster
                .node(i)
                .metric(r#"mesh_config_rejected_total{reason="malformed"}"#),
            0.0,
            "a bad bundle reached n{}",
            i + 1
        );
    }
    // A good version 2 after all of it: published and applied on both nodes.
    publish(&cluster, &k1, 2, &[("deny.yaml", &deny)]);
    wait_active(&cluster, 2);
    assert!(agents.len() == 2);
}
