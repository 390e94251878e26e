//! The gate of this crate's tests that need something the host may lack (io_uring, a
//! ring flag, two CPUs, `CAP_SYS_NICE`): under `CI` such a test fails, never passes
//! silently; elsewhere it says SKIP. As `netlab::gate` for the namespace tests.

/// Is `CI` set (to anything: as `netlab::gate`)?
pub(crate) fn in_ci() -> bool {
    std::env::var_os("CI").is_some()
}

/// A test that cannot run here: panics under `ci`, else prints SKIP (the caller returns).
pub(crate) fn cannot_run(why: &str, ci: bool) {
    if ci {
        panic!("{why}, and CI is set: failing, not skipping");
    }
    eprintln!("SKIP: {why}");
}

#[cfg(test)]
mod tests {
    use super::cannot_run;

    #[test]
    #[should_panic(expected = "CI is set")]
    fn a_test_that_cannot_run_fails_under_ci() {
        cannot_run("no io_uring here (test)", true);
    }

    #[test]
    fn a_test_that_cannot_run_skips_outside_ci() {
        cannot_run("no io_uring here (test)", false);
    }
}
