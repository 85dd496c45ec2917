//! What `lethe tinymem compare` writes from its runs: the Markdown tables (the best run per
//! method by the paper's selection rule, then every run) and one SVG plot per experiment
//! (memorized % after against the accuracy or perplexity change, marker area ∝ seconds).
//!
//! Invariants: pure functions of the runs (no I/O); a failed run is listed with its error and
//! never plotted; values that are not finite are written as "—".

use std::fmt::Write;

use super::compare::Run;

fn pct(x: Option<f64>) -> String {
    match x {
        Some(v) if v.is_finite() => format!("{:+.2} %", v * 100.0),
        _ => "—".into(),
    }
}

/// The quality change a run is judged on: relative accuracy (math) or perplexity (language).
fn quality_change(r: &Run) -> Option<f64> {
    r.relative_accuracy_change
        .or(Some(r.perplexity_after / r.perplexity_before - 1.0))
}

fn quality_label(runs: &[&Run]) -> &'static str {
    if runs.iter().any(|r| r.relative_accuracy_change.is_some()) {
        "relative accuracy change"
    } else {
        "held-out perplexity change"
    }
}

fn row(r: &Run) -> String {
    match &r.error {
        Some(e) => format!(
            "| {} | {} | failed: {} | | | |\n",
            r.method,
            r.settings,
            e.replace('|', "/")
        ),
        None => format!(
            "| {} | {} | {} → {} of {} ({:.1} %) | {} | {} | {:.1} |\n",
            r.method,
            r.settings,
            r.memorized_before,
            r.memorized_after,
            r.forget_sequences,
            100.0 * r.memorized_after as f64 / r.forget_sequences.max(1) as f64,
            pct(quality_change(r)),
            r.weights_zeroed,
            r.seconds
        ),
    }
}

/// The tables of every experiment in `runs` (in the order they first appear).
pub fn markdown(runs: &[Run]) -> String {
    let mut out = String::new();
    let mut experiments: Vec<&str> = Vec::new();
    for r in runs {
        if !experiments.contains(&r.experiment) {
            experiments.push(r.experiment);
        }
    }
    for exp in experiments {
        let of: Vec<&Run> = runs.iter().filter(|r| r.experiment == exp).collect();
        let header = format!(
            "| method | settings | memorized (forget set) | {} | weights zeroed | seconds |\n|---|---|---|---|---|---|\n",
            quality_label(&of)
        );
        let _ = writeln!(
            out,
            "## {exp}\n\nBest run per method (spec §6.20's selection rule), best first:\n"
        );
        out.push_str(&header);
        let mut best: Vec<&Run> = Vec::new();
        for r in &of {
            match best.iter_mut().find(|b| b.method == r.method) {
                Some(b) if r.score() < b.score() => *b = r,
                Some(_) => {}
                None => best.push(r),
            }
        }
        best.sort_by(|a, b| a.score().total_cmp(&b.score()));
        for r in best {
            out.push_str(&row(r));
        }
        let _ = writeln!(out, "\nEvery run:\n");
        out.push_str(&header);
        for r in &of {
            out.push_str(&row(r));
        }
        out.push('\n');
    }
    out
}

const COLORS: [&str; 10] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

/// An SVG scatter of `runs` (one experiment): x = memorized % of the forget set after, y = the
/// quality change in %, marker area proportional to seconds, one colour per method.
pub fn plot(title: &str, runs: &[&Run]) -> String {
    let ok: Vec<&&Run> = runs
        .iter()
        .filter(|r| r.error.is_none() && quality_change(r).is_some_and(f64::is_finite))
        .collect();
    let (w, h, left, right, top, bottom) = (720.0, 460.0, 70.0, 190.0, 40.0, 50.0);
    let ys: Vec<f64> = ok
        .iter()
        .map(|r| 100.0 * quality_change(r).unwrap_or(0.0))
        .collect();
    let (mut lo, mut hi) = ys
        .iter()
        .fold((0f64, 0f64), |(a, b), &y| (a.min(y), b.max(y)));
    if hi - lo < 1.0 {
        hi += 0.5;
        lo -= 0.5;
    }
    let x_of = |m: f64| left + (w - left - right) * m / 100.0;
    let y_of = |v: f64| top + (h - top - bottom) * (hi - v) / (hi - lo);
    let mut methods: Vec<&str> = Vec::new();
    for r in &ok {
        if !methods.contains(&r.method) {
            methods.push(r.method);
        }
    }
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{left}" y="22" font-size="15">{title}: memorized after vs. {} (marker area ∝ seconds)</text>"#,
        quality_label(runs)
    );
    // Axes, the zero line and ticks.
    let (x0, x1, y0, y1) = (left, w - right, top, h - bottom);
    let _ = writeln!(
        s,
        r#"<path d="M{x0} {y0} V{y1} H{x1}" stroke="black" fill="none"/>"#
    );
    let zero = y_of(0.0);
    let _ = writeln!(
        s,
        r##"<line x1="{x0}" y1="{zero}" x2="{x1}" y2="{zero}" stroke="#aaa" stroke-dasharray="4 3"/>"##
    );
    for m in [0.0, 25.0, 50.0, 75.0, 100.0] {
        let x = x_of(m);
        let _ = writeln!(
            s,
            r#"<text x="{x}" y="{}" text-anchor="middle">{m}</text>"#,
            y1 + 16.0
        );
    }
    for k in 0..=4 {
        let v = lo + (hi - lo) * f64::from(k) / 4.0;
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">{v:+.1}</text>"#,
            x0 - 6.0,
            y_of(v) + 4.0
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">memorized after (% of the forget set)</text>"#,
        (x0 + x1) / 2.0,
        h - 12.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(16 {}) rotate(-90)" text-anchor="middle">{} (%)</text>"#,
        (y0 + y1) / 2.0,
        quality_label(runs)
    );
    for (r, y) in ok.iter().zip(&ys) {
        let c = COLORS[methods.iter().position(|m| *m == r.method).unwrap_or(0) % COLORS.len()];
        let x = x_of(100.0 * r.memorized_after as f64 / r.forget_sequences.max(1) as f64);
        let radius = 3.0 + 1.5 * r.seconds.max(0.0).sqrt();
        let _ = writeln!(
            s,
            r#"<circle cx="{x:.1}" cy="{:.1}" r="{radius:.1}" fill="{c}" fill-opacity="0.55" stroke="{c}"><title>{} ({}): {:.1} s</title></circle>"#,
            y_of(*y),
            r.method,
            r.settings,
            r.seconds
        );
    }
    for (i, m) in methods.iter().enumerate() {
        let y = top + 18.0 * i as f64 + 10.0;
        let c = COLORS[i % COLORS.len()];
        let _ = writeln!(
            s,
            r#"<circle cx="{}" cy="{y}" r="5" fill="{c}"/><text x="{}" y="{}">{m}</text>"#,
            x1 + 20.0,
            x1 + 30.0,
            y + 4.0
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(method: &'static str, after: usize, acc: f64, seconds: f64) -> Run {
        Run {
            experiment: "noise",
            method,
            settings: format!("s{after}"),
            memorized_before: 10,
            memorized_after: after,
            forget_sequences: 10,
            relative_accuracy_change: Some(acc),
            perplexity_before: 1.0,
            perplexity_after: 1.1,
            weights_zeroed: 5,
            seconds,
            error: None,
        }
    }

    #[test]
    fn the_best_run_per_method_is_chosen_by_the_selection_rule_and_failures_are_listed() {
        let mut runs = vec![
            run("subnet", 5, -0.01, 1.0),
            run("subnet", 0, -0.2, 2.0),
            run("balanced-subnet", 0, -0.001, 30.0),
        ];
        let mut failed = run("durable", 10, 0.0, 0.1);
        failed.error = Some("rows of unequal length".into());
        runs.push(failed);
        let md = markdown(&runs);
        let best = md.split("Every run").next().unwrap();
        // subnet: 5 left at −1 % scores −0.5 + 0.01; all gone at −20 % scores −1 + 0.2.
        assert!(best.contains("| subnet | s0 |"), "{best}");
        assert!(!best.contains("| subnet | s5 |"));
        assert!(best.find("balanced-subnet").unwrap() < best.find("| subnet").unwrap());
        assert!(md.contains("failed: rows of unequal length"));
        let refs: Vec<&Run> = runs.iter().collect();
        let svg = plot("noise", &refs);
        assert_eq!(
            svg.matches("<circle cx=").count(),
            3 + 2,
            "3 runs and 2 legend dots"
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    }
}
