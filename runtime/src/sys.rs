//! Thin wrappers over the system calls the runtime needs and `std`/`socket2` do not offer.
//! This is one of the few modules allowed `unsafe`; every block says why it is sound.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `setsockopt(fd, level, name, value)` with the option value passed as `*value` and its
/// exact size: the kernel copies `size_of::<T>()` bytes from it (and anything it points to
/// must outlive the call, which a borrow held by the caller guarantees).
fn setsockopt<T: Copy>(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> io::Result<()> {
    // SAFETY: `value` is a live reference to a `T`, so the pointer is valid for reads of
    // exactly the length passed; the kernel only reads it (copies it in) during the call and
    // fails with an error (it does not write) if the option does not fit that size.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// The most `RLIMIT_NOFILE` is raised to when the process may raise its hard limit.
const NOFILE_TARGET: u64 = 1 << 20;

/// Raise the soft `RLIMIT_NOFILE` to the hard limit, and, when the process may raise the
/// hard limit too (root / `CAP_SYS_RESOURCE`), both up to `fs.nr_open` (at most 1048576).
/// Returns (old soft, new soft).
pub fn raise_nofile_limit() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit struct for the duration of the call.
    cvt(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) })?;
    let old = lim.rlim_cur;
    // The kernel refuses a limit above fs.nr_open (EPERM even for root).
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(NOFILE_TARGET);
    let target = NOFILE_TARGET.min(nr_open);
    if lim.rlim_max < target {
        let want = libc::rlimit {
            rlim_cur: target,
            rlim_max: target,
        };
        // SAFETY: `want` is a valid rlimit struct; the kernel only reads it. Without the
        // privilege to raise the hard limit this fails with EPERM and nothing changes.
        if cvt(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) }).is_ok() {
            return Ok((old, target));
        }
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: `lim` is a valid rlimit struct read just above; the kernel only reads it.
        cvt(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) })?;
    }
    Ok((old, lim.rlim_cur))
}

/// The soft `RLIMIT_MEMLOCK` in bytes (`u64::MAX` when unlimited).
pub fn memlock_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit struct for the duration of the call.
    cvt(unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) })?;
    Ok(lim.rlim_cur)
}

/// Number of open file descriptors of this process (entries of `/proc/self/fd`).
pub fn open_fd_count() -> io::Result<usize> {
    // The directory handle itself is one entry while we read it.
    Ok(std::fs::read_dir("/proc/self/fd")?
        .count()
        .saturating_sub(1))
}

/// Put a descriptor into non-blocking mode.
pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a descriptor the caller owns; no memory is passed.
    let flags = cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    if flags & libc::O_NONBLOCK == 0 {
        // SAFETY: as above.
        cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
    }
    Ok(())
}

/// Set `SO_LINGER {on, 0}` so that closing the socket sends a TCP RST.
pub fn set_linger_zero(fd: RawFd) -> io::Result<()> {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_LINGER, &l)
}

/// `IP_TRANSPARENT` (IPv4 socket) or `IPV6_TRANSPARENT` (IPv6 socket): a listener may then
/// accept connections addressed to any address, as an nftables `tproxy` rule delivers them
/// (the accepted socket's local address is the connection's original destination). Needs
/// `CAP_NET_ADMIN` (or `CAP_NET_RAW`).
pub fn set_transparent(fd: RawFd, ipv6: bool) -> io::Result<()> {
    let on: libc::c_int = 1;
    if ipv6 {
        setsockopt(fd, libc::SOL_IPV6, libc::IPV6_TRANSPARENT, &on)
    } else {
        setsockopt(fd, libc::SOL_IP, libc::IP_TRANSPARENT, &on)
    }
}

/// `IP_BIND_ADDRESS_NO_PORT`: a `bind` to port 0 on this socket keeps the address only and
/// leaves the port to `connect`, which picks one unique for the whole 4-tuple (and may reuse
/// a loopback TIME_WAIT one). Without it, `bind` must find a port free for every
/// destination, searching past each TIME_WAIT socket of the address. IPv4 and IPv6 sockets.
pub fn set_bind_address_no_port(fd: RawFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    setsockopt(fd, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, &on)
}

/// `TCP_NOTSENT_LOWAT`: the socket is writable (and `send` accepts more) only while fewer
/// than `bytes` of its send queue are still unsent, i.e. not yet handed to the network;
/// bytes sent but not yet acknowledged do not count. Keeps a sender's queue in its own
/// hands (where it can still reorder) rather than the kernel's.
pub fn set_tcp_notsent_lowat(fd: RawFd, bytes: u32) -> io::Result<()> {
    let v: libc::c_int = bytes.min(i32::MAX as u32) as libc::c_int;
    setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT, &v)
}

/// The socket's own `TCP_NOTSENT_LOWAT`: 0 when never set, in which case the system's
/// `net.ipv4.tcp_notsent_lowat` applies (`u32::MAX`, no limit, by default).
pub fn tcp_notsent_lowat(fd: RawFd) -> io::Result<u32> {
    let mut v: libc::c_uint = 0;
    let mut len = std::mem::size_of::<libc::c_uint>() as libc::socklen_t;
    // SAFETY: `v` and `len` are live, writable locals; the kernel writes at most `len` bytes
    // (4) into `v` and the actual length into `len` during the call.
    cvt(unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            (&mut v as *mut libc::c_uint).cast(),
            &mut len,
        )
    })?;
    Ok(v)
}

/// `shutdown(fd, SHUT_WR)`: send FIN, keep reading.
pub fn shutdown_write(fd: RawFd) -> io::Result<()> {
    // SAFETY: plain syscall on a descriptor the caller owns.
    cvt(unsafe { libc::shutdown(fd, libc::SHUT_WR) })?;
    Ok(())
}

/// `recv(fd, buf, MSG_DONTWAIT)`: the bytes queued now (0 at end of stream), or
/// `WouldBlock`. For readiness-driven I/O on a socket the ring otherwise owns.
pub fn recv_nonblocking(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the duration of the call
    // and the kernel writes at most that many.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// `recv(fd, MSG_DONTWAIT)` of at most `max` bytes into the spare capacity of `buf`, after
/// the bytes it holds (no zeroing of the spare capacity first): the bytes queued now (0 at
/// end of stream), appended to `buf`, or `WouldBlock`.
pub fn recv_spare<B: monoio::buf::IoBufMut + monoio::buf::IoBuf>(
    fd: RawFd,
    buf: &mut B,
    max: usize,
) -> io::Result<usize> {
    let init = buf.bytes_init();
    let len = buf.bytes_total().saturating_sub(init).min(max);
    // SAFETY: `IoBufMut` promises `write_ptr()` is valid for writes of `bytes_total()`
    // bytes, so `init + len` ≤ that bound; the kernel writes at most `len` bytes there
    // during the call, and the buffer is borrowed mutably throughout.
    let n = unsafe {
        libc::recv(
            fd,
            buf.write_ptr().add(init).cast(),
            len,
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel initialised `n` (≤ `len`) bytes right after the first `init`.
    unsafe { buf.set_init(init + n as usize) };
    Ok(n as usize)
}

/// `send(fd, data, MSG_DONTWAIT | MSG_NOSIGNAL)`: what fits in the socket buffer now, or
/// `WouldBlock`. (Not `sendmsg`: one buffer needs no message header or iovec copied in.)
pub fn send_nonblocking(fd: RawFd, data: &[u8]) -> io::Result<usize> {
    // SAFETY: `data` is valid for reads of `data.len()` bytes for the duration of the call.
    let n = unsafe {
        libc::send(
            fd,
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// `sendmsg(fd, bufs, MSG_DONTWAIT | MSG_NOSIGNAL)`: one gathered write of what fits in
/// the socket buffer now, or `WouldBlock`.
pub fn send_vectored_nonblocking(fd: RawFd, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
    // SAFETY: an all-zero msghdr is a valid value (no name, no control data, no iovecs).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // `IoSlice` is guaranteed ABI-compatible with `struct iovec` on Unix; the kernel only
    // reads the iovecs and the memory they point at, all borrowed for the call.
    msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = bufs.len().min(1024) as _;
    // SAFETY: `msg` points at `bufs`, valid for reads for the duration of the call.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Attach a classic BPF program to a `SO_REUSEPORT` group that picks the socket with the
/// index of the CPU the packet arrived on (modulo `group_size`). Sockets must be bound in
/// worker order for the index to mean "the worker pinned to that CPU".
pub fn attach_reuseport_cpu_cbpf(fd: RawFd, group_size: u32) -> io::Result<()> {
    const SKF_AD_OFF: u32 = 0xfffff000; // (-0x1000) as u32
    const SKF_AD_CPU: u32 = 36;
    let code = [
        // A = current CPU
        libc::sock_filter {
            code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
            jt: 0,
            jf: 0,
            k: SKF_AD_OFF.wrapping_add(SKF_AD_CPU),
        },
        // A = A % group_size
        libc::sock_filter {
            code: (libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: group_size.max(1),
        },
        // return A
        libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_A) as u16,
            jt: 0,
            jf: 0,
            k: 0,
        },
    ];
    let prog = libc::sock_fprog {
        len: code.len() as u16,
        filter: code.as_ptr() as *mut _,
    };
    // `prog` points at `code`, which outlives the call; the kernel copies the program.
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_ATTACH_REUSEPORT_CBPF, &prog)
}

/// A non-blocking pipe used as the in-kernel buffer of a splice forwarder.
pub struct Pipe {
    pub read: OwnedFd,
    pub write: OwnedFd,
    pub capacity: usize,
    /// The size asked for (the pool hands a pipe out again only for the same request).
    pub requested: usize,
}

impl Pipe {
    /// Create a pipe and try to size it to `size` bytes (capped by `/proc/sys/fs/pipe-max-size`
    /// for unprivileged users; the size actually granted is recorded).
    pub fn new(size: usize) -> io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` is a writable array of two descriptors, as pipe2 requires.
        cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) })?;
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let want = size.clamp(4096, i32::MAX as usize) as libc::c_int;
        // SAFETY: F_SETPIPE_SZ/F_GETPIPE_SZ take an int argument and no memory.
        let granted = match cvt(unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, want) })
        {
            Ok(n) => n as usize,
            // EPERM above pipe-max-size: keep the default size.
            // SAFETY: F_GETPIPE_SZ takes no argument and no memory.
            Err(_) => cvt(unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) })? as usize,
        };
        Ok(Pipe {
            read,
            write,
            capacity: granted,
            requested: size,
        })
    }
}

/// One non-blocking `splice(2)` of up to `len` bytes from `from` to `to`.
/// Returns `Ok(0)` at end of file on `from`, `Err(WouldBlock)` when either side is not ready.
pub fn splice_nonblocking(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: null offsets are valid for pipes and sockets; descriptors are owned by the
    // caller for the duration of the call; no user memory is passed.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// CPU time the calling thread has used so far (`CLOCK_THREAD_CPUTIME_ID`).
pub fn thread_cpu_time() -> io::Result<std::time::Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable `timespec` we own for the duration of the call.
    cvt(unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) })?;
    Ok(std::time::Duration::new(
        ts.tv_sec as u64,
        ts.tv_nsec as u32,
    ))
}

/// Which CPU the calling thread runs on now.
pub fn current_cpu() -> Option<usize> {
    // SAFETY: sched_getcpu takes no arguments and only returns a value.
    let c = unsafe { libc::sched_getcpu() };
    (c >= 0).then_some(c as usize)
}

/// Run `f` with a `socket2` view of a socket descriptor the caller keeps open.
pub fn with_sockref<R>(
    fd: RawFd,
    f: impl FnOnce(socket2::SockRef<'_>) -> io::Result<R>,
) -> io::Result<R> {
    // SAFETY: the caller owns `fd` and keeps it open for this call; the borrow does not
    // outlive the closure, and SockRef never closes the descriptor.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    f(socket2::SockRef::from(&borrowed))
}

/// The destination a connection had before an iptables/nftables `REDIRECT` (or `DNAT`)
/// rewrote it: `getsockopt(SOL_IP, SO_ORIGINAL_DST)` for IPv4 sockets and
/// `getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)` for IPv6 ones, read from conntrack.
///
/// `Ok(None)` when the connection was not NATed: conntrack has no entry (`ENOENT`), the
/// option is not available for this socket (`ENOPROTOOPT`), or the original destination
/// is the socket's own local address (the connection was made to the listener directly).
pub fn original_dst(fd: RawFd) -> io::Result<Option<std::net::SocketAddr>> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
    let local = with_sockref(fd, |s| s.local_addr())?.as_socket();
    let found = match local {
        Some(SocketAddr::V4(_)) => {
            // SAFETY: sockaddr_in is plain old data; all-zero is a valid value.
            let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            // SAFETY: `sa` is writable and `len` holds its exact size; the kernel writes at
            // most `len` bytes and updates `len`. The descriptor is owned by the caller.
            let r = cvt(unsafe {
                libc::getsockopt(
                    fd,
                    libc::SOL_IP,
                    libc::SO_ORIGINAL_DST,
                    (&mut sa as *mut libc::sockaddr_in).cast(),
                    &mut len,
                )
            });
            r.map(|_| {
                let ip = Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr));
                SocketAddr::new(IpAddr::V4(ip), u16::from_be(sa.sin_port))
            })
        }
        Some(SocketAddr::V6(_)) => {
            // SAFETY: sockaddr_in6 is plain old data; all-zero is a valid value.
            let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            // SAFETY: `sa` is writable and `len` holds its exact size; the kernel writes at
            // most `len` bytes and updates `len`. The descriptor is owned by the caller.
            let r = cvt(unsafe {
                libc::getsockopt(
                    fd,
                    libc::SOL_IPV6,
                    libc::IP6T_SO_ORIGINAL_DST,
                    (&mut sa as *mut libc::sockaddr_in6).cast(),
                    &mut len,
                )
            });
            r.map(|_| {
                let ip = Ipv6Addr::from(sa.sin6_addr.s6_addr);
                SocketAddr::new(IpAddr::V6(ip), u16::from_be(sa.sin6_port))
            })
        }
        None => return Ok(None),
    };
    match found {
        Ok(a) if Some(a) == local => Ok(None),
        Ok(a) => Ok(Some(a)),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOENT) | Some(libc::ENOPROTOOPT) | Some(libc::EOPNOTSUPP)
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Bytes waiting in a pipe (`FIONREAD` on its read end).
pub fn pipe_pending(pipe: &Pipe) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer, which points at `n`, alive for
    // the call; the descriptor is owned by `pipe`.
    cvt(unsafe { libc::ioctl(pipe.read.as_raw_fd(), libc::FIONREAD, &mut n) })?;
    Ok(n.max(0) as usize)
}

/// What [`apply_allocator`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllocatorStatus {
    /// `retain_freed: false`: glibc's defaults (dynamic thresholds) left alone.
    Defaults,
    /// Both thresholds set.
    Retaining,
    /// glibc refused a value, or the C library is not glibc: nothing (or not all) was set.
    NotApplied,
}

/// Apply `runtime.allocator` ([`AllocatorConfig`](crate::config::AllocatorConfig)) to this
/// process's allocator, once: later calls return the first call's status and change nothing.
/// [`spawn_workers`](crate::spawn_workers) calls it before it starts any worker thread.
pub fn apply_allocator(cfg: &crate::config::AllocatorConfig) -> AllocatorStatus {
    static APPLIED: std::sync::OnceLock<AllocatorStatus> = std::sync::OnceLock::new();
    *APPLIED.get_or_init(|| {
        if !cfg.retain_freed {
            return AllocatorStatus::Defaults;
        }
        if set_malloc_thresholds(cfg.mmap_threshold, cfg.trim_threshold) {
            tracing::debug!(
                mmap_threshold = cfg.mmap_threshold,
                trim_threshold = cfg.trim_threshold,
                "allocator retains freed memory"
            );
            AllocatorStatus::Retaining
        } else {
            tracing::warn!(
                mmap_threshold = cfg.mmap_threshold,
                trim_threshold = cfg.trim_threshold,
                "runtime.allocator: thresholds not set (not glibc, or refused); the allocator keeps its defaults"
            );
            AllocatorStatus::NotApplied
        }
    })
}

/// Set glibc malloc's `M_MMAP_THRESHOLD` (blocks below it come from the heap and stay there
/// when freed) and `M_TRIM_THRESHOLD` (free heap top kept before it is returned to the
/// kernel); fixed values also stop glibc's dynamic adjustment of both. Returns whether glibc
/// took both (it refuses an mmap threshold above 32 MiB on 64-bit, and values that are no C
/// `int`); not glibc: `false`, nothing done. Process-wide: only [`apply_allocator`] calls it
/// (once, at start-up).
fn set_malloc_thresholds(mmap_threshold: usize, trim_threshold: usize) -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let (Ok(m), Ok(t)) = (
            libc::c_int::try_from(mmap_threshold),
            libc::c_int::try_from(trim_threshold),
        ) else {
            return false;
        };
        // SAFETY: `mallopt` takes two integers and dereferences no memory of ours; it cannot
        // break Rust's memory safety. glibc documents it MT-Unsafe (`const:mallopt`): it
        // writes malloc's global parameters, under the main arena's lock only, that
        // malloc/free in other arenas read without that lock. We call it once per process
        // (`apply_allocator`'s OnceLock), from `spawn_workers` before any worker thread — the
        // threads that allocate — exists. A thread the embedding process started earlier
        // (signals, admin, certificate renewal) that allocates at that moment races on those
        // word-sized parameters exactly as glibc's own `free` does when it raises the dynamic
        // thresholds from any thread: it uses the old or the new threshold for that call,
        // which changes where a block is placed, not whether the heap is consistent.
        let mmap_ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, m) } == 1;
        // SAFETY: as above (same call site, same once-per-process start-up).
        let trim_ok = unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, t) } == 1;
        mmap_ok && trim_ok
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = (mmap_threshold, trim_threshold);
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values glibc's `mallopt` cannot take are refused before it is called (the
    /// thresholds' effect is tested in `tests/allocator.rs`, in processes of their own).
    #[test]
    fn malloc_thresholds_that_are_no_c_int_are_refused() {
        assert!(!set_malloc_thresholds(usize::MAX, 32 << 20));
        assert!(!set_malloc_thresholds(4 << 20, 1 << 40));
    }

    #[test]
    fn original_dst_of_a_direct_connection_is_none() {
        for bind in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(l) = std::net::TcpListener::bind(bind) else {
                continue; // no IPv6 here
            };
            let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (s, _) = l.accept().unwrap();
            // Not redirected: no NAT entry, or one whose original destination is the
            // listener itself; either way "none".
            assert_eq!(original_dst(s.as_raw_fd()).unwrap(), None, "{bind}");
            drop(c);
        }
    }
}
