//! The `infergate` binary: parse the command line, hand over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use infergate::config::Config;

#[derive(Parser)]
#[command(name = "infergate", version, about = "Edge gateway for Python AI workers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the embedded default config when no --config is given).
    Serve {
        /// TOML config file; `INFERGATE__SECTION__KEY` variables override it.
        #[arg(long, short, env = "INFERGATE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Validate the config, check that every local and embedded pool's class
    /// imports and is a Model (as the start does), and print the effective
    /// config as TOML.
    CheckConfig {
        #[arg(long, short, env = "INFERGATE_CONFIG")]
        config: Option<PathBuf>,
        /// Skip importing the pools' classes.
        #[arg(long)]
        no_import: bool,
    },
    /// API keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Make a fresh key: prints it once, then the `[[auth.keys]]` lines
    /// (with its SHA-256 only) to paste into the config or keys file.
    New {
        /// Names the key in logs and metrics.
        #[arg(long)]
        id: String,
        #[arg(long)]
        tenant: String,
        #[arg(long, default_value = "standard")]
        tier: String,
    },
}

fn load(path: Option<&PathBuf>) -> Result<Config, ExitCode> {
    Config::load(path.map(PathBuf::as_path), std::env::vars()).map_err(|e| {
        eprintln!("infergate: invalid config: {e}");
        ExitCode::from(2)
    })
}

/// One malloc arena for the whole gateway. glibc gives each thread that
/// meets lock contention an arena of its own (up to 8 per core), and memory
/// freed in one arena serves only threads attached to it: a large tensor's
/// buffers, allocated on a request thread, freed on a bulk thread, then
/// needed again on another, stack up as one idle copy per arena. Eight
/// concurrent 7 MB JSON tensors left a peak RSS 2.7-3.0x their bodies with
/// glibc's default, 2.0x with one arena (`tests/tests/hostile.rs`,
/// concurrent large tensors). Small allocations are served from per-thread
/// caches first, so the shared arena's lock is rarely taken on the request
/// path. `INFERGATE_MALLOC=default`, or any `GLIBC_TUNABLES` malloc
/// setting, leaves glibc's defaults.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code, reason = "mallopt has no safe wrapper; see the SAFETY note")]
fn tune_malloc() {
    if std::env::var("INFERGATE_MALLOC").is_ok_and(|v| v == "default")
        || std::env::var("GLIBC_TUNABLES").is_ok_and(|v| v.contains("glibc.malloc"))
    {
        return;
    }
    // SAFETY: mallopt takes two integers and changes allocator settings
    // under glibc's own lock; it is called once, before any other thread
    // exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_malloc() {}

fn main() -> ExitCode {
    tune_malloc();
    let cli = Cli::parse();
    match cli.command {
        Command::Keys { command: KeysCommand::New { id, tenant, tier } } => {
            match infergate::policy::auth::new_key(&id, &tenant, &tier) {
                Ok((key, toml)) => {
                    #[expect(clippy::print_stdout, reason = "printing the key is this command's output")]
                    {
                        println!("# The key, shown only now; give it to the client:");
                        println!("#   {key}");
                        println!("# Paste into the config (or the keys file, as [[keys]]):");
                        print!("{toml}");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("infergate: cannot get random bytes for a key: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::CheckConfig { config, no_import } => match load(config.as_ref()) {
            Ok(cfg) => {
                if !no_import {
                    let checked = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|e| e.to_string())
                        .and_then(|rt| rt.block_on(infergate::supervisor::check(&cfg)).map_err(|e| e.to_string()));
                    if let Err(e) = checked {
                        eprintln!("infergate: {e}");
                        return ExitCode::from(2);
                    }
                }
                #[expect(clippy::print_stdout, reason = "printing the config is this command's output")]
                {
                    print!("{}", cfg.to_toml());
                }
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Serve { config } => {
            let cfg = match load(config.as_ref()) {
                Ok(cfg) => cfg,
                Err(code) => return code,
            };
            let _log_writer = infergate::telemetry::init(&cfg.log);
            infergate::telemetry::metrics::install();
            if config.is_none() {
                tracing::info!("no --config given: running the embedded default (local workers, in-memory state)");
            }
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("infergate: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            runtime.block_on(async {
                let shutdown = tokio_util::sync::CancellationToken::new();
                let trigger = shutdown.clone();
                tokio::spawn(async move {
                    infergate::server::shutdown_signal().await;
                    trigger.cancel();
                });
                // A reload reads the same file with the same overrides.
                let source = infergate::control::Source {
                    path: config.clone(),
                    env: std::env::vars().filter(|(k, _)| k.starts_with(infergate::config::ENV_PREFIX)).collect(),
                };
                match infergate::server::run(cfg, source, shutdown).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        tracing::error!("{e}");
                        eprintln!("infergate: {e}");
                        ExitCode::FAILURE
                    }
                }
            })
        }
    }
}
