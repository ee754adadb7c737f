//! Task output: where a task's stdout and stderr go, and how they are kept bounded.
//!
//! Two modes, as Mesos has two container loggers ([`TaskLogs`]):
//!
//! - [`TaskLogs::Sandbox`] (Mesos' `SandboxContainerLogger`): the task writes straight into
//!   `<sandbox>/stdout` and `<sandbox>/stderr`. Nothing bounds them.
//! - [`TaskLogs::Rotate`] (Mesos' `LogrotateContainerLogger`): the task writes into a pipe whose
//!   read end belongs to a small logger *process* per stream, `<program> logger --file
//!   <sandbox>/stdout --max-size N --max-files K` (the `mesh` binary re-executing itself; see
//!   [`run`]). The logger appends to `stdout`; when the next write would take it past `max_size`
//!   bytes it renames `stdout.K-1` to `stdout.K` ... `stdout` to `stdout.1` (dropping the old
//!   `stdout.K`) and starts a new `stdout`. So a stream never takes more than
//!   `(K + 1) * max_size` bytes on disk, however much the task writes, and `stdout` always holds
//!   the newest output (the file name readers of a Mesos sandbox expect). A cut is made after
//!   the last newline that fits when there is one, so lines are rarely split.
//!
//! # Why a separate process
//!
//! The pipe's read end must outlive the agent: tasks keep running when `mesh` is restarted or
//! SIGKILLed and are re-adopted by the next `mesh`. If `mesh` itself read the pipe, its death
//! would leave the task writing into a pipe without a reader (SIGPIPE on its next write), or, if
//! the task also held the read end, into a full pipe that blocks it forever. A logger process
//! per stream, in its own process group (so neither a terminal's Ctrl-C nor a kill of the
//! task's group reaches it), keeps reading and rotating whatever happens to `mesh`; it exits
//! when the last writer has closed the pipe, i.e. when the task and everything it started have
//! ended. A new `mesh` needs nothing from the old loggers: it does not re-attach to them.
//!
//! A logger that cannot write (disk full, sandbox removed) keeps reading and drops what it
//! cannot write, so a task is never blocked by its logger.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;
use tokio::task::JoinHandle;

/// Size of the logger's read buffer.
const BUF: usize = 64 * 1024;

/// How a task's stdout and stderr are stored; see the [module docs](self).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum TaskLogs {
    /// Straight into the sandbox files, unbounded.
    #[default]
    Sandbox,
    /// Through a logger process that rotates the files.
    Rotate {
        /// The executable to run as `<program> logger ...` (the `mesh` binary).
        program: PathBuf,
        /// When to rotate and how many old files to keep.
        rotation: LogRotation,
    },
}

/// Rotation settings of one stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogRotation {
    /// A file is rotated before it would grow past this many bytes (at least 1).
    pub max_size: u64,
    /// How many rotated files (`stdout.1` ... `stdout.N`) are kept; 0 keeps only the live file.
    pub max_files: u32,
}

/// The logger processes of one task, to wait for when it has ended.
#[derive(Debug, Default)]
pub struct Loggers {
    waits: Mutex<Vec<JoinHandle<()>>>,
}

impl Loggers {
    /// Waits (at most `max`) until every logger has written all output and exited. Loggers
    /// still running then (a process that escaped the task's group holds the pipe) go on alone.
    pub async fn drained(&self, max: Duration) {
        let waits = std::mem::take(&mut *self.waits.lock().unwrap_or_else(|e| e.into_inner()));
        let all = async {
            for w in waits {
                let _ = w.await;
            }
        };
        if tokio::time::timeout(max, all).await.is_err() {
            tracing::debug!("task loggers still running after {max:?}");
        }
    }
}

/// The stdout and stderr of a task about to be spawned in `sandbox`, and its loggers. The
/// error is a message for `Failed`. Must be called inside a tokio runtime.
pub fn open(logs: &TaskLogs, sandbox: &Path) -> Result<(OwnedFd, OwnedFd, Loggers), String> {
    match logs {
        TaskLogs::Sandbox => {
            let file = |name: &str| {
                File::create(sandbox.join(name))
                    .map(OwnedFd::from)
                    .map_err(|e| format!("cannot create {name} in {}: {e}", sandbox.display()))
            };
            Ok((file("stdout")?, file("stderr")?, Loggers::default()))
        }
        TaskLogs::Rotate { program, rotation } => {
            let loggers = Loggers::default();
            let out = spawn_logger(program, &sandbox.join("stdout"), *rotation, &loggers)?;
            let err = spawn_logger(program, &sandbox.join("stderr"), *rotation, &loggers)?;
            Ok((out, err, loggers))
        }
    }
}

/// Starts one logger on a new pipe and returns the pipe's write end for the task.
fn spawn_logger(program: &Path, file: &Path, rotation: LogRotation, loggers: &Loggers) -> Result<OwnedFd, String> {
    // Both ends are close-on-exec: only the logger (stdin) and the task (stdout) get one.
    let (reader, writer) = io::pipe().map_err(|e| format!("cannot create a pipe for {}: {e}", file.display()))?;
    let mut child = tokio::process::Command::new(program)
        .arg("logger")
        .arg("--file")
        .arg(file)
        .arg("--max-size")
        .arg(rotation.max_size.to_string())
        .arg("--max-files")
        .arg(rotation.max_files.to_string())
        .env_clear()
        .current_dir("/")
        .stdin(Stdio::from(reader))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .kill_on_drop(false)
        .spawn()
        .map_err(|e| format!("cannot start the task logger {}: {e}", program.display()))?;
    let wait = tokio::spawn(async move {
        let _ = child.wait().await;
    });
    loggers.waits.lock().unwrap_or_else(|e| e.into_inner()).push(wait);
    Ok(writer.into())
}

/// The logger's main loop (`mesh logger`): copies `input` to `file` until end of input,
/// rotating as the [module docs](self) say. Returns the bytes read. Only a failure to read
/// the input is an error; write failures drop the data (the task must never block on us).
pub fn run(mut input: impl Read, file: &Path, rotation: LogRotation) -> io::Result<u64> {
    let max = rotation.max_size.max(1);
    let mut out = Sink::create(file);
    let mut buf = vec![0u8; BUF];
    let mut total = 0u64;
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        total += n as u64;
        let mut chunk = &buf[..n];
        while !chunk.is_empty() {
            if out.written >= max {
                rotate(file, rotation.max_files);
                out = Sink::create(file);
            }
            let room = (max - out.written).min(chunk.len() as u64) as usize;
            let take = if room < chunk.len() {
                // Cut after the last newline that fits, unless that leaves a file without any.
                match chunk[..room].iter().rposition(|b| *b == b'\n') {
                    Some(i) => i + 1,
                    None if out.written > 0 && chunk.contains(&b'\n') => {
                        out.written = max;
                        continue;
                    }
                    None => room,
                }
            } else {
                room
            };
            out.write(&chunk[..take]);
            if take < chunk.len() {
                // The rest goes to a new file.
                out.written = max;
            }
            chunk = &chunk[take..];
        }
    }
}

/// The live file and how much has gone into it.
struct Sink {
    file: Option<File>,
    written: u64,
}

impl Sink {
    fn create(path: &Path) -> Self {
        Self { file: File::create(path).ok(), written: 0 }
    }

    fn write(&mut self, data: &[u8]) {
        if let Some(f) = &mut self.file
            && f.write_all(data).is_err()
        {
            // Disk full or the sandbox is gone: drop output until the next rotation retries.
            self.file = None;
        }
        self.written += data.len() as u64;
    }
}

/// `file.N-1` -> `file.N`, ..., `file` -> `file.1`; the old `file.N` is replaced. With
/// `keep == 0` the live file is simply started afresh.
fn rotate(file: &Path, keep: u32) {
    let numbered = |i: u32| {
        let mut p = file.as_os_str().to_owned();
        p.push(format!(".{i}"));
        PathBuf::from(p)
    };
    if keep == 0 {
        let _ = fs::remove_file(file);
        return;
    }
    for i in (1..keep).rev() {
        let _ = fs::rename(numbered(i), numbered(i + 1));
    }
    let _ = fs::rename(file, numbered(1));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(dir: &Path) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e.metadata().unwrap().len()))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn output_far_beyond_the_limit_leaves_bounded_files() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("stdout");
        let line = b"0123456789abcdef\n";
        let input: Vec<u8> = line.iter().copied().cycle().take(17 * 100_000).chain(*b"LAST\n").collect();
        let read = run(&input[..], &file, LogRotation { max_size: 100_000, max_files: 2 }).unwrap();
        assert_eq!(read, input.len() as u64);
        let s = sizes(dir.path());
        assert_eq!(s.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["stdout", "stdout.1", "stdout.2"]);
        assert!(s.iter().all(|(_, len)| *len <= 100_000), "{s:?}");
        // Cut at line ends: every file holds whole lines, and nothing is lost across the cuts.
        let (one, live) = (fs::read(dir.path().join("stdout.1")).unwrap(), fs::read(&file).unwrap());
        assert!(one.ends_with(b"\n") && one.len() % line.len() == 0);
        assert!(live.ends_with(b"LAST\n"));
        let two = fs::read(dir.path().join("stdout.2")).unwrap();
        let tail = [two, one, live].concat();
        assert!(input.ends_with(&tail), "the kept files are the last bytes written, in order");
    }

    #[test]
    fn a_line_longer_than_the_limit_is_cut_and_nothing_is_lost() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("stderr");
        let input = vec![b'x'; 2500];
        run(&input[..], &file, LogRotation { max_size: 1000, max_files: 5 }).unwrap();
        let s = sizes(dir.path());
        assert_eq!(s, [("stderr".into(), 500), ("stderr.1".into(), 1000), ("stderr.2".into(), 1000)]);
    }

    #[test]
    fn zero_kept_files_keeps_only_the_live_one() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("stdout");
        run(&b"aaaa\nbbbb\ncccc\n"[..], &file, LogRotation { max_size: 5, max_files: 0 }).unwrap();
        assert_eq!(sizes(dir.path()), [("stdout".into(), 5)]);
        assert_eq!(fs::read(&file).unwrap(), b"cccc\n");
    }

    #[test]
    fn small_output_is_copied_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("stdout");
        run(&b"hello\n"[..], &file, LogRotation { max_size: 1 << 20, max_files: 1 }).unwrap();
        assert_eq!(fs::read(&file).unwrap(), b"hello\n");
        assert_eq!(sizes(dir.path()).len(), 1);
    }
}
