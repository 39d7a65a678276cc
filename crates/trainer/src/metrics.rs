//! What a run reports: one JSON line per optimizer step in `metrics.jsonl`, and a loss-curve PNG
//! drawn at the end (no plotting dependency: a small rasteriser on the `image` crate).

use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};
use serde::{Deserialize, Serialize};

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
}

/// Appends metrics lines, one whole line per write, flushed, so a killed run keeps everything
/// it logged and a full disk tears at most the last line ([`llava_io::lines`]).
pub struct MetricsWriter {
    path: PathBuf,
    log: llava_io::lines::LineLog,
}

impl MetricsWriter {
    /// Opens `path` for appending (a resumed run continues the same file; see [`resume_metrics`]).
    pub fn open(path: &Path) -> std::io::Result<Self> {
        Ok(Self { path: path.to_path_buf(), log: llava_io::lines::LineLog::append(path)? })
    }

    pub fn write(&mut self, m: &StepMetrics) -> std::io::Result<()> {
        let line = serde_json::to_string(m).map_err(std::io::Error::other)?;
        self.log.write_lines(&[line])
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Prepares `metrics.jsonl` for a run that continues at optimizer step `step` (0: a fresh
/// start): a torn last line (a kill or a full disk during its write) is cut off, every complete
/// line of an earlier step is kept as it is (one that does not parse included, with a warning),
/// and the lines from `step` on, which describe steps the resumed run does again, are dropped
/// with one `ftruncate` (a kill during it leaves the file as it was or shortened, never empty).
/// Returns how many lines were kept.
pub fn resume_metrics(path: &Path, step: usize) -> std::io::Result<usize> {
    let recovered = llava_io::lines::recover(path)?;
    let keep = llava_io::lines::parse_json::<StepMetrics>(path, &recovered.lines, "kept, but it is not metrics")
        .find(|(_, m)| m.as_ref().is_some_and(|m| m.step >= step))
        .map_or(recovered.lines.len(), |(i, _)| i);
    if keep < recovered.lines.len() {
        llava_io::lines::truncate_to_lines(path, keep)?;
    }
    Ok(keep)
}

/// Reads a `metrics.jsonl`: every complete line that parses (a torn last line and lines that do
/// not parse are skipped, the latter with a warning naming the line).
pub fn read_metrics(path: &Path) -> std::io::Result<Vec<StepMetrics>> {
    let lines = llava_io::lines::complete_lines(path)?.lines;
    Ok(llava_io::lines::parse_json(path, &lines, "skipped").filter_map(|(_, m)| m).collect())
}

/// Draws `(step, loss)` (and an optional second series, e.g. validation loss) as a line chart
/// with axes and tick marks, `width × height` pixels, and writes it as PNG.
pub fn plot_loss_curve(
    path: &Path, train: &[(f64, f64)], val: &[(f64, f64)], width: u32, height: u32,
) -> image::ImageResult<()> {
    let mut img = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    let (left, right, top, bottom) = (40.0, width as f64 - 10.0, 10.0, height as f64 - 30.0);
    let all: Vec<&(f64, f64)> = train.iter().chain(val).filter(|p| p.0.is_finite() && p.1.is_finite()).collect();
    let (x0, x1) = all.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (y0, y1) = all.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let (y0, y1) = if all.is_empty() { (0.0, 1.0) } else { (y0.min(0.0), if y1 > y0 { y1 } else { y0 + 1.0 }) };
    let x1 = if x1 > x0 { x1 } else { x0 + 1.0 };
    let map = |p: &(f64, f64)| {
        (left + (p.0 - x0) / (x1 - x0) * (right - left), bottom - (p.1 - y0) / (y1 - y0) * (bottom - top))
    };
    let black = Rgb([0, 0, 0]);
    line(&mut img, (left, bottom), (right, bottom), black);
    line(&mut img, (left, bottom), (left, top), black);
    for k in 0..=4 {
        let y = bottom - k as f64 / 4.0 * (bottom - top);
        line(&mut img, (left - 4.0, y), (left, y), black);
        let x = left + k as f64 / 4.0 * (right - left);
        line(&mut img, (x, bottom), (x, bottom + 4.0), black);
    }
    for (series, color) in [(train, Rgb([31, 119, 180])), (val, Rgb([255, 127, 14]))] {
        for w in series.windows(2) {
            line(&mut img, map(&w[0]), map(&w[1]), color);
        }
    }
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
    llava_io::write_atomically(path, |w| w.write_all(&png)).map_err(image::ImageError::IoError)
}

fn line(img: &mut RgbImage, a: (f64, f64), b: (f64, f64), color: Rgb<u8>) {
    let steps = ((b.0 - a.0).abs().max((b.1 - a.1).abs()).ceil() as usize).max(1);
    for i in 0..=steps {
        let t = i as f64 / steps as f64;
        let (x, y) = (a.0 + t * (b.0 - a.0), a.1 + t * (b.1 - a.1));
        if x >= 0.0 && y >= 0.0 && (x as u32) < img.width() && (y as u32) < img.height() {
            img.put_pixel(x as u32, y as u32, color);
        }
    }
}

/// The live view of a run: on a terminal, one progress bar redrawn in place (step, loss, learning
/// rate, tokens/s, ETA); otherwise (logs, CI) a `tracing` line every `total / 50` steps.
pub struct Progress {
    label: String,
    total: usize,
    first: usize,
    start: std::time::Instant,
    tty: bool,
    every: usize,
}

impl Progress {
    /// `first` is the step the run starts (or resumes) at.
    pub fn new(label: &str, first: usize, total: usize) -> Self {
        use std::io::IsTerminal;
        Self {
            label: label.to_string(),
            total,
            first,
            start: std::time::Instant::now(),
            tty: std::io::stderr().is_terminal(),
            every: (total / 50).max(1),
        }
    }

    /// Seconds left, extrapolated from the steps done in this process.
    pub fn eta(&self, step: usize) -> f64 {
        let done = step.saturating_sub(self.first).max(1);
        self.start.elapsed().as_secs_f64() / done as f64 * self.total.saturating_sub(step) as f64
    }

    /// Shows `step` (1-based, completed) with the step's numbers.
    pub fn update(&mut self, step: usize, loss: f64, lr: f64, tokens_per_s: f64) {
        let eta = format_duration(self.eta(step));
        let text = format!(
            "{} {step}/{} loss {loss:.4} lr {lr:.2e} {tokens_per_s:.0} tok/s ETA {eta}",
            self.label, self.total
        );
        if self.tty {
            let width = 30;
            let filled = (step * width / self.total.max(1)).min(width);
            eprint!("\r\x1b[2K[{}{}] {text}", "#".repeat(filled), ".".repeat(width - filled));
            if step >= self.total {
                eprintln!();
            }
        } else if step.is_multiple_of(self.every) || step >= self.total || step == self.first + 1 {
            tracing::info!("{text}");
        }
    }

    /// Ends the bar's line so that logs start on a fresh one.
    pub fn finish(&self) {
        if self.tty {
            eprintln!();
        }
    }
}

/// `95` → `1m35s`.
pub fn format_duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}
