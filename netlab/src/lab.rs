//! [`Lab`]: what a run created, removed on drop.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::cmd::run;
use crate::{Error, Result};

/// `<tag><pid>`: the start of every namespace name of this process (see [`sweep_stale`]).
pub fn process_prefix(tag: &str) -> String {
    format!("{tag}{}", std::process::id())
}

/// Delete the namespaces named `<tag><pid>-…` whose process is gone (a run that was
/// killed before its teardown). Live runs, this one included, are left alone.
pub fn sweep_stale(tag: &str) {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(pid) = name
            .strip_prefix(tag)
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run(&["ip", "netns", "del", name]);
        }
    }
}

/// `ip netns exec <ns> <program>`: a command to run in `ns` (the program is executed in
/// the same process, so its pid is the child's).
pub fn netns_command(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).arg(program);
    c
}

/// The namespaces and processes of one run. `Drop` kills the processes, then deletes the
/// namespaces (newest first; their veths, addresses, routes and nftables tables go with
/// them), then removes the run's folder unless the thread is panicking (its logs are kept
/// for the failure report). Teardown never panics and may be called early
/// ([`Lab::teardown`]).
pub struct Lab {
    prefix: String,
    namespaces: Vec<String>,
    children: Vec<Child>,
    dir: Option<PathBuf>,
}

impl Lab {
    /// A lab whose namespaces are named `<prefix>-<name>`.
    pub fn new(prefix: impl Into<String>) -> Lab {
        Lab {
            prefix: prefix.into(),
            namespaces: Vec::new(),
            children: Vec::new(),
            dir: None,
        }
    }

    /// Also remove `dir` (created here, emptied first) at teardown, except on panic.
    pub fn with_dir(mut self, dir: impl Into<PathBuf>) -> Result<Lab> {
        let dir = dir.into();
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        self.dir = Some(dir);
        Ok(self)
    }

    /// A test's lab: sweeps what killed runs left ([`sweep_stale`] of `tag`), names its
    /// namespaces `<tag><pid>-<name>-…` (apart from parallel tests and processes) and keeps
    /// its files in a fresh temporary folder of the same name ([`Lab::with_dir`]).
    pub fn for_test(tag: &str, name: &str) -> Result<Lab> {
        sweep_stale(tag);
        let prefix = format!("{}-{name}", process_prefix(tag));
        let dir = std::env::temp_dir().join(format!("netlab-{prefix}"));
        Lab::new(prefix).with_dir(dir)
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The folder given to [`Lab::with_dir`].
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The full name of namespace `name` of this lab.
    pub fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    /// Create namespace `<prefix>-<name>` with its loopback up; returns the full name.
    pub fn add_ns(&mut self, name: &str) -> Result<String> {
        let ns = self.ns(name);
        run(&["ip", "netns", "add", &ns])?;
        self.namespaces.push(ns.clone());
        run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Start `cmd` (typically a [`netns_command`]) as a child of this lab: stdin closed,
    /// stderr to the file `log`, stdout read for a line starting with `READY ` (lines
    /// before it are skipped; stdout is drained afterwards so the process never blocks on
    /// it). Returns that line; the child is killed at teardown, also when this fails.
    pub fn spawn_ready(
        &mut self,
        name: &str,
        cmd: &mut Command,
        log: &Path,
        within: Duration,
    ) -> Result<String> {
        let file = std::fs::File::create(log)
            .map_err(|e| Error::io(format!("creating {}", log.display()), e))?;
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(file)
            .spawn()
            .map_err(|e| Error::io(format!("starting {name}"), e))?;
        let out = child.stdout.take().expect("stdout is piped");
        self.children.push(child);
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("netlab-stdout".into())
            .spawn(move || {
                let mut sent = false;
                for l in BufReader::new(out).lines() {
                    let Ok(l) = l else { break };
                    if !sent && l.starts_with("READY ") {
                        let _ = tx.send(l);
                        sent = true;
                    }
                }
            })
            .map_err(|e| Error::io("spawning a thread", e))?;
        rx.recv_timeout(within).map_err(|e| Error::NotReady {
            name: name.to_string(),
            why: match e {
                mpsc::RecvTimeoutError::Timeout => format!("none within {within:?}"),
                mpsc::RecvTimeoutError::Disconnected => "its stdout closed first".into(),
            },
            path: log.to_path_buf(),
            log: std::fs::read_to_string(log).unwrap_or_default(),
        })
    }

    /// [`Lab::spawn_ready`] with the log at `<dir>/<name>.log` (see [`Lab::log`]); panics
    /// with the error (and the log) when the process does not get ready: for tests.
    pub fn spawn_logged(&mut self, name: &str, cmd: &mut Command, within: Duration) -> String {
        let log = self.log_path(name);
        self.spawn_ready(name, cmd, &log, within)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// What child `name` started with [`Lab::spawn_logged`] wrote to its stderr so far.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.log_path(name)).unwrap_or_default()
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.dir
            .as_deref()
            .expect("a lab with a folder (Lab::with_dir)")
            .join(format!("{name}.log"))
    }

    /// Kill the children, delete the namespaces, remove the folder (see the type's docs).
    /// Idempotent.
    pub fn teardown(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.children.clear();
        for ns in self.namespaces.drain(..).rev() {
            let _ = Command::new("ip")
                .args(["netns", "del", &ns])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        if let Some(dir) = self.dir.take() {
            if std::thread::panicking() {
                eprintln!("logs kept in {}", dir.display());
            } else {
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.teardown();
    }
}
