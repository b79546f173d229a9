//! The HTML page of a report: tables of numbers, inline SVG figures, provenance.

use std::fmt::Write;

use super::analysis::{Analysis, Spread, SCORES};
use super::Figures;

/// A number as the tables show it (`–` when undefined).
pub(crate) fn num(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.4}")
    } else if v.is_nan() {
        "–".into()
    } else {
        format!("{v}")
    }
}

fn ci(c: [f64; 2]) -> String {
    format!("[{}, {}]", num(c[0]), num(c[1]))
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn spread(s: &Spread) -> String {
    format!(
        "{} ± {} [{}, {}]",
        num(s.mean),
        num(s.std),
        num(s.min),
        num(s.max)
    )
}

/// The whole page.
pub(crate) fn page(a: &Analysis, figs: &Figures) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>brittle margin-consistency report</title>\n<style>\
body{{font-family:DejaVu Sans,Helvetica,Arial,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}}\
table{{border-collapse:collapse;margin:0.5em 0 1.5em}}th,td{{border:1px solid #ccc;padding:4px 10px;text-align:right}}\
th{{background:#f2f2f2}}td:first-child,th:first-child{{text-align:left}}figure{{display:inline-block;margin:0.5em}}\
figcaption{{text-align:center;color:#555}}code{{background:#f6f6f6;padding:1px 4px}}.note{{color:#555;font-size:0.92em}}\
</style></head><body>\n<h1>Margin consistency report</h1>\n"
    );
    let _ = write!(
        h,
        "<table><tr><th>samples analysed (n)</th><td>{}</td></tr><tr><th>failed attacks (excluded)</th><td>{}</td></tr>\
<tr><th>rows</th><td>{}</td></tr><tr><th>clean accuracy</th><td>{}</td></tr><tr><th>norm</th><td>{}</td></tr>\
<tr><th>Kendall τ (input vs logit margin)</th><td>{} {}</td></tr><tr><th>Pearson r</th><td>{} {}</td></tr>\
<tr><th>Spearman ρ</th><td>{} {}</td></tr></table>\n<p class=\"note\">Intervals: 95% percentile bootstrap, {} resamples, seed {}.</p>\n",
        a.n, a.n_failed, a.n_rows, num(a.accuracy), a.norm, num(a.logit_margin.kendall_tau), ci(a.logit_margin.kendall_tau_ci),
        num(a.logit_margin.pearson), ci(a.logit_margin.pearson_ci), num(a.logit_margin.spearman), ci(a.logit_margin.spearman_ci), a.bootstrap, a.seed
    );
    for (_, title, svg) in figs.iter().take(1) {
        figure(&mut h, title, svg);
    }
    h.push_str("<h2>Consistency per score</h2>\n<p class=\"note\">Each score is oriented so that larger = more robust (entropy and energy negated).</p>\n<table><tr><th>score</th><th>Kendall τ</th><th>95% CI</th><th>Pearson</th><th>Spearman</th></tr>\n");
    for s in SCORES {
        if let Some(c) = a.scores.get(s.name) {
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&c.oriented),
                num(c.correlations.kendall_tau),
                ci(c.correlations.kendall_tau_ci),
                num(c.correlations.pearson),
                num(c.correlations.spearman)
            );
        }
    }
    h.push_str("</table>\n");
    h.push_str("<h2>Detecting non-robust samples (d_in ≤ ε) by the logit margin</h2>\n<p class=\"note\">Score: −logit margin. AUPR: trapezoidal area under the precision-recall curve (sklearn <code>auc(recall, precision)</code>); AP: sklearn <code>average_precision_score</code>. FPR@95TPR: smallest false-positive rate among thresholds reaching 95% true-positive rate; λ: flag when logit margin ≤ λ.</p>\n<table><tr><th>ε</th><th>non-robust</th><th>robust</th><th>AUROC</th><th>AUPR</th><th>AP</th><th>FPR@95TPR</th><th>λ</th><th>robust accuracy (attack)</th></tr>\n");
    for (d, r) in a.detection.iter().zip(&a.robust_accuracy) {
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&d.eps_label), d.positives, d.negatives, num(d.logit_margin.auroc), num(d.logit_margin.aupr), num(d.logit_margin.average_precision),
            num(d.logit_margin.fpr_at_95_tpr), num(d.threshold_at_95_tpr), num(r.value)
        );
    }
    h.push_str("</table>\n<h3>AUROC per score</h3>\n<table><tr><th>ε</th>");
    let present: Vec<&str> = SCORES
        .iter()
        .map(|s| s.name)
        .filter(|n| a.scores.contains_key(*n))
        .collect();
    for n in &present {
        let _ = write!(h, "<th>{}</th>", esc(n));
    }
    h.push_str("</tr>\n");
    for d in &a.detection {
        let _ = write!(h, "<tr><td>{}</td>", esc(&d.eps_label));
        for n in &present {
            let _ = write!(
                h,
                "<td>{}</td>",
                d.scores.get(*n).map_or("–".into(), |s| num(s.auroc))
            );
        }
        h.push_str("</tr>\n");
    }
    h.push_str("</table>\n");
    for (_, title, svg) in figs.iter().skip(1) {
        figure(&mut h, title, svg);
    }
    if let Some(est) = &a.robust_accuracy_estimate {
        let _ = write!(h, "<h2>Sample-efficient robust accuracy</h2>\n<p class=\"note\">Attack a random subset of {} samples ({} repeats), calibrate λ on it so that as many subset samples have logit margin ≤ λ as the attack found non-robust (quantile matching), then call every sample robust when it is correctly classified and its logit margin &gt; λ. Values: mean ± std [min, max] over repeats. “balanced” calibrates λ by maximising balanced accuracy instead.</p>\n<table><tr><th>ε</th><th>attack-based (all)</th><th>estimate (quantile λ)</th><th>λ</th><th>estimate (balanced λ)</th><th>subset attack-based</th></tr>\n",
            est.first().map_or(0, |e| e.subset), est.first().map_or(0, |e| e.repeats));
        for e in est {
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&e.eps_label),
                num(e.attack_based),
                spread(&e.estimate),
                spread(&e.lambda),
                spread(&e.estimate_balanced),
                spread(&e.subset_attack_based)
            );
        }
        h.push_str("</table>\n");
    }
    if let Some(b) = &a.brackets {
        let r = &b.ratio;
        let _ = write!(
            h,
            "<h2>Margin brackets</h2>\n<p class=\"note\">Per sample, the true input margin lies between the certified radius (lower bound) and the attack's margin (upper bound). Ratio = upper / lower over the {} samples with a positive radius ({} certified at no ε); violations = samples whose lower bound exceeds the upper one (must be 0).</p>\n\
<table><tr><th>samples with both bounds</th><td>{}</td></tr><tr><th>violations</th><td>{}</td></tr>\
<tr><th>bracket ratio median [q25, q75]</th><td>{} [{}, {}]</td></tr><tr><th>bracket ratio q10, q90</th><td>{}, {}</td></tr>\
<tr><th>Kendall τ with the logit margin: lower / upper bound</th><td>{} / {}</td></tr></table>\n\
<table><tr><th>ε</th><th>certified accuracy</th><th>AUROC (lower bound ≤ ε)</th><th>AUROC (upper bound ≤ ε)</th></tr>\n",
            b.n - b.n_uncertified, b.n_uncertified, b.n, b.violations, num(r.median), num(r.q25), num(r.q75),
            num(r.q10), num(r.q90), num(b.kendall_tau_lower), num(b.kendall_tau_upper)
        );
        for (c, d) in b.certified_accuracy.iter().zip(&b.detection) {
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&c.eps_label),
                num(c.value),
                num(d.auroc_lower),
                num(d.auroc_upper)
            );
        }
        h.push_str("</table>\n");
    }
    let p = &a.provenance;
    let _ = write!(
        h,
        "<h2>Provenance</h2>\n<table><tr><th>command</th><td><code>{}</code></td></tr><tr><th>brittle</th><td>{}</td></tr>\
<tr><th>libtorch</th><td>{}</td></tr><tr><th>seed</th><td>{}</td></tr><tr><th>created (Unix time)</th><td>{}</td></tr></table>\n</body></html>\n",
        esc(&p.command.join(" ")), esc(&p.brittle_version), esc(&p.libtorch_version),
        p.seed.map_or("–".into(), |s| s.to_string()), p.created_unix
    );
    h
}

fn figure(h: &mut String, title: &str, svg: &str) {
    // Inline SVG: drop any XML prolog, keep the <svg> element.
    let body = svg.find("<svg").map_or(svg, |i| &svg[i..]);
    let _ = writeln!(
        h,
        "<figure>{body}<figcaption>{}</figcaption></figure>",
        esc(title)
    );
}
