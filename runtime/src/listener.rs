//! Sharded listeners: one `SO_REUSEPORT` socket per worker for each address, so the kernel
//! spreads connections across cores. Options are set explicitly, and an address another
//! process already serves is refused (monoio's own `bind` enables `SO_REUSEPORT`, which would
//! let two processes share a port silently).

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, Socket, TcpKeepalive, Type};

/// Socket options for listeners and the connections they accept.
#[derive(Debug, Clone)]
pub struct ListenOptions {
    pub backlog: i32,
    pub nodelay: bool,
    pub keepalive: Option<Duration>,
    /// Attach the reuseport CBPF that steers a connection to the worker on its packets' CPU.
    pub cpu_steering: bool,
    /// `SO_RCVBUF` bytes for listeners (inherited by accepted sockets) and connected sockets.
    pub recv_buffer: Option<usize>,
    /// `SO_SNDBUF` bytes, likewise.
    pub send_buffer: Option<usize>,
}

impl ListenOptions {
    pub fn from_config(cfg: &crate::config::RuntimeConfig) -> Self {
        ListenOptions {
            backlog: cfg.listen_backlog,
            nodelay: cfg.nodelay,
            keepalive: cfg.tcp_keepalive,
            cpu_steering: cfg.reuseport_cpu_steering,
            recv_buffer: cfg.socket_recv_buffer,
            send_buffer: cfg.socket_send_buffer,
        }
    }
}

/// Why binding failed, in words an operator can act on.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error(
        "{addr} is already being served by another process (address in use); refusing to share it"
    )]
    InUse { addr: SocketAddr },
    #[error("cannot bind {addr}: {source}")]
    Io { addr: SocketAddr, source: io::Error },
}

fn new_socket(addr: SocketAddr) -> io::Result<Socket> {
    let s = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.cloexec(),
        Some(Protocol::TCP),
    )?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    Ok(s)
}

/// Fail if something already listens on `addr`: a plain bind (no `SO_REUSEPORT`) of our own
/// conflicts with any existing listener, whoever set what.
pub fn ensure_not_served(addr: SocketAddr) -> Result<(), BindError> {
    if addr.port() == 0 {
        return Ok(());
    }
    let s = new_socket(addr).map_err(|source| BindError::Io { addr, source })?;
    match s.bind(&SockAddr::from(addr)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(BindError::InUse { addr }),
        Err(source) => Err(BindError::Io { addr, source }),
    }
}

/// Bind `count` listening sockets on `addr` in one reuseport group. With port 0 the first
/// socket picks a port and the rest join it. Sockets are returned in worker order.
pub fn bind_sharded(
    addr: SocketAddr,
    count: usize,
    opts: &ListenOptions,
) -> Result<Vec<std::net::TcpListener>, BindError> {
    ensure_not_served(addr)?;
    let mut out = Vec::with_capacity(count);
    let mut bound = addr;
    for i in 0..count.max(1) {
        let s = new_socket(bound).map_err(|source| BindError::Io { addr, source })?;
        s.set_reuse_port(true)
            .map_err(|source| BindError::Io { addr, source })?;
        s.set_nonblocking(true)
            .map_err(|source| BindError::Io { addr, source })?;
        s.set_nodelay(opts.nodelay)
            .map_err(|source| BindError::Io { addr, source })?;
        // Before listen(2): accepted sockets inherit the sizes, and the window scale they
        // advertise in the handshake follows the receive buffer.
        set_buffers(&s, opts).map_err(|source| BindError::Io { addr, source })?;
        s.bind(&SockAddr::from(bound))
            .map_err(|source| match source.kind() {
                io::ErrorKind::AddrInUse => BindError::InUse { addr },
                _ => BindError::Io { addr, source },
            })?;
        if i == 0 {
            bound = s
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .unwrap_or(addr);
        }
        s.listen(opts.backlog)
            .map_err(|source| BindError::Io { addr, source })?;
        out.push(s);
    }
    if opts.cpu_steering && count > 1 {
        crate::sys::attach_reuseport_cpu_cbpf(out[0].as_raw_fd(), count as u32)
            .map_err(|source| BindError::Io { addr, source })?;
    }
    Ok(out.into_iter().map(Into::into).collect())
}

fn set_buffers(s: &Socket, opts: &ListenOptions) -> io::Result<()> {
    if let Some(n) = opts.recv_buffer {
        s.set_recv_buffer_size(n)?;
    }
    if let Some(n) = opts.send_buffer {
        s.set_send_buffer_size(n)?;
    }
    Ok(())
}

/// Apply per-connection options to an accepted or connected socket.
pub fn tune_stream(fd: &impl AsRawFd, opts: &ListenOptions) -> io::Result<()> {
    crate::sys::with_sockref(fd.as_raw_fd(), |s| {
        s.set_nodelay(opts.nodelay)?;
        set_buffers(&s, opts)?;
        if let Some(idle) = opts.keepalive {
            s.set_tcp_keepalive(
                &TcpKeepalive::new()
                    .with_time(idle)
                    .with_interval(Duration::from_secs(30)),
            )?;
        }
        Ok(())
    })
}

/// Connect to `addr` on the current worker's driver.
pub async fn connect(addr: SocketAddr, opts: &ListenOptions) -> io::Result<monoio::net::TcpStream> {
    let s = monoio::net::TcpStream::connect_addr(addr).await?;
    tune_stream(&s, opts)?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> ListenOptions {
        ListenOptions {
            backlog: 128,
            nodelay: true,
            keepalive: None,
            cpu_steering: false,
            recv_buffer: None,
            send_buffer: None,
        }
    }

    #[test]
    fn second_process_style_bind_is_refused() {
        let first = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = first.local_addr().unwrap();
        let err = bind_sharded(addr, 2, &opts()).unwrap_err();
        assert!(matches!(err, BindError::InUse { .. }), "{err}");
        assert!(err.to_string().contains("already being served"), "{err}");
    }

    #[test]
    fn reuseport_listener_of_another_owner_is_refused() {
        // Even a listener that itself set SO_REUSEPORT (monoio's default) is detected.
        let other = bind_sharded("127.0.0.1:0".parse().unwrap(), 1, &opts()).unwrap();
        let addr = other[0].local_addr().unwrap();
        assert!(matches!(
            bind_sharded(addr, 2, &opts()),
            Err(BindError::InUse { .. })
        ));
    }

    #[test]
    fn socket_buffer_sizes_reach_listeners_accepted_and_connected_sockets() {
        let mut o = opts();
        o.recv_buffer = Some(49152);
        o.send_buffer = Some(24576);
        let ls = bind_sharded("127.0.0.1:0".parse().unwrap(), 1, &o).unwrap();
        let addr = ls[0].local_addr().unwrap();
        // The kernel reports twice the value asked for (its bookkeeping share).
        let l = socket2::SockRef::from(&ls[0]);
        assert_eq!(l.recv_buffer_size().unwrap(), 2 * 49152);
        assert_eq!(l.send_buffer_size().unwrap(), 2 * 24576);
        ls[0].set_nonblocking(false).unwrap();
        let (connected, accepted) = std::thread::scope(|s| {
            let a = s.spawn(|| ls[0].accept().unwrap().0);
            // Connected the runtime's way, on a real ring.
            let (mut rt, _) = crate::driver::build_runtime(
                &crate::driver::decide(crate::DriverChoice::Auto, 64).unwrap(),
                64,
            )
            .unwrap();
            let sizes = rt.block_on(async {
                let c = connect(addr, &o).await.unwrap();
                crate::sys::with_sockref(c.as_raw_fd(), |r| {
                    Ok((r.recv_buffer_size()?, r.send_buffer_size()?))
                })
                .unwrap()
            });
            (sizes, a.join().unwrap())
        });
        let a = socket2::SockRef::from(&accepted);
        assert_eq!(
            a.recv_buffer_size().unwrap(),
            2 * 49152,
            "inherited from the listener"
        );
        assert_eq!(a.send_buffer_size().unwrap(), 2 * 24576);
        assert_eq!(connected, (2 * 49152, 2 * 24576));
        // Without the knobs, autotuning: no lock, the kernel's defaults.
        let plain = bind_sharded("127.0.0.1:0".parse().unwrap(), 1, &opts()).unwrap();
        assert_ne!(
            socket2::SockRef::from(&plain[0])
                .recv_buffer_size()
                .unwrap(),
            2 * 49152
        );
    }

    #[test]
    fn sharded_group_shares_port() {
        let ls = bind_sharded("127.0.0.1:0".parse().unwrap(), 3, &opts()).unwrap();
        let p = ls[0].local_addr().unwrap().port();
        assert!(ls.iter().all(|l| l.local_addr().unwrap().port() == p));
    }
}
