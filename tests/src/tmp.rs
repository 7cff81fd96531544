//! Temporary directories removed on drop.

use std::path::{Path, PathBuf};

/// A directory under the system temp dir, removed (recursively) on drop.
/// Set `MESH_TEST_KEEP_TMP=1` to keep it for inspection (its path is printed).
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `<tmp>/<name>`; panics if it exists already.
    #[track_caller]
    pub fn create(name: &str) -> Self {
        let path = std::env::temp_dir().join(name);
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("MESH_TEST_KEEP_TMP").is_some_and(|v| v == "1") {
            eprintln!("mesh-tests: keeping {}", self.path.display());
            return;
        }
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            eprintln!("mesh-tests: removing {}: {e}", self.path.display());
        }
    }
}
