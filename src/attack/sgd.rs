//! SGD-UAP / sPGD (Shafahi et al. AAAI 2020; Mummadi et al. ICCV 2019): one δ shared by a
//! mini-batch; loss = mean over the batch of min(CE(f(x+δ), ŷ), β) with ŷ the clean prediction
//! (clamping stops already-fooled images from dominating); ℓ∞: δ ← clip(δ + step·sign(∇δ), ±ξ);
//! ℓ2: δ ← proj(δ + step·ξ·∇δ/‖∇δ‖₂); the step decays geometrically per epoch.

use burn::tensor::{Tensor, TensorData};
use serde::Serialize;
use serde_json::json;

use super::{
    Progress, RunContext, ascent_step, base_meta, finish, load_checkpoint, save_checkpoint,
    tensor_values,
};
use crate::classifier::{clean_predictions, fooling_rate, label_tensor, load_batch};
use crate::data::epoch_order;
use crate::error::{Result, SfrError};
use crate::perturbation::{self, Perturbation};

/// Parameters of SGD-UAP.
#[derive(Debug, Clone, Serialize)]
pub struct SgdConfig {
    /// Passes over the training images.
    pub epochs: usize,
    /// First step, as a fraction of ξ (ℓ∞: per-pixel sign step; ℓ2: step along the normalised gradient).
    pub step: f64,
    /// Step multiplier per epoch.
    pub decay: f64,
    /// Cross-entropy clamp β.
    pub beta: f64,
    /// Stop once the held-out fooling rate reaches this (checked after each epoch).
    pub target_fooling_rate: f64,
}

impl Default for SgdConfig {
    fn default() -> Self {
        SgdConfig {
            epochs: 6,
            step: 0.1,
            decay: 0.8,
            beta: 10.0,
            target_fooling_rate: 1.0,
        }
    }
}

impl SgdConfig {
    /// Fail with a sentence on an impossible parameter.
    pub fn validate(&self) -> Result<()> {
        if self.epochs == 0 {
            return Err(SfrError::param("--epochs", "must be at least 1"));
        }
        if !(self.step > 0.0 && self.step.is_finite()) {
            return Err(SfrError::param(
                "--step",
                format!("must be positive, got {}", self.step),
            ));
        }
        if !(self.decay > 0.0 && self.decay <= 1.0) {
            return Err(SfrError::param(
                "--decay",
                format!("must be in (0, 1], got {}", self.decay),
            ));
        }
        if self.beta.is_nan() || self.beta <= 0.0 {
            return Err(SfrError::param(
                "--beta",
                format!("must be positive, got {}", self.beta),
            ));
        }
        if !(0.0..=1.0).contains(&self.target_fooling_rate) {
            return Err(SfrError::param(
                "--target-fooling-rate",
                "must be in [0, 1]",
            ));
        }
        Ok(())
    }

    fn fingerprint(&self, ctx: &RunContext) -> String {
        format!(
            "sgd|{}|{}|{}|{}|{}|{}|{}|{}|{:?}|{}",
            ctx.model.spec().name,
            ctx.defense
                .map(|d| format!("through defence {}", d.id()))
                .unwrap_or_default(),
            ctx.norm,
            ctx.eps,
            ctx.seed,
            ctx.batch_size,
            ctx.train.samples.len(),
            ctx.clip,
            (self.step, self.decay, self.beta),
            self.epochs
        )
    }
}

/// Run SGD-UAP.
pub fn run(cfg: &SgdConfig, ctx: &mut RunContext) -> Result<Perturbation> {
    cfg.validate()?;
    perturbation::check_eps(ctx.norm, ctx.eps)?;
    let model = ctx.model;
    let size = model.spec().input_size;
    let dev = model.device().clone();
    let adev = dev.clone().autodiff();
    let fp = cfg.fingerprint(ctx);
    let target = ctx.target()?;

    let mut delta = vec![0f32; 3 * size * size];
    let mut start_epoch = 0;
    let mut holdout_fr = None;
    if let (true, Some(path)) = (ctx.resume, &ctx.checkpoint)
        && let Some(c) = load_checkpoint(path, &fp)?
    {
        delta = c.delta;
        start_epoch = c.epochs_done;
        holdout_fr = c.holdout_fooling_rate;
    }

    let train = &ctx.train.samples;
    let hold = &ctx.holdout.samples;
    let bs = ctx.batch_size;
    let clean_train = clean_predictions(&target, train, bs, |d| {
        (ctx.progress)(&Progress {
            phase: "clean predictions (train)".into(),
            done: d,
            total: train.len(),
            loss: None,
            holdout_fooling_rate: None,
        })
    })?;
    let clean_hold = clean_predictions(&target, hold, bs, |_| {})?;

    let mut epochs_run = start_epoch;
    for epoch in start_epoch..cfg.epochs {
        if holdout_fr.is_some_and(|f| f >= cfg.target_fooling_rate) {
            break;
        }
        let step = cfg.step * ctx.eps * cfg.decay.powi(epoch as i32);
        let order = epoch_order(train.len(), ctx.seed, epoch);
        let mut done = 0;
        for idx in order.chunks(bs) {
            let samples: Vec<_> = idx.iter().map(|&i| train[i].clone()).collect();
            let (batch, _) = load_batch(model, &samples, false)?;
            done += idx.len();
            let Some(b) = batch else { continue };
            // Labels: the clean prediction of each image that loaded.
            let mut labels = Vec::new();
            let mut keep = Vec::new();
            for (row, s) in b.samples.iter().enumerate() {
                if let Some(pos) = samples.iter().position(|t| t.path == s.path)
                    && let Some(l) = clean_train[idx[pos]]
                {
                    labels.push(l);
                    keep.push(row as i64);
                }
            }
            if labels.is_empty() {
                continue;
            }
            let mut x = b.pixels;
            if keep.len() != b.samples.len() {
                let k = Tensor::from_data(TensorData::new(keep.clone(), [keep.len()]), &dev);
                x = x.select(0, k);
            }
            let d: Tensor<4> =
                Tensor::from_data(TensorData::new(delta.clone(), [1, 3, size, size]), &adev)
                    .require_grad();
            let xp = perturbation::apply(x.autodiff(), d.clone(), ctx.clip);
            let logits = target.logits_grad(xp);
            let logp = burn::tensor::activation::log_softmax(logits, 1);
            let y = label_tensor(&labels, &adev);
            let ce = logp.gather(1, y).neg().clamp_max(cfg.beta);
            let loss = ce.mean();
            let loss_value = loss.clone().into_scalar::<f32>() as f64;
            let grads = loss.backward();
            let g = d
                .grad(&grads)
                .ok_or_else(|| SfrError::param("attack", "no gradient reached the perturbation"))?;
            let cur: Tensor<4> =
                Tensor::from_data(TensorData::new(delta.clone(), [1, 3, size, size]), &dev);
            delta = tensor_values(ascent_step(cur, g, ctx.norm, step, ctx.eps))?;
            (ctx.progress)(&Progress {
                phase: format!("epoch {}/{}", epoch + 1, cfg.epochs),
                done,
                total: train.len(),
                loss: Some(loss_value),
                holdout_fooling_rate: holdout_fr,
            });
        }
        let dt: Tensor<4> =
            Tensor::from_data(TensorData::new(delta.clone(), [1, 3, size, size]), &dev);
        holdout_fr = Some(fooling_rate(&target, hold, &clean_hold, &dt, ctx.clip, bs)?);
        epochs_run = epoch + 1;
        (ctx.progress)(&Progress {
            phase: format!("epoch {}/{}", epoch + 1, cfg.epochs),
            done: train.len(),
            total: train.len(),
            loss: None,
            holdout_fooling_rate: holdout_fr,
        });
        if let Some(path) = &ctx.checkpoint {
            save_checkpoint(
                path,
                &super::Checkpoint {
                    delta: delta.clone(),
                    epochs_done: epoch + 1,
                    holdout_fooling_rate: holdout_fr,
                },
                size,
                &fp,
                &[],
            )?;
        }
    }
    let mut meta = base_meta(
        ctx,
        "sgd",
        json!({
            "epochs": cfg.epochs,
            "epochs_run": epochs_run,
            "step": cfg.step,
            "decay": cfg.decay,
            "beta": cfg.beta,
            "batch_size": ctx.batch_size,
            "target_fooling_rate": cfg.target_fooling_rate,
            "labels": "clean predictions",
        }),
    );
    meta.fooling_rate = holdout_fr;
    meta.fooling_rate_n = Some(hold.len());
    finish(delta, size, meta)
}
