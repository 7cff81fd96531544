//! Private files: the authority's store and a node's credentials hold keys. Directories are
//! created 0700; files are written through a temporary file (created with the final mode,
//! synced, renamed into place), so readers see the old or the new content, never a mix.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// A file operation failed: what was done, on which path, and why.
#[derive(Debug, thiserror::Error)]
#[error("{op} {}: {source}", path.display())]
pub struct FileError {
    pub op: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

pub fn create_private_dir(dir: &Path) -> Result<(), FileError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| FileError {
            op: "creating directory",
            path: dir.to_path_buf(),
            source,
        })
}

pub fn read_string(path: &Path) -> Result<String, FileError> {
    fs::read_to_string(path).map_err(|source| FileError {
        op: "reading",
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `path` through a temporary file in the same directory, created with `mode`, synced
/// and renamed into place: readers see the old or the new content, never a mix.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), FileError> {
    let io_err = |op: &'static str, p: &Path| {
        let p = p.to_path_buf();
        move |source| FileError {
            op,
            path: p,
            source,
        }
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err("creating", &tmp))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(io_err("writing", &tmp))?;
    fs::rename(&tmp, path).map_err(io_err("renaming into place", path))
}

/// What identifies one version of a file without reading it: modification time, size and
/// inode (an editor's or `git checkout`'s rename changes the inode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    modified: std::time::SystemTime,
    len: u64,
    ino: u64,
}

impl Stamp {
    /// The stamp of `path`; `None` when it cannot be read.
    pub fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = fs::metadata(path).ok()?;
        Some(Self {
            modified: m.modified().ok()?,
            len: m.len(),
            ino: m.ino(),
        })
    }
}
