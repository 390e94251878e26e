//! Runs the built harness with the quick suite (the main job, shortened) and checks the
//! report it writes. As root the suite runs over the netns topology (network namespaces,
//! transparent capture, two ztunnels and a waypoint); without root, over the same mesh on
//! loopback addresses through SOCKS5 — and under `CI` a missing root fails the test instead.
//! A second test runs the loopback topology explicitly (so it is tested as root too); a third
//! (root) runs two peers, the runtime's forwarder under small descriptor limits, and checks
//! that the memory rows are sized and skipped to fit them, not failed.
//! They run one at a time: all use the machine's CPUs, and the loopback mesh listens on
//! `0.0.0.0:15008`.

use std::process::{Command, Stdio};
// Serialises the two tests (test harness only, no data path).
#[allow(clippy::disallowed_types)]
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[allow(clippy::disallowed_types)]
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Run the bench binary with `args` (bounded: 240 s), return (status, stdout).
fn run_bench(args: &[&str]) -> (std::process::ExitStatus, String, u32) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the bench binary");
    let pid = child.id();
    let mut out = child.stdout.take().expect("piped");
    // Read stdout on a thread so a full pipe cannot stall the child.
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(240);
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for bench") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("bench {args:?} did not finish within 240 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    (status, reader.join().unwrap_or_default(), pid)
}

#[test]
fn loopback_topology_runs_every_path_without_loss() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let out = std::env::temp_dir().join(format!("bench-loopback-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let (status, stdout, _) = run_bench(&[
        "--quick",
        "--topology",
        "loopback",
        "--scenario",
        "tcp-throughput,tcp-rr,conn-churn,http1-rps,http2-rps,large-body,mixed,slow-reader",
        "--streams",
        "2",
        "--slow-conns",
        "20",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        status.success(),
        "bench --topology loopback exited with {status}"
    );
    assert!(
        stdout.contains("| scenario | path |"),
        "summary table: {stdout}"
    );
    let text = std::fs::read_to_string(out.join("report.json")).expect("report.json written");
    let report: Value = serde_json::from_str(&text).expect("report.json is JSON");
    assert_eq!(report["ok"], true);
    assert_eq!(report["settings"]["topology"], "loopback");
    assert!(
        report["mesh"]["socks5"].as_str().is_some(),
        "SOCKS5 address reported"
    );
    assert!(
        report["mesh"]["waypoint"].as_u64().is_some(),
        "the waypoint ran"
    );
    proxy_cpu_splits_per_process(&report, 2);
    let results = report["results"].as_array().expect("results array");
    for id in [
        "tcp-throughput/streams=2",
        "tcp-rr/size=100B streams=2",
        "conn-churn/size=100B conc=8",
        "http1-rps/body=100B conns=64",
        "http2-rps/body=100B conns=8 streams=8",
        "large-body/body=1MiB conns=8",
        "mixed/size=100B http-conns=8",
    ] {
        for path in ["direct", "l4", "hbone", "waypoint"] {
            let e = results.iter().find(|e| e["id"] == id && e["path"] == path);
            let http = id.starts_with("http") || id.starts_with("large-body");
            if path == "waypoint" && !http {
                assert!(e.is_none(), "{id} ran over the waypoint");
                continue;
            }
            let e = e.unwrap_or_else(|| panic!("no result for {id} × {path}"));
            assert_eq!(e["ok"], true, "{id} × {path}: {e}");
            assert!(
                e["figure"]["median"].as_f64().unwrap_or(0.0) > 0.0,
                "{id} × {path}"
            );
            assert_eq!(e["bytes"]["lost"], 0, "{id} × {path}: bytes lost");
            assert!(
                e["bytes"]["sent"].as_u64().unwrap_or(0) > 0,
                "{id} × {path}"
            );
            assert_eq!(e["errors"], 0, "{id} × {path}: errors");
            if id.starts_with("mixed") {
                // Bulk, rr and http all ran at once: each part has its figure.
                let m = &e["mixed"];
                assert!(
                    m["bulk_gbit_per_s"].as_f64().unwrap_or(0.0) > 0.0,
                    "{path}: {m}"
                );
                assert!(
                    m["http_requests_per_s"].as_f64().unwrap_or(0.0) > 0.0,
                    "{path}: {m}"
                );
                assert!(
                    m["http_p99_us"].as_f64().unwrap_or(0.0) > 0.0,
                    "{path}: {m}"
                );
                assert!(e["latency_us"]["p99"]["median"].as_f64().unwrap_or(0.0) > 0.0);
            }
        }
    }
    // slow-reader: the path filled up, memory read, then every byte arrived.
    for path in ["l4", "hbone"] {
        let e = results
            .iter()
            .find(|e| e["id"] == "slow-reader/conns=20" && e["path"] == path)
            .unwrap_or_else(|| panic!("no slow-reader result for {path}"));
        assert_eq!(e["ok"], true, "slow-reader × {path}: {e}");
        assert_eq!(e["metric"], "bytes_per_slow_connection");
        assert_eq!(e["memory"]["established"], 20, "{e}");
        assert!(
            e["memory"]["buffered_bytes_per_connection"]
                .as_f64()
                .unwrap_or(0.0)
                > 0.0,
            "slow-reader × {path}: bytes written into the path: {e}"
        );
        assert!(e["bytes"]["sent"].as_u64().unwrap_or(0) > 0);
        assert_eq!(e["bytes"]["lost"], 0);
    }
    assert!(
        !results
            .iter()
            .any(|e| e["scenario"] == "slow-reader" && e["path"] == "direct"),
        "slow-reader measures proxies: not on direct"
    );
    // Every run, not just the aggregates: nothing lost, nothing failed.
    for r in report["runs"].as_array().expect("runs") {
        assert_eq!(r["bytes_sent"], r["bytes_received"], "run {r}");
        assert_eq!(r["errors"], 0, "run {r}");
        assert!(r["failed"].is_null(), "run {r}");
        // Read from every namespace of the mesh (a namespace it could not read gives null).
        if r["scenario"] == "tcp-throughput" {
            assert!(r["tcp_retransmits"].is_u64(), "run {r}");
        }
    }
    // large-body: the figure is the body bytes moved inside the window (partial exchanges
    // included), over the planned window; the request rate is that in 2 MiB exchanges.
    let planned = report["settings"]["duration_s"]
        .as_f64()
        .expect("duration_s");
    let mut large = 0;
    for r in report["runs"].as_array().expect("runs") {
        if r["scenario"] != "large-body" {
            continue;
        }
        large += 1;
        let bytes = r["window_bytes"].as_u64().expect("window_bytes");
        let moved = r["bytes_sent"].as_u64().unwrap() + r["bytes_received"].as_u64().unwrap();
        assert!(
            bytes > 0 && bytes <= moved,
            "window bytes within all moved: {r}"
        );
        let near = |got: &Value, want: f64| {
            let got = got.as_f64().unwrap_or(f64::NAN);
            (got - want).abs() <= want * 0.002 + 1e-6
        };
        assert!(
            near(&r["gbit_per_s"], bytes as f64 * 8.0 / planned / 1e9),
            "Gbit/s from window_bytes over {planned} s: {r}"
        );
        assert!(
            near(
                &r["requests_per_s"],
                bytes as f64 / (2.0 * 1048576.0) / planned
            ),
            "exchanges/s from window_bytes: {r}"
        );
    }
    assert!(
        large >= 4,
        "large-body ran on direct, l4, hbone and waypoint"
    );
    let _ = std::fs::remove_dir_all(&out);
}

use serde_json::Value;

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

#[test]
fn quick_suite_reports_every_scenario_and_path() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let root = is_root();
    if !root && std::env::var_os("CI").is_some() {
        panic!("the mesh topology needs root (network namespaces, nftables) and CI is set");
    }
    let out = std::env::temp_dir().join(format!("bench-quick-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let (status, stdout, child_pid) = run_bench(&["--quick", "--out", out.to_str().unwrap()]);
    assert!(status.success(), "bench --quick exited with {status}");
    assert!(
        stdout.contains("| scenario | path |"),
        "summary table on stdout: {stdout}"
    );

    let text = std::fs::read_to_string(out.join("report.json")).expect("report.json written");
    let report: Value = serde_json::from_str(&text).expect("report.json is JSON");
    assert_eq!(report["schema"], "mesh-bench/report/v1");
    assert_eq!(report["ok"], true);
    assert_eq!(report["suite"], "quick");
    assert_eq!(
        report["settings"]["topology"],
        if root { "netns" } else { "loopback" }
    );
    for f in ["throughput.svg", "rates.svg"] {
        let svg = std::fs::read_to_string(out.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert!(
            svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
            "{f}"
        );
    }
    let latency_svg = std::fs::read_dir(&out)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("latency-"))
        .count();
    assert!(latency_svg >= 2, "latency curves written");
    if root {
        // Torn down: no namespace of this run is left.
        let prefix = format!("bn{}-", child_pid);
        let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
        let list = String::from_utf8_lossy(&list.stdout);
        assert!(!list.contains(&prefix), "namespaces left behind:\n{list}");
    }
    assert!(report["host"]["cores"].as_u64().unwrap_or(0) >= 1);
    assert!(report["host"]["kernel"].as_str().is_some());
    // Recorded because it moves every bulk figure (bbr paces senders on veths).
    assert_eq!(
        report["host"]["tcp_congestion"].as_str(),
        std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
            .ok()
            .as_deref()
            .map(str::trim)
    );
    assert!(out.join("summary.md").exists(), "summary.md written");

    let results = report["results"].as_array().expect("results array");
    let scenarios = [
        "tcp-throughput/streams=1",
        "tcp-throughput/streams=8",
        "tcp-rr/size=100B",
        "tcp-rr-open/size=100B rate=5000/s",
        "conn-churn/size=100B conc=8",
        "http1-rps/body=100B conns=64",
        "http1-open/body=100B rate=10000/s conns=64",
        "http2-rps/body=100B conns=8 streams=8",
    ];
    let paths: &[&str] = &["direct", "l4", "hbone", "waypoint"];
    for id in scenarios {
        for &path in paths {
            if path == "waypoint" && !id.starts_with("http") {
                // An HTTP proxy: TCP scenarios do not run on it.
                assert!(
                    !results.iter().any(|e| e["id"] == id && e["path"] == path),
                    "{id} ran over the waypoint"
                );
                continue;
            }
            let e = results
                .iter()
                .find(|e| e["id"] == id && e["path"] == path)
                .unwrap_or_else(|| panic!("no result for {id} × {path}"));
            let median = e["figure"]["median"].as_f64().unwrap_or(0.0);
            assert!(median > 0.0, "{id} × {path}: figure {median}");
            assert!(
                e["ratio_to_direct"].as_f64().unwrap_or(0.0) > 0.0,
                "{id} × {path}: ratio"
            );
            assert_eq!(e["bytes"]["lost"], 0, "{id} × {path}: bytes lost");
            assert!(
                e["bytes"]["sent"].as_u64().unwrap_or(0) > 0,
                "{id} × {path}: bytes sent"
            );
            assert_eq!(e["errors"], 0, "{id} × {path}: errors");
            if id.starts_with("tcp-rr-open") || id.starts_with("http1-open") {
                assert_eq!(e["metric"], "p99_latency_us", "{id} × {path}: metric");
                assert_eq!(e["lower_is_better"], true, "{id} × {path}: lower is better");
                let p99 = e["latency_us"]["p99"]["median"].as_f64().unwrap_or(0.0);
                assert_eq!(median, p99, "{id} × {path}: figure is the p99");
                assert_eq!(
                    e["open_loop"]["target_rate_per_s"],
                    if id.starts_with("tcp") {
                        5000.0
                    } else {
                        10000.0
                    }
                );
                // Saturation (a debug build may not keep up) is flagged, not failed.
                assert!(
                    e["open_loop"]["achieved_rate_per_s"]["median"]
                        .as_f64()
                        .unwrap_or(0.0)
                        > 0.0,
                    "{id} × {path}: achieved rate"
                );
                assert!(e["open_loop"]["saturated"].is_boolean());
            }
            if id.starts_with("tcp-rr") || id.starts_with("conn-churn") || id.starts_with("http") {
                let p50 = e["latency_us"]["p50"]["median"].as_f64().unwrap_or(0.0);
                assert!(p50 > 0.0, "{id} × {path}: p50 {p50}");
            }
            if path != "direct" {
                assert!(e["proxy_cpu"].is_object(), "{id} × {path}: proxy CPU");
                assert!(
                    e["io_driver"].as_str().is_some(),
                    "{id} × {path}: proxy driver from READY"
                );
            }
        }
    }
    proxy_cpu_splits_per_process(&report, 3);
    // Cold HBONE handshakes (a TLS connection per stream) beside the warm pool.
    let cold = results
        .iter()
        .find(|e| e["id"] == "conn-churn/size=100B conc=8" && e["path"] == "hbone-cold")
        .expect("conn-churn × hbone-cold");
    assert_eq!(cold["ok"], true, "hbone-cold: {cold}");
    assert!(cold["figure"]["median"].as_f64().unwrap_or(0.0) > 0.0);
    assert!(
        !results
            .iter()
            .any(|e| e["path"] == "hbone-cold" && e["scenario"] != "conn-churn"),
        "hbone-cold carries conn-churn only"
    );
    // Memory per idle connection through each proxied mesh path (both topologies).
    for path in ["l4", "hbone"] {
        let e = results
            .iter()
            .find(|e| e["scenario"] == "idle-connections" && e["path"] == path)
            .unwrap_or_else(|| panic!("no idle-connections result for {path}"));
        assert_eq!(e["ok"], true, "idle-connections × {path}");
        assert_eq!(e["bytes"]["lost"], 0);
        assert_eq!(e["memory"]["established"], 1000, "{e}");
    }
    // Idle HTTP keep-alive connections (tunnels) through the waypoint: the RSS of all three
    // proxies of the path, before and with them.
    let e = results
        .iter()
        .find(|e| e["scenario"] == "idle-http" && e["path"] == "waypoint")
        .expect("idle-http × waypoint");
    assert_eq!(e["ok"], true, "idle-http × waypoint: {e}");
    assert_eq!(e["memory"]["established"], 1000, "{e}");
    assert_eq!(
        e["memory"]["rss_after_kb"].as_array().map(Vec::len),
        Some(3)
    );
    assert!(
        !results
            .iter()
            .any(|e| e["scenario"] == "idle-http" && e["path"] != "waypoint"),
        "idle-http runs on the waypoint only"
    );
    // slow-reader is part of the suite: the paths filled up, then every byte arrived.
    for path in ["l4", "hbone"] {
        let e = results
            .iter()
            .find(|e| e["id"] == "slow-reader/conns=100" && e["path"] == path)
            .unwrap_or_else(|| panic!("no slow-reader result for {path}"));
        assert_eq!(e["ok"], true, "slow-reader × {path}: {e}");
        assert_eq!(e["memory"]["established"], 100, "{e}");
        assert!(e["bytes"]["sent"].as_u64().unwrap_or(0) > 0, "{e}");
        assert_eq!(e["bytes"]["lost"], 0, "{e}");
    }
    // Our own paths fit the descriptor limits as they are: nothing sized or skipped.
    assert_eq!(
        report["sizing"],
        serde_json::json!([]),
        "sizing: {}",
        report["sizing"]
    );
    let _ = std::fs::remove_dir_all(&out);
}

/// `a` and `b` agree but for the report's rounding (four significant digits per figure).
fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 2e-3 * a.abs().max(b.abs()) + 2e-3
}

/// Proxy CPU is the sum over the path's proxies; `by_process` splits it: ztunnel A, the
/// waypoint and ztunnel B on the waypoint path, from the same samples, so the parts add up
/// to the total in every run and (one run per row in --quick) in every result row.
fn proxy_cpu_splits_per_process(report: &Value, waypoint_rows: usize) {
    assert_eq!(report["settings"]["reps"], 1, "--quick runs once per row");
    let mut rows = 0;
    for e in report["results"].as_array().unwrap() {
        let (id, path) = (&e["id"], e["path"].as_str().unwrap_or(""));
        let by = &e["proxy_cpu"]["by_process"];
        let want: &[&str] = match path {
            "direct" => {
                assert!(e["proxy_cpu"].is_null(), "{id} × direct: no proxy CPU");
                continue;
            }
            "l4" => &["ztunnel-a"],
            "hbone" => &["ztunnel-a", "ztunnel-b"],
            "waypoint" => &["ztunnel-a", "waypoint", "ztunnel-b"],
            _ => continue,
        };
        if e["proxy_cpu"]["cpu_pct"].is_null() {
            // Memory rows: no CPU figure, so nothing to split.
            assert_eq!(by, &serde_json::json!({}), "{id} × {path}");
            continue;
        }
        let names: Vec<&str> = by
            .as_object()
            .unwrap_or_else(|| panic!("{id} × {path}: by_process: {e}"))
            .keys()
            .map(String::as_str)
            .collect();
        let mut sorted = want.to_vec();
        sorted.sort();
        let mut got = names.clone();
        got.sort();
        assert_eq!(got, sorted, "{id} × {path}: processes");
        let Some(key) = [
            "cpu_us_per_request",
            "cpu_us_per_round_trip",
            "cpu_us_per_connection",
            "cpu_s_per_gb",
        ]
        .into_iter()
        .find(|k| e["proxy_cpu"][*k].is_object()) else {
            continue;
        };
        if e["runs_used"] != 1 {
            continue;
        }
        for k in [key, "cpu_pct"] {
            let total = e["proxy_cpu"][k]["median"].as_f64().unwrap();
            let parts: Vec<f64> = want
                .iter()
                .map(|n| {
                    by[*n][k]["median"]
                        .as_f64()
                        .unwrap_or_else(|| panic!("{id} × {path}: {n} {k}: {by}"))
                })
                .collect();
            let sum: f64 = parts.iter().sum();
            assert!(
                close(sum, total),
                "{id} × {path}: {k} parts {parts:?} add up to {sum}, the path's total is {total}"
            );
        }
        if path == "waypoint" {
            rows += 1;
        }
    }
    assert!(
        rows >= waypoint_rows,
        "the waypoint's http rows carry the split ({rows})"
    );
    // Every run: the parts' CPU-seconds add up to the run's proxy CPU-seconds.
    let mut runs = 0;
    for run in report["runs"].as_array().unwrap() {
        if run["path"] != "waypoint" || run["failed"].is_string() || run["proxy_cpu_s"].is_null() {
            continue;
        }
        let parts = run["proxy_cpu_by_process"].as_array().unwrap();
        let names: Vec<&str> = parts.iter().filter_map(|p| p["name"].as_str()).collect();
        assert_eq!(names, ["ztunnel-a", "waypoint", "ztunnel-b"], "{run}");
        let sum: f64 = parts.iter().map(|p| p["cpu_s"].as_f64().unwrap()).sum();
        let total = run["proxy_cpu_s"].as_f64().unwrap();
        assert!(
            close(sum, total),
            "run {}: parts {sum} vs {total}",
            run["seq"]
        );
        runs += 1;
    }
    assert!(
        runs >= waypoint_rows,
        "waypoint runs with proxy CPU: {runs}"
    );
}

/// `v[key]` is a string that starts with `prefix`.
fn assert_starts(v: &Value, key: &str, prefix: &str) {
    let got = v[key].as_str().unwrap_or("");
    assert!(
        got.starts_with(prefix),
        "{key}: {got:?} (want {prefix:?}…): {v}"
    );
}

/// A `--peer` command: the runtime's forwarder (`bench __l4fwd`, bench/peers/l4fwd.yaml with
/// its ports moved from 92xx to `base`xx) under `ulimit -n limit`, without the capability to
/// raise it again (the forwarder raises its limit when it may). It first prints the peer
/// pod's `tcp_tw_reuse` and port range to its log.
fn forwarder_peer(name: &str, base: u16, limit: u64) -> String {
    let exe = env!("CARGO_BIN_EXE_bench");
    let cfg = concat!(env!("CARGO_MANIFEST_DIR"), "/peers/l4fwd.yaml");
    let hi = base / 100;
    format!(
        "{name}=10.181.0.5:{base},cmd=echo \"tcp_tw_reuse=$(cat \
         /proc/sys/net/ipv4/tcp_tw_reuse) ports=$(cat \
         /proc/sys/net/ipv4/ip_local_port_range)\" && \
         sed 's/10.181.0.5:92/10.181.0.5:{hi}/' {cfg} > \"$BENCH_PEER_DIR/l4fwd.yaml\" && ulimit -n {limit} && exec setpriv \
         --bounding-set=-sys_resource {exe} __l4fwd --config \"$BENCH_PEER_DIR/l4fwd.yaml\""
    )
}

#[test]
fn peer_memory_rows_are_sized_or_skipped_to_the_peers_descriptor_limit() {
    if !netlab::require_root("peer_memory_rows_are_sized_or_skipped") {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let out = std::env::temp_dir().join(format!("bench-peer-fit-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    // 1,000 idle connections (--quick) need 2,000 descriptors in a one-hop proxy: `small`
    // (1,200) fits about 560 of them, `tiny` (200) under 100.
    let small = forwarder_peer("small", 9200, 1200);
    let tiny = forwarder_peer("tiny", 9300, 200);
    let (status, stdout, _) = run_bench(&[
        "--quick",
        "--scenario",
        "tcp-rr,idle-connections,idle-http",
        "--path",
        "direct,l4",
        "--peer",
        &small,
        "--peer",
        &tiny,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        status.success(),
        "sized and skipped rows are no failure: bench exited with {status}"
    );
    assert!(stdout.contains("| skipped |"), "summary table: {stdout}");
    let text = std::fs::read_to_string(out.join("report.json")).expect("report.json written");
    let report: Value = serde_json::from_str(&text).expect("report.json is JSON");
    assert_eq!(report["ok"], true, "{}", report["failures"]);
    let results = report["results"].as_array().expect("results array");
    let row = |id: &str, path: &str| -> &Value {
        results
            .iter()
            .find(|e| e["id"] == id && e["path"] == path)
            .unwrap_or_else(|| panic!("no result for {id} × {path}"))
    };
    // Both peers forward: their tcp-rr rows measured.
    for peer in ["small", "tiny"] {
        let e = row("tcp-rr/size=100B", peer);
        assert_eq!(e["ok"], true, "{e}");
        assert!(e["figure"]["median"].as_f64().unwrap_or(0.0) > 0.0, "{e}");
        assert!(e["sizing"].is_null(), "{e}");
    }
    for id in ["idle-connections/conns=1000", "idle-http/conns=1000"] {
        // small: measured with what fits its 1,200 descriptors, every one established.
        let e = row(id, "small");
        assert_eq!(e["ok"], true, "{id} × small: {e}");
        let z = &e["sizing"];
        assert_eq!(z["skipped"], false, "{z}");
        assert_eq!(z["asked"], 1000, "{z}");
        assert_eq!(z["limit_fds"], 1200, "{z}");
        assert_starts(z, "limited_by", "small pid ");
        let n = z["connections"].as_u64().unwrap_or(0);
        assert!((100..=568).contains(&n), "{id} × small: sized to {n}: {z}");
        assert_eq!(e["memory"]["connections"], n, "{e}");
        assert_eq!(e["memory"]["established"], n, "{e}");
        // The first memory run grows the forwarder; the second runs in the heap the first
        // freed (the proxies keep freed memory) and may measure no growth at all.
        let median = e["figure"]["median"].as_f64().expect("a memory figure");
        if id.starts_with("idle-connections") {
            assert!(median > 0.0, "{e}");
        } else {
            assert!(median >= 0.0, "{e}");
        }
        assert_eq!(e["bytes"]["lost"], 0, "{e}");
        assert_starts(
            z,
            "reason",
            &format!("sized: measured with {n} of 1,000 connections"),
        );
        // tiny: skipped, said so, nothing measured, nothing failed.
        let e = row(id, "tiny");
        assert_eq!(e["ok"], true, "{id} × tiny: {e}");
        let z = &e["sizing"];
        assert_eq!(z["skipped"], true, "{z}");
        assert_eq!(z["connections"], 0, "{z}");
        assert_eq!(z["limit_fds"], 200, "{z}");
        assert_starts(z, "reason", "skipped: needs 2,");
        assert!(e["figure"].is_null(), "{e}");
        assert!(e["memory"].is_null(), "{e}");
        assert_eq!(e["bytes"]["sent"], 0, "{e}");
    }
    // Our own path fits: measured with the scenario's count.
    let e = row("idle-connections/conns=1000", "l4");
    assert_eq!(e["ok"], true, "{e}");
    assert!(e["sizing"].is_null(), "{e}");
    assert_eq!(e["memory"]["established"], 1000, "{e}");
    // The same four decisions up front, in the flags and in the Markdown summary.
    let sizing = report["sizing"].as_array().expect("sizing array");
    assert_eq!(sizing.len(), 4, "{sizing:?}");
    assert!(sizing
        .iter()
        .all(|z| z["path"] == "small" || z["path"] == "tiny"));
    let flags = report["flags"].as_array().expect("flags");
    assert!(
        flags
            .iter()
            .filter(|f| f.as_str().unwrap_or("").contains("skipped: needs"))
            .count()
            == 2,
        "{flags:?}"
    );
    let md = std::fs::read_to_string(out.join("summary.md")).expect("summary.md");
    assert!(md.contains("skipped: needs"), "{md}");
    assert!(md.contains("sized: measured with"), "{md}");
    // The peers ran in a pod that reuses TIME_WAIT ports for its upstream connections, with
    // the whole port range (a peer's memory run after another's waited ~30 s on connect()).
    for peer in ["small", "tiny"] {
        let log = std::fs::read_to_string(out.join(format!("peer-{peer}.log")))
            .unwrap_or_else(|e| panic!("peer-{peer}.log in the report folder: {e}"));
        let line = log.lines().find(|l| l.starts_with("tcp_tw_reuse="));
        let words: Vec<&str> = line.unwrap_or_default().split_whitespace().collect();
        assert_eq!(
            words,
            ["tcp_tw_reuse=1", "ports=1024", "65535"],
            "peer-{peer}.log: {log}"
        );
    }
    let _ = std::fs::remove_dir_all(&out);
}
