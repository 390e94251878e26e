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
    /// `TCP_CONGESTION` for listeners (inherited by accepted sockets) and connected sockets;
    /// absent = the host's `net.ipv4.tcp_congestion_control`.
    pub congestion: Option<TcpCa>,
    /// Listeners only: `IP_TRANSPARENT` / `IPV6_TRANSPARENT`, so an nftables `tproxy` rule
    /// can hand them connections addressed elsewhere (needs `CAP_NET_ADMIN`).
    pub transparent: bool,
}

/// A TCP congestion control algorithm's name (`cubic`, `bbr`, `reno`): at most 15 bytes
/// (the kernel's `TCP_CA_NAME_MAX` with its NUL), letters, digits and `_`. Kept inline so
/// that [`ListenOptions`] stays cheap to copy.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TcpCa {
    name: [u8; 15],
    len: u8,
}

impl TcpCa {
    /// Parse and check the spelling (not whether this host has it: see [`TcpCa::probe`]).
    pub fn new(name: &str) -> Result<TcpCa, String> {
        let b = name.as_bytes();
        if b.is_empty() || b.len() > 15 {
            return Err(format!(
                "{name:?}: a congestion control name has 1 to 15 characters"
            ));
        }
        if !b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_') {
            return Err(format!(
                "{name:?}: a congestion control name has only letters, digits and '_'"
            ));
        }
        let mut out = [0u8; 15];
        out[..b.len()].copy_from_slice(b);
        Ok(TcpCa {
            name: out,
            len: b.len() as u8,
        })
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.name[..self.len as usize]
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII was accepted.
        std::str::from_utf8(self.as_bytes()).unwrap_or("?")
    }

    /// Whether this process may set it: one `TCP_CONGESTION` on a throwaway socket, so a
    /// name the kernel lacks (`ENOENT`: not built in, module not loadable) or does not allow
    /// this process (`EPERM`: not in `net.ipv4.tcp_allowed_congestion_control` without
    /// `CAP_NET_ADMIN`) is refused when the config loads rather than on every connection.
    pub fn probe(&self) -> io::Result<()> {
        let s = Socket::new(Domain::IPV4, Type::STREAM.cloexec(), Some(Protocol::TCP))?;
        s.set_tcp_congestion(self.as_bytes())
    }

    /// The algorithm `fd` uses (the kernel pads the name with NULs).
    pub fn of_socket(fd: &impl AsRawFd) -> io::Result<Vec<u8>> {
        crate::sys::with_sockref(fd.as_raw_fd(), |s| {
            let mut v = s.tcp_congestion()?;
            while v.last() == Some(&0) {
                v.pop();
            }
            Ok(v)
        })
    }
}

impl std::fmt::Debug for TcpCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
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
            // validate() refused a bad name; a config built in code without it gets none.
            congestion: cfg
                .tcp_congestion
                .as_deref()
                .and_then(|n| TcpCa::new(n).ok()),
            transparent: false,
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
        // Before listen(2): accepted sockets inherit every per-connection option (see
        // `inherit_to_accepted`), and the window scale they advertise in the handshake
        // follows the receive buffer.
        set_stream_options(&s, opts).map_err(|source| BindError::Io { addr, source })?;
        if opts.transparent {
            crate::sys::set_transparent(s.as_raw_fd(), bound.is_ipv6())
                .map_err(|source| BindError::Io { addr, source })?;
        }
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

/// Every per-connection option: `TCP_NODELAY`, `SO_RCVBUF`/`SO_SNDBUF`, keepalive
/// (`SO_KEEPALIVE`, `TCP_KEEPIDLE`, `TCP_KEEPINTVL`) and `TCP_CONGESTION`.
fn set_stream_options(s: &Socket, opts: &ListenOptions) -> io::Result<()> {
    s.set_nodelay(opts.nodelay)?;
    set_buffers(s, opts)?;
    if let Some(ca) = &opts.congestion {
        s.set_tcp_congestion(ca.as_bytes())?;
    }
    match opts.keepalive {
        Some(idle) => s.set_tcp_keepalive(
            &TcpKeepalive::new()
                .with_time(idle)
                .with_interval(KEEPALIVE_INTERVAL),
        )?,
        None => s.set_keepalive(false)?,
    }
    Ok(())
}

/// Interval between keepalive probes once the idle time passed.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);

/// Apply per-connection options to a connected socket (or an accepted one whose listener was
/// not prepared with [`inherit_to_accepted`]): up to 7 `setsockopt` calls.
pub fn tune_stream(fd: &impl AsRawFd, opts: &ListenOptions) -> io::Result<()> {
    crate::sys::with_sockref(fd.as_raw_fd(), |s| set_stream_options(&s, opts))
}

/// Make `listener` carry the per-connection options, so that the sockets it accepts get
/// them without a system call of their own: Linux copies `TCP_NODELAY`, `SO_KEEPALIVE`,
/// `TCP_KEEPIDLE`, `TCP_KEEPINTVL`, `SO_RCVBUF`, `SO_SNDBUF` and a `TCP_CONGESTION` set on it
/// from the listening socket
/// to each accepted one (checked per option by the test
/// `accepted_sockets_inherit_every_option_from_the_listener`). Reads the listener's options
/// and sets only those that differ: nothing for a listener from [`bind_sharded`], which
/// sets them before `listen(2)`. Called once per listener by [`WorkerCtx::serve`].
///
/// Returns whether it changed anything: connections already queued on the listener were
/// cloned from it before, so the caller then has to tune what it accepts one by one
/// ([`tune_stream`]); `false` (a listener from [`bind_sharded`]) means no per-connection
/// calls at all.
///
/// [`WorkerCtx::serve`]: crate::worker::WorkerCtx::serve
pub fn inherit_to_accepted(listener: &impl AsRawFd, opts: &ListenOptions) -> io::Result<bool> {
    crate::sys::with_sockref(listener.as_raw_fd(), |s| {
        let mut changed = false;
        if s.nodelay()? != opts.nodelay {
            s.set_nodelay(opts.nodelay)?;
            changed = true;
        }
        // The kernel reports twice the size asked for.
        if let Some(n) = opts.recv_buffer {
            if s.recv_buffer_size()? != 2 * n {
                s.set_recv_buffer_size(n)?;
                changed = true;
            }
        }
        if let Some(n) = opts.send_buffer {
            if s.send_buffer_size()? != 2 * n {
                s.set_send_buffer_size(n)?;
                changed = true;
            }
        }
        match opts.keepalive {
            Some(idle) => {
                if !s.keepalive()?
                    || s.keepalive_time()? != idle
                    || s.keepalive_interval()? != KEEPALIVE_INTERVAL
                {
                    s.set_tcp_keepalive(
                        &TcpKeepalive::new()
                            .with_time(idle)
                            .with_interval(KEEPALIVE_INTERVAL),
                    )?;
                    changed = true;
                }
            }
            None => {
                if s.keepalive()? {
                    s.set_keepalive(false)?;
                    changed = true;
                }
            }
        }
        if let Some(ca) = &opts.congestion {
            // Accepted sockets inherit the algorithm only when it was set on the listener
            // with `TCP_CONGESTION` (else they take the host default of the moment), so it
            // is set even when equal; queued connections differ only when it was not.
            let before = TcpCa::of_socket(listener)?;
            s.set_tcp_congestion(ca.as_bytes())?;
            changed |= before != ca.as_bytes();
        }
        Ok(changed)
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
            congestion: None,
            transparent: false,
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

    /// The options of a socket that per-connection tuning sets.
    #[derive(Debug, PartialEq)]
    struct Opts {
        nodelay: bool,
        keepalive: bool,
        keepidle: Duration,
        keepintvl: Duration,
        rcvbuf: usize,
        sndbuf: usize,
    }

    fn read_opts(fd: &impl AsRawFd) -> Opts {
        crate::sys::with_sockref(fd.as_raw_fd(), |s| {
            Ok(Opts {
                nodelay: s.nodelay()?,
                keepalive: s.keepalive()?,
                keepidle: s.keepalive_time()?,
                keepintvl: s.keepalive_interval()?,
                rcvbuf: s.recv_buffer_size()?,
                sndbuf: s.send_buffer_size()?,
            })
        })
        .unwrap()
    }

    fn tuned() -> ListenOptions {
        let mut o = opts();
        o.nodelay = true;
        o.keepalive = Some(Duration::from_secs(77));
        o.recv_buffer = Some(49152);
        o.send_buffer = Some(24576);
        o
    }

    /// What a socket tuned with `tuned()` reports.
    fn tuned_opts() -> Opts {
        Opts {
            nodelay: true,
            keepalive: true,
            keepidle: Duration::from_secs(77),
            keepintvl: KEEPALIVE_INTERVAL,
            rcvbuf: 2 * 49152,
            sndbuf: 2 * 24576,
        }
    }

    fn accept_one(l: &std::net::TcpListener) -> (std::net::TcpStream, std::net::TcpStream) {
        l.set_nonblocking(false).unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        (l.accept().unwrap().0, c)
    }

    #[test]
    fn accepted_sockets_inherit_every_option_from_the_listener() {
        // A plain listener (kernel defaults): its accepted sockets differ from the tuned
        // values in every option, so the check below can tell inheritance from defaults.
        let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (a, _c) = accept_one(&plain);
        let d = read_opts(&a);
        let t = tuned_opts();
        assert_ne!(d.nodelay, t.nodelay);
        assert_ne!(d.keepalive, t.keepalive);
        assert_ne!(d.keepidle, t.keepidle);
        assert_ne!(d.keepintvl, t.keepintvl);
        assert_ne!(d.rcvbuf, t.rcvbuf);
        assert_ne!(d.sndbuf, t.sndbuf);
        // A listener from bind_sharded: each option reaches the accepted socket with no
        // setsockopt on it.
        let ls = bind_sharded("127.0.0.1:0".parse().unwrap(), 1, &tuned()).unwrap();
        assert_eq!(read_opts(&ls[0]), t);
        let (a, _c) = accept_one(&ls[0]);
        assert_eq!(
            read_opts(&a),
            t,
            "options of a socket accepted from a tuned listener"
        );
        // Nothing to change on it: no per-connection calls.
        assert!(!inherit_to_accepted(&ls[0], &tuned()).unwrap());
        assert!(!inherit_to_accepted(&ls[0], &tuned()).unwrap());
        // A listener made elsewhere (already listening), prepared the way `serve` does.
        assert!(inherit_to_accepted(&plain, &tuned()).unwrap());
        assert!(!inherit_to_accepted(&plain, &tuned()).unwrap());
        let (a, _c) = accept_one(&plain);
        assert_eq!(read_opts(&a), t);
        // ... and turned back (keepalive off, no delay off) the same way.
        let mut off = tuned();
        off.keepalive = None;
        off.nodelay = false;
        assert!(inherit_to_accepted(&plain, &off).unwrap());
        let (a, _c) = accept_one(&plain);
        let o = read_opts(&a);
        assert!(!o.keepalive && !o.nodelay, "{o:?}");
    }

    /// An algorithm other than the host default (reno and cubic are built into every kernel
    /// this runs on; `probe` proves it).
    fn non_default_ca() -> TcpCa {
        let fresh = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let default = TcpCa::of_socket(&fresh).unwrap();
        let ca = TcpCa::new(if default == b"reno" { "cubic" } else { "reno" }).unwrap();
        ca.probe().unwrap();
        ca
    }

    #[test]
    fn tcp_congestion_reaches_accepted_and_connected_sockets() {
        let ca = non_default_ca();
        let mut o = tuned();
        o.congestion = Some(ca);
        // bind_sharded sets it before listen: accepted sockets inherit it.
        let ls = bind_sharded("127.0.0.1:0".parse().unwrap(), 1, &o).unwrap();
        assert_eq!(TcpCa::of_socket(&ls[0]).unwrap(), ca.as_bytes());
        let (a, c) = accept_one(&ls[0]);
        assert_eq!(TcpCa::of_socket(&a).unwrap(), ca.as_bytes(), "accepted");
        assert_ne!(
            TcpCa::of_socket(&c).unwrap(),
            ca.as_bytes(),
            "the untuned client"
        );
        assert!(!inherit_to_accepted(&ls[0], &o).unwrap());
        // A connected socket gets it from tune_stream.
        tune_stream(&c, &o).unwrap();
        assert_eq!(TcpCa::of_socket(&c).unwrap(), ca.as_bytes(), "connected");
        // A listener made elsewhere: inherit_to_accepted sets it, once.
        let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(inherit_to_accepted(&plain, &o).unwrap());
        assert!(!inherit_to_accepted(&plain, &o).unwrap());
        let (a, _c) = accept_one(&plain);
        assert_eq!(TcpCa::of_socket(&a).unwrap(), ca.as_bytes());
    }

    #[test]
    fn tcp_ca_names_are_checked() {
        assert_eq!(TcpCa::new("cubic").unwrap().as_str(), "cubic");
        assert_eq!(TcpCa::new("a_15_chars_name").unwrap().as_bytes().len(), 15);
        assert!(TcpCa::new("").is_err());
        assert!(TcpCa::new("sixteen_chars_xx").is_err());
        assert!(TcpCa::new("bb r").is_err());
        // Well spelled but unknown to the kernel: refused by the probe (ENOENT).
        assert!(TcpCa::new("nosuchcc").unwrap().probe().is_err());
    }
}
