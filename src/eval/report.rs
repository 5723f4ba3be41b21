//! Writing a suite's report: `report.json` (for scripts), `report.md` (for people), and plots
//! as SVG (grouped bars of restoration accuracy, drawn with plotters; example images with their
//! labels) and PNG (the perturbations, contrast-stretched). Every file is written atomically.
//!
//! The examples figure is a grid of embedded PNGs with captions, not a chart, and stays
//! assembled here: plotters embeds bitmaps only through its `image` feature, which pulls a
//! second `image` crate (0.24 beside sfr's 0.25).

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
    write_atomic(&bars, bars_svg(r)?.as_bytes())?;
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

/// Horizontal grouped bars (plotters, SVG): one group per attack row, top to bottom in the
/// report's order, one bar per defence column, a legend of the columns.
pub fn bars_svg(r: &SuiteReport) -> Result<String> {
    use plotters::prelude::*;
    let fail = |e: &dyn std::fmt::Display| SfrError::param("report", format!("plotting: {e}"));
    let ncol = r.columns.len().max(1);
    let nrow = r.rows.len().max(1);
    let max = r
        .rows
        .iter()
        .flat_map(|row| row.cells.iter().map(|c| c.restoration_accuracy))
        .fold(1.0f64, f64::max);
    let group_px = 9 * ncol as u32 + 10;
    let (width, height) = (960u32, 130 + group_px * nrow as u32 + 22 * ncol as u32);
    let mut s = String::new();
    {
        let root = SVGBackend::with_string(&mut s, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| fail(&e))?;
        // Rows from the top: the y axis runs from nrow down to 0.
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("Restoration accuracy — {} ({} images)", r.model, r.n),
                ("sans-serif", 20),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(330)
            // Room on the right for the legend, clear of the longest bars.
            .build_cartesian_2d(0f64..max * 1.22, nrow as f64..0f64)
            .map_err(|e| fail(&e))?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .light_line_style(WHITE)
            .y_labels(0)
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 14))
            .x_desc("(clean top-1 + attacked top-1) / (2 × undefended clean top-1)")
            .draw()
            .map_err(|e| fail(&e))?;
        let pad = 0.1;
        let bar = (1.0 - 2.0 * pad) / ncol as f64;
        for (ci, col) in r.columns.iter().enumerate() {
            // The undefended column (always the first) in grey, the defences in colour.
            let color = if ci == 0 {
                RGBColor(158, 158, 158).mix(0.9)
            } else {
                Palette99::pick(ci - 1).mix(0.9)
            };
            chart
                .draw_series(r.rows.iter().enumerate().filter_map(|(ri, row)| {
                    let c = row.cells.get(ci)?;
                    let y0 = ri as f64 + pad + ci as f64 * bar;
                    Some(Rectangle::new(
                        [(0.0, y0), (c.restoration_accuracy.max(0.0), y0 + bar * 0.9)],
                        color.filled(),
                    ))
                }))
                .map_err(|e| fail(&e))?
                .label(col.name.clone())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled())
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font(("sans-serif", 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .draw()
            .map_err(|e| fail(&e))?;
        // Row names beside their groups, right-aligned against the axis.
        let style = TextStyle::from(("sans-serif", 14).into_font()).pos(
            plotters::style::text_anchor::Pos::new(
                plotters::style::text_anchor::HPos::Right,
                plotters::style::text_anchor::VPos::Center,
            ),
        );
        for (ri, row) in r.rows.iter().enumerate() {
            let (x, y) = chart.backend_coord(&(0.0, ri as f64 + 0.5));
            root.draw(&Text::new(
                format!("{} ({})", row.attack, row.category),
                (x - 8, y),
                style.clone(),
            ))
            .map_err(|e| fail(&e))?;
        }
        root.present().map_err(|e| fail(&e))?;
    }
    Ok(s)
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

    /// A report of `rows` × `cols` with restoration accuracies i/10 + j/100.
    fn report(rows: usize, cols: &[&str]) -> SuiteReport {
        use super::super::suite::{Category, Cell, Column, RowReport};
        SuiteReport {
            model: "mobilenet_v2".into(),
            data: vec![],
            n: 12,
            skipped: 0,
            seed: 0,
            clip: true,
            clean_top1: 0.7,
            defense_file: String::new(),
            columns: cols
                .iter()
                .map(|c| Column {
                    name: c.to_string(),
                    description: String::new(),
                })
                .collect(),
            rows: (0..rows)
                .map(|i| RowReport {
                    attack: format!("attack <{i}> & co"),
                    category: if i == 0 {
                        Category::Seen
                    } else {
                        Category::Adaptive
                    },
                    budget: "ℓ∞ 10".into(),
                    provenance: vec![],
                    files: vec![],
                    n: 12,
                    cells: cols
                        .iter()
                        .enumerate()
                        .map(|(j, c)| Cell {
                            defense: c.to_string(),
                            clean_top1: 0.7,
                            attacked_top1: 0.5,
                            attacked_top5: 0.8,
                            fooling_rate: 0.3,
                            restoration_accuracy: i as f64 / 10.0 + j as f64 / 100.0,
                        })
                        .collect(),
                })
                .collect(),
            examples: vec![],
            metrics: serde_json::Value::Null,
            seconds: 1.0,
            device: "cpu".into(),
        }
    }

    #[test]
    fn bars_name_every_row_and_column_and_draw_one_bar_per_cell() {
        let cols = ["none", "sfr", "jpeg75"];
        let r = report(4, &cols);
        let svg = bars_svg(&r).unwrap();
        if let Ok(p) = std::env::var("SFR_DUMP_SVG") {
            std::fs::write(p, &svg).unwrap();
        }
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        for i in 0..4 {
            // Escaped by the SVG backend.
            assert!(
                svg.contains(&format!("attack &lt;{i}&gt; &amp; co")),
                "row {i}"
            );
        }
        for c in cols {
            assert!(svg.lines().any(|l| l.trim() == c), "legend entry {c}");
        }
        assert!(svg.contains("Restoration accuracy — mobilenet_v2 (12 images)"));
        // Bars: one filled rectangle per cell, their widths in proportion to the values.
        let widths: Vec<f64> = svg
            .lines()
            .filter(|l| l.contains("<rect") && l.contains("opacity=\"0.9\""))
            .filter_map(|l| {
                let w = l.split("width=\"").nth(1)?.split('"').next()?;
                w.parse().ok()
            })
            .collect();
        // Each column's legend swatch is drawn the same way: 12 bars + 3 swatches.
        assert_eq!(widths.len(), 4 * 3 + 3, "{svg}");
        let max = widths.iter().cloned().fold(0.0, f64::max);
        assert!(max > 100.0, "the widest bar spans the plot: {max}");
    }
}
