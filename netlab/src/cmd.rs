//! Commands: `ip`, `sysctl` and `nft` (each returns at once; no timeout needed).

use std::io::Write as _;
use std::process::{Command, Stdio};

use crate::{Error, Result};

/// Run `args[0]` with the rest as arguments; an error carries its stderr.
pub fn run(args: &[&str]) -> Result<()> {
    output(args).map(drop)
}

/// [`run`], returning what it printed.
fn output(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::io(format!("running {}", args.join(" ")), e))?;
    if !out.status.success() {
        return Err(Error::Command {
            cmd: args.join(" "),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Run a command inside network namespace `ns` (`ip netns exec`).
pub fn run_in(ns: &str, args: &[&str]) -> Result<()> {
    let mut all = vec!["ip", "netns", "exec", ns];
    all.extend_from_slice(args);
    run(&all)
}

/// Apply an nftables script in `ns` (`nft -f -`, one transaction).
pub fn nft(ns: &str, script: &str) -> Result<()> {
    let what = format!("nft -f - in {ns}");
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::io(&what, e))?;
    let written = child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(script.as_bytes());
    // Wait even when the write failed, so no zombie is left; nft's stderr says more.
    let out = child.wait_with_output().map_err(|e| Error::io(&what, e))?;
    if !out.status.success() {
        return Err(Error::Command {
            cmd: what,
            status: out.status,
            stderr: format!("{}\n{script}", String::from_utf8_lossy(&out.stderr).trim()),
        });
    }
    written.map_err(|e| Error::io(format!("writing the script to {what}"), e))
}

/// The kernel's listing of nftables table `family table` in `ns` (`nft list table`).
pub fn nft_list_table(ns: &str, family: &str, table: &str) -> Result<String> {
    output(&[
        "ip", "netns", "exec", ns, "nft", "list", "table", family, table,
    ])
}
