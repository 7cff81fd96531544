//! A packet capture on the cluster's bridge: an `AF_PACKET` socket opened inside the bridge
//! namespace (on a thread of its own), collecting every frame that crosses between nodes
//! until stopped. Bounded in time and size.

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// Longest a capture runs, whatever the caller does.
const MAX_DURATION: Duration = Duration::from_secs(60);
/// Most bytes kept.
const MAX_BYTES: usize = 64 * 1024 * 1024;

/// A running capture.
#[derive(Debug)]
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<Vec<u8>>>>,
}

/// A TCP segment seen on the wire (IPv4 or IPv6 over Ethernet).
#[derive(Clone, Debug)]
pub struct Segment {
    pub src_port: u16,
    pub dst_port: u16,
    pub payload: Vec<u8>,
}

impl Capture {
    /// Starts capturing every frame in the namespace at `netns` (all interfaces).
    #[track_caller]
    pub fn start(netns: PathBuf) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            crate::netns::in_netns(&netns, move || capture_loop(&flag, &ready_tx))
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("capture socket opened");
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops and returns the frames seen.
    pub fn stop(mut self) -> Vec<Vec<u8>> {
        self.finish()
    }

    fn finish(&mut self) -> Vec<Vec<u8>> {
        self.stop.store(true, Ordering::Release);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(frames)) => frames,
            Some(Err(p)) => std::panic::resume_unwind(p),
            None => Vec::new(),
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop.store(true, Ordering::Release);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }
}

fn capture_loop(stop: &AtomicBool, ready: &std::sync::mpsc::Sender<()>) -> Vec<Vec<u8>> {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2) call; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
    assert!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: fd is a valid socket we just opened and own from here on.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: valid fd, a timeval of the right size.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_RCVTIMEO: {}", std::io::Error::last_os_error());
    let _ = ready.send(());
    let started = Instant::now();
    let mut frames = Vec::new();
    let mut total = 0usize;
    let mut buf = vec![0u8; 65_536];
    while !stop.load(Ordering::Acquire) && started.elapsed() < MAX_DURATION && total < MAX_BYTES {
        // SAFETY: buf is valid for buf.len() bytes.
        let n = unsafe {
            libc::recv(
                std::os::fd::AsRawFd::as_raw_fd(&sock),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
            )
        };
        if n > 0 {
            let n = n as usize;
            total += n;
            frames.push(buf[..n].to_vec());
        }
    }
    frames
}

/// The TCP segments among Ethernet `frames` (others are skipped).
pub fn tcp_segments(frames: &[Vec<u8>]) -> Vec<Segment> {
    frames.iter().filter_map(|f| parse_tcp(f)).collect()
}

fn parse_tcp(frame: &[u8]) -> Option<Segment> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let ip = frame.get(14..)?;
    let tcp = match ethertype {
        0x0800 => {
            let ihl = usize::from(ip.first()? & 0x0f) * 4;
            if *ip.get(9)? != 6 {
                return None;
            }
            let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
            ip.get(ihl..total.min(ip.len()))?
        }
        0x86dd => {
            if *ip.get(6)? != 6 {
                return None;
            }
            let plen = usize::from(u16::from_be_bytes([*ip.get(4)?, *ip.get(5)?]));
            ip.get(40..(40 + plen).min(ip.len()))?
        }
        _ => return None,
    };
    let src_port = u16::from_be_bytes([*tcp.first()?, *tcp.get(1)?]);
    let dst_port = u16::from_be_bytes([*tcp.get(2)?, *tcp.get(3)?]);
    let off = usize::from(tcp.get(12)? >> 4) * 4;
    Some(Segment {
        src_port,
        dst_port,
        payload: tcp.get(off..)?.to_vec(),
    })
}

/// Whether `needle` occurs anywhere in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}
