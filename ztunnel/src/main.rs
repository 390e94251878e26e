//! `ztunnel --config FILE [--profile NAME]`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "ztunnel",
    about = "Ambient-mode node proxy (SOCKS5 outbound, HBONE/plaintext inbound)"
)]
struct Args {
    /// YAML config: the `ztunnel:` section plus workloads, services, policies, …
    #[arg(long)]
    config: PathBuf,
    /// Tuning profile (built-in name or file) for the runtime and HTTP/2 knobs; the file's
    /// own `runtime:`/`h2:` sections replace it.
    #[arg(long, default_value = "default")]
    profile: String,
}

fn main() -> ExitCode {
    runtime::init_logging();
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(2);
        }
    };
    let profile = match tuning::load_profile(&args.profile) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: profile: {e}");
            return ExitCode::from(2);
        }
    };
    let loaded = match ztunnel::config::load_file(&args.config, &profile, 1) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let shutdown = runtime::Shutdown::new();
    if let Err(e) = shutdown.install_signal_handlers(loaded.settings.runtime.drain_timeout) {
        eprintln!("error: cannot install signal handlers: {e}");
        return ExitCode::from(1);
    }
    let watch = ztunnel::config::Source {
        file: args.config.clone(),
        profile,
    };
    let h = match ztunnel::start(loaded, Some(watch), shutdown) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let a = &h.addrs;
    println!(
        "READY driver={} workers={} socks5={} hbone={} plaintext={} admin={} stats={} readiness={}",
        h.workers().decision().kind,
        h.workers().len(),
        a.socks5,
        a.hbone,
        a.plaintext
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(","),
        a.admin,
        a.stats,
        a.readiness
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
