//! Data-free attacks that maximise a network's conv activations, through the taps:
//!
//! - **FFF** (Mopuri et al. BMVC 2017): maximise Σ over sites of log(mean |a(δ)|) with the network
//!   fed δ alone (a mean-grey image plus δ).
//! - **GD-UAP** (Mopuri et al. TPAMI 2018): maximise Σ over sites of log(‖a‖₂²) (here the mean of
//!   a², which differs by a constant), with no prior (δ alone), the range prior (Gaussian-noise
//!   images with the data's pixel mean and spread, plus δ) or the data prior (real images plus δ).
//!
//! Sites are the raw conv outputs (before batch norm and nonlinearity), every conv by default.
//! Ascent: sign steps (ℓ∞) or normalised-gradient steps (ℓ2), projected on the ξ-ball, with a
//! cosine-decayed step, for a fixed number of iterations.

use burn::tensor::{Distribution, Tensor, TensorData};
use serde::Serialize;
use serde_json::json;

use super::{Progress, RunContext, ascent_step, base_meta, finish, tensor_values};
use crate::classifier::{clean_predictions, fooling_rate, load_batch};
use crate::data::epoch_order;
use crate::error::{Result, SfrError};
use crate::perturbation::{self, Perturbation};
use crate::zoo::Tap;

/// Which objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// FFF: Σ log mean |a|, δ alone.
    Fff,
    /// GD-UAP: Σ log mean a².
    GdUap,
}

/// GD-UAP's prior.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Prior {
    /// δ alone.
    None,
    /// Gaussian-noise images (ImageNet pixel mean, std 60 on the 0–255 scale) plus δ.
    Range,
    /// Real images plus δ.
    Data,
}

/// Parameters.
#[derive(Debug, Clone, Serialize)]
pub struct ActivationConfig {
    /// The objective.
    pub objective: Objective,
    /// The prior (FFF: always none).
    pub prior: Prior,
    /// Ascent iterations.
    pub iterations: usize,
    /// First step as a fraction of ξ.
    pub step: f64,
    /// Images per iteration for the range and data priors.
    pub prior_batch: usize,
    /// Sites whose activations are maximised (empty: every conv).
    pub sites: Vec<String>,
    /// Measure the held-out fooling rate every this many iterations (0: only at the end).
    pub eval_every: usize,
}

impl ActivationConfig {
    /// Defaults for FFF or GD-UAP.
    pub fn new(objective: Objective, prior: Prior) -> Self {
        ActivationConfig {
            objective,
            prior,
            iterations: 200,
            step: 0.1,
            prior_batch: 8,
            sites: Vec::new(),
            eval_every: 50,
        }
    }

    fn validate(&self) -> Result<()> {
        if self.iterations == 0 {
            return Err(SfrError::param("--iterations", "must be at least 1"));
        }
        if !(self.step > 0.0 && self.step.is_finite()) {
            return Err(SfrError::param(
                "--step",
                format!("must be positive, got {}", self.step),
            ));
        }
        if self.prior != Prior::None && self.prior_batch == 0 {
            return Err(SfrError::param("--prior-batch", "must be at least 1"));
        }
        if self.objective == Objective::Fff && self.prior != Prior::None {
            return Err(SfrError::param(
                "--prior",
                "FFF is fed the perturbation alone; priors belong to gduap",
            ));
        }
        Ok(())
    }
}

/// Collects the objective's term at each chosen site.
struct Collect<'a> {
    objective: Objective,
    sites: &'a [String],
    terms: Vec<Tensor<1>>,
}

impl Tap for Collect<'_> {
    fn wants(&self, site: &str) -> bool {
        self.sites.is_empty() || self.sites.iter().any(|s| s == site)
    }

    fn visit(&mut self, site: &str, x: Tensor<4>) -> Tensor<4> {
        if self.sites.is_empty() || self.sites.iter().any(|s| s == site) {
            let m = match self.objective {
                Objective::Fff => x.clone().abs().mean(),
                Objective::GdUap => x.clone().powf_scalar(2.0).mean(),
            };
            self.terms.push(m.add_scalar(1e-12).log());
        }
        x
    }
}

/// Run FFF or GD-UAP.
pub fn run(cfg: &ActivationConfig, ctx: &mut RunContext) -> Result<Perturbation> {
    cfg.validate()?;
    perturbation::check_eps(ctx.norm, ctx.eps)?;
    let model = ctx.model;
    let known: Vec<String> = model.sites().into_iter().map(|s| s.name).collect();
    for s in &cfg.sites {
        if !known.contains(s) {
            return Err(SfrError::param(
                "--sites",
                format!(
                    "`{s}` is not a site of {}; `sfr rank` lists them",
                    model.spec().name
                ),
            ));
        }
    }
    let size = model.spec().input_size;
    let dev = model.device().clone();
    let adev = dev.clone().autodiff();
    let mean = model.spec().preprocess.mean_rgb;
    let grey: Vec<f32> = (0..3)
        .flat_map(|c| std::iter::repeat_n(mean[c], size * size))
        .collect();
    let grey: Tensor<4> = Tensor::from_data(TensorData::new(grey, [1, 3, size, size]), &dev);

    let hold = &ctx.holdout.samples;
    let clean_hold = clean_predictions(&super::Target::plain(model), hold, ctx.batch_size, |_| {})?;
    let train = &ctx.train.samples;
    if cfg.prior == Prior::Data && train.is_empty() {
        return Err(SfrError::NoImages(
            "the data prior needs training images".into(),
        ));
    }
    let mut order = epoch_order(train.len().max(1), ctx.seed, 0);
    let mut cursor = 0usize;
    let mut epoch = 0usize;
    burn::tensor::Device::seed(&dev, ctx.seed);

    let mut delta = vec![0f32; 3 * size * size];
    // Start from a small random-sign pattern: at δ = 0 every activation gradient is the
    // network's response to a flat image, the same direction for all sites.
    {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(ctx.seed);
        let a = (ctx.eps * 0.1) as f32;
        for v in delta.iter_mut() {
            *v = if rng.random::<bool>() { a } else { -a };
        }
        let t: Tensor<4> =
            Tensor::from_data(TensorData::new(delta.clone(), [1, 3, size, size]), &dev);
        delta = tensor_values(perturbation::project(t, ctx.norm, ctx.eps))?;
    }
    let mut holdout_fr = None;
    let mut last_obj = None;
    for it in 0..cfg.iterations {
        let base: Tensor<4> = match cfg.prior {
            Prior::None => grey.clone(),
            Prior::Range => {
                let noise: Tensor<4> = Tensor::random(
                    [cfg.prior_batch, 3, size, size],
                    Distribution::Normal(0.0, 60.0),
                    &dev,
                );
                (noise + grey.clone()).clamp(0.0, 255.0)
            }
            Prior::Data => {
                let mut picked = Vec::new();
                while picked.len() < cfg.prior_batch {
                    if cursor >= order.len() {
                        epoch += 1;
                        order = epoch_order(train.len(), ctx.seed, epoch);
                        cursor = 0;
                    }
                    picked.push(train[order[cursor]].clone());
                    cursor += 1;
                }
                let (batch, _) = load_batch(model, &picked, false)?;
                match batch {
                    Some(b) => b.pixels,
                    None => continue,
                }
            }
        };
        let d: Tensor<4> =
            Tensor::from_data(TensorData::new(delta.clone(), [1, 3, size, size]), &adev)
                .require_grad();
        let clip = ctx.clip && cfg.prior != Prior::None;
        let x = perturbation::apply(base.autodiff(), d.clone(), clip);
        let mut tap = Collect {
            objective: cfg.objective,
            sites: &cfg.sites,
            terms: Vec::new(),
        };
        let _ = model.forward_pixels(x, &mut tap);
        if tap.terms.is_empty() {
            return Err(SfrError::param("--sites", "no site was visited"));
        }
        let obj = Tensor::cat(tap.terms, 0).sum();
        last_obj = Some(obj.clone().into_scalar::<f32>() as f64);
        let grads = obj.backward();
        let g = d
            .grad(&grads)
            .ok_or_else(|| SfrError::param("attack", "no gradient reached the perturbation"))?;
        let t = it as f64 / cfg.iterations as f64;
        let step =
            ctx.eps * cfg.step * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()));
        let cur: Tensor<4> =
            Tensor::from_data(TensorData::new(delta.clone(), [1, 3, size, size]), &dev);
        delta = tensor_values(ascent_step(cur, g, ctx.norm, step, ctx.eps))?;
        let measure =
            (cfg.eval_every > 0 && (it + 1) % cfg.eval_every == 0) || it + 1 == cfg.iterations;
        if measure {
            let dt: Tensor<4> =
                Tensor::from_data(TensorData::new(delta.clone(), [1, 3, size, size]), &dev);
            holdout_fr = Some(fooling_rate(
                &super::Target::plain(model),
                hold,
                &clean_hold,
                &dt,
                ctx.clip,
                ctx.batch_size,
            )?);
        }
        (ctx.progress)(&Progress {
            phase: format!("{} iterations", name(cfg)),
            done: it + 1,
            total: cfg.iterations,
            loss: last_obj,
            holdout_fooling_rate: holdout_fr,
        });
    }
    let params = json!({
        "objective": cfg.objective,
        "prior": cfg.prior,
        "iterations": cfg.iterations,
        "step": cfg.step,
        "prior_batch": cfg.prior_batch,
        "sites": if cfg.sites.is_empty() { json!("all convs") } else { json!(cfg.sites) },
        "final_objective": last_obj,
    });
    let mut meta = base_meta(ctx, name(cfg), params);
    if cfg.prior != Prior::Data {
        meta.n_images = 0;
        meta.data.clear();
    }
    meta.fooling_rate = holdout_fr;
    meta.fooling_rate_n = Some(hold.len());
    finish(delta, size, meta)
}

fn name(cfg: &ActivationConfig) -> &'static str {
    match cfg.objective {
        Objective::Fff => "fff",
        Objective::GdUap => "gduap",
    }
}
