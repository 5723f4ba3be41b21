//! SGD-UAP / sPGD (Shafahi et al. AAAI 2020; Mummadi et al. ICCV 2019): one δ shared by a
//! mini-batch; loss = mean over the batch of min(CE(f(x+δ), ŷ), β) with ŷ the clean prediction
//! (clamping stops already-fooled images from dominating); ℓ∞: δ ← clip(δ + step·sign(∇δ), ±ξ);
//! ℓ2: δ ← proj(δ + step·ξ·∇δ/‖∇δ‖₂); the step decays geometrically per epoch. With momentum μ
//! (MI-FGSM, Dong et al. CVPR 2018) the step follows v ← μ·v + ∇δ/mean|∇δ| in place of ∇δ, so
//! each step averages about 1/(1 − μ) batches; with mirroring, each training image is flipped
//! left–right with probability ½, so that δ must fool both views of it.
//!
//! Options a stronger or a different attacker needs: a margin (CW-style) loss in place of the
//! cross-entropy, a random start, restarts from several seeds keeping the best on the held-out
//! slice, and targeted UAPs (`target`: one δ that sends images to a chosen class; the loss is
//! then the target's log-probability, or its logit margin, and the held-out figure the targeted
//! success rate).
//!
//! Defaults (10 epochs, first step 0.1·ξ, ×0.9 per epoch, β = 10, batch 16, momentum 0.95,
//! training images mirrored at random), measured from `imagenet-sample` (fooling rate on
//! nips17, ℓ∞ 10): on EfficientNet-Lite1, the weakest zoo family, plain sign steps reached
//! 0.864 (batch 32: 0.850; batch 8: 0.850; margin loss: 0.812; 20 epochs: 0.873); mirroring
//! 0.879; momentum 0.9 0.891; both 0.894 (15 epochs: 0.908); momentum 0.95 with mirroring
//! 0.916. The README has the table and the other families.

use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{
    CheckpointClock, Progress, RunContext, ascent_step, base_meta, finish, load_checkpoint,
    save_checkpoint, tensor_values,
};
use crate::classifier::{Classifier, FruGradient};
use crate::classifier::{clean_predictions, fooling_rate, label_tensor, load_batch};
use crate::data::epoch_order;
use crate::error::{Result, SfrError};
use crate::perturbation::{self, Perturbation};

/// Images per batch (one sign step each) `sfr attack sgd` uses by default; see the module docs.
pub const BATCH_SIZE: usize = 16;

/// The momentum `sfr attack sgd` uses by default; see the module docs.
pub const MOMENTUM: f64 = 0.95;

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
    /// Stop once the held-out fooling rate (targeted: success rate) reaches this (checked after
    /// each epoch).
    pub target_fooling_rate: f64,
    /// The loss ascended.
    pub loss: SgdLoss,
    /// Targeted UAP: send images to this class.
    pub target: Option<usize>,
    /// Start from uniform noise in the ξ-ball's bounding box instead of δ = 0.
    pub random_start: bool,
    /// Runs from seeds seed, seed+1, …; the best on the held-out slice is kept.
    pub restarts: usize,
    /// Through a defence: how the gradient passes its units (straight through: BPDA).
    pub fru_gradient: FruGradient,
    /// Momentum μ (MI-FGSM, Dong et al. CVPR 2018): the step follows v ← μ·v + ∇/mean|∇|
    /// instead of the batch's gradient alone; 0 is plain SGD-UAP.
    pub momentum: f64,
    /// Mirror each training image left–right with probability ½ (seeded per epoch and batch),
    /// so that δ must fool both views.
    pub flip: bool,
}

/// The loss SGD-UAP ascends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SgdLoss {
    /// min(CE(f(x+δ), y), β) (targeted: −CE(f(x+δ), t)).
    #[default]
    Ce,
    /// CW margin: min(max_{k≠y} z_k − z_y, β) on the logits z (targeted:
    /// min(z_t − max_{k≠t} z_k, β)).
    Margin,
}

impl Default for SgdConfig {
    fn default() -> Self {
        SgdConfig {
            epochs: 10,
            step: 0.1,
            decay: 0.9,
            beta: 10.0,
            target_fooling_rate: 1.0,
            loss: SgdLoss::Ce,
            target: None,
            random_start: false,
            restarts: 1,
            fru_gradient: FruGradient::Exact,
            momentum: MOMENTUM,
            flip: true,
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
        if !(0.0..1.0).contains(&self.momentum) {
            return Err(SfrError::param(
                "--momentum",
                format!("must be in [0, 1), got {}", self.momentum),
            ));
        }
        if self.restarts == 0 {
            return Err(SfrError::param("--restarts", "must be at least 1"));
        }
        Ok(())
    }

    /// Fail when the target class is not one of the model's.
    pub fn check_target(&self, classes: usize) -> Result<()> {
        match self.target {
            Some(t) if t >= classes => Err(SfrError::param(
                "--target",
                format!(
                    "class {t} does not exist: the model has classes 0–{}",
                    classes - 1
                ),
            )),
            _ => Ok(()),
        }
    }

    fn fingerprint(&self, ctx: &RunContext, seed: u64) -> String {
        format!(
            "sgd|{}|{}|{}|{}|{}|{}|{}|{}|{:?}|{}|{:?}|{:?}",
            ctx.model.spec().name,
            ctx.defense
                .map(|d| format!("through defence {}", d.id()))
                .or(ctx.filter.map(|f| format!("through filter {}", f.id())))
                .unwrap_or_default(),
            ctx.norm,
            ctx.eps,
            seed,
            ctx.batch_size,
            ctx.train.samples.len(),
            ctx.clip,
            (self.step, self.decay, self.beta),
            self.epochs,
            (self.loss, self.target, self.random_start, self.fru_gradient),
            (self.momentum, self.flip)
        )
    }
}

/// The number of classes `target` scores (one forward pass of a blank image).
fn classes(target: &Classifier) -> usize {
    let s = target.model.spec().input_size;
    let z = Tensor::<4>::zeros([1, 3, s, s], target.model.device());
    target.logits(z).dims()[1]
}

/// Clean predictions of the training and held-out images (the attack's labels).
struct Clean<'c> {
    train: &'c [Option<usize>],
    hold: &'c [Option<usize>],
}

/// One restart's outcome.
struct Outcome {
    delta: Vec<f32>,
    /// Held-out fooling rate (targeted: success rate).
    score: Option<f64>,
    epochs_run: usize,
}

/// Run SGD-UAP (`restarts` runs from consecutive seeds; the best on the held-out slice is kept).
pub fn run(cfg: &SgdConfig, ctx: &mut RunContext) -> Result<Perturbation> {
    cfg.validate()?;
    perturbation::check_eps(ctx.norm, ctx.eps)?;
    // What the attack differentiates through, planted once for every restart and epoch.
    let target = ctx.target_with(cfg.fru_gradient)?;
    cfg.check_target(classes(&target))?;
    if cfg.restarts > 1 && ctx.holdout.samples.is_empty() {
        return Err(SfrError::param(
            "--restarts",
            "restarts keep the best on the held-out slice, and there is none (--holdout 0)",
        ));
    }
    let size = ctx.model.spec().input_size;
    // Labels: the target's clean predictions, the same for every restart.
    let train = &ctx.train.samples;
    let clean_train = clean_predictions(&target, train, ctx.batch_size, |d| {
        (ctx.progress)(&Progress {
            phase: "clean predictions (train)".into(),
            done: d,
            total: train.len(),
            loss: None,
            holdout_fooling_rate: None,
        })
    })?;
    let clean_hold = clean_predictions(&target, &ctx.holdout.samples, ctx.batch_size, |_| {})?;
    let clean = Clean {
        train: &clean_train,
        hold: &clean_hold,
    };
    let mut best: Option<(u64, Outcome)> = None;
    let mut scores = Vec::new();
    for r in 0..cfg.restarts {
        let seed = ctx.seed.wrapping_add(r as u64);
        // Restart k > 0 checkpoints next to the first one, so a resumed run skips finished ones.
        let ckpt = ctx.checkpoint.as_ref().map(|p| {
            if r == 0 {
                p.clone()
            } else {
                let mut s = p.as_os_str().to_owned();
                s.push(format!(".restart{r}"));
                s.into()
            }
        });
        let out = run_once(cfg, ctx, &target, &clean, seed, ckpt.as_deref(), r)?;
        scores.push(out.score);
        if best
            .as_ref()
            .is_none_or(|(_, b)| out.score.unwrap_or(-1.0) > b.score.unwrap_or(-1.0))
        {
            best = Some((seed, out));
        }
    }
    let (seed, best) = best.expect("at least one restart");
    let holdout_key = if cfg.target.is_some() {
        "holdout_targeted_success_rate"
    } else {
        "holdout_fooling_rate"
    };
    let mut meta = base_meta(
        ctx,
        "sgd",
        json!({
            "epochs": cfg.epochs,
            "epochs_run": best.epochs_run,
            "step": cfg.step,
            "decay": cfg.decay,
            "beta": cfg.beta,
            "loss": cfg.loss,
            "target": cfg.target,
            "random_start": cfg.random_start,
            "restarts": cfg.restarts,
            "momentum": cfg.momentum,
            "flip": cfg.flip,
            "fru_gradient": match cfg.fru_gradient {
                FruGradient::Exact => "exact",
                FruGradient::StraightThrough => "straight-through (BPDA)",
            },
            "restart_seeds_from": ctx.seed,
            "best_seed": seed,
            format!("{holdout_key}_per_restart"): scores,
            "batch_size": ctx.batch_size,
            "target_fooling_rate": cfg.target_fooling_rate,
            "labels": "clean predictions",
        }),
    );
    if cfg.target.is_some() {
        meta.params["holdout_targeted_success_rate"] = json!(best.score);
        meta.params["targeted_success_rate_definition"] = json!(
            "fraction of held-out images whose clean prediction is not the target that the perturbation sends to the target"
        );
        meta.fooling_rate = None;
    } else {
        meta.fooling_rate = best.score;
    }
    meta.fooling_rate_n = Some(ctx.holdout.samples.len());
    finish(best.delta, size, meta)
}

/// The per-image objective ascended, `[n, 1]`.
fn objective(cfg: &SgdConfig, logits: Tensor<2>, labels: &[usize]) -> Tensor<2> {
    let adev = logits.device();
    let [n, k] = logits.dims();
    // The class whose score the loss is about: the clean label (untargeted) or the target.
    let cls: Vec<usize> = match cfg.target {
        Some(t) => vec![t; n],
        None => labels.to_vec(),
    };
    let y = label_tensor(&cls, &adev);
    let sign = if cfg.target.is_some() { -1.0 } else { 1.0 };
    match cfg.loss {
        SgdLoss::Ce => {
            let ce = burn::tensor::activation::log_softmax(logits, 1)
                .gather(1, y)
                .neg();
            if cfg.target.is_some() {
                ce.neg()
            } else {
                ce.clamp_max(cfg.beta)
            }
        }
        SgdLoss::Margin => {
            let mut onehot = vec![0f32; n * k];
            for (i, &c) in cls.iter().enumerate() {
                onehot[i * k + c] = 1e9;
            }
            let mask = Tensor::<2>::from_data(TensorData::new(onehot, [n, k]), &adev);
            let zy = logits.clone().gather(1, y);
            let other = (logits - mask).max_dim(1);
            // Untargeted: best other class over the label; targeted: the target over the best other.
            (other - zy).mul_scalar(sign).clamp_max(cfg.beta)
        }
    }
}

/// Held-out score of `delta`: the fooling rate, or (targeted) the success rate.
fn score(
    cfg: &SgdConfig,
    ctx: &RunContext,
    target: &Classifier,
    clean_hold: &[Option<usize>],
    delta: &[f32],
) -> Result<Option<f64>> {
    let hold = &ctx.holdout.samples;
    if hold.is_empty() {
        return Ok(None);
    }
    let size = ctx.model.spec().input_size;
    let dt: Tensor<4> = Tensor::from_data(
        TensorData::new(delta.to_vec(), [1, 3, size, size]),
        ctx.model.device(),
    );
    Ok(Some(match cfg.target {
        Some(t) => {
            crate::classifier::targeted_success_rate(
                target,
                hold,
                clean_hold,
                &dt,
                t,
                ctx.clip,
                ctx.batch_size,
            )?
            .0
        }
        None => fooling_rate(target, hold, clean_hold, &dt, ctx.clip, ctx.batch_size)?,
    }))
}

/// Mirror each image of `x` left–right with probability ½, the coin seeded by (seed, epoch,
/// batch) so that a resumed run flips the same images.
fn flip_some(x: Tensor<4>, seed: u64, epoch: usize, batch: usize) -> Tensor<4> {
    use rand::{Rng, SeedableRng};
    let n = x.dims()[0];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
        seed ^ 0x666c_6970 ^ ((epoch as u64) << 40) ^ ((batch as u64) << 20),
    );
    let coins: Vec<f32> = (0..n)
        .map(|_| if rng.random_bool(0.5) { 1.0 } else { 0.0 })
        .collect();
    let m = Tensor::<4>::from_data(TensorData::new(coins, [n, 1, 1, 1]), &x.device());
    let mirrored = x.clone().flip([3]);
    x.clone() + (mirrored - x).mul(m)
}

fn run_once(
    cfg: &SgdConfig,
    ctx: &mut RunContext,
    target: &Classifier,
    clean: &Clean,
    seed: u64,
    checkpoint: Option<&std::path::Path>,
    restart: usize,
) -> Result<Outcome> {
    let model = ctx.model;
    let size = model.spec().input_size;
    let dev = model.device().clone();
    let adev = dev.clone().autodiff();
    let fp = cfg.fingerprint(ctx, seed);

    let mut delta = vec![0f32; 3 * size * size];
    if cfg.random_start {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x7261_6e64);
        let e = ctx.eps as f32;
        for d in delta.iter_mut() {
            *d = rng.random_range(-e..=e);
        }
        let t = Tensor::<4>::from_data(TensorData::new(delta, [1, 3, size, size]), &dev);
        delta = tensor_values(perturbation::project(t, ctx.norm, ctx.eps))?;
    }
    let (mut start_epoch, mut start_batch) = (0, 0);
    let mut holdout_fr = None;
    // The accumulated gradient (--momentum), zero at the start.
    let mut velocity = (cfg.momentum > 0.0).then(|| vec![0f32; delta.len()]);
    if let (true, Some(path)) = (ctx.resume, checkpoint)
        && let Some(c) = load_checkpoint(path, &fp)?
    {
        delta = c.delta;
        if velocity.is_some() {
            velocity = Some(c.velocity.ok_or_else(|| {
                SfrError::param(
                    "--resume",
                    format!("{} holds no `velocity`", path.display()),
                )
            })?);
        }
        start_epoch = c.epochs_done;
        start_batch = c.position;
        holdout_fr = c.holdout_fooling_rate;
    }
    let mut clock = CheckpointClock::new(ctx.checkpoint_every);
    let save = |delta: &[f32], velocity: &Option<Vec<f32>>, epochs_done, position, holdout_fr| {
        match checkpoint {
            Some(path) => save_checkpoint(
                path,
                &super::Checkpoint {
                    delta: delta.to_vec(),
                    epochs_done,
                    position,
                    holdout_fooling_rate: holdout_fr,
                    velocity: velocity.clone(),
                },
                size,
                &fp,
                &[],
            ),
            None => Ok(()),
        }
    };

    let train = &ctx.train.samples;
    let bs = ctx.batch_size;
    let label = if cfg.restarts > 1 {
        format!("restart {}/{}, ", restart + 1, cfg.restarts)
    } else {
        String::new()
    };

    let mut epochs_run = start_epoch;
    for epoch in start_epoch..cfg.epochs {
        if holdout_fr.is_some_and(|f| f >= cfg.target_fooling_rate) {
            break;
        }
        let step = cfg.step * ctx.eps * cfg.decay.powi(epoch as i32);
        let order = epoch_order(train.len(), seed, epoch);
        // A run resumed inside this epoch skips the batches its checkpoint had done.
        let skip = if epoch == start_epoch { start_batch } else { 0 };
        for (bi, idx) in order.chunks(bs).enumerate().skip(skip) {
            if bi > skip && clock.due() {
                save(&delta, &velocity, epoch, bi, holdout_fr)?;
            }
            let samples: Vec<_> = idx.iter().map(|&i| train[i].clone()).collect();
            let (batch, _) = load_batch(model, &samples, false)?;
            let done = bi * bs + idx.len();
            let Some(b) = batch else { continue };
            // Labels: the clean prediction of each image that loaded (targeted: images already
            // predicted as the target are left out).
            let mut labels = Vec::new();
            let mut keep = Vec::new();
            for (row, s) in b.samples.iter().enumerate() {
                if let Some(pos) = samples.iter().position(|t| t.path == s.path)
                    && let Some(l) = clean.train[idx[pos]]
                    && cfg.target != Some(l)
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
            if cfg.flip {
                x = flip_some(x, seed, epoch, bi);
            }
            let d: Tensor<4> =
                Tensor::from_data(TensorData::new(delta.clone(), [1, 3, size, size]), &adev)
                    .require_grad();
            let xp = perturbation::apply(x.autodiff(), d.clone(), ctx.clip);
            let logits = target.logits_grad(xp);
            let loss = objective(cfg, logits, &labels).mean();
            let loss_value = loss.clone().into_scalar::<f32>() as f64;
            let grads = loss.backward();
            let g = d
                .grad(&grads)
                .ok_or_else(|| SfrError::param("attack", "no gradient reached the perturbation"))?;
            let g = match velocity.as_mut() {
                None => g,
                Some(v) => {
                    // v ← μ·v + g/mean|g| (a zero gradient leaves v as it was, decayed).
                    let m = g.clone().abs().mean().into_scalar::<f32>();
                    let prev = Tensor::<4>::from_data(
                        TensorData::new(std::mem::take(v), [1, 3, size, size]),
                        &dev,
                    )
                    .mul_scalar(cfg.momentum);
                    let next = if m > 0.0 {
                        prev + g.div_scalar(m)
                    } else {
                        prev
                    };
                    *v = tensor_values(next.clone())?;
                    next
                }
            };
            let cur: Tensor<4> =
                Tensor::from_data(TensorData::new(delta.clone(), [1, 3, size, size]), &dev);
            delta = tensor_values(ascent_step(cur, g, ctx.norm, step, ctx.eps))?;
            (ctx.progress)(&Progress {
                phase: format!("{label}epoch {}/{}", epoch + 1, cfg.epochs),
                done,
                total: train.len(),
                loss: Some(loss_value),
                holdout_fooling_rate: holdout_fr,
            });
        }
        holdout_fr = score(cfg, ctx, target, clean.hold, &delta)?;
        epochs_run = epoch + 1;
        (ctx.progress)(&Progress {
            phase: format!("{label}epoch {}/{}", epoch + 1, cfg.epochs),
            done: train.len(),
            total: train.len(),
            loss: None,
            holdout_fooling_rate: holdout_fr,
        });
        save(&delta, &velocity, epoch + 1, 0, holdout_fr)?;
    }
    if holdout_fr.is_none() {
        holdout_fr = score(cfg, ctx, target, clean.hold, &delta)?;
    }
    Ok(Outcome {
        delta,
        score: holdout_fr,
        epochs_run,
    })
}
