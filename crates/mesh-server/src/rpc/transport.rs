//! Byte streams between nodes: TCP, or an in-memory pipe. TLS (later) wraps these.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

/// A bidirectional byte stream.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A boxed byte stream, whatever the transport.
pub type BoxIo = Box<dyn Io>;

/// Accepts byte streams.
#[async_trait::async_trait]
pub trait Listener: Send {
    /// The address it listens on.
    fn local_addr(&self) -> io::Result<SocketAddr>;
    /// The next stream and its peer's address.
    async fn accept(&mut self) -> io::Result<(BoxIo, SocketAddr)>;
    /// Faults to inject into accepted connections (tests).
    fn faults(&self) -> Option<super::Faults> {
        None
    }
}

/// How nodes reach each other.
#[async_trait::async_trait]
pub trait Transport: Send + Sync + 'static {
    /// Open a stream to `addr`.
    async fn connect(&self, addr: SocketAddr) -> io::Result<BoxIo>;
    /// Listen on `addr`.
    async fn listen(&self, addr: SocketAddr) -> io::Result<Box<dyn Listener>>;
    /// Faults to inject into this side's connections (tests).
    fn faults(&self) -> Option<super::Faults> {
        None
    }
}

/// TCP, with outgoing connections from the node's own address (so a peer on another loopback
/// address or machine sees where it really comes from).
#[derive(Clone, Debug, Default)]
pub struct TcpTransport {
    /// Source address of outgoing connections (`None`: the system picks).
    pub bind: Option<IpAddr>,
}

struct TcpListen(tokio::net::TcpListener);

#[async_trait::async_trait]
impl Listener for TcpListen {
    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }
    async fn accept(&mut self) -> io::Result<(BoxIo, SocketAddr)> {
        loop {
            let (s, a) = self.0.accept().await?;
            let _ = s.set_nodelay(true);
            let local = s.local_addr()?.ip();
            // A test's partition (crate::partition): refused, and cut when it starts later.
            if crate::partition::blocked(local, a.ip()) {
                continue;
            }
            return Ok((Box::new(crate::partition::Cuttable::new(s, local, a.ip())), a));
        }
    }
}

#[async_trait::async_trait]
impl Transport for TcpTransport {
    async fn connect(&self, addr: SocketAddr) -> io::Result<BoxIo> {
        let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        if let Some(ip) = self.bind
            && ip.is_ipv4() == addr.is_ipv4()
            && !ip.is_unspecified()
        {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        if let Some(ip) = self.bind
            && crate::partition::blocked(ip, addr.ip())
        {
            return Err(io::Error::new(io::ErrorKind::ConnectionRefused, "network partition (test)"));
        }
        let s = socket.connect(addr).await?;
        let _ = s.set_nodelay(true);
        let local = s.local_addr()?.ip();
        Ok(Box::new(crate::partition::Cuttable::new(s, local, addr.ip())))
    }
    async fn listen(&self, addr: SocketAddr) -> io::Result<Box<dyn Listener>> {
        Ok(Box::new(TcpListen(tokio::net::TcpListener::bind(addr).await?)))
    }
}

type Accepts = mpsc::Sender<(BoxIo, SocketAddr)>;

/// In-memory pipes between listeners of one process (`mesh dev`, tests). Addresses are only
/// names here; each connection gets a made-up source port.
#[derive(Clone, Default)]
pub struct MemTransport {
    listeners: Arc<Mutex<HashMap<SocketAddr, Accepts>>>,
    next_port: Arc<std::sync::atomic::AtomicU16>,
    /// This side's address, the source of its connections.
    pub local: Option<IpAddr>,
    /// Faults in the frames this side sends (its connections and those its listeners accept).
    pub faults: Option<super::Faults>,
}

impl MemTransport {
    /// The same network, seen from `ip`.
    pub fn at(&self, ip: IpAddr) -> MemTransport {
        MemTransport { local: Some(ip), ..self.clone() }
    }

    /// The same network, this side sending through `faults`.
    pub fn with_faults(&self, faults: super::Faults) -> MemTransport {
        MemTransport { faults: Some(faults), ..self.clone() }
    }
}

struct MemListen {
    faults: Option<super::Faults>,
    addr: SocketAddr,
    rx: mpsc::Receiver<(BoxIo, SocketAddr)>,
    net: Arc<Mutex<HashMap<SocketAddr, Accepts>>>,
}

impl Drop for MemListen {
    fn drop(&mut self) {
        self.net.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.addr);
    }
}

#[async_trait::async_trait]
impl Listener for MemListen {
    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.addr)
    }
    async fn accept(&mut self) -> io::Result<(BoxIo, SocketAddr)> {
        self.rx.recv().await.ok_or_else(|| io::Error::other("listener closed"))
    }
    fn faults(&self) -> Option<super::Faults> {
        self.faults
    }
}

#[async_trait::async_trait]
impl Transport for MemTransport {
    async fn connect(&self, addr: SocketAddr) -> io::Result<BoxIo> {
        let tx = self.listeners.lock().unwrap_or_else(|e| e.into_inner()).get(&addr).cloned();
        let tx =
            tx.ok_or_else(|| io::Error::new(io::ErrorKind::ConnectionRefused, format!("nothing listens on {addr}")))?;
        let (a, b) = tokio::io::duplex(256 * 1024);
        let port = 40_000 + self.next_port.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 20_000;
        let from = SocketAddr::new(self.local.unwrap_or(IpAddr::from([127, 0, 0, 1])), port);
        tx.send((Box::new(b), from))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::ConnectionRefused, "listener closed"))?;
        Ok(Box::new(a))
    }
    async fn listen(&self, addr: SocketAddr) -> io::Result<Box<dyn Listener>> {
        let (tx, rx) = mpsc::channel(64);
        let mut l = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        if l.contains_key(&addr) {
            return Err(io::Error::new(io::ErrorKind::AddrInUse, format!("{addr} is in use")));
        }
        l.insert(addr, tx);
        Ok(Box::new(MemListen { faults: self.faults, addr, rx, net: self.listeners.clone() }))
    }
    fn faults(&self) -> Option<super::Faults> {
        self.faults
    }
}
