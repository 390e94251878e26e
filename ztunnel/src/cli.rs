//! The `ztunnel` command line: `ztunnel --config FILE [--profile NAME]`, and
//! `ztunnel capture install|remove [--iface IF]… [--pod CIDR]… [--netns NS]` to manage a
//! node's transparent-capture rules (see `ztunnel::capture`).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "ztunnel",
    about = "Ambient-mode node proxy (captured/SOCKS5 outbound, HBONE/plaintext inbound)"
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

/// `ztunnel capture …`: install or remove the node's redirect rules.
#[derive(Parser)]
#[command(
    name = "ztunnel capture",
    about = "Install/remove the node-level transparent-capture rules (nftables, needs root)"
)]
struct CaptureArgs {
    /// `install` or `remove`.
    action: String,
    /// Node-side interface (veth) of a captured pod; repeat for each pod.
    #[arg(long = "iface")]
    ifaces: Vec<String>,
    /// Address or CIDR of a captured pod; repeat for each pod.
    #[arg(long = "pod")]
    pods: Vec<String>,
    /// Run `nft` in this named network namespace (default: the current one).
    #[arg(long)]
    netns: Option<String>,
    #[arg(long, default_value_t = crate::config::OUTBOUND_CAPTURE_PORT)]
    outbound_port: u16,
    #[arg(long, default_value_t = crate::config::PLAINTEXT_PORT)]
    inbound_port: u16,
    #[arg(long, default_value = crate::capture::DEFAULT_TABLE)]
    table: String,
    /// Send the captured pods' UDP DNS (port 53) to this port of the node: the DNS proxy's
    /// (`ztunnel.dns`, Istio's 15053).
    #[arg(long)]
    dns_port: Option<u16>,
}

fn capture_main(args: impl Iterator<Item = std::ffi::OsString>) -> ExitCode {
    let a = match CaptureArgs::try_parse_from(args) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(2);
        }
    };
    let mut rules = crate::capture::Rules::new(a.ifaces, a.pods);
    rules.table = a.table;
    rules.outbound_port = a.outbound_port;
    rules.inbound_port = a.inbound_port;
    rules.dns_port = a.dns_port;
    let r = match a.action.as_str() {
        "install" => rules.install(a.netns.as_deref()),
        "remove" => rules.remove(a.netns.as_deref()),
        other => {
            eprintln!("error: unknown capture action {other:?} (install or remove)");
            return ExitCode::from(2);
        }
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

/// The whole `ztunnel` command line (`args[0]` is the program name), so other binaries
/// (the bench harness) can run a ztunnel by re-executing themselves.
pub fn main_with_args(args: Vec<std::ffi::OsString>) -> ExitCode {
    runtime::init_logging();
    if args.get(1).is_some_and(|a| a == "capture") {
        return capture_main(args.into_iter().skip(1));
    }
    let args = match Args::try_parse_from(args) {
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
    let loaded = match crate::config::load_file(&args.config, &profile, 1) {
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
    let watch = crate::config::Source {
        file: args.config.clone(),
        profile,
    };
    let h = match crate::start(loaded, Some(watch), shutdown) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let a = &h.addrs;
    // Additive only (the bench harness parses this line): ` v6=…` is appended when
    // `address6` bound IPv6 twins.
    let v6 = if a.v6.is_empty() {
        String::new()
    } else {
        let list: Vec<String> = a.v6.iter().map(|x| x.to_string()).collect();
        format!(" v6={}", list.join(","))
    };
    println!(
        "READY driver={} workers={} socks5={} outbound={} hbone={} plaintext={} admin={} stats={} readiness={}{v6}",
        h.workers().decision().kind,
        h.workers().len(),
        a.socks5,
        a.outbound.map(|o| o.to_string()).unwrap_or_else(|| "off".into()),
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
