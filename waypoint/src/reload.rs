//! Hot reload of the configuration file, as ztunnel does it: a control thread polls the
//! file every 100 ms ([`runtime::filewatch`]: modification time and size, then the text
//! while the stamp is too recent to trust; a new text counts once two consecutive reads
//! agree, so a save read midway is not loaded), loads an edited file
//! completely and, only if every document is valid, publishes it as a new
//! [`WaypointConfig`] snapshot (routes, policies, load balancing, mesh model). A broken edit
//! is logged with file:line, document and field, counted, and the old snapshot keeps
//! serving.
//!
//! **Which snapshot a request sees**: the CONNECT (R14 target check) is checked under the
//! snapshot current when it arrives; then each request on the tunnel (HTTP/1.1 or an
//! HTTP/2 stream) takes the snapshot current when its head has been read and keeps it to
//! its end: policy, route, endpoints, retries, mirrors and its response. A reload thus
//! applies to the next request of every live keep-alive tunnel, as Envoy applies a new
//! route table to new requests: a DENY added is enforced there at once. When a request
//! finds a newer version, the tunnel derives its facts again (once per version, shared by
//! its HTTP/2 streams): the R14 target check — a target no longer served gets `503`
//! (`waypoint_stale_target_requests_total`), and the HTTP/1.1 tunnel is closed, the HTTP/2
//! one sent a graceful GOAWAY (its streams in flight finish) —, the trusted client
//! address, the source workload and the telemetry label cache. A request finding nothing
//! reloaded costs one version compare. An opaque TCP tunnel (L4 policy only) is authorized
//! again at each reload (the worker looks for a new version every 50 ms while it has such
//! tunnels, as ztunnel re-checks live connections): one the new snapshot denies, or whose
//! target it no longer serves, is reset (`waypoint_tcp_revoked_total`). So is a connection
//! upgraded after a `101`, authorized again by its upgrade request (its HTTP fields)
//! under each new snapshot (`waypoint_upgrades_revoked_total`). An HTTP/2 tunnel watches
//! reloads too (R14 only: policy applies per stream): one whose target a reload no longer
//! serves is sent a graceful GOAWAY at once, idle or not, its streams in flight finishing
//! (`waypoint_h2_revoked_total`, also counting those a stream found first).
//!
//! The settings document (`waypoint:`, `runtime`, `h2`) is read at start only: a change to
//! it is logged ("restart to apply") and the rest of the file is still reloaded.
//!
//! The same thread fetches the key sets RequestAuthentication rules name by URI
//! ([`crate::jwks`]): those of a reloaded file before it is published, and each set again
//! when its refresh is due (a changed set is published as a new snapshot). It also looks up
//! the host names of the mesh model's `DNS` ServiceEntries again every `dns_refresh` (60 s,
//! Istio's `dnsRefreshRate`): when one answers with other addresses, the file in force is
//! loaded again and published (`waypoint_dns_reloads_total`); a failed lookup keeps the
//! last answer.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use runtime::filewatch::FileWatch;
use runtime::Publisher;

use crate::config::{self, SettingsDoc, WaypointConfig};
use crate::jwks::Fetcher;
use crate::service::Counters;

/// How often the file is looked at.
pub const POLL: Duration = Duration::from_millis(100);

/// The watching thread; dropped, it stops.
pub struct Watcher {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How the model's `DNS` ServiceEntries are looked up again: how often (zero: never) and
/// with which resolver (the system's; a test's).
#[derive(Clone, Copy)]
pub struct DnsRefresh {
    pub every: Duration,
    pub resolve: fn(&str) -> Result<Vec<std::net::IpAddr>, String>,
}

impl DnsRefresh {
    /// Every `every`, with the system's resolver.
    pub fn system(every: Duration) -> DnsRefresh {
        DnsRefresh {
            every,
            resolve: mesh_model::config::system_resolver,
        }
    }
}

/// Watch `file`; `text` is what the running snapshot was loaded from and `settings` the
/// settings document in force; `fetcher` has the key sets the running snapshot was given
/// (and counts in `counters` from now on).
pub fn watch(
    file: PathBuf,
    text: String,
    settings: Option<SettingsDoc>,
    publisher: Publisher<WaypointConfig>,
    counters: Arc<Counters>,
    mut fetcher: Fetcher,
    dns: DnsRefresh,
) -> std::io::Result<Watcher> {
    fetcher.count_in(counters.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let thread = std::thread::Builder::new()
        .name("config-watch".into())
        .spawn(move || {
            // The first look reads the file and compares it with the text the snapshot was
            // loaded from (an edit made before this thread ran is not missed).
            let mut watch = FileWatch::new(&file, text.clone());
            // The text in force (what a DNS refresh loads again).
            let mut in_force = text;
            let mut recheck = mesh_model::config::DnsRecheck::new(dns.every, Instant::now());
            while !s2.load(Ordering::SeqCst) {
                std::thread::sleep(POLL);
                let now = Instant::now();
                if fetcher.due(now) {
                    let mut next = (*publisher.load()).clone();
                    if fetcher.resolve(&mut next, now) {
                        let v = publisher.publish(next);
                        tracing::info!(version = v, "key sets refreshed: config snapshot published");
                    }
                }
                let text = match watch.poll() {
                    Some(text) => text,
                    None if publisher
                        .load()
                        .mesh
                        .as_ref()
                        .is_some_and(|m| recheck.changed(now, m, &dns.resolve)) =>
                    {
                        tracing::info!(file = %file.display(), "a DNS ServiceEntry's host name answers otherwise: loading the file again");
                        counters.dns_reloads.fetch_add(1, Ordering::Relaxed);
                        in_force.clone()
                    }
                    None => continue,
                };
                match config::load_str_with(&file, &text, publisher.version() + 1, &dns.resolve) {
                    Ok(mut next) => {
                        next.adopt_breakers(&publisher.load());
                        fetcher.resolve(&mut next, Instant::now());
                        if next.settings != settings {
                            tracing::warn!(file = %file.display(), "the settings document (waypoint/runtime/h2) changed: restart to apply it; reloading routes, policies and the model only");
                        }
                        let v = publisher.publish(next);
                        in_force = text;
                        counters.config_reloads.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(version = v, file = %file.display(), "config snapshot published");
                    }
                    Err(e) => {
                        counters.config_reload_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::error!("config reload rejected, the old config keeps serving: {e}");
                    }
                }
            }
        })?;
    Ok(Watcher {
        stop,
        thread: Some(thread),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use runtime::filewatch::write_with_mtime;
    use std::path::Path;
    use std::time::SystemTime;

    const A: &str = "services:\n  - {name: a, namespace: default, hostname: a.default.svc.cluster.local, vips: [\"10.96.0.10\"], ports: {80: 8080}}\n";

    fn wait(c: &Counters, want: u64) {
        // Generous: the watcher polls every 100 ms.
        for _ in 0..600 {
            if c.config_reloads.load(Ordering::Relaxed) >= want {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("no reload");
    }

    fn start(file: &Path, loaded: &str) -> (Watcher, Arc<Counters>, Publisher<WaypointConfig>) {
        let cfg = config::load_str(file, loaded, 1).unwrap();
        let publisher = Publisher::new(cfg);
        let counters = Arc::new(Counters::default());
        let w = watch(
            file.to_path_buf(),
            loaded.to_string(),
            None,
            publisher.clone(),
            counters.clone(),
            Fetcher::new(crate::jwks::REFRESH, None),
            DnsRefresh::system(Duration::ZERO),
        )
        .unwrap();
        (w, counters, publisher)
    }

    #[test]
    fn an_edit_made_before_the_watcher_looked_is_published() {
        let dir = std::env::temp_dir().join(format!("wp-reload-a-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.yaml");
        // Loaded from A, but the file was edited (B) before the watcher's first look.
        let b = A.replace("name: a,", "name: b,");
        std::fs::write(&file, &b).unwrap();
        let (_w, counters, publisher) = start(&file, A);
        wait(&counters, 1);
        assert_eq!(publisher.version(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_edit_keeping_size_and_modification_time_is_published() {
        let dir = std::env::temp_dir().join(format!("wp-reload-b-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.yaml");
        // A modification time the next edit will keep (as an edit within one time tick).
        let mtime = SystemTime::now() + Duration::from_secs(3600);
        write_with_mtime(&file, A, mtime).unwrap();
        let (_w, counters, _p) = start(&file, A);
        // Same length, same modification time, other text.
        let b = A.replace("name: a,", "name: b,");
        assert_eq!(b.len(), A.len());
        write_with_mtime(&file, &b, mtime).unwrap();
        wait(&counters, 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
