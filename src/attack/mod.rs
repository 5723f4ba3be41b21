//! Universal attacks: one perturbation for every image.
//!
//! Every attack validates its parameters before any work, reports progress with a running
//! fooling-rate estimate on a held-out slice of the data (label change against the clean
//! prediction), stops by a stated rule, checkpoints after each epoch (resumable), and repeats
//! exactly from its seed.

pub mod activations;
pub mod deepfool;
pub mod random;
pub mod sgd;

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::{Int, Tensor, TensorData};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::data::{Dataset, Sample};
use crate::defense::Defense;
use crate::defense::fru::{BnStats, FruSet, Placement, Regenerate};
use crate::error::{Result, SfrError};
use crate::eval::{load_batch, logits_rows};
use crate::perturbation::{self, Norm, Perturbation, PerturbationMeta};
use crate::weights::{self, RawTensor, TensorMap};
use crate::zoo::{Model, NoTap};

/// What an attack reports as it goes.
#[derive(Debug, Clone, Serialize)]
pub struct Progress {
    /// Phase (`clean predictions`, `epoch 2/5`, …).
    pub phase: String,
    /// Images done in this phase.
    pub done: usize,
    /// Images in this phase.
    pub total: usize,
    /// Mean loss of the last batch, if the attack has one.
    pub loss: Option<f64>,
    /// Fooling rate on the held-out slice, when last measured.
    pub holdout_fooling_rate: Option<f64>,
}

/// Shared settings of a run.
pub struct RunContext<'a> {
    /// The model attacked.
    pub model: &'a Model,
    /// Images the attack learns from.
    pub train: &'a Dataset,
    /// Held-out images for the running fooling-rate estimate.
    pub holdout: &'a Dataset,
    /// Norm of the budget.
    pub norm: Norm,
    /// Budget ξ on the 0–255 scale.
    pub eps: f64,
    /// Seed of every random choice.
    pub seed: u64,
    /// Clip perturbed pixels to [0, 255].
    pub clip: bool,
    /// Images per batch.
    pub batch_size: usize,
    /// Where to write checkpoints (none: no checkpoints).
    pub checkpoint: Option<PathBuf>,
    /// Continue from the checkpoint if there is one.
    pub resume: bool,
    /// Progress callback.
    pub progress: &'a mut dyn FnMut(&Progress),
    /// Attack the network with this defence in place (the adaptive attack; `sgd` only).
    pub defense: Option<&'a Defense>,
}

impl<'a> RunContext<'a> {
    /// What the attack differentiates through: the bare network, or the defended one.
    pub fn target(&self) -> Result<Target<'a>> {
        match self.defense {
            Some(d) => Target::defended(self.model, d),
            None => Ok(Target::plain(self.model)),
        }
    }
}

/// The classifier an attack sees: a zoo model, optionally with a trained defence in front of
/// its layers (frozen: an attack through it never changes the defence).
pub struct Target<'a> {
    /// The backbone.
    pub model: &'a Model,
    defended: Option<FrozenDefense>,
}

struct FrozenDefense {
    plain: FruSet,
    grad: FruSet,
    placements: Vec<Placement>,
    stats: BnStats,
}

impl<'a> Target<'a> {
    /// The bare network.
    pub fn plain(model: &'a Model) -> Self {
        Target {
            model,
            defended: None,
        }
    }

    /// The network with `defense` in place (inference mode; the units get no gradients).
    pub fn defended(model: &'a Model, defense: &Defense) -> Result<Self> {
        defense.check_backbone(model)?;
        let adev = model.device().clone().autodiff();
        Ok(Target {
            model,
            defended: Some(FrozenDefense {
                plain: defense.frus.clone(),
                grad: defense.frus.clone().to_device(&adev).no_grad(),
                placements: defense.placements(),
                stats: defense.stats.clone(),
            }),
        })
    }

    /// Whether a defence is in place.
    pub fn is_defended(&self) -> bool {
        self.defended.is_some()
    }

    /// Logits for pixels on the 0–255 scale (no gradient).
    pub fn logits(&self, pixels: Tensor<4>) -> Tensor<2> {
        self.forward(pixels, false)
    }

    /// Logits for pixels on the autodiff device (gradients reach the input).
    pub fn logits_grad(&self, pixels: Tensor<4>) -> Tensor<2> {
        self.forward(pixels, true)
    }

    fn forward(&self, pixels: Tensor<4>, grad: bool) -> Tensor<2> {
        match &self.defended {
            None => self.model.forward_pixels(pixels, &mut NoTap),
            Some(d) => {
                let mut stats = d.stats.clone();
                let mut tap = Regenerate {
                    frus: if grad { &d.grad } else { &d.plain },
                    placements: &d.placements,
                    stats: &mut stats,
                    training: false,
                    visited: 0,
                };
                self.model.forward_pixels(pixels, &mut tap)
            }
        }
    }
}

/// Split `ds` into (train, holdout) with `n_holdout` images chosen by `seed`.
pub fn split_holdout(ds: &Dataset, n_holdout: usize, seed: u64) -> Result<(Dataset, Dataset)> {
    if ds.samples.is_empty() {
        return Err(SfrError::NoImages("the attack's data set is empty".into()));
    }
    if n_holdout >= ds.samples.len() {
        return Err(SfrError::param(
            "--holdout",
            format!(
                "{n_holdout} held-out images leave none of the {} to attack with",
                ds.samples.len()
            ),
        ));
    }
    let mut idx: Vec<usize> = (0..ds.samples.len()).collect();
    idx.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ 0x5f3759df));
    let (hold, train) = idx.split_at(n_holdout);
    let mut hold = hold.to_vec();
    let mut train = train.to_vec();
    hold.sort_unstable();
    train.sort_unstable();
    let pick = |v: &[usize]| Dataset {
        samples: v.iter().map(|&i| ds.samples[i].clone()).collect(),
        sources: ds.sources.clone(),
    };
    Ok((pick(&train), pick(&hold)))
}

/// Shuffled order of `n` items for `epoch`, from `seed`.
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut ChaCha8Rng::seed_from_u64(
        seed.wrapping_mul(1_000_003).wrapping_add(epoch as u64),
    ));
    idx
}

/// Clean top-1 predictions of `model` on `samples` (unreadable images: `None`).
pub fn clean_predictions(
    target: &Target,
    samples: &[Sample],
    batch_size: usize,
    mut progress: impl FnMut(usize),
) -> Result<Vec<Option<usize>>> {
    let mut out = Vec::with_capacity(samples.len());
    for (i, chunk) in samples.chunks(batch_size).enumerate() {
        let (batch, _) = load_batch(target.model, chunk, false)?;
        let mut preds = vec![None; chunk.len()];
        if let Some(b) = batch {
            let rows = logits_rows(target.logits(b.pixels))?;
            let mut k = 0;
            for (j, s) in chunk.iter().enumerate() {
                if k < b.samples.len() && b.samples[k].path == s.path {
                    preds[j] = Some(argmax(&rows[k]));
                    k += 1;
                }
            }
        }
        out.extend(preds);
        progress((i * batch_size + chunk.len()).min(samples.len()));
    }
    Ok(out)
}

/// Index of the largest value.
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best
}

/// Fooling rate of `delta` (`[1, 3, h, w]`) on `samples` whose clean predictions are `clean`:
/// the fraction of readable images whose top-1 label changes.
pub fn fooling_rate(
    target: &Target,
    samples: &[Sample],
    clean: &[Option<usize>],
    delta: &Tensor<4>,
    clip: bool,
    batch_size: usize,
) -> Result<f64> {
    let mut fooled = 0usize;
    let mut n = 0usize;
    for (ci, chunk) in samples.chunks(batch_size).enumerate() {
        let (batch, _) = load_batch(target.model, chunk, false)?;
        let Some(b) = batch else { continue };
        let x = perturbation::apply(b.pixels, delta.clone(), clip);
        let rows = logits_rows(target.logits(x))?;
        let mut k = 0;
        for (j, s) in chunk.iter().enumerate() {
            if k < b.samples.len() && b.samples[k].path == s.path {
                if let Some(c) = clean[ci * batch_size + j] {
                    n += 1;
                    if argmax(&rows[k]) != c {
                        fooled += 1;
                    }
                }
                k += 1;
            }
        }
    }
    if n == 0 {
        return Err(SfrError::NoImages("no held-out image could be read".into()));
    }
    Ok(fooled as f64 / n as f64)
}

/// One ascent step on a perturbation, projected back on the ξ-ball: ℓ∞ takes a sign step of
/// `step` per pixel, ℓ2 a step of length `step` along the gradient.
pub fn ascent_step(cur: Tensor<4>, grad: Tensor<4>, norm: Norm, step: f64, eps: f64) -> Tensor<4> {
    let next = match norm {
        Norm::Linf => cur + grad.sign().mul_scalar(step),
        Norm::L2 => {
            let n = grad.clone().powf_scalar(2.0).sum().into_scalar::<f32>() as f64;
            if n > 0.0 {
                cur + grad.mul_scalar(step / n.sqrt())
            } else {
                cur
            }
        }
    };
    perturbation::project(next, norm, eps)
}

/// Labels as an `[n, 1]` Int tensor.
pub fn label_tensor(labels: &[usize], device: &burn::tensor::Device) -> Tensor<2, Int> {
    let v: Vec<i64> = labels.iter().map(|&l| l as i64).collect();
    Tensor::from_data(TensorData::new(v, [labels.len(), 1]), device)
}

/// A perturbation tensor's values.
pub fn tensor_values(t: Tensor<4>) -> Result<Vec<f32>> {
    t.into_data().try_into_vec::<f32>().map_err(|e| {
        SfrError::param(
            "perturbation",
            format!("could not read back the tensor: {e:?}"),
        )
    })
}

/// A checkpoint: the perturbation so far and the number of epochs done.
pub struct Checkpoint {
    /// `[3, h, w]` values.
    pub delta: Vec<f32>,
    /// Epochs completed.
    pub epochs_done: usize,
    /// Last held-out fooling rate.
    pub holdout_fooling_rate: Option<f64>,
}

/// Write a checkpoint atomically; `extra` adds attack-specific metadata entries (read back with
/// `weights::read_safetensors_metadata`).
pub fn save_checkpoint(
    path: &Path,
    c: &Checkpoint,
    size: usize,
    fingerprint: &str,
    extra: &[(&str, String)],
) -> Result<()> {
    let mut map = TensorMap::new();
    map.insert(
        "delta",
        RawTensor {
            shape: vec![3, size, size],
            data: c.delta.clone(),
        },
    );
    let mut meta = std::collections::BTreeMap::new();
    meta.insert("epochs_done".into(), c.epochs_done.to_string());
    meta.insert(
        "holdout_fooling_rate".into(),
        c.holdout_fooling_rate
            .map(|f| f.to_string())
            .unwrap_or_default(),
    );
    meta.insert("fingerprint".into(), fingerprint.to_string());
    for (k, v) in extra {
        meta.insert(k.to_string(), v.clone());
    }
    weights::save_safetensors(&map, &meta, path)?;
    Ok(())
}

/// Read a checkpoint written for the same run (`fingerprint` names the attack, model and
/// parameters); a checkpoint of another run is an error, not silently used.
pub fn load_checkpoint(path: &Path, fingerprint: &str) -> Result<Option<Checkpoint>> {
    if !path.is_file() {
        return Ok(None);
    }
    let meta = weights::read_safetensors_metadata(path)?;
    if meta.get("fingerprint").map(String::as_str) != Some(fingerprint) {
        return Err(SfrError::param(
            "--resume",
            format!(
                "checkpoint {} belongs to another run (different attack, model, data or parameters); remove it or drop --resume",
                path.display()
            ),
        ));
    }
    let map = weights::load(path)?;
    let delta = map
        .get("delta")
        .ok_or_else(|| SfrError::param("--resume", format!("{} holds no `delta`", path.display())))?
        .data
        .clone();
    let epochs_done = meta
        .get("epochs_done")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| {
            SfrError::param("--resume", format!("{} lacks epochs_done", path.display()))
        })?;
    let holdout_fooling_rate = meta
        .get("holdout_fooling_rate")
        .and_then(|v| v.parse().ok());
    Ok(Some(Checkpoint {
        delta,
        epochs_done,
        holdout_fooling_rate,
    }))
}

/// Metadata common to every attack's result.
pub fn base_meta(ctx: &RunContext, attack: &str, params: serde_json::Value) -> PerturbationMeta {
    let mut m = PerturbationMeta::new(attack, ctx.norm, ctx.eps);
    m.params = params;
    if let Some(d) = ctx.defense {
        // The adaptive attack: record what it was computed through.
        m.params["through_defense"] = serde_json::json!({
            "id": d.id(),
            "sites": d.meta.sites,
            "selection": d.meta.selection,
            "training": d.meta.training.get("config"),
        });
    }
    m.model = Some(ctx.model.spec().name.to_string());
    m.data = ctx
        .train
        .sources
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    m.n_images = ctx.train.samples.len();
    m.seed = Some(ctx.seed);
    m.clip = ctx.clip;
    m
}

/// Build the final artefact from `[1, 3, h, w]` values, checking the budget.
pub fn finish(values: Vec<f32>, size: usize, meta: PerturbationMeta) -> Result<Perturbation> {
    let p = Perturbation::new(size, size, values, meta)?;
    p.check_budget()?;
    Ok(p)
}
