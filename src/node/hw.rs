//! Board profiles: which ALSA device a kind of box plays through, with which period
//! size and sample rate, and how late its speaker sounds after what ALSA reports (the
//! output-latency offset).
//!
//! The profiles are TOML files under `hw/`, embedded in the binary. `--hw NAME` picks
//! one by name (or `--hw PATH.toml` loads a custom one, see [`load`]); without it the
//! daemon may [`detect_system`] the board from `/proc/device-tree/model` and the ALSA
//! card list `/proc/asound/cards`. Detection itself ([`detect`]) is a pure function of
//! those two texts. The values are starting points: `hw/README.md` explains how to
//! measure a box's real offset.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The embedded profiles, in tie-break order for detection.
const BUILTIN: &[(&str, &str)] = &[
    (
        "hw/rpi-headphones.toml",
        include_str!("../../hw/rpi-headphones.toml"),
    ),
    (
        "hw/rpi-i2s-dac.toml",
        include_str!("../../hw/rpi-i2s-dac.toml"),
    ),
    (
        "hw/usb-class-compliant.toml",
        include_str!("../../hw/usb-class-compliant.toml"),
    ),
    (
        "hw/x86-mini-pc.toml",
        include_str!("../../hw/x86-mini-pc.toml"),
    ),
];

/// Placeholder in `alsa_device_pattern` for the ALSA card id that detection found.
pub const CARD_PLACEHOLDER: &str = "{card}";

/// One board profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HwProfile {
    /// Short name for `--hw` (lowercase letters, digits, `-`).
    pub name: String,
    /// One line for humans.
    pub description: String,
    /// Which output device to use: a case-insensitive glob (`*`, `?`) over the device
    /// ids `bandsync devices` prints (e.g. `*plughw:CARD={card},DEV=0`); without a
    /// wildcard it is a substring. `{card}` is the ALSA card id detection found (any
    /// card when the profile was picked by name).
    pub alsa_device_pattern: String,
    /// Period size in frames (`--buffer-frames`).
    pub buffer_frames: u32,
    /// Sample rate in Hz (`--sample-rate`).
    pub sample_rate: u32,
    /// How long after the DAC time ALSA reports the speaker sounds, in ms
    /// (`--latency-offset-ms`). A starting point to calibrate per box.
    pub latency_offset_ms: f64,
    /// How [`detect`] recognizes the board.
    #[serde(default)]
    pub detect: DetectRules,
}

/// Detection rules: all given conditions must hold.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectRules {
    /// The device-tree model contains one of these (case-insensitive). Empty: any.
    #[serde(default)]
    pub model: Vec<String>,
    /// Only boxes without a device-tree model (PCs).
    #[serde(default)]
    pub no_device_tree: bool,
    /// Some ALSA card's id, driver or names contain one of these (case-insensitive).
    /// Empty: the profile is never detected (only picked by name).
    #[serde(default)]
    pub cards: Vec<String>,
    /// Cards whose id, driver or names contain one of these are skipped.
    #[serde(default)]
    pub cards_exclude: Vec<String>,
    /// When several profiles match, the highest priority wins.
    #[serde(default)]
    pub priority: i32,
}

/// Errors naming what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum HwError {
    #[error("unknown hw profile {name:?}; known profiles: {} (or give the path of a .toml profile)", known.join(", "))]
    Unknown { name: String, known: Vec<String> },
    #[error("hw profile {origin}: {msg}")]
    Parse { origin: String, msg: String },
    #[error("hw profile {origin}: {field} {msg}")]
    Invalid {
        origin: String,
        field: &'static str,
        msg: String,
    },
    #[error("cannot read hw profile {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl HwProfile {
    /// Parse and validate one profile; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<HwProfile, HwError> {
        let p: HwProfile = toml::from_str(text).map_err(|e| HwError::Parse {
            origin: origin.to_string(),
            msg: e.to_string().trim().to_string(),
        })?;
        p.validate(origin)?;
        Ok(p)
    }

    fn validate(&self, origin: &str) -> Result<(), HwError> {
        let bad = |field: &'static str, msg: String| {
            Err(HwError::Invalid {
                origin: origin.to_string(),
                field,
                msg,
            })
        };
        if self.name.is_empty()
            || self.name.len() > 63
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return bad(
                "name",
                format!(
                    "{:?} must be 1–63 characters of a-z, 0-9 and '-'",
                    self.name
                ),
            );
        }
        if self.description.trim().is_empty() {
            return bad("description", "must not be empty".into());
        }
        if self.alsa_device_pattern.trim().is_empty()
            || self.alsa_device_pattern.chars().any(|c| c.is_control())
        {
            return bad(
                "alsa_device_pattern",
                format!(
                    "{:?} must be a non-empty single line",
                    self.alsa_device_pattern
                ),
            );
        }
        // Same ranges as the flags (config.rs).
        if !(32..=4096).contains(&self.buffer_frames) {
            return bad(
                "buffer_frames",
                format!("{} is out of range (32 to 4096)", self.buffer_frames),
            );
        }
        if !(8_000..=192_000).contains(&self.sample_rate) {
            return bad(
                "sample_rate",
                format!("{} Hz is out of range (8000 to 192000)", self.sample_rate),
            );
        }
        if !self.latency_offset_ms.is_finite()
            || !(-500.0..=500.0).contains(&self.latency_offset_ms)
        {
            return bad(
                "latency_offset_ms",
                format!(
                    "{} ms is out of range (−500 to 500 ms)",
                    self.latency_offset_ms
                ),
            );
        }
        if self
            .detect
            .cards
            .iter()
            .chain(&self.detect.cards_exclude)
            .chain(&self.detect.model)
            .any(|s| s.trim().is_empty())
        {
            return bad("detect", "patterns must not be empty strings".into());
        }
        Ok(())
    }

    /// The offset in nanoseconds, as `RunConfig::latency_offset_ns` holds it.
    pub fn latency_offset_ns(&self) -> i64 {
        (self.latency_offset_ms * 1e6).round() as i64
    }

    /// Whether an output device id (as `bandsync devices` prints it) fits the
    /// profile's `alsa_device_pattern`. An unresolved `{card}` matches any card.
    pub fn matches_device(&self, device_id: &str) -> bool {
        let pat = self.alsa_device_pattern.replace(CARD_PLACEHOLDER, "*");
        if pat.contains(['*', '?']) {
            glob_match(&pat.to_lowercase(), &device_id.to_lowercase())
        } else {
            device_id.to_lowercase().contains(&pat.to_lowercase())
        }
    }

    /// The first of `device_ids` that fits the profile.
    pub fn pick_device<'a, I: IntoIterator<Item = &'a str>>(
        &self,
        device_ids: I,
    ) -> Option<&'a str> {
        device_ids.into_iter().find(|id| self.matches_device(id))
    }

    /// The pattern as a plain device id for `--audio` (e.g. `plughw:CARD=sndrpihifiberry,DEV=0`)
    /// when it names exactly one device: `{card}` resolved and no wildcard left once the
    /// leading `*` (which stands for the `alsa:` host prefix) is dropped.
    pub fn device_id(&self) -> Option<String> {
        let p = self.alsa_device_pattern.trim_start_matches('*');
        (!p.contains(['*', '?']) && !p.contains(CARD_PLACEHOLDER) && !p.is_empty())
            .then(|| p.to_string())
    }

    /// Does the profile's detection rule accept this board? Returns the ALSA card id it
    /// matched (for `{card}`).
    fn detect_card<'c>(&self, model: Option<&str>, cards: &'c [AlsaCard]) -> Option<&'c AlsaCard> {
        let r = &self.detect;
        if r.cards.is_empty() {
            return None;
        }
        if r.no_device_tree && model.is_some() {
            return None;
        }
        if !r.model.is_empty() {
            let m = model?.to_lowercase();
            if !r.model.iter().any(|x| m.contains(&x.to_lowercase())) {
                return None;
            }
        }
        let has = |card: &AlsaCard, list: &[String]| {
            let hay = card.haystack();
            list.iter().any(|x| hay.contains(&x.to_lowercase()))
        };
        cards
            .iter()
            .find(|c| has(c, &r.cards) && !has(c, &r.cards_exclude))
    }
}

/// One line pair of `/proc/asound/cards`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlsaCard {
    pub index: u32,
    /// The card id (`CARD=` in device names), e.g. `Headphones`, `sndrpihifiberry`.
    pub id: String,
    pub driver: String,
    pub name: String,
    pub long_name: String,
}

impl AlsaCard {
    fn haystack(&self) -> String {
        format!(
            "{} | {} | {} | {}",
            self.id, self.driver, self.name, self.long_name
        )
        .to_lowercase()
    }
}

/// Parse `/proc/asound/cards`:
/// ```text
///  0 [Headphones     ]: bcm2835_headpho - bcm2835 Headphones
///                       bcm2835 Headphones
/// ```
/// Lines that do not fit are skipped (`--- no soundcards ---` gives no card).
pub fn parse_cards(text: &str) -> Vec<AlsaCard> {
    let mut out: Vec<AlsaCard> = Vec::new();
    let mut last_was_header = false;
    for line in text.lines() {
        if let Some(card) = parse_card_header(line) {
            out.push(card);
            last_was_header = true;
            continue;
        }
        if last_was_header && line.starts_with(char::is_whitespace) && !line.trim().is_empty() {
            if let Some(c) = out.last_mut() {
                c.long_name = line.trim().to_string();
            }
        }
        last_was_header = false;
    }
    out
}

fn parse_card_header(line: &str) -> Option<AlsaCard> {
    let t = line.trim_start();
    let (num, rest) = t.split_once(' ')?;
    let index: u32 = num.parse().ok()?;
    let rest = rest.trim_start().strip_prefix('[')?;
    let (id, rest) = rest.split_once("]:")?;
    let rest = rest.trim();
    let (driver, name) = rest.split_once(" - ").unwrap_or((rest, ""));
    let id = id.trim();
    if id.is_empty() {
        return None;
    }
    Some(AlsaCard {
        index,
        id: id.to_string(),
        driver: driver.trim().to_string(),
        name: name.trim().to_string(),
        long_name: String::new(),
    })
}

/// The embedded profiles.
pub fn builtin() -> Vec<HwProfile> {
    // The embedded files are checked by the tests; a bad one is skipped, never a panic.
    BUILTIN
        .iter()
        .filter_map(|(origin, text)| {
            HwProfile::parse(text, origin)
                .map_err(|e| tracing::error!(error = %e, "skipping a broken embedded hw profile"))
                .ok()
        })
        .collect()
}

/// The names of the embedded profiles.
pub fn names() -> Vec<String> {
    builtin().into_iter().map(|p| p.name).collect()
}

/// An embedded profile by name, or an error listing the known names.
pub fn by_name(name: &str) -> Result<HwProfile, HwError> {
    let all = builtin();
    match all.iter().find(|p| p.name == name) {
        Some(p) => Ok(p.clone()),
        None => Err(HwError::Unknown {
            name: name.to_string(),
            known: all.into_iter().map(|p| p.name).collect(),
        }),
    }
}

/// What `--hw` takes: an embedded profile's name, or the path of a TOML profile file
/// (anything containing `/` or ending in `.toml`).
pub fn load(spec: &str) -> Result<HwProfile, HwError> {
    if spec.contains('/') || spec.ends_with(".toml") {
        let path = Path::new(spec);
        let text = std::fs::read_to_string(path).map_err(|source| HwError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        HwProfile::parse(&text, &path.display().to_string())
    } else {
        by_name(spec)
    }
}

/// Recognize the board among the embedded profiles: `model` is the content of
/// `/proc/device-tree/model` (None on PCs), `cards` that of `/proc/asound/cards`.
/// The highest-priority match wins (ties: the embedded order); its `{card}` is
/// replaced by the id of the card that matched.
pub fn detect(model: Option<&str>, cards: &str) -> Option<HwProfile> {
    detect_among(&builtin(), model, cards)
}

/// [`detect`] over any set of profiles.
pub fn detect_among(profiles: &[HwProfile], model: Option<&str>, cards: &str) -> Option<HwProfile> {
    let model = model
        .map(|m| m.trim_matches(|c: char| c == '\0' || c.is_whitespace()))
        .filter(|m| !m.is_empty());
    let cards = parse_cards(cards);
    let mut best: Option<(i32, HwProfile)> = None;
    for p in profiles {
        if let Some(card) = p.detect_card(model, &cards) {
            if best
                .as_ref()
                .is_none_or(|(prio, _)| p.detect.priority > *prio)
            {
                let mut chosen = p.clone();
                chosen.alsa_device_pattern = chosen
                    .alsa_device_pattern
                    .replace(CARD_PLACEHOLDER, &card.id);
                best = Some((p.detect.priority, chosen));
            }
        }
    }
    best.map(|(_, p)| p)
}

/// Where [`detect_system`] looks.
pub const DEVICE_TREE_MODEL: &str = "/proc/device-tree/model";
pub const ASOUND_CARDS: &str = "/proc/asound/cards";

/// [`detect`] on this machine's `/proc/device-tree/model` and `/proc/asound/cards`
/// (either may be missing: no device tree on a PC, no sound cards in a container).
pub fn detect_system() -> Option<HwProfile> {
    let model = std::fs::read(DEVICE_TREE_MODEL)
        .ok()
        .map(|b| String::from_utf8_lossy(&b).into_owned());
    let cards = std::fs::read_to_string(ASOUND_CARDS).unwrap_or_default();
    let found = detect(model.as_deref(), &cards);
    match &found {
        Some(p) => {
            tracing::debug!(profile = %p.name, model = ?model.as_deref().map(|m| m.trim_end_matches('\0')), "hw profile detected")
        }
        None => {
            tracing::debug!(model = ?model.as_deref().map(|m| m.trim_end_matches('\0')), "no hw profile fits this box")
        }
    }
    found
}

/// Case-insensitive-by-caller glob: `*` any run, `?` one character.
fn glob_match(pat: &str, s: &str) -> bool {
    let p: Vec<char> = pat.chars().collect();
    let s: Vec<char> = s.chars().collect();
    let (mut pi, mut si) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, si));
            pi += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PI4_MODEL: &str = "Raspberry Pi 4 Model B Rev 1.4\0";
    const PI5_MODEL: &str = "Raspberry Pi 5 Model B Rev 1.0\0";

    const PI4_CARDS: &str = " 0 [Headphones     ]: bcm2835_headpho - bcm2835 Headphones
                      bcm2835 Headphones
 1 [vc4hdmi0       ]: vc4-hdmi - vc4-hdmi-0
                      vc4-hdmi-0
 2 [vc4hdmi1       ]: vc4-hdmi - vc4-hdmi-1
                      vc4-hdmi-1
";
    const PI4_HIFIBERRY_CARDS: &str = " 0 [Headphones     ]: bcm2835_headpho - bcm2835 Headphones
                      bcm2835 Headphones
 1 [sndrpihifiberry]: HifiberryDacp - snd_rpi_hifiberry_dacplus
                      snd_rpi_hifiberry_dacplus
 2 [vc4hdmi0       ]: vc4-hdmi - vc4-hdmi-0
                      vc4-hdmi-0
";
    const PI5_USB_CARDS: &str = " 0 [vc4hdmi0       ]: vc4-hdmi - vc4-hdmi-0
                      vc4-hdmi-0
 1 [vc4hdmi1       ]: vc4-hdmi - vc4-hdmi-1
                      vc4-hdmi-1
 2 [USB            ]: USB-Audio - Scarlett 2i2 USB
                      Focusrite Scarlett 2i2 USB at usb-xhci-hcd.1-1, high speed
";
    const PI5_HDMI_ONLY: &str = " 0 [vc4hdmi0       ]: vc4-hdmi - vc4-hdmi-0
                      vc4-hdmi-0
";
    const NUC_CARDS: &str = " 0 [HDMI           ]: HDA-Intel - HDA Intel HDMI
                      HDA Intel HDMI at 0xf7e14000 irq 33
 1 [PCH            ]: HDA-Intel - HDA Intel PCH
                      HDA Intel PCH at 0xf7e10000 irq 32
";
    const NUC_USB_CARDS: &str = " 0 [PCH            ]: HDA-Intel - HDA Intel PCH
                      HDA Intel PCH at 0xf7e10000 irq 32
 1 [CODEC          ]: USB-Audio - USB Audio CODEC
                      Burr-Brown from TI USB Audio CODEC at usb-0000:00:14.0-2, full speed
";

    #[test]
    fn every_embedded_profile_parses_and_is_valid() {
        let all = builtin();
        assert!(all.len() >= 4);
        for (origin, _) in BUILTIN {
            let stem = Path::new(origin).file_stem().unwrap().to_str().unwrap();
            assert!(
                all.iter().any(|p| p.name == stem),
                "{origin}: name must equal the file name"
            );
        }
        let mut names: Vec<_> = all.iter().map(|p| p.name.clone()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), all.len(), "names are unique");
        for want in [
            "rpi-headphones",
            "rpi-i2s-dac",
            "usb-class-compliant",
            "x86-mini-pc",
        ] {
            assert!(names.iter().any(|n| n == want), "{want}");
        }
    }

    #[test]
    fn every_toml_under_hw_is_embedded() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("hw");
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                let rel = format!("hw/{}", p.file_name().unwrap().to_str().unwrap());
                let (_, text) = BUILTIN
                    .iter()
                    .find(|(o, _)| *o == rel)
                    .unwrap_or_else(|| panic!("{rel} is not in hw::BUILTIN"));
                assert_eq!(*text, std::fs::read_to_string(&p).unwrap());
            }
        }
    }

    #[test]
    fn parse_reads_every_field() {
        let p = HwProfile::parse(
            "name = \"my-box\"\ndescription = \"d\"\nalsa_device_pattern = \"hw:CARD=X\"\nbuffer_frames = 128\nsample_rate = 44100\nlatency_offset_ms = -1.25\n",
            "t.toml",
        )
        .unwrap();
        assert_eq!(p.name, "my-box");
        assert_eq!((p.buffer_frames, p.sample_rate), (128, 44100));
        assert_eq!(p.latency_offset_ns(), -1_250_000);
        assert_eq!(p.detect, DetectRules::default());
        assert_eq!(p.device_id().as_deref(), Some("hw:CARD=X"));
    }

    fn profile_text(name: &str, buffer_frames: &str, latency: &str) -> String {
        format!(
            "name = {name:?}\ndescription = \"d\"\nalsa_device_pattern = \"x\"\nsample_rate = 48000\n{buffer_frames}latency_offset_ms = {latency}\n"
        )
    }

    #[test]
    fn parse_errors_name_the_file_and_field() {
        let e = HwProfile::parse(
            &profile_text("b", "buffer_frames = 5\n", "1.0"),
            "/etc/b.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("/etc/b.toml") && e.contains("buffer_frames") && e.contains('5'),
            "{e}"
        );
        let e = HwProfile::parse(
            &profile_text("b", "buffer_frames = 256\nbufer = 1\n", "1.0"),
            "b.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("b.toml") && e.contains("bufer"), "{e}");
        let e = HwProfile::parse(&profile_text("b", "", "1.0"), "b.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("buffer_frames"), "missing field: {e}");
        let e = HwProfile::parse(
            &profile_text("b", "buffer_frames = 256\n", "900.0"),
            "b.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("latency_offset_ms") && e.contains("900"), "{e}");
        let e = HwProfile::parse(&profile_text("b", "buffer_frames = 256\n", "nan"), "b.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("latency_offset_ms"), "{e}");
        let e = HwProfile::parse(
            &profile_text("Big Box", "buffer_frames = 256\n", "1.0"),
            "b.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("name") && e.contains("Big Box"), "{e}");
        let e = HwProfile::parse("name = ", "b.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("b.toml"), "{e}");
        assert!(
            HwProfile::parse(&profile_text("b", "buffer_frames = 256\n", "1.0"), "b.toml").is_ok()
        );
    }

    #[test]
    fn by_name_finds_or_lists_the_known_names() {
        assert_eq!(by_name("rpi-i2s-dac").unwrap().name, "rpi-i2s-dac");
        let e = by_name("pi4").unwrap_err();
        assert!(matches!(e, HwError::Unknown { .. }));
        let msg = e.to_string();
        assert!(msg.contains("\"pi4\""), "{msg}");
        for n in names() {
            assert!(msg.contains(&n), "{msg} lacks {n}");
        }
        assert_eq!(load("x86-mini-pc").unwrap().name, "x86-mini-pc");
    }

    #[test]
    fn load_reads_a_custom_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("mine.toml");
        std::fs::write(&p, "name = \"mine\"\ndescription = \"calibrated\"\nalsa_device_pattern = \"plughw:CARD=CODEC,DEV=0\"\nbuffer_frames = 256\nsample_rate = 48000\nlatency_offset_ms = 2.75\n").unwrap();
        let prof = load(p.to_str().unwrap()).unwrap();
        assert_eq!(prof.latency_offset_ms, 2.75);
        let e = load(dir.path().join("absent.toml").to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("absent.toml"), "{e}");
    }

    #[test]
    fn parses_proc_asound_cards() {
        let c = parse_cards(PI4_HIFIBERRY_CARDS);
        assert_eq!(c.len(), 3);
        assert_eq!(c[1].index, 1);
        assert_eq!(c[1].id, "sndrpihifiberry");
        assert_eq!(c[1].driver, "HifiberryDacp");
        assert_eq!(c[1].name, "snd_rpi_hifiberry_dacplus");
        assert_eq!(c[1].long_name, "snd_rpi_hifiberry_dacplus");
        let c = parse_cards(NUC_USB_CARDS);
        assert_eq!(
            c[1].long_name,
            "Burr-Brown from TI USB Audio CODEC at usb-0000:00:14.0-2, full speed"
        );
        assert!(parse_cards("--- no soundcards ---\n").is_empty());
        assert!(parse_cards("").is_empty());
        assert!(parse_cards("garbage [x]: y\n 7 []: a - b\n").is_empty());
    }

    #[test]
    fn detects_a_pi4_headphone_jack() {
        let p = detect(Some(PI4_MODEL), PI4_CARDS).unwrap();
        assert_eq!(p.name, "rpi-headphones");
        assert_eq!(p.alsa_device_pattern, "*plughw:CARD=Headphones,DEV=0");
        assert_eq!(
            p.device_id().as_deref(),
            Some("plughw:CARD=Headphones,DEV=0")
        );
        assert!(p.matches_device("alsa:plughw:CARD=Headphones,DEV=0"));
        assert!(!p.matches_device("alsa:plughw:CARD=vc4hdmi0,DEV=0"));
    }

    #[test]
    fn a_dac_hat_beats_the_jack() {
        let p = detect(Some(PI4_MODEL), PI4_HIFIBERRY_CARDS).unwrap();
        assert_eq!(p.name, "rpi-i2s-dac");
        assert_eq!(
            p.device_id().as_deref(),
            Some("plughw:CARD=sndrpihifiberry,DEV=0")
        );
        let ids = [
            "alsa:default",
            "alsa:hw:CARD=sndrpihifiberry,DEV=0",
            "alsa:plughw:CARD=sndrpihifiberry,DEV=0",
        ];
        assert_eq!(
            p.pick_device(ids),
            Some("alsa:plughw:CARD=sndrpihifiberry,DEV=0")
        );
    }

    #[test]
    fn a_usb_interface_beats_everything_on_any_board() {
        let p = detect(Some(PI5_MODEL), PI5_USB_CARDS).unwrap();
        assert_eq!(p.name, "usb-class-compliant");
        assert_eq!(p.device_id().as_deref(), Some("plughw:CARD=USB,DEV=0"));
        let p = detect(None, NUC_USB_CARDS).unwrap();
        assert_eq!(p.name, "usb-class-compliant");
        assert_eq!(p.device_id().as_deref(), Some("plughw:CARD=CODEC,DEV=0"));
    }

    #[test]
    fn detects_an_x86_mini_pc_and_skips_its_hdmi_card() {
        let p = detect(None, NUC_CARDS).unwrap();
        assert_eq!(p.name, "x86-mini-pc");
        assert_eq!(p.device_id().as_deref(), Some("plughw:CARD=PCH,DEV=0"));
        // A device tree (an ARM board) is not a PC, even with an HDA-like card name.
        assert_eq!(detect(Some("Some ARM board\0"), NUC_CARDS), None);
        // An empty model file counts as none.
        assert_eq!(detect(Some("\0"), NUC_CARDS).unwrap().name, "x86-mini-pc");
    }

    #[test]
    fn nothing_fits_without_a_usable_card() {
        assert_eq!(detect(Some(PI5_MODEL), PI5_HDMI_ONLY), None);
        assert_eq!(detect(Some(PI4_MODEL), ""), None);
        assert_eq!(detect(None, "--- no soundcards ---\n"), None);
        // The jack's card on something that is not a Pi does not make it one.
        assert_eq!(detect(Some("Pine64 RockPro64\0"), PI4_CARDS), None);
    }

    #[test]
    fn by_name_profiles_match_any_card() {
        let p = by_name("usb-class-compliant").unwrap();
        assert_eq!(p.device_id(), None, "{{card}} is unresolved");
        assert!(p.matches_device("alsa:plughw:CARD=Scarlett2i2,DEV=0"));
        assert!(!p.matches_device("alsa:hw:CARD=Scarlett2i2,DEV=0"));
        assert!(!p.matches_device("alsa:plughw:CARD=x,DEV=1"));
    }

    #[test]
    fn globs() {
        assert!(glob_match("*", ""));
        assert!(glob_match("a*c", "abbbc"));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "ac"));
        assert!(glob_match(
            "*plughw:card=*,dev=0",
            "alsa:plughw:card=pch,dev=0"
        ));
        assert!(!glob_match(
            "*plughw:card=*,dev=0",
            "alsa:plughw:card=pch,dev=01"
        ));
        assert!(glob_match("**a", "a"));
        let p = HwProfile {
            alsa_device_pattern: "Headphones".into(),
            ..by_name("rpi-headphones").unwrap()
        };
        assert!(
            p.matches_device("alsa:hw:CARD=headphones,DEV=0"),
            "no wildcard: substring, any case"
        );
    }
}
