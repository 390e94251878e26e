//! `tuning check` as a user runs it: the idle findings read this host (the cpuidle driver
//! and governor from sysfs, the PM QoS CPU latency limit from `/dev/cpu_dma_latency`) and
//! `--profile latency` says the profile will hold its limit.

use std::process::Command;

fn check(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tuning"))
        .arg("check")
        .args(args)
        .output()
        .expect("run tuning check");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// The finding's two lines: the value line and the recommendation line.
fn finding<'a>(text: &'a str, name: &str) -> (&'a str, &'a str) {
    let mut lines = text.lines();
    while let Some(l) = lines.next() {
        if l.get(5..).is_some_and(|r| r.starts_with(name)) {
            return (l, lines.next().unwrap_or(""));
        }
    }
    panic!("no finding {name:?} in:\n{text}");
}

fn sysfs(f: &str) -> Option<String> {
    std::fs::read_to_string(format!("/sys/devices/system/cpu/cpuidle/{f}"))
        .ok()
        .map(|s| s.trim().to_string())
}

#[test]
fn check_reports_cpuidle_and_the_pm_qos_limit_in_force() {
    let text = check(&[]);
    let (value, _) = finding(&text, "cpuidle");
    let driver = sysfs("current_driver").unwrap_or_else(|| "unavailable".into());
    assert!(value.contains(&format!("driver {driver},")), "{value}");
    if let Some(g) = sysfs("current_governor").or_else(|| sysfs("current_governor_ro")) {
        assert!(value.ends_with(&format!("governor {g}")), "{value}");
    }
    let (value, rec) = finding(&text, "PM QoS CPU latency");
    match runtime::pmqos::current_limit() {
        // Root: the aggregate printed is the one in force (read here too).
        Ok(us) => assert!(value.contains(&format!("{us} us: ")), "{value} (read {us})"),
        Err(_) => assert!(value.contains("unreadable ("), "{value}"),
    }
    // The default profile asks for nothing and points at the latency profile's knob.
    assert!(
        rec.contains("profile latency (runtime.cpu_latency_limit: 0us)"),
        "{rec}"
    );
}

#[test]
fn check_with_the_latency_profile_says_it_will_hold_the_limit() {
    let text = check(&["--profile", "latency"]);
    let (value, rec) = finding(&text, "PM QoS CPU latency");
    if runtime::pmqos::current_limit().is_ok() {
        assert!(value.starts_with("ok "), "{value}");
        assert!(
            rec.contains("this profile holds 0us while the proxy runs"),
            "{rec}"
        );
    } else {
        assert!(value.starts_with("WARN"), "{value}");
        assert!(rec.contains("run the proxy as root"), "{rec}");
    }
    // Busy polling is not part of the latency profile any more.
    let (value, _) = finding(&text, "runtime.busy_poll");
    assert!(value.contains("0 (off in this profile)"), "{value}");
}
