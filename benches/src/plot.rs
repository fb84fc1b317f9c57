//! Latency plots as SVG: for one scenario and placement, each path's latency against the
//! percentile, percentiles spread as 1/(1-p) on a log scale (HdrHistogram's usual view),
//! so the tail gets as much room as the median.
use std::fmt::Write as _;

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 420.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 150.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
const COLOURS: [&str; 4] = ["#444444", "#d62728", "#1f77b4", "#2ca02c"];

/// One line: a name and its (percentile key as oha writes it, milliseconds) points.
pub struct Series<'a> {
    pub name: &'a str,
    pub points: Vec<(&'a str, f64)>,
}

/// Where a percentile key (`p99.9`) sits on the x axis: log10(1 / (1 - p)).
fn x_of(key: &str) -> Option<f64> {
    let p: f64 = key.strip_prefix('p')?.parse().ok()?;
    (p > 0.0 && p < 100.0).then(|| (1.0 / (1.0 - p / 100.0)).log10())
}

pub fn latency_svg(title: &str, series: &[Series<'_>]) -> String {
    let mut pts: Vec<Vec<(f64, f64)>> = series
        .iter()
        .map(|s| {
            s.points
                .iter()
                .filter_map(|(k, ms)| Some((x_of(k)?, *ms)))
                .collect()
        })
        .collect();
    for p in &mut pts {
        p.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    let x_max = pts.iter().flatten().map(|p| p.0).fold(1.0, f64::max);
    let y_max = nice_ceiling(pts.iter().flatten().map(|p| p.1).fold(0.0, f64::max));
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let sx = |x: f64| LEFT + x / x_max * plot_w;
    let sy = |y: f64| TOP + plot_h - y / y_max * plot_h;

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        svg,
        r#"<rect width="100%" height="100%" fill="white"/><text x="{LEFT}" y="22" font-size="14">{}</text>"#,
        escape(title)
    );
    // Axes, y gridlines every fifth of the range, x ticks at the usual percentiles.
    for i in 0..=5 {
        let v = y_max * f64::from(i) / 5.0;
        let y = sy(v);
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" x2="{:.1}" y1="{y:.1}" y2="{y:.1}" stroke="#e0e0e0"/><text x="{:.1}" y="{:.1}" text-anchor="end">{v:.2}</text>"##,
            LEFT + plot_w,
            LEFT - 6.0,
            y + 4.0
        );
    }
    for key in ["p50", "p90", "p99", "p99.9", "p99.99"] {
        let Some(x) = x_of(key).filter(|x| *x <= x_max + 1e-9) else {
            continue;
        };
        let _ = writeln!(
            svg,
            r##"<line x1="{0:.1}" x2="{0:.1}" y1="{TOP}" y2="{1:.1}" stroke="#e0e0e0"/><text x="{0:.1}" y="{2:.1}" text-anchor="middle">{3}</text>"##,
            sx(x),
            TOP + plot_h,
            TOP + plot_h + 18.0,
            &key[1..]
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">percentile</text><text transform="translate(18 {:.1}) rotate(-90)" text-anchor="middle">latency (ms)</text>"#,
        LEFT + plot_w / 2.0,
        HEIGHT - 8.0,
        TOP + plot_h / 2.0
    );
    for (i, (s, p)) in series.iter().zip(&pts).enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let line: Vec<String> = p
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y)))
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
            line.join(" ")
        );
        let ly = TOP + 10.0 + 20.0 * i as f64;
        let lx = WIDTH - RIGHT + 15.0;
        let _ = writeln!(
            svg,
            r#"<line x1="{lx}" x2="{:.1}" y1="{ly}" y2="{ly}" stroke="{colour}" stroke-width="2"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 20.0,
            lx + 26.0,
            ly + 4.0,
            escape(s.name)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// The smallest 1, 2 or 5 times a power of ten at or above `v`, so gridlines land on
/// round numbers.
fn nice_ceiling(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let base = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * base)
        .find(|c| *c >= v)
        .unwrap_or(10.0 * base)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_percentiles_on_a_log_scale() {
        assert!((x_of("p50").unwrap_or(0.0) - std::f64::consts::LOG10_2).abs() < 1e-9);
        assert!((x_of("p99").unwrap_or(0.0) - 2.0).abs() < 1e-9);
        assert!((x_of("p99.9").unwrap_or(0.0) - 3.0).abs() < 1e-6);
        assert_eq!(x_of("p100"), None);
        assert_eq!(nice_ceiling(0.73), 1.0);
        assert_eq!(nice_ceiling(1.3), 2.0);
        assert_eq!(nice_ceiling(37.0), 50.0);
    }

    #[test]
    fn draws_one_line_per_path() {
        let svg = latency_svg(
            "http1 <same-node>",
            &[
                Series {
                    name: "direct",
                    points: vec![("p50", 0.2), ("p99", 0.5), ("p99.9", 0.9)],
                },
                Series {
                    name: "sidelane",
                    points: vec![("p50", 0.3), ("p99", 0.7)],
                },
            ],
        );
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("http1 &lt;same-node&gt;"));
        assert!(svg.contains(">sidelane</text>"));
        assert!(svg.trim_end().ends_with("</svg>"));
    }
}
