//! Running, pausing and stopping a guest's thread (a vCPU, or the synthetic writer): the
//! handshake both backends share. The thread calls [`Control::checkpoint`] between batches of
//! writes; the engine's [`Control::pause`] returns only once the thread is parked there.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// What the engine wants the thread to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Want {
    Run,
    Pause,
    Stop,
}

/// The shared state, with the backend's own part in `extra`.
pub(crate) struct Ctl<T> {
    pub want: Want,
    /// The thread is parked (or not running at all).
    pub paused: bool,
    pub throttle: f64,
    pub extra: T,
}

/// A guest thread's control block.
pub(crate) struct Control<T> {
    ctl: Mutex<Ctl<T>>,
    cv: Condvar,
}

impl<T> Control<T> {
    /// A control block for a thread not started yet (counted as paused).
    pub fn new(extra: T) -> Self {
        Control {
            ctl: Mutex::new(Ctl {
                want: Want::Pause,
                paused: true,
                throttle: 0.0,
                extra,
            }),
            cv: Condvar::new(),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, Ctl<T>> {
        // A poisoned lock means the guest thread panicked; the block is plain data.
        self.ctl.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, g: MutexGuard<'a, Ctl<T>>) -> MutexGuard<'a, Ctl<T>> {
        self.cv.wait(g).unwrap_or_else(|e| e.into_inner())
    }

    /// Thread side, between batches: parks while asked to pause (after `on_park` has recorded
    /// what must survive the pause). `None` when told to stop; else the throttle, and whether
    /// the thread was parked (its pacing should restart).
    pub fn checkpoint(&self, on_park: impl FnOnce(&mut T)) -> Option<(f64, bool)> {
        let mut ctl = self.lock();
        let mut parked = false;
        if ctl.want != Want::Run {
            on_park(&mut ctl.extra);
            ctl.paused = true;
            self.cv.notify_all();
            while ctl.want == Want::Pause {
                ctl = self.wait(ctl);
            }
            if ctl.want == Want::Stop {
                return None;
            }
            ctl.paused = false;
            parked = true;
        }
        Some((ctl.throttle, parked))
    }

    /// Thread side: sleeps for `d` (pacing), waking early if asked to pause or stop.
    pub fn sleep(&self, d: Duration) {
        if d.is_zero() {
            return;
        }
        let ctl = self.lock();
        if ctl.want == Want::Run {
            let _ = self.cv.wait_timeout(ctl, d);
        }
    }

    /// Thread side: the thread ends by itself; `record` notes why.
    pub fn fail(&self, record: impl FnOnce(&mut T)) {
        let mut ctl = self.lock();
        record(&mut ctl.extra);
        ctl.paused = true;
        self.cv.notify_all();
    }

    /// Engine side: asks the thread to park and waits until it has.
    pub fn pause(&self) -> MutexGuard<'_, Ctl<T>> {
        let mut ctl = self.lock();
        if ctl.want == Want::Run {
            ctl.want = Want::Pause;
            self.cv.notify_all();
        }
        while !ctl.paused {
            ctl = self.wait(ctl);
        }
        ctl
    }

    /// Engine side: lets the thread run.
    pub fn resume(&self) {
        let mut ctl = self.lock();
        ctl.want = Want::Run;
        // The thread sets it again once it has really stopped; pause() waits for that.
        ctl.paused = false;
        self.cv.notify_all();
    }

    /// Engine side: tells the thread to end.
    pub fn stop(&self) {
        self.lock().want = Want::Stop;
        self.cv.notify_all();
    }

    /// Waits until `done` holds, for at most `timeout`; `false` on timeout.
    pub fn wait_until(
        &self,
        timeout: Duration,
        done: impl Fn(&Ctl<T>) -> bool,
    ) -> (MutexGuard<'_, Ctl<T>>, bool) {
        let g = self.lock();
        let (g, t) = self
            .cv
            .wait_timeout_while(g, timeout, |c| !done(c))
            .unwrap_or_else(|e| e.into_inner());
        (g, !t.timed_out())
    }

    /// Wakes waiters after the thread changed `extra`.
    pub fn notify(&self) {
        self.cv.notify_all();
    }
}
