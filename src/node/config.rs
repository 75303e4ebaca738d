//! Configuration: flags override the config file, which overrides embedded defaults.
//!
//! The file is TOML (`/etc/bandsync/bandsync.toml` when present, or `--config PATH`).
//! Unknown keys and bad values are errors that name the key, the value and the file.

use crate::audio::AudioBackend;
use crate::core::timeline::{Meter, Quantum, Tempo};
use anyhow::{anyhow, bail, Context};
use serde::Deserialize;
use std::path::{Path, PathBuf};

pub const DEFAULT_CONFIG: &str = "/etc/bandsync/bandsync.toml";

/// A configuration error (flags, file, environment): the message names the value.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// The settings of `bandsync run`: one struct for both the config file (TOML keys are
/// the field names) and the flags (`--field-name`). Every value is optional here;
/// [`RunConfig::build`] lays flags over the file over defaults and validates.
#[derive(Debug, Default, Clone, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Human name of this box (default: the hostname).
    #[arg(long)]
    pub name: Option<String>,
    /// Room name: boxes with the same room name and key play together (default: "default").
    #[arg(long)]
    pub room: Option<String>,
    /// Where the node id, certificate, room key and session live
    /// (default: /var/lib/bandsync as root, else $XDG_STATE_HOME/bandsync).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Output: "auto" (default device, or the silent sink with a warning when there is
    /// none), "null" (silent sink paced by the system clock), "default", or a device
    /// id from `bandsync devices`.
    #[arg(long, value_name = "BACKEND")]
    pub audio: Option<String>,
    /// Initial tempo of a box alone, 20–400 BPM (default 120).
    #[arg(long, value_name = "BPM")]
    pub tempo: Option<f64>,
    /// Initial beats per bar of a box alone, 1–16 (default 4).
    #[arg(long, value_name = "N")]
    pub meter: Option<i64>,
    /// Start the transport at once.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub play: Option<bool>,
    /// Append one JSON line per click to PATH (SPEC §5 format).
    #[arg(long, value_name = "PATH")]
    pub click_log: Option<PathBuf>,
    /// Output-latency offset in ms: how long after the DAC the speaker sounds
    /// (default 0; from the hw profile or a calibration).
    #[arg(long, value_name = "MS", allow_hyphen_values = true)]
    pub latency_offset_ms: Option<f64>,
    /// Click volume, 0.0–1.0 (default 0.8).
    #[arg(long, value_name = "GAIN")]
    pub volume: Option<f64>,
    /// Audio buffer (period) size in frames, 32–4096 (default 256).
    #[arg(long, value_name = "FRAMES")]
    pub buffer_frames: Option<u32>,
    /// Preferred sample rate in Hz (default 48000).
    #[arg(long, value_name = "HZ")]
    pub sample_rate: Option<u32>,
    /// Where changes land: "bar" (default) or "beat".
    #[arg(long, value_name = "bar|beat", value_parser = parse_quantum)]
    pub quantum: Option<Quantum>,
    /// Leadership priority: among live boxes the highest (pinned, priority, id) leads
    /// (default 0).
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    pub priority: Option<i32>,
    /// QUIC listen address for the room mesh (default 0.0.0.0:47810).
    #[arg(long, value_name = "ADDR:PORT")]
    pub quic: Option<String>,
    /// HTTP listen address for phones, /health and /metrics (default 0.0.0.0:8080).
    #[arg(long, value_name = "ADDR:PORT")]
    pub http: Option<String>,
    /// HTTPS listen address for phones (default 0.0.0.0:8443; "off" disables). The
    /// certificate is the box's own (`https-cert.der` in the state dir): a phone
    /// accepts it once. Screen wake lock and the microphone (talkback) need it.
    #[arg(long, value_name = "ADDR:PORT|off")]
    pub https: Option<String>,
    /// Network interface for mDNS and QUIC (repeatable; default: all).
    #[arg(long = "interface", value_name = "NAME")]
    pub interface: Option<Vec<String>>,
    /// File holding the room key (default: the state dir's `room-key`, generated on
    /// first start).
    #[arg(long, value_name = "PATH")]
    pub room_key_file: Option<PathBuf>,
    /// PIN phones must give to change tempo/transport (default: none; following the
    /// beat never needs it).
    #[arg(long, value_name = "PIN")]
    pub control_pin: Option<String>,
    /// Who may change the room from a phone: "pin" (default: phones need the room's
    /// control PIN, generated on first start, see `bandsync control-pin`) or "open"
    /// (any phone on the Wi-Fi may change tempo and transport; logged as a warning).
    #[arg(long, value_name = "pin|open")]
    pub control: Option<String>,
    /// Mirror the session to Redis: redis://[user:pass@]host:port/db (optional).
    #[arg(long, value_name = "URL")]
    pub redis: Option<String>,
    /// Board profile: "auto" (default: detect from the device tree and ALSA cards),
    /// "none", a built-in name (see hw/), or a .toml file. It supplies the buffer size,
    /// sample rate and output-latency offset unless flags or the config file set them.
    #[arg(long, value_name = "PROFILE")]
    pub hw: Option<String>,
    /// Ableton Link: Link apps on the box's interfaces follow the room's tempo, beat
    /// phase and start/stop (on by default; `--no-link`, or `link = false` in the
    /// file, turns it off).
    #[arg(
        long = "no-link",
        num_args = 0,
        default_missing_value = "false",
        value_name = "BOOL"
    )]
    pub link: Option<bool>,
    /// Let Link apps change the room's tempo and start/stop (as quantized changes);
    /// by default the room overrules them (default false).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub link_control: Option<bool>,
}

impl Settings {
    pub fn parse(text: &str, origin: &Path) -> anyhow::Result<Settings> {
        toml::from_str(text)
            .map_err(|e| anyhow!("config {}: {}", origin.display(), e.to_string().trim()))
    }

    /// Load `--config PATH` (must exist) or the default path (if present).
    pub fn load(explicit: Option<&Path>) -> anyhow::Result<(Settings, Option<PathBuf>)> {
        let (path, must) = match explicit {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_CONFIG), false),
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok((Settings::parse(&text, &path)?, Some(path))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must => {
                Ok((Settings::default(), None))
            }
            Err(e) => Err(e).with_context(|| format!("cannot read config {}", path.display())),
        }
    }
}

fn parse_quantum(s: &str) -> Result<Quantum, String> {
    match s {
        "bar" => Ok(Quantum::Bar),
        "beat" => Ok(Quantum::Beat),
        _ => Err(format!("quantum must be \"bar\" or \"beat\", got {s:?}")),
    }
}

/// The validated, merged configuration of `bandsync run`.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub name: String,
    pub room: String,
    pub state_dir: PathBuf,
    pub audio: AudioBackend,
    /// Initial tempo/meter of a box alone: `None` when neither flag nor file set them
    /// (then the saved session, else 120 BPM 4/4).
    pub tempo: Option<Tempo>,
    pub meter: Option<Meter>,
    pub play: bool,
    pub click_log: Option<PathBuf>,
    pub latency_offset_ns: i64,
    pub volume: f32,
    pub buffer_frames: u32,
    pub sample_rate: u32,
    pub quantum: Quantum,
    pub priority: i32,
    pub quic: std::net::SocketAddr,
    pub http: std::net::SocketAddr,
    /// `None`: `--https off`.
    pub https: Option<std::net::SocketAddr>,
    pub interfaces: Vec<String>,
    pub room_key_file: Option<PathBuf>,
    pub control_pin: Option<String>,
    /// `control = "open"`: phones need no PIN (an explicit opt-out).
    pub control_open: bool,
    pub redis: Option<String>,
    /// The board profile in use, if any.
    pub hw: Option<crate::node::hw::HwProfile>,
    /// Ableton Link on (default) or off (`--no-link`).
    pub link: bool,
    /// Link apps may change the room's tempo and transport (default off).
    pub link_control: bool,
}

/// Default QUIC port of the room mesh.
pub const DEFAULT_QUIC_PORT: u16 = 47810;
/// Default HTTP port (phones, /health, /metrics).
pub const DEFAULT_HTTP_PORT: u16 = 8080;
/// Default HTTPS port (the phone page over TLS).
pub const DEFAULT_HTTPS_PORT: u16 = 8443;

/// The default state dir: systemd's `$STATE_DIRECTORY`, else /var/lib/bandsync as
/// root, else `$XDG_STATE_HOME/bandsync` (or `~/.local/state/bandsync`).
pub fn default_state_dir() -> PathBuf {
    if let Ok(d) = std::env::var("STATE_DIRECTORY") {
        if let Some(first) = d.split(':').next().filter(|s| !s.is_empty()) {
            return PathBuf::from(first);
        }
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/lib/bandsync");
    }
    if let Ok(x) = std::env::var("XDG_STATE_HOME") {
        if !x.is_empty() {
            return PathBuf::from(x).join("bandsync");
        }
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| ".".into());
    PathBuf::from(home).join(".local/state/bandsync")
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "bandsync".into())
}

/// A URL as it may be shown in an error: the password (between `:` and `@` after the
/// scheme) replaced by `***`.
fn mask_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.rsplit_once('@') {
        Some((user, host)) => match user.split_once(':') {
            Some((name, _)) => format!("{scheme}://{name}:***@{host}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

fn check_name(what: &str, v: &str) -> anyhow::Result<()> {
    if v.is_empty() || v.len() > 63 || v.chars().any(|c| c.is_control()) {
        bail!("{what} {v:?} is invalid: use 1–63 printable characters");
    }
    Ok(())
}

impl RunConfig {
    /// Merge flags over the file over defaults, validating every value.
    pub fn build(
        args: &Settings,
        file: &Settings,
        origin: Option<&Path>,
    ) -> anyhow::Result<RunConfig> {
        let src = |flag_set: bool, key: &str| -> String {
            if flag_set {
                format!("--{}", key.replace('_', "-"))
            } else {
                match origin {
                    Some(p) => format!("{} ({key})", p.display()),
                    None => key.to_string(),
                }
            }
        };
        let name = args
            .name
            .clone()
            .or(file.name.clone())
            .unwrap_or_else(hostname);
        check_name(&format!("{}:", src(args.name.is_some(), "name")), &name)?;
        let room = args
            .room
            .clone()
            .or(file.room.clone())
            .unwrap_or_else(|| "default".into());
        check_name(&format!("{}:", src(args.room.is_some(), "room")), &room)?;
        let state_dir = args
            .state_dir
            .clone()
            .or(file.state_dir.clone())
            .unwrap_or_else(default_state_dir);
        let audio_s = args
            .audio
            .clone()
            .or(file.audio.clone())
            .unwrap_or_else(|| "auto".into());
        let audio: AudioBackend = audio_s
            .parse()
            .map_err(|e: String| anyhow!("{}: {e}", src(args.audio.is_some(), "audio")))?;
        let tempo = match args.tempo.or(file.tempo) {
            Some(v) => Some(
                Tempo::from_bpm(v)
                    .map_err(|e| anyhow!("{}: {e}", src(args.tempo.is_some(), "tempo")))?,
            ),
            None => None,
        };
        let meter = match args.meter.or(file.meter) {
            Some(v) => Some(
                Meter::new(v)
                    .map_err(|e| anyhow!("{}: {e}", src(args.meter.is_some(), "meter")))?,
            ),
            None => None,
        };
        let play = args.play.or(file.play).unwrap_or(false);
        let click_log = args.click_log.clone().or(file.click_log.clone());
        let hw_spec = args
            .hw
            .clone()
            .or(file.hw.clone())
            .unwrap_or_else(|| "auto".into());
        let hw = match hw_spec.as_str() {
            "auto" => crate::node::hw::detect_system(),
            "none" => None,
            spec => Some(
                crate::node::hw::load(spec)
                    .map_err(|e| anyhow!("{}: {e}", src(args.hw.is_some(), "hw")))?,
            ),
        };
        let lat = args
            .latency_offset_ms
            .or(file.latency_offset_ms)
            .or(hw.as_ref().map(|h| h.latency_offset_ms))
            .unwrap_or(0.0);
        if !lat.is_finite() || !(-500.0..=500.0).contains(&lat) {
            bail!(
                "{}: latency offset {lat} ms is out of range (−500 to 500 ms)",
                src(args.latency_offset_ms.is_some(), "latency_offset_ms")
            );
        }
        let vol = args.volume.or(file.volume).unwrap_or(0.8);
        if !vol.is_finite() || !(0.0..=1.0).contains(&vol) {
            bail!(
                "{}: volume {vol} is out of range (0.0 to 1.0)",
                src(args.volume.is_some(), "volume")
            );
        }
        let buffer_frames = args
            .buffer_frames
            .or(file.buffer_frames)
            .or(hw.as_ref().map(|h| h.buffer_frames))
            .unwrap_or(256);
        if !(32..=4096).contains(&buffer_frames) {
            bail!(
                "{}: buffer size {buffer_frames} frames is out of range (32 to 4096)",
                src(args.buffer_frames.is_some(), "buffer_frames")
            );
        }
        let sample_rate = args
            .sample_rate
            .or(file.sample_rate)
            .or(hw.as_ref().map(|h| h.sample_rate))
            .unwrap_or(48_000);
        if !(8_000..=192_000).contains(&sample_rate) {
            bail!(
                "{}: sample rate {sample_rate} Hz is out of range (8000 to 192000)",
                src(args.sample_rate.is_some(), "sample_rate")
            );
        }
        let quantum = args.quantum.or(file.quantum).unwrap_or_default();
        let priority = args.priority.or(file.priority).unwrap_or(0);
        let quic_s = args
            .quic
            .clone()
            .or(file.quic.clone())
            .unwrap_or_else(|| format!("0.0.0.0:{DEFAULT_QUIC_PORT}"));
        let quic: std::net::SocketAddr = quic_s.parse().map_err(|_| {
            anyhow!("{}: {quic_s:?} is not an ADDR:PORT socket address (e.g. 0.0.0.0:{DEFAULT_QUIC_PORT})", src(args.quic.is_some(), "quic"))
        })?;
        let http_s = args
            .http
            .clone()
            .or(file.http.clone())
            .unwrap_or_else(|| format!("0.0.0.0:{DEFAULT_HTTP_PORT}"));
        let http: std::net::SocketAddr = http_s.parse().map_err(|_| {
            anyhow!("{}: {http_s:?} is not an ADDR:PORT socket address (e.g. 0.0.0.0:{DEFAULT_HTTP_PORT})", src(args.http.is_some(), "http"))
        })?;
        let https_s = args
            .https
            .clone()
            .or(file.https.clone())
            .unwrap_or_else(|| format!("0.0.0.0:{DEFAULT_HTTPS_PORT}"));
        let https: Option<std::net::SocketAddr> = if https_s.trim() == "off" {
            None
        } else {
            Some(https_s.parse().map_err(|_| {
                anyhow!("{}: {https_s:?} is not an ADDR:PORT socket address (e.g. 0.0.0.0:{DEFAULT_HTTPS_PORT}) or \"off\"", src(args.https.is_some(), "https"))
            })?)
        };
        let interfaces = args
            .interface
            .clone()
            .or(file.interface.clone())
            .unwrap_or_default();
        for i in &interfaces {
            if i.is_empty()
                || i.len() > 15
                || i.contains('/')
                || i.chars().any(|c| c.is_whitespace())
            {
                bail!(
                    "{}: {i:?} is not a network interface name",
                    src(args.interface.is_some(), "interface")
                );
            }
        }
        let room_key_file = args.room_key_file.clone().or(file.room_key_file.clone());
        let control_pin = args.control_pin.clone().or(file.control_pin.clone());
        if let Some(p) = &control_pin {
            if p.is_empty()
                || p.len() > 32
                || p.chars().any(|c| c.is_control() || c.is_whitespace())
            {
                bail!(
                    "{}: the control PIN must be 1–32 characters without spaces",
                    src(args.control_pin.is_some(), "control_pin")
                );
            }
        }
        let control_open = match args.control.as_deref().or(file.control.as_deref()) {
            None | Some("pin") => false,
            Some("open") => true,
            Some(other) => bail!(
                "{}: {other:?} is not \"pin\" or \"open\"",
                src(args.control.is_some(), "control")
            ),
        };
        if control_open && control_pin.is_some() {
            bail!(
                "{}: a control PIN and control = \"open\" contradict each other; choose one",
                src(args.control_pin.is_some(), "control_pin")
            );
        }
        let redis = args.redis.clone().or(file.redis.clone());
        if let Some(u) = &redis {
            crate::mirror::RedisUrl::parse(u).map_err(|e| {
                anyhow!(
                    "{} {:?}: {e}",
                    src(args.redis.is_some(), "redis"),
                    mask_password(u)
                )
            })?;
        }
        if let Some(k) = &room_key_file {
            if !k.is_file() {
                bail!(
                    "{}: {} is not a readable file",
                    src(args.room_key_file.is_some(), "room_key_file"),
                    k.display()
                );
            }
        }
        if let Some(l) = &click_log {
            let parent = l.parent().filter(|p| !p.as_os_str().is_empty());
            if parent.is_some_and(|p| !p.is_dir()) || l.is_dir() {
                bail!(
                    "{}: {} cannot be written (its directory does not exist, or it is a directory)",
                    src(args.click_log.is_some(), "click_log"),
                    l.display()
                );
            }
        }
        if state_dir.as_os_str().is_empty() || (state_dir.exists() && !state_dir.is_dir()) {
            bail!(
                "{}: {} is not a directory",
                src(args.state_dir.is_some(), "state_dir"),
                state_dir.display()
            );
        }
        Ok(RunConfig {
            name,
            room,
            state_dir,
            audio,
            tempo,
            meter,
            play,
            click_log,
            latency_offset_ns: (lat * 1e6).round() as i64,
            volume: vol as f32,
            buffer_frames,
            sample_rate,
            quantum,
            priority,
            quic,
            http,
            https,
            interfaces,
            room_key_file,
            control_pin,
            control_open,
            redis,
            hw,
            link: args.link.or(file.link).unwrap_or(true),
            link_control: args.link_control.or(file.link_control).unwrap_or(false),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file_override_defaults() {
        let file = Settings::parse(
            "tempo = 90.5\nmeter = 3\nname = \"left\"\n",
            Path::new("t.toml"),
        )
        .unwrap();
        let args = Settings {
            meter: Some(7),
            ..Default::default()
        };
        let c = RunConfig::build(&args, &file, Some(Path::new("t.toml"))).unwrap();
        assert_eq!(c.tempo.unwrap().mbpm(), 90_500);
        assert_eq!(c.meter.unwrap().get(), 7);
        assert_eq!(c.name, "left");
        assert_eq!(c.buffer_frames, 256);
        assert_eq!(c.audio, AudioBackend::Auto);
    }

    #[test]
    fn bad_values_name_the_source_and_value() {
        let file = Settings::parse("tempo = 500\n", Path::new("/etc/x.toml")).unwrap();
        let e = RunConfig::build(&Settings::default(), &file, Some(Path::new("/etc/x.toml")))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/etc/x.toml (tempo)") && e.contains("500"),
            "{e}"
        );
        let args = Settings {
            volume: Some(3.0),
            ..Default::default()
        };
        let e = RunConfig::build(&args, &Settings::default(), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--volume") && e.contains('3'), "{e}");
    }

    #[test]
    fn link_flags_and_file_keys() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            s: Settings,
        }
        let none = Cli::try_parse_from(["x"]).unwrap().s;
        assert_eq!((none.link, none.link_control), (None, None));
        let off = Cli::try_parse_from(["x", "--no-link", "--link-control"])
            .unwrap()
            .s;
        assert_eq!((off.link, off.link_control), (Some(false), Some(true)));
        let c = RunConfig::build(&none, &Settings::default(), None).unwrap();
        assert!(
            c.link && !c.link_control,
            "Link is on and overrules by default"
        );
        let file =
            Settings::parse("link = false\nlink_control = true\n", Path::new("c.toml")).unwrap();
        let c = RunConfig::build(&none, &file, None).unwrap();
        assert!(!c.link && c.link_control);
        let c = RunConfig::build(&off, &Settings::default(), None).unwrap();
        assert!(!c.link);
    }

    #[test]
    fn unknown_keys_are_errors() {
        let e = Settings::parse("tempoo = 100\n", Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("c.toml") && e.contains("tempoo"), "{e}");
        let e = Settings::parse("tempo = \"fast\"\n", Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("tempo"), "{e}");
    }
}
