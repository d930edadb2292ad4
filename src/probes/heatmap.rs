//! The probe-accuracy heatmap: layers × heads, one cell per probe coloured by its validation accuracy on a
//! viridis scale with a colour bar, the chosen heads outlined, a title naming the model and the run.
//!
//! The cell size adapts to the model so the figure stays readable from SmolLM2's 30 × 9 heads to a 70B's
//! 80 × 64: square cells of 6 to 28 pixels, tick labels thinned to keep them apart.

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::figure::{bold, drawing, font, tick_step, viridis, Figure};

/// What the heatmap shows; built from a probe report.
pub struct Heatmap<'a> {
    /// `[layer][head]` validation accuracy.
    pub accuracy: &'a [Vec<f64>],
    /// Chosen heads `[layer, head]`.
    pub chosen: &'a [super::Head],
    pub title: String,
    pub subtitle: String,
    /// What a column is: `attention head`, or the residual stream.
    pub columns: &'static str,
}

/// The pixel layout, derived from the model's shape.
struct Layout {
    cell: i32,
    layers: i32,
    heads: i32,
    /// Top-left corner of the cell grid.
    left: i32,
    top: i32,
    width: i32,
    height: i32,
}

impl Layout {
    /// The top-left pixel of a probe's cell.
    fn cell_origin(&self, layer: usize, head: usize) -> (i32, i32) {
        (self.left + head as i32 * self.cell, self.top + layer as i32 * self.cell)
    }
}

const MARGIN_LEFT: i32 = 72;
const MARGIN_TOP: i32 = 70;
const MARGIN_BOTTOM: i32 = 56;
/// The colour bar, its ticks and its label.
const MARGIN_RIGHT: i32 = 110;
const MIN_WIDTH: i32 = 600;
const GRID_TARGET: f64 = 640.0;
const OUTLINE: RGBColor = RGBColor(230, 25, 25);
const INK: RGBColor = RGBColor(30, 30, 30);

impl Heatmap<'_> {
    fn layout(&self) -> Layout {
        let layers = self.accuracy.len().max(1) as i32;
        let heads = self.accuracy.iter().map(Vec::len).max().unwrap_or(1).max(1) as i32;
        let fit = (GRID_TARGET / heads as f64).min(GRID_TARGET / layers as f64).floor() as i32;
        let cell = fit.clamp(6, 28);
        let grid_width = cell * heads;
        let width = (MARGIN_LEFT + grid_width + MARGIN_RIGHT).max(MIN_WIDTH);
        // Extra width (narrow models) goes on both sides of the grid and its colour bar.
        let left = MARGIN_LEFT + (width - MARGIN_LEFT - grid_width - MARGIN_RIGHT) / 2;
        Layout { cell, layers, heads, left, top: MARGIN_TOP, width, height: MARGIN_TOP + cell * layers + MARGIN_BOTTOM }
    }

    /// The colour scale: the data's range widened to multiples of 0.05 (at least 0.05 wide).
    fn scale(&self) -> (f64, f64) {
        let values = self.accuracy.iter().flatten().copied().filter(|v| v.is_finite());
        let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
        if lo > hi {
            return (0.0, 1.0);
        }
        let (lo, hi) = ((lo * 20.0).floor() / 20.0, (hi * 20.0).ceil() / 20.0);
        if hi - lo < 0.05 {
            (lo, lo + 0.05)
        } else {
            (lo, hi)
        }
    }
}

impl Figure for Heatmap<'_> {
    fn size(&self) -> (u32, u32) {
        let l = self.layout();
        (l.width as u32, l.height as u32)
    }

    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> Result<(), String> {
        let l = self.layout();
        let (lo, hi) = self.scale();
        drawing(area.fill(&WHITE))?;
        draw_titles(area, &l, &self.title, &self.subtitle)?;
        for (layer, row) in self.accuracy.iter().enumerate() {
            for (head, &acc) in row.iter().enumerate() {
                let (x, y) = l.cell_origin(layer, head);
                let colour = viridis((acc - lo) / (hi - lo));
                drawing(area.draw(&Rectangle::new([(x, y), (x + l.cell, y + l.cell)], colour.filled())))?;
            }
        }
        for &super::Head { layer, head } in self.chosen {
            let (x, y) = l.cell_origin(layer, head);
            // Two pixels wide, inside the cell, so neighbouring outlines never overlap.
            for inset in [0, 1] {
                let corners = [(x + inset, y + inset), (x + l.cell - 1 - inset, y + l.cell - 1 - inset)];
                drawing(area.draw(&Rectangle::new(corners, OUTLINE.stroke_width(1))))?;
            }
        }
        draw_axes(area, &l, self.columns)?;
        draw_colour_bar(area, &l, lo, hi)
    }
}

fn draw_titles<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    l: &Layout,
    title: &str,
    subtitle: &str,
) -> Result<(), String> {
    let centre = Pos::new(HPos::Center, VPos::Center);
    drawing(area.draw(&Text::new(title.to_string(), (l.width / 2, 20), bold(17).pos(centre).color(&INK))))?;
    drawing(area.draw(&Text::new(subtitle.to_string(), (l.width / 2, 44), font(13).pos(centre).color(&INK))))
}

fn draw_axes<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, l: &Layout, columns: &str) -> Result<(), String> {
    let (grid_w, grid_h) = (l.cell * l.heads, l.cell * l.layers);
    drawing(
        area.draw(&Rectangle::new([(l.left - 1, l.top - 1), (l.left + grid_w, l.top + grid_h)], INK.stroke_width(1))),
    )?;
    let ticks = font(12).color(&INK);
    let head_step = tick_step(l.cell as f64, 22.0) as i32;
    for head in (0..l.heads).step_by(head_step as usize) {
        let x = l.left + head * l.cell + l.cell / 2;
        let y = l.top + grid_h;
        drawing(area.draw(&PathElement::new(vec![(x, y), (x, y + 4)], INK)))?;
        let at = Pos::new(HPos::Center, VPos::Top);
        drawing(area.draw(&Text::new(head.to_string(), (x, y + 6), ticks.clone().pos(at))))?;
    }
    let layer_step = tick_step(l.cell as f64, 15.0) as i32;
    for layer in (0..l.layers).step_by(layer_step as usize) {
        let (x, y) = (l.left - 1, l.top + layer * l.cell + l.cell / 2);
        drawing(area.draw(&PathElement::new(vec![(x - 4, y), (x, y)], INK)))?;
        let at = Pos::new(HPos::Right, VPos::Center);
        drawing(area.draw(&Text::new(layer.to_string(), (x - 6, y), ticks.clone().pos(at))))?;
    }
    let label = font(14).color(&INK);
    let centre = Pos::new(HPos::Center, VPos::Center);
    let below = (l.left + grid_w / 2, l.top + grid_h + 38);
    drawing(area.draw(&Text::new(columns, below, label.clone().pos(centre))))?;
    let beside = (l.left - 52, l.top + grid_h / 2);
    let rotated = label.transform(FontTransform::Rotate270).pos(centre);
    drawing(area.draw(&Text::new("layer", beside, rotated)))
}

fn draw_colour_bar<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    l: &Layout,
    lo: f64,
    hi: f64,
) -> Result<(), String> {
    let grid_h = l.cell * l.layers;
    let (x0, x1) = (l.left + l.cell * l.heads + 18, l.left + l.cell * l.heads + 34);
    let (top, bottom) = (l.top, l.top + grid_h);
    // One band per pixel row, high values at the top.
    for y in top..bottom {
        let t = 1.0 - (y - top) as f64 / (grid_h - 1).max(1) as f64;
        drawing(area.draw(&Rectangle::new([(x0, y), (x1, y + 1)], viridis(t).filled())))?;
    }
    drawing(area.draw(&Rectangle::new([(x0, top), (x1, bottom)], INK.stroke_width(1))))?;
    // Ticks at multiples of 0.01 × a 1-2-5 step, at least 36 pixels apart.
    let hundredths = ((hi - lo) * 100.0).round().max(1.0);
    let step = tick_step(grid_h as f64 / hundredths, 36.0);
    let ticks = font(12).color(&INK);
    let at = Pos::new(HPos::Left, VPos::Center);
    let first = (lo * 100.0).round() as usize;
    let last = (hi * 100.0).round() as usize;
    for value in (first.div_ceil(step) * step..=last).step_by(step) {
        let t = (value as f64 / 100.0 - lo) / (hi - lo);
        let y = bottom - (t * grid_h as f64).round() as i32;
        drawing(area.draw(&PathElement::new(vec![(x1, y), (x1 + 4, y)], INK)))?;
        drawing(area.draw(&Text::new(format!("{:.2}", value as f64 / 100.0), (x1 + 6, y), ticks.clone().pos(at))))?;
    }
    let label = font(13).color(&INK).transform(FontTransform::Rotate90).pos(Pos::new(HPos::Center, VPos::Center));
    drawing(area.draw(&Text::new("probe validation accuracy", (x1 + 56, top + grid_h / 2), label)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accuracy(layers: usize, heads: usize) -> Vec<Vec<f64>> {
        (0..layers).map(|l| (0..heads).map(|h| 0.5 + 0.3 * ((l * heads + h) % 7) as f64 / 6.0).collect()).collect()
    }

    fn heatmap(accuracy: &[Vec<f64>]) -> Heatmap<'_> {
        Heatmap { accuracy, chosen: &[], title: String::new(), subtitle: String::new(), columns: "attention head" }
    }

    #[test]
    fn cells_stay_square_and_readable_from_small_to_70b_shapes() {
        for (layers, heads, cell) in [(30, 9, 21), (32, 32, 20), (80, 64, 8)] {
            let l = heatmap(&accuracy(layers, heads)).layout();
            assert_eq!(l.cell, cell, "{layers} x {heads}");
            assert!(l.width >= MIN_WIDTH && l.height <= 800, "{layers} x {heads}: {} x {}", l.width, l.height);
        }
    }

    #[test]
    fn the_scale_is_widened_to_twentieths() {
        assert_eq!(heatmap(&accuracy(2, 2)).scale(), (0.5, 0.65));
        assert_eq!(heatmap(&[vec![0.71, 0.72]]).scale(), (0.70, 0.75));
        assert_eq!(heatmap(&[]).scale(), (0.0, 1.0));
    }
}
