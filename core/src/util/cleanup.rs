//! Clean-ups that a `Drop` cannot await (killing a dropped exec's guest program through a
//! blocking libvirt call) run on threads of their own. They are counted, so a process about to
//! exit can wait for them ([`crate::wait_for_cleanups`]) instead of cutting them off.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

static PENDING: Mutex<usize> = Mutex::new(0);
static DONE: Condvar = Condvar::new();

/// Run `f` on its own thread, counted until it returns.
pub(crate) fn spawn(name: &str, f: impl FnOnce() + Send + 'static) {
    *PENDING.lock().unwrap_or_else(|p| p.into_inner()) += 1;
    let spawned = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            f();
            finished();
        });
    if spawned.is_err() {
        finished();
    }
}

fn finished() {
    let mut n = PENDING.lock().unwrap_or_else(|p| p.into_inner());
    *n = n.saturating_sub(1);
    DONE.notify_all();
}

/// Block until every clean-up started so far has finished, or `timeout` passed; true when
/// none is left.
pub fn wait_for_cleanups(timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut n = PENDING.lock().unwrap_or_else(|p| p.into_inner());
    while *n > 0 {
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        n = DONE
            .wait_timeout(n, deadline - now)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_for_what_was_started_and_gives_up_at_the_deadline() {
        spawn("t", || std::thread::sleep(Duration::from_millis(200)));
        assert!(!wait_for_cleanups(Duration::from_millis(10)));
        assert!(wait_for_cleanups(Duration::from_secs(5)));
    }
}
