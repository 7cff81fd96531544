//! cgroup v2 helpers: where the cgroup2 filesystem is mounted, resolving a
//! cgroup path given relative to that mount (refusing any escape from it),
//! and the cgroup id the kernel's BPF helpers report for a cgroup.
//!
//! The mount point is never hard-coded: it is `/sys/fs/cgroup` on most nodes
//! and `/sys/fs/cgroup/unified` on hosts with the hybrid layout.

use std::{
    ffi::OsString,
    fs, io,
    os::unix::{ffi::OsStringExt, fs::MetadataExt},
    path::{Component, Path, PathBuf},
};

use tracing::debug;

/// The mount table of the calling process.
const MOUNTINFO: &str = "/proc/self/mountinfo";

/// Why a cgroup could not be found or used.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// The mount table could not be read.
    #[error("reading {}: {source}", path.display())]
    Mountinfo {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// No `cgroup2` filesystem is listed in the mount table.
    #[error("no cgroup2 filesystem is mounted (none listed in {})", path.display())]
    NotMounted { path: PathBuf },
    /// The path leaves the cgroup2 mount (`..`, or a symbolic link out of it).
    #[error("cgroup path {} escapes the cgroup2 mount {}", rel.display(), root.display())]
    Escapes { root: PathBuf, rel: PathBuf },
    /// The path names the root cgroup itself, which holds every process of the host.
    #[error(
        "cgroup path {:?} names the root of the cgroup2 mount {}; it must name a cgroup below it",
        rel.display().to_string(),
        root.display()
    )]
    RootCgroup { root: PathBuf, rel: PathBuf },
    /// The cgroup directory does not exist.
    #[error("cgroup directory {} does not exist", path.display())]
    NotFound { path: PathBuf },
    /// The path exists but is not a directory, so it is not a cgroup.
    #[error("cgroup path {} is not a directory", path.display())]
    NotADirectory { path: PathBuf },
    /// Any other failure to inspect the cgroup directory.
    #[error("inspecting cgroup {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The mount point of the cgroup2 filesystem, from `/proc/self/mountinfo`
/// (the first one if several are mounted).
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let path = PathBuf::from(MOUNTINFO);
    let text = fs::read_to_string(&path).map_err(|source| CgroupError::Mountinfo {
        path: path.clone(),
        source,
    })?;
    let mount = parse_mountinfo_cgroup2(&text).ok_or(CgroupError::NotMounted { path })?;
    debug!(mount = %mount.display(), "found the cgroup2 mount");
    Ok(mount)
}

/// The mount point of the first `cgroup2` filesystem listed in `text`, in the
/// format of `/proc/<pid>/mountinfo` (proc(5)): `ID PARENT MAJ:MIN ROOT
/// MOUNT-POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER-OPTIONS`. Octal
/// escapes in the mount point (`\040` for a space) are decoded.
pub fn parse_mountinfo_cgroup2(text: &str) -> Option<PathBuf> {
    text.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        // The optional fields end with a lone "-", after the six fixed ones.
        let sep = 6 + fields.get(6..)?.iter().position(|f| *f == "-")?;
        let fstype = *fields.get(sep + 1)?;
        if fstype != "cgroup2" {
            return None;
        }
        let mount_point = *fields.get(4)?;
        Some(PathBuf::from(unescape_octal(mount_point)))
    })
}

/// Decodes the `\NNN` octal escapes the kernel writes for space, tab,
/// newline and backslash in mount table fields.
fn unescape_octal(field: &str) -> OsString {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            if let Some(code) = bytes.get(i + 1..i + 4).and_then(octal_byte) {
                out.push(code);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    OsString::from_vec(out)
}

/// Three octal digits as one byte, if they are three octal digits that fit.
fn octal_byte(digits: &[u8]) -> Option<u8> {
    digits.iter().try_fold(0u8, |acc, &d| {
        if (b'0'..=b'7').contains(&d) {
            acc.checked_mul(8)?.checked_add(d - b'0')
        } else {
            None
        }
    })
}

/// `rel` as a clean path relative to the cgroup2 mount `root`, checked
/// lexically only (the file system is not consulted).
///
/// `rel` may be relative (`mesh/n1/pods/a1`), start with `/` (which also
/// means relative to `root`), or be an absolute path inside `root`
/// (`/sys/fs/cgroup/mesh/n1/pods/a1`). `.` components are dropped; `..`
/// is refused, as is a path naming the root cgroup itself.
pub fn normalize(root: &Path, rel: &Path) -> Result<PathBuf, CgroupError> {
    let inside = if rel.is_absolute() {
        rel.strip_prefix(root).unwrap_or(rel)
    } else {
        rel
    };
    let mut clean = PathBuf::new();
    for c in inside.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(part) => clean.push(part),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(CgroupError::Escapes {
                    root: root.to_owned(),
                    rel: rel.to_owned(),
                });
            }
        }
    }
    if clean.as_os_str().is_empty() {
        return Err(CgroupError::RootCgroup {
            root: root.to_owned(),
            rel: rel.to_owned(),
        });
    }
    Ok(clean)
}

/// The directory of the cgroup `rel` under the cgroup2 mount `root` (see
/// [`normalize`] for the accepted forms of `rel`). It must exist, be a
/// directory, and stay inside `root` once symbolic links are followed.
pub fn resolve(root: &Path, rel: &Path) -> Result<PathBuf, CgroupError> {
    let path = root.join(normalize(root, rel)?);
    let meta = fs::metadata(&path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => CgroupError::NotFound { path: path.clone() },
        _ => CgroupError::Io {
            path: path.clone(),
            source,
        },
    })?;
    if !meta.is_dir() {
        return Err(CgroupError::NotADirectory { path });
    }
    let real = fs::canonicalize(&path).map_err(|source| CgroupError::Io {
        path: path.clone(),
        source,
    })?;
    let real_root = fs::canonicalize(root).map_err(|source| CgroupError::Io {
        path: root.to_owned(),
        source,
    })?;
    if !real.starts_with(&real_root) {
        return Err(CgroupError::Escapes {
            root: root.to_owned(),
            rel: rel.to_owned(),
        });
    }
    Ok(path)
}

/// The cgroup v2 id of the cgroup directory `path`: its inode number, which
/// is what `bpf_get_current_cgroup_id()` and `bpf_skb_cgroup_id()` return.
pub fn cgroup_id(path: &Path) -> Result<u64, CgroupError> {
    fs::metadata(path)
        .map(|m| m.ino())
        .map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => CgroupError::NotFound {
                path: path.to_owned(),
            },
            _ => CgroupError::Io {
                path: path.to_owned(),
                source,
            },
        })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A fresh directory under the system temp dir, removed on drop.
    pub(crate) struct TempDir(pub(crate) PathBuf);

    impl TempDir {
        pub(crate) fn new(tag: &str) -> Self {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            let dir = std::env::temp_dir().join(format!(
                "mesh-agent-{tag}-{}-{}-{nanos}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        pub(crate) fn mkdir(&self, rel: &str) -> PathBuf {
            let p = self.0.join(rel);
            fs::create_dir_all(&p).unwrap();
            p
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    const UNIFIED: &str = "\
22 27 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
26 22 0:24 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
27 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw,errors=remount-ro
";

    const HYBRID: &str = "\
25 22 0:23 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:4 - tmpfs tmpfs ro,mode=755
26 25 0:24 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:5 - cgroup2 cgroup2 rw,nsdelegate
27 25 0:25 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:6 - cgroup cgroup rw,xattr,name=systemd
28 25 0:26 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:7 - cgroup cgroup rw,cpu,cpuacct
";

    #[test]
    fn mountinfo_unified_layout() {
        assert_eq!(
            parse_mountinfo_cgroup2(UNIFIED),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
    }

    #[test]
    fn mountinfo_hybrid_layout() {
        assert_eq!(
            parse_mountinfo_cgroup2(HYBRID),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn mountinfo_escaped_mount_point_and_optional_fields() {
        let text = "\
40 26 0:24 /kubepods /mnt/my\\040cgroups\\134x rw,relatime shared:4 master:9 unbindable - cgroup2 cgroup2 rw
41 26 0:24 / /second rw - cgroup2 cgroup2 rw
";
        assert_eq!(
            parse_mountinfo_cgroup2(text),
            Some(PathBuf::from("/mnt/my cgroups\\x"))
        );
    }

    #[test]
    fn mountinfo_without_cgroup2() {
        let text = "\
27 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
28 25 0:26 / /sys/fs/cgroup/cpu rw shared:7 - cgroup cgroup rw,cpu
";
        assert_eq!(parse_mountinfo_cgroup2(text), None);
        assert_eq!(parse_mountinfo_cgroup2(""), None);
        // A mount point that merely looks like a cgroup2 type is not one.
        assert_eq!(
            parse_mountinfo_cgroup2("1 2 0:1 / /cgroup2 rw - tmpfs cgroup2 rw\n"),
            None
        );
        // Truncated lines are skipped, not misread.
        assert_eq!(parse_mountinfo_cgroup2("1 2 0:1 / /x\n- cgroup2\n"), None);
    }

    #[test]
    fn unescape_leaves_invalid_escapes() {
        assert_eq!(unescape_octal("a\\040b"), OsString::from("a b"));
        assert_eq!(unescape_octal("a\\09b"), OsString::from("a\\09b"));
        assert_eq!(unescape_octal("a\\777"), OsString::from("a\\777"));
        assert_eq!(unescape_octal("tail\\04"), OsString::from("tail\\04"));
    }

    #[test]
    fn normalize_forms() {
        let root = Path::new("/sys/fs/cgroup");
        let want = PathBuf::from("mesh/n1/pods/a1");
        for rel in [
            "mesh/n1/pods/a1",
            "/mesh/n1/pods/a1",
            "./mesh/./n1/pods/a1/",
            "/sys/fs/cgroup/mesh/n1/pods/a1",
        ] {
            assert_eq!(normalize(root, Path::new(rel)).unwrap(), want, "{rel}");
        }
        for rel in ["../etc", "mesh/../../x", "/..", "/sys/fs/cgroup/../x"] {
            assert!(
                matches!(
                    normalize(root, Path::new(rel)),
                    Err(CgroupError::Escapes { .. })
                ),
                "{rel}"
            );
        }
        for rel in ["", "/", ".", "/sys/fs/cgroup"] {
            assert!(
                matches!(
                    normalize(root, Path::new(rel)),
                    Err(CgroupError::RootCgroup { .. })
                ),
                "{rel}"
            );
        }
    }

    #[test]
    fn resolve_existing_directory() {
        let root = TempDir::new("cgroup-resolve");
        let dir = root.mkdir("mesh/n1/pods/a1");
        assert_eq!(resolve(&root.0, Path::new("mesh/n1/pods/a1")).unwrap(), dir);
        assert_eq!(
            resolve(&root.0, Path::new("/mesh/n1/pods/a1")).unwrap(),
            dir
        );
        assert_eq!(resolve(&root.0, &dir).unwrap(), dir);
    }

    #[test]
    fn resolve_refuses_missing_file_and_escapes() {
        let root = TempDir::new("cgroup-refuse");
        root.mkdir("mesh");
        fs::write(root.0.join("mesh/file"), b"").unwrap();

        let e = resolve(&root.0, Path::new("mesh/absent")).unwrap_err();
        assert!(
            matches!(&e, CgroupError::NotFound { path } if *path == root.0.join("mesh/absent"))
        );
        assert_eq!(
            e.to_string(),
            format!(
                "cgroup directory {}/mesh/absent does not exist",
                root.0.display()
            )
        );
        assert!(matches!(
            resolve(&root.0, Path::new("mesh/file")),
            Err(CgroupError::NotADirectory { .. })
        ));
        assert!(matches!(
            resolve(&root.0, Path::new("mesh/../..")),
            Err(CgroupError::Escapes { .. })
        ));
        assert!(matches!(
            resolve(&root.0, Path::new("/")),
            Err(CgroupError::RootCgroup { .. })
        ));

        // A symbolic link out of the root is an escape, even though the
        // path is lexically inside it.
        let outside = TempDir::new("cgroup-outside");
        std::os::unix::fs::symlink(&outside.0, root.0.join("mesh/link")).unwrap();
        let e = resolve(&root.0, Path::new("mesh/link")).unwrap_err();
        assert!(matches!(e, CgroupError::Escapes { .. }), "{e}");
        assert!(e.to_string().contains("escapes"), "{e}");
    }

    #[test]
    fn cgroup_id_is_the_inode_number() {
        let root = TempDir::new("cgroup-id");
        let a = root.mkdir("a");
        let b = root.mkdir("b");
        let ia = cgroup_id(&a).unwrap();
        assert_eq!(ia, fs::metadata(&a).unwrap().ino());
        assert_ne!(ia, 0);
        assert_ne!(ia, cgroup_id(&b).unwrap());
        assert!(matches!(
            cgroup_id(&root.0.join("absent")),
            Err(CgroupError::NotFound { .. })
        ));
    }
}
