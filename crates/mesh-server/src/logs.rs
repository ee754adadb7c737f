//! The process's log lines for Consul's `/v1/agent/monitor`: [`Tee`] writes each formatted
//! line to stderr and offers it to the subscribers of [`subscribe`] (a bounded broadcast: a
//! monitor that falls behind misses lines, never slows logging).

use std::io::Write;
use std::sync::{Arc, OnceLock};
use tokio::sync::broadcast;

/// How many lines a slow monitor may fall behind before it misses some.
const BACKLOG: usize = 1024;

fn channel() -> &'static broadcast::Sender<Arc<str>> {
    static TX: OnceLock<broadcast::Sender<Arc<str>>> = OnceLock::new();
    TX.get_or_init(|| broadcast::channel(BACKLOG).0)
}

/// Receive the log lines written from now on (through [`Tee`]).
pub fn subscribe() -> broadcast::Receiver<Arc<str>> {
    channel().subscribe()
}

/// A `tracing_subscriber` writer: stderr, and the monitors.
#[derive(Clone, Copy, Debug, Default)]
pub struct Tee;

/// One event's writer (see [`Tee`]).
#[derive(Debug)]
pub struct TeeWriter;

impl Write for TeeWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let tx = channel();
        if tx.receiver_count() > 0 {
            let _ = tx.send(Arc::from(String::from_utf8_lossy(buf).as_ref()));
        }
        std::io::stderr().write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Tee {
    type Writer = TeeWriter;
    fn make_writer(&'a self) -> TeeWriter {
        TeeWriter
    }
}

/// The level of a formatted line (`TRACE` 0 .. `ERROR` 4), if it names one.
pub fn line_level(line: &str) -> Option<u8> {
    let plain = strip_ansi(line);
    plain.split_whitespace().take(3).find_map(level_rank)
}

/// The rank of a level name, case-insensitive (`warn` and `warning` alike).
pub fn level_rank(name: &str) -> Option<u8> {
    match name.to_ascii_lowercase().as_str() {
        "trace" => Some(0),
        "debug" => Some(1),
        "info" => Some(2),
        "warn" | "warning" => Some(3),
        "error" | "err" => Some(4),
        _ => None,
    }
}

/// The line without terminal colour codes.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_read_from_formatted_lines() {
        assert_eq!(line_level("2026-12-04T17:00:00.000Z  INFO mesh: ready"), Some(2));
        assert_eq!(line_level("\u{1b}[2m2026\u{1b}[0m \u{1b}[33m WARN\u{1b}[0m x: y"), Some(3));
        assert_eq!(line_level("no level here at all"), None);
        assert_eq!(level_rank("Warning"), Some(3));
        assert_eq!(level_rank("loud"), None);
    }
}
