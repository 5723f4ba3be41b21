//! Training the FRUs: the backbone frozen (weights and batch-norm statistics), only the units
//! learn, with the backbone's own loss (softmax cross-entropy on labels, or on the clean
//! predictions with `pseudo_labels`), on mini-batches that are half clean and half perturbed by
//! a training perturbation (a real UAP or, by default, a synthetic one drawn from them).
//!
//! Beyond the paper, all off by default: two label-free losses that match the undefended
//! network's clean output ([`Loss::Distill`], [`Loss::Logits`]), a cosine
//! learning-rate schedule, random-resized crops, a weight on the clean half, and keeping the epoch
//! with the best validation restoration accuracy instead of the last.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use std::collections::BTreeMap;

use base64::Engine as _;
use burn::module::{Module, ModuleMapper, Param, ParamId};
use burn::optim::{AdamConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::{Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use serde_json::json;

use super::Defense;
use super::fru::Regenerate;
use super::synthetic::Synthesizer;
use crate::classifier::{argmax, label_tensor, load_batch, logits_rows};
use crate::data::Dataset;
use crate::data::epoch_order;
use crate::error::{Result, SfrError};
use crate::metrics;
use crate::perturbation::{self, Perturbation};
use crate::zoo::{Model, NoTap, Record};

/// The training objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Loss {
    /// The paper's: the backbone's softmax cross-entropy on the labels (or, with
    /// `pseudo_labels`, on the clean predictions), for clean and perturbed images alike.
    Ce,
    /// Cross-entropy against the undefended network's softmax on the clean image (soft
    /// targets), for the clean image and for its perturbed version: the units learn to give back
    /// the clean network's output, and leave clean images as they were. Needs no labels.
    Distill,
    /// Mean squared error between the logits and the undefended network's logits on the clean
    /// image, for the clean image and its perturbed version. Needs no labels.
    Logits,
}

/// The learning-rate schedule over the whole run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// The same rate throughout.
    Constant,
    /// Cosine decay from the rate to zero over all steps of all epochs.
    Cosine,
}

impl Schedule {
    /// The rate at `step` of `total` steps for base rate `lr`.
    pub fn rate(self, lr: f64, step: usize, total: usize) -> f64 {
        match self {
            Schedule::Constant => lr,
            Schedule::Cosine => {
                let t = step as f64 / total.max(1) as f64;
                0.5 * lr * (1.0 + (std::f64::consts::PI * t.min(1.0)).cos())
            }
        }
    }
}

/// Training parameters.
#[derive(Debug, Clone, Serialize)]
pub struct TrainConfig {
    /// Passes over the training images.
    pub epochs: usize,
    /// Images per mini-batch (half clean, half perturbed).
    pub batch_size: usize,
    /// Adam learning rate.
    pub lr: f64,
    /// Synthesise training perturbations from the real ones (the paper's method).
    pub synthetic: bool,
    /// Train on the clean predictions instead of the labels.
    pub pseudo_labels: bool,
    /// The objective.
    pub loss: Loss,
    /// Random horizontal flips, per image.
    pub augment: bool,
    /// Random-resized crops (per image, resized back to the input size) covering at least this
    /// fraction of the image's area; 1 turns them off.
    pub crop_scale: f64,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Keep the epoch with the best validation restoration accuracy instead of the last one.
    pub keep_best: bool,
    /// Weight of the clean half of each mini-batch in the loss (the perturbed half weighs 1).
    pub clean_weight: f64,
    /// Seed.
    pub seed: u64,
    /// Clip perturbed pixels to [0, 255].
    pub clip: bool,
    /// Universal adversarial training (`--method uat`): the sign step (0–255 scale) that
    /// moves its perturbation after each mini-batch ([`UAT_STEP`] when unset).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub uat_step: Option<f64>,
    /// A gated defence (`--gate`): weight of the switches' supervision in the loss, the mean
    /// binary cross-entropy of every unit's switch against "shut" on the clean half and "open"
    /// on the perturbed half of each mini-batch. Unset: the switches learn from the task loss
    /// alone.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub gate_loss: Option<f64>,
    /// Weight of the feature loss (`--feature-loss`): per unit, the squared error between its
    /// regenerated channels and the same channels of the undefended network on the clean
    /// image, relative to their mean square, averaged over units; for the clean half and the
    /// perturbed half of each mini-batch alike. Unset or 0: none (the paper's objective alone).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub feature_loss: Option<f64>,
}

/// The weight of the switches' supervision that `sfr defend --gate` uses unless told.
pub const GATE_LOSS: f64 = 1.0;

/// The sign step of universal adversarial training's perturbation per mini-batch, on the
/// 0–255 scale: a hundredth of the usual ℓ∞ budget of 10, so that the perturbation crosses the
/// ball in a hundred batches and the network can follow it. Measured on MobileNetV2 (issue 15's
/// protocol, seed 0): restoration 0.813 with 0.1, 0.747 with 1 (README).
pub const UAT_STEP: f64 = 0.1;

/// Adam's learning rate for universal adversarial training: the backbone's weights are
/// fine-tuned, not trained from scratch, so it is a hundredth of the FRUs' rate.
pub const UAT_LR: f64 = 1e-5;

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 4,
            batch_size: 16,
            lr: 1e-3,
            synthetic: true,
            pseudo_labels: false,
            loss: Loss::Ce,
            augment: true,
            crop_scale: 1.0,
            schedule: Schedule::Constant,
            keep_best: false,
            clean_weight: 1.0,
            seed: 0,
            clip: true,
            uat_step: None,
            gate_loss: None,
            feature_loss: None,
        }
    }
}

impl TrainConfig {
    /// Fail with a sentence on an impossible parameter.
    pub fn validate(&self) -> Result<()> {
        if self.epochs == 0 {
            return Err(SfrError::param("--epochs", "must be at least 1"));
        }
        if self.batch_size < 2 {
            return Err(SfrError::param(
                "--batch-size",
                "must be at least 2 (half clean, half perturbed)",
            ));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(SfrError::param(
                "--lr",
                format!("must be positive, got {}", self.lr),
            ));
        }
        if !(self.clean_weight > 0.0 && self.clean_weight.is_finite()) {
            return Err(SfrError::param(
                "--clean-weight",
                format!("must be positive, got {}", self.clean_weight),
            ));
        }
        if let Some(step) = self.uat_step
            && !(step > 0.0 && step.is_finite())
        {
            return Err(SfrError::param(
                "--uat-step",
                format!("must be positive, got {step}"),
            ));
        }
        if let Some(w) = self.gate_loss
            && !(w >= 0.0 && w.is_finite())
        {
            return Err(SfrError::param(
                "--gate-loss",
                format!("must be zero or positive, got {w}"),
            ));
        }
        if let Some(w) = self.feature_loss
            && !(w >= 0.0 && w.is_finite())
        {
            return Err(SfrError::param(
                "--feature-loss",
                format!("must be zero or positive, got {w}"),
            ));
        }
        if !(self.crop_scale > 0.0 && self.crop_scale <= 1.0) {
            return Err(SfrError::param(
                "--crop-scale",
                format!(
                    "must be in (0, 1] (the smallest fraction of the image a crop covers), got {}",
                    self.crop_scale
                ),
            ));
        }
        Ok(())
    }
}

/// One random-resized crop of a C×S×S image (square crop of at least `min_area` of the area,
/// at a random place, bilinearly resized back to S×S), mirrored when `flip`.
fn crop_flip(
    img: &[f32],
    size: usize,
    min_area: f64,
    flip: bool,
    rng: &mut ChaCha8Rng,
) -> Vec<f32> {
    let area = if min_area < 1.0 {
        rng.random_range(min_area..=1.0)
    } else {
        1.0
    };
    let side = ((area.sqrt() * size as f64).round() as usize).clamp(1, size);
    let x0 = rng.random_range(0..=size - side) as f64;
    let y0 = rng.random_range(0..=size - side) as f64;
    let scale = side as f64 / size as f64;
    let mut out = vec![0f32; img.len()];
    let plane = size * size;
    for oy in 0..size {
        // Pixel centres map onto the crop (align_corners = false).
        let sy = (y0 + (oy as f64 + 0.5) * scale - 0.5).clamp(0.0, (size - 1) as f64);
        let (y1, fy) = (sy.floor() as usize, sy - sy.floor());
        let y2 = (y1 + 1).min(size - 1);
        for ox in 0..size {
            let dx = if flip { size - 1 - ox } else { ox };
            let sx = (x0 + (dx as f64 + 0.5) * scale - 0.5).clamp(0.0, (size - 1) as f64);
            let (x1, fx) = (sx.floor() as usize, sx - sx.floor());
            let x2 = (x1 + 1).min(size - 1);
            for c in 0..img.len() / plane {
                let p = &img[c * plane..(c + 1) * plane];
                let top = p[y1 * size + x1] as f64 * (1.0 - fx) + p[y1 * size + x2] as f64 * fx;
                let bot = p[y2 * size + x1] as f64 * (1.0 - fx) + p[y2 * size + x2] as f64 * fx;
                out[c * plane + oy * size + ox] = (top * (1.0 - fy) + bot * fy) as f32;
            }
        }
    }
    out
}

/// Progress of training.
#[derive(Debug, Clone, Serialize)]
pub struct TrainProgress {
    /// Epoch (1-based).
    pub epoch: usize,
    /// Images done in the epoch.
    pub done: usize,
    /// Images per epoch.
    pub total: usize,
    /// Loss of the last batch (`None` in the report that closes an epoch).
    pub loss: Option<f64>,
    /// Mean batch loss of the epoch so far.
    pub mean_loss: Option<f64>,
    /// Validation restoration accuracy after the last finished epoch.
    pub val_restoration: Option<f64>,
}

/// Validation: restoration accuracy of the defence on `val` with the real perturbations.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Validation {
    /// Undefended clean top-1.
    pub baseline_clean_top1: f64,
    /// Defended clean top-1.
    pub defended_clean_top1: f64,
    /// Defended perturbed top-1.
    pub defended_perturbed_top1: f64,
    /// Restoration accuracy.
    pub restoration_accuracy: f64,
    /// A gated defence (`--gate`): per unit, the mean switch on the clean images.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub gate_clean: Option<Vec<f64>>,
    /// A gated defence: per unit, the mean switch on the perturbed images.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub gate_perturbed: Option<Vec<f64>>,
}

/// Measure the defence on `val`, each image perturbed by one of `uaps` in turn; for an
/// unlabelled image the undefended clean prediction stands in for the label.
pub fn validate(
    model: &Model,
    defense: &mut Defense,
    val: &Dataset,
    uaps: &[Perturbation],
    clip: bool,
    bs: usize,
) -> Result<Validation> {
    let (mut n, mut base, mut dc, mut dp) = (0usize, 0usize, 0usize, 0usize);
    let (mut gate_clean, mut gate_pert) = (Vec::<f64>::new(), Vec::<f64>::new());
    let stack: Vec<Tensor<4>> = uaps.iter().map(|p| p.to_tensor(model.device())).collect();
    for (ci, chunk) in val.samples.chunks(bs).enumerate() {
        let (batch, _) = load_batch(model, chunk, false)?;
        let Some(b) = batch else { continue };
        let v = stack[ci % stack.len()].clone();
        let clean = logits_rows(model.forward_pixels(b.pixels.clone(), &mut NoTap))?;
        let (dclean, gc) = defense.forward_pixels_gates(model, b.pixels.clone())?;
        let dclean = logits_rows(dclean)?;
        let (dpert, gp) =
            defense.forward_pixels_gates(model, perturbation::apply(b.pixels, v, clip))?;
        let dpert = logits_rows(dpert)?;
        for (sum, open) in [(&mut gate_clean, gc), (&mut gate_pert, gp)] {
            sum.resize(open.len(), 0.0);
            for (s, o) in sum.iter_mut().zip(open) {
                *s += o.iter().map(|&v| v as f64).sum::<f64>();
            }
        }
        for (i, s) in b.samples.iter().enumerate() {
            // Unlabelled images (pseudo-label training): the clean prediction stands in.
            let l = s.label.unwrap_or_else(|| argmax(&clean[i]));
            n += 1;
            base += usize::from(argmax(&clean[i]) == l);
            dc += usize::from(argmax(&dclean[i]) == l);
            dp += usize::from(argmax(&dpert[i]) == l);
        }
    }
    if n == 0 {
        return Err(SfrError::NoImages(
            "no validation image could be read".into(),
        ));
    }
    let r = |k| k as f64 / n as f64;
    Ok(Validation {
        baseline_clean_top1: r(base),
        defended_clean_top1: r(dc),
        defended_perturbed_top1: r(dp),
        restoration_accuracy: metrics::restoration_accuracy(r(dc), r(dp), r(base)),
        gate_clean: (!gate_clean.is_empty())
            .then(|| gate_clean.iter().map(|s| s / n as f64).collect()),
        gate_perturbed: (!gate_pert.is_empty())
            .then(|| gate_pert.iter().map(|s| s / n as f64).collect()),
    })
}

/// Train `defense` in place. With `checkpoint`, the defence is saved after every epoch (the
/// epoch count in its metadata) and `resume` continues from it.
#[allow(clippy::too_many_arguments)]
pub fn train(
    model: &Model,
    defense: &mut Defense,
    train: &Dataset,
    val: &Dataset,
    uaps: &[Perturbation],
    cfg: &TrainConfig,
    checkpoint: Option<&Path>,
    progress: &mut dyn FnMut(&TrainProgress),
) -> Result<Vec<Validation>> {
    cfg.validate()?;
    if cfg.keep_best && val.samples.is_empty() {
        return Err(SfrError::param(
            "--keep-best",
            "needs validation images (--val > 0) to pick the best epoch",
        ));
    }
    defense.check_backbone(model)?;
    if uaps.is_empty() {
        return Err(SfrError::param(
            "--uap",
            "training needs at least one perturbation",
        ));
    }
    let size = model.spec().input_size;
    for p in uaps {
        p.check_size(size, "a training perturbation")?;
    }
    if train.samples.is_empty() {
        return Err(SfrError::NoImages("no training images".into()));
    }
    let dev = model.device().clone();
    let adev = dev.clone().autodiff();
    let set: Vec<Vec<f32>> = uaps.iter().map(|p| p.data.clone()).collect();
    let synth = Synthesizer::new(&set)?;
    let start_epoch = defense
        .meta
        .training
        .get("epochs_done")
        .and_then(|v| v.as_u64())
        .unwrap_or(0) as usize;
    let mut history: Vec<Validation> = serde_json::from_value(
        defense
            .meta
            .training
            .get("validation")
            .cloned()
            .unwrap_or(json!([])),
    )
    .unwrap_or_default();
    if start_epoch >= cfg.epochs && defense.meta.training.get("selected_epoch").is_some() {
        // The checkpoint of a finished run, killed before its output was written: it holds
        // the selected epoch's weights already.
        if let Some(bp) = checkpoint.map(best_path).filter(|bp| bp.exists()) {
            std::fs::remove_file(&bp).map_err(|e| SfrError::io(&bp, e))?;
        }
        return Ok(history);
    }
    let mut frus = renumber(std::mem::take(&mut defense.frus).to_device(&adev).train());
    // Adam's moments and step count continue from the checkpoint: with the weights, the BN
    // statistics and the per-epoch RNG and order (functions of the seed and the epoch), a
    // resumed run ends bit-identical to an uninterrupted one.
    let mut optim = AdamConfig::new().init();
    if let (true, Some(path)) = (start_epoch > 0, checkpoint) {
        optim = load_optimizer(optim, path)?;
    }
    // The best epoch so far: (epoch, validation restoration, its weights). A resumed run finds
    // it beside the checkpoint (written before the checkpoint, so never older than it).
    let mut best: Option<(usize, f64, super::fru::FruSet, super::fru::BnStats)> = None;
    if let (true, Some(path)) = (cfg.keep_best, checkpoint) {
        let bp = best_path(path);
        if start_epoch == 0 {
            if bp.exists() {
                std::fs::remove_file(&bp).map_err(|e| SfrError::io(&bp, e))?;
            }
        } else if bp.is_file() {
            let d = Defense::load(&bp, model, &dev)?;
            let t = &d.meta.training;
            let epoch = t.get("epochs_done").and_then(|v| v.as_u64()).unwrap_or(0) as usize;
            let score = t
                .get("validation")
                .and_then(|v| v.as_array())
                .and_then(|v| v.last())
                .and_then(|v| v.get("restoration_accuracy"))
                .and_then(|v| v.as_f64())
                .ok_or_else(|| {
                    SfrError::param(
                        "--resume",
                        format!("{} holds no validation result", bp.display()),
                    )
                })?;
            best = Some((epoch, score, d.frus, d.stats));
        }
    }
    let placements = defense.placements();
    let unit_sites: Vec<String> = placements.iter().map(|p| p.site.clone()).collect();
    let feature_weight = cfg.feature_loss.filter(|&w| w > 0.0);
    if feature_weight.is_some() && placements.is_empty() {
        return Err(SfrError::param(
            "--feature-loss",
            "it trains units to give back the clean features; this defence has none (universal adversarial training)",
        ));
    }
    // Universal adversarial training: its perturbation starts as the first training
    // perturbation (ℓ∞) and moves by sign steps within that ball; a resumed run finds it in
    // the checkpoint.
    let uat = defense.meta.method == super::Method::Uat;
    let uat_eps = uaps[0].meta.eps as f32;
    if uat {
        if uaps[0].meta.norm != perturbation::Norm::Linf {
            return Err(SfrError::param(
                "--uap",
                "universal adversarial training keeps its perturbation in an ℓ∞ ball: the first --uap must be an ℓ∞ perturbation",
            ));
        }
        if defense.uat_perturbation.is_empty() {
            defense.uat_perturbation = uaps[0].data.clone();
        }
    }
    let uat_step = cfg.uat_step.unwrap_or(UAT_STEP) as f32;
    let steps_per_epoch = train.samples.len().div_ceil(cfg.batch_size);
    let t0 = Instant::now();
    for epoch in start_epoch..cfg.epochs {
        let mut rng =
            ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_mul(7919).wrapping_add(epoch as u64));
        let order = epoch_order(train.samples.len(), cfg.seed, epoch);
        let mut done = 0;
        let (mut loss_sum, mut batches) = (0.0, 0usize);
        for idx in order.chunks(cfg.batch_size) {
            let samples: Vec<_> = idx.iter().map(|&i| train.samples[i].clone()).collect();
            done += samples.len();
            let (batch, _) = load_batch(model, &samples, false)?;
            let Some(b) = batch else { continue };
            let n = b.samples.len();
            if n < 2 {
                continue;
            }
            let mut x = b.pixels;
            if cfg.augment || cfg.crop_scale < 1.0 {
                let flat = x.into_data().try_into_vec::<f32>().map_err(|e| {
                    SfrError::param("training batch", format!("unreadable pixels: {e:?}"))
                })?;
                let per = 3 * size * size;
                let mut aug = Vec::with_capacity(flat.len());
                for img in flat.chunks(per) {
                    let flip = cfg.augment && rng.random::<bool>();
                    aug.extend(crop_flip(img, size, cfg.crop_scale, flip, &mut rng));
                }
                x = Tensor::from_data(TensorData::new(aug, [n, 3, size, size]), &dev);
            }
            // Targets of the label-free losses: the undefended network on the clean images (its
            // softmax for `distill`, its logits for `logits`); and, for the feature loss, its
            // outputs at the units' sites.
            // Without the feature loss the recorder wants no site (a plain pass, as `NoTap`).
            let mut clean_sites = Record::new(if feature_weight.is_some() {
                &unit_sites
            } else {
                &[]
            });
            clean_sites.keep_input = feature_weight.is_some();
            let undefended = (cfg.loss != Loss::Ce || feature_weight.is_some())
                .then(|| model.forward_pixels(x.clone(), &mut clean_sites));
            let teacher = match (cfg.loss, undefended) {
                (Loss::Distill, Some(logits)) => Some(burn::tensor::activation::softmax(logits, 1)),
                (Loss::Logits, Some(logits)) => Some(logits),
                _ => None,
            };
            let labels: Vec<usize> = if teacher.is_some() {
                Vec::new()
            } else if cfg.pseudo_labels {
                logits_rows(model.forward_pixels(x.clone(), &mut NoTap))?
                    .iter()
                    .map(|r| argmax(r))
                    .collect()
            } else {
                match b
                    .samples
                    .iter()
                    .map(|s| s.label)
                    .collect::<Option<Vec<_>>>()
                {
                    Some(l) => l,
                    None => {
                        return Err(SfrError::param(
                            "--pseudo-labels",
                            "some training images have no label; use --pseudo-labels",
                        ));
                    }
                }
            };
            let half = n / 2;
            // UAT: the second half perturbed by its own perturbation, a leaf whose gradient
            // gives the next sign step.
            let (xp, uat_leaf) = if uat {
                let v = Tensor::<4>::from_data(
                    TensorData::new(defense.uat_perturbation.clone(), [1, 3, size, size]),
                    &adev,
                )
                .require_grad();
                let clean = x.clone().narrow(0, 0, half).autodiff();
                let pert = perturbation::apply(
                    x.narrow(0, half, n - half).autodiff(),
                    v.clone(),
                    cfg.clip,
                );
                (Tensor::cat(vec![clean, pert], 0), Some(v))
            } else {
                (perturb_second_half(x, cfg, &synth, &set, &mut rng), None)
            };
            let mut tap = Regenerate::new(
                &frus,
                &placements,
                &mut defense.stats,
                true,
                &defense.meta.tuned,
            );
            if feature_weight.is_some() {
                tap = tap.keeping_outputs();
            }
            let logits = model.forward_pixels(xp, &mut tap);
            if tap.visited != placements.len() + defense.meta.tuned.len() {
                return Err(SfrError::param(
                    "defense",
                    "not every FRU site or tuned conv was visited",
                ));
            }
            // Per-image losses, the clean half weighted by `clean_weight`.
            let per_image: Tensor<2> = match (teacher, cfg.loss) {
                (Some(t), Loss::Logits) => (logits - t.autodiff()).powi_scalar(2).mean_dim(1),
                (Some(t), _) => (burn::tensor::activation::log_softmax(logits, 1) * t.autodiff())
                    .sum_dim(1)
                    .neg(),
                (None, _) => burn::tensor::activation::log_softmax(logits, 1)
                    .gather(1, label_tensor(&labels, &adev))
                    .neg(),
            };
            let w: Vec<f32> = (0..n)
                .map(|i| {
                    if i < half {
                        cfg.clean_weight as f32
                    } else {
                        1.0
                    }
                })
                .collect();
            let total: f32 = w.iter().sum();
            let w = Tensor::<2>::from_data(TensorData::new(w, [n, 1]), &adev);
            let mut loss = (per_image * w).sum().div_scalar(total);
            if let Some(gw) = cfg.gate_loss.filter(|&gw| gw > 0.0) {
                // Supervised switches: shut (0) on the clean half, open (1) on the perturbed.
                let t: Vec<f32> = (0..n).map(|i| if i < half { 0.0 } else { 1.0 }).collect();
                let t = Tensor::<2>::from_data(TensorData::new(t, [n, 1]), &adev);
                let units = tap.switches.len();
                if let Some(bce) = tap
                    .switches
                    .drain(..)
                    .map(|(_, z)| super::fru::switch_bce(z, t.clone()).mean())
                    .reduce(|a, b| a + b)
                {
                    loss = loss + bce.div_scalar(units as f64).mul_scalar(gw);
                }
            }
            if let Some(fw) = feature_weight {
                let units = tap.outputs.len();
                let mut sum: Option<Tensor<1>> = None;
                for (i, y) in tap.outputs.drain(..) {
                    let p = &placements[i];
                    let clean = if p.site == super::fru::INPUT_SITE {
                        clean_sites.input.clone()
                    } else {
                        clean_sites.get(&p.site).cloned()
                    }
                    .ok_or_else(|| {
                        SfrError::param(
                            "--feature-loss",
                            format!("the undefended pass did not reach site {}", p.site),
                        )
                    })?;
                    let t = crate::engine::gather_channels(clean, &Arc::new(p.regen.clone()));
                    let term = super::fru::regeneration_error(y, t);
                    sum = Some(match sum {
                        Some(s) => s + term,
                        None => term,
                    });
                }
                if let Some(f) = sum {
                    loss = loss + f.div_scalar(units as f64).mul_scalar(fw);
                }
            }
            let loss_value = loss.clone().into_scalar::<f32>() as f64;
            if !loss_value.is_finite() {
                return Err(SfrError::param(
                    "training",
                    format!("the loss became {loss_value}; lower --lr"),
                ));
            }
            let grads = loss.backward();
            if let Some(v) = uat_leaf {
                // Ascent on the same loss: δ ← clip(δ + step · sign ∇δ, −ε, ε).
                let g = v.grad(&grads).ok_or_else(|| {
                    SfrError::param("training", "no gradient reached the UAT perturbation")
                })?;
                let g = g.into_data().try_into_vec::<f32>().map_err(|e| {
                    SfrError::param("training", format!("unreadable gradient: {e:?}"))
                })?;
                for (d, gi) in defense.uat_perturbation.iter_mut().zip(g) {
                    let s = if gi > 0.0 {
                        1.0
                    } else if gi < 0.0 {
                        -1.0
                    } else {
                        0.0
                    };
                    *d = (*d + uat_step * s).clamp(-uat_eps, uat_eps);
                }
            }
            let gp = GradientsParams::from_grads(grads, &frus);
            let step = epoch * steps_per_epoch + (done - 1) / cfg.batch_size;
            let lr = cfg
                .schedule
                .rate(cfg.lr, step, cfg.epochs * steps_per_epoch);
            frus = optim.step(lr, frus, gp);
            loss_sum += loss_value;
            batches += 1;
            progress(&TrainProgress {
                epoch: epoch + 1,
                done,
                total: train.samples.len(),
                loss: Some(loss_value),
                mean_loss: Some(loss_sum / batches as f64),
                val_restoration: history.last().map(|v| v.restoration_accuracy),
            });
        }
        defense.frus = frus.valid();
        let v = if val.samples.is_empty() {
            None
        } else {
            Some(validate(
                model,
                defense,
                val,
                uaps,
                cfg.clip,
                cfg.batch_size.max(16),
            )?)
        };
        frus = renumber(std::mem::take(&mut defense.frus).to_device(&adev).train());
        let v_ra = v.as_ref().map(|v| v.restoration_accuracy);
        if let Some(v) = v {
            history.push(v);
        }
        defense.meta.training = json!({
            "config": cfg,
            "epochs_done": epoch + 1,
            "train_images": train.samples.len(),
            "train_data": train.sources,
            "val_images": val.samples.len(),
            "uaps": uaps.iter().map(|p| p.meta.source.clone().unwrap_or_else(|| format!("{} {} ξ={}", p.meta.attack, p.meta.norm, p.meta.eps))).collect::<Vec<_>>(),
            "validation": history,
            "seconds": t0.elapsed().as_secs_f64(),
        });
        progress(&TrainProgress {
            epoch: epoch + 1,
            done: train.samples.len(),
            total: train.samples.len(),
            loss: None,
            mean_loss: (batches > 0).then(|| loss_sum / batches as f64),
            val_restoration: history.last().map(|v| v.restoration_accuracy),
        });
        let improved =
            cfg.keep_best && v_ra.is_some_and(|ra| best.as_ref().is_none_or(|b| ra > b.1));
        if checkpoint.is_some() || improved {
            defense.frus = frus.valid();
            if improved {
                if let Some(path) = checkpoint {
                    defense.save(&best_path(path))?;
                }
                best = Some((
                    epoch + 1,
                    history.last().map_or(0.0, |v| v.restoration_accuracy),
                    defense.frus.clone(),
                    defense.stats.clone(),
                ));
            }
            if let Some(path) = checkpoint {
                defense.save_with(path, optimizer_meta(&optim)?)?;
            }
            frus = renumber(std::mem::take(&mut defense.frus).to_device(&adev).train());
        }
    }
    defense.frus = frus.valid();
    let mut selected = defense
        .meta
        .training
        .get("epochs_done")
        .and_then(|v| v.as_u64())
        .unwrap_or(0) as usize;
    if let Some((epoch, _, f, st)) = best
        && epoch != selected
    {
        defense.frus = f;
        defense.stats = st;
        selected = epoch;
    }
    defense.meta.training["selected_epoch"] = json!(selected);
    defense.meta.training["selection_rule"] = json!(if cfg.keep_best {
        "best validation restoration accuracy"
    } else {
        "last epoch"
    });
    if let Some(path) = checkpoint {
        // The finished state goes into the checkpoint before the best epoch's file goes: a run
        // killed from here on resumes to exactly this result.
        defense.save(path)?;
        let bp = best_path(path);
        if bp.exists() {
            std::fs::remove_file(&bp).map_err(|e| SfrError::io(&bp, e))?;
        }
    }
    Ok(history)
}

/// The batch with its second half perturbed, each image by a training perturbation (a synthetic
/// one drawn from the real ones, or with `cfg.synthetic` off a real one at random).
fn perturb_second_half(
    x: Tensor<4>,
    cfg: &TrainConfig,
    synth: &Synthesizer,
    set: &[Vec<f32>],
    rng: &mut ChaCha8Rng,
) -> Tensor<4> {
    let [n, c, h, w] = x.dims();
    let per = c * h * w;
    let mut vs = vec![0f32; n * per];
    for i in n / 2..n {
        let v = if cfg.synthetic {
            synth.draw(rng)
        } else {
            set[rng.random_range(0..set.len())].clone()
        };
        vs[i * per..(i + 1) * per].copy_from_slice(&v);
    }
    let v = Tensor::from_data(TensorData::new(vs, [n, c, h, w]), &x.device());
    perturbation::apply(x, v, cfg.clip)
}

/// Ids of the FRUs' parameters in a training run: fixed, in visit order (a loaded defence
/// gets fresh random ids), so that the optimiser state saved in a checkpoint, which is keyed by
/// parameter id, finds its parameters again in a resumed run.
const PARAM_ID_BASE: u64 = 0x5f52_5500_0000;

fn renumber(frus: super::fru::FruSet) -> super::fru::FruSet {
    struct Renumber(u64);
    impl ModuleMapper for Renumber {
        fn map_float<const D: usize>(&mut self, mut p: Param<Tensor<D>>) -> Param<Tensor<D>> {
            p.id = ParamId::from(PARAM_ID_BASE + self.0);
            self.0 += 1;
            p
        }
    }
    frus.map(&mut Renumber(0))
}

/// The checkpoint metadata key holding Adam's state (burn's record bytes, base64).
const OPTIMIZER_KEY: &str = "sfr_optimizer";

fn optimizer_meta(optim: &ModuleOptimizer) -> Result<BTreeMap<String, String>> {
    let bytes = optim.into_bytes().map_err(|e| {
        SfrError::param(
            "training",
            format!("cannot record the optimiser state: {e:?}"),
        )
    })?;
    Ok(BTreeMap::from([(
        OPTIMIZER_KEY.to_string(),
        base64::engine::general_purpose::STANDARD.encode(&*bytes),
    )]))
}

/// Adam's state from a checkpoint (one written before sfr kept it restarts Adam).
fn load_optimizer(optim: ModuleOptimizer, path: &Path) -> Result<ModuleOptimizer> {
    let meta = crate::weights::read_safetensors_metadata(path)?;
    let Some(text) = meta.get(OPTIMIZER_KEY) else {
        return Ok(optim);
    };
    let bad = |why: String| {
        SfrError::param(
            "--resume",
            format!("{}: unreadable optimiser state: {why}", path.display()),
        )
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| bad(e.to_string()))?;
    optim
        .from_bytes(burn::tensor::Bytes::from_bytes_vec(bytes))
        .map_err(|e| bad(format!("{e:?}")))
}

/// Where the best epoch's weights are kept next to a checkpoint.
fn best_path(checkpoint: &Path) -> std::path::PathBuf {
    let mut p = checkpoint.as_os_str().to_owned();
    p.push(".best");
    p.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_schedule_runs_from_the_rate_to_zero() {
        let r = |s| Schedule::Cosine.rate(1e-3, s, 100);
        assert!((r(0) - 1e-3).abs() < 1e-12);
        assert!((r(50) - 5e-4).abs() < 1e-12);
        assert!(r(100).abs() < 1e-12);
        assert!((1..100).all(|s| r(s) < r(s - 1)), "strictly decreasing");
        assert_eq!(Schedule::Constant.rate(1e-3, 77, 100), 1e-3);
    }

    #[test]
    fn full_crops_copy_or_mirror_and_partial_crops_interpolate() {
        let size = 8;
        let img: Vec<f32> = (0..3 * size * size).map(|i| i as f32).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        assert_eq!(crop_flip(&img, size, 1.0, false, &mut rng), img);
        let m = crop_flip(&img, size, 1.0, true, &mut rng);
        for c in 0..3 {
            for y in 0..size {
                for x in 0..size {
                    let i = c * size * size + y * size;
                    assert_eq!(m[i + x], img[i + size - 1 - x]);
                }
            }
        }
        // A crop is a zoom: values stay within the source's range and change.
        let z = crop_flip(&img, size, 0.3, false, &mut rng);
        assert_ne!(z, img);
        let (lo, hi) = (0.0, (3 * size * size - 1) as f32);
        assert!(z.iter().all(|v| (lo..=hi).contains(v)));
    }
}
