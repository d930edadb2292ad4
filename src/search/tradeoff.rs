//! `tradeoff.png`: every candidate's held-out objective against its KL from the base, the Pareto front of
//! the finalists, the KL budget and the chosen point.

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::{Reached, SearchReport};
use crate::figure::{bold, drawing, font, Figure};
use crate::recipe::Method;

const INK: RGBColor = RGBColor(30, 30, 30);
const FINALIST: RGBColor = RGBColor(31, 119, 180);
const DROPPED: RGBColor = RGBColor(170, 170, 170);
const FRONT: RGBColor = RGBColor(44, 160, 44);
const BUDGET: RGBColor = RGBColor(214, 39, 40);
const CHOSEN: RGBColor = RGBColor(214, 39, 40);
const WIDTH: u32 = 900;
const HEIGHT: u32 = 620;

/// One plotted candidate.
struct Dot {
    kl: f64,
    objective: f64,
    label: String,
    finalist: bool,
    method: Method,
}

/// A finalist's colour: its method's, so a search of several methods tells them apart.
fn method_colour(method: Method) -> RGBColor {
    match method {
        Method::Iti => FINALIST,
        Method::NlIti => RGBColor(255, 127, 14),
        Method::Residual => RGBColor(148, 103, 189),
    }
}

pub struct Tradeoff<'a> {
    pub report: &'a SearchReport,
}

impl Tradeoff<'_> {
    /// Finalists at their full numbers; candidates dropped in a rung at their estimates (the screen's KL, the
    /// MC of the questions they reached). Candidates dropped at the screen have no MC number to plot.
    fn dots(&self) -> Vec<Dot> {
        let objective = self.report.objective;
        let several = self.report.methods.len() > 1;
        self.report
            .candidates
            .iter()
            .filter_map(|c| {
                let label = match (c.point().is_base(), several) {
                    (true, _) => "base (α = 0)".to_string(),
                    (false, false) => format!("K={} α={}", c.heads, c.alpha),
                    (false, true) => format!("{} K={} α={}", c.method, c.heads, c.alpha),
                };
                let y = c.objective(objective)?;
                let method = c.method;
                match c.reached {
                    Reached::Final => Some(Dot { kl: c.kl?, objective: y, label, finalist: true, method }),
                    Reached::Rung { .. } => {
                        Some(Dot { kl: c.screen_kl()?, objective: y, label, finalist: false, method })
                    }
                    Reached::KlScreen | Reached::KlImplied => None,
                }
            })
            .collect()
    }
}

/// The finalists no other finalist beats on both axes (KL at most, objective at least), by increasing KL.
fn pareto_front(dots: &[Dot]) -> Vec<(f64, f64)> {
    let mut finalists: Vec<(f64, f64)> = dots.iter().filter(|d| d.finalist).map(|d| (d.kl, d.objective)).collect();
    finalists.sort_by(|a, b| a.0.total_cmp(&b.0).then(b.1.total_cmp(&a.1)));
    let mut front: Vec<(f64, f64)> = Vec::new();
    for p in finalists {
        if front.last().is_none_or(|last| p.1 > last.1) {
            front.push(p);
        }
    }
    front
}

impl Figure for Tradeoff<'_> {
    fn size(&self) -> (u32, u32) {
        (WIDTH, HEIGHT)
    }

    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> Result<(), String> {
        let r = self.report;
        let dots = self.dots();
        let chosen = r.chosen();
        let objective = r.objective.name().to_uppercase();
        drawing(area.fill(&WHITE))?;
        let centre = Pos::new(HPos::Center, VPos::Center);
        let title = format!("bake search: held-out {objective} against KL from the base");
        drawing(area.draw(&Text::new(title, (WIDTH as i32 / 2, 20), bold(17).pos(centre).color(&INK))))?;
        let model = std::path::Path::new(&r.model).file_name().map_or(r.model.clone(), |n| n.to_string_lossy().into());
        let subtitle = format!(
            "{model} · {} questions · {}-fold cross-validation · KL budget {} · {} candidates",
            r.questions,
            r.folds,
            r.kl_budget,
            r.candidates.len()
        );
        drawing(area.draw(&Text::new(subtitle, (WIDTH as i32 / 2, 44), font(13).pos(centre).color(&INK))))?;

        let max_kl = dots.iter().map(|d| d.kl).fold(r.kl_budget, f64::max) * 1.08;
        let (lo, hi) = dots
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), d| (lo.min(d.objective), hi.max(d.objective)));
        let pad = ((hi - lo) * 0.12).max(0.005);
        let plot = area.margin(60, 10, 10, 20);
        let mut chart = drawing(
            ChartBuilder::on(&plot)
                .x_label_area_size(50)
                .y_label_area_size(70)
                .build_cartesian_2d(-max_kl * 0.03..max_kl, (lo - pad)..(hi + pad)),
        )?;
        drawing(
            chart
                .configure_mesh()
                .light_line_style(RGBColor(246, 246, 246))
                .bold_line_style(RGBColor(215, 215, 215))
                .axis_style(INK)
                .label_style(font(12).color(&INK))
                .axis_desc_style(font(14).color(&INK))
                .x_desc("KL(base ‖ edited), nats per token on the corpus (mean of the folds)")
                .y_desc(format!("held-out {objective} (mean of the folds)"))
                .x_label_formatter(&|v| format!("{v:.2}"))
                .y_label_formatter(&|v| format!("{v:.3}"))
                .draw(),
        )?;
        let (y0, y1) = (lo - pad, hi + pad);
        let dash = (0..24).map(|i| {
            let t = |k: f64| y0 + (y1 - y0) * k / 24.0;
            PathElement::new(vec![(r.kl_budget, t(i as f64)), (r.kl_budget, t(i as f64 + 0.5))], BUDGET.stroke_width(2))
        });
        drawing(chart.draw_series(dash))?;
        let budget_label = format!("KL budget {}", r.kl_budget);
        let at = Pos::new(HPos::Right, VPos::Top);
        drawing(chart.draw_series(std::iter::once(Text::new(
            budget_label,
            (r.kl_budget - max_kl * 0.01, y1 - (y1 - y0) * 0.01),
            font(12).color(&BUDGET).pos(at),
        ))))?;

        let front = pareto_front(&dots);
        drawing(chart.draw_series(std::iter::once(PathElement::new(front.clone(), FRONT.stroke_width(2)))))?;
        let dropped = dots.iter().filter(|d| !d.finalist);
        drawing(chart.draw_series(dropped.map(|d| Circle::new((d.kl, d.objective), 4, DROPPED.stroke_width(1)))))?;
        for d in dots.iter().filter(|d| d.finalist) {
            let colour = method_colour(d.method);
            drawing(chart.draw_series(std::iter::once(Circle::new((d.kl, d.objective), 5, colour.filled()))))?;
            let at = Pos::new(HPos::Left, VPos::Bottom);
            let label = Text::new(d.label.clone(), (7, -3), font(12).color(&INK).pos(at));
            drawing(chart.draw_series(std::iter::once(EmptyElement::at((d.kl, d.objective)) + label)))?;
        }
        if let (Some(kl), Some(y)) = (chosen.kl, chosen.objective(r.objective)) {
            drawing(chart.draw_series(std::iter::once(Circle::new((kl, y), 10, CHOSEN.stroke_width(3)))))?;
        }
        draw_legend(area, &r.methods)
    }
}

/// Draws a legend row's mark centred at a pixel.
type LegendMark<'a> = dyn Fn(i32, i32) -> Result<(), String> + 'a;

fn draw_legend<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, methods: &[Method]) -> Result<(), String> {
    let text = font(12).color(&INK).pos(Pos::new(HPos::Left, VPos::Center));
    let finalist = |colour: RGBColor| -> Box<LegendMark> {
        Box::new(move |x, y| drawing(area.draw(&Circle::new((x, y), 5, colour.filled()))))
    };
    let mut rows: Vec<(String, Box<LegendMark>)> = match methods {
        [_] => vec![("finalist: every held-out question, whole corpus".into(), finalist(FINALIST))],
        _ => methods.iter().map(|&m| (format!("finalist, method {m}"), finalist(method_colour(m)))).collect(),
    };
    rows.extend([
        (
            "dropped early: estimate on fewer questions".to_string(),
            Box::new(|x, y| drawing(area.draw(&Circle::new((x, y), 4, DROPPED.stroke_width(1))))) as Box<LegendMark>,
        ),
        (
            "Pareto front of the finalists".into(),
            Box::new(|x, y| drawing(area.draw(&PathElement::new(vec![(x - 8, y), (x + 8, y)], FRONT.stroke_width(2))))),
        ),
        (
            "KL budget".into(),
            Box::new(|x, y| {
                drawing(area.draw(&PathElement::new(vec![(x, y - 7), (x, y + 7)], BUDGET.stroke_width(2))))
            }),
        ),
        ("chosen".into(), Box::new(|x, y| drawing(area.draw(&Circle::new((x, y), 8, CHOSEN.stroke_width(3)))))),
    ]);
    let height = rows.len() as i32 * 22;
    let (x, mut y) = (WIDTH as i32 - 300, HEIGHT as i32 - 60 - height);
    drawing(area.draw(&Rectangle::new([(x - 16, y - 14), (x + 290, y + height - 8)], WHITE.filled())))?;
    drawing(area.draw(&Rectangle::new(
        [(x - 16, y - 14), (x + 290, y + height - 8)],
        RGBColor(200, 200, 200).stroke_width(1),
    )))?;
    for (label, mark) in rows {
        mark(x, y)?;
        drawing(area.draw(&Text::new(label, (x + 16, y), text.clone())))?;
        y += 22;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dot(kl: f64, objective: f64, finalist: bool) -> Dot {
        Dot { kl, objective, label: String::new(), finalist, method: Method::Iti }
    }

    #[test]
    fn the_front_keeps_only_points_nothing_beats_on_both_axes() {
        let dots = [
            dot(0.0, 0.40, true),
            dot(0.05, 0.45, true),
            dot(0.06, 0.44, true),
            dot(0.2, 0.50, true),
            dot(0.01, 0.9, false),
        ];
        assert_eq!(pareto_front(&dots), vec![(0.0, 0.40), (0.05, 0.45), (0.2, 0.50)]);
    }
}
