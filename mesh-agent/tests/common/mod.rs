//! What the command-line tests share: running the real binary and naming paths.
#![allow(dead_code)] // each test crate uses its own part

use std::{path::Path, process::Command};

/// The `mesh-agent` binary cargo built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_mesh-agent");

/// Runs `mesh-agent args…` to completion: exit code (-1: killed by a signal), stdout, stderr.
pub fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A path as the `&str` an argument list takes.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
