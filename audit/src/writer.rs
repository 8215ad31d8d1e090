//! The one writer: audit events to JSON lines, off the data path.

use std::io::Write;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::AuditEvent;

/// How long the writer rests after a batch. Events queued meanwhile are written in one
/// go, and senders wake the writer at most once per rest instead of once per event.
const REST: Duration = Duration::from_millis(10);

/// A batch is written out when it reaches this many bytes.
const BATCH_BYTES: usize = 64 * 1024;

/// Writes events as JSON lines to `out` until every sender is gone, flushing after each
/// batch, and hands each line (without its newline) to `on_line` after it is written
/// (the agent's event stream). Blocking: run it on a blocking thread
/// (`tokio::task::spawn_blocking`). While `out` blocks (a slow consumer), the queue
/// fills and senders drop and count instead of waiting or growing memory.
pub fn write_lines(
    mut rx: mpsc::Receiver<AuditEvent>,
    mut out: impl Write,
    mut on_line: impl FnMut(&str),
) {
    let mut batch = Vec::with_capacity(BATCH_BYTES);
    let mut lines: Vec<(usize, usize)> = Vec::new();
    let mut warned = false;
    while let Some(first) = rx.blocking_recv() {
        let mut next = Some(first);
        while let Some(e) = next.take() {
            let start = batch.len();
            match serde_json::to_writer(&mut batch, &e) {
                Ok(()) => {
                    lines.push((start, batch.len()));
                    batch.push(b'\n');
                }
                Err(err) => {
                    batch.truncate(start);
                    tracing::warn!(error = %err, kind = e.kind(), "audit event not serialisable; left out");
                }
            }
            if batch.len() < BATCH_BYTES {
                next = rx.try_recv().ok();
            }
        }
        match out.write_all(&batch).and_then(|()| out.flush()) {
            Ok(()) => warned = false,
            Err(e) if !warned => {
                warned = true;
                tracing::warn!(error = %e, "audit log write failed (said once until a write succeeds)");
            }
            Err(_) => {}
        }
        for &(start, end) in &lines {
            if let Ok(line) = std::str::from_utf8(&batch[start..end]) {
                on_line(line);
            }
        }
        batch.clear();
        lines.clear();
        std::thread::sleep(REST);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Condvar, Mutex};

    use super::*;
    use crate::{dns, http, AuditLog, DroppedCounter};

    #[test]
    fn lines_carry_their_type_and_reach_the_stream_in_order() {
        let (log, rx) = AuditLog::channel(16, DroppedCounter::new());
        log.record(http::tests::record());
        log.record(dns::tests::record());
        drop(log);
        let mut out = Vec::new();
        let mut seen = Vec::new();
        write_lines(rx, &mut out, |l| seen.push(l.to_string()));
        let text = String::from_utf8(out).unwrap();
        let written: Vec<&str> = text.lines().collect();
        assert_eq!(written, seen);
        let kinds: Vec<String> = written
            .iter()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["type"].to_string())
            .collect();
        assert_eq!(kinds, [r#""http""#, r#""dns""#]);
        let back: AuditEvent = serde_json::from_str(written[1]).unwrap();
        assert_eq!(back, AuditEvent::Dns(dns::tests::record()));
    }

    /// An output that takes nothing until it is let go, like a pipe nobody reads.
    struct Stuck(Arc<(Mutex<bool>, Condvar)>);

    impl Write for Stuck {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let (lock, cv) = &*self.0;
            let mut go = lock.lock().unwrap();
            while !*go {
                go = cv.wait(go).unwrap();
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stuck_consumer_bounds_the_queue_and_counts_every_drop() {
        const CAPACITY: usize = 64;
        const SENT: u64 = 100_000;
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let (log, rx) = AuditLog::channel(CAPACITY, DroppedCounter::new());
        let (written_tx, written_rx) = std::sync::mpsc::channel();
        let writer = {
            let gate = gate.clone();
            std::thread::spawn(move || {
                let mut n = 0u64;
                write_lines(rx, Stuck(gate), |_| n += 1);
                written_tx.send(n).unwrap();
            })
        };
        for _ in 0..SENT {
            log.record(http::tests::record());
        }
        let dropped = log.dropped().get("http");
        // Memory stays bounded: the writer holds at most one batch (records here are
        // over 200 bytes), the queue at most its capacity; everything else was counted.
        let kept = SENT - dropped;
        assert!(
            kept <= CAPACITY as u64 + 1 + (BATCH_BYTES / 200) as u64,
            "kept {kept}"
        );
        // Let the consumer go: everything not dropped is written, nothing twice.
        {
            let (lock, cv) = &*gate;
            *lock.lock().unwrap() = true;
            cv.notify_all();
        }
        drop(log);
        let written = written_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the writer ends once the senders are gone");
        writer.join().unwrap();
        assert_eq!(written + dropped, SENT);
    }
}
