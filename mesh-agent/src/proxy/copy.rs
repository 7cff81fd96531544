//! The one copy routine of the proxies ([`bidirectional`]: TCP to TCP, or TCP to an HBONE
//! tunnel), with live byte counters, and buffers that cost nothing while a connection is
//! idle.
//!
//! A held connection spends most of its life waiting for bytes. A buffer allocated up front
//! (64 KiB per direction, as before) made 10,000 idle connections cost hundreds of MiB, and
//! glibc kept the fragmented heap after they closed. Here a reader first waits until its
//! socket is readable without any buffer, then reads into a small one ([`SMALL_READ`]); reads
//! that fill it prove bulk traffic, and the reader switches to [`BULK_READ`] buffers, kept for
//! as long as reads stay large. A short read gives the buffer back before the next wait.

use std::{
    future::poll_fn,
    io,
    sync::atomic::{AtomicU64, Ordering},
};

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{tcp, TcpStream},
};

use super::hbone::{HboneError, Tunnel};

/// Read size while traffic is light (and the most an idle connection ever waits with: none).
pub const SMALL_READ: usize = 16 * 1024;
/// Read size once a read filled [`SMALL_READ`] (bulk traffic).
pub const BULK_READ: usize = 64 * 1024;

/// The read side of one direction: no buffer while idle, small while interactive, large
/// while bulk.
#[derive(Debug, Default)]
pub struct IdleFreeBuf {
    buf: BytesMut,
    bulk: bool,
}

impl IdleFreeBuf {
    /// Reads what `rd` has (waiting for it without a buffer unless in bulk mode); `0` at EOF.
    pub async fn read_from(&mut self, rd: &mut tcp::ReadHalf<'_>) -> io::Result<usize> {
        if !self.bulk {
            rd.readable().await?;
        }
        let size = if self.bulk { BULK_READ } else { SMALL_READ };
        self.buf.reserve(size);
        let n = rd.read_buf(&mut self.buf).await?;
        self.bulk = n >= SMALL_READ;
        Ok(n)
    }

    /// The bytes read, handed over (to h2, which keeps them until written); the buffer's
    /// memory goes with them unless the traffic is bulk.
    pub fn take(&mut self) -> Bytes {
        let chunk = self.buf.split().freeze();
        if !self.bulk {
            self.buf = BytesMut::new();
        }
        chunk
    }

    /// The bytes read, for writing in place; then [`Self::consumed`].
    pub fn filled(&self) -> &[u8] {
        &self.buf
    }

    /// Drops the bytes read; the buffer's memory too unless the traffic is bulk.
    pub fn consumed(&mut self) {
        if self.bulk {
            self.buf.clear();
        } else {
            self.buf = BytesMut::new();
        }
    }

    /// Bytes of buffer held now (for tests).
    pub fn held(&self) -> usize {
        self.buf.capacity()
    }
}

/// Live byte counts of one connection, readable while it is copied and after it ended
/// however it ended (an error, or a policy close that dropped the copy mid-way).
#[derive(Debug, Default)]
pub struct Counters {
    /// Bytes from the near TCP connection to the far end.
    sent: AtomicU64,
    /// Bytes from the far end to the near TCP connection.
    received: AtomicU64,
}

impl Counters {
    /// Bytes near → far so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Bytes far → near so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Adds to the counts (an L7 connection counts what it forwarded).
    pub fn add(&self, sent: u64, received: u64) {
        self.sent.fetch_add(sent, Ordering::Relaxed);
        self.received.fetch_add(received, Ordering::Relaxed);
    }
}

/// The other end of a copy: another TCP connection, or an HBONE tunnel (an h2 stream).
pub enum Far<'a> {
    Tcp(&'a mut TcpStream),
    Tunnel(Tunnel),
}

/// Copies between `near` and `far` until both directions have ended: EOF on one side ends
/// the other's write side (a TCP shutdown, or END_STREAM on the tunnel) and the other
/// direction goes on (half-close carried both ways). Back-pressure: bytes are only read once
/// the previous ones were written (for a tunnel: once the peer's flow-control window has
/// room; tunnel data is acknowledged only once written). An idle direction holds no read
/// buffer ([`IdleFreeBuf`]). `counts` is updated as bytes move, so it is right whatever the
/// outcome — also when the future is dropped part-way (a policy close).
pub async fn bidirectional(
    near: &mut TcpStream,
    far: Far<'_>,
    counts: &Counters,
) -> io::Result<()> {
    let (mut rd, mut wr) = near.split();
    match far {
        Far::Tcp(far) => {
            let (mut frd, mut fwr) = far.split();
            tokio::try_join!(
                tcp_to_tcp(&mut rd, &mut fwr, &counts.sent),
                tcp_to_tcp(&mut frd, &mut wr, &counts.received),
            )?;
        }
        Far::Tunnel(Tunnel { mut send, mut recv }) => {
            tokio::try_join!(
                tcp_to_tunnel(&mut rd, &mut send, &counts.sent),
                tunnel_to_tcp(&mut recv, &mut wr, &counts.received),
            )?;
        }
    }
    Ok(())
}

async fn tcp_to_tcp(
    rd: &mut tcp::ReadHalf<'_>,
    wr: &mut tcp::WriteHalf<'_>,
    count: &AtomicU64,
) -> io::Result<()> {
    let mut buf = IdleFreeBuf::default();
    loop {
        let n = buf.read_from(rd).await?;
        if n == 0 {
            return wr.shutdown().await;
        }
        wr.write_all(buf.filled()).await?;
        buf.consumed();
        count.fetch_add(n as u64, Ordering::Relaxed);
    }
}

fn h2_err(e: h2::Error) -> io::Error {
    io::Error::other(HboneError::H2(e))
}

async fn tcp_to_tunnel(
    rd: &mut tcp::ReadHalf<'_>,
    send: &mut SendStream<Bytes>,
    count: &AtomicU64,
) -> io::Result<()> {
    let mut buf = IdleFreeBuf::default();
    loop {
        let n = buf.read_from(rd).await?;
        if n == 0 {
            return send.send_data(Bytes::new(), true).map_err(h2_err);
        }
        let mut chunk = buf.take();
        while !chunk.is_empty() {
            send.reserve_capacity(chunk.len());
            let cap = match poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(Ok(c)) => c,
                Some(Err(e)) => return Err(h2_err(e)),
                None => return Err(io::Error::other(HboneError::Closed)),
            };
            if cap == 0 {
                continue;
            }
            let part = chunk.split_to(cap.min(chunk.len()));
            send.send_data(part, false).map_err(h2_err)?;
        }
        count.fetch_add(n as u64, Ordering::Relaxed);
    }
}

async fn tunnel_to_tcp(
    recv: &mut RecvStream,
    wr: &mut tcp::WriteHalf<'_>,
    count: &AtomicU64,
) -> io::Result<()> {
    while let Some(data) = recv.data().await {
        let data = data.map_err(h2_err)?;
        let n = data.len();
        wr.write_all(&data).await?;
        let _ = recv.flow_control().release_capacity(n);
        count.fetch_add(n as u64, Ordering::Relaxed);
    }
    wr.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
        (c.unwrap(), s.unwrap().0)
    }

    #[tokio::test]
    async fn bulk_data_and_half_close_both_ways() {
        let (mut app_a, mut proxy_a) = tcp_pair().await;
        let (mut proxy_b, mut app_b) = tcp_pair().await;
        let copying = tokio::spawn(async move {
            let counts = Counters::default();
            let r = bidirectional(&mut proxy_a, Far::Tcp(&mut proxy_b), &counts).await;
            (r, counts)
        });
        let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = payload.clone();
        let writer = tokio::spawn(async move {
            app_a.write_all(&sent).await.unwrap();
            app_a.shutdown().await.unwrap();
            let mut back = Vec::new();
            app_a.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        app_b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, payload, "a→b intact after half-close");
        app_b.write_all(b"reply after eof").await.unwrap();
        app_b.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"reply after eof");
        let (r, c) = copying.await.unwrap();
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(c.sent(), payload.len() as u64);
        assert_eq!(c.received(), 15);
    }

    #[tokio::test]
    async fn an_idle_reader_holds_no_buffer() {
        let (mut app, proxy) = tcp_pair().await;
        let mut proxy = proxy;
        let (mut rd, _wr) = proxy.split();
        let mut buf = IdleFreeBuf::default();
        app.write_all(b"ping").await.unwrap();
        assert_eq!(buf.read_from(&mut rd).await.unwrap(), 4);
        assert_eq!(&buf.take()[..], b"ping");
        assert_eq!(buf.held(), 0, "a short read gives the buffer back");
        // Bulk: reads fill the small buffer, and the reader keeps a large one meanwhile.
        app.write_all(&vec![1u8; 1 << 20]).await.unwrap();
        let mut total = 0;
        let mut saw_bulk = false;
        while total < 1 << 20 {
            total += buf.read_from(&mut rd).await.unwrap();
            saw_bulk |= buf.held() >= BULK_READ;
            buf.consumed();
        }
        assert!(saw_bulk, "bulk reads use the large buffer");
        app.write_all(b"x").await.unwrap();
        assert_eq!(buf.read_from(&mut rd).await.unwrap(), 1);
        buf.consumed();
        assert_eq!(buf.held(), 0, "back to none once the traffic is light");
    }

    #[tokio::test]
    async fn errors_keep_the_counts() {
        let (mut app_a, mut proxy_a) = tcp_pair().await;
        let (mut proxy_b, app_b) = tcp_pair().await;
        let copying = tokio::spawn(async move {
            let counts = Counters::default();
            let r = bidirectional(&mut proxy_a, Far::Tcp(&mut proxy_b), &counts).await;
            (r, counts)
        });
        app_a.write_all(b"12345").await.unwrap();
        // b resets: the copy ends with an error and still reports what moved.
        let mut app_b = app_b;
        let mut five = [0u8; 5];
        app_b.read_exact(&mut five).await.unwrap();
        crate::proxy::limits::reset(app_b);
        app_a.write_all(b"more").await.unwrap();
        let (r, c) = tokio::time::timeout(std::time::Duration::from_secs(5), copying)
            .await
            .unwrap()
            .unwrap();
        assert!(r.is_err(), "a reset is an error");
        assert!(c.sent() >= 5, "{c:?}");
    }
}
