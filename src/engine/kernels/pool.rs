//! A persistent thread pool for the kernels: `n_threads - 1` workers plus the calling thread run the tasks of
//! one parallel-for at a time.
//!
//! Waiting is adaptive, because the pool often shares its cores (other processes, a second model, the HTTP
//! server): a thread with nothing to do spins for a few microseconds (decode calls hundreds of small
//! matmuls per token back to back, so sleeping between them would cost a futex wake each time), then yields
//! its core for a while, then parks (a condition variable for idle workers, `thread::park` for the caller
//! waiting on the last tasks) so that it burns no core that a busy thread needs.
//!
//! Completion is counted in tasks, not in threads: a job is done when its last task is, whichever threads
//! ran them. A worker that is descheduled, or still waking, when a job starts does not hold the job up: the
//! threads that are running claim its tasks, and a late worker finds none left (its claim names the job's
//! epoch, so it can never take a task of a later job).
//!
//! Work is split into task indices that the caller maps to row ranges; a task never splits a reduction, so
//! results never depend on the number of threads or on which thread ran a task.

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

/// How long a waiting thread spins before it starts yielding its core: longer than the gap between two
/// parallel-fors of one forward pass, far shorter than a scheduler time slice.
const SPIN_FOR: Duration = Duration::from_micros(50);
/// How long (from the start of the wait) a waiting thread yields its core before it parks.
const YIELD_UNTIL: Duration = Duration::from_micros(500);
/// Spins between two readings of the clock (a reading costs about as much as a few dozen spins).
const SPINS_PER_CLOCK: u32 = 32;

/// The largest task count of one parallel-for: the claim word keeps the next task index in 32 bits.
const MAX_TASKS: usize = u32::MAX as usize;

/// The job being run: a type-erased `&dyn Fn(usize) + Sync`, its task count and its epoch.
#[derive(Clone, Copy)]
struct RawJob {
    f: *const (dyn Fn(usize) + Sync + 'static),
    n_tasks: usize,
    epoch: u32,
}

// SAFETY: the pointee is `Sync` (so it may be called from several threads), and a worker dereferences it only
// for a task it has claimed in the job's epoch, which `ThreadPool::parallel_for` waits for before `f` dies.
unsafe impl Send for RawJob {}

/// The published job (under [`Shared::job`]) and the thread to unpark when it completes.
struct JobSlot {
    job: Option<RawJob>,
    caller: Option<Thread>,
}

struct Shared {
    /// The claim word: the current job's epoch in the high 32 bits, its next unclaimed task index in the low
    /// 32 bits. Workers claim with a compare-and-swap that checks the epoch, so a worker that read an older
    /// job can never take (or skip) a task of the current one.
    claim: AtomicU64,
    /// Tasks of the current job that have finished (run or panicked).
    done: AtomicUsize,
    job: Mutex<JobSlot>,
    /// Idle workers park here (with [`Shared::job`]'s mutex).
    wake: Condvar,
    /// Workers parked (or about to park) on `wake`: the caller notifies only when there is one.
    sleepers: AtomicUsize,
    /// The caller is parked (or about to park) waiting for `done`; the worker finishing the last task
    /// unparks it.
    caller_parked: AtomicBool,
    panicked: AtomicBool,
    shutdown: AtomicBool,
}

impl Shared {
    fn slot(&self) -> MutexGuard<'_, JobSlot> {
        self.job.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims the next task of the job of `epoch` with `n_tasks` tasks; `None` when none is left or a newer
    /// job has been published.
    fn claim(&self, epoch: u32, n_tasks: usize) -> Option<usize> {
        let mut w = self.claim.load(Ordering::Relaxed);
        loop {
            let i = (w & 0xffff_ffff) as usize;
            if (w >> 32) as u32 != epoch || i >= n_tasks {
                return None;
            }
            // Acquire: the caller's writes before it published the job (the inputs) are visible to the task.
            match self
                .claim
                .compare_exchange_weak(w, w + 1, Ordering::Acquire, Ordering::Relaxed)
            {
                Ok(_) => return Some(i),
                Err(now) => w = now,
            }
        }
    }

    /// Counts one finished task of a job of `n_tasks`; the last one wakes a parked caller.
    fn finish(&self, n_tasks: usize) {
        // SeqCst (with `caller_parked` below and in `wait_done`): either this thread sees the caller's flag,
        // or the caller sees the count, so a parked caller is always woken.
        if self.done.fetch_add(1, Ordering::SeqCst) + 1 == n_tasks
            && self.caller_parked.load(Ordering::SeqCst)
            && let Some(t) = self.slot().caller.clone()
        {
            t.unpark();
        }
    }
}

/// Spin, then yield, then park: the phases of one wait.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Spin,
    Yield,
    Park,
}

/// The adaptive wait of one thread (see the module comment). The clock is first read after
/// [`SPINS_PER_CLOCK`] spins, so a wait that ends at once costs no clock reading.
struct Backoff {
    start: Option<Instant>,
    spins: u32,
    step: Step,
}

impl Backoff {
    fn new() -> Self {
        Self {
            start: None,
            spins: 0,
            step: Step::Spin,
        }
    }

    /// Waits a little (a spin or a yield) and returns `false`, or returns `true` when the thread should park.
    fn wait(&mut self) -> bool {
        match self.step {
            Step::Spin => {
                std::hint::spin_loop();
                self.spins += 1;
                if self.spins.is_multiple_of(SPINS_PER_CLOCK)
                    && self.start.get_or_insert_with(Instant::now).elapsed() >= SPIN_FOR
                {
                    self.step = Step::Yield;
                }
                false
            }
            Step::Yield => {
                std::thread::yield_now();
                if self.start.is_none_or(|t| t.elapsed() >= YIELD_UNTIL) {
                    self.step = Step::Park;
                }
                false
            }
            Step::Park => true,
        }
    }
}

/// A persistent pool of `n_threads` threads (the caller counts as one: `n_threads = 1` runs everything on
/// the caller and starts no thread). Only one parallel-for runs at a time; calls from several threads are
/// serialized.
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Serializes concurrent `parallel_for` calls from different threads.
    call_lock: Mutex<u32>,
}

impl ThreadPool {
    /// Starts a pool of `n_threads` threads (0 is taken as 1). When the OS refuses a thread, the pool runs
    /// with the threads it got and logs a warning; it never fails.
    pub fn new(n_threads: usize) -> Self {
        let shared = Arc::new(Shared {
            claim: AtomicU64::new(0),
            done: AtomicUsize::new(0),
            job: Mutex::new(JobSlot {
                job: None,
                caller: None,
            }),
            wake: Condvar::new(),
            sleepers: AtomicUsize::new(0),
            caller_parked: AtomicBool::new(false),
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
            call_lock: Mutex::new(0),
        }
    }

    /// Threads that run tasks, the caller included.
    pub fn n_threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `f(i)` for every `i` in `0..n_tasks`, each exactly once, spread over the pool's threads (the
    /// caller takes part), and returns when all are done. Tasks are claimed dynamically in index order; a
    /// thread that is not running when the job starts simply claims none. More than `u32::MAX` tasks run
    /// on the caller alone.
    ///
    /// # Panics
    /// Re-raises a panic of `f` after every task has stopped (the other tasks still run).
    pub fn parallel_for<F: Fn(usize) + Sync>(&self, n_tasks: usize, f: F) {
        if self.workers.is_empty() || n_tasks <= 1 || n_tasks > MAX_TASKS {
            for i in 0..n_tasks {
                f(i);
            }
            return;
        }
        let mut last_epoch = self.call_lock.lock().unwrap_or_else(|p| p.into_inner());
        let epoch = last_epoch.wrapping_add(1);
        *last_epoch = epoch;
        let s = &*self.shared;
        let fref: &(dyn Fn(usize) + Sync) = &f;
        // SAFETY: only the lifetime is erased. Workers dereference the pointer only to run a task they have
        // claimed in this epoch (`Shared::claim`), and this function returns (or unwinds) only after
        // `wait_done` has seen all `n_tasks` tasks finish, so `f` outlives every use. A worker that reads
        // this job late finds no task to claim and never dereferences it.
        let fptr: *const (dyn Fn(usize) + Sync + 'static) = unsafe {
            std::mem::transmute::<*const (dyn Fn(usize) + Sync + '_), *const (dyn Fn(usize) + Sync)>(
                fref,
            )
        };
        s.panicked.store(false, Ordering::Relaxed);
        s.done.store(0, Ordering::Relaxed);
        {
            let mut slot = s.slot();
            slot.job = Some(RawJob {
                f: fptr,
                n_tasks,
                epoch,
            });
            let me = std::thread::current();
            if slot.caller.as_ref().map(Thread::id) != Some(me.id()) {
                slot.caller = Some(me);
            }
        }
        // SeqCst (with `sleepers`, here and in `worker`): either a parking worker sees the new epoch, or
        // this thread sees it parking and wakes it.
        s.claim.store(u64::from(epoch) << 32, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _slot = s.slot();
            s.wake.notify_all();
        }
        // The caller's own tasks: a panic is kept until the other threads are done with `f`.
        let mut payload = None;
        while let Some(i) = s.claim(epoch, n_tasks) {
            if let Err(p) = catch_unwind(AssertUnwindSafe(|| f(i))) {
                payload.get_or_insert(p);
            }
            s.done.fetch_add(1, Ordering::Relaxed);
        }
        wait_done(s, n_tasks);
        drop(last_epoch);
        if let Some(p) = payload {
            resume_unwind(p);
        }
        if s.panicked.load(Ordering::Acquire) {
            panic!("a thread pool task panicked");
        }
    }
}

/// The caller's wait for tasks still running on workers: spin, yield, then park until the worker that
/// finishes the last one unparks it.
fn wait_done(s: &Shared, n_tasks: usize) {
    let mut b = Backoff::new();
    // Acquire: every task's writes are visible once its `done` increment is.
    while s.done.load(Ordering::Acquire) < n_tasks {
        if b.wait() {
            s.caller_parked.store(true, Ordering::SeqCst);
            if s.done.load(Ordering::SeqCst) < n_tasks {
                // A spurious return (or an old unpark token) only loops once more.
                std::thread::park();
            }
            s.caller_parked.store(false, Ordering::Relaxed);
        }
    }
}

fn worker(s: Arc<Shared>) {
    let mut seen = 0u32;
    loop {
        let mut b = Backoff::new();
        loop {
            if s.shutdown.load(Ordering::Acquire) {
                return;
            }
            if (s.claim.load(Ordering::Acquire) >> 32) as u32 != seen {
                break;
            }
            if b.wait() {
                let mut slot = s.slot();
                s.sleepers.fetch_add(1, Ordering::SeqCst);
                while (s.claim.load(Ordering::SeqCst) >> 32) as u32 == seen
                    && !s.shutdown.load(Ordering::Acquire)
                {
                    slot = s.wake.wait(slot).unwrap_or_else(|p| p.into_inner());
                }
                s.sleepers.fetch_sub(1, Ordering::SeqCst);
            }
        }
        // The slot holds the newest job (published before its epoch), possibly newer than the epoch seen.
        let Some(job) = s.slot().job else { continue };
        seen = job.epoch;
        while let Some(i) = s.claim(job.epoch, job.n_tasks) {
            // SAFETY: task `i` of this epoch is claimed and not yet counted in `done`, so the caller is still
            // inside `parallel_for` and `f` is alive (see there).
            let f = unsafe { &*job.f };
            if catch_unwind(AssertUnwindSafe(|| f(i))).is_err() {
                s.panicked.store(true, Ordering::Release);
            }
            s.finish(job.n_tasks);
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        {
            let _slot = self.shared.slot();
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

    #[test]
    fn a_claim_names_its_job() {
        let pool = ThreadPool::new(1);
        let s = &pool.shared;
        s.claim.store(5 << 32, Ordering::SeqCst);
        assert_eq!(
            s.claim(4, 3),
            None,
            "a worker that read an older job takes nothing"
        );
        assert_eq!(
            (s.claim(5, 3), s.claim(5, 3), s.claim(5, 3)),
            (Some(0), Some(1), Some(2))
        );
        assert_eq!(s.claim(5, 3), None, "all claimed");
        s.claim.store(6 << 32, Ordering::SeqCst);
        assert_eq!(s.claim(5, 3), None, "nor does one that is a job behind");
        assert_eq!(s.claim(6, 2), Some(0));
        // The claim word never carries into the epoch: the index stops at n_tasks.
        s.claim.store((7 << 32) | 0xffff_fffe, Ordering::SeqCst);
        assert_eq!(s.claim(7, MAX_TASKS), Some(0xffff_fffe));
        assert_eq!(s.claim(7, MAX_TASKS), None);
        assert_eq!(s.claim.load(Ordering::SeqCst) >> 32, 7);
    }

    #[test]
    fn backoff_spins_then_yields_then_parks() {
        let mut b = Backoff::new();
        assert!(!b.wait());
        assert_eq!(b.step, Step::Spin, "a short wait only spins");
        let t = Instant::now();
        while !b.wait() {}
        assert_eq!(b.step, Step::Park);
        assert!(t.elapsed() >= YIELD_UNTIL - SPIN_FOR.min(YIELD_UNTIL));
    }

    /// More threads than cores, jobs of every size, tasks that sleep past the spin and yield phases (so
    /// callers and workers park and must be woken): every task runs exactly once, nothing hangs.
    #[test]
    fn oversubscribed_pools_lose_no_task_and_no_wakeup() {
        let pools: Vec<ThreadPool> = [2, 3, 5].into_iter().map(ThreadPool::new).collect();
        std::thread::scope(|sc| {
            for (k, pool) in pools.iter().enumerate() {
                sc.spawn(move || {
                    for round in 0..300usize {
                        let n = 2 + (round * 7 + k) % 23;
                        let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                        pool.parallel_for(n, |i| {
                            if (round + i) % 97 == 0 {
                                std::thread::sleep(Duration::from_millis(2));
                            }
                            hits[i].fetch_add(1, Ordering::Relaxed);
                        });
                        assert!(
                            hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                            "round {round}"
                        );
                        if round % 50 == 0 {
                            // Idle long enough for the workers to park.
                            std::thread::sleep(Duration::from_millis(3));
                        }
                    }
                });
            }
        });
    }

    #[test]
    fn a_panic_on_the_caller_waits_for_the_workers_and_keeps_its_payload() {
        let pool = ThreadPool::new(3);
        let ran = AtomicUsize::new(0);
        let thrown = AtomicBool::new(false);
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.parallel_for(64, |_| {
                ran.fetch_add(1, Ordering::Relaxed);
                let on_caller = std::thread::current()
                    .name()
                    .is_none_or(|n| !n.starts_with("kernel-"));
                if on_caller && !thrown.swap(true, Ordering::Relaxed) {
                    panic!("the caller's task");
                }
                std::thread::sleep(Duration::from_micros(200));
            })
        }));
        // The caller claims right after publishing the job, so it runs at least one of the 64 tasks.
        assert!(thrown.load(Ordering::Relaxed));
        let msg = r.unwrap_err();
        assert_eq!(msg.downcast_ref::<&str>(), Some(&"the caller's task"));
        assert_eq!(
            ran.load(Ordering::Relaxed),
            64,
            "the other tasks still ran before the re-raise"
        );
    }
}
