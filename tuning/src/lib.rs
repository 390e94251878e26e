//! Tuning: configuration profiles and host checks.
//!
//! **Profiles** are YAML files in `tuning/profiles/` (embedded in every binary, so a name is
//! enough; a path to a file of the same shape works too). A profile sets any subset of:
//!
//! | knob | unit | default | effect |
//! |---|---|---|---|
//! | `runtime.workers` | threads | one per core | worker threads, each with its own ring |
//! | `runtime.cores` | CPU ids | all | where workers run |
//! | `runtime.pin` | bool | true | pin each worker to its core (steadier caches, less migration) |
//! | `runtime.io_driver` | auto/uring/epoll | auto | io_uring, falling back to epoll if a ring cannot be made |
//! | `runtime.ring_entries` | entries | 1024 | io_uring submission queue size per worker |
//! | `runtime.max_connections_per_worker` | connections | 50000 | accept pauses beyond it |
//! | `runtime.drain_timeout` | duration | 10s | how long open connections may finish after SIGTERM |
//! | `runtime.listen_backlog` | connections | 4096 | `listen(2)` backlog (capped by `net.core.somaxconn`) |
//! | `runtime.nodelay` | bool | true | `TCP_NODELAY`: lower latency for small writes |
//! | `runtime.tcp_keepalive` | duration | 180s | TCP keepalive idle time (dead peer detection) |
//! | `runtime.reuseport_cpu_steering` | bool | false | CBPF: connection to the worker on its packets' CPU |
//! | `runtime.busy_poll` | duration (`50us`) | 0 (off) | after activity a worker keeps reaping its ring without sleeping this long, so the next message finds its CPU awake (no halt/wake-up); burns that CPU while traffic flows (tcp-rr: proxy core ~95% busy instead of ~58%); `sched_yield`s each turn; stops 0.1–5 s when it gets < 3/4 of its CPU (shared core); io_uring only (ignored under epoll); max 10ms; not in any profile (50us gave no tcp-rr gain beyond spread on the dev VM: the other CPUs on the path still halt; see `runtime.cpu_latency_limit`) |
//! | `runtime.cpu_latency_limit` | duration (µs, `0us`) | absent (no request) | PM QoS CPU latency request: the process opens `/dev/cpu_dma_latency`, writes the limit and keeps it open until it exits, so no CPU enters an idle state slower to leave than this (0: idle CPUs poll instead of halting, where the cpuidle driver honours it: on a dev VM with driver `none` tcp-rr did not move; on one with `haltpoll`, 2026-11-27, `bench --scenario tcp-rr,tcp-rr-open --path direct,l4,hbone --reps 3` default vs latency profile alternated, 2 invocations each, tcp-rr p50 l4 142.6/112.8 → 31.9/42.8 µs, hbone 140.0/134.1 → 50.1/60.6 µs, hbone p99 199.6/173.8 → 81.0/94.3 µs, hbone proxy CPU 74/73 → 42/45 µs per round trip, direct 22.0/22.4 → 22.5/22.2 µs; tcp-rr-open at 5,000/s p99 l4 799/575 → 60/74 µs, hbone 1029/2734 → 105/99 µs). **Host-wide**: it keeps every CPU of the host out of deep idle (at 0: out of halt too) while the proxy runs, costing power on all cores, and helps every process there (the `direct` baseline too); needs root, else a warning names the file and the error and the stats gauge `*_cpu_latency_limit_held` reads 0; max 1s; latency profile: 0us |
//! | `runtime.sched_fifo_priority` | priority 1–99 | absent (normal scheduling) | each worker thread switches itself to `SCHED_FIFO` at this priority (reset on fork): a woken worker preempts the normal threads sharing its core at once instead of waiting out their time slice (EEVDF/CFS). Measured on the dev VM while other sessions compiled on both CPUs (ftrace wake-up → run of ztunnel A's worker, one l4 tcp-rr run each): p50 6 → 6 µs, p99 3579 → 44 µs. Bench tcp-rr under that load (latency profile with vs without it, medians of 5 interleaved invocations): l4 p99 12.3 → 3.1 ms, hbone 2.6 → 3.2 ms (no gain); a second series (4 each): l4 5.0 → 3.6 ms, hbone 7.1 → 3.4 ms, p50 l4 168 → 130 µs, hbone 248 → 222 µs; direct unchanged. The harness's own generator and backends (normal threads on the other CPU) still wait ms (wake-up p99 2.8 ms) and set the tail. Not measured on a quiet VM. Nothing changes on an idle core. Cost: while a worker has work, normal threads on its core get only what RT throttling leaves them (`kernel.sched_rt_runtime_us`, 5 % by default). Refused together with `runtime.busy_poll` (a spinning FIFO thread starves its core). Needs `CAP_SYS_NICE` (root) or `RLIMIT_RTPRIO` ≥ the priority, else a warning per worker and normal scheduling; latency profile: 10 |
//! | `runtime.socket_recv_buffer` | bytes | absent (autotuning) | `SO_RCVBUF` on listeners (inherited by accepted sockets) and connected sockets; bounds the kernel memory a socket's unread bytes take (the kernel reserves twice the value) and turns receive autotuning off; capped by `net.core.rmem_max` |
//! | `runtime.socket_send_buffer` | bytes | absent (autotuning) | `SO_SNDBUF` likewise: bounds unsent bytes queued in the kernel per socket (a slow reader's backlog); capped by `net.core.wmem_max` |
//! | `runtime.tcp_congestion` | name | absent (the host's `net.ipv4.tcp_congestion_control`) | `TCP_CONGESTION` on every socket the proxy accepts or connects (inherited from the listener, no call per accepted connection); refused at load when this host lacks it or does not allow it to this process (the error lists `tcp_available_congestion_control`). Why: under `bbr` with no `fq` qdisc (veths and loopback have none) the kernel paces every TCP sender itself with an hrtimer per burst, and pod-side hops on a node have no bottleneck to pace for. Measured 2026-11-27 on the 2-vCPU dev VM (host default `bbr`, `default_qdisc` pfifo_fast), `bench --scenario tcp-throughput,tcp-rr --path direct,l4,hbone --reps 3`, default profile vs the same with `cubic`, alternated, 2 invocations each: hbone 1 stream 5.96/5.83 → 6.88/6.83 Gbit/s, 1.25/1.33 → 1.12/1.15 CPU-s/GB; 8 streams 4.74/4.76 → 6.27/6.05 Gbit/s, 1.60/1.60 → 1.29/1.30 CPU-s/GB; l4 1 stream 0.48/0.46 → 0.26/0.37 CPU-s/GB; tcp-rr unchanged (hbone p50 138.6/136.4 → 138.9/146.6 µs). Everything `cubic` host-wide (the harness's own sockets too): hbone 1 stream 9.85 Gbit/s at 0.81 CPU-s/GB. Not in the default profile (it would override the operator's host-wide choice, which may be right between nodes); throughput profile: `cubic` |
//! | `runtime.allocator.retain_freed` / `.mmap_threshold` / `.trim_threshold` | bool / bytes / bytes | true / 4 MiB / 32 MiB | glibc malloc's `M_MMAP_THRESHOLD` (blocks below it come from the heap and stay there when freed) and `M_TRIM_THRESHOLD` (free heap top kept per arena), fixed, set once per process before the first worker starts. Keeps burst buffers (h2's read buffer, TLS records) allocated instead of faulting them in again each burst: HBONE bulk 3.11 → 2.58 CPU-s/GB, 150k–385k → ~1.3k page faults per run (re-measured: 2.44 → 2.11 CPU-s/GB, 37k → 1.3k faults in both ztunnels, medians of 3). Cost: RSS does not fall back after a burst (freed blocks below the mmap threshold and up to the trim threshold of free top stay in the process: ~10 MB per ztunnel after bench slow-reader's 100 bulk connections closed); per-connection figures do not change. `retain_freed: false` keeps glibc's defaults (128 KiB each, raised dynamically); mmap max 32 MiB, trim max 2 GiB − 1; low-memory: off; not glibc: ignored |
//! | `runtime.forward.mode` | copy/splice | copy | user-space copy or zero-copy `splice(2)` |
//! | `runtime.forward.buffer_size` | bytes | 65536 | first buffer of a busy direction |
//! | `runtime.forward.max_buffer_size` | bytes | 262144 | a direction that keeps filling its buffer grows to this |
//! | `runtime.forward.pipe_size` | bytes | 262144 | splice pipe per direction |
//! | `runtime.forward.idle_timeout` | duration | 1h | close a connection with no bytes either way (checked by one sweeper per worker every idle/4: fires 1 to 1.25 × the timeout after the last byte) |
//! | `runtime.forward.pool_buffers` | buffers | 64 | free buffers each worker keeps per size class, and empty splice pipes |
//! | `h2.stream_window` | bytes | 4 MiB | HTTP/2 flow-control window per stream |
//! | `h2.connection_window` | bytes | 16 MiB | HTTP/2 window per connection |
//! | `h2.max_frame_size` | bytes | 1 MiB | largest DATA frame accepted |
//! | `h2.max_concurrent_streams` | streams | 200 | streams a server accepts per connection |
//! | `h2.max_header_list_size` | bytes | 64 KiB | largest header block accepted |
//! | `h2.ping_interval` / `h2.ping_timeout` | duration | 10s / 20s | keepalive PINGs |
//! | `h2.handshake_timeout` | duration | 10s (Envoy's `connect_timeout`) | HBONE connection setup deadline. Client: TCP connect + TLS + HTTP/2 handshake; on expiry the socket is closed and every opener waiting on that pooled connection gets `HandshakeTimeout` (the next open makes a new connection). Server: TLS + the client's HTTP/2 preface after accept; on expiry the socket is closed and `handshake_timeouts` counted, so silent peers cannot hold descriptors and `max_connections_per_worker` slots. Also a CONNECT's wait for its reply (`ReplyTimeout`, the stream reset; ztunnel: SOCKS5 host unreachable) and ztunnel's plain TCP connects to a pod (HBONE CONNECT answered 503, plaintext reset) or a passthrough destination (SOCKS5 host unreachable), counted in `ztunnel_connect_timeouts_total`. 0 = no deadline |
//! | `h2.max_streams_per_connection` | streams | 100 | client pool: streams before another connection |
//! | `h2.pool_idle_timeout` | duration | 5m | client pool: close an unused connection |
//! | `h2.chunk_size` | bytes | 64 KiB | largest read from TCP, i.e. largest DATA frame sent (reads start at 16 KiB and double while they fill); 256 KiB measured worse (more kernel work per GB) |
//! | `h2.tls_send_buffer` | bytes | 256 KiB | encrypted TLS records buffered per socket write (one `writev` per DATA frame) |
//! | `h2.socket_notsent_lowat` | bytes | absent (the system's `net.ipv4.tcp_notsent_lowat`, no limit) | `TCP_NOTSENT_LOWAT` on HBONE sockets (client and server; not on plain TCP ones): the socket takes more only while fewer than this many bytes wait unsent in the kernel, so a bulk stream's backlog stays in h2/TLS (where other streams' frames can pass it) instead of one kernel FIFO; 4096 to 2³¹−1. Alone it changes little: in bench `mixed` (one bulk stream beside tcp-rr and 8 HTTP/1.1 connections on one pooled HBONE connection) ztunnel A's Send-Q stayed near 0 while B's Recv-Q held 2.2 MB (`ss -tmi`): the queue is the receiver's, see `h2.socket_recv_buffer`, with which it pairs. Not on by default (CPU cost below); latency profile: 32768 |
//! | `h2.socket_recv_buffer` | bytes | absent (as `runtime.socket_recv_buffer`) | `SO_RCVBUF` on HBONE sockets only (client and server), overriding the runtime's: bounds the encrypted bytes queued unread in front of a small stream's (receive autotuning off; the kernel reserves twice the value; capped by `net.core.rmem_max`); 4096 to 2³⁰−1. Why: with autotuning (`tcp_rmem` max 32 MiB) ztunnel B's HBONE socket held 2.2 MB of bulk bytes unread in bench `mixed` (~6 ms at 3 Gbit/s; both ztunnels share one core), every small request of the connection behind them. Measured 2026-11-27 on the 2-vCPU dev VM, `bench --scenario mixed --path hbone --reps 3`, alternated with the default, quiet runs (proxy CPU ≥ 98 %), 2 invocations each: `socket_recv_buffer: 262144` + `socket_notsent_lowat: 32768`: tcp-rr p50 3367/4211 → 1823/1839 µs, p99 8200/9609 → 3623/4948 µs, HTTP/1.1 p50 3342/4080 → 1814/1823 µs, 1.9–2.5k → 3.9–4.1k req/s, bulk 3.17–3.83 → 2.90–2.95 Gbit/s; under outside load (13 runs, all) medians p50 7.2 → 3.0 ms. Cost: `tcp-throughput --path hbone` CPU-s/GB 2.09–2.55 → 2.36–2.74 (1 stream), 2.03–2.21 → 2.61–2.68 (8 streams): smaller batches per wake-up; 65536 + 16384 cut latency alike but cost 2.98–3.65 CPU-s/GB; 524288 + 131072: mixed p50 3.6–3.9 → 3.2–3.3 ms only. So neither is on by default; the latency profile sets both |
//! | `h2.tcp_congestion` | name | absent (as `runtime.tcp_congestion`) | `TCP_CONGESTION` on HBONE sockets only (client and server), overriding the runtime's: e.g. `bbr` between nodes while pod-side sockets use `runtime.tcp_congestion: cubic`; checked at load like the runtime's. `cubic` on pod-side sockets with `bbr` on HBONE ones gave no gain on the dev VM (hbone 1 stream 5.69/5.63 Gbit/s, 1.36/1.42 CPU-s/GB): there the HBONE hop between the two ztunnels is a veth too |
//! | `h2.tls_resumption` | bool | true | TLS 1.3 session resumption between HBONE peers: a server sends one stateless ticket per handshake (its own AES-256-GCM key per server config, replaced with the certificate; valid ≤ 1 h and never past the certificate), a client keeps ≤ 8 tickets per destination IP per (source identity, expected destination identities) on each worker (≤ 128 such entries) and resumes with one: both sides skip the certificate signatures and checks (ECDHE stays); the server still gets the client's certificate and identity (from the ticket, re-checked for expiry). false: full handshakes only, a server sends no ticket |
//!
//! Unknown keys are errors naming the file, line and field.
//!
//! **Host checks** ([`check`]): what the host offers for the knobs above, with a
//! recommendation and why, and the `sysctl` commands that apply them.

use std::path::{Path, PathBuf};

use hbone::H2Settings;
use runtime::config::{from_yaml_str, ConfigError, RuntimeConfig};
use serde::{Deserialize, Serialize};

pub mod check;

/// Built-in profiles: (name, YAML text).
pub const PROFILES: [(&str, &str); 5] = [
    ("default", include_str!("../profiles/default.yaml")),
    ("throughput", include_str!("../profiles/throughput.yaml")),
    ("latency", include_str!("../profiles/latency.yaml")),
    ("low-memory", include_str!("../profiles/low-memory.yaml")),
    (
        "high-connections",
        include_str!("../profiles/high-connections.yaml"),
    ),
];

/// A profile: the runtime and HTTP/2 knobs.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Profile {
    pub runtime: RuntimeConfig,
    pub h2: H2Settings,
}

/// Load a built-in profile by name, or a profile file by path.
pub fn load_profile(name_or_path: &str) -> Result<Profile, ConfigError> {
    let (file, text) = match PROFILES.iter().find(|(n, _)| *n == name_or_path) {
        Some((n, t)) => (
            PathBuf::from(format!("tuning/profiles/{n}.yaml")),
            t.to_string(),
        ),
        None => {
            let p = Path::new(name_or_path);
            let text = std::fs::read_to_string(p).map_err(|e| ConfigError {
                file: p.to_owned(),
                line: None,
                column: None,
                field: None,
                message: format!(
                    "cannot read: {e} (built-in profiles: {})",
                    PROFILES
                        .iter()
                        .map(|(n, _)| *n)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })?;
            (p.to_owned(), text)
        }
    };
    let profile: Profile = from_yaml_str(&file, &text)?;
    profile
        .runtime
        .validate("runtime")
        .map_err(|e| e.in_file(&file, Some(&text)))?;
    profile
        .h2
        .validate()
        .map_err(|e| e.in_file(&file, Some(&text)))?;
    Ok(profile)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_profile_loads_and_validates() {
        for (name, _) in PROFILES {
            load_profile(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn default_profile_is_the_defaults() {
        assert_eq!(load_profile("default").unwrap(), Profile::default());
    }

    #[test]
    fn profiles_change_what_they_claim() {
        let d = Profile::default();
        let t = load_profile("throughput").unwrap();
        assert_eq!(t.runtime.forward.mode, runtime::ForwardMode::Splice);
        assert!(t.runtime.forward.pipe_size > d.runtime.forward.pipe_size);
        assert!(t.h2.stream_window > d.h2.stream_window);
        let l = load_profile("low-memory").unwrap();
        assert!(l.runtime.forward.buffer_size < d.runtime.forward.buffer_size);
        assert!(l.h2.stream_window < d.h2.stream_window);
        let h = load_profile("high-connections").unwrap();
        assert!(h.runtime.max_connections_per_worker > d.runtime.max_connections_per_worker);
        assert!(l.runtime.socket_recv_buffer.is_some() && d.runtime.socket_recv_buffer.is_none());
        assert!(l.runtime.socket_send_buffer.is_some() && d.runtime.socket_send_buffer.is_none());
        assert!(l.runtime.forward.max_buffer_size < d.runtime.forward.max_buffer_size);
        let lat = load_profile("latency").unwrap();
        assert!(lat.h2.chunk_size < d.h2.chunk_size);
        assert_eq!(
            lat.runtime.cpu_latency_limit,
            Some(std::time::Duration::ZERO)
        );
        assert_eq!(d.runtime.cpu_latency_limit, None);
        assert_eq!(lat.runtime.sched_fifo_priority, Some(10));
        assert_eq!(d.runtime.sched_fifo_priority, None);
        assert_eq!(lat.h2.socket_recv_buffer, Some(262144));
        assert_eq!(lat.h2.socket_notsent_lowat, Some(32768));
        assert_eq!(d.h2.socket_notsent_lowat, None);
        assert!(d.runtime.allocator.retain_freed && !l.runtime.allocator.retain_freed);
        let t = load_profile("throughput").unwrap();
        assert_eq!(t.runtime.tcp_congestion.as_deref(), Some("cubic"));
        assert_eq!(d.runtime.tcp_congestion, None);
        assert_eq!(d.h2.tcp_congestion, None);
    }

    #[test]
    fn bad_busy_poll_and_socket_buffer_name_file_line_field() {
        let dir = std::env::temp_dir().join(format!("tuning-bp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("p.yaml");
        std::fs::write(&f, "runtime:\n  pin: true\n  busy_poll: 1s\n").unwrap();
        let e = load_profile(f.to_str().unwrap()).unwrap_err();
        assert_eq!(e.line, Some(3), "{e}");
        assert_eq!(e.field.as_deref(), Some("runtime.busy_poll"), "{e}");
        assert!(e.to_string().contains("p.yaml:3"), "{e}");
        std::fs::write(&f, "runtime:\n  socket_recv_buffer: 10\n").unwrap();
        let e = load_profile(f.to_str().unwrap()).unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        assert_eq!(
            e.field.as_deref(),
            Some("runtime.socket_recv_buffer"),
            "{e}"
        );
        std::fs::write(&f, "runtime:\n  busy_poll: soon\n").unwrap();
        let e = load_profile(f.to_str().unwrap()).unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        assert_eq!(e.field.as_deref(), Some("runtime.busy_poll"), "{e}");
        std::fs::write(&f, "runtime:\n  pin: true\n  cpu_latency_limit: 2s\n").unwrap();
        let e = load_profile(f.to_str().unwrap()).unwrap_err();
        assert_eq!(e.line, Some(3), "{e}");
        assert_eq!(e.field.as_deref(), Some("runtime.cpu_latency_limit"), "{e}");
        std::fs::write(&f, "runtime:\n  cpu_latency_limit: zero\n").unwrap();
        let e = load_profile(f.to_str().unwrap()).unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        assert_eq!(e.field.as_deref(), Some("runtime.cpu_latency_limit"), "{e}");
        // The real-time priority: out of range, and never with busy polling.
        std::fs::write(&f, "runtime:\n  pin: true\n  sched_fifo_priority: 0\n").unwrap();
        let e = load_profile(f.to_str().unwrap()).unwrap_err();
        assert_eq!(e.line, Some(3), "{e}");
        assert_eq!(
            e.field.as_deref(),
            Some("runtime.sched_fifo_priority"),
            "{e}"
        );
        std::fs::write(
            &f,
            "runtime:\n  busy_poll: 50us\n  sched_fifo_priority: 10\n",
        )
        .unwrap();
        let e = load_profile(f.to_str().unwrap()).unwrap_err();
        assert_eq!(e.line, Some(3), "{e}");
        assert!(e.to_string().contains("busy_poll"), "{e}");
        // The latency profile (FIFO) with busy polling added on top is refused too.
        let lat = include_str!("../profiles/latency.yaml")
            .replace("  nodelay: true\n", "  nodelay: true\n  busy_poll: 50us\n");
        std::fs::write(&f, lat).unwrap();
        let e = load_profile(f.to_str().unwrap()).unwrap_err();
        assert_eq!(
            e.field.as_deref(),
            Some("runtime.sched_fifo_priority"),
            "{e}"
        );
        // HBONE socket knobs: refused by the h2 section's own check, located in the file.
        std::fs::write(&f, "h2:\n  chunk_size: 65536\n  socket_notsent_lowat: 0\n").unwrap();
        let e = load_profile(f.to_str().unwrap()).unwrap_err();
        assert_eq!(e.line, Some(3), "{e}");
        assert_eq!(e.field.as_deref(), Some("h2.socket_notsent_lowat"), "{e}");
        std::fs::write(&f, "h2:\n  socket_recv_buffer: 1000\n").unwrap();
        let e = load_profile(f.to_str().unwrap()).unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        assert_eq!(e.field.as_deref(), Some("h2.socket_recv_buffer"), "{e}");
        std::fs::write(&f, "runtime:\n  busy_polling: 50us\n").unwrap();
        let e = load_profile(f.to_str().unwrap()).unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        assert!(e.to_string().contains("busy_polling"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn unknown_key_names_file_line_field() {
        let dir = std::env::temp_dir().join(format!("tuning-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("p.yaml");
        std::fs::write(
            &f,
            "runtime:\n  forward:\n    mode: copy\n    pipe_sise: 1\n",
        )
        .unwrap();
        let e = load_profile(f.to_str().unwrap()).unwrap_err();
        assert_eq!(e.line, Some(4), "{e}");
        assert!(e.to_string().contains("pipe_sise"), "{e}");
        assert!(load_profile("no-such-profile")
            .unwrap_err()
            .to_string()
            .contains("built-in profiles"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
