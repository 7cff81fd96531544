//! The query index kept by the writer's indexer: lag, rotation, crashes, corruption,
//! concurrent readers and writers, the unindexed tail, query plans.

use std::{
    fs,
    path::Path,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use super::{
    index::{Filter, Index, INDEX_FILE},
    indexer,
    record::{Kind, Verdict},
    segment::SegmentWriter,
    tests::{build, entry, seg_cfg},
    AuditConfig, AuditLog,
};
use crate::audit::checkpoint::AuditKey;

/// `entry(i)` goes to `shop/ledger` on every 10th `i`.
fn ledger() -> Filter {
    Filter {
        dst: Some("shop/ledger".into()),
        ..Filter::default()
    }
}

fn seqs(hits: &[(super::record::Record, Vec<u8>)]) -> Vec<u64> {
    hits.iter().map(|(r, _)| r.seq).collect()
}

/// Polls `cond` every 10 ms for at most `limit`.
fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn log_cfg(state: &Path, segment_bytes: u64) -> AuditConfig {
    AuditConfig {
        fail_closed: true,
        segment_max_bytes: segment_bytes,
        ..AuditConfig::new("n1", state)
    }
}

/// What the index alone covers (no tail): the seq after the highest indexed one.
fn indexed_next(dir: &Path) -> u64 {
    Index::open_existing(dir, &dir.join(INDEX_FILE)).map_or(0, |i| i.next_seq().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_indexer_indexes_new_records_within_its_interval_across_rotations() {
    let state = tempfile::tempdir().unwrap();
    // Segments of 16 KiB: about 25 records each, so 500 records rotate ~20 times.
    let log = AuditLog::start(log_cfg(state.path(), 16 * 1024)).unwrap();
    let dir = state.path().join("audit");
    // Rounds of 50, each written before the next (a batch never spans segments).
    let stats = std::sync::Arc::clone(&log.stats().index);
    for round in 0..10 {
        for i in round * 50..(round + 1) * 50 {
            log.record(entry(i)).await.unwrap();
        }
        let want = (round + 1) * 50 + 1;
        assert!(wait_until(Duration::from_secs(10), || stats
            .written_next
            .load(Ordering::Relaxed)
            == want));
    }
    // agent_start is seq 0; entry(i) is seq i + 1.
    let t = Instant::now();
    assert!(
        wait_until(Duration::from_secs(10), || stats
            .written_next
            .load(Ordering::Relaxed)
            == 501
            && stats.lag() == 0),
        "lag {} after 10 s",
        stats.lag()
    );
    let caught_up = t.elapsed();
    // The interval plus one transaction; generous for a loaded debug build.
    assert!(
        caught_up < indexer::INTERVAL * 12,
        "the index trailed the log by {caught_up:?}"
    );
    assert_eq!(indexed_next(&dir), 501);
    assert!(super::segment::list_segments(&dir).unwrap().len() >= 3);
    // The index alone answers: every 10th entry, across the segments, in order.
    let index = Index::open_existing(&dir, &dir.join(INDEX_FILE)).unwrap();
    let want: Vec<u64> = (0..500).filter(|i| i % 10 == 0).map(|i| i + 1).collect();
    assert_eq!(seqs(&index.query(&ledger()).unwrap()), want);
    log.shutdown("test").await;
    // At stop the indexer caught up with agent_stop too.
    assert_eq!(indexed_next(&dir), 502);
    assert_eq!(stats.lag(), 0);
    assert!(stats.errors.load(Ordering::Relaxed) == 0);
}

#[test]
fn a_query_returns_the_unindexed_tail_without_writing_the_index() {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path(), 40, 4, 8 * 1024);
    let path = dir.path().join(INDEX_FILE);
    let mut index = Index::open(dir.path(), &path).unwrap();
    assert_eq!(index.update().unwrap().indexed, 40);
    // The writer appends 20 more (into a new segment too) that nobody indexes.
    let (mut w, _) = SegmentWriter::open(
        seg_cfg(dir.path(), 8 * 1024),
        AuditKey::ephemeral().unwrap(),
    )
    .unwrap();
    for i in 40..60 {
        w.append(&[entry(i)]).unwrap();
    }
    let mut only = entry(60);
    only.body.src_workload = Some("tail/only".into());
    w.append(&[only]).unwrap();
    let before = fs::read(&path).unwrap();
    let reader = Index::open_existing(dir.path(), &path).unwrap();
    assert_eq!(reader.next_seq().unwrap(), 40);
    assert_eq!(
        seqs(&reader.query(&ledger()).unwrap()),
        [0, 10, 20, 30, 40, 50, 60]
    );
    assert_eq!(
        seqs(&reader.query(&Filter::default()).unwrap()),
        (0..61).collect::<Vec<_>>()
    );
    // Limits and --follow's after_seq apply across the index and the tail.
    assert_eq!(
        seqs(
            &reader
                .query(&Filter {
                    after_seq: Some(35),
                    limit: Some(6),
                    ..Filter::default()
                })
                .unwrap()
        ),
        [36, 37, 38, 39, 40, 41]
    );
    assert_eq!(
        seqs(
            &reader
                .query(&Filter {
                    src: Some("client/c3".into()),
                    verdict: Some(Verdict::Allow),
                    ..Filter::default()
                })
                .unwrap()
        ),
        (0..60)
            .filter(|i| i % 7 == 3 && i % 3 == 0)
            .collect::<Vec<_>>()
    );
    // A value the index never saw still matches in the tail.
    assert_eq!(
        seqs(
            &reader
                .query(&Filter {
                    src: Some("tail/only".into()),
                    ..Filter::default()
                })
                .unwrap()
        ),
        [60]
    );
    assert_eq!(reader.next_seq().unwrap(), 40, "the reader wrote nothing");
    assert_eq!(
        fs::read(&path).unwrap(),
        before,
        "the index file was not written"
    );
}

#[test]
fn a_crash_mid_batch_leaves_an_index_the_next_update_completes() {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path(), 200, 8, 16 * 1024);
    let path = dir.path().join(INDEX_FILE);
    let mut index = Index::open(dir.path(), &path).unwrap();
    // Two committed batches of ~4 KiB, then a batch that never commits.
    index.update_step(4096).unwrap();
    index.update_step(4096).unwrap();
    let committed = index.next_seq().unwrap();
    assert!(committed > 0 && committed < 200);
    {
        // A "crash" mid-batch: rows written to the WAL (a tiny cache spills them), positions
        // moved, no commit; the image of the files at that moment is copied.
        let db = rusqlite::Connection::open(&path).unwrap();
        db.execute_batch("PRAGMA cache_size = 1; BEGIN IMMEDIATE;")
            .unwrap();
        for seq in committed..committed + 5000 {
            db.execute(
                "INSERT INTO records (seq, time_ns, kind, segment, offset, len) VALUES (?1, 0, 'connection', 0, 0, 1)",
                [seq as i64],
            )
            .unwrap();
        }
        db.execute(
            "UPDATE segments SET indexed_bytes = indexed_bytes + 100000",
            [],
        )
        .unwrap();
        let crash = tempfile::tempdir().unwrap();
        for f in fs::read_dir(dir.path()).unwrap() {
            let f = f.unwrap();
            let name = f.file_name();
            if name.to_string_lossy().ends_with("-shm") {
                continue; // shared memory does not survive a crash
            }
            fs::copy(f.path(), crash.path().join(&name)).unwrap();
        }
        drop(db);
        // The next start (or query) on the crashed image: the batch never happened.
        let mut after = Index::open(crash.path(), &crash.path().join(INDEX_FILE)).unwrap();
        assert_eq!(after.next_seq().unwrap(), committed);
        let s = after.update().unwrap();
        assert_eq!(s.indexed, 200 - committed);
        assert!(!s.rebuilt);
        assert_eq!(
            seqs(&after.query(&Filter::default()).unwrap()),
            (0..200).collect::<Vec<_>>()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_index_file_is_rebuilt_from_the_segments() {
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().join("audit");
    let log = AuditLog::start(log_cfg(state.path(), 16 * 1024)).unwrap();
    for i in 0..100 {
        log.record(entry(i)).await.unwrap();
    }
    log.shutdown("first").await;
    assert_eq!(indexed_next(&dir), 102);
    // Garbage over the whole file (and its WAL gone): not a database any more.
    let path = dir.join(INDEX_FILE);
    fs::write(&path, vec![0x5a; 64 * 1024]).unwrap();
    let _ = fs::remove_file(dir.join("index.sqlite-wal"));
    let _ = fs::remove_file(dir.join("index.sqlite-shm"));
    // The query of an offline log recreates it.
    let (mut index, recreated) = Index::open_or_recreate(&dir, &path).unwrap();
    assert!(recreated);
    index.update().unwrap();
    assert_eq!(seqs(&index.query(&ledger()).unwrap()).len(), 10);
    drop(index);
    // So does the indexer of the next agent.
    fs::write(
        &path,
        b"SQLite format 3\0 but not really, this is garbage".repeat(200),
    )
    .unwrap();
    let log = AuditLog::start(log_cfg(state.path(), 16 * 1024)).unwrap();
    let stats = std::sync::Arc::clone(&log.stats().index);
    for i in 100..110 {
        log.record(entry(i)).await.unwrap();
    }
    log.shutdown("second").await;
    assert!(stats.rebuilds.load(Ordering::Relaxed) >= 1);
    let index = Index::open_existing(&dir, &path).unwrap();
    // 0..100 → seqs 1..=100, stop 101, start 102, 100..110 → 103..=112, stop 113.
    assert_eq!(index.next_seq().unwrap(), 114);
    let want: Vec<u64> = [1, 11, 21, 31, 41, 51, 61, 71, 81, 91, 103].to_vec();
    assert_eq!(seqs(&index.query(&ledger()).unwrap()), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_while_the_writer_ingests_are_exact_without_duplicates_or_lock_errors() {
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().join("audit");
    let log = AuditLog::start(log_cfg(state.path(), 64 * 1024)).unwrap();
    const N: u64 = 30_000;
    let feeder = {
        let log = log.clone();
        tokio::spawn(async move {
            for i in 0..N {
                log.record(entry(i)).await.unwrap();
                if i % 2_000 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    let reader_dir = dir.clone();
    let reader = std::thread::spawn(move || {
        let path = reader_dir.join(INDEX_FILE);
        let mut queries = 0;
        let mut longest = 0;
        let end = Instant::now() + Duration::from_secs(60);
        while Instant::now() < end {
            let Some(index) = Index::open_existing(&reader_dir, &path) else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            let got = seqs(&index.query(&ledger()).expect("no lock or stale error"));
            queries += 1;
            // Exactly the ledger records up to the last one seen: no gap, no duplicate.
            let last = got.last().copied().unwrap_or(0);
            let want: Vec<u64> = (0..N)
                .filter(|i| i % 10 == 0)
                .map(|i| i + 1)
                .take_while(|s| *s <= last)
                .collect();
            assert_eq!(got, want);
            longest = longest.max(got.len());
            if got.len() == N as usize / 10 {
                break;
            }
        }
        (queries, longest)
    });
    feeder.await.unwrap();
    let (queries, longest) = tokio::task::spawn_blocking(move || reader.join().unwrap())
        .await
        .unwrap();
    assert_eq!(longest, N as usize / 10);
    assert!(queries > 1, "{queries} queries");
    log.shutdown("test").await;
    let errors = log.stats().index.errors.load(Ordering::Relaxed);
    assert_eq!(errors, 0);
    // Offline now: a second updater finds nothing to add.
    let mut index = Index::open(&dir, &dir.join(INDEX_FILE)).unwrap();
    assert_eq!(index.update().unwrap().indexed, 0);
    assert_eq!(index.next_seq().unwrap(), N + 2);
}

#[test]
fn two_updaters_at_once_never_duplicate_a_row() {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path(), 3_000, 16, 64 * 1024);
    let path = dir.path().join(INDEX_FILE);
    drop(Index::open(dir.path(), &path).unwrap());
    let run = |budget: u64| {
        let (d, p) = (dir.path().to_owned(), path.clone());
        std::thread::spawn(move || {
            let mut index = Index::open(&d, &p).unwrap();
            let mut n = 0;
            loop {
                let s = index.update_step(budget).unwrap();
                n += s.indexed;
                if !s.more {
                    return n;
                }
            }
        })
    };
    let (a, b) = (run(8 * 1024), run(20 * 1024));
    let total = a.join().unwrap() + b.join().unwrap();
    assert_eq!(total, 3_000, "each record indexed exactly once");
    let db = rusqlite::Connection::open(&path).unwrap();
    let rows: i64 = db
        .query_row("SELECT COUNT(*) FROM records", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 3_000);
    let index = Index::open_existing(dir.path(), &path).unwrap();
    assert_eq!(
        seqs(&index.query(&Filter::default()).unwrap()),
        (0..3_000).collect::<Vec<_>>()
    );
}

#[test]
fn the_selective_filters_use_an_index() {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path(), 200, 8, 64 * 1024);
    let mut index = Index::open(dir.path(), &dir.path().join(INDEX_FILE)).unwrap();
    index.update().unwrap();
    let plan = |f: Filter| index.plan(&f).unwrap().join("; ");
    let p = plan(Filter {
        src: Some("client/c3".into()),
        dst: Some("shop/ledger".into()),
        verdict: Some(Verdict::Deny),
        ..Filter::default()
    });
    assert!(
        p.contains("USING INDEX records_src_wl (src_wl=? AND dst_wl=? AND verdict=?)"),
        "{p}"
    );
    assert!(!p.contains("TEMP B-TREE"), "no sort: {p}");
    let p = plan(Filter {
        src: Some("spiffe://td/ns/client/sa/c3".into()),
        dst: Some("spiffe://td/ns/shop/sa/ledger".into()),
        ..Filter::default()
    });
    assert!(
        p.contains("USING INDEX records_src_id (src_id=? AND dst_id=?)"),
        "{p}"
    );
    let p = plan(Filter {
        dst: Some("shop/ledger".into()),
        verdict: Some(Verdict::Allow),
        ..Filter::default()
    });
    assert!(
        p.contains("USING INDEX records_dst_wl (dst_wl=? AND verdict=?)"),
        "{p}"
    );
    let p = plan(Filter {
        kind: Some(Kind::Connection),
        src: Some("no/such-workload".into()),
        ..Filter::default()
    });
    assert!(p.starts_with("no rows"), "{p}");
}
