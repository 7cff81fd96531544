//! Copying bytes with buffers that cost nothing while a connection is idle.
//!
//! A held connection spends most of its life waiting for bytes. A buffer allocated up front
//! (64 KiB per direction, as before) made 10,000 idle connections cost hundreds of MiB, and
//! glibc kept the fragmented heap after they closed. Here a reader first waits until its
//! socket is readable without any buffer, then reads into a small one ([`SMALL_READ`]); reads
//! that fill it prove bulk traffic, and the reader switches to [`BULK_READ`] buffers, kept for
//! as long as reads stay large. A short read gives the buffer back before the next wait.

use std::io;

use bytes::{Bytes, BytesMut};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{tcp, TcpStream},
};

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

/// What [`bidirectional`] moved, and how it ended.
#[derive(Debug, Default)]
pub struct Copied {
    /// Bytes from `a` to `b`.
    pub a_to_b: u64,
    /// Bytes from `b` to `a`.
    pub b_to_a: u64,
    /// The first error, if it did not end by both sides closing.
    pub error: Option<io::Error>,
}

/// Copies between two TCP connections until both directions have ended: EOF on one side
/// shuts down the other's write side (half-close carried), the other direction goes on.
/// Counts are kept whatever the outcome.
pub async fn bidirectional(a: &mut TcpStream, b: &mut TcpStream) -> Copied {
    let (mut ard, mut awr) = a.split();
    let (mut brd, mut bwr) = b.split();
    let mut a_to_b = 0u64;
    let mut b_to_a = 0u64;
    let result = tokio::try_join!(
        one_way(&mut ard, &mut bwr, &mut a_to_b),
        one_way(&mut brd, &mut awr, &mut b_to_a),
    );
    Copied {
        a_to_b,
        b_to_a,
        error: result.err(),
    }
}

async fn one_way(
    rd: &mut tcp::ReadHalf<'_>,
    wr: &mut tcp::WriteHalf<'_>,
    count: &mut u64,
) -> io::Result<()> {
    let mut buf = IdleFreeBuf::default();
    loop {
        let n = buf.read_from(rd).await?;
        if n == 0 {
            return wr.shutdown().await;
        }
        wr.write_all(buf.filled()).await?;
        buf.consumed();
        *count += n as u64;
    }
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
        let copying = tokio::spawn(async move { bidirectional(&mut proxy_a, &mut proxy_b).await });
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
        let c = copying.await.unwrap();
        assert!(c.error.is_none(), "{:?}", c.error);
        assert_eq!(c.a_to_b, payload.len() as u64);
        assert_eq!(c.b_to_a, 15);
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
        let copying = tokio::spawn(async move { bidirectional(&mut proxy_a, &mut proxy_b).await });
        app_a.write_all(b"12345").await.unwrap();
        // b resets: the copy ends with an error and still reports what moved.
        let mut app_b = app_b;
        let mut five = [0u8; 5];
        app_b.read_exact(&mut five).await.unwrap();
        crate::proxy::limits::reset(app_b);
        app_a.write_all(b"more").await.unwrap();
        let c = tokio::time::timeout(std::time::Duration::from_secs(5), copying)
            .await
            .unwrap()
            .unwrap();
        assert!(c.error.is_some(), "a reset is an error");
        assert!(c.a_to_b >= 5, "{c:?}");
    }
}
