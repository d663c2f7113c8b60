//! TaskStats: CPU and memory of the VMM and its helpers, from /proc.

use std::collections::HashMap;
use std::time::Instant;

use crate::proc::{self, ProcessId};

/// One measurement of a set of processes.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Usage {
    pub rss_bytes: u64,
    pub user_seconds: f64,
    pub system_seconds: f64,
}

/// Cumulative usage of `pids` right now, and per pid.
pub fn sample(pids: &[ProcessId]) -> (Usage, HashMap<i32, Usage>) {
    let hz = proc::ticks_per_second() as f64;
    let page = proc::page_size();
    let mut total = Usage::default();
    let mut per = HashMap::new();
    for p in pids {
        if let Some(st) = proc::stat(p.pid).filter(|s| s.start_time == p.start_time) {
            let u = Usage {
                rss_bytes: st.rss_pages * page,
                user_seconds: st.utime_ticks as f64 / hz,
                system_seconds: st.stime_ticks as f64 / hz,
            };
            total.rss_bytes += u.rss_bytes;
            total.user_seconds += u.user_seconds;
            total.system_seconds += u.system_seconds;
            per.insert(p.pid, u);
        }
    }
    (total, per)
}

/// Turns cumulative CPU seconds into rates between two samples.
pub struct CpuRate {
    last: Option<(Instant, f64, f64)>,
}

/// CPU use over the last interval: percent of one core, and the user/system split.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Rate {
    pub percent: f64,
    pub user_percent: f64,
    pub system_percent: f64,
}

impl CpuRate {
    pub fn new() -> CpuRate {
        CpuRate { last: None }
    }

    pub fn update(&mut self, now: Instant, usage: &Usage) -> Rate {
        let rate = match self.last {
            Some((then, user, system)) => {
                let wall = now.duration_since(then).as_secs_f64();
                if wall <= 0.0 {
                    Rate::default()
                } else {
                    let u = ((usage.user_seconds - user).max(0.0) / wall) * 100.0;
                    let s = ((usage.system_seconds - system).max(0.0) / wall) * 100.0;
                    Rate { percent: u + s, user_percent: u, system_percent: s }
                }
            }
            None => Rate::default(),
        };
        self.last = Some((now, usage.user_seconds, usage.system_seconds));
        rate
    }
}

impl Default for CpuRate {
    fn default() -> Self {
        Self::new()
    }
}

/// MHz of one core (Nomad measures CPU in MHz), from /proc/cpuinfo.
pub fn core_mhz() -> f64 {
    let text = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let speeds: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with("cpu MHz"))
        .filter_map(|l| l.split(':').nth(1)?.trim().parse().ok())
        .collect();
    if speeds.is_empty() { 1000.0 } else { speeds.iter().sum::<f64>() / speeds.len() as f64 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rate_is_percent_of_one_core() {
        let mut r = CpuRate::new();
        let t0 = Instant::now();
        assert_eq!(r.update(t0, &Usage { user_seconds: 1.0, system_seconds: 1.0, rss_bytes: 0 }), Rate::default());
        let rate =
            r.update(t0 + Duration::from_secs(2), &Usage { user_seconds: 2.0, system_seconds: 1.5, rss_bytes: 0 });
        assert!((rate.user_percent - 50.0).abs() < 1e-9);
        assert!((rate.system_percent - 25.0).abs() < 1e-9);
        assert!((rate.percent - 75.0).abs() < 1e-9);
    }

    #[test]
    fn samples_our_own_process() {
        let me = ProcessId::of(std::process::id() as i32).unwrap();
        let (total, per) = sample(&[me, ProcessId { pid: me.pid, start_time: me.start_time + 1 }]);
        assert!(total.rss_bytes > 0);
        assert_eq!(per.len(), 1, "the stale identity is skipped");
        assert!(core_mhz() > 0.0);
    }
}
