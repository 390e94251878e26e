//! Runtime configuration: serde structs with defaults, `validate()`, and a YAML loader whose
//! errors name the file, line, column and field.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::driver::DriverChoice;

/// An error in a configuration file: where, which field, what.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// Dotted path of the offending field (`listeners[1].upstream`), when known.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
            if let Some(c) = self.column {
                write!(f, ":{c}")?;
            }
        }
        if let Some(field) = &self.field {
            write!(f, ": field `{field}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Parse YAML text into `T`; errors carry file, line, column and the field path.
pub fn from_yaml_str<T: DeserializeOwned>(file: &Path, text: &str) -> Result<T, ConfigError> {
    serde_norway::from_str(text).map_err(|e| {
        let mut err = yaml_error(file, e);
        complete_field(&mut err, text);
        err
    })
}

/// A bad value of a leaf field (a duration that does not parse) is reported by serde with the
/// path of the enclosing struct and the position of the value's key: name the key too.
fn complete_field(err: &mut ConfigError, text: &str) {
    let (Some(line), Some(col)) = (err.line, err.column) else {
        return;
    };
    if err.message.starts_with("unknown field") || err.message.starts_with("missing field") {
        return;
    }
    let Some(l) = text.lines().nth(line.saturating_sub(1)) else {
        return;
    };
    let rest = l.get(col.saturating_sub(1)..).unwrap_or("");
    let Some((key, _)) = rest.split_once(':') else {
        return;
    };
    let key = key.trim();
    if key.is_empty()
        || !key
            .chars()
            .all(|c| c.is_alphanumeric() || c == '_' || c == '-')
    {
        return;
    }
    match &err.field {
        Some(f) if f == key || f.ends_with(&format!(".{key}")) => {}
        Some(f) => err.field = Some(format!("{f}.{key}")),
        None => err.field = Some(key.to_string()),
    }
}

/// Read a config file's text; the error names the file.
pub fn read_file(file: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(file).map_err(|e| ConfigError {
        file: file.to_owned(),
        line: None,
        column: None,
        field: None,
        message: format!("cannot read: {e}"),
    })
}

/// Read and parse a YAML file.
pub fn from_yaml_file<T: DeserializeOwned>(file: &Path) -> Result<T, ConfigError> {
    from_yaml_str(file, &read_file(file)?)
}

fn yaml_error(file: &Path, e: serde_norway::Error) -> ConfigError {
    let loc = e.location();
    // The message reads `<path>: <what> at line L column C`; split it into its parts.
    let mut message = e.to_string();
    if let Some(i) = message.find(" at line ") {
        message.truncate(i);
    }
    let mut field = None;
    if let Some((head, rest)) = message.split_once(": ") {
        let is_path = !head.is_empty()
            && head
                .chars()
                .all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '.' | '[' | ']'));
        if is_path {
            field = Some(head.to_string());
            message = rest.to_string();
        }
    }
    ConfigError {
        file: file.to_owned(),
        line: loc.as_ref().map(|l| l.line()),
        column: loc.as_ref().map(|l| l.column()),
        field,
        message,
    }
}

/// A validation error before the file name is attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub field: String,
    pub message: String,
}

impl Invalid {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Invalid {
            field: field.into(),
            message: message.into(),
        }
    }

    /// Attach the file; the line is found by locating the field's key in the text.
    pub fn in_file(self, file: &Path, text: Option<&str>) -> ConfigError {
        let line = text.and_then(|t| locate_field(t, &self.field));
        ConfigError {
            file: file.to_owned(),
            line,
            column: None,
            field: Some(self.field),
            message: self.message,
        }
    }
}

/// Best-effort line of a dotted field path (`listeners[1].listen`) in YAML text: walks the
/// keys in order, counting sequence items for `[n]`. Returns a 1-based line.
pub fn locate_field(text: &str, field: &str) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let mut from = 0usize;
    let mut min_indent = 0usize;
    for part in field.split('.') {
        let (key, index) = match part.find('[') {
            Some(i) => (
                &part[..i],
                part[i + 1..part.len() - 1].parse::<usize>().ok(),
            ),
            None => (part, None),
        };
        let pos = (from..lines.len()).find(|&i| {
            let l = lines[i];
            let ind = l.len() - l.trim_start().len();
            let t = l.trim_start().trim_start_matches("- ");
            ind >= min_indent && (t.starts_with(&format!("{key}:")))
        })?;
        from = pos;
        min_indent = lines[pos].len() - lines[pos].trim_start().len();
        if let Some(n) = index {
            let mut seen = 0usize;
            let item = (pos + 1..lines.len()).find(|&i| {
                if lines[i].trim_start().starts_with("- ") || lines[i].trim() == "-" {
                    seen += 1;
                    seen == n + 1
                } else {
                    false
                }
            })?;
            from = item;
            let l = lines[item];
            min_indent = l.len() - l.trim_start().len();
        }
    }
    Some(from + 1)
}

/// Durations in config files: `50us`, `250ms`, `10s`, `5m`, `1h`, or a bare number of seconds.
pub mod duration {
    use super::*;

    /// The longest duration any setting takes: ten years.
    const MAX_SECS: f64 = 3650.0 * 86400.0;

    pub fn parse(s: &str) -> Result<Duration, String> {
        let s = s.trim();
        let split = s
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: f64 = num
            .parse()
            .map_err(|_| format!("invalid duration {s:?} (e.g. 250ms, 10s, 5m)"))?;
        let secs = match unit.trim() {
            "" | "s" => n,
            "ms" => n / 1e3,
            "us" | "µs" => n / 1e6,
            "m" => n * 60.0,
            "h" => n * 3600.0,
            u => {
                return Err(format!(
                    "unknown duration unit {u:?} in {s:?} (use us, ms, s, m or h)"
                ))
            }
        };
        if !secs.is_finite() || secs < 0.0 {
            return Err(format!("invalid duration {s:?}"));
        }
        // Deadlines are `Instant::now() + d`, which panics on overflow: a setting past ten
        // years is an error here, not a worker panic later.
        if secs > MAX_SECS {
            return Err(format!("duration {s:?} is too large (at most 3650 days)"));
        }
        Ok(Duration::from_secs_f64(secs))
    }

    pub fn format(d: Duration) -> String {
        let us = d.as_micros();
        if us % 1000 != 0 {
            return format!("{us}us");
        }
        let ms = d.as_millis();
        if ms % 1000 == 0 {
            format!("{}s", ms / 1000)
        } else {
            format!("{ms}ms")
        }
    }

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Duration::from_secs(n)),
            Raw::S(s) => parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

/// How bytes move between two sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ForwardMode {
    /// read/write through pooled user-space buffers, driven by the ring.
    #[default]
    Copy,
    /// readiness from the ring, then non-blocking `splice(2)` through a pipe (zero copy).
    Splice,
}

impl std::str::FromStr for ForwardMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "copy" => Ok(Self::Copy),
            "splice" => Ok(Self::Splice),
            o => Err(format!(
                "unknown forward mode {o:?} (expected copy or splice)"
            )),
        }
    }
}

/// Knobs of the byte forwarder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ForwardConfig {
    /// `copy` or `splice`.
    pub mode: ForwardMode,
    /// Bytes: first buffer taken from the per-core pool for a read (copy mode).
    pub buffer_size: usize,
    /// Bytes: a buffer grows to this once reads keep filling it (copy mode).
    pub max_buffer_size: usize,
    /// Bytes: pipe capacity per direction (splice mode).
    pub pipe_size: usize,
    /// A connection with no bytes moving either way for this long is closed.
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
    /// Free buffers each worker keeps for reuse, per size class; also the number of empty
    /// splice pipes it keeps (each holds two descriptors).
    pub pool_buffers: usize,
}

impl Default for ForwardConfig {
    fn default() -> Self {
        ForwardConfig {
            mode: ForwardMode::Copy,
            buffer_size: 64 * 1024,
            max_buffer_size: 256 * 1024,
            pipe_size: 256 * 1024,
            idle_timeout: Duration::from_secs(3600),
            pool_buffers: 64,
        }
    }
}

/// Knobs of the thread-per-core runtime.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Worker threads; absent = one per selected core.
    pub workers: Option<usize>,
    /// CPU ids to run workers on; absent = every core this process may use.
    pub cores: Option<Vec<usize>>,
    /// Pin each worker to its core.
    pub pin: bool,
    /// `auto`, `uring` or `epoll` (the environment variable `MESH_IO_DRIVER` wins).
    pub io_driver: DriverChoice,
    /// io_uring submission queue entries per worker.
    pub ring_entries: u32,
    /// Connections a worker holds at once; accept pauses at the limit.
    pub max_connections_per_worker: usize,
    /// After SIGTERM/SIGINT, how long open connections may finish.
    #[serde(with = "duration")]
    pub drain_timeout: Duration,
    /// `listen(2)` backlog for every sharded listener.
    pub listen_backlog: i32,
    /// `TCP_NODELAY` on accepted and upstream sockets.
    pub nodelay: bool,
    /// TCP keepalive idle time on accepted and upstream sockets; absent = off.
    #[serde(with = "opt_duration")]
    pub tcp_keepalive: Option<Duration>,
    /// Steer each connection to the worker on the CPU its packets arrive on (reuseport CBPF).
    /// Off by default: on loopback that CPU is the sender's, which puts every connection of a
    /// pinned client on one worker.
    pub reuseport_cpu_steering: bool,
    /// Busy polling: after activity, a worker keeps reaping its ring without sleeping for
    /// this long (`50us`); `0` = off. Lowers wake-up latency on hosts whose idle CPUs halt,
    /// at the cost of a CPU spinning while traffic flows. io_uring only. See [`crate::busy`].
    #[serde(with = "duration")]
    pub busy_poll: Duration,
    /// PM QoS CPU latency limit (`0us`, `10us`): held through `/dev/cpu_dma_latency` for the
    /// life of the process, so no CPU of the host enters an idle state slower to leave than
    /// this (0: idle CPUs poll instead of halting). Host-wide: it keeps every core out of
    /// deep idle, costing power on all of them. Absent = no request. Needs root; when it
    /// cannot be held a warning names the file and the error. See [`crate::pmqos`].
    #[serde(with = "opt_duration")]
    pub cpu_latency_limit: Option<Duration>,
    /// Real-time scheduling of the worker threads: `SCHED_FIFO` at this priority (1-99), so a
    /// woken worker preempts normal threads sharing its core at once instead of waiting for
    /// their time slice. Absent = normal scheduling. Refused together with `busy_poll` (a
    /// spinning real-time thread starves its core). Needs `CAP_SYS_NICE` or `RLIMIT_RTPRIO`;
    /// when refused the worker warns and runs as a normal thread. See [`crate::rtsched`].
    pub sched_fifo_priority: Option<u8>,
    /// Bytes: `SO_RCVBUF` on listeners (inherited by accepted sockets) and on connected
    /// sockets; absent = kernel autotuning (`net.ipv4.tcp_rmem`). The kernel doubles the
    /// value for its bookkeeping; setting it turns receive autotuning off for the socket.
    pub socket_recv_buffer: Option<usize>,
    /// Bytes: `SO_SNDBUF` likewise; absent = autotuning (`net.ipv4.tcp_wmem`).
    pub socket_send_buffer: Option<usize>,
    /// TCP congestion control (`TCP_CONGESTION`: `cubic`, `bbr`, ...) on listeners (inherited
    /// by accepted sockets) and connected sockets; absent = the host's
    /// `net.ipv4.tcp_congestion_control`. Checked when the config loads: a name this host
    /// lacks or does not allow this process is refused.
    pub tcp_congestion: Option<String>,
    pub forward: ForwardConfig,
    /// glibc malloc thresholds, applied once per process before the first worker starts.
    /// See [`AllocatorConfig`].
    pub allocator: AllocatorConfig,
}

/// `runtime.allocator`: whether the process's allocator (glibc malloc) keeps freed memory
/// instead of handing it back to the kernel after each burst. glibc's defaults serve blocks of
/// 128 KiB and more as fresh mmaps and give a heap's free top back once it exceeds 128 KiB
/// (both thresholds then move up dynamically); an HBONE connection's burst buffers (h2's read
/// buffer, TLS records) were then page-faulted in again on every burst (up to 75k faults per
/// GB, ~17 % of the HBONE proxies' CPU). Retaining costs RSS: freed blocks below
/// `mmap_threshold` stay in the heap and up to `trim_threshold` of free top per arena is kept,
/// so RSS does not fall back after a burst. Process-wide; set once, in
/// [`spawn_workers`](crate::spawn_workers) before any worker thread exists. Not glibc: ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AllocatorConfig {
    /// `true` (default): set both thresholds below (fixed; glibc's dynamic adjustment stops).
    /// `false`: leave glibc's defaults (128 KiB each, dynamic); the two sizes are ignored.
    pub retain_freed: bool,
    /// Bytes (`M_MMAP_THRESHOLD`): blocks smaller than this come from the heap and are kept
    /// there when freed; larger ones are mmapped and unmapped on free. Default 4 MiB
    /// (4194304); between 4096 and 32 MiB (glibc's maximum on 64-bit).
    pub mmap_threshold: usize,
    /// Bytes (`M_TRIM_THRESHOLD`): free memory at the top of a heap kept before it is given
    /// back to the kernel. Default 32 MiB (33554432); between 4096 and 2 GiB - 1.
    pub trim_threshold: usize,
}

impl Default for AllocatorConfig {
    fn default() -> Self {
        AllocatorConfig {
            retain_freed: true,
            mmap_threshold: 4 << 20,
            trim_threshold: 32 << 20,
        }
    }
}

/// Range of `allocator.mmap_threshold` (bytes; glibc refuses more than 32 MiB on 64-bit).
pub const MIN_MALLOC_THRESHOLD: usize = 4096;
pub const MAX_MALLOC_MMAP_THRESHOLD: usize = 32 << 20;
/// Largest `allocator.trim_threshold` (bytes; `mallopt` takes a C `int`).
pub const MAX_MALLOC_TRIM_THRESHOLD: usize = i32::MAX as usize;

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            workers: None,
            cores: None,
            pin: true,
            io_driver: DriverChoice::Auto,
            ring_entries: 1024,
            max_connections_per_worker: 50_000,
            drain_timeout: Duration::from_secs(10),
            listen_backlog: 4096,
            nodelay: true,
            tcp_keepalive: Some(Duration::from_secs(180)),
            reuseport_cpu_steering: false,
            busy_poll: Duration::ZERO,
            cpu_latency_limit: None,
            sched_fifo_priority: None,
            socket_recv_buffer: None,
            socket_send_buffer: None,
            tcp_congestion: None,
            forward: ForwardConfig::default(),
            allocator: AllocatorConfig::default(),
        }
    }
}

/// Whether `name` is a congestion control this process can set on its sockets (see
/// [`TcpCa::probe`](crate::listener::TcpCa::probe)); the error names what this host offers.
pub fn check_congestion(name: &str) -> Result<(), String> {
    let ca = crate::listener::TcpCa::new(name)?;
    ca.probe().map_err(|e| {
        let avail = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        let allowed = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_allowed_congestion_control")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        format!(
            "{name:?} cannot be set on this host ({e}); available: {avail}; allowed without \
             CAP_NET_ADMIN: {allowed} (a module may need `modprobe tcp_{name}`)"
        )
    })
}

/// Largest `busy_poll` budget accepted.
pub const MAX_BUSY_POLL: Duration = Duration::from_millis(10);
/// Largest `cpu_latency_limit` accepted: idle states take at most milliseconds to leave, so
/// a larger limit allows every one of them (no effect).
pub const MAX_CPU_LATENCY_LIMIT: Duration = Duration::from_secs(1);
/// Range of `socket_recv_buffer` / `socket_send_buffer` (bytes).
pub const MIN_SOCKET_BUFFER: usize = 4096;
pub const MAX_SOCKET_BUFFER: usize = 1 << 30;

mod opt_duration {
    use super::*;
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&duration::format(*d)),
            None => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        #[derive(Deserialize)]
        struct W(#[serde(with = "duration")] Duration);
        Ok(Option::<W>::deserialize(d)?.map(|w| w.0))
    }
}

impl RuntimeConfig {
    /// Check ranges and cross-field rules. `prefix` is the path of this struct in the file.
    pub fn validate(&self, prefix: &str) -> Result<(), Invalid> {
        let f = |name: &str| {
            if prefix.is_empty() {
                name.to_string()
            } else {
                format!("{prefix}.{name}")
            }
        };
        if self.workers == Some(0) {
            return Err(Invalid::new(f("workers"), "must be at least 1"));
        }
        if let Some(cores) = &self.cores {
            if cores.is_empty() {
                return Err(Invalid::new(f("cores"), "must list at least one CPU id"));
            }
            // Explicit cores win over the CPU affinity this process inherited (`taskset -c
            // 0 l4fwd` may still run its worker on CPU 1): only a CPU that is offline or
            // does not exist is refused.
            if let Err(why) = check_cores(cores, &HostCpus::read()) {
                return Err(Invalid::new(f("cores"), why));
            }
        }
        if !(2..=32768).contains(&self.ring_entries) || !self.ring_entries.is_power_of_two() {
            return Err(Invalid::new(
                f("ring_entries"),
                "must be a power of two between 2 and 32768",
            ));
        }
        if self.max_connections_per_worker == 0 {
            return Err(Invalid::new(
                f("max_connections_per_worker"),
                "must be at least 1",
            ));
        }
        if self.listen_backlog < 1 {
            return Err(Invalid::new(f("listen_backlog"), "must be at least 1"));
        }
        if self.busy_poll > MAX_BUSY_POLL {
            return Err(Invalid::new(
                f("busy_poll"),
                format!(
                    "at most {} (a longer budget only burns CPU; 0 turns it off)",
                    duration::format(MAX_BUSY_POLL)
                ),
            ));
        }
        if let Some(l) = self.cpu_latency_limit {
            if l > MAX_CPU_LATENCY_LIMIT {
                return Err(Invalid::new(
                    f("cpu_latency_limit"),
                    format!(
                        "at most {} (µs granularity; 0 keeps idle CPUs polling; omit it for no PM QoS request)",
                        duration::format(MAX_CPU_LATENCY_LIMIT)
                    ),
                ));
            }
        }
        if let Some(p) = self.sched_fifo_priority {
            if !(1..=crate::rtsched::MAX_PRIORITY).contains(&p) {
                return Err(Invalid::new(
                    f("sched_fifo_priority"),
                    format!(
                        "must be between 1 and {} (omit it for normal scheduling)",
                        crate::rtsched::MAX_PRIORITY
                    ),
                ));
            }
            if !self.busy_poll.is_zero() {
                return Err(Invalid::new(
                    f("sched_fifo_priority"),
                    "cannot be combined with busy_poll: a spinning SCHED_FIFO worker starves every other thread of its core (set busy_poll: 0 or omit sched_fifo_priority)",
                ));
            }
        }
        for (name, v) in [
            ("socket_recv_buffer", self.socket_recv_buffer),
            ("socket_send_buffer", self.socket_send_buffer),
        ] {
            if let Some(v) = v {
                if !(MIN_SOCKET_BUFFER..=MAX_SOCKET_BUFFER).contains(&v) {
                    return Err(Invalid::new(
                        f(name),
                        format!(
                            "must be between {MIN_SOCKET_BUFFER} and {MAX_SOCKET_BUFFER} bytes (omit it for kernel autotuning)"
                        ),
                    ));
                }
            }
        }
        if let Some(name) = &self.tcp_congestion {
            check_congestion(name).map_err(|why| Invalid::new(f("tcp_congestion"), why))?;
        }
        let al = &self.allocator;
        for (name, v, max) in [
            (
                "allocator.mmap_threshold",
                al.mmap_threshold,
                MAX_MALLOC_MMAP_THRESHOLD,
            ),
            (
                "allocator.trim_threshold",
                al.trim_threshold,
                MAX_MALLOC_TRIM_THRESHOLD,
            ),
        ] {
            if !(MIN_MALLOC_THRESHOLD..=max).contains(&v) {
                return Err(Invalid::new(
                    f(name),
                    format!(
                        "must be between {MIN_MALLOC_THRESHOLD} and {max} bytes (allocator.retain_freed: false keeps glibc's defaults)"
                    ),
                ));
            }
        }
        let fw = &self.forward;
        if fw.buffer_size < 4096 {
            return Err(Invalid::new(
                f("forward.buffer_size"),
                "must be at least 4096 bytes",
            ));
        }
        if fw.max_buffer_size < fw.buffer_size {
            return Err(Invalid::new(
                f("forward.max_buffer_size"),
                "must be at least forward.buffer_size",
            ));
        }
        if fw.pipe_size < 4096 {
            return Err(Invalid::new(
                f("forward.pipe_size"),
                "must be at least 4096 bytes",
            ));
        }
        if fw.idle_timeout.is_zero() {
            return Err(Invalid::new(
                f("forward.idle_timeout"),
                "must be greater than zero",
            ));
        }
        Ok(())
    }

    /// The CPUs workers run on, and how many workers. Explicit `cores` are used as given
    /// (workers pin to them even outside the affinity the process inherited); without them,
    /// the CPUs this process may use.
    pub fn worker_cores(&self) -> Vec<Option<usize>> {
        let cores: Vec<usize> = match &self.cores {
            Some(c) => c.clone(),
            None => core_affinity::get_core_ids()
                .map(|ids| ids.into_iter().map(|c| c.id).collect())
                .unwrap_or_default(),
        };
        let n = self.workers.unwrap_or(cores.len().max(1));
        (0..n)
            .map(|i| {
                if self.pin && !cores.is_empty() {
                    Some(cores[i % cores.len()])
                } else {
                    None
                }
            })
            .collect()
    }
}

/// The host's CPUs as the kernel lists them (`/sys/devices/system/cpu/{present,online}`),
/// independent of this process's affinity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostCpus {
    /// CPUs that exist (online or not); `None`: unknown.
    pub present: Option<Vec<usize>>,
    /// CPUs online now; `None`: unknown.
    pub online: Option<Vec<usize>>,
}

impl HostCpus {
    pub fn read() -> Self {
        let list = |f: &str| {
            std::fs::read_to_string(format!("/sys/devices/system/cpu/{f}"))
                .ok()
                .and_then(|s| parse_cpu_list(&s))
        };
        HostCpus {
            present: list("present"),
            online: list("online"),
        }
    }
}

/// Parse a kernel CPU list (`0-3,5,7-8`).
pub fn parse_cpu_list(s: &str) -> Option<Vec<usize>> {
    let mut out = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
                if a > b {
                    return None;
                }
                out.extend(a..=b);
            }
            None => out.push(part.trim().parse().ok()?),
        }
    }
    Some(out)
}

/// Every CPU of `cores` must be online on this host; this process's affinity does not
/// matter. With the kernel's lists unknown, the CPUs the process may use are the fallback.
pub fn check_cores(cores: &[usize], host: &HostCpus) -> Result<(), String> {
    let fmt = |v: &[usize]| {
        v.iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let online = match &host.online {
        Some(o) => o.clone(),
        None => core_affinity::get_core_ids()
            .map(|ids| ids.into_iter().map(|c| c.id).collect())
            .unwrap_or_default(),
    };
    for &c in cores {
        if online.contains(&c) {
            continue;
        }
        let exists = host.present.as_ref().is_some_and(|p| p.contains(&c));
        return Err(if exists {
            format!("CPU {c} is offline (online CPUs: {})", fmt(&online))
        } else {
            format!(
                "CPU {c} does not exist on this host (online CPUs: {})",
                fmt(&online)
            )
        });
    }
    Ok(())
}

/// Tests that pin to two CPUs: the first two online ones, or `None` after saying why the test
/// is skipped (a failure instead when `CI` is set: no test passes silently there).
#[cfg(test)]
pub(crate) fn two_online_cpus() -> Option<(usize, usize)> {
    let online = HostCpus::read().online.unwrap_or_default();
    if online.len() < 2 {
        let why = format!("needs 2 online CPUs (have {online:?})");
        netlab::cannot_run(&why);
        return None;
    }
    Some((online[0], online[1]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(
            duration::parse("250ms").unwrap(),
            Duration::from_millis(250)
        );
        assert_eq!(duration::parse("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(duration::parse("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(duration::parse("3").unwrap(), Duration::from_secs(3));
        assert!(duration::parse("10 parsecs").is_err());
        assert!(duration::parse("x").is_err());
        // Too large for `Duration` (or for a deadline): an error, not a panic.
        assert!(duration::parse("99999999999999999999s").is_err());
        assert!(duration::parse("87601h").is_err());
        assert_eq!(
            duration::parse("87600h").unwrap(),
            Duration::from_secs(3650 * 86400)
        );
    }

    #[test]
    fn unknown_field_names_line_and_field() {
        let text = "workers: 2\nforward:\n  mode: copy\n  bufer_size: 10\n";
        let e = from_yaml_str::<RuntimeConfig>(Path::new("rt.yaml"), text).unwrap_err();
        assert_eq!(e.line, Some(4), "{e}");
        assert!(e.to_string().contains("rt.yaml:4"), "{e}");
        assert!(e.message.contains("bufer_size"), "{e}");
        assert_eq!(e.field.as_deref(), Some("forward"), "{e}");
    }

    #[test]
    fn bad_value_names_field() {
        let text = "forward:\n  mode: teleport\n";
        let e = from_yaml_str::<RuntimeConfig>(Path::new("rt.yaml"), text).unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        assert_eq!(e.field.as_deref(), Some("forward.mode"), "{e}");
    }

    #[test]
    fn validation_errors_locate_line() {
        let text = "io_driver: auto\nforward:\n  buffer_size: 100\n";
        let cfg: RuntimeConfig = from_yaml_str(Path::new("x.yaml"), text).unwrap();
        let e = cfg
            .validate("")
            .unwrap_err()
            .in_file(Path::new("x.yaml"), Some(text));
        assert_eq!(e.field.as_deref(), Some("forward.buffer_size"));
        assert_eq!(e.line, Some(3), "{e}");
    }

    #[test]
    fn locate_indexed_field() {
        let text = "listeners:\n  - listen: a\n    upstream: b\n  - listen: c\n    upstream: d\n";
        assert_eq!(locate_field(text, "listeners[1].upstream"), Some(5));
        assert_eq!(locate_field(text, "listeners[0].listen"), Some(2));
    }

    #[test]
    fn busy_poll_and_socket_buffers_parse_validate_and_round_trip() {
        let text = "busy_poll: 50us\nsocket_recv_buffer: 65536\nsocket_send_buffer: 32768\n";
        let cfg: RuntimeConfig = from_yaml_str(Path::new("rt.yaml"), text).unwrap();
        assert_eq!(cfg.busy_poll, Duration::from_micros(50));
        assert_eq!(cfg.socket_recv_buffer, Some(65536));
        assert_eq!(cfg.socket_send_buffer, Some(32768));
        cfg.validate("runtime").unwrap();
        // Serialized (the bench hands configs to its proxies as JSON) and read back unchanged.
        let json = serde_json::to_string(&cfg).unwrap();
        assert!(json.contains("\"busy_poll\":\"50us\""), "{json}");
        let back: RuntimeConfig = from_yaml_str(Path::new("j.yaml"), &json).unwrap();
        assert_eq!(back, cfg);
        // Off by default.
        assert_eq!(RuntimeConfig::default().busy_poll, Duration::ZERO);
        assert_eq!(RuntimeConfig::default().socket_recv_buffer, None);
    }

    #[test]
    fn busy_poll_and_socket_buffer_errors_name_file_line_field() {
        let text = "workers: 1\nbusy_poll: 2s\n";
        let cfg: RuntimeConfig = from_yaml_str(Path::new("p.yaml"), text).unwrap();
        let e = cfg
            .validate("")
            .unwrap_err()
            .in_file(Path::new("p.yaml"), Some(text));
        assert_eq!(e.field.as_deref(), Some("busy_poll"), "{e}");
        assert_eq!(e.line, Some(2), "{e}");
        assert!(
            e.to_string().starts_with("p.yaml:2: field `busy_poll`"),
            "{e}"
        );

        let text = "pin: true\nsocket_send_buffer: 100\n";
        let cfg: RuntimeConfig = from_yaml_str(Path::new("p.yaml"), text).unwrap();
        let e = cfg
            .validate("runtime")
            .unwrap_err()
            .in_file(Path::new("p.yaml"), None);
        assert_eq!(
            e.field.as_deref(),
            Some("runtime.socket_send_buffer"),
            "{e}"
        );

        let e =
            from_yaml_str::<RuntimeConfig>(Path::new("p.yaml"), "busy_poll: fast\n").unwrap_err();
        assert_eq!(e.line, Some(1), "{e}");
        assert_eq!(e.field.as_deref(), Some("busy_poll"), "{e}");
        assert!(e.message.contains("fast"), "{e}");
        let e = from_yaml_str::<RuntimeConfig>(Path::new("p.yaml"), "a: 1\nbusy_pol: 50us\n")
            .unwrap_err();
        assert!(e.message.contains("busy_pol"), "{e}");
        let e = from_yaml_str::<RuntimeConfig>(Path::new("p.yaml"), "socket_recv_buffer: -1\n")
            .unwrap_err();
        assert_eq!(e.line, Some(1), "{e}");
    }

    #[test]
    fn tcp_congestion_is_checked_against_the_host_when_loading() {
        assert_eq!(RuntimeConfig::default().tcp_congestion, None);
        // reno is built into every kernel (the fallback of all others).
        let text = "pin: true\ntcp_congestion: reno\n";
        let cfg: RuntimeConfig = from_yaml_str(Path::new("rt.yaml"), text).unwrap();
        cfg.validate("runtime").unwrap();
        assert_eq!(
            crate::listener::ListenOptions::from_config(&cfg)
                .congestion
                .map(|c| c.as_str().to_string()),
            Some("reno".to_string())
        );
        for (bad, why) in [
            ("nosuchcc", "cannot be set on this host"),
            ("bb-r", "letters"),
        ] {
            let text = format!("pin: true\ntcp_congestion: {bad}\n");
            let cfg: RuntimeConfig = from_yaml_str(Path::new("p.yaml"), &text).unwrap();
            let e = cfg
                .validate("")
                .unwrap_err()
                .in_file(Path::new("p.yaml"), Some(&text));
            assert_eq!(e.field.as_deref(), Some("tcp_congestion"), "{e}");
            assert_eq!(e.line, Some(2), "{e}");
            assert!(e.to_string().contains(why), "{e}");
        }
    }

    #[test]
    fn cpu_latency_limit_parses_validates_round_trips_and_is_off_by_default() {
        assert_eq!(RuntimeConfig::default().cpu_latency_limit, None);
        let cfg: RuntimeConfig =
            from_yaml_str(Path::new("rt.yaml"), "cpu_latency_limit: 0us\n").unwrap();
        assert_eq!(cfg.cpu_latency_limit, Some(Duration::ZERO));
        cfg.validate("runtime").unwrap();
        let json = serde_json::to_string(&cfg).unwrap();
        assert!(json.contains("\"cpu_latency_limit\":\"0s\""), "{json}");
        let back: RuntimeConfig = from_yaml_str(Path::new("j.yaml"), &json).unwrap();
        assert_eq!(back, cfg);
        // Unset serializes as null and reads back unset.
        let json = serde_json::to_string(&RuntimeConfig::default()).unwrap();
        assert!(json.contains("\"cpu_latency_limit\":null"), "{json}");
        let back: RuntimeConfig = from_yaml_str(Path::new("j.yaml"), &json).unwrap();
        assert_eq!(back.cpu_latency_limit, None);
        let cfg: RuntimeConfig =
            from_yaml_str(Path::new("rt.yaml"), "cpu_latency_limit: 20us\n").unwrap();
        assert_eq!(cfg.cpu_latency_limit, Some(Duration::from_micros(20)));
    }

    #[test]
    fn sched_fifo_priority_parses_validates_and_refuses_busy_poll() {
        assert_eq!(RuntimeConfig::default().sched_fifo_priority, None);
        let cfg: RuntimeConfig =
            from_yaml_str(Path::new("rt.yaml"), "sched_fifo_priority: 10\n").unwrap();
        assert_eq!(cfg.sched_fifo_priority, Some(10));
        cfg.validate("runtime").unwrap();
        let json = serde_json::to_string(&cfg).unwrap();
        assert!(json.contains("\"sched_fifo_priority\":10"), "{json}");
        let back: RuntimeConfig = from_yaml_str(Path::new("j.yaml"), &json).unwrap();
        assert_eq!(back, cfg);
        let cfg: RuntimeConfig =
            from_yaml_str(Path::new("rt.yaml"), "sched_fifo_priority: null\n").unwrap();
        assert_eq!(cfg.sched_fifo_priority, None);

        // Out of range: 0 and 100 fail validation naming the field and its line; values
        // that are no u8 (or no number) fail parsing naming the field.
        for (text, line) in [
            ("pin: true\nsched_fifo_priority: 0\n", 2),
            ("sched_fifo_priority: 100\n", 1),
        ] {
            let cfg: RuntimeConfig = from_yaml_str(Path::new("p.yaml"), text).unwrap();
            let e = cfg
                .validate("")
                .unwrap_err()
                .in_file(Path::new("p.yaml"), Some(text));
            assert_eq!(e.field.as_deref(), Some("sched_fifo_priority"), "{e}");
            assert_eq!(e.line, Some(line), "{e}");
            assert!(e.message.contains("between 1 and 99"), "{e}");
        }
        for text in ["sched_fifo_priority: 300\n", "sched_fifo_priority: high\n"] {
            let e = from_yaml_str::<RuntimeConfig>(Path::new("p.yaml"), text).unwrap_err();
            assert_eq!(
                e.field.as_deref(),
                Some("sched_fifo_priority"),
                "{text}: {e}"
            );
        }
        let e = from_yaml_str::<RuntimeConfig>(Path::new("p.yaml"), "sched_fifo_prio: 10\n")
            .unwrap_err();
        assert!(e.message.contains("sched_fifo_prio"), "{e}");

        // Never together with busy polling, whichever comes first in the file.
        for text in [
            "sched_fifo_priority: 10\nbusy_poll: 50us\n",
            "busy_poll: 50us\nsched_fifo_priority: 10\n",
        ] {
            let cfg: RuntimeConfig = from_yaml_str(Path::new("p.yaml"), text).unwrap();
            let e = cfg.validate("runtime").unwrap_err();
            assert_eq!(e.field, "runtime.sched_fifo_priority", "{text}");
            assert!(e.message.contains("busy_poll"), "{}", e.message);
        }
        let cfg: RuntimeConfig = from_yaml_str(
            Path::new("p.yaml"),
            "sched_fifo_priority: 10\nbusy_poll: 0\n",
        )
        .unwrap();
        cfg.validate("runtime").unwrap();
    }

    #[test]
    fn bad_cpu_latency_limit_names_file_line_field() {
        // Out of range: a validation error naming the field and its line.
        let text = "pin: true\ncpu_latency_limit: 5s\n";
        let cfg: RuntimeConfig = from_yaml_str(Path::new("p.yaml"), text).unwrap();
        let e = cfg
            .validate("")
            .unwrap_err()
            .in_file(Path::new("p.yaml"), Some(text));
        assert_eq!(e.field.as_deref(), Some("cpu_latency_limit"), "{e}");
        assert!(
            e.to_string()
                .starts_with("p.yaml:2: field `cpu_latency_limit`: at most 1s"),
            "{e}"
        );
        // Not a duration: a parse error naming the field.
        let e = from_yaml_str::<RuntimeConfig>(Path::new("p.yaml"), "cpu_latency_limit: low\n")
            .unwrap_err();
        assert_eq!(e.line, Some(1), "{e}");
        assert_eq!(e.field.as_deref(), Some("cpu_latency_limit"), "{e}");
        assert!(e.message.contains("low"), "{e}");
        let e = from_yaml_str::<RuntimeConfig>(Path::new("p.yaml"), "cpu_latency_limit: -5\n")
            .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("cpu_latency_limit"), "{e}");
        // A misspelt key is still an unknown field.
        let e =
            from_yaml_str::<RuntimeConfig>(Path::new("p.yaml"), "cpu_latency: 0us\n").unwrap_err();
        assert!(e.message.contains("unknown field `cpu_latency`"), "{e}");
    }

    #[test]
    fn allocator_parses_validates_round_trips_and_retains_by_default() {
        let d = RuntimeConfig::default().allocator;
        assert_eq!(
            (d.retain_freed, d.mmap_threshold, d.trim_threshold),
            (true, 4 << 20, 32 << 20)
        );
        let cfg: RuntimeConfig =
            from_yaml_str(Path::new("rt.yaml"), "allocator:\n  retain_freed: false\n").unwrap();
        assert!(!cfg.allocator.retain_freed);
        assert_eq!(
            cfg.allocator.mmap_threshold,
            4 << 20,
            "others keep defaults"
        );
        cfg.validate("runtime").unwrap();
        let text = "allocator: { mmap_threshold: 1048576, trim_threshold: 8388608 }\n";
        let cfg: RuntimeConfig = from_yaml_str(Path::new("rt.yaml"), text).unwrap();
        assert!(cfg.allocator.retain_freed);
        assert_eq!(cfg.allocator.mmap_threshold, 1 << 20);
        assert_eq!(cfg.allocator.trim_threshold, 8 << 20);
        cfg.validate("runtime").unwrap();
        let json = serde_json::to_string(&cfg).unwrap();
        let back: RuntimeConfig = from_yaml_str(Path::new("j.yaml"), &json).unwrap();
        assert_eq!(back, cfg);
    }

    #[test]
    fn bad_allocator_names_file_line_field() {
        // Unknown key: an error, not ignored.
        let text = "pin: true\nallocator:\n  retain: false\n";
        let e = from_yaml_str::<RuntimeConfig>(Path::new("p.yaml"), text).unwrap_err();
        assert_eq!(e.line, Some(3), "{e}");
        assert_eq!(e.field.as_deref(), Some("allocator"), "{e}");
        assert!(e.message.contains("retain"), "{e}");
        // Wrong type.
        let text = "allocator:\n  retain_freed: sometimes\n";
        let e = from_yaml_str::<RuntimeConfig>(Path::new("p.yaml"), text).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("allocator.retain_freed"), "{e}");
        assert_eq!(e.line, Some(2), "{e}");
        let text = "allocator:\n  trim_threshold: -1\n";
        let e = from_yaml_str::<RuntimeConfig>(Path::new("p.yaml"), text).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("allocator.trim_threshold"), "{e}");
        // Out of range: validation names the field and its line.
        for (text, field, line) in [
            (
                "workers: 1\nallocator:\n  mmap_threshold: 67108864\n",
                "allocator.mmap_threshold",
                3,
            ),
            (
                "allocator:\n  retain_freed: true\n  trim_threshold: 100\n",
                "allocator.trim_threshold",
                3,
            ),
            (
                "allocator:\n  trim_threshold: 4294967296\n",
                "allocator.trim_threshold",
                2,
            ),
        ] {
            let cfg: RuntimeConfig = from_yaml_str(Path::new("p.yaml"), text).unwrap();
            let e = cfg
                .validate("")
                .unwrap_err()
                .in_file(Path::new("p.yaml"), Some(text));
            assert_eq!(e.field.as_deref(), Some(field), "{e}");
            assert_eq!(e.line, Some(line), "{e}");
            assert!(e.message.contains("between 4096 and"), "{e}");
        }
    }

    #[test]
    fn durations_format_round_trips() {
        for d in [
            Duration::from_micros(50),
            Duration::from_micros(1500),
            Duration::from_millis(250),
            Duration::from_secs(10),
            Duration::ZERO,
        ] {
            assert_eq!(duration::parse(&duration::format(d)).unwrap(), d);
        }
        assert_eq!(duration::format(Duration::from_micros(50)), "50us");
    }

    #[test]
    fn defaults_validate() {
        RuntimeConfig::default().validate("").unwrap();
    }

    #[test]
    fn cpu_lists_parse() {
        assert_eq!(parse_cpu_list("0-1\n"), Some(vec![0, 1]));
        assert_eq!(parse_cpu_list("0,2-4,7"), Some(vec![0, 2, 3, 4, 7]));
        assert_eq!(parse_cpu_list("5"), Some(vec![5]));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
    }

    #[test]
    fn cores_must_be_online_not_in_our_affinity() {
        let host = HostCpus {
            present: Some(vec![0, 1, 2, 3]),
            online: Some(vec![0, 1, 3]),
        };
        assert_eq!(check_cores(&[0, 3], &host), Ok(()));
        let e = check_cores(&[1, 2], &host).unwrap_err();
        assert_eq!(e, "CPU 2 is offline (online CPUs: 0,1,3)");
        let e = check_cores(&[9], &host).unwrap_err();
        assert_eq!(e, "CPU 9 does not exist on this host (online CPUs: 0,1,3)");
    }

    /// `taskset -c 0` then `cores: [1]`: accepted (the process's affinity does not limit the
    /// explicit cores); a CPU beyond the host's is still refused, naming it.
    #[test]
    fn explicit_cores_outside_the_inherited_affinity_are_accepted() {
        let Some((first, other)) = two_online_cpus() else {
            return;
        };
        std::thread::spawn(move || {
            // This thread's affinity: `first` only, like a process started under taskset.
            assert!(core_affinity::set_for_current(core_affinity::CoreId {
                id: first
            }));
            let ids: Vec<usize> = core_affinity::get_core_ids()
                .unwrap()
                .into_iter()
                .map(|c| c.id)
                .collect();
            assert_eq!(ids, vec![first]);
            let cfg = RuntimeConfig {
                cores: Some(vec![other]),
                ..RuntimeConfig::default()
            };
            cfg.validate("runtime").unwrap();
            assert_eq!(cfg.worker_cores(), vec![Some(other)]);
            let bad = RuntimeConfig {
                cores: Some(vec![100_000]),
                ..RuntimeConfig::default()
            };
            let e = bad.validate("runtime").unwrap_err();
            assert_eq!(e.field, "runtime.cores");
            assert!(e.message.starts_with("CPU 100000 does not exist"), "{e:?}");
        })
        .join()
        .unwrap();
    }
}
