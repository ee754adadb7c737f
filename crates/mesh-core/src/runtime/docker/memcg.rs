//! The kernel's own record of OOM kills in a container's memory cgroup (cgroup v1), so an OOM
//! kill is reported even when the engine never says so.
//!
//! The engine learns of an OOM kill from containerd's shim, which listens on exactly this
//! notification (an eventfd registered for `memory.oom_control`) and drops it when it gets to
//! it only after the cgroup was removed (containerd 1.6 `pkg/oom/v1`: `cg.State() == Deleted`).
//! On a loaded machine the exit overtakes it: the container is deleted, `die` (137) comes, and
//! neither the `oom` event nor `State.OOMKilled` ever does. So the runtime registers its own
//! eventfd on the container's memory cgroup as it starts and keeps it; the kernel
//! signals it synchronously in the charging task *before* the OOM killer kills, and once more
//! when the cgroup is removed. Kernel counters survive the cgroup, engine events do not, so:
//!
//! - a notification read while the cgroup still exists is an OOM (removal only notifies after
//!   `rmdir`), and then `memory.oom_control` (`under_oom`, `oom_kill`) answers directly;
//! - after the exit with the cgroup gone: 0 notifications is no OOM (it would have come before
//!   the kill), 2 or more is an OOM plus the removal, and exactly 1 is either an OOM whose
//!   removal notification is still on its way (an RCU grace period and a kernel work item:
//!   milliseconds) or the removal alone: wait a bounded while for a second one.
//!
//! Registering needs the host's cgroup v1 memory hierarchy mounted here and the right to write
//! `cgroup.event_control` (root); without them (cgroup v2, the agent in a container, no root)
//! [`OomWatch::register`] returns `None` and the engine's signals are all there is.

use rustix::event::{EventfdFlags, eventfd};
use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

/// How often [`OomWatch::oom_killed`] looks for the removal notification.
const POLL: Duration = Duration::from_millis(20);

/// An eventfd the kernel signals on OOM in (and on removal of) one container's memory cgroup.
pub(super) struct OomWatch {
    efd: OwnedFd,
    dir: PathBuf,
    /// OOM already under way or done when the watch was registered (`under_oom + oom_kill`):
    /// a notification sent before the registration is not on the eventfd.
    before: u64,
}

impl OomWatch {
    /// Watches the memory cgroup of container `container` (the full id), where Docker puts it:
    /// `<memory mount>/docker/<id>` (the `cgroupfs` driver) or
    /// `<memory mount>/system.slice/docker-<id>.scope` (`systemd`). `None` when it is not there
    /// (not created yet, already removed, another cgroup parent) or cannot be watched.
    pub(super) fn register(container: &str) -> Option<Self> {
        if container.is_empty() || container.contains('/') {
            return None;
        }
        let mount = memory_mount().as_deref()?;
        let dir = [format!("docker/{container}"), format!("system.slice/docker-{container}.scope")]
            .into_iter()
            .map(|rel| Path::new(&mount).join(rel))
            .find(|d| d.is_dir())?;
        let control = fs::File::open(dir.join("memory.oom_control")).ok()?;
        let efd = eventfd(0, EventfdFlags::NONBLOCK | EventfdFlags::CLOEXEC).ok()?;
        // The kernel keeps its own references; `control` can be closed afterwards.
        fs::write(dir.join("cgroup.event_control"), format!("{} {}", efd.as_raw_fd(), control.as_raw_fd())).ok()?;
        // Read after registering: an OOM in between is seen here, on the eventfd, or both.
        let before = oom_state(&dir)?;
        Some(Self { efd, dir, before })
    }

    /// Whether the kernel OOM-killed in the cgroup. Call once the container has exited;
    /// waits at most `removal_wait` (only when one notification came and the cgroup is gone).
    pub(super) async fn oom_killed(&self, removal_wait: Duration) -> bool {
        if self.before > 0 {
            return true;
        }
        let notified = self.take();
        // Read after `take`: if the cgroup still exists, no removal was counted.
        if let Some(state) = oom_state(&self.dir) {
            return state > 0 || notified > 0;
        }
        match notified {
            0 => false,
            1 => {
                let deadline = tokio::time::Instant::now() + removal_wait;
                loop {
                    if self.take() > 0 {
                        break true;
                    }
                    if tokio::time::Instant::now() >= deadline {
                        break false;
                    }
                    tokio::time::sleep(POLL).await;
                }
            }
            _ => true,
        }
    }

    /// The notifications counted since the last read (the eventfd resets on read; a
    /// non-blocking read of a zero counter fails with `EAGAIN`).
    fn take(&self) -> u64 {
        let mut buf = [0u8; 8];
        match rustix::io::read(&self.efd, &mut buf) {
            Ok(8) => u64::from_ne_bytes(buf),
            _ => 0,
        }
    }
}

/// `under_oom + oom_kill` of the cgroup's `memory.oom_control`; `None` once it is gone.
/// (`under_oom` is set before the notification and cleared after `oom_kill` counts the kill,
/// so an OOM under way when this is read is never missed.)
fn oom_state(dir: &Path) -> Option<u64> {
    let text = fs::read_to_string(dir.join("memory.oom_control")).ok()?;
    Some(
        text.lines()
            .filter_map(|l| l.split_once(' '))
            .filter(|(k, _)| matches!(*k, "under_oom" | "oom_kill"))
            .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
            .sum(),
    )
}

/// The mount point of the cgroup v1 memory hierarchy, if the whole hierarchy is mounted (root
/// `/`; inside a cgroup namespace or a container the engine's cgroups are not where expected).
/// Looked up once.
fn memory_mount() -> &'static Option<String> {
    static MOUNT: OnceLock<Option<String>> = OnceLock::new();
    MOUNT.get_or_init(find_memory_mount)
}

fn find_memory_mount() -> Option<String> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    // `<id> <parent> <maj:min> <root> <mount point> <options> [optional...] - <type> <source> <super options>`
    mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let mut r = right.split_whitespace();
        let (fstype, _source, opts) = (r.next()?, r.next()?, r.next()?);
        if fstype != "cgroup" || !opts.split(',').any(|o| o == "memory") {
            return None;
        }
        let f: Vec<&str> = left.split_whitespace().collect();
        (*f.get(3)? == "/").then(|| f.get(4).map(|m| (*m).to_owned()))?
    })
}
