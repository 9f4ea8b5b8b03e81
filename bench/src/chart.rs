//! A latency-by-percentile chart as a self-contained SVG (no plotting
//! dependency): x is the percentile on a log scale of 1/(1-q) (50 %, 90 %,
//! 99 %, 99.9 %, 99.99 %), y is latency in microseconds on a log scale,
//! one line per series. Series come from an hdrhistogram ([`svg`]) or as
//! (quantile, microseconds) points ([`svg_points`], e.g. fio's percentiles);
//! [`stack`] puts several charts in one file.

use hdrhistogram::Histogram;

const W: f64 = 980.0;
const H: f64 = 520.0;
const L: f64 = 80.0;
const R: f64 = 250.0;
const T: f64 = 50.0;
const B: f64 = 60.0;
const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// One line of a chart: a name and (quantile in [0, 1), microseconds)
/// points in increasing quantile order.
pub type Curve = (String, Vec<(f64, f64)>);

/// Render `series` (name, histogram of microseconds).
pub fn svg(title: &str, series: &[(String, &Histogram<u64>)]) -> String {
    // Percentiles from 0 to 99.99 % as x = log10(1/(1-q)) in [0, 4].
    let qs: Vec<f64> = (0..=80)
        .map(|i| 1.0 - 10f64.powf(-(i as f64) / 20.0))
        .collect();
    let curves: Vec<Curve> = series
        .iter()
        .map(|(name, h)| {
            let pts = qs.iter().map(|&q| (q, h.value_at_quantile(q) as f64));
            (name.clone(), pts.collect())
        })
        .collect();
    svg_points(title, "round trip (block sent to ack received)", &curves)
}

/// Render curves of (quantile, microseconds) points; `y_label` names what
/// was timed.
pub fn svg_points(title: &str, y_label: &str, series: &[Curve]) -> String {
    let mut ymin = f64::MAX;
    let mut ymax = 1.0f64;
    for (_, pts) in series {
        for &(_, us) in pts {
            ymin = ymin.min(us.max(1.0));
            ymax = ymax.max(us.max(1.0));
        }
    }
    if ymin > ymax {
        ymin = 1.0;
    }
    let lo = ymin.log10().floor();
    let hi = (ymax.log10().ceil()).max(lo + 1.0);
    let px = |x: f64| L + x / 4.0 * (W - L - R);
    let py = |us: f64| T + (hi - us.max(1.0).log10()) / (hi - lo) * (H - T - B);
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="25" text-anchor="middle" font-size="15">{}</text>
"#,
        W / 2.0,
        esc(title)
    );
    // Grid: decades of latency, and the percentile marks.
    let mut d = lo;
    while d <= hi {
        let y = py(10f64.powf(d));
        s += &format!(
            r#"<line x1="{L}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="rgb(221,221,221)"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>
"#,
            W - R,
            L - 6.0,
            y + 4.0,
            fmt_us(10f64.powf(d))
        );
        d += 1.0;
    }
    for (x, label) in [
        (0.0, "0%"),
        (0.301, "50%"),
        (1.0, "90%"),
        (2.0, "99%"),
        (3.0, "99.9%"),
        (4.0, "99.99%"),
    ] {
        let xx = px(x);
        s += &format!(
            r#"<line x1="{xx:.1}" x2="{xx:.1}" y1="{T}" y2="{}" stroke="rgb(221,221,221)"/><text x="{xx:.1}" y="{}" text-anchor="middle">{label}</text>
"#,
            H - B,
            H - B + 18.0
        );
    }
    s += &format!(
        r#"<text x="{}" y="{}" text-anchor="middle">percentile</text>
<text x="18" y="{}" transform="rotate(-90 18 {})" text-anchor="middle">{}</text>
<rect x="{L}" y="{T}" width="{}" height="{}" fill="none" stroke="rgb(68,68,68)"/>
"#,
        (L + W - R) / 2.0,
        H - 15.0,
        H / 2.0,
        H / 2.0,
        esc(y_label),
        W - L - R,
        H - T - B
    );
    for (i, (name, curve)) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let pts: Vec<String> = curve
            .iter()
            .map(|&(q, v)| {
                let x = (1.0 / (1.0 - q.min(0.9999))).log10().min(4.0);
                format!("{:.1},{:.1}", px(x), py(v))
            })
            .collect();
        s += &format!(
            r#"<polyline fill="none" stroke="{c}" stroke-width="2" points="{}"/>
<line x1="{}" x2="{}" y1="{}" y2="{}" stroke="{c}" stroke-width="3"/><text x="{}" y="{}">{} (p99 {})</text>
"#,
            pts.join(" "),
            W - R + 10.0,
            W - R + 30.0,
            T + 10.0 + i as f64 * 20.0,
            T + 10.0 + i as f64 * 20.0,
            W - R + 35.0,
            T + 14.0 + i as f64 * 20.0,
            esc(name),
            fmt_us(at_quantile(curve, 0.99))
        );
    }
    s += "</svg>\n";
    s
}

/// The curve's value at quantile `q` (the first point at or above it).
fn at_quantile(curve: &[(f64, f64)], q: f64) -> f64 {
    curve
        .iter()
        .find(|&&(x, _)| x >= q - 1e-9)
        .or(curve.last())
        .map_or(0.0, |&(_, v)| v)
}

/// Several charts from [`svg_points`]/[`svg`] stacked vertically in one SVG.
pub fn stack(charts: &[String]) -> String {
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{}">
"#,
        H * charts.len() as f64
    );
    for (i, c) in charts.iter().enumerate() {
        let inner = c.replacen(
            r#"<svg xmlns="http://www.w3.org/2000/svg""#,
            &format!(r#"<svg x="0" y="{}""#, H * i as f64),
            1,
        );
        s += &inner;
    }
    s += "</svg>\n";
    s
}

fn fmt_us(us: f64) -> String {
    if us >= 1_000_000.0 {
        format!("{:.0} s", us / 1e6)
    } else if us >= 1000.0 {
        format!("{:.0} ms", us / 1e3)
    } else {
        format!("{us:.0} us")
    }
}
