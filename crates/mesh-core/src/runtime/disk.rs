//! Disk usage of tasks: the sandbox walk that enforces an app's `disk` (Mesos' `disk/du`
//! isolator) and the filesystem usage that drives sandbox GC ([`super::gc`]).
//!
//! A task's usage is what `du -s` reports for its sandbox: allocated blocks (so a sparse file
//! counts only what it really holds), hard links counted once, symbolic links not followed, and
//! other filesystems mounted inside the sandbox not entered. It is measured every
//! `interval`; a task found above its `disk` MiB is killed by its runtime and ends `Failed` with
//! [`exceeded_message`]. Between two measurements a task can write more than its limit: this
//! bounds how much disk a task keeps, not how fast it writes (stdout and stderr are bounded by
//! rotation, see [`super::logger`]). `disk` 0 (Marathon's default) means no limit.

use std::collections::HashSet;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::watch;

const MIB: f64 = 1024.0 * 1024.0;

/// Bytes allocated on disk under `dir` (like `du -s -B1`). Entries that vanish during the walk
/// are skipped; an unreadable `dir` itself is an error.
pub fn usage(dir: &Path) -> io::Result<u64> {
    let mut seen = HashSet::new();
    let mut total = 0u64;
    for entry in walkdir::WalkDir::new(dir).follow_links(false).same_file_system(true) {
        let entry = match entry {
            Ok(e) => e,
            Err(e) if e.depth() == 0 => return Err(e.into()),
            Err(_) => continue,
        };
        let Ok(meta) = entry.metadata() else { continue };
        if meta.nlink() > 1 && !meta.is_dir() && !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        total += meta.blocks() * 512;
    }
    Ok(total)
}

/// The fraction (0.0 to 1.0) of the filesystem holding `path` that is in use, as `df` shows
/// it: used / (used + available to unprivileged users), so blocks reserved for root do not
/// make a full disk look roomy.
pub fn filesystem_usage(path: &Path) -> io::Result<f64> {
    let st = rustix::fs::statvfs(path)?;
    let used = st.f_blocks.saturating_sub(st.f_bfree) as f64;
    let room = used + st.f_bavail as f64;
    Ok(if room > 0.0 { used / room } else { 0.0 })
}

/// The `Failed` message of a task whose sandbox holds `used` bytes, above its `limit_mib`.
pub fn exceeded_message(limit_mib: f64, used: u64) -> String {
    format!("disk limit of {limit_mib} MiB exceeded (used {:.1} MiB)", used as f64 / MIB)
}

/// Measures `dir` every `interval` until `done` becomes true (returns `None`) or the usage is
/// above `limit_mib` (returns the [`exceeded_message`]). The walk runs on the blocking pool.
pub async fn watch(
    dir: PathBuf,
    limit_mib: f64,
    interval: Duration,
    mut done: watch::Receiver<bool>,
) -> Option<String> {
    let limit = (limit_mib * MIB) as u64;
    loop {
        tokio::select! {
            _ = done.wait_for(|d| *d) => return None,
            () = tokio::time::sleep(interval) => {}
        }
        let d = dir.clone();
        let used = match tokio::task::spawn_blocking(move || usage(&d)).await {
            Ok(Ok(used)) => used,
            Ok(Err(e)) => {
                tracing::debug!("disk usage of {}: {e}", dir.display());
                continue;
            }
            Err(_) => continue,
        };
        if used > limit && !*done.borrow() {
            return Some(exceeded_message(limit_mib, used));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn usage_counts_blocks_once_per_inode_and_skips_holes() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let empty = usage(d).unwrap();
        fs::write(d.join("a"), vec![1u8; 1 << 20]).unwrap();
        fs::create_dir(d.join("sub")).unwrap();
        fs::write(d.join("sub/b"), vec![2u8; 1 << 20]).unwrap();
        let two = usage(d).unwrap() - empty;
        assert!((2 << 20..(2 << 20) + 64 * 1024).contains(&two), "{two}");
        // A hard link adds nothing; a sparse file adds (almost) nothing; a symlink is not followed.
        fs::hard_link(d.join("a"), d.join("a-link")).unwrap();
        fs::File::create(d.join("sparse")).unwrap().set_len(1 << 30).unwrap();
        std::os::unix::fs::symlink("/usr", d.join("usr-link")).unwrap();
        let after = usage(d).unwrap() - empty;
        assert!(after < two + 64 * 1024, "{after} vs {two}");
        assert!(usage(&d.join("missing")).is_err());
    }

    #[test]
    fn filesystem_usage_is_a_fraction() {
        let u = filesystem_usage(Path::new("/")).unwrap();
        assert!((0.0..=1.0).contains(&u), "{u}");
    }

    #[test]
    fn message_names_limit_and_usage() {
        assert_eq!(exceeded_message(5.0, 12 << 20), "disk limit of 5 MiB exceeded (used 12.0 MiB)");
    }

    #[tokio::test]
    async fn watch_reports_once_over_the_limit_and_stops_when_done() {
        let dir = tempfile::tempdir().unwrap();
        let (done_tx, done_rx) = watch::channel(false);
        let w = tokio::spawn(watch(dir.path().to_owned(), 1.0, Duration::from_millis(20), done_rx.clone()));
        fs::write(dir.path().join("big"), vec![0u8; 3 << 20]).unwrap();
        let msg = tokio::time::timeout(Duration::from_secs(10), w).await.unwrap().unwrap();
        assert!(msg.unwrap().starts_with("disk limit of 1 MiB exceeded (used 3."));
        let w = tokio::spawn(watch(dir.path().to_owned(), 100.0, Duration::from_millis(20), done_rx));
        done_tx.send_replace(true);
        assert_eq!(tokio::time::timeout(Duration::from_secs(10), w).await.unwrap().unwrap(), None);
    }
}
