//! The command line, `waypoint --config FILE [--profile NAME|FILE]`: the HBONE listener of
//! [`crate::service`]. FILE is the multi-document configuration of [`crate::config`]
//! (Kubernetes objects, the mesh model and the `waypoint:` settings document). Prints
//! `READY driver=… workers=… hbone=ADDR[ stats=ADDR]` once listening; SIGTERM/SIGINT drain.
//! Exit status 2 for a bad command line or configuration, 1 for a start failure.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::service::{self, Settings};
use runtime::{Publisher, Shutdown};

fn usage(prog: &str) -> ExitCode {
    eprintln!("usage: {prog} --config FILE [--profile NAME]");
    ExitCode::from(2)
}

/// The whole `waypoint` command line (`args[0]` is the program name), so other binaries
/// (the bench harness) can run a waypoint by re-executing themselves.
pub fn main_with_args(args: Vec<std::ffi::OsString>) -> ExitCode {
    let args: Vec<String> = args
        .into_iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let prog = args.first().map(String::as_str).unwrap_or("waypoint");
    let mut config = None;
    let mut profile = "default".to_string();
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--config" => match it.next() {
                Some(v) => config = Some(PathBuf::from(v)),
                None => return usage(prog),
            },
            "--profile" => match it.next() {
                Some(v) => profile = v.clone(),
                None => return usage(prog),
            },
            _ => return usage(prog),
        }
    }
    let Some(config) = config else {
        return usage(prog);
    };
    runtime::init_logging();
    let profile = match tuning::load_profile(&profile) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: profile: {e}");
            return ExitCode::from(2);
        }
    };
    let text = match std::fs::read_to_string(&config) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {}: cannot read: {e}", config.display());
            return ExitCode::from(2);
        }
    };
    let mut l7 = match crate::config::load_str(&config, &text, 1) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let Some(doc) = l7.settings.clone() else {
        eprintln!(
            "error: {}: no settings document (a document with a `waypoint:` section)",
            config.display()
        );
        return ExitCode::from(2);
    };
    let settings = match Settings::new(&doc, &profile.runtime, &profile.h2) {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "error: {}: field `{}`: {}",
                config.display(),
                e.field,
                e.message
            );
            return ExitCode::from(2);
        }
    };
    let source = match service::cert_source(&doc) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: certificates: {e}");
            return ExitCode::from(1);
        }
    };
    let shutdown = Shutdown::new();
    if let Err(e) = shutdown.install_signal_handlers(settings.runtime.drain_timeout) {
        eprintln!("error: signals: {e}");
        return ExitCode::from(1);
    }
    // Key sets named by URI are fetched before the first snapshot is served.
    let mut fetcher = crate::jwks::Fetcher::for_config(&l7);
    fetcher.resolve(&mut l7, std::time::Instant::now());
    let publisher = Publisher::new(l7);
    let h = match service::start(settings, source, publisher.clone(), shutdown) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let stats = h
        .stats_addr()
        .map(|a| format!(" stats={a}"))
        .unwrap_or_default();
    println!(
        "READY driver={} workers={} hbone={}{stats}",
        h.workers().decision().kind,
        h.workers().len(),
        h.addr
    );
    let _ = std::io::stdout().flush();
    let dns = crate::reload::DnsRefresh::system(doc.waypoint.dns_refresh);
    let _watcher = match crate::reload::watch(
        config,
        text,
        Some(doc),
        publisher,
        h.counters.clone(),
        fetcher,
        dns,
    ) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("error: config watcher: {e}");
            return ExitCode::from(1);
        }
    };
    match h.join() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}
