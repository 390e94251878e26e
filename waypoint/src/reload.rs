//! Hot reload of the configuration file, as ztunnel does it: a control thread polls the
//! file (every 100 ms: modification time and size, then the text), loads an edited file
//! completely and, only if every document is valid, publishes it as a new
//! [`WaypointConfig`] snapshot (routes, policies, load balancing, mesh model). A broken edit
//! is logged with file:line, document and field, counted, and the old snapshot keeps
//! serving.
//!
//! **Which snapshot a request sees**: each HBONE CONNECT stream (one tunnel) takes the
//! snapshot current when it is accepted and keeps it for every request it carries — its
//! R14 target check, policies, routes and endpoints stay consistent for its lifetime. A new
//! tunnel (the ztunnel opens one per downstream connection) sees the new snapshot.
//!
//! The settings document (`waypoint:`, `runtime`, `h2`) is read at start only: a change to
//! it is logged ("restart to apply") and the rest of the file is still reloaded.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use runtime::Publisher;

use crate::config::{self, SettingsDoc, WaypointConfig};
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

fn stamp(p: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(p).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Watch `file`; `text` is what the running snapshot was loaded from and `settings` the
/// settings document in force.
pub fn watch(
    file: PathBuf,
    text: String,
    settings: Option<SettingsDoc>,
    publisher: Publisher<WaypointConfig>,
    counters: Arc<Counters>,
) -> std::io::Result<Watcher> {
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let thread = std::thread::Builder::new()
        .name("config-watch".into())
        .spawn(move || {
            let mut last_stamp = stamp(&file);
            let mut last_text = text;
            while !s2.load(Ordering::SeqCst) {
                std::thread::sleep(POLL);
                let now = stamp(&file);
                if now == last_stamp {
                    continue;
                }
                last_stamp = now;
                let Ok(text) = std::fs::read_to_string(&file) else {
                    // Mid-replace (rename) or removed: look again on the next tick.
                    last_stamp = None;
                    continue;
                };
                if text == last_text {
                    continue;
                }
                match config::load_str(&file, &text, publisher.version() + 1) {
                    Ok(next) => {
                        if next.settings != settings {
                            tracing::warn!(file = %file.display(), "the settings document (waypoint/runtime/h2) changed: restart to apply it; reloading routes, policies and the model only");
                        }
                        let v = publisher.publish(next);
                        counters.config_reloads.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(version = v, file = %file.display(), "config snapshot published");
                    }
                    Err(e) => {
                        counters.config_reload_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::error!("config reload rejected, the old config keeps serving: {e}");
                    }
                }
                last_text = text;
            }
        })?;
    Ok(Watcher {
        stop,
        thread: Some(thread),
    })
}
