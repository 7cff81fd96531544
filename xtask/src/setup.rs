//! Prerequisites, checked cheaply and installed only when missing:
//! Debian's rustc-web toolchain for the kernel programs,
//! bpf-linker 0.13.0 linked to the same LLVM (22), bpftool/iperf3/iproute2,
//! the bpffs mount and a cgroup2 mount.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::{build::cargo, proc};

/// Debian packages: the kernel-program toolchain, then the runtime tools
/// (bpftool to inspect, iperf3 for the bench, iproute2 for the harness).
pub const APT_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "rust-web-llvm",
    "llvm-22-dev",
    "bpftool",
    "iperf3",
    "iproute2",
    // A C compiler: ring's and the bundled SQLite's (the audit index) build scripts.
    "gcc",
    "libc6-dev",
];
/// The packages that make up the rustc-web toolchain (upgraded together).
const RUSTC_WEB_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "rust-web-llvm",
];
/// rustc-web's LLVM must be the one bpf-linker links against.
const LLVM_MAJOR: &str = "22";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const BPF_CORE_LIB: &str = "/usr/lib/rustlib/bpfel-unknown-none/lib";
const BPF_LINKER_VERSION: &str = "0.13.0";
const BPF_LINKER_FEATURE: &str = "llvm-22";
const BPFFS: &str = "/sys/fs/bpf";

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// What `cargo build` needs.
    Toolchain,
    /// Also the runtime: bpffs mounted, cgroup2 present (needs root to fix).
    Everything,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Verbosity {
    /// One line per prerequisite (`cargo xtask setup`).
    Report,
    /// Only what was installed or mounted (the other tasks).
    Quiet,
}

struct Progress {
    verbosity: Verbosity,
    changed: Vec<String>,
    apt_updated: bool,
}

impl Progress {
    fn present(&self, what: &str) {
        if self.verbosity == Verbosity::Report {
            println!("setup: ok       {what}");
        }
    }

    fn did(&mut self, what: String) {
        println!("setup: DONE     {what}");
        self.changed.push(what);
    }

    fn apt_update(&mut self) -> Result<()> {
        if !self.apt_updated {
            proc::run(apt_get().arg("update"))?;
            self.apt_updated = true;
        }
        Ok(())
    }
}

/// Check every prerequisite in `scope`; install or mount what is missing.
pub fn ensure(scope: Scope, verbosity: Verbosity) -> Result<()> {
    let mut p = Progress {
        verbosity,
        changed: Vec::new(),
        apt_updated: false,
    };
    apt_packages(&mut p)?;
    rustc_web(&mut p)?;
    rustup(&p)?;
    bpf_linker(&mut p)?;
    if scope == Scope::Everything {
        bpffs(&mut p)?;
        cgroup2(&p)?;
    }
    match (verbosity, p.changed.is_empty()) {
        (Verbosity::Report, true) => {
            println!("setup: everything was already in place; nothing to do")
        }
        (_, false) => println!("setup: installed/mounted: {}", p.changed.join("; ")),
        (Verbosity::Quiet, true) => {}
    }
    Ok(())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

pub fn require_root(task: &str) -> Result<()> {
    if !is_root() {
        bail!(
            "`{task}` loads eBPF programs and creates network namespaces: run it as root \
             (e.g. `sudo -E env PATH=\"$PATH\" {task}`)"
        );
    }
    Ok(())
}

fn apt_get() -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive");
    cmd
}

/// Packages among `pkgs` that dpkg does not report as "install ok installed".
fn missing_packages(pkgs: &[&str]) -> Result<Vec<String>> {
    let mut cmd = Command::new("dpkg-query");
    cmd.args(["-W", "-f=${Package}\t${Status}\n"]).args(pkgs);
    // dpkg-query exits 1 when some package is unknown; the output still
    // lists the known ones, so the status is not checked.
    let Some(out) = proc::output(&mut cmd)? else {
        bail!(
            "dpkg-query not found: `cargo xtask setup` supports Debian (bookworm) hosts; \
             elsewhere install by hand: {} and bpf-linker {BPF_LINKER_VERSION}",
            APT_PACKAGES.join(" ")
        );
    };
    Ok(not_installed(&String::from_utf8_lossy(&out.stdout), pkgs))
}

/// The packages of `pkgs` that no `name[:arch]\tinstall ok installed` line
/// of a dpkg-query listing marks installed.
fn not_installed(listing: &str, pkgs: &[&str]) -> Vec<String> {
    let installed = |pkg: &str| {
        listing.lines().any(|l| {
            l.split_once('\t').is_some_and(|(name, status)| {
                name.split(':').next() == Some(pkg) && status.trim() == "install ok installed"
            })
        })
    };
    pkgs.iter()
        .filter(|p| !installed(p))
        .map(|p| (*p).to_owned())
        .collect()
}

fn apt_packages(p: &mut Progress) -> Result<()> {
    let missing = missing_packages(APT_PACKAGES)?;
    if missing.is_empty() {
        p.present(&format!("apt packages: {}", APT_PACKAGES.join(" ")));
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing apt packages: {}; run `cargo xtask setup` as root to install them",
            missing.join(" ")
        );
    }
    p.apt_update()?;
    proc::run(apt_get().args(["install", "-y"]).args(&missing))?;
    let still = missing_packages(APT_PACKAGES)?;
    if !still.is_empty() {
        bail!(
            "apt-get install finished but these are still not installed: {}",
            still.join(" ")
        );
    }
    p.did(format!("apt-get install {}", missing.join(" ")));
    Ok(())
}

/// `LLVM version: 22.1.8` → `22`.
fn llvm_major_of(rustc_vv: &str) -> Option<&str> {
    rustc_vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
}

fn debian_rustc_llvm() -> Result<Option<String>> {
    let out = proc::output(Command::new(DEBIAN_RUSTC).arg("-vV"))?;
    Ok(out
        .filter(|o| o.status.success())
        .and_then(|o| llvm_major_of(&String::from_utf8_lossy(&o.stdout)).map(str::to_owned)))
}

/// The packages can be installed yet too old (bookworm's main archive has
/// rustc-web 1.85 with LLVM 19; bookworm-security has 1.96 with LLVM 22).
fn rustc_web(p: &mut Progress) -> Result<()> {
    let mut llvm = debian_rustc_llvm()?;
    if llvm.as_deref() != Some(LLVM_MAJOR) {
        if !is_root() {
            bail!(
                "{DEBIAN_RUSTC} (rustc-web) reports LLVM {}, need LLVM {LLVM_MAJOR}: run \
                 `cargo xtask setup` as root to upgrade it",
                llvm.as_deref().unwrap_or("<none>")
            );
        }
        p.apt_update()?;
        proc::run(
            apt_get()
                .args(["install", "-y", "--only-upgrade"])
                .args(RUSTC_WEB_PACKAGES),
        )?;
        llvm = debian_rustc_llvm()?;
        if llvm.as_deref() != Some(LLVM_MAJOR) {
            bail!(
                "{DEBIAN_RUSTC} still reports LLVM {} after upgrading; the kernel programs need \
                 rustc-web with LLVM {LLVM_MAJOR} (bookworm-security): check the apt sources",
                llvm.as_deref().unwrap_or("<none>")
            );
        }
        p.did(format!(
            "upgraded {} to LLVM {LLVM_MAJOR}",
            RUSTC_WEB_PACKAGES.join(" ")
        ));
    } else {
        p.present(&format!("{DEBIAN_RUSTC}: LLVM {LLVM_MAJOR}"));
    }
    if !Path::new(BPF_CORE_LIB).is_dir() {
        bail!("{BPF_CORE_LIB} is missing although libstd-rust-web-dev-bpf is installed");
    }
    Ok(())
}

/// aya-build runs the kernel build as `rustup run /usr cargo`.
fn rustup(p: &Progress) -> Result<()> {
    match proc::output(Command::new("rustup").arg("--version"))? {
        Some(o) if o.status.success() => {
            p.present("rustup (aya-build runs `rustup run /usr cargo`)");
            Ok(())
        }
        _ => bail!(
            "rustup not found on PATH: mesh-agent's build script runs Debian's cargo as \
             `rustup run /usr cargo`"
        ),
    }
}

fn cargo_home() -> Option<PathBuf> {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// Why the bpf-linker on PATH is not the one we need, or `None` if it is.
fn bpf_linker_problem() -> Result<Option<String>> {
    let Some(path) = which("bpf-linker") else {
        return Ok(Some("bpf-linker not found on PATH".into()));
    };
    let Some(out) = proc::output(Command::new(&path).arg("--version"))? else {
        return Ok(Some("bpf-linker not found".into()));
    };
    if !out.status.success() {
        // Typically libLLVM no longer loads.
        return Ok(Some(format!(
            "`{} --version` failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text.split_whitespace().nth(1).unwrap_or("");
    if version != BPF_LINKER_VERSION {
        return Ok(Some(format!("{} is {}", path.display(), text.trim())));
    }
    // If cargo installed it, its record says which LLVM it was built for.
    let home_bin = cargo_home().map(|h| h.join("bin").join("bpf-linker"));
    if home_bin.as_deref() == Some(path.as_path()) {
        if let Some(features) = installed_features("bpf-linker", BPF_LINKER_VERSION) {
            if !features.iter().any(|f| f == BPF_LINKER_FEATURE) {
                return Ok(Some(format!(
                    "bpf-linker {BPF_LINKER_VERSION} was built with features {features:?}, \
                     not {BPF_LINKER_FEATURE}"
                )));
            }
        }
    }
    Ok(None)
}

/// Features recorded by `cargo install` in `$CARGO_HOME/.crates2.json`.
fn installed_features(krate: &str, version: &str) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(cargo_home()?.join(".crates2.json")).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    let prefix = format!("{krate} {version} ");
    let (_, entry) = json["installs"]
        .as_object()?
        .iter()
        .find(|(k, _)| k.starts_with(&prefix))?;
    Some(
        entry["features"]
            .as_array()?
            .iter()
            .filter_map(|f| f.as_str().map(str::to_owned))
            .collect(),
    )
}

fn bpf_linker(p: &mut Progress) -> Result<()> {
    let Some(problem) = bpf_linker_problem()? else {
        p.present(&format!(
            "bpf-linker {BPF_LINKER_VERSION} ({BPF_LINKER_FEATURE})"
        ));
        return Ok(());
    };
    println!("setup: {problem}: installing bpf-linker {BPF_LINKER_VERSION} (about a minute)");
    let mut cmd = cargo();
    cmd.env("LLVM_PREFIX", LLVM_PREFIX)
        // Outside the workspace, so its config and lock file play no part.
        .current_dir(std::env::temp_dir())
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
        ])
        .args([
            "--no-default-features",
            "--features",
            BPF_LINKER_FEATURE,
            "--force",
        ]);
    proc::run(&mut cmd)?;
    // `cargo install` puts it in $CARGO_HOME/bin, which may not be on PATH
    // (e.g. under sudo): add it for this run and the builds it starts.
    if which("bpf-linker").is_none() {
        if let Some(bin) = cargo_home().map(|h| h.join("bin")) {
            eprintln!(
                "setup: note: {} is not on PATH; add it to your shell's PATH",
                bin.display()
            );
            let mut dirs: Vec<PathBuf> = vec![bin];
            dirs.extend(std::env::split_paths(
                &std::env::var_os("PATH").unwrap_or_default(),
            ));
            let joined: OsString = std::env::join_paths(dirs).context("joining PATH")?;
            std::env::set_var("PATH", joined);
        }
    }
    if let Some(problem) = bpf_linker_problem()? {
        bail!("after `cargo install bpf-linker`: {problem}");
    }
    p.did(format!(
        "cargo install bpf-linker {BPF_LINKER_VERSION} --features {BPF_LINKER_FEATURE}"
    ));
    Ok(())
}

/// One line of /proc/self/mountinfo: (mount point, filesystem type).
fn mounts() -> Result<Vec<(PathBuf, String)>> {
    let text =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(text.lines().filter_map(parse_mountinfo_line).collect())
}

fn parse_mountinfo_line(line: &str) -> Option<(PathBuf, String)> {
    // id parent maj:min root MOUNT_POINT options [optional…] - FSTYPE source superopts
    let (pre, post) = line.split_once(" - ")?;
    let mount_point = pre.split(' ').nth(4)?;
    let fstype = post.split(' ').next()?;
    Some((
        PathBuf::from(unescape_octal(mount_point)),
        fstype.to_owned(),
    ))
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        if let (b'\\', Some(d)) = (bytes[i], octal) {
            // At most \377 in practice; wrapping keeps malformed input harmless.
            let v = (d[0] - b'0')
                .wrapping_mul(64)
                .wrapping_add((d[1] - b'0') * 8 + (d[2] - b'0'));
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn bpffs_mounted() -> Result<bool> {
    Ok(mounts()?
        .iter()
        .any(|(mp, ty)| mp == Path::new(BPFFS) && ty == "bpf"))
}

fn bpffs(p: &mut Progress) -> Result<()> {
    if bpffs_mounted()? {
        p.present(&format!("bpffs mounted at {BPFFS}"));
        return Ok(());
    }
    if !is_root() {
        bail!("no bpffs at {BPFFS}; run `cargo xtask setup` as root to mount it");
    }
    std::fs::create_dir_all(BPFFS).with_context(|| format!("creating {BPFFS}"))?;
    proc::run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))?;
    if !bpffs_mounted()? {
        bail!("mounted bpffs at {BPFFS} but /proc/self/mountinfo does not show it");
    }
    p.did(format!("mount -t bpf bpf {BPFFS}"));
    Ok(())
}

/// The cgroup2 mount point (the pod cgroups live under it).
pub fn cgroup2_mount() -> Result<Option<PathBuf>> {
    Ok(mounts()?
        .into_iter()
        .find(|(_, ty)| ty == "cgroup2")
        .map(|(mp, _)| mp))
}

fn cgroup2(p: &Progress) -> Result<()> {
    match cgroup2_mount()? {
        Some(mp) => {
            p.present(&format!("cgroup2 mounted at {}", mp.display()));
            Ok(())
        }
        None => bail!(
            "no cgroup2 mount in /proc/self/mountinfo: the mesh attaches its programs to cgroup v2 \
             (mount one, e.g. `mount -t cgroup2 none /sys/fs/cgroup`, or boot with the unified \
             or hybrid hierarchy)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines() {
        let l = "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw";
        assert_eq!(
            parse_mountinfo_line(l),
            Some((PathBuf::from("/sys/fs/cgroup/unified"), "cgroup2".into()))
        );
        let l = "42 23 0:39 / /sys/fs/bpf rw,relatime shared:7 - bpf bpf rw";
        assert_eq!(
            parse_mountinfo_line(l),
            Some((PathBuf::from("/sys/fs/bpf"), "bpf".into()))
        );
        let l = "50 23 0:40 / /mnt/a\\040b rw - tmpfs t rw";
        assert_eq!(
            parse_mountinfo_line(l).unwrap().0,
            PathBuf::from("/mnt/a b")
        );
    }

    #[test]
    fn dpkg_listing() {
        let listing = "iperf3\tinstall ok installed\n\
                       bpftool\tdeinstall ok config-files\n\
                       libfoo:amd64\tinstall ok installed\n";
        assert_eq!(
            not_installed(listing, &["iperf3", "bpftool", "libfoo", "absent"]),
            ["bpftool", "absent"]
        );
    }

    #[test]
    fn llvm_major() {
        let vv = "rustc 1.96.0\nbinary: rustc\nrelease: 1.96.0\nLLVM version: 22.1.8\n";
        assert_eq!(llvm_major_of(vv), Some("22"));
        assert_eq!(llvm_major_of("rustc 1.0\n"), None);
    }
}
