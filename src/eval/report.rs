//! Writing a suite's report: `report.json` (for scripts), `report.md` (for people), and plots
//! as SVG (grouped bars of restoration accuracy, example images with their labels) and PNG (the
//! perturbations, contrast-stretched). Every file is written atomically.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::suite::{AttackRow, SuiteReport};
use crate::data::ClassTable;
use crate::error::{Result, SfrError};
use crate::fetch::write_atomic;
use crate::perturbation::write_png;

/// Paths of what [`write()`] produced.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Written {
    /// `report.json`.
    pub json: PathBuf,
    /// `report.md`.
    pub markdown: PathBuf,
    /// `restoration.svg`.
    pub bars: PathBuf,
    /// `examples.svg` (when there are examples).
    pub examples: Option<PathBuf>,
    /// One PNG per perturbation shown.
    pub perturbations: Vec<PathBuf>,
}

/// Write the report of `r` into `dir`; `rows` (the same rows, with their tensors) give the
/// perturbation images, `classes` the class names of the examples.
pub fn write(
    r: &SuiteReport,
    rows: &[AttackRow],
    classes: Option<&ClassTable>,
    dir: &Path,
) -> Result<Written> {
    std::fs::create_dir_all(dir).map_err(|e| SfrError::io(dir, e))?;
    let json = dir.join("report.json");
    let text = serde_json::to_string_pretty(r)
        .map_err(|e| SfrError::param("report", format!("could not serialise: {e}")))?;
    write_atomic(&json, text.as_bytes())?;
    let bars = dir.join("restoration.svg");
    write_atomic(&bars, bars_svg(r).as_bytes())?;
    let examples = if r.examples.is_empty() {
        None
    } else {
        let p = dir.join("examples.svg");
        write_atomic(&p, examples_svg(r, classes)?.as_bytes())?;
        Some(p)
    };
    let mut perturbations = Vec::new();
    let pdir = dir.join("perturbations");
    for row in rows {
        if let Some(p) = row.perturbations.first() {
            let path = pdir.join(format!("{}.png", slug(&row.name)));
            write_png(p, &path)?;
            perturbations.push(path);
        }
    }
    let markdown = dir.join("report.md");
    write_atomic(
        &markdown,
        markdown_report(r, &perturbations, dir).as_bytes(),
    )?;
    Ok(Written {
        json,
        markdown,
        bars,
        examples,
        perturbations,
    })
}

/// A file-name-safe form of a row name.
pub fn slug(name: &str) -> String {
    let mut s = String::new();
    for c in name.chars() {
        match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' => s.push(c.to_ascii_lowercase()),
            '∞' => s.push_str("inf"),
            'ℓ' => {
                if !s.ends_with('_') && !s.is_empty() {
                    s.push('_');
                }
                s.push('l');
            }
            _ => {
                if !s.ends_with('_') && !s.is_empty() {
                    s.push('_');
                }
            }
        }
    }
    s.trim_end_matches('_').to_string()
}

fn pct(x: f64) -> String {
    format!("{x:.3}")
}

/// The restoration-accuracy table as Markdown (also printed by the CLI).
pub fn restoration_table(r: &SuiteReport) -> String {
    let mut s = String::new();
    let _ = write!(s, "| attack | kind | budget |");
    for c in &r.columns {
        let _ = write!(s, " {} |", c.name);
    }
    s.push('\n');
    let _ = write!(s, "| --- | --- | --- |");
    for _ in &r.columns {
        s.push_str(" ---: |");
    }
    s.push('\n');
    for row in &r.rows {
        let _ = write!(s, "| {} | {} | {} |", row.attack, row.category, row.budget);
        for c in &row.cells {
            let _ = write!(s, " {} |", pct(c.restoration_accuracy));
        }
        s.push('\n');
    }
    s
}

fn markdown_report(r: &SuiteReport, pngs: &[PathBuf], dir: &Path) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# sfr suite — {}\n", r.model);
    let _ = writeln!(
        s,
        "Evaluation data: {} ({} labelled images, {} skipped). Perturbed pixels {}; each image gets one perturbation of a row, chosen at random with seed {}. Defence: `{}`. Undefended clean top-1: **{}**.\n",
        r.data.join(" + "),
        r.n,
        r.skipped,
        if r.clip {
            "clipped to [0, 255]"
        } else {
            "not clipped"
        },
        r.seed,
        r.defense_file,
        pct(r.clean_top1)
    );
    let _ = writeln!(s, "Metrics:\n");
    if let Some(m) = r.metrics.as_object() {
        for (k, v) in m {
            let _ = writeln!(s, "- `{k}`: {}", v.as_str().unwrap_or(""));
        }
    }
    let _ = writeln!(s, "\nDefence columns:\n");
    for c in &r.columns {
        let _ = writeln!(s, "- `{}`: {}", c.name, c.description);
    }
    let _ = writeln!(s, "\n## Restoration accuracy\n");
    s.push_str(&restoration_table(r));
    let _ = writeln!(s, "\n![restoration accuracy](restoration.svg)\n");
    let _ = writeln!(s, "## Top-1 and fooling rate\n");
    let _ = write!(s, "| attack |");
    for c in &r.columns {
        let _ = write!(
            s,
            " {0} clean top-1 | {0} attacked top-1 | {0} fooling |",
            c.name
        );
    }
    s.push('\n');
    let _ = write!(s, "| --- |");
    for _ in &r.columns {
        s.push_str(" ---: | ---: | ---: |");
    }
    s.push('\n');
    for row in &r.rows {
        let _ = write!(s, "| {} |", row.attack);
        for c in &row.cells {
            let _ = write!(
                s,
                " {} | {} | {} |",
                pct(c.clean_top1),
                pct(c.attacked_top1),
                pct(c.fooling_rate)
            );
        }
        s.push('\n');
    }
    if !r.examples.is_empty() {
        let _ = writeln!(
            s,
            "\n## Examples\n\n![examples: clean, attacked, defended](examples.svg)\n"
        );
    }
    let _ = writeln!(s, "## Attacks\n");
    for (i, row) in r.rows.iter().enumerate() {
        let _ = write!(
            s,
            "- **{}** ({}, {}, n = {}): {}",
            row.attack,
            row.category,
            row.budget,
            row.n,
            row.provenance.join("; ")
        );
        if let Some(p) = pngs.get(i) {
            let rel = p.strip_prefix(dir).unwrap_or(p);
            let _ = write!(s, " — [image]({})", rel.display());
        }
        s.push('\n');
    }
    let _ = writeln!(s, "\n{:.0} s of evaluation on {}.", r.seconds, r.device);
    s
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const PALETTE: [&str; 8] = [
    "#9e9e9e", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
];

/// Horizontal grouped bars: one group per attack row, one bar per defence column.
pub fn bars_svg(r: &SuiteReport) -> String {
    let ncol = r.columns.len().max(1);
    let bar = 9.0;
    let group = bar * ncol as f64 + 10.0;
    let left = 330.0;
    let plot_w = 520.0;
    let top = 50.0;
    let height = top + group * r.rows.len() as f64 + 60.0;
    let width = left + plot_w + 40.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r#"<rect width="100%" height="100%" fill="white"/><text x="{}" y="20" font-size="15" font-weight="bold">Restoration accuracy — {} ({} images)</text>"#,
        left,
        esc(&r.model),
        r.n
    );
    // Legend.
    for (i, c) in r.columns.iter().enumerate() {
        let x = left + i as f64 * 95.0;
        let _ = writeln!(
            s,
            r#"<rect x="{x}" y="30" width="10" height="10" fill="{}"/><text x="{}" y="39">{}</text>"#,
            PALETTE[i % PALETTE.len()],
            x + 14.0,
            esc(&c.name)
        );
    }
    // Grid.
    let max = r
        .rows
        .iter()
        .flat_map(|row| row.cells.iter().map(|c| c.restoration_accuracy))
        .fold(1.0f64, f64::max);
    let scale = plot_w / max;
    for k in 0..=((max * 10.0).ceil() as usize) {
        let v = k as f64 / 10.0;
        if v > max + 1e-9 {
            break;
        }
        let x = left + v * scale;
        let _ = writeln!(
            s,
            r##"<line x1="{x}" y1="{top}" x2="{x}" y2="{}" stroke="#ddd"/><text x="{x}" y="{}" text-anchor="middle" fill="#555">{v:.1}</text>"##,
            height - 45.0,
            height - 30.0
        );
    }
    let _ = writeln!(
        s,
        r##"<text x="{}" y="{}" text-anchor="middle" fill="#333">(clean top-1 + attacked top-1) / (2 × undefended clean top-1)</text>"##,
        left + plot_w / 2.0,
        height - 10.0
    );
    for (ri, row) in r.rows.iter().enumerate() {
        let y0 = top + ri as f64 * group;
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" text-anchor="end">{} <tspan fill="#777">({})</tspan></text>"##,
            left - 8.0,
            y0 + group / 2.0,
            esc(&row.attack),
            row.category
        );
        for (ci, c) in row.cells.iter().enumerate() {
            let w = (c.restoration_accuracy * scale).max(0.0);
            let _ = writeln!(
                s,
                r#"<rect x="{left}" y="{}" width="{w:.1}" height="{}" fill="{}"><title>{}: {:.3}</title></rect>"#,
                y0 + ci as f64 * bar,
                bar - 1.0,
                PALETTE[ci % PALETTE.len()],
                esc(&c.defense),
                c.restoration_accuracy
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

fn png_base64(chw: &[f32], size: usize) -> Result<String> {
    let mut rgb = vec![0u8; size * size * 3];
    for c in 0..3 {
        for i in 0..size * size {
            rgb[i * 3 + c] = chw[c * size * size + i].round().clamp(0.0, 255.0) as u8;
        }
    }
    use base64::Engine as _;
    let png = crate::perturbation::encode_png(rgb, size, size)?;
    Ok(base64::engine::general_purpose::STANDARD.encode(png))
}

/// Example images: clean (true label, undefended prediction) and attacked (undefended and
/// defended predictions), green when right, red when wrong.
pub fn examples_svg(r: &SuiteReport, classes: Option<&ClassTable>) -> Result<String> {
    let name = |i: usize| {
        let n = classes
            .and_then(|c| c.name(i))
            .map(|s| s.split(',').next().unwrap_or(s).to_string())
            .unwrap_or_else(|| format!("class {i}"));
        if n.chars().count() > 24 {
            n.chars().take(23).collect::<String>() + "…"
        } else {
            n
        }
    };
    let img = 160.0;
    let cell_w = 2.0 * img + 30.0;
    let cell_h = img + 80.0;
    let cols = r.examples.len().min(2);
    let rows = r.examples.len().div_ceil(2);
    let width = cols as f64 * cell_w + 20.0;
    let height = rows as f64 * cell_h + 40.0;
    let size = (r.examples[0].clean_pixels.len() / 3).isqrt();
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r#"<rect width="100%" height="100%" fill="white"/><text x="10" y="20" font-size="14" font-weight="bold">Clean → attacked ({}) → defended</text>"#,
        esc(&r
            .rows
            .iter()
            .find(|x| x.category == super::suite::Category::Seen)
            .or(r.rows.first())
            .map(|x| x.attack.clone())
            .unwrap_or_default())
    );
    let color = |ok: bool| if ok { "#2a7d2a" } else { "#c62828" };
    for (k, e) in r.examples.iter().enumerate() {
        let x0 = 10.0 + (k % 2) as f64 * cell_w;
        let y0 = 35.0 + (k / 2) as f64 * cell_h;
        for (j, px) in [&e.clean_pixels, &e.attacked_pixels].iter().enumerate() {
            let _ = writeln!(
                s,
                r#"<image x="{}" y="{y0}" width="{img}" height="{img}" href="data:image/png;base64,{}"/>"#,
                x0 + j as f64 * (img + 10.0),
                png_base64(px, size)?
            );
        }
        let ty = y0 + img + 16.0;
        let _ = writeln!(
            s,
            r#"<text x="{x0}" y="{ty}">true: {}</text><text x="{x0}" y="{}" fill="{}">clean: {}</text>"#,
            esc(&name(e.label)),
            ty + 16.0,
            color(e.clean == e.label),
            esc(&name(e.clean))
        );
        let x1 = x0 + img + 10.0;
        let _ = writeln!(
            s,
            r#"<text x="{x1}" y="{ty}" fill="{}">attacked: {}</text><text x="{x1}" y="{}" fill="{}">defended: {}</text>"#,
            color(e.attacked == e.label),
            esc(&name(e.attacked)),
            ty + 16.0,
            color(e.defended == e.label),
            esc(&name(e.defended))
        );
    }
    s.push_str("</svg>\n");
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_are_file_names() {
        assert_eq!(
            slug("sgd ℓ∞ 10 (held-out seed)"),
            "sgd_linf_10_held_out_seed"
        );
        assert_eq!(slug("sgd ℓ2 2000"), "sgd_l2_2000");
        assert_eq!(slug("LTS4 UAPs (6 networks)"), "lts4_uaps_6_networks");
    }
}
