//! `storaged --config FILE`: run one storage node.

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;

/// mimalloc rather than glibc's malloc: every I/O allocates and frees a few small buffers
/// and futures across threads, and glibc's allocator (arena locks, `malloc_consolidate`)
/// was ~6% of a storage node's CPU in 4 KiB random writes (perf, `basalt bench block`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "storaged", about = "Basalt storage daemon (metadata replica, chunk service, NBD export)")]
struct Args {
    /// Node configuration (JSON).
    #[arg(long, env = "BASALT_STORAGED_CONFIG")]
    config: std::path::PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,openraft=warn,quinn=warn".into()),
        )
        .init();
    let config = basalt_storaged::Config::load(&args.config)?;
    if config.file.sched_batch {
        // Before the runtime exists: every thread created from here on inherits the policy.
        batch_scheduling().context("sched_batch: setting SCHED_BATCH")?;
    }
    // The runtime is sized by the configuration, so it is built here rather than by
    // `#[tokio::main]`.
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(n) = config.file.worker_threads {
        runtime.worker_threads(n);
    }
    runtime.build().context("starting the async runtime")?.block_on(serve(config))
}

/// Puts the calling thread under `SCHED_BATCH` (nice level unchanged).
fn batch_scheduling() -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread and `param` is a valid sched_param for the call.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

async fn serve(config: basalt_storaged::Config) -> anyhow::Result<()> {
    let listeners = basalt_storaged::Listeners::bind(&config).await.context("binding listeners")?;
    let shutdown = CancellationToken::new();
    {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return,
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            shutdown.cancel();
        });
    }
    basalt_storaged::run(config, listeners, shutdown).await?;
    Ok(())
}
