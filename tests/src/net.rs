//! Blocking TCP helpers shared by the pod-side servers (testpod, bench, HTTP load).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

/// Pause after a failed `accept` (EMFILE, ENFILE, ENOBUFS: out of descriptors or memory). The
/// pending connection keeps the listener readable, so waiting for readiness would spin; the
/// only way to let a descriptor free up is to step back briefly.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(20);

/// Accepts on `listener` forever, handing each connection to `handle`; accept errors are
/// reported on stderr under `label` and backed off.
pub fn accept_forever(
    listener: &TcpListener,
    label: &str,
    mut handle: impl FnMut(TcpStream, SocketAddr),
) {
    loop {
        match listener.accept() {
            Ok((stream, peer)) => handle(stream, peer),
            Err(e) => {
                eprintln!("{label}: accept: {e}");
                std::thread::sleep(ACCEPT_BACKOFF);
            }
        }
    }
}
