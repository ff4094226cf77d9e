//! The spend chart: a bar per day as inline SVG, drawn on the server (a few dozen lines by hand
//! are smaller than a plotting crate). It scales with its container through `viewBox`; colours
//! come from the stylesheet; each bar has a `<title>` for its tooltip.

use super::layout::thousands;
use crate::domain::usage::DaySpend;
use maud::{html, Markup};
use time::macros::format_description;

const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 250.0;
const LEFT: f64 = 60.0;
const RIGHT: f64 = 8.0;
const TOP: f64 = 12.0;
const BOTTOM: f64 = 46.0;

/// The smallest of 1, 2, 5 × 10ⁿ that is at least `x`.
fn nice_step(x: f64) -> f64 {
    if x <= 1.0 {
        return 1.0;
    }
    let magnitude = 10f64.powf(x.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|step| *step >= x)
        .unwrap_or(10.0 * magnitude)
}

/// The scale's top and the step between grid lines: about four lines, round numbers.
fn scale(max: u64) -> (f64, f64) {
    let step = nice_step(max as f64 / 4.0);
    let top = (max as f64 / step).ceil().max(1.0) * step;
    (top, step)
}

/// "Nov 3"
pub fn day_label(day: time::Date) -> String {
    day.format(format_description!("[month repr:short] [day padding:none]"))
        .unwrap_or_default()
}

/// Bars of credits spent per day, oldest on the left, today highlighted.
pub fn spend_chart(days: &[DaySpend]) -> Markup {
    let max = days.iter().map(|d| d.credits).max().unwrap_or(0);
    let total: u64 = days.iter().map(|d| d.credits).sum();
    let (top, step) = scale(max);
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let slot = plot_w / days.len().max(1) as f64;
    let bar_w = (slot * 0.68).max(1.0);
    let y_of = |v: f64| TOP + plot_h - v / top * plot_h;
    let ticks: Vec<f64> = (0..)
        .map(|i| f64::from(i) * step)
        .take_while(|t| *t <= top + 0.5)
        .collect();
    let last = days.len().saturating_sub(1);
    let label = format!(
        "Credits spent per day, last {} days: {} in total, at most {} on one day.",
        days.len(),
        thousands(total),
        thousands(max)
    );
    html! {
        svg.chart viewBox={ "0 0 " (WIDTH) " " (HEIGHT) } role="img" aria-label=(label) preserveAspectRatio="xMidYMid meet" {
            @for t in &ticks {
                line.grid-line x1=(LEFT) x2=(WIDTH - RIGHT) y1=(format!("{:.1}", y_of(*t))) y2=(format!("{:.1}", y_of(*t))) {}
                text.axis.y-label x=(LEFT - 8.0) y=(format!("{:.1}", y_of(*t) + 4.0)) text-anchor="end" { (thousands(*t as u64)) }
            }
            @for (i, day) in days.iter().enumerate() {
                @let h = if day.credits == 0 { 0.0 } else { (day.credits as f64 / top * plot_h).max(2.0) };
                @let x = LEFT + i as f64 * slot + (slot - bar_w) / 2.0;
                @if h > 0.0 {
                    rect class=(if i == last { "bar today" } else { "bar" })
                        x=(format!("{x:.1}")) y=(format!("{:.1}", TOP + plot_h - h))
                        width=(format!("{bar_w:.1}")) height=(format!("{h:.1}")) rx="2" {
                        title { (day_label(day.day)) ": " (thousands(day.credits)) " credits" }
                    }
                }
                // A label a week, counted back from today so today always has one.
                @if i == last {
                    text.axis.x-label x=(format!("{:.1}", x + bar_w)) y=(HEIGHT - 10.0) text-anchor="end" { "Today" }
                } @else if i % 7 == last % 7 {
                    text.axis.x-label x=(format!("{:.1}", x + bar_w / 2.0)) y=(HEIGHT - 10.0) text-anchor="middle" {
                        (day_label(day.day))
                    }
                }
            }
            @if max == 0 {
                text.empty-note x=(LEFT + plot_w / 2.0) y=(TOP + plot_h / 2.0) text-anchor="middle" {
                    "No credits spent in this period yet."
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::date;

    #[test]
    fn scales_are_round() {
        assert_eq!(scale(0), (1.0, 1.0));
        assert_eq!(scale(3), (3.0, 1.0));
        assert_eq!(scale(9), (10.0, 5.0));
        assert_eq!(scale(37), (40.0, 10.0));
        assert_eq!(scale(1234), (1500.0, 500.0));
    }

    #[test]
    fn one_bar_per_day_with_spend() {
        let days: Vec<DaySpend> = (0..30)
            .map(|i| DaySpend {
                day: date!(2026 - 11 - 01) + time::Duration::days(i),
                credits: if i % 3 == 0 { i as u64 } else { 0 },
            })
            .collect();
        let svg = spend_chart(&days).into_string();
        // Days 3, 6, …, 27 spent something (day 0 spent 0).
        assert_eq!(svg.matches("<rect").count(), 9);
        assert!(svg.contains("Today"));
        assert!(svg.contains("Nov 28: 27 credits"));
        let empty = spend_chart(&[]).into_string();
        assert!(empty.contains("No credits spent"));
    }
}
