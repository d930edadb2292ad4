//! Figures for people and papers, drawn with `plotters`: each figure is one function over any drawing backend,
//! written as PNG (for the model card and the terminal-minded) and SVG (for papers) from the same code.
//!
//! Text is rasterised from DejaVu Sans compiled into the binary, so a PNG is the same on every machine, needs
//! no system fonts, and the same inputs give the same bytes.

use std::path::Path;
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::error::{BakeError, IoContext, Result};

/// The font family every figure uses; registered once per process.
const FONT: &str = "sans-serif";

fn register_fonts() {
    static FONTS: Once = Once::new();
    FONTS.call_once(|| {
        // The bytes are DejaVu Sans from the `dejavu` crate: valid TrueType, so registration cannot fail.
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular());
        let _ = plotters::style::register_font(FONT, FontStyle::Bold, dejavu::sans::bold());
    });
}

/// A figure of a fixed pixel size, drawn by `draw` on whichever backend a format needs.
pub trait Figure {
    fn size(&self) -> (u32, u32);
    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> std::result::Result<(), String>;
}

/// Writes the figure as PNG (RGB, 8 bits).
pub fn write_png(figure: &impl Figure, path: &Path) -> Result<()> {
    let bytes = png_bytes(figure, path)?;
    std::fs::write(path, bytes).at(path)
}

/// The figure as PNG bytes; `path` is the file they are for, named in errors.
pub fn png_bytes(figure: &impl Figure, path: &Path) -> Result<Vec<u8>> {
    register_fonts();
    let (width, height) = figure.size();
    let mut pixels = vec![0u8; width as usize * height as usize * 3];
    {
        render(figure, BitMapBackend::with_buffer(&mut pixels, (width, height)), path)?;
    }
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let png_error = |e: png::EncodingError| encode(path, e.to_string());
    let mut writer = encoder.write_header().map_err(png_error)?;
    writer.write_image_data(&pixels).map_err(png_error)?;
    writer.finish().map_err(png_error)?;
    Ok(bytes)
}

/// Writes the figure as SVG (text as text, so it stays searchable and sharp).
pub fn write_svg(figure: &impl Figure, path: &Path) -> Result<()> {
    let text = svg_text(figure, path)?;
    std::fs::write(path, text).at(path)
}

/// The figure as SVG text; `path` is the file it is for, named in errors.
pub fn svg_text(figure: &impl Figure, path: &Path) -> Result<String> {
    register_fonts();
    let mut text = String::new();
    {
        render(figure, SVGBackend::with_string(&mut text, figure.size()), path)?;
    }
    Ok(text)
}

/// Draws the figure on a backend and flushes it; errors name the file the figure was for.
fn render<DB: DrawingBackend>(figure: &impl Figure, backend: DB, path: &Path) -> Result<()> {
    let area = backend.into_drawing_area();
    figure.draw(&area).and_then(|()| area.present().map_err(|e| e.to_string())).map_err(|m| encode(path, m))
}

fn encode(path: &Path, message: String) -> BakeError {
    BakeError::Encode { path: path.into(), message }
}

/// Turns a plotters drawing error into the message `Figure::draw` returns.
pub fn drawing<T, E: std::error::Error + Send + Sync>(
    result: std::result::Result<T, DrawingAreaErrorKind<E>>,
) -> std::result::Result<T, String> {
    result.map_err(|e| e.to_string())
}

/// The font of a figure at `size` pixels.
pub fn font(size: u32) -> TextStyle<'static> {
    (FONT, size).into_font().into()
}

/// The bold font of a figure at `size` pixels.
pub fn bold(size: u32) -> TextStyle<'static> {
    (FONT, size, FontStyle::Bold).into_font().into()
}

/// viridis, sampled at nine points (matplotlib's values), interpolated linearly; `t` in [0, 1]. Perceptually
/// uniform and readable in grey and by people with colour-vision deficiencies.
pub fn viridis(t: f64) -> RGBColor {
    const STOPS: [[f64; 3]; 9] = [
        [68.0, 1.0, 84.0],
        [71.0, 45.0, 123.0],
        [59.0, 82.0, 139.0],
        [44.0, 114.0, 142.0],
        [33.0, 145.0, 140.0],
        [40.0, 174.0, 128.0],
        [94.0, 201.0, 98.0],
        [170.0, 220.0, 50.0],
        [253.0, 231.0, 37.0],
    ];
    let x = if t.is_finite() { t.clamp(0.0, 1.0) } else { 0.0 } * (STOPS.len() - 1) as f64;
    let i = (x.floor() as usize).min(STOPS.len() - 2);
    let f = x - i as f64;
    let mix = |c: usize| (STOPS[i][c] * (1.0 - f) + STOPS[i + 1][c] * f).round() as u8;
    RGBColor(mix(0), mix(1), mix(2))
}

/// The smallest step from 1, 2, 5, 10, 20, 50, ... that keeps `count` ticks at least `min_pixels` apart when
/// one unit is `pixels_per_unit` wide.
pub fn tick_step(pixels_per_unit: f64, min_pixels: f64) -> usize {
    if pixels_per_unit.is_nan() || pixels_per_unit <= 0.0 {
        return 1;
    }
    let mut magnitude = 1;
    loop {
        for step in [1, 2, 5].map(|m| m * magnitude) {
            if step as f64 * pixels_per_unit >= min_pixels {
                return step;
            }
        }
        magnitude *= 10;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_steps_run_one_two_five() {
        assert_eq!(tick_step(30.0, 14.0), 1);
        assert_eq!(tick_step(10.0, 14.0), 2);
        assert_eq!(tick_step(5.0, 14.0), 5);
        assert_eq!(tick_step(1.0, 14.0), 20);
    }

    #[test]
    fn viridis_ends_are_matplotlibs() {
        assert_eq!(viridis(0.0), RGBColor(68, 1, 84));
        assert_eq!(viridis(1.0), RGBColor(253, 231, 37));
        assert_eq!(viridis(f64::NAN), RGBColor(68, 1, 84));
    }
}
