//! The report's figures, drawn once per backend: SVG (inlined in the HTML) and PNG.

use std::path::Path;
use std::sync::Once;

use anyhow::{anyhow, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::metrics::bootstrap::quantile;

type DrawResult = Result<(), Box<dyn std::error::Error>>;

/// The font the PNG backend rasterises with (DejaVu Sans subset, see assets/fonts/README.md).
static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans-subset.ttf");
const FAMILY: &str = "sans-serif";

/// tab10 colours: distinguishable, colour-blind tolerable.
const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// A figure that can draw itself on any plotters backend.
pub trait Figure {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult
    where
        DB::ErrorType: 'static;
}

/// Draws `fig` to `dir/name.svg` and `dir/name.png`; returns the SVG text.
pub fn render(fig: &impl Figure, size: (u32, u32), dir: &Path, name: &str) -> Result<String> {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        // The font is compiled in and known valid; a failure would only drop PNG text.
        let _ = plotters::style::register_font(FAMILY, FontStyle::Normal, FONT);
    });
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        fig.draw(&root)
            .map_err(|e| anyhow!("drawing {name}.svg: {e}"))?;
        root.present()
            .map_err(|e| anyhow!("drawing {name}.svg: {e}"))?;
    }
    let svg_path = dir.join(format!("{name}.svg"));
    std::fs::write(&svg_path, &svg).with_context(|| format!("writing {}", svg_path.display()))?;
    // Drawn to RGB pixels and encoded by the `image` crate the server already decodes with
    // (plotters' own encoder would build a second, older `image`).
    let png = dir.join(format!("{name}.png"));
    let mut pixels = vec![0u8; size.0 as usize * size.1 as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, size).into_drawing_area();
        fig.draw(&root)
            .map_err(|e| anyhow!("drawing {}: {e}", png.display()))?;
        root.present()
            .map_err(|e| anyhow!("drawing {}: {e}", png.display()))?;
    }
    image::RgbImage::from_raw(size.0, size.1, pixels)
        .context("the figure's pixel buffer does not match its size")?
        .save_with_format(&png, image::ImageFormat::Png)
        .with_context(|| format!("writing {}", png.display()))?;
    Ok(svg)
}

fn finite_max(v: &[f64]) -> f64 {
    v.iter()
        .copied()
        .filter(|x| x.is_finite())
        .fold(f64::NEG_INFINITY, f64::max)
}

fn finite_min(v: &[f64]) -> f64 {
    v.iter()
        .copied()
        .filter(|x| x.is_finite())
        .fold(f64::INFINITY, f64::min)
}

/// A padded axis range covering `[lo, hi]` (never empty).
fn range(lo: f64, hi: f64) -> std::ops::Range<f64> {
    if !(lo.is_finite() && hi.is_finite()) {
        return 0.0..1.0;
    }
    let pad = if hi > lo { (hi - lo) * 0.05 } else { 0.5 };
    (lo - pad)..(hi + pad)
}

/// Binned median of `y` over equal-count bins of `x`, with the standard error of the median
/// (`1.2533 σ / √m`, its large-sample value): `(median x, median y, s.e.)` per bin.
pub fn binned_median(x: &[f64], y: &[f64], bins: usize) -> Vec<(f64, f64, f64)> {
    let mut idx: Vec<usize> = (0..x.len()).collect();
    idx.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let bins = bins.clamp(1, x.len().max(1));
    (0..bins)
        .filter_map(|b| {
            let part = &idx[b * idx.len() / bins..(b + 1) * idx.len() / bins];
            if part.is_empty() {
                return None;
            }
            let mut xs: Vec<f64> = part.iter().map(|&i| x[i]).collect();
            let mut ys: Vec<f64> = part.iter().map(|&i| y[i]).collect();
            xs.sort_by(f64::total_cmp);
            ys.sort_by(f64::total_cmp);
            let m = ys.len() as f64;
            let mean = ys.iter().sum::<f64>() / m;
            let sd =
                (ys.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (m - 1.0).max(1.0)).sqrt();
            Some((
                quantile(&xs, 0.5),
                quantile(&ys, 0.5),
                1.2533 * sd / m.sqrt(),
            ))
        })
        .collect()
}

/// A vertical error bar from `lo` to `hi` at `x`, with caps `cap` wide each side (data units).
fn error_bar(
    x: f64,
    lo: f64,
    hi: f64,
    cap: f64,
    style: ShapeStyle,
) -> [PathElement<(f64, f64)>; 3] {
    [
        PathElement::new([(x, lo), (x, hi)], style),
        PathElement::new([(x - cap, lo), (x + cap, lo)], style),
        PathElement::new([(x - cap, hi), (x + cap, hi)], style),
    ]
}

/// Input margin vs logit margin: every sample, the binned median ± s.e., and the ε values.
pub struct MarginScatter<'a> {
    pub d_in: &'a [f64],
    pub d_out: &'a [f64],
    pub eps: &'a [(String, f64)],
    pub norm_label: &'a str,
    pub tau: f64,
}

impl Figure for MarginScatter<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult
    where
        DB::ErrorType: 'static,
    {
        root.fill(&WHITE)?;
        let xr = range(0.0, finite_max(self.d_in).max(0.0));
        let yr = range(
            finite_min(self.d_out).min(0.0),
            finite_max(self.d_out).max(0.0),
        );
        let (x_hi, y_lo, y_hi) = (xr.end, yr.start, yr.end);
        let mut chart = ChartBuilder::on(root)
            .caption(
                format!("Input vs logit margin (Kendall τ = {:.3})", self.tau),
                (FAMILY, 22),
            )
            .margin(12)
            .x_label_area_size(48)
            .y_label_area_size(60)
            .build_cartesian_2d(xr, yr)?;
        chart
            .configure_mesh()
            .x_desc(format!("input margin d_in ({})", self.norm_label))
            .y_desc("logit margin d_out")
            .label_style((FAMILY, 14))
            .axis_desc_style((FAMILY, 16))
            .light_line_style(WHITE.mix(0.0))
            .draw()?;
        for (i, (label, e)) in self.eps.iter().enumerate() {
            if *e < x_hi {
                chart
                    .draw_series(DashedLineSeries::new(
                        [(*e, y_lo), (*e, y_hi)],
                        6,
                        4,
                        color(i + 2).mix(0.7).stroke_width(1),
                    ))?
                    .label(format!("ε = {label}"))
                    .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color(i + 2)));
            }
        }
        chart
            .draw_series(
                self.d_in
                    .iter()
                    .zip(self.d_out)
                    .map(|(&x, &y)| Circle::new((x, y), 2, color(0).mix(0.35).filled())),
            )?
            .label("samples")
            .legend(|(x, y)| Circle::new((x + 9, y), 3, color(0).filled()));
        let bins = binned_median(self.d_in, self.d_out, (self.d_in.len() / 25).clamp(2, 20));
        chart
            .draw_series(LineSeries::new(
                bins.iter().map(|&(x, y, _)| (x, y)),
                BLACK.stroke_width(2),
            ))?
            .label("binned median ± s.e.")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], BLACK.stroke_width(2)));
        let cap = x_hi * 0.006;
        chart
            .draw_series(bins.iter().flat_map(|&(x, y, se)| {
                error_bar(x, y - se, y + se, cap, BLACK.stroke_width(2))
            }))?;
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .label_font((FAMILY, 14))
            .draw()?;
        Ok(())
    }
}

/// A legend label and its points.
pub type Series = (String, Vec<(f64, f64)>);

/// Several curves on the unit square (ROC or PR), one per ε.
pub struct Curves<'a> {
    pub title: String,
    pub x_desc: &'a str,
    pub y_desc: &'a str,
    /// `(legend, points)`.
    pub series: Vec<Series>,
    /// Draw the chance diagonal (ROC).
    pub diagonal: bool,
    pub legend_at: SeriesLabelPosition,
}

impl Figure for Curves<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult
    where
        DB::ErrorType: 'static,
    {
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, (FAMILY, 22))
            .margin(12)
            .x_label_area_size(48)
            .y_label_area_size(56)
            .build_cartesian_2d(-0.01f64..1.01, -0.01f64..1.01)?;
        chart
            .configure_mesh()
            .x_desc(self.x_desc)
            .y_desc(self.y_desc)
            .label_style((FAMILY, 14))
            .axis_desc_style((FAMILY, 16))
            .light_line_style(BLACK.mix(0.05))
            .draw()?;
        if self.diagonal {
            chart.draw_series(DashedLineSeries::new(
                [(0.0, 0.0), (1.0, 1.0)],
                6,
                4,
                BLACK.mix(0.4).into(),
            ))?;
        }
        for (i, (label, pts)) in self.series.iter().enumerate() {
            let c = color(i);
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))?
                .label(label)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], c.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .position(self.legend_at.clone())
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .label_font((FAMILY, 14))
            .draw()?;
        Ok(())
    }
}

/// Kendall τ of each score with its 95% bootstrap interval, as bars.
pub struct TauBars {
    /// `(score, τ, [lo, hi])`.
    pub bars: Vec<(String, f64, [f64; 2])>,
}

impl Figure for TauBars {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult
    where
        DB::ErrorType: 'static,
    {
        root.fill(&WHITE)?;
        let k = self.bars.len().max(1) as f64;
        let lo = self
            .bars
            .iter()
            .flat_map(|(_, t, ci)| [*t, ci[0]])
            .filter(|v| v.is_finite())
            .fold(0.0, f64::min);
        let mut chart = ChartBuilder::on(root)
            .caption(
                "Margin consistency per score (Kendall τ, 95% CI)",
                (FAMILY, 22),
            )
            .margin(12)
            .x_label_area_size(48)
            .y_label_area_size(56)
            .build_cartesian_2d(-0.5f64..k - 0.5, lo.min(0.0) - 0.02..1.02)?;
        let names: Vec<String> = self.bars.iter().map(|b| b.0.clone()).collect();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(self.bars.len().max(1))
            .x_label_formatter(&|v| {
                let i = v.round();
                if (v - i).abs() < 1e-6 && i >= 0.0 {
                    names.get(i as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_desc("Kendall τ with input margin")
            .label_style((FAMILY, 14))
            .axis_desc_style((FAMILY, 16))
            .light_line_style(BLACK.mix(0.05))
            .draw()?;
        for (i, (_, tau, ci)) in self.bars.iter().enumerate() {
            let x = i as f64;
            if tau.is_finite() {
                chart.draw_series([Rectangle::new(
                    [(x - 0.35, 0.0), (x + 0.35, *tau)],
                    color(i).mix(0.8).filled(),
                )])?;
            }
            if ci[0].is_finite() && ci[1].is_finite() {
                chart.draw_series(error_bar(x, ci[0], ci[1], 0.08, BLACK.stroke_width(2)))?;
            }
        }
        Ok(())
    }
}

/// Histogram of the input margins with the ε values marked.
pub struct MarginHistogram<'a> {
    pub d_in: &'a [f64],
    pub eps: &'a [(String, f64)],
    pub norm_label: &'a str,
}

impl Figure for MarginHistogram<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult
    where
        DB::ErrorType: 'static,
    {
        root.fill(&WHITE)?;
        let hi = finite_max(self.d_in).max(finite_max(
            &self.eps.iter().map(|e| e.1).collect::<Vec<_>>(),
        ));
        let hi = if hi.is_finite() && hi > 0.0 { hi } else { 1.0 };
        let nb = 40usize;
        let w = hi / nb as f64;
        let mut counts = vec![0usize; nb];
        for &d in self.d_in.iter().filter(|d| d.is_finite()) {
            counts[((d / w) as usize).min(nb - 1)] += 1;
        }
        let top = *counts.iter().max().unwrap_or(&1) as f64 * 1.08 + 1.0;
        let mut chart = ChartBuilder::on(root)
            .caption("Input margins", (FAMILY, 22))
            .margin(12)
            .x_label_area_size(48)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..hi * 1.02, 0.0..top)?;
        chart
            .configure_mesh()
            .x_desc(format!("input margin d_in ({})", self.norm_label))
            .y_desc("samples")
            .label_style((FAMILY, 14))
            .axis_desc_style((FAMILY, 16))
            .light_line_style(BLACK.mix(0.05))
            .draw()?;
        chart.draw_series(counts.iter().enumerate().map(|(i, &c)| {
            let x0 = i as f64 * w;
            Rectangle::new([(x0, 0.0), (x0 + w, c as f64)], color(0).mix(0.7).filled())
        }))?;
        for (i, (label, e)) in self.eps.iter().enumerate() {
            let c = color(i + 1);
            chart
                .draw_series(DashedLineSeries::new(
                    [(*e, 0.0), (*e, top)],
                    6,
                    4,
                    c.stroke_width(2),
                ))?
                .label(format!("ε = {label}"))
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], c.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .label_font((FAMILY, 14))
            .draw()?;
        Ok(())
    }
}

/// Each sample's bracket `[certified radius, attack margin]` as a vertical segment, samples
/// sorted by the attack margin: the gap between the two curves is what no tool can yet say.
pub struct BracketPlot<'a> {
    /// `(lower, upper)` per sample.
    pub brackets: &'a [(f64, f64)],
    pub norm_label: &'a str,
}

impl Figure for BracketPlot<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult
    where
        DB::ErrorType: 'static,
    {
        root.fill(&WHITE)?;
        let mut b: Vec<(f64, f64)> = self
            .brackets
            .iter()
            .copied()
            .filter(|(_, u)| u.is_finite())
            .collect();
        b.sort_by(|x, y| x.1.total_cmp(&y.1));
        let top = finite_max(&b.iter().map(|p| p.1).collect::<Vec<_>>());
        let top = if top.is_finite() && top > 0.0 {
            top * 1.05
        } else {
            1.0
        };
        let n = b.len().max(1) as f64;
        let mut chart = ChartBuilder::on(root)
            .caption("Margin brackets", (FAMILY, 22))
            .margin(12)
            .x_label_area_size(48)
            .y_label_area_size(64)
            .build_cartesian_2d(0.0..n, 0.0..top)?;
        chart
            .configure_mesh()
            .x_desc("samples, sorted by attack margin")
            .y_desc(format!("input margin ({})", self.norm_label))
            .label_style((FAMILY, 14))
            .axis_desc_style((FAMILY, 16))
            .light_line_style(BLACK.mix(0.05))
            .draw()?;
        chart.draw_series(b.iter().enumerate().map(|(i, &(l, u))| {
            let x = i as f64 + 0.5;
            PathElement::new([(x, l), (x, u)], color(7).mix(0.6).stroke_width(1))
        }))?;
        for (k, (name, pick)) in [
            ("attack margin (upper)", 1usize),
            ("certified radius (lower)", 0),
        ]
        .into_iter()
        .enumerate()
        {
            let c = color(k);
            chart
                .draw_series(b.iter().enumerate().map(move |(i, p)| {
                    let y = if pick == 1 { p.1 } else { p.0 };
                    Circle::new((i as f64 + 0.5, y), 2, c.filled())
                }))?
                .label(name)
                .legend(move |(x, y)| Circle::new((x + 8, y), 3, c.filled()));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .label_font((FAMILY, 14))
            .draw()?;
        Ok(())
    }
}
