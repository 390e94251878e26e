//! Polling a configuration file for a new, completely written text (ztunnel's and the
//! waypoint's hot reload).
//!
//! Each [`FileWatch::poll`] looks at the file's modification time and size; the text is
//! read when they moved, while the stamp is too recent to trust (an edit within the same
//! time tick with the same size keeps the same stamp: Git's "racily clean" problem), and
//! while a new text waits for confirmation. A new text is handed out only once two
//! consecutive reads (one poll apart) returned it, so a save written in several `write`s
//! and read midway — possibly still a valid file, e.g. cut before a section — is never
//! loaded on its own.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// How coarse a file's modification time may be (file systems keep it in ticks of up to
/// a second or two, and a write in place is a truncate and then a write).
pub const MTIME_SLACK: Duration = Duration::from_secs(2);

type Stamp = Option<(SystemTime, u64)>;

/// Whether a stamp cannot be trusted to change on the next edit: modified so recently (or
/// in the future) that a further edit of the same length may keep the same modification
/// time. Such a file is read again on every poll until its time is safely in the past.
fn racy(stamp: Stamp, now: SystemTime) -> bool {
    stamp.is_some_and(|(mtime, _)| mtime + MTIME_SLACK >= now)
}

fn stamp(p: &Path) -> Stamp {
    let m = std::fs::metadata(p).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// The state of one watched file: the text in force and a new text read once.
pub struct FileWatch {
    path: PathBuf,
    stamp: Stamp,
    current: String,
    candidate: Option<String>,
}

impl FileWatch {
    /// Watch `path`, whose text in force is `current` (what the running configuration was
    /// loaded from). The first poll reads the file, so an edit made since is not missed.
    pub fn new(path: impl Into<PathBuf>, current: String) -> FileWatch {
        FileWatch {
            path: path.into(),
            stamp: None,
            current,
            candidate: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The text in force: the last one [`FileWatch::poll`] handed out, else the first.
    pub fn current(&self) -> &str {
        &self.current
    }

    /// One look at the file: a text to load when the file holds one other than the text in
    /// force and the previous poll read the same. The text returned is in force from then
    /// on (a broken one is not handed out again until the file changes).
    pub fn poll(&mut self) -> Option<String> {
        let now = stamp(&self.path);
        if self.candidate.is_none()
            && now.is_some()
            && now == self.stamp
            && !racy(now, SystemTime::now())
        {
            return None;
        }
        self.stamp = now;
        let Ok(text) = std::fs::read_to_string(&self.path) else {
            // Mid-replace (rename) or removed: look again on the next poll.
            self.stamp = None;
            self.candidate = None;
            return None;
        };
        if text == self.current {
            self.candidate = None;
            return None;
        }
        if self.candidate.as_ref() == Some(&text) {
            self.candidate = None;
            self.current = text.clone();
            return Some(text);
        }
        // New, or still changing: confirm on the next poll.
        self.candidate = Some(text);
        None
    }
}

/// Test support: write `text` to `file` and stamp it `mtime`, as an edit within one time
/// tick keeps the stamp (what a [`FileWatch`] must still see), for the tests of this module
/// and of the reloads built on it.
#[doc(hidden)]
pub fn write_with_mtime(file: &Path, text: &str, mtime: SystemTime) -> std::io::Result<()> {
    std::fs::write(file, text)?;
    std::fs::File::options()
        .write(true)
        .open(file)?
        .set_modified(mtime)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("filewatch-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A save of the same size within the stamp's time tick (same modification time) is
    /// still seen; nothing is handed out before two reads agree.
    #[test]
    fn a_save_keeping_size_and_mtime_is_handed_out_after_two_reads() {
        let d = dir("tick");
        let file = d.join("c.yaml");
        let mtime = SystemTime::now() + Duration::from_secs(3600);
        write_with_mtime(&file, "a: 1\n", mtime).unwrap();
        let mut w = FileWatch::new(&file, "a: 1\n".into());
        assert_eq!(w.poll(), None);
        assert_eq!(w.poll(), None);
        write_with_mtime(&file, "a: 2\n", mtime).unwrap();
        assert_eq!(w.poll(), None, "one read is not enough");
        assert_eq!(w.poll().as_deref(), Some("a: 2\n"));
        assert_eq!(w.poll(), None, "handed out once");
        let _ = std::fs::remove_dir_all(&d);
    }

    /// A save read midway (the first of its writes only) is never handed out: the next
    /// read differs, and the complete text is handed out once it reads the same twice.
    #[test]
    fn a_torn_save_is_not_handed_out() {
        let d = dir("torn");
        let file = d.join("c.yaml");
        std::fs::write(&file, "a: 1\n").unwrap();
        let mut w = FileWatch::new(&file, "a: 1\n".into());
        assert_eq!(w.poll(), None);
        std::fs::write(&file, "a: 2\n").unwrap();
        assert_eq!(w.poll(), None);
        // The save's second write lands before the confirming read.
        let mut f = std::fs::File::options().append(true).open(&file).unwrap();
        std::io::Write::write_all(&mut f, b"b: 2\n").unwrap();
        drop(f);
        assert_eq!(w.poll(), None, "the torn text was not confirmed");
        assert_eq!(w.poll().as_deref(), Some("a: 2\nb: 2\n"));
        let _ = std::fs::remove_dir_all(&d);
    }

    /// The text in force is not handed out again; an edit made before the first poll is.
    #[test]
    fn first_poll_compares_with_the_text_in_force() {
        let d = dir("first");
        let file = d.join("c.yaml");
        std::fs::write(&file, "a: 1\n").unwrap();
        let mut same = FileWatch::new(&file, "a: 1\n".into());
        assert_eq!((same.poll(), same.poll()), (None, None));
        let mut edited = FileWatch::new(&file, "a: 0\n".into());
        assert_eq!(edited.poll(), None);
        assert_eq!(edited.poll().as_deref(), Some("a: 1\n"));
        let _ = std::fs::remove_dir_all(&d);
    }
}
