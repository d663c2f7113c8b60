//! Polling with a deadline, for conditions with no event to wait on.

use std::time::{Duration, Instant};

/// Polls `check` every `every` until it returns `Some`, or panics after
/// `limit` with `what` (and the last observation).
pub fn wait_until<T>(what: &str, limit: Duration, every: Duration, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + limit;
    let mut last;
    loop {
        match check() {
            Ok(v) => return v,
            Err(why) => last = why,
        }
        if Instant::now() >= deadline {
            panic!("timed out after {limit:?} waiting for {what}; last: {last}");
        }
        std::thread::sleep(every);
    }
}
