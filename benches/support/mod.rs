//! What the benchmarks share: embedcar as a pinned child process, pinning, process CPU clocks
//! and /proc readings, latency histograms and number formatting.
#![allow(dead_code)]

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// embedcar runs alone on this core; the bench process (load generator, fake upstream) on the
/// other.
pub const EMBEDCAR_CORE: usize = 0;
pub const BENCH_CORE: usize = 1;

/// More failed requests than this share of all requests means the run measured nothing useful.
pub const MAX_ERROR_RATE: f64 = 0.01;

/// Busy time on a pinned core beyond what our own processes used, above which a run is flagged
/// as disturbed (other processes, or interrupt work not charged to a process).
pub const MAX_FOREIGN_LOAD: f64 = 0.10;

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

/// Pins the calling thread to `core`.
pub fn pin_thread(core: usize) -> Result<(), String> {
    // SAFETY: cpu_set_t is plain data; CPU_SET and sched_setaffinity only touch the set we pass.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(format!(
                "sched_setaffinity: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

/// Pins the calling thread (the main thread, before the runtime and the pacer exist, so every
/// later thread inherits it) to `core`, once both cores are known to be usable. Returns why
/// not, if it could not.
pub fn pin_self(core: usize) -> Result<(), String> {
    // SAFETY: cpu_set_t is plain data; the CPU_* helpers and sched_{get,set}affinity only read
    // and write the set we pass, sized by size_of.
    unsafe {
        let mut allowed: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut allowed) != 0 {
            return Err(format!(
                "sched_getaffinity: {}",
                std::io::Error::last_os_error()
            ));
        }
        for c in [EMBEDCAR_CORE, BENCH_CORE] {
            if !libc::CPU_ISSET(c, &allowed) {
                return Err(format!("core {c} is not available to this process"));
            }
        }
    }
    pin_thread(core)
}

/// CPU time (user + system, all threads, live and exited) of a process, in nanoseconds, from the
/// process CPU-time clock (`clock_getcpuclockid`). This is the same quantity as utime + stime in
/// `/proc/<pid>/stat`, but exact: the /proc figures are sampled at each timer tick (10 ms), and a
/// fixed-rate load whose period divides the tick (2,000 req/s = 20 per tick) is sampled at the
/// same phase every time, which biases them. `pid` 0 is this process.
pub fn cpu_ns(pid: u32) -> Option<u64> {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: only writes to the out-parameter.
    if unsafe { libc::clock_getcpuclockid(pid as libc::pid_t, &mut clock) } != 0 {
        return None;
    }
    clock_ns(clock)
}

/// The real embedcar binary as a child process, pinned as asked, read from the outside.
pub struct Embedcar {
    pub child: Child,
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub cpus: String,
}

impl Embedcar {
    /// Starts embedcar on `core` (`pin`) or on every core, with `env` on top of ours.
    pub fn start(
        upstream: &str,
        pin: bool,
        core: usize,
        env: &[(&str, String)],
    ) -> Result<Embedcar, String> {
        let bin = embedcar_bin();
        let args = [
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--upstream",
            upstream,
        ];
        let taskset = std::path::Path::new("/usr/bin/taskset");
        let mut cmd = if pin && taskset.exists() {
            // The visible way, the same as by hand: `taskset -c 0 embedcar ...` (taskset execs
            // embedcar, so the pid is embedcar's).
            let mut c = Command::new(taskset);
            c.arg("-c").arg(core.to_string()).arg(&bin);
            c
        } else if pin {
            // No taskset: the same affinity set between fork and exec.
            let mut c = Command::new(&bin);
            // SAFETY: between fork and exec only async-signal-safe calls (a syscall) are made.
            unsafe {
                use std::os::unix::process::CommandExt;
                c.pre_exec(move || {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(core, &mut set);
                    if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            c
        } else {
            // Unpinned: this process never restricted itself, so nothing to undo.
            Command::new(&bin)
        };
        cmd.args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {bin}: {e}"))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel::<(SocketAddr, Option<SocketAddr>)>();
        // Reads the start-up line, then keeps draining stdout (a full pipe would block embedcar)
        // and shows warnings and errors, which would make the figures suspect.
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(t) = &tx {
                    let field = |name: &str| {
                        line.split_whitespace()
                            .find_map(|w| w.strip_prefix(name))
                            .and_then(|a| a.parse::<SocketAddr>().ok())
                    };
                    if let Some(addr) = field("addr=") {
                        let _ = t.send((addr, field("admin_addr=")));
                        tx = None;
                        continue;
                    }
                }
                if line.contains("WARN") || line.contains("ERROR") {
                    eprintln!("[embedcar] {line}");
                }
            }
        });
        let (addr, admin) = match rx.recv_timeout(Duration::from_secs(15)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                let status = child.wait().ok();
                return Err(format!(
                    "embedcar printed no `listening addr=...` line within 15 s (exit: {status:?})"
                ));
            }
        };
        let cpus = status_field(&child.id().to_string(), "Cpus_allowed_list").unwrap_or_default();
        Ok(Embedcar {
            child,
            addr,
            admin,
            cpus,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Still running?
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, a short wait for the graceful drain, then SIGKILL. Async: the fake upstream
    /// runs on this runtime and must keep serving while embedcar drains.
    pub async fn stop(mut self) {
        // SAFETY: kill(2) on our own child's pid, which we have not reaped yet.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A benchmark's `main`: pins this process to the bench core (before the runtime or any other
/// thread exists, so every thread inherits it) when `pin` asks and both cores are usable, then
/// runs `bench` on a current-thread runtime, told whether pinning took. `name` prefixes the
/// error that ends a broken run.
pub fn run_pinned<F, Fut>(name: &str, pin: bool, bench: F) -> ExitCode
where
    F: FnOnce(bool) -> Fut,
    Fut: Future<Output = Result<ExitCode, String>>,
{
    let pinned = pin
        && match pin_self(BENCH_CORE) {
            Ok(()) => true,
            Err(e) => {
                eprintln!("warning: not pinning ({e}); figures are less comparable");
                false
            }
        };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(bench(pinned)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{name}: {e}");
            ExitCode::FAILURE
        }
    }
}
