//! tuning: configuration profiles and host checks.
//!
//! Not built yet (issue 6). This crate will hold the YAML profiles in `tuning/profiles/`
//! (`default`, `throughput`, `latency`, `low-memory`, `high-connections`) with every knob
//! documented, and `tuning check`, which reads the host's relevant settings (cores, io_uring
//! and `ulimit -l`, `RLIMIT_NOFILE`, somaxconn, TCP buffers, busy polling) and recommends
//! values. Today the runtime's own config (`runtime::config::RuntimeConfig`) carries the
//! knobs that exist.
