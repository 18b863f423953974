//! Pass-through overhead of embedcar, measured side by side with a direct call.
//!
//! Run with `cargo bench --bench passthrough` (see benches/README.md).
//!
//! For each scenario the same small request (`POST /v1/bench/passthrough` with the one-sentence
//! embeddings body, echoed back by the fake upstream; see [`DEFAULT_PATH`] for why not
//! `/v1/embeddings`) is sent four ways, one after the other, and the differences are what the
//! proxy costs:
//!
//! * DIRECT: load generator → fake upstream (the baseline);
//! * TCP RELAY: load generator → a bare byte-copying relay on core 0 → fake upstream: the floor,
//!   what the extra hop alone costs on this machine (`BENCH_FLOOR=0` skips it);
//! * NGINX: load generator → nginx on core 0 → fake upstream: the reference operators compare a
//!   sidecar with (one process, keep-alive to the upstream, no access log; see [`Nginx`]).
//!   Skipped, with a note, when nginx is not installed (`BENCH_NGINX=0` skips it too);
//! * EMBEDCAR: load generator → embedcar on core 0 → fake upstream;
//! * NGINX, SHARED CORE and EMBEDCAR, SHARED CORE (open loop only): the same with the proxy on
//!   core 1, beside the load generator and the fake, as a sidecar shares its pod's CPUs with the
//!   application. The added latency targets are read here: the direct run uses one core too,
//!   and no hop has to wake an idle core (on this VM that costs tens of microseconds per hop,
//!   more than embedcar's own work; the relay's figure in the split placement shows it).
//!
//! embedcar's CPU per request is also given as a ratio to nginx's and to the relay's from the
//! same run: absolute figures move by ±10% between runs on this VM, the ratios much less.
//!
//! Scenarios:
//!
//! * `closed 64`: 64 keep-alive connections, each sending its next request as soon as the
//!   previous answer is read: maximum throughput. embedcar's CPU time per request at saturation
//!   (a target) is taken here.
//! * `open 500/s`, `open 2000/s`: requests on a fixed timetable over 64 connections. Latency runs
//!   from the *scheduled* send time, not from when a connection got round to sending, so a
//!   stall shows up in the figures instead of silently slowing the schedule down (coordinated
//!   omission).
//!
//! Pinning, so that runs are comparable: embedcar runs alone on core 0 (`taskset -c 0`; its
//! tokio runtime then sizes itself to one worker), this process — load generator, fake upstream
//! and the open-loop pacer thread — on core 1 (`sched_setaffinity` on the main thread before any
//! other thread exists; threads inherit it). Without two usable cores or without `taskset`, it
//! warns and runs unpinned. Other load on the machine still skews the figures: each run compares
//! the cores' busy time with our processes' own and prints a warning when they differ.
//!
//! embedcar runs with its embeddings engine off (`EMBEDCAR_EMBEDDINGS__ENABLED=false`, unless
//! that variable is set): the pass-through alone, as nginx does it.
//!
//! The load generator is hyper's low-level HTTP/1.1 client (`client::conn::http1`), one task per
//! connection, on a current-thread runtime: exact connection counts and little overhead of its
//! own. embedcar is the real release binary with its default configuration, started fresh for
//! each run (so its peak memory is per scenario) and read from the outside: CPU time from its
//! process CPU clock (exact; `/proc/<pid>/stat` utime + stime is shown beside it as a
//! cross-check), peak RSS from `VmHWM` in `/proc/<pid>/status`.
//!
//! Environment: `BENCH_SECONDS` (measured seconds per run, default 8), `BENCH_WARMUP_SECONDS`
//! (default 1.5), `BENCH_CONNECTIONS` (default 64), `BENCH_RATES` (default `500,2000`; `none`: the closed loop only),
//! `BENCH_PATH` (default `/v1/bench/passthrough`), `BENCH_PIN=0` (do not pin), `BENCH_FLOOR=0`
//! (no relay runs), `BENCH_ROUNDS` (closed-loop rounds of relay, nginx and embedcar in turn,
//! default 3), `BENCH_NGINX=0` (no nginx runs), `BENCH_NGINX_BIN` (default: `nginx` on
//! PATH, else /usr/sbin/nginx), `BENCH_EMBEDCAR_BIN` (measure that binary instead). `EMBEDCAR_*` variables reach embedcar unchanged.
//!
//! It exits non-zero only when the measurement itself broke (embedcar did not start or died,
//! more than 1% errors in a run); a missed target is reported, not failed.

mod support;
use support::*;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use http::{HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// The route every scenario sends to. embedcar's embeddings engine owns `POST /v1/embeddings`
/// (with identical inputs every request after the first would be a cache hit, and the fake would
/// hardly be called), so the pass-through is measured on a path the engine does not claim: the
/// same request, which the fake upstream echoes back (same size, `content-length` framing).
/// `BENCH_PATH=/v1/embeddings` (the engine is off unless asked for) measures the embeddings path
/// itself passed through, with the fake's embeddings reply.
const DEFAULT_PATH: &str = "/v1/bench/passthrough";
/// The request body: the one-sentence embeddings request of the issue.
const BODY: &[u8] =
    br#"{"input":"The food was delicious and the waiter was friendly.","model":"text-embedding-3-small"}"#;
const AUTH: &str = "Bearer sk-bench";

/// The issue's targets on the 2-core reference machine.
const TARGET_CPU_US: f64 = 25.0;
const TARGET_ADDED_P50_MS: f64 = 0.1;
const TARGET_ADDED_P50_RATE: f64 = 2000.0;
const TARGET_MEMORY_MIB: f64 = 20.0;
/// Pass-through CPU per request at saturation, as a ratio to nginx's in the same run: a sidecar
/// is paid for in every pod, and nginx is what operators compare it with.
const TARGET_CPU_X_NGINX: f64 = 1.0;
/// The stretch: within 10% of the bare relay, which does no HTTP work at all.
const STRETCH_CPU_X_RELAY: f64 = 1.1;

/// Closed-loop rounds of relay, nginx and embedcar in turn. Three give a median and a spread of
/// each same-round ratio in about a minute and a half.
const DEFAULT_ROUNDS: usize = 3;

/// Latencies are recorded in nanoseconds, up to a minute, 3 significant digits.
const HIST_MAX_NS: u64 = 60_000_000_000;

// ---------------------------------------------------------------------------------------------
// Settings
// ---------------------------------------------------------------------------------------------

struct Settings {
    path: http::Uri,
    measure: Duration,
    warmup: Duration,
    connections: usize,
    rates: Vec<f64>,
    pin: bool,
    /// Also run the bare TCP relay (`BENCH_FLOOR=0` skips it).
    floor: bool,
    /// Also run nginx, if installed (`BENCH_NGINX=0` skips it).
    nginx: bool,
    /// How many times the closed loop's proxies run, in turn (`BENCH_ROUNDS`).
    rounds: usize,
    /// `cargo test --benches` runs this without `--bench`: a short smoke run, no verdicts.
    smoke: bool,
}

impl Settings {
    fn from_env() -> Settings {
        let smoke = !std::env::args().any(|a| a == "--bench");
        let secs = |name: &str, default: f64| {
            let v = std::env::var(name)
                .ok()
                .and_then(|s| s.trim().parse::<f64>().ok())
                .filter(|v| *v > 0.0 && v.is_finite())
                .unwrap_or(default);
            Duration::from_secs_f64(v)
        };
        let (measure, warmup) = if smoke {
            (Duration::from_millis(300), Duration::from_millis(100))
        } else {
            (
                secs("BENCH_SECONDS", 8.0),
                secs("BENCH_WARMUP_SECONDS", 1.5),
            )
        };
        let connections = std::env::var("BENCH_CONNECTIONS")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .filter(|n| *n > 0)
            .unwrap_or(64);
        // `none`: only the closed loop, the quick way to compare CPU per request.
        let rates = match std::env::var("BENCH_RATES") {
            Ok(s) if s.trim() == "none" => vec![],
            Ok(s) => s
                .split(',')
                .filter_map(|r| r.trim().parse::<f64>().ok())
                .filter(|r| *r > 0.0)
                .collect::<Vec<_>>(),
            Err(_) => vec![],
        };
        let rates = if rates.is_empty()
            && std::env::var("BENCH_RATES").map_or(true, |s| s.trim() != "none")
        {
            vec![500.0, 2000.0]
        } else {
            rates
        };
        let pin = std::env::var("BENCH_PIN").map_or(true, |v| v != "0");
        let floor = std::env::var("BENCH_FLOOR").map_or(true, |v| v != "0");
        let nginx = std::env::var("BENCH_NGINX").map_or(true, |v| v != "0");
        let rounds = std::env::var("BENCH_ROUNDS")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .filter(|n| *n > 0)
            .unwrap_or(DEFAULT_ROUNDS);
        let path = std::env::var("BENCH_PATH")
            .ok()
            .and_then(|p| p.parse::<http::Uri>().ok())
            .filter(|p| p.path().starts_with('/') && p.authority().is_none())
            .unwrap_or_else(|| http::Uri::from_static(DEFAULT_PATH));
        Settings {
            path,
            measure,
            warmup,
            connections,
            rates,
            pin,
            floor,
            nginx,
            rounds: if smoke { 1 } else { rounds },
            smoke,
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Load {
    /// N connections, each sending back to back.
    Closed,
    /// A fixed rate in requests per second.
    Open(f64),
}

impl Load {
    fn label(self, connections: usize) -> String {
        match self {
            Load::Closed => format!("closed {connections}"),
            Load::Open(r) => format!("open {r}/s"),
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Path {
    Direct,
    /// The floor: a bare TCP relay on embedcar's core in embedcar's place.
    Relay,
    /// nginx on embedcar's core in embedcar's place: the reference a sidecar is compared with.
    Nginx,
    Through,
    /// Open loop only: nginx on the bench's own core, as [`Path::Shared`] puts embedcar.
    NginxShared,
    /// Open loop only: embedcar on the bench's own core, beside the load generator and the
    /// upstream, as a sidecar shares its pod's CPUs with the application.
    Shared,
}

impl Path {
    fn label(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Relay => "tcp relay",
            Path::Nginx => "nginx",
            Path::Through => "embedcar",
            Path::NginxShared => "nginx, shared core",
            Path::Shared => "embedcar, shared core",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Pinning and /proc readings
// ---------------------------------------------------------------------------------------------

/// Whose CPU time a run charges to the proxy under test.
#[derive(Clone, Copy)]
enum ProxyCpu {
    None,
    /// embedcar, a child process.
    Process(u32),
    /// The relay thread inside this process (its thread CPU clock).
    Thread(libc::clockid_t),
}

impl ProxyCpu {
    fn ns(self) -> Option<u64> {
        match self {
            ProxyCpu::None => None,
            ProxyCpu::Process(pid) => cpu_ns(pid),
            ProxyCpu::Thread(clock) => clock_ns(clock),
        }
    }

    fn ticks(self) -> Option<u64> {
        match self {
            ProxyCpu::Process(pid) => cpu_ticks(&pid.to_string()),
            _ => None,
        }
    }
}

/// utime + stime of a whole process (all its threads, live and exited), in clock ticks.
fn cpu_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name (which may contain spaces): state is field 3,
    // utime field 14, stime field 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// One reading of everything the run measures, taken at the same instant (one runtime step).
struct Sample {
    at: Instant,
    completed: u64,
    self_ns: u64,
    proxy_ns: Option<u64>,
    proxy_ticks: Option<u64>,
    cores: Vec<u64>,
}

impl Sample {
    fn take(counters: &Counters, proxy: ProxyCpu) -> Sample {
        Sample {
            at: Instant::now(),
            completed: counters.completed.load(Ordering::Relaxed),
            self_ns: cpu_ns(0).unwrap_or(0),
            proxy_ns: proxy.ns(),
            proxy_ticks: proxy.ticks(),
            cores: core_busy_ticks(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// embedcar as a child process
// ---------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------
// The floor: a bare TCP relay
// ---------------------------------------------------------------------------------------------

/// A byte-copying TCP relay (no HTTP: `copy_bidirectional` per connection) on its own thread and
/// current-thread runtime, pinned to embedcar's core. Run in embedcar's place it pays the same
/// hops, wake-ups and cross-core traffic but does no HTTP work: what it adds over direct is the
/// least any proxy on core 0 can add on this machine, and the rest of embedcar's figure is
/// embedcar's own.
struct Relay {
    addr: SocketAddr,
    /// The relay thread's CPU-time clock.
    clock: libc::clockid_t,
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Relay {
    fn start(upstream: SocketAddr, pin: bool) -> Result<Relay, String> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            if pin {
                if let Err(e) = pin_thread(EMBEDCAR_CORE) {
                    eprintln!("warning: relay not pinned: {e}");
                }
            }
            let mut clock: libc::clockid_t = 0;
            // SAFETY: our own thread handle; only writes to the out-parameter.
            unsafe {
                libc::pthread_getcpuclockid(libc::pthread_self(), &mut clock);
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("relay runtime");
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("relay bind: {e}")));
                        return;
                    }
                };
                let addr = listener.local_addr().expect("bound address");
                let _ = ready_tx.send(Ok((addr, clock)));
                let accept = async {
                    while let Ok((mut inbound, _)) = listener.accept().await {
                        tokio::spawn(async move {
                            let _ = inbound.set_nodelay(true);
                            let Ok(mut outbound) = TcpStream::connect(upstream).await else {
                                return;
                            };
                            let _ = outbound.set_nodelay(true);
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        });
                    }
                };
                tokio::select! {
                    _ = accept => {}
                    _ = stop_rx => {}
                }
            });
            // Dropping the runtime drops every connection task.
        });
        let (addr, clock) = ready_rx
            .recv()
            .map_err(|_| "relay thread died".to_string())??;
        Ok(Relay {
            addr,
            clock,
            stop,
            thread,
        })
    }

    fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

// ---------------------------------------------------------------------------------------------
// The reference: nginx
// ---------------------------------------------------------------------------------------------

/// Where nginx is looked for when `BENCH_NGINX_BIN` does not say: Debian's package puts it in
/// /usr/sbin, which is not on every user's PATH.
const NGINX_PATHS: [&str; 2] = ["/usr/sbin/nginx", "/usr/local/sbin/nginx"];

/// Upstream keep-alive connections nginx may keep idle: one per load-generator connection, so
/// it never closes and reopens one under the closed loop, as embedcar's pool does not.
const NGINX_UPSTREAM_KEEPALIVE: usize = 64;

/// Requests per connection before nginx closes it (its default is 1,000 on both sides): high
/// enough that no connection is recycled inside a run, since embedcar recycles none and the
/// load generator would count each close as an error.
const NGINX_KEEPALIVE_REQUESTS: u64 = 100_000_000;

/// How long to wait for nginx to accept connections after it starts.
const NGINX_START_TIMEOUT: Duration = Duration::from_secs(10);

/// The nginx binary to measure, if there is one.
fn nginx_bin() -> Option<std::path::PathBuf> {
    if let Ok(bin) = std::env::var("BENCH_NGINX_BIN") {
        return Some(bin.into()).filter(|p: &std::path::PathBuf| p.is_file());
    }
    let on_path = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("nginx"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain(NGINX_PATHS.iter().map(std::path::PathBuf::from))
        .find(|p| p.is_file())
}

/// nginx in embedcar's place, configured as a sidecar would be: one process (`master_process
/// off`, so the process we start is the one that works and its CPU clock is the whole cost),
/// keep-alive to the upstream (`upstream` block with `keepalive`, HTTP/1.1, `Connection`
/// cleared), no access log. It runs as the current user from a temporary prefix directory the
/// bench writes its configuration into and removes afterwards.
struct Nginx {
    child: std::process::Child,
    addr: SocketAddr,
    dir: std::path::PathBuf,
}

impl Nginx {
    fn start(
        bin: &std::path::Path,
        upstream: SocketAddr,
        pin: bool,
        core: usize,
    ) -> Result<Nginx, String> {
        // A free port, given back for nginx to bind (it cannot report a port it chose).
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("nginx: no free port: {e}"))?;
        let dir = std::env::temp_dir().join(format!(
            "embedcar-bench-nginx-{}-{}",
            std::process::id(),
            addr.port()
        ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("nginx: {}: {e}", dir.display()))?;
        let d = dir.display();
        let conf = format!(
            "daemon off;\n\
             master_process off;\n\
             worker_processes 1;\n\
             pid {d}/nginx.pid;\n\
             error_log {d}/error.log warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n\
             \x20 access_log off;\n\
             \x20 client_body_temp_path {d}/client_body;\n\
             \x20 proxy_temp_path {d}/proxy;\n\
             \x20 fastcgi_temp_path {d}/fastcgi;\n\
             \x20 uwsgi_temp_path {d}/uwsgi;\n\
             \x20 scgi_temp_path {d}/scgi;\n\
             \x20 keepalive_requests {NGINX_KEEPALIVE_REQUESTS};\n\
             \x20 upstream fake {{\n\
             \x20   server {upstream};\n\
             \x20   keepalive {NGINX_UPSTREAM_KEEPALIVE};\n\
             \x20   keepalive_requests {NGINX_KEEPALIVE_REQUESTS};\n\
             \x20 }}\n\
             \x20 server {{\n\
             \x20   listen {addr};\n\
             \x20   location / {{\n\
             \x20     proxy_pass http://fake;\n\
             \x20     proxy_http_version 1.1;\n\
             \x20     proxy_set_header Connection \"\";\n\
             \x20   }}\n\
             \x20 }}\n\
             }}\n"
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).map_err(|e| format!("nginx: {e}"))?;
        let taskset = std::path::Path::new("/usr/bin/taskset");
        let mut cmd = if pin && taskset.exists() {
            let mut c = std::process::Command::new(taskset);
            c.arg("-c").arg(core.to_string()).arg(bin);
            c
        } else {
            std::process::Command::new(bin)
        };
        // `-e`: the error log before the configuration is read (the built-in default is under
        // /var/log, not writable by everyone).
        cmd.arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf_path)
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit());
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(format!("cannot start {}: {e}", bin.display()));
            }
        };
        // From here on, Drop kills it and removes the directory, whatever happens.
        let mut nginx = Nginx { child, addr, dir };
        let deadline = Instant::now() + NGINX_START_TIMEOUT;
        loop {
            if std::net::TcpStream::connect(addr).is_ok() {
                return Ok(nginx);
            }
            if !nginx.alive() || Instant::now() > deadline {
                let log = std::fs::read_to_string(nginx.dir.join("error.log")).unwrap_or_default();
                return Err(format!(
                    "nginx did not start listening on {addr}: {}",
                    log.lines().last().unwrap_or("(no error log)")
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn cpus(&self) -> String {
        status_field(&self.pid().to_string(), "Cpus_allowed_list").unwrap_or_default()
    }
}

/// `nginx -v`'s answer, for the report.
fn nginx_version(bin: &std::path::Path) -> String {
    std::process::Command::new(bin)
        .arg("-v")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
        .and_then(|v| v.strip_prefix("nginx version: ").map(str::to_string))
        .unwrap_or_else(|| "version unknown".into())
}

impl Drop for Nginx {
    /// SIGTERM (nginx's fast shutdown), a short wait, then SIGKILL; the prefix directory goes
    /// with it. No drain is needed: the run is over when this is dropped.
    fn drop(&mut self) {
        if self.alive() {
            // SAFETY: kill(2) on our own child's pid, which we have not reaped yet.
            unsafe {
                libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(2);
            while self.alive() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------------
// Load generator
// ---------------------------------------------------------------------------------------------

type Sender = SendRequest<Full<Bytes>>;

#[derive(Default)]
struct Counters {
    /// 200 answers, fully read, over the whole run (warm-up included).
    completed: AtomicU64,
    /// Everything else: other statuses, connect and transport errors.
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Counters {
    fn error(&self, what: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_error.lock().unwrap();
        if first.is_none() {
            *first = Some(what);
        }
    }
}

/// What a connection task hands back: its latency histogram (requests that started inside the
/// measured window) and, for the open loop, how late each send was against its schedule.
struct ConnResult {
    latency: Histogram<u64>,
    lag: Histogram<u64>,
}

async fn connect(addr: SocketAddr) -> Result<Sender, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake {addr}: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// One request, body read to the end. `Err(true)` means the connection is unusable.
async fn send_one(
    sender: &mut Sender,
    path: &http::Uri,
    host: &HeaderValue,
    counters: &Counters,
) -> Result<(), bool> {
    let req = Request::post(path.clone())
        .header(HOST, host.clone())
        .header(AUTHORIZATION, AUTH)
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from_static(BODY)))
        .expect("valid request");
    if let Err(e) = sender.ready().await {
        counters.error(format!("connection closed: {e}"));
        return Err(true);
    }
    let resp = match sender.send_request(req).await {
        Ok(r) => r,
        Err(e) => {
            counters.error(format!("request failed: {e}"));
            return Err(true);
        }
    };
    let status = resp.status();
    match resp.into_body().collect().await {
        Err(e) => {
            counters.error(format!("body failed: {e}"));
            Err(true)
        }
        Ok(_) if status != StatusCode::OK => {
            counters.error(format!("status {status}"));
            Err(false)
        }
        Ok(_) => {
            counters.completed.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    }
}

/// Keeps a connection open across errors (reconnecting, with a short pause after a failure).
struct Conn {
    addr: SocketAddr,
    path: http::Uri,
    host: HeaderValue,
    sender: Option<Sender>,
    counters: Arc<Counters>,
}

impl Conn {
    async fn send(&mut self) -> bool {
        if self.sender.is_none() {
            match connect(self.addr).await {
                Ok(s) => self.sender = Some(s),
                Err(e) => {
                    self.counters.error(e);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    return false;
                }
            }
        }
        let sender = self.sender.as_mut().expect("connected");
        match send_one(sender, &self.path, &self.host, &self.counters).await {
            Ok(()) => true,
            Err(broken) => {
                if broken {
                    self.sender = None;
                }
                false
            }
        }
    }
}

/// Closed loop: send, read, repeat until `end`.
async fn closed_conn(mut conn: Conn, window: (Instant, Instant)) -> ConnResult {
    let mut latency = histogram(HIST_MAX_NS);
    while Instant::now() < window.1 {
        let start = Instant::now();
        let ok = conn.send().await;
        if ok && start >= window.0 && start < window.1 {
            latency.saturating_record(ns(start.elapsed()));
        }
    }
    ConnResult {
        latency,
        lag: histogram(HIST_MAX_NS),
    }
}

/// Open loop: take the next scheduled send time from the pacer (connections queue fairly on the
/// lock, so the idle one that waited longest goes next), send, record from the schedule.
async fn open_conn(
    mut conn: Conn,
    schedule: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Instant>>>,
    window: (Instant, Instant),
) -> ConnResult {
    let (mut latency, mut lag) = (histogram(HIST_MAX_NS), histogram(HIST_MAX_NS));
    loop {
        let Some(due) = schedule.lock().await.recv().await else {
            break;
        };
        let sent = Instant::now();
        let ok = conn.send().await;
        if ok && due >= window.0 && due < window.1 {
            latency.saturating_record(ns(due.elapsed()));
            lag.saturating_record(ns(sent.saturating_duration_since(due)));
        }
    }
    ConnResult { latency, lag }
}

/// The open loop's clock: a plain thread (on the bench core) that sleeps to each scheduled
/// instant and hands it to the connections. tokio's timer has millisecond granularity, far too
/// coarse for sub-millisecond latencies measured from the schedule; nanosleep with the timer
/// slack set to 1 ns wakes within microseconds. Whatever lateness remains is counted in the
/// latency (the same for DIRECT and THROUGH) and reported as `lag`.
fn pacer(tx: mpsc::UnboundedSender<Instant>, start: Instant, rate: f64, end: Instant) {
    // SAFETY: prctl(PR_SET_TIMERSLACK) only changes this thread's timer slack.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
    }
    let period_ns = 1e9 / rate;
    for i in 0u64.. {
        let due = start + Duration::from_nanos((i as f64 * period_ns) as u64);
        if due >= end {
            break;
        }
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        if tx.send(due).is_err() {
            break;
        }
    }
}

/// The outcome of one run.
struct RunResult {
    load: Load,
    path: Path,
    throughput: f64,
    errors: u64,
    total: u64,
    first_error: Option<String>,
    latency: Histogram<u64>,
    lag: Histogram<u64>,
    self_util: f64,
    cores_util: Vec<f64>,
    /// The proxy under test (embedcar or the relay); `None` for direct runs.
    proxy: Option<ProxyFigures>,
}

struct ProxyFigures {
    cpu_us_per_request: f64,
    /// The same from /proc/<pid>/stat ticks: a cross-check (coarse, see [`cpu_ns`]).
    stat_us_per_request: f64,
    util: f64,
    /// Peak RSS; NaN for the relay, which lives inside this process.
    peak_mib: f64,
}

impl RunResult {
    fn p(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1e6
    }
    fn lag_p(&self, q: f64) -> f64 {
        self.lag.value_at_quantile(q) as f64 / 1e6
    }
    fn error_rate(&self) -> f64 {
        if self.total == 0 {
            1.0
        } else {
            self.errors as f64 / self.total as f64
        }
    }
}

/// One run through a fresh embedcar: on core 0 for `Path::Through`, on the bench's core for
/// `Path::Shared`. Also returns the cores embedcar was allowed.
async fn run_through(
    s: &Settings,
    load: Load,
    path: Path,
    upstream: &str,
    pinned: bool,
) -> Result<(RunResult, String), String> {
    let core = match path {
        Path::Shared => BENCH_CORE,
        _ => EMBEDCAR_CORE,
    };
    let mut ec = Embedcar::start(upstream, pinned, core, &engine_env())?;
    if let Err(e) = check_path(ec.addr, &s.path, "through embedcar").await {
        ec.stop().await;
        return Err(e);
    }
    let result = run(s, load, path, ec.addr, ProxyCpu::Process(ec.pid())).await;
    let cpus = ec.cpus.clone();
    let died = !ec.alive();
    ec.stop().await;
    if died {
        return Err(format!(
            "embedcar exited during the {} {} run",
            load.label(s.connections),
            path.label()
        ));
    }
    Ok((result, cpus))
}

/// The engine is off unless `EMBEDCAR_EMBEDDINGS__ENABLED` says otherwise: this is the
/// pass-through's cost, as the issue measured it, and with the engine on the tokenizer's tables
/// (loaded at start for the engine's first callers) would be most of the resident memory.
fn engine_env() -> Vec<(&'static str, String)> {
    match std::env::var_os(ENGINE_SWITCH) {
        Some(_) => vec![],
        None => vec![(ENGINE_SWITCH, "false".into())],
    }
}

const ENGINE_SWITCH: &str = "EMBEDCAR_EMBEDDINGS__ENABLED";

/// One run through a fresh nginx: on core 0 for `Path::Nginx`, on the bench's core for
/// `Path::NginxShared`. Also returns the cores it was allowed.
async fn run_nginx(
    s: &Settings,
    bin: &std::path::Path,
    load: Load,
    path: Path,
    upstream: SocketAddr,
    pinned: bool,
) -> Result<(RunResult, String), String> {
    let core = match path {
        Path::NginxShared => BENCH_CORE,
        _ => EMBEDCAR_CORE,
    };
    let mut nginx = Nginx::start(bin, upstream, pinned, core)?;
    check_path(nginx.addr, &s.path, "through nginx").await?;
    let result = run(s, load, path, nginx.addr, ProxyCpu::Process(nginx.pid())).await;
    let cpus = nginx.cpus();
    if !nginx.alive() {
        return Err(format!(
            "nginx exited during the {} {} run",
            load.label(s.connections),
            path.label()
        ));
    }
    Ok((result, cpus))
}

async fn run(
    s: &Settings,
    load: Load,
    path: Path,
    target: SocketAddr,
    proxy_cpu: ProxyCpu,
) -> RunResult {
    let counters = Arc::new(Counters::default());
    let host = HeaderValue::from_str(&target.to_string()).expect("host header");
    // Connect every connection before the clock starts.
    let mut conns = Vec::with_capacity(s.connections);
    for _ in 0..s.connections {
        let sender = match connect(target).await {
            Ok(c) => Some(c),
            Err(e) => {
                counters.error(e);
                None
            }
        };
        conns.push(Conn {
            addr: target,
            path: s.path.clone(),
            host: host.clone(),
            sender,
            counters: counters.clone(),
        });
    }
    let t0 = Instant::now() + Duration::from_millis(5);
    let window = (t0 + s.warmup, t0 + s.warmup + s.measure);

    let mut tasks = Vec::with_capacity(s.connections);
    let mut pacer_thread = None;
    match load {
        Load::Closed => {
            tokio::time::sleep_until(t0.into()).await;
            for c in conns {
                tasks.push(tokio::spawn(closed_conn(c, window)));
            }
        }
        Load::Open(rate) => {
            let (tx, rx) = mpsc::unbounded_channel();
            let rx = Arc::new(tokio::sync::Mutex::new(rx));
            for c in conns {
                tasks.push(tokio::spawn(open_conn(c, rx.clone(), window)));
            }
            pacer_thread = Some(std::thread::spawn(move || pacer(tx, t0, rate, window.1)));
        }
    }

    tokio::time::sleep_until(window.0.into()).await;
    let a = Sample::take(&counters, proxy_cpu);
    tokio::time::sleep_until(window.1.into()).await;
    let b = Sample::take(&counters, proxy_cpu);

    let (mut latency, mut lag) = (histogram(HIST_MAX_NS), histogram(HIST_MAX_NS));
    for t in tasks {
        let r = t.await.expect("connection task panicked");
        latency.add(&r.latency).expect("same bounds");
        lag.add(&r.lag).expect("same bounds");
    }
    if let Some(p) = pacer_thread {
        let _ = p.join();
    }

    let tck = clk_tck();
    let seconds = b.at.duration_since(a.at).as_secs_f64();
    let completed = b.completed - a.completed;
    let util = |ticks: u64| ticks as f64 / tck / seconds;
    let cores_util = a
        .cores
        .iter()
        .zip(&b.cores)
        .map(|(x, y)| util(y.saturating_sub(*x)))
        .collect();
    let per_request = |us: f64| us / completed.max(1) as f64;
    let proxy = match (a.proxy_ns, b.proxy_ns) {
        (Some(x), Some(y)) => {
            let ns = y.saturating_sub(x) as f64;
            let ticks = match (a.proxy_ticks, b.proxy_ticks) {
                (Some(x), Some(y)) => y.saturating_sub(x) as f64,
                _ => f64::NAN,
            };
            Some(ProxyFigures {
                cpu_us_per_request: per_request(ns / 1e3),
                stat_us_per_request: per_request(ticks / tck * 1e6),
                util: ns / 1e9 / seconds,
                peak_mib: match proxy_cpu {
                    ProxyCpu::Process(pid) => status_mib(pid, "VmHWM").unwrap_or(f64::NAN),
                    _ => f64::NAN,
                },
            })
        }
        _ => None,
    };
    // The relay thread's CPU is not the load generator's.
    let self_ns = b.self_ns.saturating_sub(a.self_ns) as f64
        - match proxy_cpu {
            ProxyCpu::Thread(_) => proxy.as_ref().map_or(0.0, |p| p.util * 1e9 * seconds),
            _ => 0.0,
        };
    let errors = counters.errors.load(Ordering::Relaxed);
    let first_error = counters.first_error.lock().unwrap().take();
    RunResult {
        load,
        path,
        throughput: completed as f64 / seconds,
        errors,
        total: counters.completed.load(Ordering::Relaxed) + errors,
        first_error,
        latency,
        lag,
        self_util: self_ns / 1e9 / seconds,
        cores_util,
        proxy,
    }
}

/// One request each way before measuring anything: both paths answer 200 with the echo of the
/// request (or, on an embeddings path, an OpenAI-shaped embeddings list). Returns the reply size.
async fn check_path(target: SocketAddr, path: &http::Uri, what: &str) -> Result<usize, String> {
    let mut sender = connect(target).await?;
    let req = Request::post(path.clone())
        .header(HOST, target.to_string())
        .header(AUTHORIZATION, AUTH)
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from_static(BODY)))
        .expect("valid request");
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("{what}: {e}"))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("{what}: {e}"))?
        .to_bytes();
    let echo = body.as_ref() == BODY;
    let embeddings = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|j| j.pointer("/data/0/embedding").map(|_| ()))
        .is_some();
    if status != StatusCode::OK || !(echo || embeddings) {
        return Err(format!(
            "{what}: status {status}, unexpected body {}",
            String::from_utf8_lossy(&body)
        ));
    }
    Ok(body.len())
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

fn report(s: &Settings, results: &[RunResult], pinned: bool) -> String {
    let mut out = String::new();
    let header = [
        "scenario",
        "path",
        "req/s",
        "p50 ms",
        "p99 ms",
        "+p50 ms",
        "+p99 ms",
        "tput x",
        "lag p50",
        "lag p99",
        "proxy us/req",
        "(stat)",
        "x nginx",
        "x relay",
        "proxy core%",
        "proxy MiB",
        "bench%",
        "core0%",
        "core1%",
        "errors",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    for r in results {
        let direct = results
            .iter()
            .find(|d| d.load == r.load && d.path == Path::Direct);
        let (added50, added99, ratio) = match (r.path, direct) {
            (Path::Direct, _) | (_, None) => ("-".into(), "-".into(), "-".into()),
            (_, Some(d)) => (
                f3(r.p(0.5) - d.p(0.5)),
                f3(r.p(0.99) - d.p(0.99)),
                format!("{:.2}", r.throughput / d.throughput),
            ),
        };
        // CPU per request as a ratio to nginx's and the relay's in the same scenario (the
        // relay runs only in the split placement, so shared-core rows have no relay ratio).
        let cpu_ratio = |to: Path| {
            let theirs = find_run(results, r.load, to)
                .and_then(|t| t.proxy.as_ref())
                .map(|p| p.cpu_us_per_request);
            match (r.proxy.as_ref(), theirs) {
                (Some(p), Some(t)) if r.path != to => format!("{:.2}", p.cpu_us_per_request / t),
                _ => "-".into(),
            }
        };
        let nginx_here = match r.path {
            Path::Shared | Path::NginxShared => Path::NginxShared,
            _ => Path::Nginx,
        };
        let ec = r.proxy.as_ref();
        let core = |i: usize| r.cores_util.get(i).map_or("-".into(), |u| f1(u * 100.0));
        let mut errors = r.errors.to_string();
        if r.errors > 0 {
            errors.push_str(" (!)");
        }
        rows.push(vec![
            r.load.label(s.connections),
            r.path.label().into(),
            format!("{:.0}", r.throughput),
            f3(r.p(0.5)),
            f3(r.p(0.99)),
            added50,
            added99,
            ratio,
            match r.load {
                Load::Open(_) => f3(r.lag_p(0.5)),
                Load::Closed => "-".into(),
            },
            match r.load {
                Load::Open(_) => f3(r.lag_p(0.99)),
                Load::Closed => "-".into(),
            },
            ec.map_or("-".into(), |e| f1(e.cpu_us_per_request)),
            ec.map_or("-".into(), |e| f1(e.stat_us_per_request)),
            cpu_ratio(nginx_here),
            cpu_ratio(Path::Relay),
            ec.map_or("-".into(), |e| f1(e.util * 100.0)),
            ec.map_or("-".into(), |e| f1(e.peak_mib)),
            f1(r.self_util * 100.0),
            core(EMBEDCAR_CORE),
            core(BENCH_CORE),
            errors,
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, v)| {
                if c < 2 {
                    format!("{v:<w$}", w = widths[c])
                } else {
                    format!("{v:>w$}", w = widths[c])
                }
            })
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    let legend = [
        "req/s        200 answers per second in the measured window",
        "p50, p99     latency; open loop: from the scheduled send time",
        "+p50, +p99   minus the direct run of the same scenario",
        "tput x       throughput / direct throughput",
        "lag          how late the load generator sent vs. its schedule (part of the latency)",
        "proxy ...    the proxy under test: embedcar or nginx (child process on core 0) or the tcp",
        "             relay (a thread on core 0: no HTTP, just bytes; the floor of any proxy here);",
        "             `shared core`: the proxy on core 1 beside the load generator and upstream",
        "us/req       proxy CPU time (user+system, all threads) per request, process CPU clock",
        "(stat)       the same from /proc/<pid>/stat utime+stime (tick-sampled cross-check)",
        "x nginx      us/req / nginx's us/req, same scenario and placement, same run",
        "x relay      us/req / the tcp relay's us/req, same scenario, same run",
        "core%        proxy CPU time / wall time; 100 = its core is saturated",
        "MiB          proxy peak RSS (VmHWM; a fresh process per run)",
        "bench%       load generator + fake upstream CPU / wall time (core 1)",
        "core0/1%     whole-core busy time (/proc/stat), other load included",
    ];
    let _ = writeln!(out);
    for l in legend {
        let _ = writeln!(out, "  {l}");
    }
    for r in results {
        let label = format!("{} {}", r.load.label(s.connections), r.path.label());
        let proxy = r.proxy.as_ref().map_or(0.0, |p| p.util);
        if !pinned {
            // Our threads move between cores: only the total says anything.
            let other = r.cores_util.iter().sum::<f64>() - proxy - r.self_util;
            if other > MAX_FOREIGN_LOAD {
                let _ = writeln!(
                    out,
                    "warning: during {label}, other processes or interrupts took {:.0}% of a \
                     core: its figures are disturbed",
                    other * 100.0
                );
            }
            continue;
        }
        let other = |core: usize, ours: f64| {
            r.cores_util
                .get(core)
                .map_or(0.0, |busy| (busy - ours).max(0.0))
        };
        // A direct run does not use core 0 (only the proxy lives there); a shared-core run
        // puts the proxy on core 1.
        let (core0, core1) = match (&r.proxy, r.path) {
            (Some(_), Path::Shared | Path::NginxShared) => (
                r.cores_util.get(EMBEDCAR_CORE).copied().unwrap_or(0.0),
                other(BENCH_CORE, r.self_util + proxy),
            ),
            (Some(_), _) => (other(EMBEDCAR_CORE, proxy), other(BENCH_CORE, r.self_util)),
            (None, _) => (0.0, other(BENCH_CORE, r.self_util)),
        };
        if core0.max(core1) > MAX_FOREIGN_LOAD {
            let _ = writeln!(
                out,
                "warning: during {label}, other processes or interrupts took {:.0}% of core 0 \
                 and {:.0}% of core 1: its figures are disturbed",
                core0 * 100.0,
                core1 * 100.0
            );
        }
    }
    out
}

/// The run of `path` in scenario `load`, if there was one.
fn find_run(results: &[RunResult], load: Load, path: Path) -> Option<&RunResult> {
    results.iter().find(|r| r.load == load && r.path == path)
}

/// The issue's targets, one line each. `None` when a figure is missing.
fn targets(results: &[RunResult]) -> Vec<String> {
    let find = |load: Load, path: Path| {
        results
            .iter()
            .find(move |r| r.load == load && r.path == path)
    };
    let verdict = |ok: bool| if ok { "PASS" } else { "MISS" };
    let mut lines = Vec::new();
    match find(Load::Closed, Path::Through).and_then(|r| r.proxy.as_ref()) {
        Some(e) => lines.push(format!(
            "TARGET cpu_per_request_us <= {TARGET_CPU_US} (closed loop, saturation): {:.1} {}",
            e.cpu_us_per_request,
            verdict(e.cpu_us_per_request <= TARGET_CPU_US)
        )),
        None => lines.push(format!(
            "TARGET cpu_per_request_us <= {TARGET_CPU_US}: not measured"
        )),
    }
    let rate = Load::Open(TARGET_ADDED_P50_RATE);
    // The latency target is read in the shared-core placement (same cores as the direct run);
    // the split placement's figure and its floor follow as notes.
    let added = |path: Path| match (find(rate, Path::Direct), find(rate, path)) {
        (Some(d), Some(t)) => Some(t.p(0.5) - d.p(0.5)),
        _ => None,
    };
    match added(Path::Shared) {
        Some(a) => lines.push(format!(
            "TARGET added_p50_ms_at_{TARGET_ADDED_P50_RATE}rps <= {TARGET_ADDED_P50_MS} (embedcar on the bench's core): {a:.3} {}",
            verdict(a <= TARGET_ADDED_P50_MS)
        )),
        None => lines.push(format!(
            "TARGET added_p50_ms_at_{TARGET_ADDED_P50_RATE}rps <= {TARGET_ADDED_P50_MS}: not measured (BENCH_RATES lacks {TARGET_ADDED_P50_RATE}, or not pinned)"
        )),
    }
    if let Some(a) = added(Path::Through) {
        lines.push(format!(
            "NOTE added_p50_ms_at_{TARGET_ADDED_P50_RATE}rps, embedcar alone on core 0: {a:.3}{}",
            added(Path::Relay)
                .map(|r| format!(" (a bare tcp relay there: {r:.3})"))
                .unwrap_or_default()
        ));
    }
    let peak = results
        .iter()
        .filter(|r| matches!(r.path, Path::Through | Path::Shared))
        .filter_map(|r| r.proxy.as_ref().map(|e| e.peak_mib))
        .fold(f64::NAN, f64::max);
    if peak.is_finite() {
        lines.push(format!(
            "TARGET peak_memory_mib < {TARGET_MEMORY_MIB}: {peak:.1} {}",
            verdict(peak < TARGET_MEMORY_MIB)
        ));
    } else {
        lines.push(format!(
            "TARGET peak_memory_mib < {TARGET_MEMORY_MIB}: not measured"
        ));
    }
    lines
}

/// The issue's same-run comparisons with nginx and the bare relay: one line each, empty when
/// nginx did not run.
fn nginx_targets(results: &[RunResult], later_rounds: &[RunResult]) -> Vec<String> {
    let verdict = |ok: bool| if ok { "PASS" } else { "MISS" };
    let mut lines = Vec::new();
    // Each closed-loop round's CPU per request, by path, in round order.
    let per_round = |path: Path| -> Vec<f64> {
        results
            .iter()
            .chain(later_rounds)
            .filter(|r| r.load == Load::Closed && r.path == path)
            .filter_map(|r| r.proxy.as_ref().map(|p| p.cpu_us_per_request))
            .collect()
    };
    let (ec, ngx, relay) = (
        per_round(Path::Through),
        per_round(Path::Nginx),
        per_round(Path::Relay),
    );
    if ec.is_empty() || ngx.len() != ec.len() {
        return lines;
    }
    let ratios =
        |theirs: &[f64]| -> Vec<f64> { ec.iter().zip(theirs).map(|(e, t)| e / t).collect() };
    let x_nginx = ratios(&ngx);
    let ratio = median(&x_nginx);
    lines.push(format!(
        "TARGET cpu_per_request_x_nginx <= {TARGET_CPU_X_NGINX:.2} (closed loop, saturation): embedcar {} / nginx {} us = {ratio:.2}{} {}",
        spread(&ec, 1),
        spread(&ngx, 1),
        rounds_note(&x_nginx),
        verdict(ratio <= TARGET_CPU_X_NGINX)
    ));
    if relay.len() == ec.len() {
        let x_relay = ratios(&relay);
        let ratio = median(&x_relay);
        let nginx_x_relay: Vec<f64> = ngx.iter().zip(&relay).map(|(n, r)| n / r).collect();
        lines.push(format!(
            "STRETCH cpu_per_request_x_relay <= {STRETCH_CPU_X_RELAY:.2}: embedcar {} / tcp relay {} us = {ratio:.2}{} {} (nginx: {:.2})",
            spread(&ec, 1),
            spread(&relay, 1),
            rounds_note(&x_relay),
            verdict(ratio <= STRETCH_CPU_X_RELAY),
            median(&nginx_x_relay)
        ));
    }
    if let (Some(e), Some(n)) = (
        find_run(results, Load::Closed, Path::Through),
        find_run(results, Load::Closed, Path::Nginx),
    ) {
        lines.push(format!(
            "NOTE throughput at saturation: embedcar {:.0} / nginx {:.0} req/s = {:.2}",
            e.throughput,
            n.throughput,
            e.throughput / n.throughput
        ));
    }
    let rate = Load::Open(TARGET_ADDED_P50_RATE);
    let added = |path: Path| match (
        find_run(results, rate, Path::Direct),
        find_run(results, rate, path),
    ) {
        (Some(d), Some(t)) => Some(t.p(0.5) - d.p(0.5)),
        _ => None,
    };
    if let (Some(e), Some(n)) = (added(Path::Shared), added(Path::NginxShared)) {
        lines.push(format!(
            "TARGET added_p50_ms_at_{TARGET_ADDED_P50_RATE}rps <= nginx's (both on the bench's core): embedcar {e:.3}, nginx {n:.3} {}",
            verdict(e <= n)
        ));
    }
    if let (Some(e), Some(n)) = (added(Path::Through), added(Path::Nginx)) {
        lines.push(format!(
            "NOTE added_p50_ms_at_{TARGET_ADDED_P50_RATE}rps alone on core 0: embedcar {e:.3}, nginx {n:.3}{}",
            added(Path::Relay)
                .map(|r| format!(", tcp relay {r:.3}"))
                .unwrap_or_default()
        ));
    }
    let peak = |paths: [Path; 2]| {
        results
            .iter()
            .filter(|r| paths.contains(&r.path))
            .filter_map(|r| r.proxy.as_ref().map(|e| e.peak_mib))
            .fold(f64::NAN, f64::max)
    };
    let (e, n) = (
        peak([Path::Through, Path::Shared]),
        peak([Path::Nginx, Path::NginxShared]),
    );
    if e.is_finite() && n.is_finite() {
        lines.push(format!(
            "NOTE peak_memory_mib: embedcar {e:.1}, nginx {n:.1} (x nginx {:.2})",
            e / n
        ));
    }
    lines
}

/// The median of a few figures (the mean of the middle two for an even count).
fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// `median` alone for one figure, `median [min–max]` for several.
fn spread(v: &[f64], decimals: usize) -> String {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    match v.len() {
        0 => "-".into(),
        1 => format!("{:.decimals$}", v[0]),
        _ => format!("{:.decimals$} [{lo:.decimals$}-{hi:.decimals$}]", median(v)),
    }
}

/// For several rounds: how many, and each round's ratio.
fn rounds_note(ratios: &[f64]) -> String {
    if ratios.len() < 2 {
        return String::new();
    }
    let each: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
    format!(
        " (median of {} alternating rounds: {})",
        ratios.len(),
        each.join(", ")
    )
}

/// The same figures for the bare TCP relay, to tell embedcar's own cost from the machine's.
fn floor_notes(results: &[RunResult]) -> Vec<String> {
    let find = |load: Load, path: Path| {
        results
            .iter()
            .find(move |r| r.load == load && r.path == path)
    };
    let mut lines = Vec::new();
    let cpu = |r: Option<&RunResult>| {
        r.and_then(|r| r.proxy.as_ref())
            .map(|p| p.cpu_us_per_request)
    };
    if let (Some(relay), Some(ec)) = (
        cpu(find(Load::Closed, Path::Relay)),
        cpu(find(Load::Closed, Path::Through)),
    ) {
        lines.push(format!(
            "FLOOR cpu_per_request_us, closed loop: tcp relay {relay:.1}, embedcar {ec:.1} ({:+.1} above the relay)",
            ec - relay
        ));
    }
    let mut loads: Vec<Load> = Vec::new();
    for r in results {
        if matches!(r.load, Load::Open(_)) && !loads.contains(&r.load) {
            loads.push(r.load);
        }
    }
    for load in loads {
        if let (Some(d), Some(relay), Some(ec)) = (
            find(load, Path::Direct),
            find(load, Path::Relay),
            find(load, Path::Through),
        ) {
            let (relay50, ec50) = (relay.p(0.5) - d.p(0.5), ec.p(0.5) - d.p(0.5));
            let Load::Open(rate) = load else { continue };
            lines.push(format!(
                "FLOOR added_p50_ms at {rate}/s: tcp relay {relay50:.3}, embedcar {ec50:.3} ({:+.3} above the relay)",
                ec50 - relay50
            ));
        }
    }
    lines
}

// ---------------------------------------------------------------------------------------------
// main
// ---------------------------------------------------------------------------------------------

fn main() -> ExitCode {
    let s = Settings::from_env();
    let pin = s.pin;
    run_pinned("passthrough bench", pin, |pinned| bench(s, pinned))
}

async fn bench(s: Settings, pinned: bool) -> Result<ExitCode, String> {
    let fake = fake_openai::FakeUpstream::start_with(fake_openai::FakeOptions {
        // The log of requests would grow without bound and slow the fake down.
        record_requests: false,
        ..fake_openai::FakeOptions::default()
    })
    .await;
    let upstream = fake.url();

    let reply_len = check_path(fake.addr(), &s.path, "direct").await?;
    println!("embedcar pass-through benchmark");
    println!(
        "  request: POST {}, {} byte JSON body, {reply_len} byte reply; {} connections; warm-up {:.1} s + {:.1} s measured per run{}",
        s.path,
        BODY.len(),
        s.connections,
        s.warmup.as_secs_f64(),
        s.measure.as_secs_f64(),
        if s.smoke { " (test mode: `--bench` not given, figures not meaningful)" } else { "" }
    );
    println!(
        "  bench process (load generator + fake upstream {upstream}): pid {}, cpus {}",
        std::process::id(),
        status_field("self", "Cpus_allowed_list").unwrap_or_default()
    );
    let config: Vec<String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("EMBEDCAR_"))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let config: Vec<String> = engine_env()
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .chain(config)
        .collect();
    println!(
        "  embedcar config: defaults{}",
        if config.is_empty() {
            String::new()
        } else {
            format!(" + {}", config.join(" "))
        }
    );
    if let Ok(l) = std::fs::read_to_string("/proc/loadavg") {
        let one: f64 = l
            .split_whitespace()
            .next()
            .and_then(|x| x.parse().ok())
            .unwrap_or(0.0);
        println!("  load average before the run: {}", l.trim());
        if one > 0.5 {
            println!("  warning: the machine is busy; other load on the two cores skews every figure (see core0%/core1%)");
        }
    }

    let mut loads = vec![Load::Closed];
    loads.extend(s.rates.iter().map(|r| Load::Open(*r)));
    let mut results = Vec::new();
    let mut later_rounds = Vec::new();
    let mut embedcar_cpus = String::new();
    let mut nginx_cpus = String::new();
    let nginx = if s.nginx { nginx_bin() } else { None };
    for load in loads {
        let direct = run(&s, load, Path::Direct, fake.addr(), ProxyCpu::None).await;
        results.push(direct);

        // The closed loop's proxies again, in turn, `BENCH_ROUNDS` times: the host's noise
        // moves every figure between runs, and alternating lets each round's ratios compare
        // neighbours. Round one goes into the table; every round into the ROUNDS lines.
        let rounds = match load {
            Load::Closed => s.rounds,
            Load::Open(_) => 1,
        };
        for round in 0..rounds {
            let mut these = Vec::new();
            if s.floor {
                let relay = Relay::start(fake.addr(), pinned)?;
                let r = run(
                    &s,
                    load,
                    Path::Relay,
                    relay.addr,
                    ProxyCpu::Thread(relay.clock),
                )
                .await;
                relay.stop();
                these.push(r);
            }

            if let Some(bin) = &nginx {
                let (r, cpus) = run_nginx(&s, bin, load, Path::Nginx, fake.addr(), pinned).await?;
                nginx_cpus = cpus;
                these.push(r);
            }

            let (through, cpus) = run_through(&s, load, Path::Through, &upstream, pinned).await?;
            embedcar_cpus = cpus;
            these.push(through);
            if round == 0 {
                results.extend(these);
            } else {
                later_rounds.extend(these);
            }
        }

        // Latency again with embedcar on the bench's core: the same core count as the direct
        // run, and no wake-up of an idle core per hop (see README: on this VM a halted core
        // takes tens of microseconds to wake, more than embedcar's own work). nginx likewise,
        // so that the two are compared in the same placement.
        if matches!(load, Load::Open(_)) && pinned {
            if let Some(bin) = &nginx {
                let (r, _) =
                    run_nginx(&s, bin, load, Path::NginxShared, fake.addr(), pinned).await?;
                results.push(r);
            }
            let (shared, _) = run_through(&s, load, Path::Shared, &upstream, pinned).await?;
            results.push(shared);
        }
    }
    drop(fake);

    println!(
        "  embedcar: {} (fresh process per run), cpus {embedcar_cpus}; pinned: {}",
        embedcar_bin(),
        if pinned {
            format!("embedcar core {EMBEDCAR_CORE}, bench core {BENCH_CORE}")
        } else {
            "no".into()
        }
    );
    match &nginx {
        Some(bin) => println!(
            "  nginx: {} ({}; one process, fresh per run, upstream keep-alive, no access log), cpus {nginx_cpus}",
            bin.display(),
            nginx_version(bin)
        ),
        None if s.nginx => println!(
            "  nginx: not found (BENCH_NGINX_BIN, PATH, {}): its rows are skipped, and the ratios to it",
            NGINX_PATHS.join(", ")
        ),
        None => println!("  nginx: skipped (BENCH_NGINX=0)"),
    }
    println!();
    print!("{}", report(&s, &results, pinned));
    println!();
    if !s.smoke {
        for line in targets(&results) {
            println!("{line}");
        }
        for line in nginx_targets(&results, &later_rounds) {
            println!("{line}");
        }
        for line in floor_notes(&results) {
            println!("{line}");
        }
    }

    let mut broken = false;
    for r in results.iter().chain(&later_rounds) {
        if r.errors > 0 {
            let label = r.load.label(s.connections);
            let path = r.path.label();
            eprintln!(
                "errors in {label} {path}: {} of {} ({:.2}%), first: {}",
                r.errors,
                r.total,
                r.error_rate() * 100.0,
                r.first_error.as_deref().unwrap_or("?")
            );
        }
        if r.error_rate() > MAX_ERROR_RATE {
            broken = true;
        }
    }
    Ok(if broken {
        eprintln!(
            "more than {}% errors in a run: the measurement is not valid",
            MAX_ERROR_RATE * 100.0
        );
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
