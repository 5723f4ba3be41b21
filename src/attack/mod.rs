//! Universal attacks: one perturbation for every image.
//!
//! Every attack validates its parameters before any work, reports progress with a running
//! fooling-rate estimate on a held-out slice of the data (label change against the clean
//! prediction), stops by a stated rule, and repeats exactly from its seed. `sgd` and `deepfool`
//! checkpoint after each epoch and, inside one, every [`RunContext::checkpoint_every`] of wall
//! time, at a batch boundary with the whole state (the perturbation, the position in the epoch's
//! order, the running counts), so a run killed at any moment and resumed ends exactly where an
//! uninterrupted one does.

pub mod activations;
pub mod deepfool;
pub mod random;
pub mod sgd;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use burn::tensor::Tensor;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

/// The classifier an attack runs through (the bare network or the defended one).
pub use crate::classifier::Classifier as Target;
use crate::classifier::{Classifier, FruGradient, InputFilter, Plant};
pub use crate::classifier::{argmax, clean_predictions, fooling_rate};
use crate::data::Dataset;
pub use crate::data::epoch_order;
use crate::error::{Result, SfrError};
use crate::perturbation::{self, Norm, Perturbation, PerturbationMeta};
use crate::weights::{self, RawTensor, TensorMap};
use crate::zoo::Model;

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
    /// Inside an epoch, write a checkpoint at the first batch boundary this long after the last
    /// one (zero: after every batch; [`CHECKPOINT_EVERY`] by default).
    pub checkpoint_every: Duration,
    /// Progress callback.
    pub progress: &'a mut dyn FnMut(&Progress),
    /// Attack the network with this defence in place (the adaptive attack; `sgd` only).
    pub defense: Option<&'a dyn Plant>,
    /// Attack the network behind this image-domain filter, straight through it (BPDA; `sgd`
    /// only).
    pub filter: Option<&'a dyn InputFilter>,
}

impl<'a> RunContext<'a> {
    /// What the attack differentiates through: the bare network, or the defended one.
    pub fn target(&self) -> Result<Classifier<'a>> {
        self.target_with(FruGradient::Exact)
    }

    /// [`RunContext::target`] with the given gradient through the defence's units.
    pub fn target_with(&self, gradient: FruGradient) -> Result<Classifier<'a>> {
        match (self.defense, self.filter) {
            (Some(_), Some(_)) => Err(SfrError::param(
                "--defense",
                "one defence at a time: FRUs or an image-domain filter",
            )),
            (Some(d), None) => Classifier::defended_with(self.model, d, gradient),
            (None, Some(f)) => Classifier::filtered(self.model, f),
            (None, None) => Ok(Classifier::plain(self.model)),
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

/// A perturbation tensor's values.
pub fn tensor_values(t: Tensor<4>) -> Result<Vec<f32>> {
    t.into_data().try_into_vec::<f32>().map_err(|e| {
        SfrError::param(
            "perturbation",
            format!("could not read back the tensor: {e:?}"),
        )
    })
}

/// How often `sgd` and `deepfool` checkpoint inside an epoch by default.
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(60);

/// Says when the next checkpoint inside an epoch is due.
pub struct CheckpointClock {
    last: Instant,
    every: Duration,
}

impl CheckpointClock {
    /// A clock that first fires `every` from now.
    pub fn new(every: Duration) -> Self {
        CheckpointClock {
            last: Instant::now(),
            every,
        }
    }

    /// Whether a checkpoint is due (and if so, restart the interval).
    pub fn due(&mut self) -> bool {
        if self.last.elapsed() >= self.every {
            self.last = Instant::now();
            true
        } else {
            false
        }
    }
}

/// A checkpoint: the perturbation so far, the epochs done and the position in the next one.
pub struct Checkpoint {
    /// `[3, h, w]` values.
    pub delta: Vec<f32>,
    /// Epochs completed.
    pub epochs_done: usize,
    /// Progress in epoch `epochs_done` (the attack's unit: `sgd` batches, `deepfool` images of
    /// the pass's order); 0 at an epoch boundary.
    pub position: usize,
    /// Last held-out fooling rate.
    pub holdout_fooling_rate: Option<f64>,
    /// `sgd --momentum`: the accumulated gradient, `[3, h, w]` values.
    pub velocity: Option<Vec<f32>>,
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
    if let Some(v) = &c.velocity {
        map.insert(
            "velocity",
            RawTensor {
                shape: vec![3, size, size],
                data: v.clone(),
            },
        );
    }
    let mut meta = std::collections::BTreeMap::new();
    meta.insert("epochs_done".into(), c.epochs_done.to_string());
    meta.insert("position".into(), c.position.to_string());
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
    // Checkpoints written before mid-epoch ones existed are at an epoch boundary.
    let position = match meta.get("position") {
        None => 0,
        Some(v) => v.parse().map_err(|_| {
            SfrError::param(
                "--resume",
                format!("{}: position `{v}` is not a count", path.display()),
            )
        })?,
    };
    let velocity = map.get("velocity").map(|t| t.data.clone());
    if velocity.as_ref().is_some_and(|v| v.len() != delta.len()) {
        return Err(SfrError::param(
            "--resume",
            format!(
                "{}: `velocity` has another size than `delta`",
                path.display()
            ),
        ));
    }
    Ok(Some(Checkpoint {
        delta,
        epochs_done,
        position,
        holdout_fooling_rate,
        velocity,
    }))
}

/// Metadata common to every attack's result.
pub fn base_meta(ctx: &RunContext, attack: &str, params: serde_json::Value) -> PerturbationMeta {
    let mut m = PerturbationMeta::new(attack, ctx.norm, ctx.eps);
    m.params = params;
    if let Some(d) = ctx.defense {
        // The adaptive attack: record what it was computed through.
        m.params["through_defense"] = d.describe();
    }
    if let Some(f) = ctx.filter {
        m.params["through_filter"] = f.describe();
        m.params["filter_gradient"] = "straight-through (BPDA)".into();
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
