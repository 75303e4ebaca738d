//! The `bandsync` binary: the daemon (`bandsync run`) and the stage tech's CLI.

use anyhow::Context;
use bandsync::core::timeline::{ChangeKind, Meter, Quantum, Tempo};
use bandsync::core::wire::{Query, Reply};
use bandsync::node::config::{RunConfig, Settings};
use bandsync::sys::clock::NodeClock;
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
    /// The room's playing periods (start, end, duration, tempi, songs) from this box's
    /// own log (works without Redis).
    Usage {
        /// Only periods that started on or after this local date (YYYY-MM-DD).
        #[arg(long, value_name = "YYYY-MM-DD")]
        since: Option<String>,
        #[arg(long, conflicts_with = "csv")]
        json: bool,
        #[arg(long)]
        csv: bool,
        /// State dir holding the log (default as for `bandsync run`).
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Every room mirrored in a Redis (the venue's front desk): tempo, meter, playing,
    /// leader, boxes, song, played today; rooms no leader refreshed for a minute are
    /// gone.
    Venue {
        /// The venue's Redis: redis://[user:pass@]host[:port][/db] or rediss://…
        #[arg(long, value_name = "URL")]
        redis: String,
        #[arg(long)]
        json: bool,
    },
    /// Print the room's control PIN: phones need it to change tempo or transport
    /// (generated on first start, replicated through the room; the state dir holds the
    /// one in force). Set it with `bandsync run --control-pin`.
    ControlPin {
        /// State dir holding the PIN (default as for `bandsync run`).
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Show the room's setlist and current song, or load one (`setlist load FILE.toml`).
    Setlist {
        #[command(subcommand)]
        load: Option<SetlistCmd>,
        #[command(flatten)]
        to: To,
        /// JSON: {"count","current","songs":[{index,title,tempo,meter,count_in_bars}]}.
        #[arg(long)]
        json: bool,
    },
    /// Choose a song: `next`, `prev` or its number (1-based); its tempo and meter land
    /// on the next bar on every box and phone.
    Song {
        #[arg(value_name = "next|prev|N")]
        which: String,
        #[command(flatten)]
        to: To,
    },
    /// Post a cue to the whole room (`cue TEXT`), edit one (`cue --edit SEQ TEXT`) or
    /// delete one (`cue --delete SEQ`).
    Cue {
        /// The text (1–500 characters).
        #[arg(value_name = "TEXT")]
        text: Option<String>,
        #[arg(long, value_name = "SEQ", conflicts_with = "delete")]
        edit: Option<u64>,
        #[arg(long, value_name = "SEQ")]
        delete: Option<u64>,
        #[command(flatten)]
        to: To,
    },
    /// The room's cues in order (seq, text, author, posted/edited time, deleted, seen:
    /// how many phones acked it).
    Cues {
        #[command(flatten)]
        to: To,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum SetlistCmd {
    /// Load FILE.toml: `[[song]]` tables with title, tempo, meter, count_in_bars (0–4).
    Load {
        #[arg(value_name = "FILE.toml")]
        file: PathBuf,
        #[command(flatten)]
        to: To,
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

fn status(to: &To, file: &Settings, json: bool, peers_only: bool, qr: bool) -> anyhow::Result<()> {
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
/// Ask for every page of a paged JSON reply (`next` / `next_after` continue it).
fn pages(
    to: &To,
    file: &Settings,
    first: Query,
    next: impl Fn(&serde_json::Value) -> Option<Query>,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let t = target(to, file)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut out = Vec::new();
        let mut q = Some(first);
        while let Some(query) = q.take() {
            match bandsync::cli::request(&t, query).await? {
                Reply::Status(j) => {
                    let v: serde_json::Value =
                        serde_json::from_str(&j).context("the node sent unreadable JSON")?;
                    q = next(&v);
                    out.push(v);
                }
                Reply::Error(m) => anyhow::bail!("{m}"),
                Reply::Done(m) => anyhow::bail!("unexpected reply: {m}"),
            }
            if out.len() > 1000 {
                anyhow::bail!("the node keeps sending pages");
            }
        }
        Ok(out)
    })
}

fn setlist_show(to: &To, file: &Settings, json: bool) -> anyhow::Result<()> {
    let pages = pages(to, file, Query::Setlist { from: 0 }, |v| {
        v["next"]
            .as_u64()
            .map(|n| Query::Setlist { from: n as u16 })
    })?;
    let mut all = pages[0].clone();
    all["songs"] = serde_json::Value::Array(
        pages
            .iter()
            .flat_map(|p| p["songs"].as_array().cloned().unwrap_or_default())
            .collect(),
    );
    if let Some(o) = all.as_object_mut() {
        o.remove("next");
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    let current = all["current"].as_u64();
    let songs = all["songs"].as_array().cloned().unwrap_or_default();
    if songs.is_empty() {
        println!("no setlist loaded (bandsync setlist load FILE.toml)");
    }
    for s in songs {
        let i = s["index"].as_u64().unwrap_or(0);
        println!(
            "{} {:>3}. {:<40} {:>6} BPM  {}/4{}",
            if Some(i) == current { ">" } else { " " },
            i,
            s["title"].as_str().unwrap_or(""),
            s["tempo"].as_f64().unwrap_or(0.0),
            s["meter"].as_u64().unwrap_or(0),
            match s["count_in_bars"].as_u64() {
                Some(n) if n > 0 => format!("  count-in {n}"),
                _ => String::new(),
            }
        );
    }
    Ok(())
}

fn cues_show(to: &To, file: &Settings, json: bool) -> anyhow::Result<()> {
    let pages = pages(to, file, Query::Cues { after: 0 }, |v| {
        v["next_after"].as_u64().map(|n| Query::Cues { after: n })
    })?;
    let cues: Vec<serde_json::Value> = pages
        .iter()
        .flat_map(|p| p["cues"].as_array().cloned().unwrap_or_default())
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&cues)?);
        return Ok(());
    }
    if cues.is_empty() {
        println!("no cues yet (bandsync cue TEXT)");
    }
    for c in cues {
        let seq = match c["seq"].as_u64() {
            Some(0) | None => "  ...".to_string(),
            Some(n) => format!("{n:>5}"),
        };
        println!(
            "{seq}  {:<16} {}{}{}",
            c["author"].as_str().unwrap_or(""),
            if c["deleted"].as_bool() == Some(true) {
                "(deleted) "
            } else {
                ""
            },
            c["text"].as_str().unwrap_or("").replace('\n', " / "),
            match c["seen"].as_u64() {
                Some(n) if n > 0 => format!("  [seen by {n}]"),
                _ => String::new(),
            }
        );
    }
    Ok(())
}

fn is_config_error(e: &anyhow::Error) -> bool {
    e.downcast_ref::<bandsync::node::config::ConfigError>()
        .is_some()
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
        let clock = clock
            .map_err(|e| anyhow::Error::new(bandsync::node::config::ConfigError(e.to_string())))?;
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
            Cmd::Usage {
                since,
                json,
                csv,
                state_dir,
            } => {
                let file = Settings::load(cli.config.as_deref())?.0;
                let dir = state_dir
                    .or(file.state_dir.clone())
                    .unwrap_or_else(bandsync::node::config::default_state_dir);
                let format = if json {
                    bandsync::cli::venue::UsageFormat::Json
                } else if csv {
                    bandsync::cli::venue::UsageFormat::Csv
                } else {
                    bandsync::cli::venue::UsageFormat::Table
                };
                print!(
                    "{}",
                    bandsync::cli::venue::usage(&dir, since.as_deref(), format)?
                );
                Ok(())
            }
            Cmd::Venue { redis, json } => {
                print!(
                    "{}",
                    bandsync::cli::venue::venue(&redis, json, std::time::Duration::from_secs(5))?
                );
                Ok(())
            }
            Cmd::Setlist { load, to, json } => {
                let file = Settings::load(cli.config.as_deref())?.0;
                match load {
                    Some(SetlistCmd::Load { file: path, to }) => {
                        let text = std::fs::read_to_string(&path)
                            .with_context(|| format!("cannot read {}", path.display()))?;
                        let songs = bandsync::core::cues::parse_setlist(&text).map_err(|e| {
                            anyhow::anyhow!("{}: {e}; nothing changed", path.display())
                        })?;
                        done(ask(&to, &file, Query::SetlistLoad(songs))?)
                    }
                    None => setlist_show(&to, &file, json),
                }
            }
            Cmd::Song { which, to } => {
                use bandsync::core::cues::MAX_SONGS;
                use bandsync::core::wire::SongPick;
                let pick = match which.as_str() {
                    "next" => SongPick::Next,
                    "prev" => SongPick::Prev,
                    n => match n.parse::<u16>() {
                        Ok(k) if k >= 1 && (k as usize) <= MAX_SONGS => SongPick::Number(k),
                        _ => anyhow::bail!(
                            "song: {n:?} is not next, prev or a song number (1–{MAX_SONGS})"
                        ),
                    },
                };
                done(ask(
                    &to,
                    &Settings::load(cli.config.as_deref())?.0,
                    Query::Song(pick),
                )?)
            }
            Cmd::Cue {
                text,
                edit,
                delete,
                to,
            } => {
                use bandsync::core::cues::{check_text, MAX_AUTHOR_CHARS};
                let q = match (edit, delete, text) {
                    (None, Some(seq), None) => Query::CueDelete { seq },
                    (None, Some(_), Some(_)) => anyhow::bail!("cue --delete SEQ takes no text"),
                    (Some(seq), None, Some(text)) => {
                        check_text(&text)
                            .map_err(|e| anyhow::anyhow!("cue {e}; nothing changed"))?;
                        Query::CueEdit { seq, text }
                    }
                    (Some(_), None, None) => {
                        anyhow::bail!("cue --edit SEQ TEXT: the new text is missing")
                    }
                    (None, None, Some(text)) => {
                        check_text(&text)
                            .map_err(|e| anyhow::anyhow!("cue {e}; nothing changed"))?;
                        let who = std::env::var("USER").unwrap_or_else(|_| "cli".into());
                        let host = bandsync::node::config::hostname();
                        let author: String = format!("{who}@{host}")
                            .chars()
                            .filter(|c| !c.is_control())
                            .take(MAX_AUTHOR_CHARS)
                            .collect();
                        Query::CuePost { text, author }
                    }
                    (None, None, None) => anyhow::bail!("cue TEXT: the text is missing"),
                    (Some(_), Some(_), _) => {
                        anyhow::bail!("cue: --edit and --delete exclude each other")
                    }
                };
                done(ask(&to, &Settings::load(cli.config.as_deref())?.0, q)?)
            }
            Cmd::Cues { to, json } => {
                cues_show(&to, &Settings::load(cli.config.as_deref())?.0, json)
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
