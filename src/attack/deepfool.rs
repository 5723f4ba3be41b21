//! UAP (Moosavi-Dezfooli et al., CVPR 2017): the original universal-perturbation algorithm with
//! DeepFool inner steps.
//!
//! v = 0; passes over the shuffled training images (order from [`super::epoch_order`]); every image
//! still labelled as clean (k(x+v) = k(x), k the clean prediction) gets DeepFool at x+v (top-10
//! candidate classes at the start of DeepFool, at most 10 iterations); if DeepFool converged (the
//! label changed within the iterations) its perturbation Δv is added to v and v is projected on
//! the ξ-ball (ℓ∞: clip; ℓ2: scale). A pass's training fooling rate is measured during the pass:
//! the fraction of visited images already fooled by v when visited. The attack stops once it
//! reaches 1−δ (δ = 0.2) or after 10 passes.
//!
//! DeepFool (reference code of the authors): with f the logits, l the label at x+v and k over the
//! other candidates, w_k = ∇f_k − ∇f_l, f'_k = f_k − f_l; pick k minimising |f'_k|/‖w_k‖₂, step
//! r = (|f'_k|/‖w_k‖₂ + 1e-4)·w_k/‖w_k‖₂, r_tot += r, x_i = x + (1+overshoot)·r_tot, until the label
//! of x_i differs from l; return (1+overshoot)·r_tot. Pixels are clipped to [0, 255] in every
//! forward pass when the run clips; gradients are taken at the clipped point.
//! [`StepNorm::Budget`] takes DeepFool's ℓp form instead (for ℓ∞: distances |f'|/‖w‖₁, steps
//! along sign(w)).
//!
//! **Overshoot.** The paper's overshoot 0.02 makes each Δv the minimal perturbation of its image:
//! far inside the ℓ∞ box (one pass over 100 imagenet-sample images on MobileNetV2 leaves ‖v‖₂ =
//! 524 of the box's 3880 and fools 11 % of 300 nips17 images, below random ±10 noise). ART's
//! `UniversalPerturbation` is stronger for a reason of its own: its DeepFool multiplies every step
//! by the clip range (255), an overshoot of 254 in effect, which fills the box at once (34 % on
//! the same images). Measured on that pass (ℓ2 steps, one image at a time): overshoot 1: 14 %,
//! 2: 19 %, 3: 26 %, 5: 32 %, 10: 35 %, 30: 37 %, 100: 38 %, 254: 33 %. Over many images the
//! order turns: two passes over all of imagenet-sample (900 images) fool 66.4 % of the 1000 nips17
//! images at overshoot 5, 39.7 % at 10 and 36.9 % at 30 (three passes): with a large overshoot
//! each image's step nearly replaces v, with a small one v accumulates what the images share. So
//! sfr's default is 5, and `exact()` (`--exact`) gives the paper's 0.02. Steps minimal in ℓ∞ are
//! weaker at every overshoot (15–21 %).
//!
//! **One image at a time** is the default, as in the original. Batched (`per_image: false`) the
//! pass takes the next B images that v does not fool yet, runs DeepFool on all of them at the
//! current v and adds their Δv's one after another: within a batch every image sees the same v.
//! That changes the result (24 % against 37 % at overshoot 30 on the pass above), so it is an
//! option for hardware where wide batches are cheap. The candidate-class gradients are computed
//! as rows (image, candidate class): the gradient of Σ_rows f_k − f_l is, row by row, w_k of that
//! image (images are independent in eval mode), so one backward serves a chunk of rows, the 9
//! candidates of an image included.

use std::path::Path;
use std::time::Instant;

use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{
    Checkpoint, CheckpointClock, Progress, RunContext, base_meta, finish, load_checkpoint,
    save_checkpoint, tensor_values,
};
use crate::classifier::{argmax, clean_predictions, fooling_rate, load_batch, logits_rows};
use crate::data::epoch_order;
use crate::error::{Result, SfrError};
use crate::perturbation::{self, Norm, Perturbation};
use crate::weights;
use crate::zoo::{Model, NoTap};

/// The overshoot for a single short pass (the suite's and the demo's DeepFool rows: one pass
/// over at most about 100 images). There a large overshoot fills the box sooner: on one pass over
/// 100 imagenet-sample images, 30 fools 0.37 of 300 nips17 images where the default 5 fools 0.32;
/// over the whole data set the default is the stronger (module docs).
pub const ONE_PASS_OVERSHOOT: f64 = 30.0;

/// Parameters of UAP with DeepFool.
#[derive(Debug, Clone, Serialize)]
pub struct DeepFoolConfig {
    /// Candidate classes of DeepFool: the top ones of the logits at its start (the current label
    /// included).
    pub candidates: usize,
    /// DeepFool's overshoot: the returned step is (1 + overshoot)·Σr.
    pub overshoot: f64,
    /// DeepFool's iterations at most.
    pub max_iter: usize,
    /// Stop once the training fooling rate of a pass reaches 1 − delta.
    pub delta: f64,
    /// Passes over the training images at most.
    pub max_passes: usize,
    /// The exact sequential original: one image at a time, v updated after every image.
    pub per_image: bool,
    /// Visit only the first this many images of each shuffled pass (None: all).
    pub max_images_per_pass: Option<usize>,
    /// The norm in which DeepFool's step is minimal.
    pub step_norm: StepNorm,
}

/// The geometry of DeepFool's step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum StepNorm {
    /// ℓ2-minimal steps, r = |f'_k|/‖w_k‖₂² · w_k (the UAP paper's DeepFool, for every budget).
    #[default]
    L2,
    /// Minimal in the budget's own norm (DeepFool's ℓp extension): for an ℓ∞ budget
    /// r = |f'_k|/‖w_k‖₁ · sign(w_k), k minimising |f'_k|/‖w_k‖₁; for ℓ2 the same as `L2`.
    Budget,
}

impl Default for DeepFoolConfig {
    fn default() -> Self {
        DeepFoolConfig {
            candidates: 10,
            overshoot: 5.0,
            max_iter: 10,
            delta: 0.2,
            max_passes: 10,
            per_image: true,
            max_images_per_pass: None,
            step_norm: StepNorm::L2,
        }
    }
}

impl DeepFoolConfig {
    /// The UAP paper's settings exactly: overshoot 0.02 (the default's only difference; see the
    /// module's documentation for why sfr's default overshoots more).
    pub fn exact() -> Self {
        DeepFoolConfig {
            overshoot: 0.02,
            ..DeepFoolConfig::default()
        }
    }

    /// Fail with a sentence on an impossible parameter.
    pub fn validate(&self) -> Result<()> {
        if self.candidates < 2 {
            return Err(SfrError::param(
                "--candidates",
                format!(
                    "DeepFool needs the current label and at least one other class, got {}",
                    self.candidates
                ),
            ));
        }
        if !(self.overshoot >= 0.0 && self.overshoot.is_finite()) {
            return Err(SfrError::param(
                "--overshoot",
                format!("must be a finite number ≥ 0, got {}", self.overshoot),
            ));
        }
        if self.max_iter == 0 {
            return Err(SfrError::param("--max-iter", "must be at least 1"));
        }
        if !(0.0..=1.0).contains(&self.delta) {
            return Err(SfrError::param(
                "--delta",
                format!(
                    "must be in [0, 1] (the attack stops at a fooling rate of 1 − delta), got {}",
                    self.delta
                ),
            ));
        }
        if self.max_passes == 0 {
            return Err(SfrError::param("--max-passes", "must be at least 1"));
        }
        if self.max_images_per_pass == Some(0) {
            return Err(SfrError::param(
                "--max-images-per-pass",
                "must be at least 1 (leave it out to visit every image)",
            ));
        }
        Ok(())
    }

    fn fingerprint(&self, ctx: &RunContext, batch: usize) -> String {
        format!(
            "deepfool|{}|{}|{}|{}|{}|{}|{}|{:?}",
            ctx.model.spec().name,
            ctx.norm,
            ctx.eps,
            ctx.seed,
            batch,
            ctx.train.samples.len(),
            ctx.clip,
            (
                self.candidates,
                self.overshoot,
                self.max_iter,
                self.delta,
                self.max_passes,
                self.per_image,
                self.max_images_per_pass,
                self.step_norm
            ),
        )
    }
}

/// DeepFool's result for each image of a batch.
#[derive(Debug, Clone)]
pub struct DeepFoolResult {
    /// (1 + overshoot)·r_tot per image, C×H×W values on the 0–255 scale.
    pub r: Vec<Vec<f32>>,
    /// Whether the label changed within `max_iter` iterations.
    pub converged: Vec<bool>,
    /// Gradient steps taken per image.
    pub iterations: Vec<usize>,
    /// Label at the start (top-1 at x).
    pub labels: Vec<usize>,
    /// Label at x + r.
    pub final_labels: Vec<usize>,
}

/// Rows (image, candidate class) per backward pass that [`deepfool`] uses: the candidates of one
/// image (9 by default), at least 8. On the flex CPU backend the cost of a forward+backward is
/// per row and does not drop with larger batches (mobilenet_v2, one thread: 9 rows per backward
/// 1.88 s per image, 16 rows 2.07 s, 32 rows 2.21 s), so a batch is processed in chunks of this
/// many rows.
pub fn default_grad_rows(_n: usize, cfg: &DeepFoolConfig) -> usize {
    cfg.candidates.saturating_sub(1).max(8)
}

/// DeepFool on every image of `x` (`[n, 3, h, w]`, 0–255 pixels, x+v for UAP) at once; `budget`
/// is the norm of the UAP's budget, which [`StepNorm::Budget`] follows.
pub fn deepfool(
    model: &Model,
    x: &Tensor<4>,
    clip: bool,
    cfg: &DeepFoolConfig,
    budget: Norm,
) -> Result<DeepFoolResult> {
    let n = x.dims()[0];
    deepfool_chunked(model, x, clip, cfg, budget, default_grad_rows(n, cfg))
}

fn values(t: Tensor<4>, what: &str) -> Result<Vec<f32>> {
    t.into_data()
        .try_into_vec::<f32>()
        .map_err(|e| SfrError::param("deepfool", format!("could not read back {what}: {e:?}")))
}

/// [`deepfool`] with `grad_rows` (image, candidate) rows per backward pass.
pub fn deepfool_chunked(
    model: &Model,
    x: &Tensor<4>,
    clip: bool,
    cfg: &DeepFoolConfig,
    budget: Norm,
    grad_rows: usize,
) -> Result<DeepFoolResult> {
    cfg.validate()?;
    // ℓ∞-minimal steps: distances |f'|/‖w‖₁ and steps along sign(w).
    let linf = cfg.step_norm == StepNorm::Budget && budget == Norm::Linf;
    let [n, c, h, w] = x.dims();
    let d = c * h * w;
    let dev = model.device().clone();
    let adev = dev.clone().autodiff();
    let x0 = values(x.clone(), "the images")?;
    let scale = (1.0 + cfg.overshoot) as f32;
    let grad_rows = grad_rows.max(1);

    let mut r_tot = vec![vec![0f32; d]; n];
    let mut converged = vec![false; n];
    let mut iterations = vec![0usize; n];
    let mut labels = vec![0usize; n];
    let mut final_labels = vec![0usize; n];
    let mut cands: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut active: Vec<usize> = (0..n).collect();

    // The current point x0 + (1+overshoot)·r_tot of image i, clipped as the forward passes see it.
    let point = |i: usize, r_tot: &[Vec<f32>], out: &mut Vec<f32>| {
        let x = &x0[i * d..(i + 1) * d];
        out.extend(x.iter().zip(&r_tot[i]).map(|(a, r)| {
            let p = a + scale * r;
            if clip { p.clamp(0.0, 255.0) } else { p }
        }));
    };

    for iter in 0..=cfg.max_iter {
        if active.is_empty() {
            break;
        }
        let m = active.len();
        let mut pts = Vec::with_capacity(m * d);
        for &i in &active {
            point(i, &r_tot, &mut pts);
        }
        let t = Tensor::<4>::from_data(TensorData::new(pts.clone(), [m, c, h, w]), &dev);
        let rows = logits_rows(model.forward_pixels(t, &mut NoTap))?;
        let classes = rows[0].len();
        if iter == 0 {
            if cfg.candidates > classes {
                return Err(SfrError::param(
                    "--candidates",
                    format!(
                        "{} candidate classes, but the model has {classes}",
                        cfg.candidates
                    ),
                ));
            }
            for (p, &i) in active.iter().enumerate() {
                let l = argmax(&rows[p]);
                let mut idx: Vec<usize> = (0..classes).filter(|&k| k != l).collect();
                idx.sort_by(|&a, &b| rows[p][b].total_cmp(&rows[p][a]).then(a.cmp(&b)));
                idx.truncate(cfg.candidates - 1);
                labels[i] = l;
                final_labels[i] = l;
                cands[i] = idx;
            }
        }
        // Images whose label changed are done.
        let mut still = Vec::with_capacity(m);
        let mut still_pos = Vec::with_capacity(m);
        for (p, &i) in active.iter().enumerate() {
            let k = argmax(&rows[p]);
            final_labels[i] = k;
            if k != labels[i] {
                converged[i] = true;
            } else {
                still.push(i);
                still_pos.push(p);
            }
        }
        if still.is_empty() || iter == cfg.max_iter {
            break;
        }
        let m2 = still.len();
        let ncand = cfg.candidates - 1;
        // Gradient rows, candidate-major: row r is image still[r % m2], candidate r / m2.
        let total = m2 * ncand;
        let mut best: Vec<Option<(f32, Vec<f32>, f32)>> = vec![None; m2]; // (pert, w, ‖w‖)
        let mut start = 0;
        while start < total {
            let end = (start + grad_rows).min(total);
            let nr = end - start;
            let mut input = Vec::with_capacity(nr * d);
            let mut sel = vec![0f32; nr * classes];
            for (q, r) in (start..end).enumerate() {
                let (a, j) = (r % m2, r / m2);
                let p = still_pos[a];
                input.extend_from_slice(&pts[p * d..(p + 1) * d]);
                let i = still[a];
                sel[q * classes + cands[i][j]] += 1.0;
                sel[q * classes + labels[i]] -= 1.0;
            }
            let leaf =
                Tensor::<4>::from_data(TensorData::new(input, [nr, c, h, w]), &adev).require_grad();
            let logits = model.forward_pixels(leaf.clone(), &mut NoTap);
            let sel = Tensor::<2>::from_data(TensorData::new(sel, [nr, classes]), &adev);
            let grads = (logits * sel).sum().backward();
            let g = leaf
                .grad(&grads)
                .ok_or_else(|| SfrError::param("deepfool", "no gradient reached the input"))?;
            let g = values(g, "the gradient")?;
            for (q, r) in (start..end).enumerate() {
                let (a, j) = (r % m2, r / m2);
                let i = still[a];
                let p = still_pos[a];
                let wk = &g[q * d..(q + 1) * d];
                let fk = rows[p][cands[i][j]] - rows[p][labels[i]];
                let nrm = if linf {
                    wk.iter().map(|v| v.abs() as f64).sum::<f64>() as f32
                } else {
                    wk.iter()
                        .map(|v| (*v as f64) * (*v as f64))
                        .sum::<f64>()
                        .sqrt() as f32
                };
                let pert = fk.abs() / nrm;
                if !(pert.is_finite() && nrm > 0.0) {
                    continue;
                }
                if best[a].as_ref().is_none_or(|b| pert < b.0) {
                    best[a] = Some((pert, wk.to_vec(), nrm));
                }
            }
            start = end;
        }
        let mut next = Vec::with_capacity(m2);
        for (a, &i) in still.iter().enumerate() {
            // No usable direction (every gradient vanished): DeepFool fails on this image.
            let Some((pert, wk, nrm)) = best[a].take() else {
                continue;
            };
            if linf {
                let f = pert + 1e-4;
                for (rt, v) in r_tot[i].iter_mut().zip(&wk) {
                    *rt += if *v > 0.0 {
                        f
                    } else if *v < 0.0 {
                        -f
                    } else {
                        0.0
                    };
                }
            } else {
                let f = (pert + 1e-4) / nrm;
                for (rt, v) in r_tot[i].iter_mut().zip(&wk) {
                    *rt += f * v;
                }
            }
            iterations[i] = iter + 1;
            next.push(i);
        }
        active = next;
    }
    let r = r_tot
        .into_iter()
        .map(|v| v.into_iter().map(|x| x * scale).collect())
        .collect();
    Ok(DeepFoolResult {
        r,
        converged,
        iterations,
        labels,
        final_labels,
    })
}

/// One pass's record.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct PassRecord {
    /// Images visited (readable, with a clean prediction).
    visited: usize,
    /// Of those, already fooled by v when visited.
    fooled: usize,
    /// visited − fooled: images DeepFool ran on.
    deepfooled: usize,
    /// Of those, DeepFool converged (their Δv was added).
    converged: usize,
    /// Mean gradient steps of DeepFool.
    mean_iterations: f64,
    /// fooled / visited.
    train_fooling_rate: f64,
    /// Held-out fooling rate after the pass.
    holdout_fooling_rate: Option<f64>,
    /// Wall time of the pass (DeepFool and v updates; not the held-out measurement).
    seconds: f64,
}

/// The state of a pass in progress, beside the position in its order.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Partial {
    /// The pass's counts so far.
    rec: PassRecord,
    /// DeepFool steps summed over the images it ran on so far.
    iter_sum: usize,
    /// Wall time spent in the pass before the checkpoint.
    seconds: f64,
}

const HISTORY_KEY: &str = "deepfool_history";
const PARTIAL_KEY: &str = "deepfool_partial";

fn json_string<T: Serialize + ?Sized>(v: &T) -> Result<String> {
    serde_json::to_string(v)
        .map_err(|e| SfrError::param("checkpoint", format!("could not encode its state: {e}")))
}

/// A checkpoint's JSON entry `key`, parsed.
fn checkpoint_entry<T: serde::de::DeserializeOwned>(path: &Path, key: &str) -> Result<T> {
    let meta = weights::read_safetensors_metadata(path)?;
    let s = meta.get(key).ok_or_else(|| {
        SfrError::param(
            "--resume",
            format!("checkpoint {} lacks `{key}`", path.display()),
        )
    })?;
    serde_json::from_str(s).map_err(|e| {
        SfrError::param(
            "--resume",
            format!("checkpoint {}: `{key}` is unreadable: {e}", path.display()),
        )
    })
}

/// The records of the `passes` passes a checkpoint has done.
fn load_history(path: &Path, passes: usize) -> Result<Vec<PassRecord>> {
    let h: Vec<PassRecord> = checkpoint_entry(path, HISTORY_KEY)?;
    if h.len() != passes {
        return Err(SfrError::param(
            "--resume",
            format!(
                "checkpoint {} records {} passes but says {passes} are done",
                path.display(),
                h.len()
            ),
        ));
    }
    Ok(h)
}

fn load_partial(path: &Path) -> Result<Partial> {
    checkpoint_entry(path, PARTIAL_KEY)
}

fn add_projected(
    v: &mut Vec<f32>,
    dv: &[f32],
    norm: Norm,
    eps: f64,
    size: usize,
    dev: &burn::tensor::Device,
) -> Result<()> {
    for (a, b) in v.iter_mut().zip(dv) {
        *a += b;
    }
    let t = Tensor::<4>::from_data(TensorData::new(std::mem::take(v), [1, 3, size, size]), dev);
    *v = tensor_values(perturbation::project(t, norm, eps))?;
    Ok(())
}

/// Run UAP with DeepFool.
pub fn run(cfg: &DeepFoolConfig, ctx: &mut RunContext) -> Result<Perturbation> {
    cfg.validate()?;
    perturbation::check_eps(ctx.norm, ctx.eps)?;
    if ctx.batch_size == 0 {
        return Err(SfrError::param("--batch-size", "must be at least 1"));
    }
    let model = ctx.model;
    let size = model.spec().input_size;
    let d = 3 * size * size;
    let dev = model.device().clone();
    let batch = if cfg.per_image { 1 } else { ctx.batch_size };
    let fp = cfg.fingerprint(ctx, batch);

    let mut v = vec![0f32; d];
    let mut start_pass = 0;
    let mut holdout_fr = None;
    let mut history: Vec<PassRecord> = Vec::new();
    // A run resumed inside a pass: where in the pass's order, and the pass's counts so far.
    let mut partial: Option<(usize, Partial)> = None;
    if let (true, Some(path)) = (ctx.resume, &ctx.checkpoint)
        && let Some(c) = load_checkpoint(path, &fp)?
    {
        v = c.delta;
        start_pass = c.epochs_done;
        holdout_fr = c.holdout_fooling_rate;
        history = load_history(path, start_pass)?;
        if c.position > 0 {
            partial = Some((c.position, load_partial(path)?));
        }
    }
    let mut clock = CheckpointClock::new(ctx.checkpoint_every);
    let ckpt_path = ctx.checkpoint.clone();
    let save = |v: &[f32],
                passes: usize,
                position: usize,
                holdout_fr: Option<f64>,
                history: &[PassRecord],
                partial: Option<&Partial>|
     -> Result<()> {
        let Some(path) = &ckpt_path else {
            return Ok(());
        };
        // The pass records ride along, so a resumed run knows the stop rule's last value.
        let mut extra = vec![(HISTORY_KEY, json_string(&history)?)];
        if let Some(p) = partial {
            extra.push((PARTIAL_KEY, json_string(p)?));
        }
        save_checkpoint(
            path,
            &Checkpoint {
                delta: v.to_vec(),
                epochs_done: passes,
                position,
                holdout_fooling_rate: holdout_fr,
                velocity: None,
            },
            size,
            &fp,
            &extra,
        )
    };

    let train = &ctx.train.samples;
    let hold = &ctx.holdout.samples;
    let bs = ctx.batch_size;
    // Clean predictions of the training images the remaining passes visit.
    let needed: Vec<usize> = match cfg.max_images_per_pass {
        Some(k) if k < train.len() => {
            let mut set = std::collections::BTreeSet::new();
            for p in start_pass..cfg.max_passes {
                set.extend(epoch_order(train.len(), ctx.seed, p).into_iter().take(k));
            }
            set.into_iter().collect()
        }
        _ => (0..train.len()).collect(),
    };
    let sub: Vec<_> = needed.iter().map(|&i| train[i].clone()).collect();
    let preds = clean_predictions(&super::Target::plain(model), &sub, bs, |dn| {
        (ctx.progress)(&Progress {
            phase: "clean predictions (train)".into(),
            done: dn,
            total: sub.len(),
            loss: None,
            holdout_fooling_rate: None,
        })
    })?;
    let mut clean_train = vec![None; train.len()];
    for (&i, p) in needed.iter().zip(preds) {
        clean_train[i] = p;
    }
    let clean_hold = clean_predictions(&super::Target::plain(model), hold, bs, |_| {})?;
    let target = 1.0 - cfg.delta;
    let mut stop = "max_passes";
    if history
        .last()
        .is_some_and(|r| r.train_fooling_rate >= target)
    {
        stop = "fooling_rate";
    }

    let mut pass = start_pass;
    while pass < cfg.max_passes && stop != "fooling_rate" {
        let t0 = Instant::now();
        let mut order = epoch_order(train.len(), ctx.seed, pass);
        if let Some(k) = cfg.max_images_per_pass {
            order.truncate(k);
        }
        let phase = |fr: f64| {
            format!(
                "pass {}/{} (training fooling rate so far {fr:.3})",
                pass + 1,
                cfg.max_passes
            )
        };
        let (
            mut pos,
            Partial {
                mut rec,
                mut iter_sum,
                seconds: seconds_before,
            },
        ) = partial.take().unwrap_or_default();
        let mut first = true;
        while pos < order.len() {
            if !first && clock.due() {
                let p = Partial {
                    rec: rec.clone(),
                    iter_sum,
                    seconds: seconds_before + t0.elapsed().as_secs_f64(),
                };
                save(&v, pass, pos, holdout_fr, &history, Some(&p))?;
            }
            first = false;
            // Collect up to `batch` images that the current v does not fool.
            let vt = Tensor::<4>::from_data(TensorData::new(v.clone(), [1, 3, size, size]), &dev);
            let mut pix: Vec<f32> = Vec::new();
            let mut taken = 0usize;
            while taken < batch && pos < order.len() {
                let want = (batch - taken).min(order.len() - pos);
                let idx: Vec<usize> = order[pos..pos + want]
                    .iter()
                    .copied()
                    .filter(|&i| clean_train[i].is_some())
                    .collect();
                pos += want;
                if idx.is_empty() {
                    continue;
                }
                let samples: Vec<_> = idx.iter().map(|&i| train[i].clone()).collect();
                let (b, _) = load_batch(model, &samples, false)?;
                let Some(b) = b else { continue };
                let xs = values(b.pixels.clone(), "the images")?;
                let x = perturbation::apply(b.pixels, vt.clone(), ctx.clip);
                let rows = logits_rows(model.forward_pixels(x, &mut NoTap))?;
                for (row, s) in b.samples.iter().enumerate() {
                    let Some(p) = samples.iter().position(|t| t.path == s.path) else {
                        continue;
                    };
                    let Some(cl) = clean_train[idx[p]] else {
                        continue;
                    };
                    rec.visited += 1;
                    if argmax(&rows[row]) != cl {
                        rec.fooled += 1;
                    } else {
                        pix.extend(
                            xs[row * d..(row + 1) * d]
                                .iter()
                                .zip(&v)
                                .map(|(a, b)| a + b),
                        );
                        taken += 1;
                    }
                }
            }
            if taken > 0 {
                let x0 = Tensor::<4>::from_data(TensorData::new(pix, [taken, 3, size, size]), &dev);
                let res = deepfool(model, &x0, ctx.clip, cfg, ctx.norm)?;
                rec.deepfooled += taken;
                for (i, r) in res.r.iter().enumerate() {
                    iter_sum += res.iterations[i];
                    if res.converged[i] {
                        rec.converged += 1;
                        add_projected(&mut v, r, ctx.norm, ctx.eps, size, &dev)?;
                    }
                }
            }
            let fr = if rec.visited > 0 {
                rec.fooled as f64 / rec.visited as f64
            } else {
                0.0
            };
            (ctx.progress)(&Progress {
                phase: phase(fr),
                done: pos,
                total: order.len(),
                loss: None,
                holdout_fooling_rate: holdout_fr,
            });
        }
        if rec.visited == 0 {
            return Err(SfrError::NoImages(
                "no training image of the pass could be read".into(),
            ));
        }
        rec.train_fooling_rate = rec.fooled as f64 / rec.visited as f64;
        rec.mean_iterations = if rec.deepfooled > 0 {
            iter_sum as f64 / rec.deepfooled as f64
        } else {
            0.0
        };
        rec.seconds = seconds_before + t0.elapsed().as_secs_f64();
        if !hold.is_empty() {
            let vt = Tensor::<4>::from_data(TensorData::new(v.clone(), [1, 3, size, size]), &dev);
            holdout_fr = Some(fooling_rate(
                &super::Target::plain(model),
                hold,
                &clean_hold,
                &vt,
                ctx.clip,
                bs,
            )?);
        }
        rec.holdout_fooling_rate = holdout_fr;
        (ctx.progress)(&Progress {
            phase: phase(rec.train_fooling_rate),
            done: order.len(),
            total: order.len(),
            loss: None,
            holdout_fooling_rate: holdout_fr,
        });
        if rec.train_fooling_rate >= target {
            stop = "fooling_rate";
        }
        history.push(rec);
        pass += 1;
        save(&v, pass, 0, holdout_fr, &history, None)?;
    }
    let last = history.last();
    let mut meta = base_meta(
        ctx,
        "deepfool",
        json!({
            "candidates": cfg.candidates,
            "overshoot": cfg.overshoot,
            "max_iter": cfg.max_iter,
            "delta": cfg.delta,
            "max_passes": cfg.max_passes,
            "per_image": cfg.per_image,
            "batch": batch,
            "max_images_per_pass": cfg.max_images_per_pass,
            "step_norm": cfg.step_norm,
            "passes_run": pass,
            "stop_reason": stop,
            "train_fooling_rate": last.map(|r| r.train_fooling_rate),
            "train_fooling_rate_definition": "fraction of the pass's images already fooled by v when visited",
            "seconds_per_pass": history.iter().map(|r| r.seconds).collect::<Vec<_>>(),
            "passes": history,
            "labels": "clean predictions",
        }),
    );
    meta.fooling_rate = holdout_fr;
    meta.fooling_rate_n = Some(hold.len());
    finish(v, size, meta)
}
