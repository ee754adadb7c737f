//! An agent's outbox: what it observed (status updates, health and check results, service
//! sets), numbered and kept on disk until a server acknowledges it, so nothing is lost when the
//! server is away or the agent restarts, and a re-sent report is recognised by its number.
//!
//! The file is a log of JSON lines: `{"Item":[seq, msg]}` appended (and synced) as reports
//! come, `{"Acked":seq}` as acknowledgements do, and `{"Next":seq}` at the head after a
//! rewrite. A torn last line (a crash mid-write) is ignored.

use mesh_core::proto::ToControl;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use tracing::warn;

/// Reports kept at most; beyond it the oldest go (with a warning).
pub const MAX_PENDING: usize = 100_000;

#[derive(Serialize, Deserialize)]
enum Line {
    Next(u64),
    // Boxed: a registration is much larger than the other lines (serialized the same).
    Item(u64, Box<ToControl>),
    Acked(u64),
}

/// The outbox. Without a path (tests, `mesh dev`) it lives in memory only.
pub struct Outbox {
    path: Option<PathBuf>,
    file: Option<std::fs::File>,
    pending: VecDeque<(u64, ToControl)>,
    next: u64,
    /// Lines in the file that are no longer needed (acked items and ack lines).
    dead: usize,
}

impl Outbox {
    /// An outbox in memory only.
    pub fn in_memory() -> Outbox {
        Outbox { path: None, file: None, pending: VecDeque::new(), next: 1, dead: 0 }
    }

    /// Open (or create) the outbox at `path`, with what an earlier run left unacknowledged.
    pub fn open(path: &Path) -> std::io::Result<Outbox> {
        let mut pending = VecDeque::new();
        let mut next = 1;
        let mut acked = 0;
        let mut lines = 0;
        if let Ok(f) = std::fs::File::open(path) {
            for line in std::io::BufReader::new(f).lines() {
                let Ok(line) = line else { break };
                let Ok(l) = serde_json::from_str::<Line>(&line) else { break };
                lines += 1;
                match l {
                    Line::Next(n) => next = next.max(n),
                    Line::Item(seq, msg) => {
                        next = next.max(seq + 1);
                        pending.push_back((seq, *msg));
                    }
                    Line::Acked(upto) => acked = acked.max(upto),
                }
            }
        }
        pending.retain(|(seq, _)| *seq > acked);
        let mut o = Outbox { path: Some(path.to_owned()), file: None, pending, next, dead: 0 };
        // Start from a clean file: what is pending, and the next number.
        o.rewrite()?;
        if lines > 0 {
            tracing::info!(pending = o.pending.len(), next = o.next, "outbox: reports from the last run");
        }
        Ok(o)
    }

    /// Append reports (durably, when on disk); returns their numbers.
    pub fn push(&mut self, msgs: Vec<ToControl>) -> std::io::Result<()> {
        let mut buf = Vec::new();
        for msg in msgs {
            let seq = self.next;
            self.next += 1;
            if self.file.is_some() {
                serde_json::to_writer(&mut buf, &Line::Item(seq, Box::new(msg.clone())))
                    .map_err(std::io::Error::other)?;
                buf.push(b'\n');
            }
            self.pending.push_back((seq, msg));
        }
        while self.pending.len() > MAX_PENDING {
            if let Some((seq, _)) = self.pending.pop_front() {
                warn!(seq, "outbox full: the oldest report is dropped");
                self.dead += 1;
            }
        }
        if let Some(f) = &mut self.file {
            f.write_all(&buf)?;
            f.sync_data()?;
        }
        Ok(())
    }

    /// The server recorded every report up to `upto`.
    pub fn ack(&mut self, upto: u64) {
        let before = self.pending.len();
        while self.pending.front().is_some_and(|(seq, _)| *seq <= upto) {
            self.pending.pop_front();
        }
        let acked = before - self.pending.len();
        if acked == 0 {
            return;
        }
        self.dead += acked + 1;
        if let Some(f) = &mut self.file {
            let mut line = serde_json::to_vec(&Line::Acked(upto)).unwrap_or_default();
            line.push(b'\n');
            // Not synced: a lost ack only means the report is sent again.
            if let Err(e) = f.write_all(&line) {
                warn!(error = %e, "outbox: cannot record an acknowledgement");
            }
        }
        if self.dead > 1024
            && self.dead > 2 * self.pending.len()
            && let Err(e) = self.rewrite()
        {
            warn!(error = %e, "outbox: cannot rewrite the file");
        }
    }

    /// Forget pending reports that `stale` says no longer hold (e.g. the goodbye of an earlier
    /// run, once the agent is back). They count as acknowledged.
    pub fn forget(&mut self, stale: impl Fn(&ToControl) -> bool) {
        let before = self.pending.len();
        self.pending.retain(|(_, m)| !stale(m));
        if self.pending.len() != before {
            self.dead += before - self.pending.len();
            if let Err(e) = self.rewrite() {
                warn!(error = %e, "outbox: cannot rewrite the file");
            }
        }
    }

    /// Up to `max` of the oldest pending reports.
    pub fn batch(&self, max: usize) -> Vec<(u64, ToControl)> {
        self.pending.iter().take(max).cloned().collect()
    }

    /// Reports not acknowledged yet.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether every report is acknowledged.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    fn rewrite(&mut self) -> std::io::Result<()> {
        let Some(path) = self.path.clone() else { return Ok(()) };
        let tmp = path.with_extension("tmp");
        {
            let mut w = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
            serde_json::to_writer(&mut w, &Line::Next(self.next)).map_err(std::io::Error::other)?;
            w.write_all(b"\n")?;
            for (seq, msg) in &self.pending {
                serde_json::to_writer(&mut w, &Line::Item(*seq, Box::new(msg.clone())))
                    .map_err(std::io::Error::other)?;
                w.write_all(b"\n")?;
            }
            w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        }
        std::fs::rename(&tmp, &path)?;
        if let Some(dir) = path.parent() {
            let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
        }
        self.file = Some(std::fs::OpenOptions::new().append(true).open(&path)?);
        self.dead = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::model::{AgentId, TaskId};
    use mesh_core::proto::{StatusUpdate, TaskState};

    fn status(i: u64) -> ToControl {
        ToControl::Status(StatusUpdate {
            uuid: format!("u{i}"),
            task_id: TaskId::from(format!("t{i}").as_str()),
            agent_id: AgentId::from("a"),
            state: TaskState::Running,
            message: String::new(),
            at: i,
        })
    }

    #[test]
    fn unacknowledged_reports_survive_a_restart_and_numbers_never_repeat() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.jsonl");
        let mut o = Outbox::open(&path).unwrap();
        o.push((1..=5).map(status).collect()).unwrap();
        o.ack(3);
        drop(o);
        let mut o = Outbox::open(&path).unwrap();
        assert_eq!(o.batch(10).iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![4, 5]);
        o.ack(5);
        drop(o);
        // Everything acked: the next number still moves on (the server remembers 5).
        let mut o = Outbox::open(&path).unwrap();
        assert!(o.is_empty());
        o.push(vec![status(6)]).unwrap();
        assert_eq!(o.batch(10)[0].0, 6);
        // A torn last line is ignored.
        drop(o);
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"{\"Item\":[7,").unwrap();
        let o = Outbox::open(&path).unwrap();
        assert_eq!(o.batch(10).iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![6]);
    }

    #[test]
    fn the_file_is_rewritten_once_mostly_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.jsonl");
        let mut o = Outbox::open(&path).unwrap();
        for i in 0..3000 {
            o.push(vec![status(i)]).unwrap();
            o.ack(i + 1);
        }
        let lines = std::fs::read_to_string(&path).unwrap().lines().count();
        assert!(lines < 2100, "{lines} lines");
        assert!(o.is_empty());
    }
}
