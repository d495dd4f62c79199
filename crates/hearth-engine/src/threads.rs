//! The threads an engine computes on.
//!
//! Each engine owns a rayon pool (`RAYON_NUM_THREADS` threads, else one per CPU) and runs its
//! scheduler loop on one of the pool's threads:
//!
//! - The scheduler is one of the compute threads, not one more beside them. When it ran on a
//!   thread of its own next to a 2-thread pool, three threads competed for two cores: the
//!   scheduler, the helper it had woken, and an idle pool thread spinning before it slept.
//!   Inside the pool, a parallel section started by the scheduler lets it work as a member.
//! - During a forward pass, the other threads spin, looking for work (`Helpers`). A pass makes
//!   over two hundred matrix products, each a few tens of µs at batch 1. A rayon thread that
//!   has gone to sleep needs a futex wake to start, which the waker pays for, and the wake
//!   often lands after the product is done. Between passes (sampling, detokenizing, waiting
//!   for requests) they sleep.
//!
//! Together, on the 2-core reference machine (`scripts/bench-engine`, figures in
//! docs/benchmarks.md): batch-1 decode on 2 threads went from 109 to 118 tokens/s and 32
//! streams from 418 to 566.
//!
//! Spinning helpers are what llama.cpp's threads do as well (its `--poll`); here they spin only
//! while a forward pass runs.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use crate::error::{EngineError, Result};

/// Starts a compute pool for one engine and runs `scheduler` on one of its threads. The pool
/// lives as long as work it was given is running: rayon keeps a pool's threads until its last
/// spawned job is done, even once its handle is dropped, so the scheduler loop, returning when
/// the engine's last handle is gone, ends the pool too.
pub(crate) fn spawn_scheduler(scheduler: impl FnOnce() + Send + 'static) -> Result<()> {
    spawn_scheduler_with(None, scheduler)
}

/// `spawn_scheduler` with `threads` in the pool (`None`: rayon's default).
fn spawn_scheduler_with(threads: Option<usize>, scheduler: impl FnOnce() + Send + 'static) -> Result<()> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.unwrap_or(0))
        .thread_name(|i| format!("hearth-engine-{i}"))
        // A panic in the scheduler ends the engine (requests then get `Stopped`), as it would
        // on a thread of its own; without a handler rayon aborts the process.
        .panic_handler(|p| {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(panic = %msg, "the engine's scheduler panicked; the engine has stopped");
        })
        .build()
        .map_err(|e| EngineError::Internal(format!("could not start the engine's threads: {e}")))?;
    pool.spawn(scheduler);
    Ok(())
}

const IDLE: u8 = 0;
const ACTIVE: u8 = 1;
const EXIT: u8 = 2;

/// The pool's other threads, held ready while the scheduler runs a forward pass. Made on the
/// scheduler's thread, inside the pool; dropping it releases them.
pub(crate) struct Helpers {
    shared: Arc<Shared>,
}

struct Shared {
    state: AtomicU8,
    lock: Mutex<()>,
    wake: Condvar,
}

impl Helpers {
    /// Starts a helper loop on every thread of the current pool but this one. Outside a pool,
    /// or in a pool of one thread, there is nobody to start and `busy` just runs its closure.
    pub(crate) fn start() -> Helpers {
        let shared = Arc::new(Shared { state: AtomicU8::new(IDLE), lock: Mutex::new(()), wake: Condvar::new() });
        if let Some(me) = rayon::current_thread_index() {
            if rayon::current_num_threads() > 1 {
                let s = Arc::clone(&shared);
                // This thread's own copy runs whenever it next looks for rayon work, and
                // returns at once: the scheduler must never be captured by a helper loop.
                rayon::spawn_broadcast(move |ctx| {
                    if ctx.index() != me {
                        s.help();
                    }
                });
            }
        }
        Helpers { shared }
    }

    /// Runs `f` (a forward pass) with the helpers spinning for work, then lets them sleep.
    pub(crate) fn busy<R>(&self, f: impl FnOnce() -> R) -> R {
        self.shared.set(ACTIVE);
        let r = f();
        // No notification: a spinning helper sees the change at its next look. (Only `drop`
        // sets EXIT, and it cannot run while `busy` borrows `self`.)
        self.shared.state.store(IDLE, Ordering::Release);
        r
    }
}

impl Drop for Helpers {
    fn drop(&mut self) {
        self.shared.set(EXIT);
    }
}

impl Shared {
    /// Sets the state and wakes sleepers. The store happens under the lock that sleepers
    /// check the state under, so none can miss it.
    fn set(&self, state: u8) {
        let _held = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        self.state.store(state, Ordering::Release);
        self.wake.notify_all();
    }

    /// A helper's loop: run the pool's queued work while a pass is under way, sleep between
    /// passes, return at `EXIT`.
    fn help(&self) {
        loop {
            match self.state.load(Ordering::Acquire) {
                ACTIVE => {
                    if rayon::yield_now() != Some(rayon::Yield::Executed) {
                        std::hint::spin_loop();
                    }
                }
                IDLE => {
                    let mut held = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
                    while self.state.load(Ordering::Acquire) == IDLE {
                        held = self.wake.wait(held).unwrap_or_else(PoisonError::into_inner);
                    }
                }
                _ => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;
    use std::sync::atomic::AtomicBool;
    use std::time::{Duration, Instant};

    /// Runs a parallel pass whose items on the scheduler's thread wait (up to `limit`) until
    /// another thread has taken one; returns whether one did. Waiting rather than timing the
    /// items keeps the test meaningful on a loaded machine, where a helper may be scheduled late.
    fn pass(helpers: &Helpers, limit: Duration) -> bool {
        let me = std::thread::current().id();
        let taken = AtomicBool::new(false);
        let deadline = Instant::now() + limit;
        helpers.busy(|| {
            (0..64).into_par_iter().for_each(|_| {
                if std::thread::current().id() != me {
                    taken.store(true, Ordering::Release);
                }
                while !taken.load(Ordering::Acquire) && Instant::now() < deadline {
                    std::hint::spin_loop();
                }
            })
        });
        taken.load(Ordering::Acquire)
    }

    #[test]
    fn helpers_take_work_queued_during_a_pass_asleep_or_not() {
        let (tx, rx) = std::sync::mpsc::channel();
        // Two threads whatever the machine or RAYON_NUM_THREADS, so there is a helper to see.
        spawn_scheduler_with(Some(2), move || {
            let helpers = Helpers::start();
            let first = pass(&helpers, Duration::from_secs(10));
            // Between passes the helpers sleep; the second pass must wake them.
            std::thread::sleep(Duration::from_millis(20));
            let second = pass(&helpers, Duration::from_secs(10));
            let _ = tx.send((rayon::current_num_threads(), first, second));
        })
        .expect("pool starts");
        let (threads, first, second) = rx.recv_timeout(Duration::from_secs(60)).expect("the scheduler ran to its end");
        assert_eq!(threads, 2);
        assert!(first && second, "a helper took work in the first pass: {first}, in the second: {second}");
    }
}
