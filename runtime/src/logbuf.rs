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

use std::cell::RefCell;
use std::io::{self, Write};
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
}
