//! Network partitions between node addresses, for tests in one process
//! ([`crate::testing::Cluster::partition`]): while a pair of addresses is cut, the nodes on them
//! neither gossip with each other (UDP packets dropped both ways) nor hold RPC connections
//! (connecting is refused, accepted connections are closed, and an open one fails at its next
//! read or write). Nodes are told apart by their address, so each node needs its own (as the
//! in-process cluster gives them). HTTP between nodes (an agent relaying the scheduler API to the
//! leader) is not cut.
//!
//! The table is process-wide; without a cut, a check is one relaxed atomic load.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

static ANY: AtomicBool = AtomicBool::new(false);
static CUTS: RwLock<Vec<(IpAddr, IpAddr)>> = RwLock::new(Vec::new());

/// Cut `a` from `b` (both ways).
pub fn cut(a: IpAddr, b: IpAddr) {
    let mut cuts = CUTS.write().unwrap_or_else(|e| e.into_inner());
    if a != b && !cuts.iter().any(|&(x, y)| (x, y) == (a, b) || (x, y) == (b, a)) {
        cuts.push((a, b));
    }
    ANY.store(!cuts.is_empty(), Ordering::Release);
}

/// Remove every cut that involves one of `addrs`.
pub fn heal(addrs: &[IpAddr]) {
    let mut cuts = CUTS.write().unwrap_or_else(|e| e.into_inner());
    cuts.retain(|(x, y)| !addrs.contains(x) && !addrs.contains(y));
    ANY.store(!cuts.is_empty(), Ordering::Release);
}

/// Whether any cut is in force (cheap: check it before finding the addresses to check).
pub fn active() -> bool {
    ANY.load(Ordering::Acquire)
}

/// Whether `a` and `b` are cut from each other.
pub fn blocked(a: IpAddr, b: IpAddr) -> bool {
    if !ANY.load(Ordering::Acquire) {
        return false;
    }
    let cuts = CUTS.read().unwrap_or_else(|e| e.into_inner());
    cuts.iter().any(|&(x, y)| (x, y) == (a, b) || (x, y) == (b, a))
}

fn cut_error() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::ConnectionReset, "network partition (test)")
}

/// A stream between `local` and `peer` that fails once they are cut.
pub struct Cuttable<T> {
    inner: T,
    local: IpAddr,
    peer: IpAddr,
}

impl<T> Cuttable<T> {
    /// Wrap `inner`, a stream from `local` to `peer`.
    pub fn new(inner: T, local: IpAddr, peer: IpAddr) -> Self {
        Self { inner, local, peer }
    }

    fn is_cut(&self) -> bool {
        blocked(self.local, self.peer)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Cuttable<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if self.is_cut() {
            return Poll::Ready(Err(cut_error()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Cuttable<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        if self.is_cut() {
            return Poll::Ready(Err(cut_error()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        if self.is_cut() {
            return Poll::Ready(Err(cut_error()));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.is_cut() {
            return Poll::Ready(Err(cut_error()));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_are_both_ways_and_healed_by_address() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let (a, b, c) = (ip("127.250.250.1"), ip("127.250.250.2"), ip("127.250.250.3"));
        cut(a, b);
        cut(a, c);
        assert!(blocked(a, b) && blocked(b, a) && blocked(c, a));
        assert!(!blocked(b, c));
        heal(&[b]);
        assert!(!blocked(a, b) && blocked(a, c));
        heal(&[a, b, c]);
        assert!(!blocked(a, c));
    }
}
