//! The evaluation suite: the paper's protocol in one pass. Every attack row (a set of
//! perturbations: seen, unseen, transferred, stronger, cross-norm, adaptive, and the random
//! control) is evaluated on the same images against every defence column (none, the SFR
//! defence, and the image-domain baselines), with named metrics:
//!
//! - `clean_top1`: top-1 of the defended (or bare) network on clean images;
//! - `attacked_top1`: top-1 on the attacked images (each image gets one perturbation of the row,
//!   chosen at random from the suite's seed when the row has several);
//! - `fooling_rate`: fraction of images whose top-1 changes under attack, against the same
//!   defence's clean prediction;
//! - `restoration_accuracy`: (clean_top1 + attacked_top1) / (2 · clean top-1 of the bare
//!   network) — the paper's formula, so every column is judged against the undefended network.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::{Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::{load_batch, logits_rows, metrics};
use crate::classifier::argmax;
use crate::data::Dataset;
use crate::defense::Defense;
use crate::defense::baselines::ImageDefense;
use crate::error::{Result, SfrError};
use crate::perturbation::{self, Fit, Norm, Perturbation};
use crate::zoo::{Model, NoTap};

/// Where an attack row stands with respect to the defence's training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Category {
    /// Held-out perturbations of the kind the defence was trained on.
    Seen,
    /// Other attack types computed for this network.
    Unseen,
    /// Published perturbations computed for other networks.
    Transferred,
    /// The training kind at a larger budget.
    Stronger,
    /// The training kind under the other norm.
    CrossNorm,
    /// Computed through a defence (the attacker knows it): the SFR units, or an image-domain
    /// baseline straight through (BPDA).
    Adaptive,
    /// Random noise of the same budget.
    Control,
}

impl std::fmt::Display for Category {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Category::Seen => "seen",
            Category::Unseen => "unseen",
            Category::Transferred => "transferred",
            Category::Stronger => "stronger",
            Category::CrossNorm => "cross-norm",
            Category::Adaptive => "adaptive",
            Category::Control => "control",
        })
    }
}

/// One attack row: a name, a category and its perturbations.
#[derive(Debug, Clone)]
pub struct AttackRow {
    /// Short name (`sgd ℓ∞ 10`, `LTS4 UAPs`, …).
    pub name: String,
    /// Category.
    pub category: Category,
    /// Files the perturbations came from.
    pub files: Vec<String>,
    /// The perturbations (each image gets one).
    pub perturbations: Vec<Perturbation>,
}

impl AttackRow {
    fn budget(&self) -> String {
        let mut b: Vec<String> = self
            .perturbations
            .iter()
            .map(|p| match p.meta.norm {
                Norm::Linf => format!("ℓ∞ {}", fmt_eps(p.meta.eps)),
                Norm::L2 => format!("ℓ2 {}", fmt_eps(p.meta.eps)),
            })
            .collect();
        b.sort();
        b.dedup();
        b.join(", ")
    }
}

fn fmt_eps(e: f64) -> String {
    if (e - e.round()).abs() < 1e-9 || e >= 100.0 {
        format!("{}", e.round() as i64)
    } else {
        format!("{e:.1}")
    }
}

/// A defence column.
#[derive(Debug, Clone, Serialize)]
pub struct Column {
    /// Short name (`none`, `sfr`, `jpeg75`, …).
    pub name: String,
    /// What it is.
    pub description: String,
}

/// The metrics of one (attack, defence) cell.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    /// Defence column.
    pub defense: String,
    /// Top-1 on clean images with this defence.
    pub clean_top1: f64,
    /// Top-1 on attacked images with this defence.
    pub attacked_top1: f64,
    /// Top-5 on attacked images with this defence.
    pub attacked_top5: f64,
    /// Label change under attack vs this defence's clean prediction.
    pub fooling_rate: f64,
    /// (clean_top1 + attacked_top1) / (2 · bare clean top-1).
    pub restoration_accuracy: f64,
}

/// One attack row of the report.
#[derive(Debug, Clone, Serialize)]
pub struct RowReport {
    /// Name.
    pub attack: String,
    /// Category.
    pub category: Category,
    /// Budget(s), e.g. `ℓ∞ 10`.
    pub budget: String,
    /// The attacks' own names and seeds, from the files' metadata.
    pub provenance: Vec<String>,
    /// Files.
    pub files: Vec<String>,
    /// Images evaluated.
    pub n: usize,
    /// One cell per defence column.
    pub cells: Vec<Cell>,
}

/// An image shown in the report: label and predictions.
#[derive(Debug, Clone, Serialize)]
pub struct Example {
    /// Image file.
    pub file: String,
    /// Ground-truth label.
    pub label: usize,
    /// Bare network, clean.
    pub clean: usize,
    /// Bare network, attacked by the first seen perturbation.
    pub attacked: usize,
    /// Defended network, attacked.
    pub defended: usize,
    /// 0–255 CHW pixels of the clean image (not serialised).
    #[serde(skip)]
    pub clean_pixels: Vec<f32>,
    /// 0–255 CHW pixels of the attacked image (not serialised).
    #[serde(skip)]
    pub attacked_pixels: Vec<f32>,
}

/// The suite's result.
#[derive(Debug, Clone, Serialize)]
pub struct SuiteReport {
    /// Model.
    pub model: String,
    /// Evaluation data.
    pub data: Vec<String>,
    /// Images evaluated (readable and labelled).
    pub n: usize,
    /// Images skipped (unreadable).
    pub skipped: usize,
    /// Seed of the per-image choice of perturbation.
    pub seed: u64,
    /// Perturbed pixels clipped to [0, 255].
    pub clip: bool,
    /// Clean top-1 of the bare network (the denominator of every restoration accuracy).
    pub clean_top1: f64,
    /// The defence file.
    pub defense_file: String,
    /// Defence columns.
    pub columns: Vec<Column>,
    /// Attack rows.
    pub rows: Vec<RowReport>,
    /// A few images with their labels before and after attack and defence.
    pub examples: Vec<Example>,
    /// What each metric means.
    pub metrics: serde_json::Value,
    /// Wall time of the evaluation in seconds.
    pub seconds: f64,
    /// Compute device.
    pub device: String,
}

/// A learned defence compared beside the one under test (`sfr suite --rival FILE`): a column
/// of its own and, in a suite that computes its attacks, an adaptive row through it.
#[derive(Debug, Clone)]
pub struct Rival {
    /// Its column's name: its method (`prn`, `sfr`), numbered from the second of a kind on
    /// (`prn_2`).
    pub name: String,
    /// The file it was read from.
    pub file: String,
    /// The defence.
    pub defense: Defense,
}

/// Name the rivals of `main` ([`Rival::name`]): the defence under test's column is its method.
pub fn name_rivals(main: &Defense, files: Vec<(String, Defense)>) -> Vec<Rival> {
    let mut taken = vec![main.meta.method.to_string()];
    files
        .into_iter()
        .map(|(file, defense)| {
            let kind = defense.meta.method.to_string();
            let mut name = kind.clone();
            let mut k = 1;
            while taken.contains(&name) {
                k += 1;
                name = format!("{kind}_{k}");
            }
            taken.push(name.clone());
            Rival {
                name,
                file,
                defense,
            }
        })
        .collect()
}

/// Options of [`run`].
#[derive(Debug, Clone)]
pub struct SuiteOptions {
    /// Images per batch.
    pub batch_size: usize,
    /// Seed of the per-image choice among a row's perturbations.
    pub seed: u64,
    /// Clip perturbed pixels to [0, 255].
    pub clip: bool,
    /// Learned rivals to compare with (columns after the defence under test).
    pub rivals: Vec<Rival>,
    /// Image-domain baselines to compare with.
    pub baselines: Vec<ImageDefense>,
    /// Images kept as examples.
    pub examples: usize,
}

impl Default for SuiteOptions {
    fn default() -> Self {
        SuiteOptions {
            batch_size: 32,
            seed: 0,
            clip: true,
            rivals: Vec::new(),
            baselines: ImageDefense::suite(),
            examples: 4,
        }
    }
}

/// The metric definitions written into every report.
pub fn metric_definitions() -> serde_json::Value {
    serde_json::json!({
        "clean_top1": "top-1 accuracy on clean images, with the column's defence",
        "attacked_top1": "top-1 accuracy on attacked images (each image gets one of the row's perturbations, chosen at random from the seed), with the column's defence",
        "fooling_rate": "fraction of images whose top-1 label changes under attack, against the same column's clean prediction",
        "restoration_accuracy": "(clean_top1 + attacked_top1) / (2 × clean top-1 of the undefended network) — Borkar et al. 2020",
    })
}

#[derive(Default, Clone)]
struct Acc {
    n: usize,
    top1: usize,
    top5: usize,
    fooled: usize,
}

fn hits(row: &[f32], label: usize) -> (bool, bool) {
    let t5 = metrics::top_k(row, 5);
    (t5.first() == Some(&label), t5.contains(&label))
}

/// Evaluate every row against every defence column on `data`.
///
/// ```no_run
/// use std::path::Path;
/// use sfr::eval::{assemble, suite};
/// use sfr::perturbation::Norm;
///
/// let dev = sfr::device::default_device();
/// let model = sfr::zoo::load("mobilenet_v2", Path::new("mobilenet_v2-b0353104.pth"), &dev)?;
/// let mut defense = sfr::defense::Defense::load(Path::new("def.safetensors"), &model, &dev)?;
/// let data = sfr::data::Dataset::open("../shared/data/nips17", None)?;
/// // Rows from perturbation files, judged against the attack the defence was trained on.
/// let rows = assemble::rows_from_specs(&["test=uap.safetensors".into()], 224, ("sgd", Norm::Linf, 10.0))?;
/// let report = suite::run(&model, &mut defense, "def.safetensors", &data, &rows,
///                         &suite::SuiteOptions::default(), &mut |_, _| {})?;
/// println!("{}", sfr::eval::report::restoration_table(&report));
/// # Ok::<(), sfr::SfrError>(())
/// ```
pub fn run(
    model: &Model,
    defense: &mut Defense,
    defense_file: &str,
    data: &Dataset,
    rows: &[AttackRow],
    opts: &SuiteOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<SuiteReport> {
    defense.check_backbone(model)?;
    let mut rivals = opts.rivals.clone();
    for r in &rivals {
        r.defense
            .check_backbone(model)
            .map_err(|e| SfrError::param("--rival", format!("{}: {e}", r.file)))?;
    }
    if opts.batch_size == 0 {
        return Err(SfrError::param("--batch-size", "must be at least 1"));
    }
    for b in &opts.baselines {
        b.validate()?;
    }
    if rows.is_empty() {
        return Err(SfrError::param("suite", "no attack rows to evaluate"));
    }
    let size = model.spec().input_size;
    for r in rows {
        if r.perturbations.is_empty() {
            return Err(SfrError::param(
                "suite",
                format!("attack row `{}` has no perturbation", r.name),
            ));
        }
        for (p, f) in r.perturbations.iter().zip(&r.files) {
            p.check_size(size, f)?;
        }
    }
    let total = data.samples.len();
    if total == 0 {
        return Err(SfrError::NoImages(
            "the evaluation data set is empty".into(),
        ));
    }
    let mut columns = vec![
        Column {
            name: "none".into(),
            description: "the undefended network".into(),
        },
        Column {
            name: defense.meta.method.to_string(),
            description: describe_defense(defense, None),
        },
    ];
    for r in &rivals {
        columns.push(Column {
            name: r.name.clone(),
            description: describe_defense(&r.defense, Some(&r.file)),
        });
    }
    let nrival = rivals.len();
    for b in &opts.baselines {
        columns.push(Column {
            name: b.to_string(),
            description: b.describe(),
        });
    }
    let ncol = columns.len();
    // Per row, one perturbation per image, drawn in data order from a per-row stream.
    let choice: Vec<Vec<usize>> = rows
        .iter()
        .enumerate()
        .map(|(ri, r)| {
            let mut rng = ChaCha8Rng::seed_from_u64(
                opts.seed.wrapping_mul(1_000_003).wrapping_add(ri as u64),
            );
            (0..total)
                .map(|_| rng.random_range(0..r.perturbations.len()))
                .collect()
        })
        .collect();
    let stacks: Vec<Tensor<4>> = rows
        .iter()
        .map(|r| {
            Tensor::cat(
                r.perturbations
                    .iter()
                    .map(|p| p.to_tensor(model.device()))
                    .collect(),
                0,
            )
        })
        .collect();
    let example_row = rows
        .iter()
        .position(|r| r.category == Category::Seen)
        .unwrap_or(0);

    let start = Instant::now();
    let mut clean = vec![Acc::default(); ncol];
    let mut attacked = vec![vec![Acc::default(); ncol]; rows.len()];
    let mut examples = Vec::new();
    let mut skipped = 0usize;
    let mut done = 0usize;
    // One forward through column `c` of the pixels `x`.
    let mut forward = |c: usize, x: Tensor<4>| -> Result<Vec<Vec<f32>>> {
        match c {
            0 => logits_rows(model.forward_pixels(x, &mut NoTap)),
            1 => logits_rows(defense.forward_pixels(model, x)),
            k if k < 2 + nrival => logits_rows(rivals[k - 2].defense.forward_pixels(model, x)),
            k => logits_rows(
                model.forward_pixels(opts.baselines[k - 2 - nrival].apply(x)?, &mut NoTap),
            ),
        }
    };
    for chunk in data.samples.chunks(opts.batch_size) {
        let offset = done;
        let (batch, sk) = load_batch(model, chunk, false)?;
        skipped += sk.len();
        done += chunk.len();
        let Some(b) = batch else {
            progress(done, total);
            continue;
        };
        let labels: Vec<Option<usize>> = b.samples.iter().map(|s| s.label).collect();
        let pos: Vec<usize> = b
            .samples
            .iter()
            .map(|s| offset + chunk.iter().position(|c| c.path == s.path).unwrap_or(0))
            .collect();
        let mut clean_pred = vec![Vec::new(); ncol];
        for c in 0..ncol {
            let out = forward(c, b.pixels.clone())?;
            for (i, row) in out.iter().enumerate() {
                let p = argmax(row);
                clean_pred[c].push(p);
                if let Some(l) = labels[i] {
                    let (t1, t5) = hits(row, l);
                    let a = &mut clean[c];
                    a.n += 1;
                    a.top1 += usize::from(t1);
                    a.top5 += usize::from(t5);
                }
            }
        }
        for (ri, stack) in stacks.iter().enumerate() {
            let idx: Vec<i64> = pos.iter().map(|&p| choice[ri][p] as i64).collect();
            let n = idx.len();
            let idx = Tensor::from_data(TensorData::new(idx, [n]), model.device());
            let x = perturbation::apply(b.pixels.clone(), stack.clone().select(0, idx), opts.clip);
            let mut preds = vec![Vec::new(); ncol];
            for c in 0..ncol {
                let out = forward(c, x.clone())?;
                for (i, row) in out.iter().enumerate() {
                    let p = argmax(row);
                    preds[c].push(p);
                    if let Some(l) = labels[i] {
                        let (t1, t5) = hits(row, l);
                        let a = &mut attacked[ri][c];
                        a.n += 1;
                        a.top1 += usize::from(t1);
                        a.top5 += usize::from(t5);
                        a.fooled += usize::from(p != clean_pred[c][i]);
                    }
                }
            }
            if ri == example_row && opts.examples > 0 {
                keep_examples(
                    &mut examples,
                    opts.examples,
                    &b.samples,
                    (&clean_pred[0], &preds[0], &preds[1]),
                    &b.pixels,
                    &x,
                    size,
                );
            }
        }
        progress(done, total);
    }
    examples.sort_by_key(|(_, order, _)| *order);
    let examples: Vec<Example> = examples.into_iter().map(|(_, _, e)| e).collect();
    let base = &clean[0];
    if base.n == 0 {
        return Err(SfrError::NoImages(format!(
            "none of the {total} evaluation images could be read and labelled ({skipped} skipped)"
        )));
    }
    let base_top1 = metrics::ratio(base.top1, base.n);
    let reports = rows
        .iter()
        .enumerate()
        .map(|(ri, r)| RowReport {
            attack: r.name.clone(),
            category: r.category,
            budget: r.budget(),
            provenance: provenance(r),
            files: r.files.clone(),
            n: attacked[ri][0].n,
            cells: columns
                .iter()
                .enumerate()
                .map(|(c, col)| {
                    let a = &attacked[ri][c];
                    let ct = metrics::ratio(clean[c].top1, clean[c].n);
                    let at = metrics::ratio(a.top1, a.n);
                    Cell {
                        defense: col.name.clone(),
                        clean_top1: ct,
                        attacked_top1: at,
                        attacked_top5: metrics::ratio(a.top5, a.n),
                        fooling_rate: metrics::ratio(a.fooled, a.n),
                        restoration_accuracy: metrics::restoration_accuracy(ct, at, base_top1),
                    }
                })
                .collect(),
        })
        .collect();
    Ok(SuiteReport {
        model: model.spec().name.to_string(),
        data: data
            .sources
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
        n: base.n,
        skipped,
        seed: opts.seed,
        clip: opts.clip,
        clean_top1: base_top1,
        defense_file: defense_file.to_string(),
        columns,
        rows: reports,
        examples,
        metrics: metric_definitions(),
        seconds: start.elapsed().as_secs_f64(),
        device: crate::device::describe(),
    })
}

/// A learned defence column's description.
fn describe_defense(d: &Defense, file: Option<&str>) -> String {
    let what = match d.meta.method {
        crate::defense::Method::Sfr => format!("Selective Feature Regeneration ({})", d.summary()),
        crate::defense::Method::Prn => format!("{}, trained as the FRUs are", d.summary()),
        crate::defense::Method::Uat => format!(
            "{} (BN frozen), in the FRUs' training loop; it changes the backbone, so its clean accuracy is its own",
            d.summary()
        ),
    };
    match file {
        Some(f) => format!("{what}; {f}"),
        None => what,
    }
}

/// How telling an example is: fooled and restored (3), fooled (2), other (1).
fn interest(e: &Example) -> u8 {
    match (e.attacked != e.clean, e.defended == e.label) {
        (true, true) => 3,
        (true, false) => 2,
        _ => 1,
    }
}

/// Keep the `k` most telling examples seen so far (ties: first seen), as (interest, order, example).
fn keep_examples(
    kept: &mut Vec<(u8, usize, Example)>,
    k: usize,
    samples: &[crate::data::Sample],
    (clean, attacked, defended): (&[usize], &[usize], &[usize]),
    pixels: &Tensor<4>,
    perturbed: &Tensor<4>,
    size: usize,
) {
    let plane = 3 * size * size;
    let mut pix: Option<(Vec<f32>, Vec<f32>)> = None;
    for (i, s) in samples.iter().enumerate() {
        let Some(label) = s.label else { continue };
        let e = Example {
            file: s.path.display().to_string(),
            label,
            clean: clean[i],
            attacked: attacked[i],
            defended: defended[i],
            clean_pixels: Vec::new(),
            attacked_pixels: Vec::new(),
        };
        let score = interest(&e);
        let worst = kept.iter().map(|(sc, _, _)| *sc).min().unwrap_or(0);
        if kept.len() >= k && score <= worst {
            continue;
        }
        if pix.is_none() {
            let a = pixels.clone().into_data().try_into_vec::<f32>().ok();
            let b = perturbed.clone().into_data().try_into_vec::<f32>().ok();
            match (a, b) {
                (Some(a), Some(b)) => pix = Some((a, b)),
                _ => return,
            }
        }
        let Some((a, b)) = &pix else { return };
        let mut e = e;
        e.clean_pixels = a[i * plane..(i + 1) * plane].to_vec();
        e.attacked_pixels = b[i * plane..(i + 1) * plane].to_vec();
        let order = kept.iter().map(|(_, o, _)| *o + 1).max().unwrap_or(0);
        if kept.len() >= k {
            // Replace the last-seen of the least telling ones.
            if let Some(pos) = kept
                .iter()
                .enumerate()
                .filter(|(_, (sc, _, _))| *sc == worst)
                .max_by_key(|(_, (_, o, _))| *o)
                .map(|(p, _)| p)
            {
                kept.remove(pos);
            }
        }
        kept.push((score, order, e));
    }
}

fn provenance(r: &AttackRow) -> Vec<String> {
    let mut v: Vec<String> = r
        .perturbations
        .iter()
        .map(|p| {
            let m = &p.meta;
            let mut s = m.attack.clone();
            if let Some(model) = &m.model {
                s.push_str(&format!(" on {model}"));
            }
            if let Some(seed) = m.seed {
                s.push_str(&format!(", seed {seed}"));
            }
            if m.n_images > 0 {
                s.push_str(&format!(", {} images", m.n_images));
            }
            if let Some(src) = &m.source {
                s = format!("published: {src}");
            }
            s
        })
        .collect();
    v.dedup();
    v
}

/// A row from perturbation files; the category is inferred from their metadata against the
/// defence's training perturbations (`seen_norm`, `seen_eps`, `seen_attack`) unless given.
pub fn row_from_files(
    name: &str,
    files: &[PathBuf],
    size: usize,
    category: Option<Category>,
    seen: (&str, Norm, f64),
) -> Result<AttackRow> {
    let mut perts = Vec::new();
    for f in files {
        let p = Perturbation::load(f)?;
        let p = fit_to(p, size)?;
        p.check_size(size, &f.display().to_string())?;
        perts.push(p);
    }
    let first = perts
        .first()
        .ok_or_else(|| SfrError::param("--attack", format!("row `{name}` names no file")))?;
    let category = category.unwrap_or_else(|| {
        let m = &first.meta;
        if m.source.is_some() {
            Category::Transferred
        } else if m.attack == "random" {
            Category::Control
        } else if m.params.get("through_defense").is_some()
            || m.params.get("through_filter").is_some()
        {
            Category::Adaptive
        } else if m.norm != seen.1 {
            Category::CrossNorm
        } else if m.attack == seen.0 && m.eps > seen.2 + 1e-9 {
            Category::Stronger
        } else if m.attack == seen.0 {
            Category::Seen
        } else {
            Category::Unseen
        }
    });
    Ok(AttackRow {
        name: name.to_string(),
        category,
        files: files.iter().map(|f| f.display().to_string()).collect(),
        perturbations: perts,
    })
}

/// Make a perturbation of another size fit: centre crop when larger (FFF's 227, GAP's 300),
/// bilinear resize when smaller.
fn fit_to(p: Perturbation, size: usize) -> Result<Perturbation> {
    if p.height == size && p.width == size {
        Ok(p)
    } else if p.height >= size && p.width >= size {
        p.fit(size, Fit::Crop)
    } else {
        p.fit(size, Fit::Resize)
    }
}

/// A published family: row name, category, and which relative paths belong to it.
type Family = (&'static str, Category, fn(&str) -> bool);

/// The published perturbations of a folder laid out as `../shared/attacks` (LTS4 `.mat`, the
/// SFR release's `UAP/`, `FFF`, `NAG`, `SFool`, `GAP`, `GUAP`, `sPGD`), one row per family;
/// families that are absent are left out, a file that does not import is an error.
pub fn published_rows(dir: &Path, size: usize) -> Result<Vec<AttackRow>> {
    if !dir.is_dir() {
        return Err(SfrError::param(
            "--published",
            format!(
                "{} is not a folder (expected the layout of ../shared/attacks)",
                dir.display()
            ),
        ));
    }
    let mut files = Vec::new();
    collect_files(dir, &mut files)?;
    files.sort();
    let rel = |p: &Path| {
        p.strip_prefix(dir)
            .unwrap_or(p)
            .to_string_lossy()
            .replace('\\', "/")
    };
    let families: [Family; 9] = [
        ("LTS4 UAPs (6 networks)", Category::Transferred, |r| {
            r.starts_with("lts4/") && r.ends_with(".mat")
        }),
        (
            "SFR-release ℓ∞ UAPs (4 networks)",
            Category::Transferred,
            |r| {
                r.starts_with("sfr-release/UAP/")
                    && !r.contains("/L_2/")
                    && !r.contains("/Linf_")
                    && !r.contains("ResNet152")
                    && r.ends_with(".h5")
            },
        ),
        ("SFR-release ℓ2 UAPs", Category::Transferred, |r| {
            r.starts_with("sfr-release/UAP/") && r.contains("/L_2/") && r.ends_with(".h5")
        }),
        ("FFF (CaffeNet)", Category::Transferred, |r| {
            r.starts_with("sfr-release/FFF/")
        }),
        ("NAG", Category::Transferred, |r| {
            r.starts_with("sfr-release/NAG/")
        }),
        ("SFool (AlexNet)", Category::Transferred, |r| {
            r.starts_with("sfr-release/SFool/")
        }),
        ("GAP ×16 (ResNet-152)", Category::Transferred, |r| {
            r.starts_with("sfr-release/GAP/")
        }),
        ("GUAP ×1.5 (ResNet-152)", Category::Transferred, |r| {
            r.starts_with("sfr-release/GUAP/")
        }),
        ("sPGD (ResNet-152)", Category::Transferred, |r| {
            r.starts_with("sfr-release/sPGD/")
        }),
    ];
    let mut rows = Vec::new();
    for (name, cat, pick) in families {
        let chosen: Vec<PathBuf> = files
            .iter()
            .filter(|f| {
                let r = rel(f);
                pick(&r)
                    && ["mat", "h5", "npy"]
                        .iter()
                        .any(|e| r.to_ascii_lowercase().ends_with(&format!(".{e}")))
            })
            .cloned()
            .collect();
        if chosen.is_empty() {
            continue;
        }
        rows.push(row_from_files(
            name,
            &chosen,
            size,
            Some(cat),
            ("", Norm::Linf, 0.0),
        )?);
    }
    if rows.is_empty() {
        return Err(SfrError::param(
            "--published",
            format!(
                "{} holds none of the published perturbations sfr knows (lts4/*.mat, sfr-release/…)",
                dir.display()
            ),
        ));
    }
    Ok(rows)
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let rd = std::fs::read_dir(dir).map_err(|e| SfrError::io(dir, e))?;
    for e in rd {
        let e = e.map_err(|e| SfrError::io(dir, e))?;
        let p = e.path();
        if p.is_dir() {
            collect_files(&p, out)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}
