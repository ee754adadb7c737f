//! Garbage collection of the sandboxes of ended tasks (Mesos' `--gc_delay`,
//! `--disk_watch_interval` and `--gc_disk_headroom`).
//!
//! Every `interval` the collector reads how full the filesystem holding the sandboxes is
//! (`usage`, 0.0 to 1.0) and removes every sandbox of an ended task that has been left alone
//! for longer than
//!
//! ```text
//! delay * max(0, 1 - headroom - usage)
//! ```
//!
//! as Mesos' agent does: a week by default, shrinking as the disk fills, down to "at once" when
//! less than `headroom` of the disk is free. Which sandboxes belong to ended tasks, and since
//! when, is the runtime's call ([`spawn`]'s `ended_since`): sandboxes of running (or
//! re-adoptable) tasks are never touched.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
use tokio::task::AbortHandle;

/// When sandboxes of ended tasks are removed; see the [module docs](self).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GcPolicy {
    /// How long an ended task's sandbox is kept while the disk has room.
    pub delay: Duration,
    /// The fraction of the disk to keep free (0.0 to 1.0).
    pub headroom: f64,
    /// How often the disk is checked and sandboxes are collected.
    pub interval: Duration,
}

impl Default for GcPolicy {
    /// Mesos' defaults: one week, 10 % headroom, every minute.
    fn default() -> Self {
        Self { delay: Duration::from_secs(7 * 24 * 3600), headroom: 0.1, interval: Duration::from_secs(60) }
    }
}

impl GcPolicy {
    /// The delay that applies when `usage` of the disk is in use.
    pub fn effective_delay(&self, usage: f64) -> Duration {
        let factor = (1.0 - self.headroom - usage).clamp(0.0, 1.0);
        self.delay.mul_f64(if factor.is_finite() { factor } else { 0.0 })
    }
}

/// Removes every directory directly under `work_dir` for which `ended_since` gives a time at
/// least `delay` ago. Returns the removed paths.
pub fn collect(work_dir: &Path, delay: Duration, ended_since: &dyn Fn(&Path) -> Option<SystemTime>) -> Vec<PathBuf> {
    let now = SystemTime::now();
    let mut removed = Vec::new();
    let Ok(entries) = fs::read_dir(work_dir) else { return removed };
    for entry in entries.flatten() {
        let dir = entry.path();
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let Some(since) = ended_since(&dir) else { continue };
        if now.duration_since(since).unwrap_or_default() < delay {
            continue;
        }
        match fs::remove_dir_all(&dir) {
            Ok(()) => removed.push(dir),
            Err(e) => tracing::warn!("sandbox gc: cannot remove {}: {e}", dir.display()),
        }
    }
    removed
}

/// The last change of a directory's entries (its mtime: a file created, renamed or removed),
/// a good "left alone since" for a sandbox whose task has ended.
pub fn dir_changed(dir: &Path) -> Option<SystemTime> {
    fs::metadata(dir).and_then(|m| m.modified()).ok()
}

/// Runs the collector every `policy.interval` on the blocking pool until the returned handle
/// is aborted (or `ended_since` is dropped with it). Must be called inside a tokio runtime.
pub fn spawn(
    work_dir: PathBuf,
    policy: GcPolicy,
    ended_since: impl Fn(&Path) -> Option<SystemTime> + Send + Sync + 'static,
) -> AbortHandle {
    let ended_since = std::sync::Arc::new(ended_since);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(policy.interval.max(Duration::from_millis(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let (dir, ended) = (work_dir.clone(), ended_since.clone());
            let pass = tokio::task::spawn_blocking(move || {
                let usage = super::disk::filesystem_usage(&dir).unwrap_or(0.0);
                let delay = policy.effective_delay(usage);
                (usage, delay, collect(&dir, delay, &*ended))
            });
            if let Ok((usage, delay, removed)) = pass.await {
                for d in removed {
                    tracing::info!(disk_usage = usage, ?delay, "sandbox gc: removed {}", d.display());
                }
            }
        }
    })
    .abort_handle()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_shrinks_as_the_disk_fills() {
        let p = GcPolicy { delay: Duration::from_secs(100), headroom: 0.1, interval: Duration::from_secs(1) };
        assert_eq!(p.effective_delay(0.0), Duration::from_secs(90));
        assert_eq!(p.effective_delay(0.4), Duration::from_secs(50));
        assert_eq!(p.effective_delay(0.9), Duration::ZERO);
        assert_eq!(p.effective_delay(0.99), Duration::ZERO);
        assert_eq!(GcPolicy { headroom: 0.0, ..p }.effective_delay(0.0), Duration::from_secs(100));
    }

    #[test]
    fn collect_removes_only_old_ended_sandboxes() {
        let dir = tempfile::tempdir().unwrap();
        let w = dir.path();
        for name in ["old-ended", "new-ended", "running"] {
            fs::create_dir(w.join(name)).unwrap();
            fs::write(w.join(name).join("stdout"), "x").unwrap();
        }
        fs::write(w.join("a-file"), "not a sandbox").unwrap();
        let hour_ago = SystemTime::now() - Duration::from_secs(3600);
        let ended = |d: &Path| match d.file_name()?.to_str()? {
            "old-ended" => Some(hour_ago),
            "new-ended" => Some(SystemTime::now()),
            _ => None,
        };
        let removed = collect(w, Duration::from_secs(60), &ended);
        assert_eq!(removed, vec![w.join("old-ended")]);
        assert!(w.join("new-ended").exists() && w.join("running").exists() && w.join("a-file").exists());
        // With a zero delay (disk full) every ended sandbox goes, the running one stays.
        collect(w, Duration::ZERO, &ended);
        assert!(!w.join("new-ended").exists());
        assert!(w.join("running/stdout").exists());
    }
}
