//! The fake OpenAI upstream as a stand-alone process, for tests and benchmarks that are not Rust
//! integration tests (a Python client test, a load generator, a compose demo) and for the quick
//! start.
//!
//! ```text
//! cargo run -p fake-openai -- [--host 127.0.0.1] [--port 0] [--dims 8]
//!     [--max-connections N] [--delay-ms N] [--stream-chunks N] [--stream-interval-ms N]
//!     [--capacity N] [--over-capacity queue|refuse] [--faults 429=0.2,503=0.1,...]
//! ```
//!
//! Prints exactly one line, `LISTENING http://HOST:PORT`, on stdout once bound (so a parent can
//! pass `--port 0` and read the port back), then serves until killed. When stdin is a pipe or a
//! socket it also exits when stdin reaches EOF, so a parent that dies (and so closes the pipe)
//! takes the fake down with it. Stdin that is a terminal, a file or /dev/null is ignored:
//! otherwise a process started in the background with stdin from /dev/null (a CI step, `cmd &`
//! in a script) would exit at once.
//!
//! Per-request steering works through the `x-fake-*` headers; counters are at
//! `GET /__fake/stats` (see the library's documentation, `src/lib.rs`). Requests are not
//! recorded here: nobody could read the log, and a long benchmark would grow it without bound.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use clap::Parser;
use fake_openai::{Behavior, FakeOptions, FakeUpstream, FaultMix, OverCapacity};

#[derive(Parser, Debug)]
#[command(about = "A fake OpenAI upstream (embeddings, chat, models, echo) for embedcar tests")]
struct Args {
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port to bind; 0 picks a free one (read it from the LISTENING line).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Embedding length when a request has no `dimensions`.
    #[arg(long, default_value_t = 8)]
    dims: usize,
    /// Serve at most this many connections at once (the rest wait in the accept backlog).
    #[arg(long)]
    max_connections: Option<usize>,
    /// Delay every answer by this many milliseconds (simulated upstream latency).
    #[arg(long)]
    delay_ms: Option<u64>,
    /// Chunks in a streamed chat completion.
    #[arg(long, default_value_t = 5)]
    stream_chunks: usize,
    /// Milliseconds between two chunks of a streamed chat completion.
    #[arg(long, default_value_t = 10)]
    stream_interval_ms: u64,
    /// Work on at most N embeddings calls at once (a model server's workers).
    #[arg(long)]
    capacity: Option<usize>,
    /// Beyond --capacity: `queue` (Ollama, vLLM) or `refuse` with 429 "Model is overloaded"
    /// (text-embeddings-inference).
    #[arg(long, default_value = "queue", value_parser = ["queue", "refuse"])]
    over_capacity: String,
    /// Random faults on embeddings calls, e.g. `429=0.2,503=0.1,drop=0.05,truncate=0.05,hang=0.2`.
    #[arg(long, value_parser = FaultMix::parse)]
    faults: Option<FaultMix>,
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args = Args::parse();
    let opts = FakeOptions {
        dims: args.dims,
        max_connections: args.max_connections,
        stream_chunks: args.stream_chunks,
        stream_interval: Duration::from_millis(args.stream_interval_ms),
        record_requests: false,
        capacity: args.capacity,
        over_capacity: if args.over_capacity == "refuse" {
            OverCapacity::Refuse
        } else {
            OverCapacity::Queue
        },
        faults: args.faults.unwrap_or_default(),
        ..FakeOptions::default()
    };
    let fake = match FakeUpstream::bind(SocketAddr::new(args.host, args.port), opts).await {
        Ok(f) => f,
        Err(e) => {
            eprintln!("fake-openai: cannot bind {}:{}: {e}", args.host, args.port);
            std::process::exit(1);
        }
    };
    if let Some(ms) = args.delay_ms {
        fake.set_behavior(Behavior::Delay(Duration::from_millis(ms)));
    }

    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "LISTENING {}", fake.url());
        let _ = out.flush();
    }

    let stdin_eof = async {
        if stdin_is_parent_pipe() {
            // A plain thread: tokio's stdin would also block a runtime thread, and this one
            // must never stop the process from exiting on a signal.
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
                let _ = tx.send(());
            });
            let _ = rx.await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        _ = stdin_eof => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate() => {}
    }
    drop(fake);
}

/// Whether stdin is a pipe or a socket, i.e. most likely held open by a parent process.
#[cfg(unix)]
fn stdin_is_parent_pipe() -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileTypeExt;
    let Ok(fd) = std::io::stdin().as_fd().try_clone_to_owned() else {
        return false;
    };
    match std::fs::File::from(fd).metadata() {
        Ok(m) => m.file_type().is_fifo() || m.file_type().is_socket(),
        Err(_) => false,
    }
}

#[cfg(not(unix))]
fn stdin_is_parent_pipe() -> bool {
    false
}

#[cfg(unix)]
async fn terminate() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending::<()>().await,
    }
}

#[cfg(not(unix))]
async fn terminate() {
    std::future::pending::<()>().await
}
