//! Bounded polling: convergence is awaited, never slept for.

use std::time::{Duration, Instant};

/// What most waits allow before they fail.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between two polls.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Polls `f` until it returns `Some`, at most for `timeout`; `None` on timeout.
pub fn eventually<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Checks `check` at every poll until `until` (bounded by it): a condition that must keep
/// holding for a while, e.g. "nobody runs the version before its activation time". `check`
/// panics when it does not hold.
pub fn holds_until(until: Instant, mut check: impl FnMut()) {
    loop {
        check();
        let now = Instant::now();
        if now >= until {
            return;
        }
        std::thread::sleep(POLL_INTERVAL.min(until - now));
    }
}

/// Polls `f` until it returns `Some`; panics naming `what` after `timeout`.
#[track_caller]
pub fn wait_for<T>(timeout: Duration, what: &str, f: impl FnMut() -> Option<T>) -> T {
    match eventually(timeout, f) {
        Some(v) => v,
        None => panic!("timed out after {timeout:?} waiting for {what}"),
    }
}

/// Asserts that a condition becomes true within a bounded time, polling it.
///
/// ```no_run
/// # use mesh_tests::assert_eventually;
/// # let ready = || true;
/// assert_eventually!(ready(), "the agent never became ready");
/// assert_eventually!(timeout = std::time::Duration::from_secs(3), ready(), "still not ready: {}", 42);
/// ```
#[macro_export]
macro_rules! assert_eventually {
    (timeout = $timeout:expr, $cond:expr, $($msg:tt)+) => {{
        let timeout: ::std::time::Duration = $timeout;
        if $crate::poll::eventually(timeout, || if $cond { Some(()) } else { None }).is_none() {
            panic!(
                "condition `{}` still false after {:?}: {}",
                stringify!($cond),
                timeout,
                format_args!($($msg)+)
            );
        }
    }};
    ($cond:expr, $($msg:tt)+) => {
        $crate::assert_eventually!(timeout = $crate::poll::DEFAULT_TIMEOUT, $cond, $($msg)+)
    };
}
