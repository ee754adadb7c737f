//! Room on the disk for the Raft storage: a full disk refuses ordinary writes cleanly instead
//! of failing inside the Raft log (openraft stops a node whose storage fails).
//!
//! [`DiskGuard`] keeps a preallocated reserve file beside the log (`--state-reserve-mb`). The
//! leader's [`RaftLog`](super::RaftLog) asks it before each write:
//! - while the file system has at least [`MIN_FREE`] bytes free, writes go on;
//! - below that, ordinary writes are refused (the store enters its failed mode, and the APIs
//!   answer 503) while commands that stop work are written after the reserve is given back to
//!   the file system, so a runaway app can still be stopped on a full disk;
//! - once there is room again, the reserve is taken back and writes go on, without a restart.

use mesh_core::state::LogError;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Free space below which ordinary writes are refused.
pub const MIN_FREE: u64 = 1024 * 1024;
/// The reserve file's name in the Raft directory.
pub const RESERVE_FILE: &str = "reserve";

/// Watches the free space under the Raft storage and holds its reserve.
#[derive(Debug)]
pub struct DiskGuard {
    dir: PathBuf,
    capacity: u64,
    /// Whether the reserve is given back (its blocks are free for the log to use).
    released: Mutex<bool>,
}

impl DiskGuard {
    /// Guard the file system of `dir`, with a reserve of `capacity` bytes (0: none) made now
    /// when there is room for it.
    pub fn open(dir: &Path, capacity: u64) -> DiskGuard {
        let g = DiskGuard { dir: dir.to_path_buf(), capacity, released: Mutex::new(true) };
        if let Err(e) = g.take_reserve() {
            tracing::warn!(error = %e, "no room for the state reserve yet; it is made when there is");
        }
        g
    }

    /// Bytes free to this process under the guarded directory.
    pub fn free(&self) -> Result<u64, LogError> {
        let vfs = rustix::fs::statvfs(&self.dir)
            .map_err(|e| LogError::Store(format!("free space of {}: {e}", self.dir.display())))?;
        Ok(vfs.f_bavail.saturating_mul(vfs.f_frsize))
    }

    /// Whether an ordinary write may go to the log now.
    pub fn check(&self) -> Result<(), LogError> {
        let free = self.free()?;
        if free < MIN_FREE {
            return Err(LogError::Store(format!(
                "no space left on device: {free} bytes free in {}, {MIN_FREE} needed",
                self.dir.display()
            )));
        }
        Ok(())
    }

    /// Give the reserve back to the file system, so a write that stops work has room.
    pub fn release(&self) {
        let mut released = self.released.lock().unwrap_or_else(|p| p.into_inner());
        if !*released {
            let path = self.dir.join(RESERVE_FILE);
            match std::fs::OpenOptions::new().write(true).open(&path).and_then(|f| f.set_len(0)) {
                Ok(()) => tracing::warn!(bytes = self.capacity, "state reserve released for commands that stop tasks"),
                Err(e) => tracing::warn!(error = %e, "cannot release the state reserve"),
            }
            *released = true;
        }
    }

    /// After a refusal: whether there is room again (the reserve is taken back first).
    pub fn recover(&self) -> Result<(), LogError> {
        self.take_reserve()?;
        self.check()
    }

    /// Make the reserve when it is not there and the disk has room for it and [`MIN_FREE`].
    fn take_reserve(&self) -> Result<(), LogError> {
        let mut released = self.released.lock().unwrap_or_else(|p| p.into_inner());
        if !*released || self.capacity == 0 {
            *released = false;
            return Ok(());
        }
        let free = self.free()?;
        let need = self.capacity + MIN_FREE;
        if free < need {
            return Err(LogError::Store(format!(
                "no space left on device: {free} bytes free in {}, {need} needed with the reserve",
                self.dir.display()
            )));
        }
        let path = self.dir.join(RESERVE_FILE);
        preallocate(&path, self.capacity).map_err(|e| LogError::Store(format!("reserve {}: {e}", path.display())))?;
        *released = false;
        Ok(())
    }
}

/// Write `len` real zeros to `path` (not a sparse file: the blocks must exist now) durably.
fn preallocate(path: &Path, len: u64) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    let zeros = vec![0u8; 64 * 1024];
    let mut left = len;
    let written = (|| {
        while left > 0 {
            let n = left.min(zeros.len() as u64) as usize;
            f.write_all(&zeros[..n])?;
            left -= n as u64;
        }
        f.sync_all()
    })();
    if written.is_err() {
        let _ = f.set_len(0);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_is_made_released_and_taken_back() {
        let dir = tempfile::tempdir().unwrap();
        let g = DiskGuard::open(dir.path(), 256 * 1024);
        let path = dir.path().join(RESERVE_FILE);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 256 * 1024);
        g.check().unwrap();
        g.release();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        g.recover().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 256 * 1024);
    }

    #[test]
    fn no_reserve_when_capacity_is_zero() {
        let dir = tempfile::tempdir().unwrap();
        let g = DiskGuard::open(dir.path(), 0);
        assert!(!dir.path().join(RESERVE_FILE).exists());
        g.release();
        g.recover().unwrap();
    }
}
