//! Training the FRUs: the backbone frozen (weights and batch-norm statistics), only the units
//! learn, with the backbone's own loss (softmax cross-entropy on labels, or on the clean
//! predictions with `pseudo_labels`), on mini-batches that are half clean and half perturbed by
//! a training perturbation (a real UAP or, by default, a synthetic one drawn from them).

use std::path::Path;
use std::time::Instant;

use burn::module::Module;
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use serde_json::json;

use super::Defense;
use super::fru::Regenerate;
use super::synthetic::Synthesizer;
use crate::attack::{argmax, epoch_order, label_tensor};
use crate::data::Dataset;
use crate::error::{Result, SfrError};
use crate::eval::{load_batch, logits_rows, metrics};
use crate::perturbation::{self, Perturbation};
use crate::zoo::{Model, NoTap};

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
    /// Random horizontal flips.
    pub augment: bool,
    /// Seed.
    pub seed: u64,
    /// Clip perturbed pixels to [0, 255].
    pub clip: bool,
}

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
            seed: 0,
            clip: true,
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
        Ok(())
    }
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
    /// Loss of the last batch.
    pub loss: Option<f64>,
    /// Validation restoration accuracy after the epoch.
    pub val_restoration: Option<f64>,
}

/// Validation: restoration accuracy of the defence on `val` with the real perturbations.
#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize)]
pub struct Validation {
    /// Undefended clean top-1.
    pub baseline_clean_top1: f64,
    /// Defended clean top-1.
    pub defended_clean_top1: f64,
    /// Defended perturbed top-1.
    pub defended_perturbed_top1: f64,
    /// Restoration accuracy.
    pub restoration_accuracy: f64,
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
    let stack: Vec<Tensor<4>> = uaps.iter().map(|p| p.to_tensor(model.device())).collect();
    for (ci, chunk) in val.samples.chunks(bs).enumerate() {
        let (batch, _) = load_batch(model, chunk, false)?;
        let Some(b) = batch else { continue };
        let v = stack[ci % stack.len()].clone();
        let clean = logits_rows(model.forward_pixels(b.pixels.clone(), &mut NoTap))?;
        let dclean = logits_rows(defense.forward_pixels(model, b.pixels.clone()))?;
        let dpert =
            logits_rows(defense.forward_pixels(model, perturbation::apply(b.pixels, v, clip)))?;
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
    let mut frus = std::mem::replace(&mut defense.frus, super::fru::FruSet { units: Vec::new() })
        .to_device(&adev)
        .train();
    let mut optim = AdamConfig::new().init();
    let placements = defense.placements();
    let t0 = Instant::now();
    for epoch in start_epoch..cfg.epochs {
        let mut rng =
            ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_mul(7919).wrapping_add(epoch as u64));
        let order = epoch_order(train.samples.len(), cfg.seed, epoch);
        let mut done = 0;
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
            if cfg.augment && rng.random::<bool>() {
                x = x.flip([3]);
            }
            // Soft targets of the distillation loss: the undefended network on the clean images.
            let teacher = if cfg.loss == Loss::Distill {
                let logits = model.forward_pixels(x.clone(), &mut NoTap);
                Some(burn::tensor::activation::softmax(logits, 1))
            } else {
                None
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
            // The second half of the batch is perturbed.
            let half = n / 2;
            let mut vs = vec![0f32; n * 3 * size * size];
            for i in half..n {
                let v = if cfg.synthetic {
                    synth.draw(&mut rng)
                } else {
                    set[rng.random_range(0..set.len())].clone()
                };
                vs[i * 3 * size * size..(i + 1) * 3 * size * size].copy_from_slice(&v);
            }
            let v = Tensor::from_data(TensorData::new(vs, [n, 3, size, size]), &dev);
            let xp = perturbation::apply(x, v, cfg.clip);
            let mut tap = Regenerate {
                frus: &frus,
                placements: &placements,
                stats: &mut defense.stats,
                training: true,
                visited: 0,
            };
            let logits = model.forward_pixels(xp, &mut tap);
            if tap.visited != placements.len() {
                return Err(SfrError::param("defense", "not every FRU site was visited"));
            }
            let logp = burn::tensor::activation::log_softmax(logits, 1);
            let loss = match teacher {
                Some(t) => (logp * t.autodiff()).sum_dim(1).neg().mean(),
                None => logp.gather(1, label_tensor(&labels, &adev)).neg().mean(),
            };
            let loss_value = loss.clone().into_scalar::<f32>() as f64;
            if !loss_value.is_finite() {
                return Err(SfrError::param(
                    "training",
                    format!("the loss became {loss_value}; lower --lr"),
                ));
            }
            let grads = loss.backward();
            let gp = GradientsParams::from_grads(grads, &frus);
            frus = optim.step(cfg.lr, frus, gp);
            progress(&TrainProgress {
                epoch: epoch + 1,
                done,
                total: train.samples.len(),
                loss: Some(loss_value),
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
        frus = std::mem::replace(&mut defense.frus, super::fru::FruSet { units: Vec::new() })
            .to_device(&adev)
            .train();
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
            val_restoration: history.last().map(|v| v.restoration_accuracy),
        });
        if let Some(path) = checkpoint {
            defense.frus = frus.valid();
            defense.save(path)?;
            frus = std::mem::replace(&mut defense.frus, super::fru::FruSet { units: Vec::new() })
                .to_device(&adev)
                .train();
        }
    }
    defense.frus = frus.valid();
    Ok(history)
}
