//! Learning-curve output: a CSV table and a PNG line plot.
//!
//! What this is: [`curve_csv`]/[`save_csv`] write `step,mean_reward,eval_reward,elapsed_s`;
//! [`Plot`] is a tiny line-plot description (series, colours, an optional dashed threshold line)
//! that [`Plot::render_rgb`] draws into memory and [`Plot::save_png`] into a PNG through plotters'
//! bitmap backend. [`Plot::from_curve`] builds the ES picture: blue = mean return of the perturbed
//! episodes, red = evaluation of the current policy, dashed green = the solved threshold.
//!
//! What this is not: a charting library. plotters is built without font support (no system fonts
//! here), so it must never be asked to draw text; axis numbers come from a 3×5 pixel digit font in
//! this file, and there are no titles or legends beyond the colour key above.

use std::io::{self, Write};
use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::es::Curve;

/// Largest image side we draw (bounds memory: 4096² RGB is 48 MiB).
pub const MAX_SIDE: u32 = 4096;
/// Smallest image side that leaves room for the axes.
pub const MIN_SIDE: u32 = 64;
/// Most points per series (bounds drawing time).
pub const MAX_POINTS: usize = 1_000_000;

/// Errors while writing reports.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// Creating or writing the file failed. Remedy: check the directory exists and is writable.
    #[error("cannot write the report")]
    Io(#[from] io::Error),
    /// plotters failed while drawing or encoding; the text is its message.
    #[error("drawing failed: {0}")]
    Draw(String),
    /// Nothing to plot: no series has a finite point.
    #[error("nothing to plot")]
    Empty,
    /// The requested size is outside `MIN_SIDE..=MAX_SIDE`, or a series exceeds `MAX_POINTS`.
    #[error("plot too small or too large: {0}")]
    Size(String),
}

/// The CSV of a curve: header `step,mean_reward,eval_reward,elapsed_s`, one row per step; a step
/// without evaluation leaves `eval_reward` empty.
pub fn curve_csv(curve: &Curve) -> String {
    let mut out = Vec::new();
    // Writing to a Vec cannot fail.
    let _ = write_csv(curve, &mut out);
    String::from_utf8(out).unwrap_or_default()
}

/// Writes [`curve_csv`]'s text to `out`.
///
/// # Errors
/// Any error of `out`.
pub fn write_csv(curve: &Curve, mut out: impl Write) -> io::Result<()> {
    writeln!(out, "step,mean_reward,eval_reward,elapsed_s")?;
    for p in &curve.points {
        match p.eval_reward {
            Some(e) => writeln!(out, "{},{},{},{:.6}", p.step, p.mean_reward, e, p.elapsed_s)?,
            None => writeln!(out, "{},{},,{:.6}", p.step, p.mean_reward, p.elapsed_s)?,
        }
    }
    out.flush()
}

/// Writes the CSV of `curve` to `path` (created or truncated).
///
/// # Errors
/// [`ReportError::Io`].
pub fn save_csv(curve: &Curve, path: &Path) -> Result<(), ReportError> {
    let file = std::fs::File::create(path)?;
    write_csv(curve, io::BufWriter::new(file))?;
    Ok(())
}

/// One line of a plot.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// `(x, y)` points in drawing order; non-finite points are skipped.
    pub points: Vec<(f64, f64)>,
    /// Line colour, RGB.
    pub color: (u8, u8, u8),
}

/// A line plot: what to draw, not how.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plot {
    /// The lines, drawn in order (later on top).
    pub series: Vec<Series>,
    /// A dashed horizontal reference line (e.g. the solved threshold).
    pub threshold: Option<f64>,
}

/// Blue: mean perturbed return.
pub const MEAN_COLOR: (u8, u8, u8) = (31, 119, 180);
/// Red: evaluation of the current policy.
pub const EVAL_COLOR: (u8, u8, u8) = (214, 39, 40);
/// Green: the solved threshold.
pub const THRESHOLD_COLOR: (u8, u8, u8) = (44, 160, 44);

impl Plot {
    /// The ES learning curve: mean perturbed return (blue), evaluation (red), threshold (green).
    pub fn from_curve(curve: &Curve) -> Plot {
        let mean = curve
            .points
            .iter()
            .map(|p| (f64::from(p.step), f64::from(p.mean_reward)));
        let eval = curve
            .points
            .iter()
            .filter_map(|p| p.eval_reward.map(|e| (f64::from(p.step), f64::from(e))));
        Plot {
            series: vec![
                Series {
                    points: mean.collect(),
                    color: MEAN_COLOR,
                },
                Series {
                    points: eval.collect(),
                    color: EVAL_COLOR,
                },
            ],
            threshold: Some(f64::from(curve.threshold)),
        }
    }

    /// Draws into an RGB buffer of `width × height` (row-major, 3 bytes per pixel).
    ///
    /// # Errors
    /// [`ReportError::Size`], [`ReportError::Empty`] or [`ReportError::Draw`].
    pub fn render_rgb(&self, width: u32, height: u32) -> Result<Vec<u8>, ReportError> {
        self.check(width, height)?;
        let mut buf = vec![0u8; width as usize * height as usize * 3];
        {
            let area = BitMapBackend::with_buffer(&mut buf, (width, height)).into_drawing_area();
            self.draw(&area)?;
            area.present().map_err(draw_err)?;
        }
        Ok(buf)
    }

    /// Draws into a PNG file at `path` (the extension must be `.png`).
    ///
    /// # Errors
    /// [`ReportError::Size`], [`ReportError::Empty`], [`ReportError::Draw`] (including encoding
    /// and file errors, which plotters reports as drawing errors).
    pub fn save_png(&self, path: &Path, width: u32, height: u32) -> Result<(), ReportError> {
        self.check(width, height)?;
        if path.extension().and_then(|e| e.to_str()) != Some("png") {
            return Err(ReportError::Draw(format!(
                "{} does not end in .png",
                path.display()
            )));
        }
        let area = BitMapBackend::new(path, (width, height)).into_drawing_area();
        self.draw(&area)?;
        area.present().map_err(draw_err)
    }

    fn check(&self, width: u32, height: u32) -> Result<(), ReportError> {
        let ok = MIN_SIDE..=MAX_SIDE;
        if !ok.contains(&width) || !ok.contains(&height) {
            return Err(ReportError::Size(format!("{width}x{height}")));
        }
        if let Some(s) = self.series.iter().find(|s| s.points.len() > MAX_POINTS) {
            return Err(ReportError::Size(format!(
                "{} points in one series",
                s.points.len()
            )));
        }
        Ok(())
    }

    /// Data bounds over finite points and the threshold, widened so no range is empty.
    fn bounds(&self) -> Option<((f64, f64), (f64, f64))> {
        let pts = self
            .series
            .iter()
            .flat_map(|s| &s.points)
            .filter(|(x, y)| x.is_finite() && y.is_finite());
        let mut b: Option<((f64, f64), (f64, f64))> = None;
        for &(x, y) in pts {
            let ((x0, x1), (y0, y1)) = b.unwrap_or(((x, x), (y, y)));
            b = Some(((x0.min(x), x1.max(x)), (y0.min(y), y1.max(y))));
        }
        let ((x0, mut x1), (mut y0, mut y1)) = b?;
        if let Some(t) = self.threshold.filter(|t| t.is_finite()) {
            y0 = y0.min(t);
            y1 = y1.max(t);
        }
        if x1 <= x0 {
            x1 = x0 + 1.0;
        }
        let pad = ((y1 - y0) * 0.05).max(1e-9 * y1.abs().max(1.0));
        if y1 <= y0 {
            (y0, y1) = (y0 - 1.0, y1 + 1.0);
        }
        Some(((x0, x1), (y0 - pad, y1 + pad)))
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), ReportError> {
        let ((x0, x1), (y0, y1)) = self.bounds().ok_or(ReportError::Empty)?;
        root.fill(&WHITE).map_err(draw_err)?;
        let (w, h) = root.dim_in_pixel();
        // Room on the left and bottom for the digit labels (scale 2: 8 px per character).
        let (left, right, top, bottom) = (8 * 8 + 8, 12, 12, 28);
        let (pw, ph) = (w as i32 - left - right, h as i32 - top - bottom);
        let px = |x: f64| left + ((x - x0) / (x1 - x0) * f64::from(pw)).round() as i32;
        let py = |y: f64| top + ((y1 - y) / (y1 - y0) * f64::from(ph)).round() as i32;
        let grid = RGBColor(225, 225, 225);
        let ink = RGBColor(60, 60, 60);

        for (t, label) in ticks(y0, y1) {
            let y = py(t);
            root.draw(&PathElement::new(vec![(left, y), (left + pw, y)], grid))
                .map_err(draw_err)?;
            draw_text(root, &label, left - 6 - text_width(&label), y - 5, ink)?;
        }
        for (t, label) in ticks(x0, x1) {
            let x = px(t);
            root.draw(&PathElement::new(vec![(x, top), (x, top + ph)], grid))
                .map_err(draw_err)?;
            draw_text(root, &label, x - text_width(&label) / 2, top + ph + 8, ink)?;
        }
        root.draw(&Rectangle::new([(left, top), (left + pw, top + ph)], ink))
            .map_err(draw_err)?;

        if let Some(t) = self.threshold.filter(|t| t.is_finite()) {
            let (r, g, b) = THRESHOLD_COLOR;
            let style = RGBColor(r, g, b).stroke_width(2);
            let y = py(t);
            let mut x = left;
            while x < left + pw {
                let end = (x + 8).min(left + pw);
                root.draw(&PathElement::new(vec![(x, y), (end, y)], style))
                    .map_err(draw_err)?;
                x += 14;
            }
        }
        for s in &self.series {
            let (r, g, b) = s.color;
            let pts: Vec<(i32, i32)> = s
                .points
                .iter()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .map(|&(x, y)| (px(x), py(y)))
                .collect();
            root.draw(&PathElement::new(pts, RGBColor(r, g, b).stroke_width(2)))
                .map_err(draw_err)?;
        }
        Ok(())
    }
}

/// Writes the standard ES picture of `curve` (see [`Plot::from_curve`]) to a PNG of 800×500.
///
/// # Errors
/// As [`Plot::save_png`].
pub fn save_curve_png(curve: &Curve, path: &Path) -> Result<(), ReportError> {
    Plot::from_curve(curve).save_png(path, 800, 500)
}

fn draw_err<E: std::error::Error + Send + Sync>(e: DrawingAreaErrorKind<E>) -> ReportError {
    ReportError::Draw(e.to_string())
}

/// About five "nice" tick values (1, 2 or 5 × 10ᵏ apart) in `[lo, hi]`, with labels printed to the
/// precision the spacing needs.
fn ticks(lo: f64, hi: f64) -> Vec<(f64, String)> {
    let span = hi - lo;
    if !(span.is_finite() && span > 0.0) {
        return Vec::new();
    }
    let raw = span / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10().floor()) as usize
    };
    let mut out = Vec::new();
    let mut t = (lo / step).ceil() * step;
    while t <= hi && out.len() < 20 {
        // Avoid printing "-0".
        let v = if t.abs() < step * 1e-9 { 0.0 } else { t };
        out.push((v, format!("{v:.decimals$}")));
        t += step;
    }
    out
}

/// 3×5 bitmaps, one row per byte (bit 2 = left column), for the characters labels use.
fn glyph(c: char) -> Option<[u8; 5]> {
    Some(match c {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 2, 2, 2],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '-' => [0, 0, 7, 0, 0],
        '.' => [0, 0, 0, 0, 2],
        'e' => [0, 7, 7, 4, 7],
        _ => return None,
    })
}

/// Pixel size of one glyph cell and the gap after it.
const DOT: i32 = 2;
const ADVANCE: i32 = 4 * DOT;

fn text_width(s: &str) -> i32 {
    s.chars().count() as i32 * ADVANCE - DOT
}

/// Draws `s` with its top-left corner at `(x, y)`; unknown characters leave a blank.
fn draw_text<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    s: &str,
    x: i32,
    y: i32,
    color: RGBColor,
) -> Result<(), ReportError> {
    for (i, c) in s.chars().enumerate() {
        let Some(rows) = glyph(c) else { continue };
        let cx = x + i as i32 * ADVANCE;
        for (r, bits) in rows.iter().enumerate() {
            for col in 0..3 {
                if bits & (4 >> col) != 0 {
                    let (gx, gy) = (cx + col * DOT, y + r as i32 * DOT);
                    root.draw(&Rectangle::new(
                        [(gx, gy), (gx + DOT - 1, gy + DOT - 1)],
                        color.filled(),
                    ))
                    .map_err(draw_err)?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::EnvKind;
    use crate::es::{CurvePoint, StepStats};

    fn sample_curve() -> Curve {
        let mut c = Curve::new(EnvKind::CartPole);
        for step in 0..30u32 {
            let s = step as f32;
            c.push(
                &StepStats {
                    step,
                    mean_reward: 10.0 + 15.0 * s,
                    max_reward: 500.0,
                    min_reward: 9.0,
                    eval_reward: (step % 3 != 1).then_some(20.0 + 16.0 * s),
                    pairs: 20,
                    env_steps: 1000,
                    param_norm: 1.0,
                    solved: 20.0 + 16.0 * s >= 475.0,
                },
                f64::from(step) * 0.25,
            );
        }
        c
    }

    #[test]
    fn csv_has_the_agreed_columns() {
        let c = sample_curve();
        let csv = curve_csv(&c);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines[0], "step,mean_reward,eval_reward,elapsed_s");
        assert_eq!(lines.len(), 31);
        assert_eq!(lines[1], "0,10,20,0.000000");
        assert_eq!(lines[2], "1,25,,0.250000");
        assert_eq!(lines[3], "2,40,52,0.500000");
        assert_eq!(c.solved_at, Some(29));
    }

    #[test]
    fn ticks_are_nice() {
        let t: Vec<String> = ticks(-3.0, 512.0).into_iter().map(|t| t.1).collect();
        assert_eq!(t, ["0", "200", "400"]);
        let t: Vec<String> = ticks(0.0, 1.0).into_iter().map(|t| t.1).collect();
        assert_eq!(t, ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]);
        let t: Vec<String> = ticks(-1600.0, -100.0).into_iter().map(|t| t.1).collect();
        assert_eq!(t, ["-1500", "-1000", "-500"]);
        assert!(ticks(1.0, 1.0).is_empty());
        assert!(ticks(0.0, f64::NAN).is_empty());
    }

    fn count(buf: &[u8], (r, g, b): (u8, u8, u8)) -> usize {
        buf.chunks(3).filter(|p| p == &[r, g, b]).count()
    }

    #[test]
    fn rendering_draws_every_line() {
        let plot = Plot::from_curve(&sample_curve());
        let buf = plot.render_rgb(400, 300).unwrap();
        assert_eq!(buf.len(), 400 * 300 * 3);
        assert!(count(&buf, MEAN_COLOR) > 100, "mean line missing");
        assert!(count(&buf, EVAL_COLOR) > 100, "eval line missing");
        assert!(count(&buf, THRESHOLD_COLOR) > 50, "threshold missing");
        assert!(count(&buf, (60, 60, 60)) > 100, "axes and digits missing");
        // Mostly background.
        assert!(count(&buf, (255, 255, 255)) > 400 * 300 / 2);
        // Only one series: the red line is gone.
        let mut one = plot.clone();
        one.series.truncate(1);
        assert_eq!(count(&one.render_rgb(400, 300).unwrap(), EVAL_COLOR), 0);
    }

    #[test]
    fn png_file_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("curve.png");
        save_curve_png(&sample_curve(), &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes.len() > 1000, "{} bytes", bytes.len());
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        let csv = dir.path().join("curve.csv");
        save_csv(&sample_curve(), &csv).unwrap();
        assert_eq!(
            std::fs::read_to_string(&csv).unwrap(),
            curve_csv(&sample_curve())
        );
    }

    #[test]
    fn degenerate_inputs_are_errors_or_still_draw() {
        let empty = Curve::new(EnvKind::CartPole);
        assert!(matches!(
            Plot::from_curve(&empty).render_rgb(200, 200),
            Err(ReportError::Empty)
        ));
        let plot = Plot::from_curve(&sample_curve());
        assert!(matches!(
            plot.render_rgb(10, 200),
            Err(ReportError::Size(_))
        ));
        assert!(matches!(
            plot.render_rgb(200, MAX_SIDE + 1),
            Err(ReportError::Size(_))
        ));
        // One point, NaNs and a flat line still draw.
        let mut c = Curve::new(EnvKind::Pendulum);
        c.points.push(CurvePoint {
            step: 0,
            mean_reward: -1200.0,
            max_reward: -900.0,
            eval_reward: Some(f32::NAN),
            elapsed_s: 0.0,
        });
        assert!(Plot::from_curve(&c).render_rgb(200, 150).is_ok());
        let flat = Plot {
            series: vec![Series {
                points: vec![(0.0, 5.0), (1.0, 5.0)],
                color: (0, 0, 0),
            }],
            threshold: None,
        };
        assert!(flat.render_rgb(200, 150).is_ok());
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            plot.save_png(&dir.path().join("x.jpg"), 200, 200),
            Err(ReportError::Draw(_))
        ));
        assert!(save_curve_png(&sample_curve(), &dir.path().join("no/such/dir.png")).is_err());
    }
}
