//! openraft's async runtime for mesh: tokio's, except that the random numbers openraft draws
//! (its election timeouts) come from a thread-local generator that a simulation seeds
//! ([`seed_thread_rng`]), so the same seed elects the same leaders at the same virtual times.
//! Outside a simulation it is seeded from the operating system, as openraft's own.

use openraft::{AsyncRuntime, OptionalSend, TokioRuntime};
use rand_raft::{RngCore, SeedableRng, rngs::StdRng};
use std::cell::RefCell;
use std::future::Future;
use std::time::Duration;

thread_local! {
    static RNG: RefCell<StdRng> = RefCell::new(StdRng::from_entropy());
    static SIMULATED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static SLOW_DISK_MS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Seed this thread's generator of openraft's random numbers.
pub fn seed_thread_rng(seed: u64) {
    RNG.with(|r| *r.borrow_mut() = StdRng::seed_from_u64(seed));
}

/// Make this thread a deterministic simulation's (which runs every host on it): openraft's
/// random numbers come from `seed`, and the Raft storage does its work inline on the calling
/// task (no log writer thread, no blocking pool), so that no real thread decides when
/// something completes in virtual time.
pub fn simulate_on_this_thread(seed: u64) {
    seed_thread_rng(seed);
    SIMULATED.with(|s| s.set(true));
}

/// Whether this thread runs a simulation ([`simulate_on_this_thread`]).
pub fn simulated() -> bool {
    SIMULATED.with(std::cell::Cell::get)
}

/// In a simulation: each write of a Raft log opened afterwards on this thread waits up to `max`
/// (virtual time, drawn from the seeded generator) before it is done, in order (a slow disk);
/// a crash meanwhile loses what was not written, as a power cut loses what was not synced.
pub fn simulate_slow_disk(max: Duration) {
    SLOW_DISK_MS.with(|s| s.set(max.as_millis() as u64));
}

/// The slow disk's longest wait (zero: writes are done at once).
pub(crate) fn slow_disk() -> Duration {
    Duration::from_millis(SLOW_DISK_MS.with(std::cell::Cell::get))
}

/// One write's wait on the slow disk.
pub(crate) fn disk_delay(max: Duration) -> Duration {
    use rand_raft::Rng;
    Duration::from_millis(MeshRng.gen_range(0..=max.as_millis() as u64))
}

/// The thread-local generator of [`MeshRuntime`] (a handle: each draw reads the thread's one).
#[derive(Clone, Copy, Debug, Default)]
pub struct MeshRng;

impl RngCore for MeshRng {
    fn next_u32(&mut self) -> u32 {
        RNG.with(|r| r.borrow_mut().next_u32())
    }
    fn next_u64(&mut self) -> u64 {
        RNG.with(|r| r.borrow_mut().next_u64())
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        RNG.with(|r| r.borrow_mut().fill_bytes(dest))
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_raft::Error> {
        RNG.with(|r| r.borrow_mut().try_fill_bytes(dest))
    }
}

/// openraft's [`TokioRuntime`] with [`MeshRng`] as its random number generator.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct MeshRuntime;

impl AsyncRuntime for MeshRuntime {
    type JoinError = <TokioRuntime as AsyncRuntime>::JoinError;
    type JoinHandle<T: OptionalSend + 'static> = <TokioRuntime as AsyncRuntime>::JoinHandle<T>;
    type Sleep = <TokioRuntime as AsyncRuntime>::Sleep;
    type Instant = <TokioRuntime as AsyncRuntime>::Instant;
    type TimeoutError = <TokioRuntime as AsyncRuntime>::TimeoutError;
    type Timeout<R, T: Future<Output = R> + OptionalSend> = <TokioRuntime as AsyncRuntime>::Timeout<R, T>;
    type ThreadLocalRng = MeshRng;
    type OneshotSender<T: OptionalSend> = <TokioRuntime as AsyncRuntime>::OneshotSender<T>;
    type OneshotReceiverError = <TokioRuntime as AsyncRuntime>::OneshotReceiverError;
    type OneshotReceiver<T: OptionalSend> = <TokioRuntime as AsyncRuntime>::OneshotReceiver<T>;

    fn spawn<T>(future: T) -> Self::JoinHandle<T::Output>
    where
        T: Future + OptionalSend + 'static,
        T::Output: OptionalSend + 'static,
    {
        TokioRuntime::spawn(future)
    }

    fn sleep(duration: Duration) -> Self::Sleep {
        TokioRuntime::sleep(duration)
    }

    fn sleep_until(deadline: Self::Instant) -> Self::Sleep {
        TokioRuntime::sleep_until(deadline)
    }

    fn timeout<R, F: Future<Output = R> + OptionalSend>(duration: Duration, future: F) -> Self::Timeout<R, F> {
        TokioRuntime::timeout(duration, future)
    }

    fn timeout_at<R, F: Future<Output = R> + OptionalSend>(deadline: Self::Instant, future: F) -> Self::Timeout<R, F> {
        TokioRuntime::timeout_at(deadline, future)
    }

    fn is_panic(join_error: &Self::JoinError) -> bool {
        TokioRuntime::is_panic(join_error)
    }

    fn thread_rng() -> Self::ThreadLocalRng {
        MeshRng
    }

    fn oneshot<T>() -> (Self::OneshotSender<T>, Self::OneshotReceiver<T>)
    where
        T: OptionalSend,
    {
        TokioRuntime::oneshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_raft::Rng;

    /// One seed, one sequence of election timeouts.
    #[test]
    fn a_seed_gives_the_same_draws() {
        let draw = || (0..4).map(|_| MeshRuntime::thread_rng().gen_range(150..300u64)).collect::<Vec<_>>();
        seed_thread_rng(7);
        let a = draw();
        seed_thread_rng(7);
        assert_eq!(draw(), a);
        seed_thread_rng(8);
        assert_ne!(draw(), a);
    }
}
