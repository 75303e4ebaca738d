//! The click sounds, synthesized once per stream (off the audio thread).
//!
//! Each click is a decaying cosine burst. It starts at its peak (cosine phase 0), so
//! the click's first sample is its loudest and the onset is exactly the scheduled
//! sample. The accent (first beat of a bar) is higher and louder.

/// Pre-rendered mono click samples.
#[derive(Clone, Debug)]
pub struct ClickSounds {
    pub accent: Vec<f32>,
    pub plain: Vec<f32>,
}

/// Peak of the accent click before gain.
pub const ACCENT_PEAK: f32 = 1.0;
/// Peak of a plain click before gain.
pub const PLAIN_PEAK: f32 = 0.55;

fn burst(sample_rate: u32, freq: f64, peak: f32, len_ms: f64, tau_ms: f64) -> Vec<f32> {
    let n = (sample_rate as f64 * len_ms / 1000.0).round() as usize;
    let sr = sample_rate as f64;
    (0..n)
        .map(|i| {
            let t = i as f64 / sr;
            let env = (-t * 1000.0 / tau_ms).exp();
            (peak as f64 * env * (2.0 * std::f64::consts::PI * freq * t).cos()) as f32
        })
        .collect()
}

impl ClickSounds {
    pub fn synth(sample_rate: u32) -> ClickSounds {
        ClickSounds {
            accent: burst(sample_rate, 1760.0, ACCENT_PEAK, 30.0, 6.0),
            plain: burst(sample_rate, 1320.0, PLAIN_PEAK, 30.0, 5.0),
        }
    }
    pub fn get(&self, accent: bool) -> &[f32] {
        if accent {
            &self.accent
        } else {
            &self.plain
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn clicks_start_at_their_peak() {
        let s = ClickSounds::synth(48_000);
        assert_eq!(s.accent[0], ACCENT_PEAK);
        assert_eq!(s.plain[0], PLAIN_PEAK);
        assert!(s.accent.iter().all(|x| x.abs() <= ACCENT_PEAK));
        assert_eq!(s.accent.len(), 1440);
    }
}
