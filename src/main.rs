//! The `embedcar` binary: flags, logging, configuration, then [`embedcar::run`] until SIGTERM
//! or SIGINT.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use embedcar::config::{Config, LogFormat, Overrides};
use http_body_util::{BodyExt, Empty, Limited};
use tracing_subscriber::EnvFilter;

/// jemalloc, not glibc malloc: the engine allocates and frees a 6 KiB vector per cache miss,
/// and under that churn glibc's bins fragment (measurements in benches/README.md). The
/// `jemalloc` feature (on by default) is the binary's choice; the library makes none.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// What `--help` says embedcar is for, before the flags.
const ABOUT: &str = "A sidecar reverse proxy for the OpenAI API. Run it next to your application \
and point the OpenAI client at it (OPENAI_BASE_URL=http://127.0.0.1:8080/v1): every request \
passes through to the upstream with pooled connections, concurrency limits, deadlines and \
retries; embeddings requests are also cached, coalesced and batched.";

/// Where the rest of the configuration comes from, after the flags.
const AFTER_HELP: &str = "Configuration: built-in defaults, then the --config file (TOML; see \
config/embedcar.toml), then environment variables EMBEDCAR_<SECTION>__<KEY> (e.g. \
EMBEDCAR_UPSTREAM__URL=https://api.openai.com, EMBEDCAR_LIMITS__MAX_CONCURRENCY=64), then the \
flags above. `embedcar check-config` prints the result. The API key is never configured here: \
callers send their own, or credentials.api_key_env / api_key_file name one.";

#[derive(Parser, Debug)]
#[command(version, about = ABOUT, after_help = AFTER_HELP)]
struct Cli {
    /// TOML configuration file; without one, the built-in defaults apply.
    #[arg(long, global = true, env = "EMBEDCAR_CONFIG")]
    config: Option<PathBuf>,
    /// Traffic address, e.g. 127.0.0.1:8080 (port 0 picks a free port).
    #[arg(long, global = true)]
    listen: Option<std::net::SocketAddr>,
    /// Admin address for /healthz, /readyz and /metrics.
    #[arg(long, global = true)]
    admin_listen: Option<std::net::SocketAddr>,
    /// Upstream base URL, e.g. https://api.openai.com.
    #[arg(long, global = true)]
    upstream: Option<String>,
    /// Log format: text (one readable line per event) or json (one object per line, for a log
    /// collector) [default: text].
    #[arg(long, global = true, value_name = "text|json", value_parser = parse_log_format)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate the configuration and print the effective one (secrets masked); exit 0 if it is
    /// valid, 2 if not.
    CheckConfig,
    /// Ask the running embedcar's admin /readyz whether it is ready; exit 0 if it is, 1 if not
    /// (draining, unreachable, or no answer in time). For container health checks, which have
    /// no shell or curl to do it with.
    Health(HealthArgs),
}

#[derive(Args, Debug)]
struct HealthArgs {
    /// Probe this URL instead of the configured admin address, e.g.
    /// http://127.0.0.1:9901/readyz (a URL with no path gets /readyz).
    #[arg(long, conflicts_with = "addr")]
    url: Option<String>,
    /// Probe /readyz on this admin address instead of the configured one, e.g. 127.0.0.1:9901.
    #[arg(long)]
    addr: Option<SocketAddr>,
    /// Give up after this long, e.g. 500ms or 2s [default: 2s].
    #[arg(long, value_parser = embedcar::durations::parse)]
    timeout: Option<Duration>,
}

fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    match s {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        other => Err(format!("unknown log format {other:?}; use text or json")),
    }
}

/// Exit status for an unusable configuration (as in check-config).
const EXIT_BAD_CONFIG: u8 = 2;

/// Exit status of `health` for anything but ready. 1, not [`EXIT_BAD_CONFIG`]: Docker reads 1
/// as unhealthy and reserves 2, so every failure, a bad config included, is 1.
const EXIT_NOT_READY: u8 = 1;

/// How long `health` waits for /readyz. Short: the admin port answers at once even when the
/// traffic port is saturated, so a slow answer already means something is wrong, and a probe
/// must end well inside the health check's own timeout (Docker's default is 30 s).
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

/// The readiness endpoint on the admin listener.
const READYZ_PATH: &str = "/readyz";

/// The longest /readyz body read back for the one-line report ("draining").
const HEALTH_BODY_LIMIT: usize = 1024;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let overrides = Overrides {
        listen: cli.listen,
        admin_listen: cli.admin_listen,
        upstream: cli.upstream.clone(),
        log_format: cli.log_format,
    };
    // EMBEDCAR_CONFIG names the file; it is not a config key.
    std::env::remove_var("EMBEDCAR_CONFIG");
    if let Some(Command::Health(args)) = &cli.command {
        return health(args, cli.config.as_deref(), &overrides);
    }
    let config = match Config::load(cli.config.as_deref(), &overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("embedcar: {e}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    if let Some(Command::CheckConfig) = cli.command {
        for warning in config.warnings() {
            eprintln!("embedcar: warning: {warning}");
        }
        print!("{}", config.to_toml());
        return ExitCode::SUCCESS;
    }
    init_tracing(&config);
    let runtime = match build_runtime(config.server.worker_threads) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("embedcar: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "embedcar failed");
            eprintln!("embedcar: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `embedcar health`: one probe of /readyz, one line saying how it went.
fn health(args: &HealthArgs, config: Option<&std::path::Path>, overrides: &Overrides) -> ExitCode {
    let target = match probe_target(args, config, overrides) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("embedcar health: {e}");
            return ExitCode::from(EXIT_NOT_READY);
        }
    };
    let timeout = args.timeout.unwrap_or(HEALTH_TIMEOUT);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("embedcar health: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_NOT_READY);
        }
    };
    let url = target.url();
    match runtime.block_on(async { tokio::time::timeout(timeout, probe(&target)).await }) {
        Ok(Ok((status, _))) if status == http::StatusCode::OK => {
            println!(
                "embedcar health: ready ({url} answered {})",
                status.as_u16()
            );
            ExitCode::SUCCESS
        }
        Ok(Ok((status, body))) => {
            let said = body.trim();
            let said = if said.is_empty() {
                String::new()
            } else {
                format!(": {said}")
            };
            eprintln!(
                "embedcar health: not ready ({url} answered {}{said})",
                status.as_u16()
            );
            ExitCode::from(EXIT_NOT_READY)
        }
        Ok(Err(e)) => {
            eprintln!("embedcar health: unreachable ({url}: {e})");
            ExitCode::from(EXIT_NOT_READY)
        }
        Err(_) => {
            eprintln!(
                "embedcar health: timed out (no answer from {url} within {})",
                embedcar::durations::Human(timeout)
            );
            ExitCode::from(EXIT_NOT_READY)
        }
    }
}

/// Where `health` sends its request.
#[derive(Debug, PartialEq, Eq)]
struct ProbeTarget {
    /// What to connect to: `host:port`, an IP literal, or a name to resolve.
    host: String,
    port: u16,
    path: String,
}

impl ProbeTarget {
    fn from_addr(addr: SocketAddr) -> ProbeTarget {
        let addr = loopback_if_unspecified(addr);
        ProbeTarget {
            host: addr.ip().to_string(),
            port: addr.port(),
            path: READYZ_PATH.to_string(),
        }
    }

    fn authority(&self) -> String {
        match self.host.parse::<IpAddr>() {
            Ok(IpAddr::V6(ip)) => format!("[{ip}]:{}", self.port),
            _ => format!("{}:{}", self.host, self.port),
        }
    }

    fn url(&self) -> String {
        format!("http://{}{}", self.authority(), self.path)
    }
}

/// The address the instance's admin listener serves, found the way the instance finds it (the
/// same file, environment and flags), unless `--url` or `--addr` names one.
fn probe_target(
    args: &HealthArgs,
    config: Option<&std::path::Path>,
    overrides: &Overrides,
) -> Result<ProbeTarget, String> {
    if let Some(url) = &args.url {
        return parse_probe_url(url);
    }
    if let Some(addr) = args.addr {
        return Ok(ProbeTarget::from_addr(addr));
    }
    let config = Config::load(config, overrides)
        .map_err(|e| format!("cannot tell where the admin listener is: {e}"))?;
    Ok(ProbeTarget::from_addr(config.server.admin_listen))
}

/// An instance listening on every address (0.0.0.0 or [::], as in a container) is reachable on
/// loopback, and the unspecified address is no destination at all.
fn loopback_if_unspecified(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port())
        }
        _ => addr,
    }
}

fn parse_probe_url(url: &str) -> Result<ProbeTarget, String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("--url {url:?} is not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!(
            "--url {url:?}: only http:// (the admin listener has no TLS)"
        ));
    }
    let host = uri
        .host()
        .ok_or_else(|| format!("--url {url:?} has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(80);
    let path = match uri.path_and_query().map(|pq| pq.as_str()) {
        None | Some("/") | Some("") => READYZ_PATH.to_string(),
        Some(pq) => pq.to_string(),
    };
    let target = ProbeTarget { host, port, path };
    Ok(match target.host.parse::<IpAddr>() {
        Ok(ip) => ProbeTarget {
            path: target.path,
            ..ProbeTarget::from_addr(SocketAddr::new(ip, target.port))
        },
        Err(_) => target,
    })
}

/// One GET over one fresh HTTP/1.1 connection: the status and the start of the body.
async fn probe(target: &ProbeTarget) -> Result<(http::StatusCode, String), embedcar::Error> {
    let stream = tokio::net::TcpStream::connect((target.host.as_str(), target.port)).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = http::Request::get(target.path.as_str())
        .header(http::header::HOST, target.authority())
        .body(Empty::<Bytes>::new())?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = Limited::new(response.into_body(), HEALTH_BODY_LIMIT)
        .collect()
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
        .unwrap_or_default();
    Ok((status, body))
}

async fn serve(config: Config) -> Result<(), embedcar::Error> {
    // Signal handlers go in before anything is announced, so a SIGTERM sent as soon as the
    // "listening" line appears is a graceful shutdown, not the default kill.
    let shutdown = shutdown_signal()?;
    let state = embedcar::AppState::new(config)?;
    let (listener, admin) = embedcar::bind(&state.config).await?;
    embedcar::run(state, listener, admin, shutdown).await
}

/// Exit status after a second signal cut the drain short: 128 + SIGINT, as a shell reports a
/// process stopped by Ctrl-C.
const EXIT_INTERRUPTED: i32 = 130;

/// Registers for SIGTERM (what Kubernetes and Docker send) and SIGINT (Ctrl-C) now, and returns
/// a future that resolves on the first of them. A second one, during the drain, exits at once:
/// an operator who presses Ctrl-C again does not want to wait out the grace period.
#[cfg(unix)]
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            exit_at_once();
        });
    })
}

#[cfg(not(unix))]
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
        tokio::spawn(async {
            let _ = tokio::signal::ctrl_c().await;
            exit_at_once();
        });
    })
}

fn exit_at_once() -> ! {
    tracing::warn!("second shutdown signal; exiting without waiting for the drain");
    std::process::exit(EXIT_INTERRUPTED)
}

/// The async runtime: `workers` threads, or one per CPU this process may use (its affinity and
/// cgroup share). The multi-threaded scheduler even with a single worker: on one CPU it costs
/// less per proxied request than the current-thread one (figures in benches/README.md), so one
/// scheduler serves every size.
fn build_runtime(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let workers = match workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
}

fn init_tracing(config: &Config) {
    let filter = EnvFilter::try_new(&config.log.level).unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match config.log.format {
        LogFormat::Text => builder.with_ansi(ansi).init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(url: Option<&str>, addr: Option<&str>) -> HealthArgs {
        HealthArgs {
            url: url.map(str::to_string),
            addr: addr.map(|a| a.parse().unwrap()),
            timeout: None,
        }
    }

    fn target(url: Option<&str>, addr: Option<&str>) -> ProbeTarget {
        probe_target(&args(url, addr), None, &Overrides::default()).unwrap()
    }

    #[test]
    fn an_admin_address_on_every_interface_is_probed_on_loopback() {
        assert_eq!(
            target(None, Some("0.0.0.0:9901")).url(),
            "http://127.0.0.1:9901/readyz"
        );
        assert_eq!(
            target(None, Some("[::]:9901")).url(),
            "http://[::1]:9901/readyz"
        );
        assert_eq!(
            target(None, Some("10.1.2.3:9")).url(),
            "http://10.1.2.3:9/readyz"
        );
        assert_eq!(
            target(Some("http://0.0.0.0:9901"), None).url(),
            "http://127.0.0.1:9901/readyz"
        );
    }

    #[test]
    fn a_url_keeps_its_path_and_host() {
        let t = target(Some("http://sidecar:9901/healthz"), None);
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("sidecar", 9901, "/healthz")
        );
        assert_eq!(
            target(Some("http://[::1]:7/"), None).url(),
            "http://[::1]:7/readyz"
        );
        assert!(parse_probe_url("https://127.0.0.1:9901").is_err());
        assert!(parse_probe_url("not a url").is_err());
    }

    #[test]
    fn without_an_override_the_configured_admin_address_is_probed() {
        let flags = Overrides {
            admin_listen: Some("0.0.0.0:9911".parse().unwrap()),
            ..Default::default()
        };
        let t = probe_target(&args(None, None), None, &flags).unwrap();
        assert_eq!(t.url(), "http://127.0.0.1:9911/readyz");
    }
}
