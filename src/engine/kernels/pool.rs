//! A persistent thread pool for the kernels: `n_threads - 1` workers plus the calling thread run the tasks of
//! one parallel-for at a time. Workers spin briefly after each job (decode calls many small matmuls in a
//! row, so waking from a futex every time would dominate) and then park on a condition variable.
//!
//! Work is split into task indices that the caller maps to row ranges; a task never splits a reduction, so
//! results never depend on the number of threads.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// How many spin iterations a worker waits for the next job before parking (~tens of microseconds).
const SPIN_ITERS: u32 = 20_000;

/// The job being run: a type-erased `&dyn Fn(usize) + Sync` and its task count.
#[derive(Clone, Copy)]
struct RawJob {
    f: *const (dyn Fn(usize) + Sync + 'static),
    n_tasks: usize,
}

// SAFETY: the pointee is `Sync` (so it may be called from several threads) and `ThreadPool::parallel_for`
// keeps it alive until every worker has finished with it (see `WaitGuard`).
unsafe impl Send for RawJob {}

struct Shared {
    /// Incremented for each job; workers compare it with the last epoch they ran.
    epoch: AtomicU64,
    job: Mutex<Option<RawJob>>,
    wake: Condvar,
    /// The next unclaimed task index of the current job.
    next: AtomicUsize,
    /// Workers that have not yet finished the current job.
    active: AtomicUsize,
    panicked: AtomicBool,
    shutdown: AtomicBool,
}

/// A persistent pool of `n_threads` threads (the caller counts as one: `n_threads = 1` runs everything on
/// the caller and starts no thread). Only one parallel-for runs at a time; calls from several threads are
/// serialized.
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Serializes concurrent `parallel_for` calls from different threads.
    call_lock: Mutex<()>,
}

impl ThreadPool {
    /// Starts a pool of `n_threads` threads (0 is taken as 1). When the OS refuses a thread, the pool runs
    /// with the threads it got and logs a warning; it never fails.
    pub fn new(n_threads: usize) -> Self {
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: Mutex::new(None),
            wake: Condvar::new(),
            next: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
        });
        let mut workers = Vec::new();
        for i in 1..n_threads.max(1) {
            let s = Arc::clone(&shared);
            match std::thread::Builder::new()
                .name(format!("kernel-{i}"))
                .spawn(move || worker(s))
            {
                Ok(h) => workers.push(h),
                Err(e) => {
                    tracing::warn!(
                        "thread pool: could not start thread {i}: {e}; running with {i}"
                    );
                    break;
                }
            }
        }
        Self {
            shared,
            workers,
            call_lock: Mutex::new(()),
        }
    }

    /// Threads that run tasks, the caller included.
    pub fn n_threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `f(i)` for every `i` in `0..n_tasks`, each exactly once, spread over the pool's threads (the
    /// caller takes part), and returns when all are done. Tasks are claimed dynamically in index order.
    ///
    /// # Panics
    /// Re-raises a panic of `f` after every task has stopped.
    pub fn parallel_for<F: Fn(usize) + Sync>(&self, n_tasks: usize, f: F) {
        if self.workers.is_empty() || n_tasks <= 1 {
            for i in 0..n_tasks {
                f(i);
            }
            return;
        }
        let _serial = self.call_lock.lock().unwrap_or_else(|p| p.into_inner());
        let s = &*self.shared;
        let fref: &(dyn Fn(usize) + Sync) = &f;
        // SAFETY: only the lifetime is erased. The reference is published to the workers below and
        // `WaitGuard` (dropped before `f` goes out of scope, also when `f` panics on this thread) waits until
        // every worker has decremented `active`, i.e. has stopped using it; workers read it only between
        // seeing the new epoch and decrementing `active`.
        let fptr: *const (dyn Fn(usize) + Sync + 'static) = unsafe {
            std::mem::transmute::<*const (dyn Fn(usize) + Sync + '_), *const (dyn Fn(usize) + Sync)>(
                fref,
            )
        };
        s.next.store(0, Ordering::Relaxed);
        s.panicked.store(false, Ordering::Relaxed);
        s.active.store(self.workers.len(), Ordering::Relaxed);
        {
            let mut job = s.job.lock().unwrap_or_else(|p| p.into_inner());
            *job = Some(RawJob { f: fptr, n_tasks });
            s.epoch.fetch_add(1, Ordering::Release);
        }
        s.wake.notify_all();
        let guard = WaitGuard(s);
        run_tasks(s, &f, n_tasks);
        drop(guard);
        if s.panicked.load(Ordering::Acquire) {
            panic!("a thread pool task panicked");
        }
    }
}

/// Waits (spinning, then yielding) until all workers have finished the current job.
struct WaitGuard<'a>(&'a Shared);

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        let mut spins = 0u32;
        while self.0.active.load(Ordering::Acquire) != 0 {
            if spins < SPIN_ITERS {
                std::hint::spin_loop();
                spins += 1;
            } else {
                std::thread::yield_now();
            }
        }
        if let Ok(mut job) = self.0.job.lock() {
            *job = None;
        }
    }
}

fn run_tasks(s: &Shared, f: &(dyn Fn(usize) + Sync), n_tasks: usize) {
    loop {
        let i = s.next.fetch_add(1, Ordering::Relaxed);
        if i >= n_tasks {
            break;
        }
        f(i);
    }
}

fn worker(s: Arc<Shared>) {
    let mut seen = 0u64;
    loop {
        let mut spins = 0u32;
        loop {
            if s.shutdown.load(Ordering::Acquire) {
                return;
            }
            if s.epoch.load(Ordering::Acquire) != seen {
                break;
            }
            if spins < SPIN_ITERS {
                std::hint::spin_loop();
                spins += 1;
            } else {
                let guard = s.job.lock().unwrap_or_else(|p| p.into_inner());
                if s.epoch.load(Ordering::Acquire) == seen && !s.shutdown.load(Ordering::Acquire) {
                    drop(s.wake.wait(guard).unwrap_or_else(|p| p.into_inner()));
                }
            }
        }
        let job = {
            let g = s.job.lock().unwrap_or_else(|p| p.into_inner());
            seen = s.epoch.load(Ordering::Acquire);
            *g
        };
        if let Some(job) = job {
            // SAFETY: see `ThreadPool::parallel_for`: the closure outlives this use because the caller waits
            // for `active` to reach zero, which happens only after this call returns.
            let f = unsafe { &*job.f };
            if catch_unwind(AssertUnwindSafe(|| run_tasks(&s, f, job.n_tasks))).is_err() {
                s.panicked.store(true, Ordering::Release);
            }
        }
        s.active.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        {
            let _g = self.shared.job.lock().unwrap_or_else(|p| p.into_inner());
            self.shared.shutdown.store(true, Ordering::Release);
        }
        self.shared.wake.notify_all();
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

impl std::fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadPool")
            .field("n_threads", &self.n_threads())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_exactly_once() {
        for threads in [1, 2, 3] {
            let pool = ThreadPool::new(threads);
            assert_eq!(pool.n_threads(), threads);
            for n in [0, 1, 2, 7, 100] {
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                for _ in 0..50 {
                    pool.parallel_for(n, |i| {
                        hits[i].fetch_add(1, Ordering::Relaxed);
                    });
                }
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 50));
            }
        }
    }

    #[test]
    fn a_panicking_task_is_reraised_and_the_pool_still_works() {
        let pool = ThreadPool::new(2);
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.parallel_for(8, |i| {
                if i == 5 {
                    panic!("task 5");
                }
            })
        }));
        assert!(r.is_err());
        let count = AtomicUsize::new(0);
        pool.parallel_for(8, |_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 8);
    }

    #[test]
    fn parks_after_spinning_and_wakes_again() {
        let pool = ThreadPool::new(2);
        std::thread::sleep(std::time::Duration::from_millis(50));
        let count = AtomicUsize::new(0);
        pool.parallel_for(16, |_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 16);
    }
}
