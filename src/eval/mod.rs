//! Evaluation: images through a model, batched, with named metrics.

pub mod assemble;
pub mod generate;
/// The metrics (they live below the stages that compute them).
pub use crate::metrics;
pub mod report;
pub mod suite;

use std::time::Instant;

use burn::tensor::{Tensor, TensorData};
use serde::Serialize;

pub use crate::classifier::{Batch, Skipped, load_batch, logits_rows, prepare_image};
use crate::data::Dataset;
use crate::defense::Defense;
use crate::error::{Result, SfrError};
use crate::perturbation::{self, Perturbation};
use crate::zoo::{Model, NoTap};
use metrics::TopK;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Options of [`evaluate`].
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Images per forward pass.
    pub batch_size: usize,
    /// Fail on the first unreadable image instead of skipping it.
    pub strict: bool,
    /// Clip perturbed pixels to [0, 255] (the paper's release does not).
    pub clip: bool,
    /// Seed of the per-image choice among several perturbations.
    pub seed: u64,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            batch_size: 32,
            strict: false,
            clip: true,
            seed: 0,
        }
    }
}

/// Results under attack (present when perturbations were given).
#[derive(Debug, Clone, Serialize)]
pub struct AttackedReport {
    /// Perturbation files (each image gets one, chosen at random from the seed).
    pub perturbations: Vec<String>,
    /// Top-1 accuracy on perturbed images.
    pub perturbed_top1: f64,
    /// Top-5 accuracy on perturbed images.
    pub perturbed_top5: f64,
    /// Fraction of images whose top-1 label changes under the perturbation (vs the clean
    /// prediction, not the ground truth).
    pub fooling_rate: f64,
    /// Fraction of perturbed images whose top-1 label is wrong (1 − perturbed top-1).
    pub error_rate: f64,
    /// Restoration accuracy of the undefended network: (clean top-1 + perturbed top-1) /
    /// (2 · clean top-1).
    pub restoration_accuracy_baseline: f64,
    /// Whether perturbed pixels were clipped to [0, 255].
    pub clip: bool,
    /// Seed of the per-image choice.
    pub seed: u64,
    /// The class every perturbation targets (targeted UAPs; absent otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_class: Option<usize>,
    /// Targeted success rate: of the images whose clean prediction is not the target, the
    /// fraction the perturbation sends to it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub targeted_success_rate: Option<f64>,
}

/// Results of the defended network (present when a defence was given).
#[derive(Debug, Clone, Serialize)]
pub struct DefendedReport {
    /// The defence file.
    pub defense: String,
    /// Top-1 of the defended network on clean images.
    pub defended_clean_top1: f64,
    /// Top-1 of the defended network on perturbed images (when perturbations were given).
    pub defended_perturbed_top1: Option<f64>,
    /// Fraction of images whose defended top-1 changes under the perturbation.
    pub defended_fooling_rate: Option<f64>,
    /// Restoration accuracy: (defended clean top-1 + defended perturbed top-1) / (2 · undefended
    /// clean top-1).
    pub restoration_accuracy: Option<f64>,
    /// Targeted success rate on the defended network (targeted UAPs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub defended_targeted_success_rate: Option<f64>,
}

/// The result of a clean evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// Model name.
    pub model: String,
    /// Data folders.
    pub data: Vec<String>,
    /// Images evaluated.
    pub n: usize,
    /// Top-1 accuracy on clean images (label = top prediction).
    pub clean_top1: f64,
    /// Top-5 accuracy on clean images.
    pub clean_top5: f64,
    /// Images evaluated per second (decode, preprocessing and forward).
    pub images_per_second: f64,
    /// Wall time in seconds.
    pub seconds: f64,
    /// Batch size.
    pub batch_size: usize,
    /// Images that could not be read, with why.
    pub skipped: Vec<Skipped>,
    /// Compute device.
    pub device: String,
    /// Under attack, when perturbations were given.
    #[serde(flatten)]
    pub attacked: Option<AttackedReport>,
    /// With the defence, when one was given.
    #[serde(flatten)]
    pub defended: Option<DefendedReport>,
}

/// Top-1/top-5 of `model` on `dataset`, clean and, with `perturbations`, perturbed: every
/// image is evaluated clean and with one perturbation chosen at random (fixed seed) among them;
/// `progress(done, total)` after each batch.
pub fn evaluate(
    model: &Model,
    dataset: &Dataset,
    perturbations: &[(String, Perturbation)],
    mut defense: Option<(&str, &mut Defense)>,
    opts: &EvalOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<EvalReport> {
    if opts.batch_size == 0 {
        return Err(SfrError::param("batch size", "must be at least 1"));
    }
    let total = dataset.samples.len();
    if total == 0 {
        return Err(SfrError::NoImages("the data set is empty".into()));
    }
    let size = model.spec().input_size;
    for (name, p) in perturbations {
        p.check_size(size, name)?;
    }
    // One perturbation per image, drawn in data order so the choice does not depend on batching.
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let choice: Vec<usize> = (0..total)
        .map(|_| {
            if perturbations.len() > 1 {
                rng.random_range(0..perturbations.len())
            } else {
                0
            }
        })
        .collect();
    let stack = if perturbations.is_empty() {
        None
    } else {
        let ts: Vec<Tensor<4>> = perturbations
            .iter()
            .map(|(_, p)| p.to_tensor(model.device()))
            .collect();
        Some(Tensor::cat(ts, 0))
    };
    // Targeted UAPs: the class, when every perturbation targets the same one.
    let targets: Vec<Option<usize>> = perturbations
        .iter()
        .map(|(_, p)| {
            p.meta
                .params
                .get("target")
                .and_then(|t| t.as_u64())
                .map(|t| t as usize)
        })
        .collect();
    let target_class = match targets.first() {
        Some(&Some(t)) if targets.iter().all(|x| *x == Some(t)) => Some(t),
        _ => None,
    };
    // (sent to the target, eligible) for the bare and the defended network.
    let mut hits = (0usize, 0usize);
    let mut def_hits = (0usize, 0usize);
    let start = Instant::now();
    let mut acc = TopK::default();
    let mut adv = TopK::default();
    let mut fooled = 0usize;
    let mut def_clean = TopK::default();
    let mut def_adv = TopK::default();
    let mut def_fooled = 0usize;
    let mut skipped = Vec::new();
    let mut done = 0;
    for chunk in dataset.samples.chunks(opts.batch_size) {
        let offset = done;
        let (batch, sk) = load_batch(model, chunk, opts.strict)?;
        skipped.extend(sk);
        if let Some(b) = batch {
            let rows = logits_rows(model.forward_pixels(b.pixels.clone(), &mut NoTap))?;
            let adv_rows = match &stack {
                Some(stack) => {
                    let idx: Vec<i64> = b
                        .samples
                        .iter()
                        .map(|s| {
                            let pos = chunk.iter().position(|c| c.path == s.path).unwrap_or(0);
                            choice[offset + pos] as i64
                        })
                        .collect();
                    let n = idx.len();
                    let idx = Tensor::from_data(TensorData::new(idx, [n]), model.device());
                    let v = stack.clone().select(0, idx);
                    let x = perturbation::apply(b.pixels.clone(), v, opts.clip);
                    Some((logits_rows(model.forward_pixels(x.clone(), &mut NoTap))?, x))
                }
                None => None,
            };
            let (adv_rows, adv_x) = match adv_rows {
                Some((r, x)) => (Some(r), Some(x)),
                None => (None, None),
            };
            let (def_rows, def_adv_rows) = match defense.as_mut() {
                Some((_, d)) => {
                    let c = logits_rows(d.forward_pixels(model, b.pixels.clone()))?;
                    let a = match adv_x {
                        Some(x) => Some(logits_rows(d.forward_pixels(model, x))?),
                        None => None,
                    };
                    (Some(c), a)
                }
                None => (None, None),
            };
            for (i, (row, s)) in rows.iter().zip(&b.samples).enumerate() {
                if let Some(label) = s.label {
                    acc.add(row, label);
                    if let Some(ar) = &adv_rows {
                        adv.add(&ar[i], label);
                        if metrics::top_k(&ar[i], 1) != metrics::top_k(row, 1) {
                            fooled += 1;
                        }
                        if let Some(t) = target_class
                            && metrics::top_k(row, 1)[0] != t
                        {
                            hits.1 += 1;
                            hits.0 += usize::from(metrics::top_k(&ar[i], 1)[0] == t);
                        }
                    }
                    if let Some(dr) = &def_rows {
                        def_clean.add(&dr[i], label);
                        if let Some(da) = &def_adv_rows {
                            def_adv.add(&da[i], label);
                            if metrics::top_k(&da[i], 1) != metrics::top_k(&dr[i], 1) {
                                def_fooled += 1;
                            }
                            if let Some(t) = target_class
                                && metrics::top_k(&dr[i], 1)[0] != t
                            {
                                def_hits.1 += 1;
                                def_hits.0 += usize::from(metrics::top_k(&da[i], 1)[0] == t);
                            }
                        }
                    }
                }
            }
        }
        done += chunk.len();
        progress(done, total);
    }
    if acc.n == 0 {
        return Err(SfrError::NoImages(format!(
            "none of the {total} images could be read and labelled ({} skipped)",
            skipped.len()
        )));
    }
    let seconds = start.elapsed().as_secs_f64();
    let attacked = (!perturbations.is_empty()).then(|| AttackedReport {
        perturbations: perturbations.iter().map(|(n, _)| n.clone()).collect(),
        perturbed_top1: adv.top1_rate(),
        perturbed_top5: adv.top5_rate(),
        fooling_rate: metrics::ratio(fooled, adv.n),
        error_rate: 1.0 - adv.top1_rate(),
        restoration_accuracy_baseline: metrics::restoration_accuracy(
            acc.top1_rate(),
            adv.top1_rate(),
            acc.top1_rate(),
        ),
        clip: opts.clip,
        seed: opts.seed,
        target_class,
        targeted_success_rate: target_class.map(|_| metrics::ratio(hits.0, hits.1)),
    });
    let defended = defense.map(|(name, _)| {
        let has_adv = def_adv.n > 0;
        DefendedReport {
            defense: name.to_string(),
            defended_clean_top1: def_clean.top1_rate(),
            defended_perturbed_top1: has_adv.then(|| def_adv.top1_rate()),
            defended_fooling_rate: has_adv.then(|| metrics::ratio(def_fooled, def_adv.n)),
            restoration_accuracy: has_adv.then(|| {
                metrics::restoration_accuracy(
                    def_clean.top1_rate(),
                    def_adv.top1_rate(),
                    acc.top1_rate(),
                )
            }),
            defended_targeted_success_rate: (has_adv && target_class.is_some())
                .then(|| metrics::ratio(def_hits.0, def_hits.1)),
        }
    });
    Ok(EvalReport {
        model: model.spec().name.to_string(),
        data: dataset
            .sources
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
        n: acc.n,
        clean_top1: acc.top1_rate(),
        clean_top5: acc.top5_rate(),
        images_per_second: (acc.n + skipped.len()) as f64 / seconds,
        seconds,
        batch_size: opts.batch_size,
        skipped,
        device: crate::device::describe(),
        attacked,
        defended,
    })
}
