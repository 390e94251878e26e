//! Robustness against peers, pods and editors: metric label values stay bounded whatever a
//! mesh peer asks for; a config save that keeps the file's modification time is applied.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use common::*;
use hbone::ca::CertSource;
use hbone::wire::ConnectRequest;
use hbone::H2Settings;

/// `n` CONNECT streams over one HBONE connection to `zt` as `identity`, one per
/// authority; returns how many were answered with each status (200 streams are dropped).
fn connect_many(
    t: &Topo,
    identity: &str,
    zt: SocketAddr,
    authorities: Vec<SocketAddr>,
) -> std::collections::BTreeMap<u16, usize> {
    let cert = t
        .ca()
        .issue(&identity.parse().unwrap(), SystemTime::now())
        .unwrap();
    std::thread::spawn(move || {
        common::block_on(64, async move {
            let tls = hbone::tls::client_config(&cert, &[ZTUNNEL_ID.parse().unwrap()]).unwrap();
            let c = hbone::client::Client::connect(
                zt,
                tls,
                &H2Settings::default(),
                &hbone::tls::TlsCounters::default(),
            )
            .await
            .unwrap();
            let mut answers = std::collections::BTreeMap::new();
            for a in authorities {
                let status = match c.open(&ConnectRequest::new(a)).await {
                    Ok(_) => 200,
                    Err(hbone::HboneError::Status(s)) => s.as_u16(),
                    Err(e) => panic!("CONNECT {a}: {e}"),
                };
                *answers.entry(status).or_insert(0) += 1;
            }
            answers
        })
    })
    .join()
    .unwrap()
}

/// Lines of the metric `name` (its series).
fn series(stats: &str, name: &str) -> usize {
    stats
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .count()
}

/// R9 input: a mesh peer CONNECTing to 10,000 addresses that are no workload here gets
/// 400 for each; the path counter keeps one series for them (`authority="unknown"`), not
/// one per address, and counts every one.
#[test]
fn r9_ten_thousand_unknown_authorities_leave_path_series_bounded() {
    let t = Topo::new(161, "[]");
    let zt_b = SocketAddr::new(t.net.zt_b(), 15008);
    let before = series(&t.stats_b(), "ztunnel_connection_paths_total");
    let authorities: Vec<SocketAddr> = (0..10_000u32)
        .map(|i| {
            SocketAddr::from((
                [10, 200, (i >> 8) as u8, i as u8],
                1000 + (i % 50_000) as u16,
            ))
        })
        .collect();
    let answers = connect_many(&t, CLIENT_ID, zt_b, authorities);
    assert_eq!(answers.into_iter().collect::<Vec<_>>(), vec![(400, 10_000)]);
    let stats = t.stats_b();
    assert_eq!(
        metric(
            &stats,
            "ztunnel_connection_paths_total",
            &[
                ("direction", "inbound"),
                ("route", "hbone_not_served"),
                ("authority", "unknown"),
                ("peer", CLIENT_ID),
            ],
        ),
        10_000,
        "{stats}"
    );
    let after = series(&stats, "ztunnel_connection_paths_total");
    assert!(
        after <= before + 1,
        "path series grew from {before} to {after}"
    );
}

/// Hot reload (R9 policy): a save that keeps the file's modification time (an edit within
/// the same time tick; here set explicitly and renamed into place) is still applied: a
/// DENY added that way is enforced.
#[test]
fn r9_reload_applies_a_save_that_keeps_the_modification_time() {
    let t = Topo::new(163, "[]");
    let _server = Pod::start(t.net.server(), "server");
    let zt_b = SocketAddr::new(t.net.zt_b(), 15008);
    assert_eq!(hbone_call(&t.ca(), CLIENT_ID, zt_b, t.net.server()).0, 200);
    let mtime = SystemTime::now() + Duration::from_secs(3600);
    let save = |text: &str| {
        let tmp = t.dir.join("b.yaml.tmp");
        runtime::filewatch::write_with_mtime(&tmp, text, mtime).unwrap();
        std::fs::rename(&tmp, &t.file_b).unwrap();
    };
    // The same text, stamped with the time the next save keeps.
    save(&t.net.node_config("node-b", &t.ca_dir, "[]"));
    save(&t.net.node_config("node-b", &t.ca_dir, DENY_CLIENT));
    eventually_within(
        "the DENY saved in the same tick is enforced",
        Duration::from_secs(30),
        || hbone_call(&t.ca(), CLIENT_ID, zt_b, t.net.server()).0 == 401,
    );
    assert_eq!(
        t.b()
            .reloads
            .errors
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}
