//! The command line, `waypoint --config FILE [--profile NAME]`: the HBONE listener of
//! [`crate::service`]. Prints `READY driver=… workers=… hbone=ADDR` once listening;
//! SIGTERM/SIGINT drain.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use crate::service::{self, ServiceFile};
use runtime::Shutdown;

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
    let file = match ServiceFile::load(&config) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let settings = match file.settings(&profile.runtime, &profile.h2) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {}: {}: {}", config.display(), e.field, e.message);
            return ExitCode::from(2);
        }
    };
    let l7 = match crate::config::load_file(&file.l7_path(&config), 1) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let source = match file.cert_source() {
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
    let h = match service::start(settings, source, Arc::new(l7), shutdown) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    println!(
        "READY driver={} workers={} hbone={}",
        h.workers().decision().kind,
        h.workers().len(),
        h.addr
    );
    let _ = std::io::stdout().flush();
    match h.join() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}
