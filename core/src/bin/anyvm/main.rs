//! `anyvm`: the operator's command line over the same API the bindings use.

mod app;
mod cmd;
mod progress;

use app::App;

use std::path::PathBuf;
use std::process::ExitCode;

use anyvm::{Client, ClientOptions, Config};
use clap::Parser;
use serde_json::json;

#[derive(Parser, Debug)]
#[command(
    name = "anyvm",
    version,
    about = "Drive VMs on libvirt/QEMU, VirtualBox and VMware through one interface"
)]
struct Cli {
    /// Backend URI: libvirt:qemu:///system, virtualbox, vmware:ws (default: config, then libvirt).
    #[arg(long, global = true, env = "ANYVM_BACKEND")]
    backend: Option<String>,
    /// Configuration file (default: ./anyvm.toml when present).
    #[arg(long, short = 'c', global = true, env = "ANYVM_CONFIG")]
    config: Option<PathBuf>,
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: cmd::Cmd,
}

/// The config file, the backend URI and the client options the command line asks for.
fn settings(cli: &Cli) -> anyvm::Result<(Option<Config>, String, ClientOptions)> {
    let config = match &cli.config {
        Some(p) => Some(Config::load(p)?),
        None if std::path::Path::new("anyvm.toml").exists() => Some(Config::load("anyvm.toml")?),
        None => None,
    };
    let backend = cli
        .backend
        .clone()
        .or_else(|| config.as_ref().map(Config::backend_uri))
        .unwrap_or_else(|| anyvm::DEFAULT_BACKEND.into());
    let opts = config
        .as_ref()
        .map(Config::client_options)
        .unwrap_or_default();
    Ok((config, backend, opts))
}

/// `anyvm doctor`: runs without a working backend (finding out why it does not work is the point).
async fn doctor(cli: &Cli) -> anyvm::Result<u8> {
    let (_, backend, opts) = settings(cli)?;
    let report = anyvm::doctor::run_all(&backend, opts).await;
    if cli.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"status": report.status(), "checks": report.checks})
            )
            .expect("json")
        );
    } else {
        print!("{}", report.render());
    }
    Ok(u8::from(report.failed()))
}

async fn build(cli: &Cli) -> anyvm::Result<App> {
    let (config, backend, opts) = settings(cli)?;
    let client = Client::connect_configured(&backend, opts, config).await?;
    Ok(App {
        client,
        json: cli.json,
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ANYVM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal: logs piped to files and batch systems stay plain.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("anyvm: error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let json = cli.json;
    let res = rt.block_on(async move {
        if matches!(cli.cmd, cmd::Cmd::Doctor) {
            return doctor(&cli).await;
        }
        let app = build(&cli).await?;
        cli.cmd.run(&app).await
    });
    match res {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            if json {
                println!(
                    "{}",
                    json!({"error": {"kind": e.kind(), "message": e.to_string()}})
                );
            }
            eprintln!("anyvm: error: {e}");
            ExitCode::from(1)
        }
    }
}
