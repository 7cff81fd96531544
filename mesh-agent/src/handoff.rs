//! Listener handoff between an agent and its successor: upgrades and restarts without a
//! refused connection.
//!
//! A running agent serves a Unix socket (`--handoff-socket`, root only). A starting agent
//! connects to it before binding anything; when an agent answers, the successor receives the
//! very listening sockets (outbound, HBONE, admin) as file descriptors (`SCM_RIGHTS`), so
//! connection attempts queue on the same sockets throughout — none is refused while the two
//! processes change places. The exchange:
//!
//! 1. successor → agent: `MESH-HANDOFF 1 TAKE`
//! 2. agent → successor: one JSON line naming each socket's role and address, with the fds
//! 3. the successor finishes its start (certificates, maps, accept loops) while the agent keeps
//!    accepting; both accept from the same queues, and both are complete agents;
//! 4. successor → agent: `READY`; the agent stops accepting, answers `BYE`, drains its
//!    established connections (`--drain-timeout-secs`) and exits, leaving the kernel side
//!    pinned; the successor then serves the handoff socket itself.
//!
//! If the successor fails or exits before `READY`, the agent notices the closed socket and
//! carries on serving as if nothing happened. Only a peer with the agent's own user id (root)
//! is answered.

use std::{
    io::{self, BufRead as _, BufReader, IoSlice, IoSliceMut, Read as _, Write as _},
    net::{SocketAddr, TcpListener},
    os::{
        fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::{
            fs::{FileTypeExt as _, PermissionsExt as _},
            net::{UnixListener, UnixStream},
        },
    },
    path::{Path, PathBuf},
    time::Duration,
};

use nix::sys::socket::{
    getsockopt, recvmsg, sendmsg, sockopt::PeerCredentials, ControlMessage, ControlMessageOwned,
    MsgFlags,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

/// First line a successor sends.
const TAKE: &str = "MESH-HANDOFF 1 TAKE";
const READY: &str = "READY";
const BYE: &str = "BYE";
/// Most sockets handed over at once.
const MAX_FDS: usize = 8;
/// Longest description line.
const MAX_LINE: usize = 4096;
/// Round trips that need no work on the other side.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a listening socket is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Outbound4,
    Outbound6,
    Hbone,
    Admin,
}

#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("handoff socket {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("handoff with the running agent at {path}: {detail}")]
    Protocol { path: PathBuf, detail: String },
}

#[derive(Debug, Serialize, Deserialize)]
struct Offer {
    sockets: Vec<(Role, SocketAddr)>,
}

/// The successor's side: the sockets received from the running agent.
pub struct Takeover {
    path: PathBuf,
    stream: UnixStream,
    sockets: Vec<(Role, SocketAddr, Option<OwnedFd>)>,
}

impl Takeover {
    /// Asks the agent serving `path` for its listening sockets. `Ok(None)`: no agent answers
    /// there (a first start, or after a crash): bind afresh.
    pub fn request(path: &Path) -> Result<Option<Self>, HandoffError> {
        let sock_err = |source| HandoffError::Socket {
            path: path.to_owned(),
            source,
        };
        let proto = |detail: String| HandoffError::Protocol {
            path: path.to_owned(),
            detail,
        };
        let mut stream = match UnixStream::connect(path) {
            Ok(s) => s,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(sock_err(e)),
        };
        stream
            .set_read_timeout(Some(EXCHANGE_TIMEOUT))
            .map_err(sock_err)?;
        check_peer(&stream).map_err(|e| proto(e.to_string()))?;
        writeln!(stream, "{TAKE}").map_err(sock_err)?;
        let (line, fds) = recv_with_fds(&stream).map_err(sock_err)?;
        let offer: Offer =
            serde_json::from_slice(&line).map_err(|e| proto(format!("bad offer: {e}")))?;
        if offer.sockets.len() != fds.len() {
            return Err(proto(format!(
                "{} sockets described, {} received",
                offer.sockets.len(),
                fds.len()
            )));
        }
        let sockets = offer
            .sockets
            .into_iter()
            .zip(fds)
            .map(|((role, addr), fd)| (role, addr, Some(fd)))
            .collect::<Vec<_>>();
        info!(path = %path.display(), sockets = sockets.len(), "took over the listening sockets of the running agent");
        Ok(Some(Self {
            path: path.to_owned(),
            stream,
            sockets,
        }))
    }

    /// The handed-over socket for `role`, if it listens on `addr` (a changed address is bound
    /// afresh by the caller).
    pub fn take(&mut self, role: Role, addr: SocketAddr) -> Option<TcpListener> {
        let (_, _, fd) = self
            .sockets
            .iter_mut()
            .find(|(r, a, fd)| *r == role && *a == addr && fd.is_some())?;
        let listener = TcpListener::from(fd.take()?);
        match listener.local_addr() {
            Ok(a) if a == addr => Some(listener),
            _ => None,
        }
    }

    /// Tells the old agent that this one serves now; it stops accepting and drains. Waits for
    /// its `BYE` (bounded).
    pub fn complete(mut self) -> Result<(), HandoffError> {
        let sock_err = |source| HandoffError::Socket {
            path: self.path.clone(),
            source,
        };
        writeln!(self.stream, "{READY}").map_err(sock_err)?;
        let mut line = String::new();
        BufReader::new(&self.stream)
            .take(MAX_LINE as u64)
            .read_line(&mut line)
            .map_err(sock_err)?;
        if line.trim_end() != BYE {
            return Err(HandoffError::Protocol {
                path: self.path.clone(),
                detail: format!("expected {BYE}, got {:?}", line.trim_end()),
            });
        }
        info!(path = %self.path.display(), "previous agent stopped accepting; it drains and exits");
        Ok(())
    }
}

/// Serves handoff requests on `path` until `stop`, offering `sockets` (duplicates of the
/// agent's listening sockets). Sends `true` on `handed_off` when a successor took over. A
/// successor may take `ready_timeout` from receiving the sockets to `READY` (it may be waiting
/// for certificates): past it the agent keeps the sockets to itself again. The
/// listener runs on the agents' shared accept loop ([`crate::proxy::listen::accept_loop`]);
/// one successor is served at a time, its exchange (blocking, bounded by
/// [`EXCHANGE_TIMEOUT`]) on a thread of its own, never joined: it may sit in an exchange when
/// the agent exits, and the process exit ends it. Must be called within a tokio runtime.
pub fn serve(
    path: PathBuf,
    sockets: Vec<(Role, SocketAddr, OwnedFd)>,
    ready_timeout: Duration,
    handed_off: watch::Sender<bool>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), HandoffError> {
    let sock_err = |source| HandoffError::Socket {
        path: path.clone(),
        source,
    };
    let listener = bind(&path)?;
    listener.set_nonblocking(true).map_err(sock_err)?;
    let listener = tokio::net::UnixListener::from_std(listener).map_err(sock_err)?;
    let ino = inode(&path);
    let sockets = std::sync::Arc::new(sockets);
    let one_at_a_time = std::sync::Arc::new(tokio::sync::Mutex::new(()));
    // The loop ends when asked to stop or once a successor took over.
    let (until_tx, until) = watch::channel(false);
    let mut handed = handed_off.subscribe();
    tokio::spawn(async move {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => {}
            _ = handed.wait_for(|h| *h) => {}
        }
        let _ = until_tx.send(true);
    });
    let handed_tx = handed_off.clone();
    tokio::spawn(async move {
        let listener = &listener;
        let accept = move || {
            crate::proxy::listen::accept_retrying("handoff", move || async move {
                listener.accept().await.map(|(conn, _)| conn)
            })
        };
        crate::proxy::listen::accept_loop(
            accept,
            until,
            EXCHANGE_TIMEOUT,
            "handoff exchanges",
            |conn: tokio::net::UnixStream| {
                let (sockets, handed, one) = (
                    std::sync::Arc::clone(&sockets),
                    handed_tx.clone(),
                    std::sync::Arc::clone(&one_at_a_time),
                );
                Some(async move {
                    let _one = one.lock().await;
                    if *handed.borrow() {
                        return;
                    }
                    let Ok(conn) = conn.into_std() else { return };
                    let _ = conn.set_nonblocking(false);
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    let spawned =
                        std::thread::Builder::new()
                            .name("handoff".into())
                            .spawn(move || {
                                use std::sync::atomic::Ordering::SeqCst;
                                OFFERS.fetch_add(1, SeqCst);
                                let offered = offer(&conn, &sockets, ready_timeout);
                                // Handed over: this agent is stopping; the flag stays up.
                                if !matches!(offered, Ok(true)) {
                                    OFFERS.fetch_sub(1, SeqCst);
                                }
                                let _ = tx.send(offered);
                            });
                    if let Err(e) = spawned {
                        warn!(error = %e, "handoff thread; serving on");
                        return;
                    }
                    match rx.await {
                        Ok(Ok(true)) => {
                            let _ = handed.send(true);
                        }
                        Ok(Ok(false)) => info!("handoff aborted by the successor; serving on"),
                        Ok(Err(e)) => warn!(error = %e, "handoff failed; serving on"),
                        Err(_) => warn!("handoff exchange ended without an answer; serving on"),
                    }
                })
            },
        )
        .await;
        // The successor owns the path now; a clean stop without handoff removes our own.
        if !*handed_off.borrow() && inode(&path) == ino {
            let _ = std::fs::remove_file(&path);
        }
    });
    Ok(())
}

/// Successors being offered the sockets now (they program the same pinned maps while they
/// start: this agent does not treat their writes as someone else's — see
/// [`successor_starting`]).
static OFFERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Whether a successor agent is taking over: it writes the maps and the config slot as it
/// starts, so this agent's read-back of what it wrote pauses until the handoff ends.
pub fn successor_starting() -> bool {
    OFFERS.load(std::sync::atomic::Ordering::SeqCst) > 0
}

/// One successor: offer the sockets, wait for `READY` (true) or its departure (false).
fn offer(
    conn: &UnixStream,
    sockets: &[(Role, SocketAddr, OwnedFd)],
    ready_timeout: Duration,
) -> io::Result<bool> {
    check_peer(conn)?;
    conn.set_read_timeout(Some(EXCHANGE_TIMEOUT))?;
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    (&mut reader).take(MAX_LINE as u64).read_line(&mut line)?;
    if line.trim_end() != TAKE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected request {:?}", line.trim_end()),
        ));
    }
    let desc = Offer {
        sockets: sockets.iter().map(|(r, a, _)| (*r, *a)).collect(),
    };
    let mut body = serde_json::to_vec(&desc).map_err(io::Error::other)?;
    body.push(b'\n');
    let fds: Vec<RawFd> = sockets.iter().map(|(_, _, fd)| fd.as_raw_fd()).collect();
    sendmsg::<()>(
        conn.as_raw_fd(),
        &[IoSlice::new(&body)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .map_err(io::Error::from)?;
    info!(
        sockets = sockets.len(),
        "listening sockets offered to a successor; waiting for it to be ready"
    );
    conn.set_read_timeout(Some(ready_timeout))?;
    line.clear();
    match (&mut reader).take(MAX_LINE as u64).read_line(&mut line) {
        Ok(0) => return Ok(false),
        Ok(_) if line.trim_end() == READY => {}
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("expected {READY}, got {:?}", line.trim_end()),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "successor not ready in time",
            ))
        }
        Err(_) => return Ok(false),
    }
    let mut w = conn;
    writeln!(w, "{BYE}")?;
    info!("successor is ready; handing over and draining");
    Ok(true)
}

/// Reads one description line with the fds sent alongside it.
fn recv_with_fds(stream: &UnixStream) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; MAX_LINE];
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    let mut fds = Vec::new();
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            for fd in raw {
                // SAFETY: SCM_RIGHTS installed these descriptors in this process just now;
                // nothing else owns them.
                #[allow(unsafe_code)]
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
    let n = msg.bytes;
    if truncated {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "too many descriptors offered",
        ));
    }
    buf.truncate(n);
    while buf.last() == Some(&b'\n') {
        buf.pop();
    }
    Ok((buf, fds))
}

/// Only a process of our own user may take our sockets.
fn check_peer(stream: &UnixStream) -> io::Result<()> {
    let cred = getsockopt(&stream.as_fd(), PeerCredentials).map_err(io::Error::from)?;
    let me = nix::unistd::geteuid().as_raw();
    if cred.uid() != me {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("peer uid {} is not {me}", cred.uid()),
        ));
    }
    Ok(())
}

/// Binds `path`, replacing a stale socket file (nobody answered on it). The directory is
/// created root-only, the socket is 0600.
fn bind(path: &Path) -> Result<UnixListener, HandoffError> {
    let err = |source| HandoffError::Socket {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(err)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path).map_err(err)?,
        Ok(_) => {
            return Err(err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "exists and is not a socket",
            )))
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

fn inode(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::symlink_metadata(path).ok().map(|m| m.ino())
}

/// A duplicate of a listener's socket, for [`serve`].
pub fn dup(fd: impl AsFd) -> io::Result<OwnedFd> {
    fd.as_fd().try_clone_to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket path in a directory of its own, removed on drop.
    struct TempSock(PathBuf);

    impl TempSock {
        fn path(&self) -> PathBuf {
            self.0.join("handoff.sock")
        }
    }

    impl Drop for TempSock {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn temp_sock(tag: &str) -> TempSock {
        let dir = std::env::temp_dir().join(format!("mesh-handoff-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        TempSock(dir)
    }

    /// An agent serving the handoff of one listening socket (`role`) on a fresh path.
    struct Serving {
        _dir: TempSock,
        path: PathBuf,
        listener: TcpListener,
        addr: SocketAddr,
        handed: watch::Receiver<bool>,
        stop: watch::Sender<bool>,
    }

    fn serving(tag: &str, role: Role) -> Serving {
        let dir = temp_sock(tag);
        let path = dir.path();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (handed_tx, handed) = watch::channel(false);
        let (stop, stop_rx) = watch::channel(false);
        serve(
            path.clone(),
            vec![(role, addr, dup(&listener).unwrap())],
            Duration::from_secs(300),
            handed_tx,
            stop_rx,
        )
        .unwrap();
        Serving {
            _dir: dir,
            path,
            listener,
            addr,
            handed,
            stop,
        }
    }

    /// Runs `f` with the handoff path on a blocking thread (the exchange is blocking I/O).
    async fn successor<T: Send + 'static>(
        path: &Path,
        f: impl FnOnce(PathBuf) -> T + Send + 'static,
    ) -> T {
        let p = path.to_owned();
        tokio::task::spawn_blocking(move || f(p)).await.unwrap()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn sockets_move_to_the_successor_and_the_queue_is_shared() {
        let mut a = serving("move", Role::Hbone);
        let addr = a.addr;
        // A connection queued before the handoff is accepted by the successor.
        let _early = std::net::TcpStream::connect(addr).unwrap();
        let taken = successor(&a.path, move |p| {
            let mut t = Takeover::request(&p).unwrap().expect("an agent answers");
            assert!(t.take(Role::Admin, addr).is_none(), "wrong role");
            let got = t.take(Role::Hbone, addr).expect("hbone socket");
            assert_eq!(got.local_addr().unwrap(), addr);
            t.complete().unwrap();
            got
        })
        .await;
        a.handed.wait_for(|v| *v).await.unwrap();
        drop(a.listener);
        let (_s, _) = taken.accept().unwrap();
        // The socket file stays for the successor to replace.
        assert!(a.path.exists());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_successor_that_leaves_early_changes_nothing() {
        let a = serving("abort", Role::Admin);
        let addr = a.addr;
        successor(&a.path, |p| {
            let t = Takeover::request(&p).unwrap().expect("an agent answers");
            drop(t); // exits before READY
        })
        .await;
        // Still serving: a second successor gets the sockets.
        successor(&a.path, move |p| {
            let mut t = Takeover::request(&p).unwrap().expect("still answering");
            assert!(t.take(Role::Admin, addr).is_some());
        })
        .await;
        assert!(!*a.handed.borrow());
        a.stop.send(true).unwrap();
        let mut gone = a.handed.clone();
        let path = a.path.clone();
        let removed = tokio::time::timeout(Duration::from_secs(5), async move {
            while path.exists() {
                let _ = tokio::time::timeout(Duration::from_millis(20), gone.changed()).await;
            }
        })
        .await;
        assert!(removed.is_ok(), "a clean stop removes its own socket");
    }

    #[test]
    fn nobody_there_means_a_fresh_start() {
        let guard = temp_sock("none");
        assert!(Takeover::request(&guard.path()).unwrap().is_none());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn garbage_requests_are_refused_and_serving_goes_on() {
        let a = serving("garbage", Role::Admin);
        let addr = a.addr;
        for junk in [
            vec![b'x'; 10_000],
            b"MESH-HANDOFF 2 TAKE\n".to_vec(),
            b"\n".to_vec(),
        ] {
            successor(&a.path, move |p| {
                let mut s = UnixStream::connect(&p).unwrap();
                s.write_all(&junk).ok();
                let mut buf = Vec::new();
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let _ = s.read_to_end(&mut buf);
                assert!(buf.is_empty(), "nothing is offered to a bad request");
            })
            .await;
        }
        // A well-formed successor is still served afterwards.
        successor(&a.path, move |p| {
            let mut t = Takeover::request(&p).unwrap().expect("still answering");
            assert!(t.take(Role::Admin, addr).is_some());
        })
        .await;
        assert!(!*a.handed.borrow());
        a.stop.send(true).unwrap();
    }
}
