//! Pinned `bpf_link`s: the attachments of the mesh programs to the pod cgroup parent outlive
//! the agent.
//!
//! Each program is attached through a cgroup `bpf_link` pinned as `link_<program>` in the pin
//! directory. A link pinned on bpffs stays attached after every process that held its fd has
//! exited (crash, SIGKILL, OOM kill, SIGTERM), so with no agent running the kernel keeps
//! capturing, refusing and enforcing: the mesh stays closed. A starting agent adopts the pinned
//! link; when its own build of the program differs (another instruction tag, or maps that were
//! re-created), it swaps the program on the existing link with `BPF_LINK_UPDATE` and
//! `BPF_F_REPLACE`, which the kernel does atomically — there is never a moment with no
//! program on the hook. Only [`uninstall`] detaches (`BPF_LINK_DETACH`) and unpins.
//!
//! aya creates links and pins them ([`aya::programs::links::FdLink::pin`]) but does not
//! expose link information, link update or link detach; the few `bpf(2)` commands needed for
//! those are issued here. This is the only other place in the agent with `unsafe` besides the
//! ring-buffer registration.

use std::{
    ffi::CString,
    fs, io,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
};

/// `enum bpf_cmd` values used here (include/uapi/linux/bpf.h).
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;
/// `BPF_LINK_UPDATE` flag: replace only if the link still runs `old_prog_fd`.
const BPF_F_REPLACE: u32 = 1 << 2;
/// `BPF_LINK_TYPE_CGROUP`.
const LINK_TYPE_CGROUP: u32 = 3;

/// `enum bpf_attach_type` values of the mesh's hooks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Hook {
    /// `BPF_CGROUP_INET_INGRESS`
    Ingress = 0,
    /// `BPF_CGROUP_SOCK_OPS`
    SockOps = 3,
    /// `BPF_CGROUP_INET4_CONNECT`
    Connect4 = 10,
    /// `BPF_CGROUP_INET6_CONNECT`
    Connect6 = 11,
}

/// A failed `bpf(2)` command on a pinned link or a program.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("{op} on {path}: {source}")]
    Syscall {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a cgroup bpf_link (link type {link_type})")]
    NotCgroupLink { path: PathBuf, link_type: u32 },
}

/// What the kernel says about a pinned link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkState {
    pub link_id: u32,
    pub prog_id: u32,
    pub cgroup_id: u64,
    pub attach_type: u32,
}

/// A pinned cgroup link, opened from its pin.
pub struct PinnedCgroupLink {
    fd: OwnedFd,
    path: PathBuf,
    pub state: LinkState,
}

/// The pin path of the link of `prog` in `pin_dir`.
pub fn pin_path(pin_dir: &Path, prog: &str) -> PathBuf {
    pin_dir.join(format!("{}{prog}", mesh_common::names::LINK_PIN_PREFIX))
}

/// The bpf_attr prefix every command here uses: at most 5 words.
#[repr(C, align(8))]
#[derive(Default)]
struct Attr([u32; 16]);

fn sys_bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a zero-initialised, 8-byte aligned buffer at least as large as the
    // union member the command reads; the kernel reads at most `size_of::<Attr>()` bytes and
    // checks that unused trailing bytes are zero.
    #[allow(unsafe_code)]
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut Attr,
            std::mem::size_of::<Attr>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn owned_fd(ret: libc::c_long) -> OwnedFd {
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    #[allow(unsafe_code)]
    unsafe {
        OwnedFd::from_raw_fd(ret as i32)
    }
}

/// `BPF_OBJ_GET_INFO_BY_FD` into a zeroed, u64-aligned buffer of 256 bytes.
fn object_info(fd: BorrowedFd<'_>) -> io::Result<[u64; 32]> {
    let mut info = [0u64; 32];
    let mut attr = Attr::default();
    attr.0[0] = fd.as_raw_fd() as u32;
    attr.0[1] = std::mem::size_of_val(&info) as u32;
    let ptr = info.as_mut_ptr() as u64;
    attr.0[2] = ptr as u32;
    attr.0[3] = (ptr >> 32) as u32;
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info)
}

fn word32(info: &[u64; 32], byte_offset: usize) -> u32 {
    let w = info[byte_offset / 8];
    if byte_offset.is_multiple_of(8) {
        w as u32
    } else {
        (w >> 32) as u32
    }
}

impl PinnedCgroupLink {
    /// Opens the link pinned at `path`; `Ok(None)` when nothing is pinned there.
    pub fn open(path: &Path) -> Result<Option<Self>, LinkError> {
        let err = |op, source| LinkError::Syscall {
            op,
            path: path.to_owned(),
            source,
        };
        let cpath = CString::new(path.as_os_str().as_bytes()).map_err(|e| {
            err(
                "BPF_OBJ_GET",
                io::Error::new(io::ErrorKind::InvalidInput, e),
            )
        })?;
        let mut attr = Attr::default();
        let ptr = cpath.as_ptr() as u64;
        attr.0[0] = ptr as u32;
        attr.0[1] = (ptr >> 32) as u32;
        let fd = match sys_bpf(BPF_OBJ_GET, &mut attr) {
            Ok(fd) => owned_fd(fd),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(err("BPF_OBJ_GET", e)),
        };
        // struct bpf_link_info { u32 type; u32 id; u32 prog_id; union { struct { u64
        // cgroup_id; u32 attach_type; } cgroup; … } } — the union is 8-byte aligned.
        let info = object_info(fd.as_fd()).map_err(|e| err("BPF_OBJ_GET_INFO_BY_FD", e))?;
        let link_type = word32(&info, 0);
        if link_type != LINK_TYPE_CGROUP {
            return Err(LinkError::NotCgroupLink {
                path: path.to_owned(),
                link_type,
            });
        }
        let state = LinkState {
            link_id: word32(&info, 4),
            prog_id: word32(&info, 8),
            cgroup_id: info[2],
            attach_type: word32(&info, 24),
        };
        Ok(Some(Self {
            fd,
            path: path.to_owned(),
            state,
        }))
    }

    /// The instruction tag of the program the link runs now.
    pub fn program_tag(&self) -> Result<u64, LinkError> {
        let prog = self.program_fd()?;
        program_tag(prog.as_fd()).map_err(|source| LinkError::Syscall {
            op: "BPF_OBJ_GET_INFO_BY_FD(prog)",
            path: self.path.clone(),
            source,
        })
    }

    fn program_fd(&self) -> Result<OwnedFd, LinkError> {
        let mut attr = Attr::default();
        attr.0[0] = self.state.prog_id;
        sys_bpf(BPF_PROG_GET_FD_BY_ID, &mut attr)
            .map(owned_fd)
            .map_err(|source| LinkError::Syscall {
                op: "BPF_PROG_GET_FD_BY_ID",
                path: self.path.clone(),
                source,
            })
    }

    /// Replaces the link's program with `new_prog`, atomically, only if it still runs the
    /// program it ran when opened (`BPF_F_REPLACE`). The link id stays the same.
    pub fn update(&mut self, new_prog: BorrowedFd<'_>) -> Result<(), LinkError> {
        let old = self.program_fd()?;
        let mut attr = Attr::default();
        attr.0[0] = self.fd.as_raw_fd() as u32;
        attr.0[1] = new_prog.as_raw_fd() as u32;
        attr.0[2] = BPF_F_REPLACE;
        attr.0[3] = old.as_raw_fd() as u32;
        sys_bpf(BPF_LINK_UPDATE, &mut attr).map_err(|source| LinkError::Syscall {
            op: "BPF_LINK_UPDATE",
            path: self.path.clone(),
            source,
        })?;
        let info = object_info(self.fd.as_fd()).map_err(|source| LinkError::Syscall {
            op: "BPF_OBJ_GET_INFO_BY_FD",
            path: self.path.clone(),
            source,
        })?;
        self.state.prog_id = word32(&info, 8);
        Ok(())
    }

    /// Detaches the program (`BPF_LINK_DETACH`: also for holders of other fds of the link)
    /// and removes the pin.
    pub fn detach_and_unpin(self) -> Result<(), LinkError> {
        let mut attr = Attr::default();
        attr.0[0] = self.fd.as_raw_fd() as u32;
        match sys_bpf(BPF_LINK_DETACH, &mut attr) {
            Ok(_) => {}
            // Already detached (its cgroup was removed): only the pin is left.
            Err(e) if e.raw_os_error() == Some(libc::ENOLINK) => {}
            Err(source) => {
                return Err(LinkError::Syscall {
                    op: "BPF_LINK_DETACH",
                    path: self.path.clone(),
                    source,
                })
            }
        }
        fs::remove_file(&self.path).map_err(|source| LinkError::Syscall {
            op: "unlink",
            path: self.path.clone(),
            source,
        })
    }
}

/// The instruction tag of a loaded program (`bpf_prog_info.tag`, bytes 8..16). The kernel
/// computes it over the instructions with map references blanked, so the same build gives the
/// same tag in every process.
pub fn program_tag(prog: BorrowedFd<'_>) -> io::Result<u64> {
    // struct bpf_prog_info { u32 type; u32 id; u8 tag[8]; … }
    let info = object_info(prog)?;
    Ok(info[1])
}

/// The cgroup id of a cgroup2 directory (its inode number).
pub fn cgroup_id(dir: &Path) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    Ok(fs::metadata(dir)?.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_paths_are_prefixed_per_program() {
        let p = pin_path(Path::new("/sys/fs/bpf/mesh"), "mesh_connect4");
        assert_eq!(p, Path::new("/sys/fs/bpf/mesh/link_mesh_connect4"));
    }

    #[test]
    fn opening_a_missing_pin_is_none_not_an_error() {
        // ENOENT comes back for a path that does not exist, on bpffs or not.
        let got = PinnedCgroupLink::open(Path::new("/nonexistent/mesh/link_x")).unwrap();
        assert!(got.is_none());
    }

    #[test]
    fn words_are_read_little_endian_within_u64s() {
        let mut info = [0u64; 32];
        info[0] = (7u64 << 32) | 1;
        info[1] = 9;
        assert_eq!(word32(&info, 0), 1);
        assert_eq!(word32(&info, 4), 7);
        assert_eq!(word32(&info, 8), 9);
    }
}
