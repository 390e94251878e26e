//! What the host allows, the gate of tests that need it, and polling.

use std::time::{Duration, Instant};

/// The env var that turns a skipped namespace test into a failure.
const CI: &str = "CI";

/// Is this process root (effective uid 0)?
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// Can namespaces here carry IPv6? Checked on the host (`/proc/sys/net/ipv6` present and
/// not disabled); new namespaces inherit `disable_ipv6` from `default`.
pub fn ipv6_available() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv6/conf/default/disable_ipv6")
        .is_ok_and(|v| v.trim() == "0")
}

/// May `test` build namespaces? Root: yes. Otherwise it panics when `CI` is set (a test
/// that cannot run must not pass there) and prints SKIP and returns false elsewhere.
pub fn require_root(test: &str) -> bool {
    gate(
        test,
        is_root(),
        "needs root (network namespaces, nftables)",
        "needs root for network namespaces and nftables (run as root, or set CI to make this a failure)",
    )
}

/// [`require_root`], and IPv6 too (missing IPv6 likewise fails under `CI`).
pub fn require_ipv6(test: &str) -> bool {
    require_root(test)
        && gate(
            test,
            ipv6_available(),
            "IPv6 is unavailable (net.ipv6 missing or disabled)",
            "IPv6 is unavailable here",
        )
}

/// `ok`, or a failure under `CI` (`why`), or a printed SKIP (`skip`) and false.
fn gate(test: &str, ok: bool, why: &str, skip: &str) -> bool {
    if !ok {
        fail_or_skip(
            &format!("{test}: {why}"),
            &format!("{test}: {skip}"),
            in_ci(),
        );
    }
    ok
}

/// Is `CI` set (to anything)? There a test that cannot run fails.
pub fn in_ci() -> bool {
    std::env::var_os(CI).is_some()
}

/// A test that cannot run on this host (`why`: no io_uring, one CPU, no privilege…): it
/// panics when `CI` is set, and prints SKIP elsewhere (the caller then returns).
pub fn cannot_run(why: &str) {
    fail_or_skip(why, why, in_ci());
}

fn fail_or_skip(why: &str, skip: &str, ci: bool) {
    if ci {
        panic!("{why}, and CI is set: failing, not skipping");
    }
    eprintln!("SKIP {skip}");
}

/// Poll `f` every 25 ms until it holds; after `within`, panic naming `what` with `dump()`
/// (the logs and counters that say why).
pub fn eventually(
    what: &str,
    within: Duration,
    mut f: impl FnMut() -> bool,
    dump: impl FnOnce() -> String,
) {
    let t = Instant::now();
    while t.elapsed() < within {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("timed out waiting for: {what}\n{}", dump());
}

#[cfg(test)]
mod tests {
    use super::fail_or_skip;

    #[test]
    #[should_panic(expected = "CI is set")]
    fn a_test_that_cannot_run_fails_under_ci() {
        fail_or_skip("no io_uring here (test)", "no io_uring here", true);
    }

    #[test]
    fn a_test_that_cannot_run_skips_outside_ci() {
        fail_or_skip("no io_uring here (test)", "no io_uring here", false);
    }
}
