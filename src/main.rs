//! The `bandsync` binary: the daemon (`bandsync run`) and the stage tech's CLI.

use anyhow::Context;
use bandsync::clock::NodeClock;
use bandsync::config::{FileConfig, RunArgs, RunConfig};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "bandsync", version, about = "Every box in the room plays the same click, on the same sample.",
    long_about = "Every box in the room plays the same click, on the same sample.\n\n\
Run `bandsync run` on each box (systemd does this for you); boxes of the same room find\n\
each other on the LAN. Flags override the config file (/etc/bandsync/bandsync.toml or\n\
--config), which overrides the embedded defaults.")]
struct Cli {
    /// Config file (TOML). Default: /etc/bandsync/bandsync.toml when it exists.
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon: play the room's click on this box.
    Run(RunArgs),
    /// List the audio output devices (ids for --audio).
    Devices,
}

fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BANDSYNC_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).with_writer(std::io::stderr).init();
}

fn main() {
    // First thing: the test clock's "start" is when the process began.
    let clock = NodeClock::from_env();
    let cli = Cli::parse();
    init_logs();
    let result = (|| -> anyhow::Result<()> {
        let clock = clock?;
        match cli.cmd {
            Cmd::Run(args) => {
                let (file, origin) = FileConfig::load(cli.config.as_deref())?;
                let cfg = RunConfig::build(&args, &file, origin.as_deref())?;
                bandsync::daemon::run(cfg, clock)
            }
            Cmd::Devices => {
                let devs = bandsync::audio::device::list_devices().context("cannot list audio devices")?;
                if devs.is_empty() {
                    println!("no output devices found (`bandsync run` would use the silent null sink)");
                }
                for d in devs {
                    println!("{} {:<40} {}", if d.is_default { "*" } else { " " }, d.id, d.description);
                }
                Ok(())
            }
        }
    })();
    if let Err(e) = result {
        eprintln!("bandsync: {e:#}");
        std::process::exit(2);
    }
}
