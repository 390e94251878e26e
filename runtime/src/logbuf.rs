//! Buffered access log: the `access` lines (one per request or connection) a worker writes
//! go into a buffer of its thread, written to stderr when it holds [`FLUSH_BYTES`], every
//! [`FLUSH_INTERVAL`] (a task on each worker), before any other line of that thread (so a
//! thread's lines keep their order) and when the worker ends. One `write` then carries many
//! lines instead of one each; Envoy buffers its access logs the same way
//! (`access_log_flush_interval`, 1 s). What a crash loses is at most one interval of access
//! lines; warnings, errors and every other line are written at once.
//!
//! Threads that are not workers (and workers before [`buffer_this_thread`]) write every
//! line at once, as before.
//!
//! Access logs written elsewhere ([`LogFile`]: a file, or standard output, as Istio's
//! `envoyFileAccessLog` provider writes) are held the same way: a worker formats each line
//! straight into its own buffer for that file ([`LogFile::append`]), written with the stderr
//! buffer (same threshold, same interval, when the worker ends).

use std::cell::RefCell;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// A worker's buffered access lines are written at least this often.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// A buffer holding this much is written at once.
pub const FLUSH_BYTES: usize = 32 * 1024;

/// Lines buffered until the next flush, written whole to `sink`.
#[derive(Default)]
struct LineBuf {
    buf: Vec<u8>,
}

impl LineBuf {
    /// Buffer `line`; `true` when the buffer reached [`FLUSH_BYTES`] and is to be flushed.
    fn push(&mut self, line: &[u8]) -> bool {
        self.buf.extend_from_slice(line);
        self.buf.len() >= FLUSH_BYTES
    }

    /// Write what is held (then hold nothing; a buffer grown past the threshold is let go).
    fn flush(&mut self, sink: &mut dyn Write) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let r = sink.write_all(&self.buf);
        self.buf.clear();
        if self.buf.capacity() > 2 * FLUSH_BYTES {
            self.buf = Vec::new();
        }
        r
    }
}

thread_local! {
    /// This thread's buffer: `Some` while it buffers access lines.
    static BUF: RefCell<Option<LineBuf>> = const { RefCell::new(None) };
    /// This thread's lines for each [`LogFile`] it wrote to (while it buffers).
    static FILES: RefCell<Vec<(Arc<LogFile>, LineBuf)>> = const { RefCell::new(Vec::new()) };
}

/// Where a [`LogFile`]'s lines go.
#[derive(Debug)]
enum Out {
    /// The process's standard output (its lock keeps each write whole among the process's
    /// other stdout lines).
    Stdout,
    /// Opened for appending: each `write` lands whole at the end, whichever thread makes it.
    File(File),
}

/// An access-log destination other than stderr: a file opened for appending, or standard
/// output (`/dev/stdout`). Workers hold its lines as they hold stderr's
/// ([`LogFile::append`]); threads that do not buffer write each line at once.
#[derive(Debug)]
pub struct LogFile {
    path: PathBuf,
    out: Out,
    /// Lines handed to it, and writes that failed (each losing the lines it carried).
    lines: AtomicU64,
    failed_writes: AtomicU64,
}

impl LogFile {
    /// Opens `path` for appending (created when missing); `/dev/stdout` is the process's
    /// standard output.
    pub fn open(path: &Path) -> io::Result<Arc<LogFile>> {
        let out = if path == Path::new("/dev/stdout") {
            Out::Stdout
        } else {
            Out::File(File::options().create(true).append(true).open(path)?)
        };
        Ok(Arc::new(LogFile {
            path: path.to_owned(),
            out,
            lines: AtomicU64::new(0),
            failed_writes: AtomicU64::new(0),
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Lines handed to this file so far, and writes that failed.
    pub fn counts(&self) -> (u64, u64) {
        (self.lines.load(Relaxed), self.failed_writes.load(Relaxed))
    }

    /// One line, which `write` appends to the buffer it is given (with its newline): held
    /// on a buffering thread (written at the threshold, the interval or the worker's end),
    /// else written at once.
    pub fn append(self: &Arc<Self>, write: impl FnOnce(&mut Vec<u8>)) {
        self.lines.fetch_add(1, Relaxed);
        let held = BUF.try_with(|b| b.try_borrow().is_ok_and(|b| b.is_some()));
        if held != Ok(true) {
            let mut line = Vec::with_capacity(256);
            write(&mut line);
            self.write_out(&line);
            return;
        }
        let _ = FILES.try_with(|files| {
            let Ok(mut files) = files.try_borrow_mut() else {
                return;
            };
            let i = match files.iter().position(|(f, _)| Arc::ptr_eq(f, self)) {
                Some(i) => i,
                None => {
                    files.push((self.clone(), LineBuf::default()));
                    files.len() - 1
                }
            };
            let b = &mut files[i].1;
            write(&mut b.buf);
            if b.buf.len() >= FLUSH_BYTES {
                let mut sink = Sink(self);
                let _ = b.flush(&mut sink);
            }
        });
    }

    fn write_out(&self, bytes: &[u8]) {
        let r = match &self.out {
            Out::Stdout => io::stdout().lock().write_all(bytes),
            Out::File(f) => (&*f).write_all(bytes),
        };
        if r.is_err() {
            self.failed_writes.fetch_add(1, Relaxed);
        }
    }
}

/// A [`LogFile`] as a writer for [`LineBuf::flush`].
struct Sink<'a>(&'a LogFile);

impl Write for Sink<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_out(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Write this thread's held lines of every [`LogFile`]; forget the files no one else holds
/// any more (a configuration replaced) once their lines are out.
fn flush_files() {
    let _ = FILES.try_with(|files| {
        if let Ok(mut files) = files.try_borrow_mut() {
            for (f, b) in files.iter_mut() {
                let _ = b.flush(&mut Sink(f));
            }
            files.retain(|(f, _)| Arc::strong_count(f) > 1);
        }
    });
}

/// Buffer this thread's access lines until the returned guard drops (which writes them).
pub fn buffer_this_thread() -> Buffering {
    BUF.with_borrow_mut(|b| {
        b.get_or_insert_with(LineBuf::default);
    });
    Buffering(())
}

/// Ends [`buffer_this_thread`]: what is held is written, later lines go out at once.
pub struct Buffering(());

impl Drop for Buffering {
    fn drop(&mut self) {
        if let Ok(Some(mut b)) = BUF.try_with(|b| b.borrow_mut().take()) {
            let _ = b.flush(&mut io::stderr().lock());
        }
        flush_files();
    }
}

/// Write this thread's buffered lines now.
pub fn flush_this_thread() {
    let _ = BUF.try_with(|b| {
        if let Ok(mut b) = b.try_borrow_mut() {
            if let Some(b) = b.as_mut() {
                let _ = b.flush(&mut io::stderr().lock());
            }
        }
    });
    flush_files();
}

/// The worker task that writes its thread's access lines every [`FLUSH_INTERVAL`].
pub async fn flusher() {
    loop {
        monoio::time::sleep(FLUSH_INTERVAL).await;
        flush_this_thread();
    }
}

/// The `tracing` writer: stderr, with `access` lines of INFO and below buffered on threads
/// that buffer them.
pub struct LogWriter;

/// One event's writer (tracing-subscriber writes each formatted line with one `write_all`).
pub struct EventWriter {
    buffered: bool,
}

impl Write for EventWriter {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        self.write_all(line)?;
        Ok(line.len())
    }

    fn write_all(&mut self, line: &[u8]) -> io::Result<()> {
        // stderr is locked only to write: a buffered line below the threshold takes no lock.
        let done = BUF.try_with(|b| {
            let Ok(mut b) = b.try_borrow_mut() else {
                return None;
            };
            let b = b.as_mut()?;
            if self.buffered {
                return Some(if b.push(line) {
                    b.flush(&mut io::stderr().lock())
                } else {
                    Ok(())
                });
            }
            // Any other line: what is held first, so the thread's lines keep their order.
            let mut err = io::stderr().lock();
            let _ = b.flush(&mut err);
            Some(err.write_all(line))
        });
        match done {
            Ok(Some(r)) => r,
            _ => io::stderr().write_all(line),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = EventWriter;

    fn make_writer(&'a self) -> EventWriter {
        EventWriter { buffered: false }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> EventWriter {
        EventWriter {
            buffered: meta.target() == "access" && *meta.level() >= tracing::Level::INFO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_held_until_the_threshold_then_written_whole_and_in_order() {
        let mut b = LineBuf::default();
        let mut sink = Vec::new();
        let line = [b'x'; 1000];
        let mut pushed = 0;
        while pushed + line.len() < FLUSH_BYTES {
            assert!(!b.push(&line), "threshold reached after {pushed} bytes");
            pushed += line.len();
        }
        assert!(!b.push(b"last\n"));
        assert!(b.push(&line), "the threshold");
        b.flush(&mut sink).unwrap();
        assert_eq!(
            sink.len(),
            pushed + 5 + line.len(),
            "all held lines at once"
        );
        assert_eq!(&sink[pushed..pushed + 5], b"last\n");
        assert!(b.buf.is_empty());
        assert!(!b.push(b"a\n"));
        b.flush(&mut sink).unwrap();
        assert!(sink.ends_with(b"a\n"));
        let n = sink.len();
        b.flush(&mut sink).unwrap();
        assert_eq!(sink.len(), n, "an empty flush writes nothing");
    }

    #[test]
    fn only_access_lines_of_info_and_below_are_buffered() {
        /// Records, per event, whether [`LogWriter`] would buffer it.
        struct Probe;
        thread_local! {
            static SEEN: RefCell<Vec<bool>> = const { RefCell::new(Vec::new()) };
        }
        impl tracing::Subscriber for Probe {
            fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
                true
            }
            fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
                tracing::span::Id::from_u64(1)
            }
            fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
            fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
            fn event(&self, e: &tracing::Event<'_>) {
                let w = LogWriter.make_writer_for(e.metadata());
                SEEN.with_borrow_mut(|s| s.push(w.buffered));
            }
            fn enter(&self, _: &tracing::span::Id) {}
            fn exit(&self, _: &tracing::span::Id) {}
        }
        tracing::subscriber::with_default(Probe, || {
            tracing::info!(target: "access", "request");
            tracing::debug!(target: "access", "request");
            tracing::warn!(target: "access", "request");
            tracing::info!(target: "other", "line");
            tracing::info!("line");
        });
        SEEN.with_borrow(|s| assert_eq!(*s, [true, true, false, false, false]));
    }

    #[test]
    fn log_file_lines_are_held_on_buffering_threads_and_written_at_once_elsewhere() {
        let path = std::env::temp_dir().join(format!("logbuf-{}.log", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let f = LogFile::open(&path).unwrap();
        let read = || std::fs::read_to_string(&path).unwrap();
        // This test thread does not buffer: written at once.
        f.append(|b| b.extend_from_slice(b"one\n"));
        assert_eq!(read(), "one\n");
        let f2 = f.clone();
        let p2 = path.clone();
        std::thread::spawn(move || {
            let read = || std::fs::read_to_string(&p2).unwrap();
            let guard = buffer_this_thread();
            f2.append(|b| b.extend_from_slice(b"two\n"));
            f2.append(|b| b.extend_from_slice(b"three\n"));
            assert_eq!(read(), "one\n", "held until a flush");
            flush_this_thread();
            assert_eq!(read(), "one\ntwo\nthree\n");
            f2.append(|b| b.extend_from_slice(&[b'x'; FLUSH_BYTES]));
            assert_eq!(
                read().len(),
                14 + FLUSH_BYTES,
                "the threshold writes at once"
            );
            f2.append(|b| b.extend_from_slice(b"four\n"));
            drop(guard);
            assert!(
                read().ends_with("four\n"),
                "the end of buffering writes the rest"
            );
        })
        .join()
        .unwrap();
        assert_eq!(f.counts(), (5, 0));
        let _ = std::fs::remove_file(&path);
        let missing = std::path::Path::new("/nonexistent-dir/access.log");
        assert!(LogFile::open(missing).is_err());
    }
}
