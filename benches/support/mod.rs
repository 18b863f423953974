//! Measuring helpers shared by the benchmarks: process CPU clocks and /proc readings, latency
//! histograms and number formatting.
#![allow(dead_code)]

use std::time::Duration;

use hdrhistogram::Histogram;

pub fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

pub fn clock_ns(clock: libc::clockid_t) -> Option<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: only writes to the out-parameter.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return None;
    }
    Some(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

/// A `kB` line of /proc/<pid>/status (VmHWM, VmRSS), in MiB.
pub fn status_mib(pid: u32, key: &str) -> Option<f64> {
    status_field(&pid.to_string(), key)?
        .trim_end_matches("kB")
        .trim()
        .parse::<f64>()
        .ok()
        .map(|kb| kb / 1024.0)
}

pub fn status_field(pid: &str, key: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .map(|v| v.trim().to_string())
}

/// Busy ticks (everything but idle and iowait) of each CPU, from /proc/stat.
pub fn core_busy_ticks() -> Vec<u64> {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return Vec::new();
    };
    stat.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .map(|l| {
            let v: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            // user nice system idle iowait irq softirq steal (guest is already in user)
            let total: u64 = v.iter().take(8).sum();
            total - v.get(3).copied().unwrap_or(0) - v.get(4).copied().unwrap_or(0)
        })
        .collect()
}

pub fn histogram(max_ns: u64) -> Histogram<u64> {
    Histogram::new_with_bounds(1, max_ns, 3).expect("histogram bounds")
}

pub fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

pub fn f3(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.3}")
    } else {
        "-".into()
    }
}

pub fn f1(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.1}")
    } else {
        "-".into()
    }
}

/// The embedcar binary to measure: `BENCH_EMBEDCAR_BIN` (say, a copy built from another commit,
/// for an A/B comparison in one sitting), else the one cargo built with this benchmark.
pub fn embedcar_bin() -> String {
    std::env::var("BENCH_EMBEDCAR_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_embedcar").into())
}
