//! The PM QoS CPU latency request (`runtime.cpu_latency_limit`).
//!
//! Linux keeps one list of CPU latency requests and applies the smallest of them to every
//! CPU of the host: the idle code may not put a CPU into an idle state whose wake-up takes
//! longer than that many microseconds, and at 0 idle CPUs poll instead of halting. A process
//! adds a request by opening `/dev/cpu_dma_latency` and writing its limit (a native-endian
//! `s32` of microseconds; the kernel also takes a hex string); the request stands while the
//! file stays open and is withdrawn when it is closed, by us or by the kernel when the
//! process exits. Reading the file returns the aggregate now in force, as an `s32` (the
//! kernel's default, with no request, is 2000 s). See the kernel's
//! `Documentation/power/pm_qos_interface.rst`; tuned's `latency-performance` profile uses
//! the same device.
//!
//! [`spawn_workers`](crate::spawn_workers) asks for the configured limit once per process
//! ([`hold_for_process`]) and keeps the file open until the process exits. When it cannot
//! (not root, no such device) it logs a warning naming the file and the OS error, and
//! [`status`] / [`render_prometheus`] say the request is not held.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, AtomicI64, Ordering::SeqCst};
use std::sync::OnceLock;
use std::time::Duration;

/// The device of the CPU latency request.
pub const CPU_DMA_LATENCY: &str = "/dev/cpu_dma_latency";

/// One CPU latency request: in force while this value lives (the file is open).
#[derive(Debug)]
pub struct CpuLatencyRequest {
    file: File,
    path: PathBuf,
    limit_us: AtomicI32,
}

/// Why a request could not be made: the file and the OS error.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct RequestError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

impl CpuLatencyRequest {
    /// Open `path` (normally [`CPU_DMA_LATENCY`]) and request `limit_us`.
    pub fn open_at(path: &Path, limit_us: i32) -> Result<Self, RequestError> {
        let err = |source| RequestError {
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new().write(true).open(path).map_err(err)?;
        let r = CpuLatencyRequest {
            file,
            path: path.to_owned(),
            limit_us: AtomicI32::new(limit_us),
        };
        r.update(limit_us).map_err(err)?;
        Ok(r)
    }

    /// Request `limit_us` on [`CPU_DMA_LATENCY`].
    pub fn open(limit_us: i32) -> Result<Self, RequestError> {
        Self::open_at(Path::new(CPU_DMA_LATENCY), limit_us)
    }

    /// Change this request's limit (the same request, not a second one).
    pub fn update(&self, limit_us: i32) -> io::Result<()> {
        write_limit(&self.file, limit_us)?;
        self.limit_us.store(limit_us, SeqCst);
        Ok(())
    }

    /// Lower this request to `limit_us` if that is below it; concurrent callers end at the
    /// smallest. Returns the limit now requested.
    fn lower(&self, limit_us: i32) -> io::Result<i32> {
        let prev = self.limit_us.fetch_min(limit_us, SeqCst);
        if limit_us < prev {
            write_limit(&self.file, limit_us)?;
            // A concurrent caller may have written a larger value after a smaller one was
            // recorded: whoever writes last puts the smallest back.
            let now = self.limit_us.load(SeqCst);
            if now != limit_us {
                write_limit(&self.file, now)?;
            }
        }
        Ok(self.limit_us())
    }

    pub fn limit_us(&self) -> i32 {
        self.limit_us.load(SeqCst)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// One write of exactly four bytes: the kernel reads them as a binary s32 (a write of any
/// other length is parsed as a hex string).
fn write_limit(mut file: &File, limit_us: i32) -> io::Result<()> {
    if limit_us < 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a CPU latency limit cannot be negative",
        ));
    }
    let n = file.write(&limit_us.to_ne_bytes())?;
    if n != 4 {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("short write ({n} of 4 bytes)"),
        ));
    }
    Ok(())
}

/// The aggregate CPU latency limit in force on this host (µs), read from `path`.
pub fn read_limit_at(path: &Path) -> io::Result<i32> {
    let mut f = File::open(path)?;
    let mut b = [0u8; 4];
    f.read_exact(&mut b)?;
    Ok(i32::from_ne_bytes(b))
}

/// The aggregate CPU latency limit in force on this host (µs): the smallest request of any
/// process or driver, or the kernel's default (2000 s) when there is none. Needs read
/// access to [`CPU_DMA_LATENCY`] (root on most systems).
pub fn current_limit() -> io::Result<i32> {
    read_limit_at(Path::new(CPU_DMA_LATENCY))
}

/// A configured limit in whole microseconds (sub-microsecond parts are dropped), or `None`
/// when it does not fit the kernel's `s32`.
pub fn limit_us(limit: Duration) -> Option<i32> {
    i32::try_from(limit.as_micros()).ok()
}

/// What this process holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// `runtime.cpu_latency_limit` is not set.
    NotRequested,
    /// The request stands at this many µs.
    Held { limit_us: i32 },
    /// It was asked for (the smallest limit asked, µs) but could not be made: the file and
    /// the OS error.
    Failed { limit_us: i64, error: String },
}

/// The process's request once made; never dropped (the kernel withdraws it at exit).
static HELD: OnceLock<CpuLatencyRequest> = OnceLock::new();
/// The smallest limit asked for (µs), -1 while none was.
static ASKED_US: AtomicI64 = AtomicI64::new(-1);
/// Why the request could not be made (the first failure).
static FAILURE: OnceLock<String> = OnceLock::new();

/// Hold a CPU latency request of `limit` for the rest of this process's life. Called by
/// [`spawn_workers`](crate::spawn_workers) for `runtime.cpu_latency_limit`; a later call
/// (a second set of workers) lowers the request if it asks for less and otherwise keeps it
/// (the kernel applies the smallest request anyway). When the request cannot be made, a
/// warning names the file and the OS error, and the status says so.
pub fn hold_for_process(limit: Duration) -> Status {
    hold_at(Path::new(CPU_DMA_LATENCY), limit)
}

fn hold_at(path: &Path, limit: Duration) -> Status {
    let asked = i64::try_from(limit.as_micros()).unwrap_or(i64::MAX);
    let _ = ASKED_US.fetch_update(SeqCst, SeqCst, |p| (p < 0 || asked < p).then_some(asked));
    let Some(us) = limit_us(limit) else {
        let error = format!("{limit:?} does not fit the kernel's s32 of microseconds");
        tracing::warn!(%error, "runtime.cpu_latency_limit: not held");
        let _ = FAILURE.set(error);
        return status();
    };
    if let Some(r) = HELD.get() {
        match r.lower(us) {
            Ok(now) if now == us => {
                tracing::info!(file = %r.path().display(), limit_us = us, "PM QoS CPU latency request at {us} us")
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(file = %r.path().display(), error = %e, held_us = r.limit_us(), "runtime.cpu_latency_limit: cannot lower the held request to {us} us")
            }
        }
        return status();
    }
    match CpuLatencyRequest::open_at(path, us) {
        Ok(r) => {
            if let Err(mine) = HELD.set(r) {
                // Another thread got there first: withdraw ours, lower theirs if need be.
                drop(mine);
                return hold_at(path, limit);
            }
            tracing::info!(
                file = %path.display(),
                limit_us = us,
                "PM QoS CPU latency request held for the life of the process (host-wide: no CPU enters an idle state slower to leave than this)"
            );
        }
        Err(e) => {
            tracing::warn!(
                file = %e.path.display(),
                error = %e.source,
                "runtime.cpu_latency_limit: cannot open or write {}: {}; the PM QoS CPU latency request is NOT held (needs root and the device): idle CPUs may halt as usual",
                e.path.display(),
                e.source
            );
            let _ = FAILURE.set(e.to_string());
        }
    }
    status()
}

/// What this process holds now.
pub fn status() -> Status {
    if let Some(r) = HELD.get() {
        return Status::Held {
            limit_us: r.limit_us(),
        };
    }
    match ASKED_US.load(SeqCst) {
        n if n < 0 => Status::NotRequested,
        n => Status::Failed {
            limit_us: n,
            error: FAILURE.get().cloned().unwrap_or_default(),
        },
    }
}

/// Prometheus gauges of [`status`]: `{prefix}_cpu_latency_limit_held` (1 held, 0 not, or
/// not asked for) and, while asked for, `{prefix}_cpu_latency_limit_us` (the limit asked).
pub fn render_prometheus(prefix: &str) -> String {
    let (held, limit) = match status() {
        Status::NotRequested => (0, None),
        Status::Held { limit_us } => (1, Some(i64::from(limit_us))),
        Status::Failed { limit_us, .. } => (0, Some(limit_us)),
    };
    let mut out = format!(
        "# TYPE {prefix}_cpu_latency_limit_held gauge\n{prefix}_cpu_latency_limit_held {held}\n"
    );
    if let Some(l) = limit {
        out.push_str(&format!(
            "# TYPE {prefix}_cpu_latency_limit_us gauge\n{prefix}_cpu_latency_limit_us {l}\n"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_device_is_an_error_naming_it() {
        let p = Path::new("/nonexistent-dir/cpu_dma_latency");
        let e = CpuLatencyRequest::open_at(p, 0).unwrap_err();
        assert_eq!(e.source.kind(), io::ErrorKind::NotFound);
        let s = e.to_string();
        assert!(s.starts_with("/nonexistent-dir/cpu_dma_latency: "), "{s}");
        assert!(read_limit_at(p).is_err());
    }

    /// A regular file stands in for the device: four native-endian bytes per request,
    /// rewritten in place by an update, never negative.
    #[test]
    fn request_writes_a_binary_s32() {
        let dir = std::env::temp_dir().join(format!("pmqos-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("cpu_dma_latency");
        std::fs::write(&f, b"").unwrap();
        let r = CpuLatencyRequest::open_at(&f, 7).unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), 7i32.to_ne_bytes());
        assert_eq!(read_limit_at(&f).unwrap(), 7);
        r.update(0).unwrap();
        // A plain file appends; the device replaces. Each write is one s32.
        assert_eq!(std::fs::read(&f).unwrap()[4..], 0i32.to_ne_bytes());
        assert_eq!(
            r.update(-1).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(r.limit_us(), 0);
        drop(r);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn limits_convert_to_whole_microseconds() {
        assert_eq!(limit_us(Duration::ZERO), Some(0));
        assert_eq!(limit_us(Duration::from_nanos(1500)), Some(1));
        assert_eq!(limit_us(Duration::from_secs(2000)), Some(2_000_000_000));
        assert_eq!(limit_us(Duration::from_secs(3000)), None);
    }

    /// The process-wide request (on a stand-in file, so the host is untouched): held once,
    /// lowered by a smaller limit, kept by a larger one; its gauges follow.
    #[test]
    fn process_request_is_held_once_and_only_lowered() {
        let dir = std::env::temp_dir().join(format!("pmqos-proc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("cpu_dma_latency");
        std::fs::write(&f, b"").unwrap();
        assert_eq!(
            hold_at(&f, Duration::from_micros(20)),
            Status::Held { limit_us: 20 }
        );
        assert_eq!(
            hold_at(&f, Duration::from_micros(50)),
            Status::Held { limit_us: 20 }
        );
        assert_eq!(
            hold_at(&f, Duration::from_micros(5)),
            Status::Held { limit_us: 5 }
        );
        // One open file, two writes (20, then 5).
        let bytes = std::fs::read(&f).unwrap();
        assert_eq!(bytes.len(), 8);
        assert_eq!(bytes[4..], 5i32.to_ne_bytes());
        let text = render_prometheus("x");
        assert!(text.contains("\nx_cpu_latency_limit_held 1\n"), "{text}");
        assert!(text.contains("\nx_cpu_latency_limit_us 5\n"), "{text}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
