//! The `bandsync` binary: the daemon (`bandsync run`) and the stage tech's CLI.

use anyhow::Context;
use bandsync::sys::clock::NodeClock;
use bandsync::node::config::{RunConfig, Settings};
use bandsync::core::timeline::{ChangeKind, Meter, Quantum, Tempo};
use bandsync::core::wire::{Query, Reply};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "bandsync",
    version,
    about = "Every box in the room plays the same click, on the same sample.",
    long_about = "Every box in the room plays the same click, on the same sample.\n\n\
Run `bandsync run` on each box (systemd does this for you); boxes of the same room find\n\
each other on the LAN. Flags override the config file (/etc/bandsync/bandsync.toml or\n\
--config), which overrides the embedded defaults."
)]
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
    Run(Settings),
    /// List the audio output devices (ids for --audio).
    Devices,
    /// Show the room as a node sees it: role, leader, epoch, pin, tempo, peers.
    Status {
        #[command(flatten)]
        to: To,
        /// Print JSON (the SPEC §5 fields) instead of a table.
        #[arg(long)]
        json: bool,
        /// Print the phone page's address as a QR code (default: when stdout is a
        /// terminal).
        #[arg(long, overrides_with = "no_qr")]
        qr: bool,
        /// Never print the QR code.
        #[arg(long)]
        no_qr: bool,
    },
    /// List the room's boxes with their clock figures (rtt, offset, uncertainty).
    Peers {
        #[command(flatten)]
        to: To,
        #[arg(long)]
        json: bool,
    },
    /// Make NODE (id or name) lead while it is alive. Replicated and persisted.
    Pin {
        /// Node id or name (see `bandsync peers`).
        #[arg(value_name = "NODE")]
        who: String,
        #[command(flatten)]
        to: To,
    },
    /// Remove the pin: the highest-ranked box leads again.
    Unpin {
        #[command(flatten)]
        to: To,
    },
    /// Change the room's tempo (20–400 BPM) at the next bar.
    Tempo {
        #[arg(allow_hyphen_values = true)]
        bpm: f64,
        #[command(flatten)]
        to: To,
        /// Land on the next beat instead of the next bar.
        #[arg(long)]
        now: bool,
    },
    /// Change the beats per bar (1–16) at the next bar.
    Meter {
        #[arg(allow_hyphen_values = true)]
        beats: i64,
        #[command(flatten)]
        to: To,
    },
    /// Start the room's click at the next bar.
    Start {
        #[command(flatten)]
        to: To,
    },
    /// Stop the room's click at the next beat.
    Stop {
        #[command(flatten)]
        to: To,
    },
    /// Print this box's room key (generated on first use). Give the same key to every
    /// box of the room with --room-key-file.
    RoomKey {
        /// State dir holding the key (default as for `bandsync run`).
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// Print the key of this file instead (checks that it is usable).
        #[arg(long, value_name = "PATH")]
        room_key_file: Option<PathBuf>,
    },
    /// Print the room's control PIN: phones need it to change tempo or transport
    /// (generated on first start, replicated through the room; the state dir holds the
    /// one in force). Set it with `bandsync run --control-pin`.
    ControlPin {
        /// State dir holding the PIN (default as for `bandsync run`).
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
}

/// How the CLI finds and authenticates to the room.
#[derive(clap::Args, Clone)]
struct To {
    /// A node to talk to, HOST:PORT of its QUIC endpoint (default: find the room by mDNS).
    #[arg(long, value_name = "HOST:PORT")]
    node: Option<String>,
    /// Room name (default: the config file's, else "default").
    #[arg(long)]
    room: Option<String>,
    /// Room key file (default: $BANDSYNC_ROOM_KEY, else the state dir's key).
    #[arg(long, value_name = "PATH")]
    room_key_file: Option<PathBuf>,
    /// State dir holding the room key (default as for `bandsync run`).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Interface to search on (repeatable; default all).
    #[arg(long = "interface", value_name = "NAME")]
    interface: Vec<String>,
}

fn target(to: &To, file: &Settings) -> anyhow::Result<bandsync::cli::Target> {
    let dir = to
        .state_dir
        .clone()
        .or(file.state_dir.clone())
        .unwrap_or_else(bandsync::node::config::default_state_dir);
    let key_file = to.room_key_file.clone().or(file.room_key_file.clone());
    let key = match key_file {
        Some(p) => bandsync::net::auth::RoomKey::load(Some(&p), &dir)?,
        None => {
            if std::env::var("BANDSYNC_ROOM_KEY").is_ok_and(|k| !k.trim().is_empty())
                || dir.join("room-key").exists()
            {
                bandsync::net::auth::RoomKey::load(None, &dir)?
            } else {
                anyhow::bail!("no room key: pass --room-key-file PATH or set BANDSYNC_ROOM_KEY (no key in {})", dir.display());
            }
        }
    };
    Ok(bandsync::cli::Target {
        node: to.node.clone(),
        room: to
            .room
            .clone()
            .or(file.room.clone())
            .unwrap_or_else(|| "default".into()),
        interfaces: if to.interface.is_empty() {
            file.interface.clone().unwrap_or_default()
        } else {
            to.interface.clone()
        },
        key,
    })
}

fn ask(to: &To, file: &Settings, q: Query) -> anyhow::Result<Reply> {
    let t = target(to, file)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(bandsync::cli::request(&t, q))
}

/// Pin (`Some`) or unpin (`None`), and wait until the room's status shows it (see
/// [`bandsync::cli::pin_confirmed`]: one connection, the status polled every 50 ms).
fn pin_confirmed(to: &To, file: &Settings, who: Option<String>) -> anyhow::Result<()> {
    let t = target(to, file)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    println!("{}", rt.block_on(bandsync::cli::pin_confirmed(&t, who))?);
    Ok(())
}

fn done(r: Reply) -> anyhow::Result<()> {
    match r {
        Reply::Done(m) => {
            println!("{m}");
            Ok(())
        }
        Reply::Error(m) => anyhow::bail!("{m}"),
        Reply::Status(_) => anyhow::bail!("unexpected status reply"),
    }
}

fn status(
    to: &To,
    file: &Settings,
    json: bool,
    peers_only: bool,
    qr: bool,
) -> anyhow::Result<()> {
    match ask(to, file, Query::Status)? {
        Reply::Status(j) => {
            let s: bandsync::core::room::Status =
                serde_json::from_str(&j).context("the node sent an unreadable status")?;
            if json {
                if peers_only {
                    println!("{}", serde_json::to_string_pretty(&s.peers)?);
                } else {
                    println!("{}", serde_json::to_string_pretty(&s)?);
                }
            } else if peers_only {
                print!("{}", bandsync::cli::format_peers(&s));
            } else {
                print!("{}", bandsync::cli::format_status(&s));
                if qr {
                    print!("{}", bandsync::cli::phone_qrs(&s));
                }
            }
            Ok(())
        }
        Reply::Error(m) => anyhow::bail!("{m}"),
        Reply::Done(m) => anyhow::bail!("unexpected reply: {m}"),
    }
}

/// Errors found while reading flags, the config file or the environment, before the
/// daemon started anything.
fn is_config_error(e: &anyhow::Error) -> bool {
    e.downcast_ref::<bandsync::node::config::ConfigError>().is_some()
}

fn init_logs(daemon: bool) {
    // the daemon logs what it does; a CLI command prints its answer and only warnings
    let default = if daemon { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("BANDSYNC_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

fn main() {
    // First thing: the test clock's "start" is when the process began.
    let clock = NodeClock::from_env();
    let cli = Cli::parse();
    init_logs(matches!(cli.cmd, Cmd::Run(_)));
    let result = (|| -> anyhow::Result<()> {
        let clock =
            clock.map_err(|e| anyhow::Error::new(bandsync::node::config::ConfigError(e.to_string())))?;
        match cli.cmd {
            Cmd::Run(args) => {
                let cfg = Settings::load(cli.config.as_deref())
                    .and_then(|(file, origin)| RunConfig::build(&args, &file, origin.as_deref()))
                    .map_err(|e| {
                        anyhow::Error::new(bandsync::node::config::ConfigError(format!("{e:#}")))
                    })?;
                bandsync::node::run::run(cfg, clock)
            }
            Cmd::Status {
                to,
                json,
                qr,
                no_qr,
            } => {
                let qr =
                    !json && !no_qr && (qr || std::io::IsTerminal::is_terminal(&std::io::stdout()));
                status(
                    &to,
                    &Settings::load(cli.config.as_deref())?.0,
                    json,
                    false,
                    qr,
                )
            }
            Cmd::Peers { to, json } => status(
                &to,
                &Settings::load(cli.config.as_deref())?.0,
                json,
                true,
                false,
            ),
            Cmd::Pin { who, to } => {
                pin_confirmed(&to, &Settings::load(cli.config.as_deref())?.0, Some(who))
            }
            Cmd::Unpin { to } => {
                pin_confirmed(&to, &Settings::load(cli.config.as_deref())?.0, None)
            }
            Cmd::Tempo { bpm, to, now } => {
                let t = Tempo::from_bpm(bpm)?;
                let q = Query::Change {
                    kind: ChangeKind::Tempo(t),
                    quantum: Some(if now { Quantum::Beat } else { Quantum::Bar }),
                };
                done(ask(&to, &Settings::load(cli.config.as_deref())?.0, q)?)
            }
            Cmd::Meter { beats, to } => {
                let m = Meter::new(beats)?;
                done(ask(
                    &to,
                    &Settings::load(cli.config.as_deref())?.0,
                    Query::Change {
                        kind: ChangeKind::Meter(m),
                        quantum: Some(Quantum::Bar),
                    },
                )?)
            }
            Cmd::Start { to } => done(ask(
                &to,
                &Settings::load(cli.config.as_deref())?.0,
                Query::Change {
                    kind: ChangeKind::Start,
                    quantum: Some(Quantum::Bar),
                },
            )?),
            Cmd::Stop { to } => done(ask(
                &to,
                &Settings::load(cli.config.as_deref())?.0,
                Query::Change {
                    kind: ChangeKind::Stop,
                    quantum: Some(Quantum::Beat),
                },
            )?),
            Cmd::RoomKey {
                state_dir,
                room_key_file,
            } => {
                let dir = state_dir.unwrap_or_else(bandsync::node::config::default_state_dir);
                bandsync::sys::state::ensure_dir(&dir)?;
                let key = bandsync::net::auth::RoomKey::load(room_key_file.as_deref(), &dir)?;
                println!("{}", key.to_hex());
                Ok(())
            }
            Cmd::ControlPin { state_dir } => {
                let dir = state_dir.unwrap_or_else(bandsync::node::config::default_state_dir);
                bandsync::sys::state::ensure_dir(&dir)?;
                let pin = bandsync::sys::state::control_pin(&dir)?;
                println!("{pin}");
                Ok(())
            }
            Cmd::Devices => {
                let devs =
                    bandsync::audio::device::list_devices().context("cannot list audio devices")?;
                if devs.is_empty() {
                    println!(
                        "no output devices found (`bandsync run` would use the silent null sink)"
                    );
                }
                for d in devs {
                    println!(
                        "{} {:<40} {}",
                        if d.is_default { "*" } else { " " },
                        d.id,
                        d.description
                    );
                }
                Ok(())
            }
        }
    })();
    if let Err(e) = result {
        eprintln!("bandsync: {e:#}");
        // 78 (EX_CONFIG): systemd's unit does not restart on configuration errors
        std::process::exit(if is_config_error(&e) { 78 } else { 2 });
    }
}
