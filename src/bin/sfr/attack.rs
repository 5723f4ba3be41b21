//! `sfr attack`: compute a universal perturbation.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::json;

use sfr::attack::activations::{ActivationConfig, Objective, Prior};
use sfr::attack::sgd::{SgdConfig, SgdLoss};
use sfr::attack::{self, RunContext};
use sfr::defense::Defense;
use sfr::perturbation::{Norm, Perturbation};

use crate::common::*;

#[derive(Args)]
pub(crate) struct AttackArgs {
    /// The attack.
    #[arg(value_enum)]
    pub(crate) method: Method,
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    #[command(flatten)]
    pub(crate) data: DataArgs,
    /// Norm of the budget.
    #[arg(long, value_enum, default_value_t = Norm::Linf)]
    pub(crate) norm: Norm,
    /// Budget ξ on the 0–255 pixel scale (ℓ∞ 10 and ℓ2 2000 in the paper).
    #[arg(long, default_value_t = 10.0)]
    pub(crate) eps: f64,
    /// Output perturbation file (.safetensors).
    #[arg(long, short)]
    pub(crate) out: PathBuf,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Images held out for the running fooling-rate estimate.
    #[arg(long, default_value_t = 100)]
    pub(crate) holdout: usize,
    /// Images per batch (default: 16 for sgd, which takes one step per batch; 32 for the
    /// others).
    #[arg(long)]
    pub(crate) batch_size: Option<usize>,
    /// Do not clip perturbed pixels to [0, 255] while attacking.
    #[arg(long)]
    pub(crate) no_clip: bool,
    /// sgd: passes over the data (default 10).
    #[arg(long)]
    pub(crate) epochs: Option<usize>,
    /// sgd, fff, gduap: first step as a fraction of ξ.
    #[arg(long)]
    pub(crate) step: Option<f64>,
    /// sgd: step multiplier per epoch (default 0.9; the first step is --step, default 0.1·ξ).
    #[arg(long)]
    pub(crate) decay: Option<f64>,
    /// sgd: cross-entropy clamp β.
    #[arg(long)]
    pub(crate) beta: Option<f64>,
    /// sgd: stop once the held-out fooling rate (targeted: success rate) reaches this.
    #[arg(long)]
    pub(crate) target_fooling_rate: Option<f64>,
    /// sgd: the loss ascended (`ce`: clamped cross-entropy; `margin`: CW logit margin,
    /// clamped at β).
    #[arg(long, value_enum, default_value_t = LossArg::Ce)]
    pub(crate) loss: LossArg,
    /// sgd: targeted UAP: send the images to this class (its index, 0–999 for ImageNet).
    #[arg(long, value_name = "CLASS")]
    pub(crate) target: Option<usize>,
    /// sgd: start from uniform noise in [−ξ, ξ] instead of zero.
    #[arg(long)]
    pub(crate) random_start: bool,
    /// sgd: momentum μ of the sign steps (MI-FGSM: the step follows v ← μ·v + ∇/mean|∇|;
    /// 0: the batch's gradient alone) [default: 0.95].
    #[arg(long)]
    pub(crate) momentum: Option<f64>,
    /// sgd: do not mirror training images (by default each is mirrored left–right with
    /// probability ½, so that δ must fool both views).
    #[arg(long)]
    pub(crate) no_flip: bool,
    /// sgd: runs from seeds SEED, SEED+1, …, keeping the best on the held-out slice.
    #[arg(long, default_value_t = 1)]
    pub(crate) restarts: usize,
    /// fff, gduap: ascent iterations.
    #[arg(long)]
    pub(crate) iterations: Option<usize>,
    /// gduap: prior.
    #[arg(long, value_enum, default_value_t = Prior::None)]
    pub(crate) prior: Prior,
    /// fff, gduap: sites to maximise (default: every conv).
    #[arg(long, value_delimiter = ',')]
    pub(crate) sites: Vec<String>,
    /// deepfool: candidate classes.
    #[arg(long, default_value_t = 10)]
    pub(crate) candidates: usize,
    /// deepfool: overshoot: DeepFool's step is (1 + overshoot)·Σr (the UAP paper: 0.02; sfr's
    /// default was measured stronger, see the README; 30 is stronger on a single pass over
    /// about 100 images).
    #[arg(long, default_value_t = 5.0)]
    pub(crate) overshoot: f64,
    /// deepfool: the UAP paper's settings exactly (overshoot 0.02).
    #[arg(long, conflicts_with = "overshoot")]
    pub(crate) exact: bool,
    /// deepfool: DeepFool iterations at most.
    #[arg(long, default_value_t = 10)]
    pub(crate) max_iter: usize,
    /// deepfool: stop once a pass fools 1 − δ of the training images.
    #[arg(long, default_value_t = 0.2)]
    pub(crate) delta: f64,
    /// deepfool: passes at most.
    #[arg(long, default_value_t = 10)]
    pub(crate) max_passes: usize,
    /// deepfool: DeepFool on --batch-size images at once, v updated after the batch (faster on
    /// wide hardware; weaker: the default is the original's one image at a time).
    #[arg(long)]
    pub(crate) batched: bool,
    /// deepfool: visit at most this many images per pass.
    #[arg(long)]
    pub(crate) max_images_per_pass: Option<usize>,
    /// deepfool: the norm DeepFool's step is minimal in (`l2`: the UAP paper's DeepFool;
    /// `budget`: DeepFool's ℓp form in the budget's norm, sign steps for ℓ∞).
    #[arg(long, value_enum, default_value_t = StepNormArg::L2)]
    pub(crate) step_norm: StepNormArg,
    /// The adaptive attack (sgd, random): attack the network with this `sfr defend` file in
    /// place, differentiating through its FRUs; or behind an image-domain defence named
    /// jpegQ, medianK or bitsB, differentiating straight through it (BPDA).
    #[arg(long)]
    pub(crate) defense: Option<PathBuf>,
    /// sgd --defense: pass the gradient straight through the FRUs (BPDA: forward with the units,
    /// backward as if each regenerated site were the identity).
    #[arg(long, requires = "defense")]
    pub(crate) straight_through: bool,
    /// Continue from the checkpoint next to --out (OUT.ckpt) if there is one.
    #[arg(long)]
    pub(crate) resume: bool,
    /// sgd, deepfool: inside an epoch, checkpoint at the first batch this many seconds after the
    /// last checkpoint (0: after every batch); every epoch's end is checkpointed too.
    #[arg(long, default_value_t = 60.0, value_name = "SECONDS")]
    pub(crate) checkpoint_every: f64,
    /// Print the artefact's metadata as one JSON object on stdout.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LossArg {
    /// min(CE, β) against the clean prediction (targeted: the target's log-probability).
    Ce,
    /// min(max_{k≠y} z_k − z_y, β) on the logits (targeted: the target's margin).
    Margin,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum StepNormArg {
    /// ℓ2-minimal steps along ∇f_k − ∇f_l (the UAP paper's DeepFool).
    L2,
    /// Minimal in the budget's norm: for ℓ∞, steps along sign(∇f_k − ∇f_l).
    Budget,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Method {
    /// SGD-UAP / sPGD: batched sign steps on clamped cross-entropy.
    Sgd,
    /// The original UAP algorithm with DeepFool steps (batched: a batch shares v).
    Deepfool,
    /// FFF: data-free, maximise log mean |activation| at the sites.
    Fff,
    /// GD-UAP: maximise log ‖activation‖² with an optional prior.
    Gduap,
    /// Random-sign control of the same norm and budget.
    Random,
}

pub(crate) fn attack_cmd(a: AttackArgs, quiet: bool) -> Result<()> {
    let (json_out, out) = (a.json, a.out.clone());
    let (p, seconds) = attack_run(a, quiet)?;
    if json_out {
        let mut v = serde_json::to_value(&p.meta)?;
        v["file"] = json!(out);
        v["seconds"] = json!(seconds);
        v["linf"] = json!(p.linf());
        v["l2"] = json!(p.l2());
        println!("{}", serde_json::to_string(&v)?);
    } else {
        println!(
            "wrote {} ({} ξ = {}, {:.1} s)",
            out.display(),
            p.meta.norm,
            p.meta.eps,
            seconds
        );
        if let Some(f) = p.meta.fooling_rate {
            println!(
                "held-out fooling rate {:.4} on {} images (top-1 label changed vs the clean prediction)",
                f,
                p.meta.fooling_rate_n.unwrap_or(0)
            );
        }
        if let (Some(t), Some(f)) = (
            p.meta.params.get("target").and_then(|v| v.as_u64()),
            p.meta.params["holdout_targeted_success_rate"].as_f64(),
        ) {
            println!(
                "held-out targeted success rate {f:.4} (images sent to class {t}, of those not predicted {t} clean)"
            );
        }
    }
    Ok(())
}

/// Run the attack `a` describes and write its file; the perturbation and the seconds it took.
pub(crate) fn attack_run(a: AttackArgs, quiet: bool) -> Result<(Perturbation, f64)> {
    // Validate everything cheap before loading anything.
    sfr::perturbation::check_eps(a.norm, a.eps)?;
    if a.out.exists() && a.out.is_dir() {
        bail!("--out {} is a folder; give a file name", a.out.display());
    }
    if !(a.checkpoint_every >= 0.0 && a.checkpoint_every.is_finite()) {
        return Err(sfr::error::SfrError::param(
            "--checkpoint-every",
            format!(
                "must be a number of seconds ≥ 0, got {}",
                a.checkpoint_every
            ),
        )
        .into());
    }
    let mut sgd = SgdConfig::default();
    if let Some(v) = a.epochs {
        sgd.epochs = v;
    }
    if let Some(v) = a.step {
        sgd.step = v;
    }
    if let Some(v) = a.decay {
        sgd.decay = v;
    }
    if let Some(v) = a.beta {
        sgd.beta = v;
    }
    if let Some(v) = a.target_fooling_rate {
        sgd.target_fooling_rate = v;
    }
    sgd.loss = match a.loss {
        LossArg::Ce => SgdLoss::Ce,
        LossArg::Margin => SgdLoss::Margin,
    };
    sgd.target = a.target;
    sgd.random_start = a.random_start;
    sgd.restarts = a.restarts;
    if let Some(v) = a.momentum {
        sgd.momentum = v;
    }
    sgd.flip = !a.no_flip;
    if a.straight_through {
        sgd.fru_gradient = sfr::classifier::FruGradient::StraightThrough;
    }
    if a.method != Method::Sgd
        && (a.target.is_some()
            || a.restarts != 1
            || a.random_start
            || a.momentum.is_some()
            || a.no_flip)
    {
        bail!(
            "--target, --restarts, --random-start, --momentum and --no-flip are options of `sfr attack sgd`"
        );
    }
    if a.method == Method::Sgd {
        sgd.validate()?;
    }
    let deepfool = attack::deepfool::DeepFoolConfig {
        candidates: a.candidates,
        overshoot: if a.exact { 0.02 } else { a.overshoot },
        max_iter: a.max_iter,
        delta: a.delta,
        max_passes: a.max_passes,
        per_image: !a.batched,
        max_images_per_pass: a.max_images_per_pass,
        step_norm: match a.step_norm {
            StepNormArg::L2 => attack::deepfool::StepNorm::L2,
            StepNormArg::Budget => attack::deepfool::StepNorm::Budget,
        },
    };
    if a.method == Method::Deepfool {
        deepfool.validate()?;
    }
    let act = |objective| {
        let mut c = ActivationConfig::new(
            objective,
            if objective == Objective::Fff {
                Prior::None
            } else {
                a.prior
            },
        );
        if let Some(v) = a.iterations {
            c.iterations = v;
        }
        if let Some(v) = a.step {
            c.step = v;
        }
        c.sites = a.sites.clone();
        c
    };
    // --defense: an `sfr defend` file, or an image-domain baseline by name (jpeg75, median3,
    // bits4) attacked straight through (BPDA).
    let filter: Option<sfr::defense::baselines::ImageDefense> = match &a.defense {
        Some(p) if !p.exists() => {
            let name = p.to_string_lossy();
            if name
                .trim_end_matches(char::is_numeric)
                .chars()
                .all(char::is_alphabetic)
                && !name.is_empty()
            {
                Some(name.parse().with_context(|| {
                    format!("--defense {name}: no such file, and not an image-domain defence")
                })?)
            } else {
                bail!(
                    "--defense {}: no such file (give an `sfr defend` file, or jpegQ, medianK or bitsB)",
                    p.display()
                );
            }
        }
        _ => None,
    };
    if a.defense.is_some() && !matches!(a.method, Method::Sgd | Method::Random) {
        return Err(sfr::error::SfrError::param(
            "--defense",
            "the adaptive attack is available for sgd (and the random control) only",
        )
        .into());
    }
    if filter.is_some() && a.straight_through {
        bail!(
            "--straight-through is for FRUs; an image-domain filter is always passed straight through"
        );
    }
    let model = load_model(&a.model, quiet)?;
    let defense = match (&a.defense, &filter) {
        (Some(path), None) => Some(
            Defense::load(path, &model, model.device())
                .with_context(|| format!("reading the defence {}", path.display()))?,
        ),
        _ => None,
    };
    let ds = a.data.open(quiet)?;
    let (train, holdout) = attack::split_holdout(
        &ds,
        a.holdout.min(ds.samples.len().saturating_sub(1)),
        a.seed,
    )?;
    let mut ckpt = a.out.clone().into_os_string();
    ckpt.push(".ckpt");
    let ckpt = PathBuf::from(ckpt);
    let pb = progress_bar(train.samples.len(), quiet, "attack");
    let lines = !quiet && !std::io::stderr().is_terminal();
    let mut last = (String::new(), None);
    let mut report = |p: &attack::Progress| {
        // Without a terminal, one line per phase and per new held-out measurement.
        let phase = p.phase.split(" (").next().unwrap_or("").to_string();
        if lines && (phase != last.0 || p.holdout_fooling_rate != last.1) {
            eprintln!(
                "{}{}",
                p.phase,
                p.holdout_fooling_rate
                    .map(|f| format!(": held-out fooling rate {f:.4}"))
                    .unwrap_or_default()
            );
            last = (phase, p.holdout_fooling_rate);
        }
        pb.set_length(p.total as u64);
        pb.set_position(p.done as u64);
        let mut msg = p.phase.clone();
        if let Some(l) = p.loss {
            msg.push_str(&format!(" loss {l:.3}"));
        }
        if let Some(f) = p.holdout_fooling_rate {
            msg.push_str(&format!(" held-out fooling {f:.3}"));
        }
        pb.set_message(msg);
    };
    let mut ctx = RunContext {
        model: &model,
        train: &train,
        holdout: &holdout,
        norm: a.norm,
        eps: a.eps,
        seed: a.seed,
        clip: !a.no_clip,
        batch_size: a.batch_size.unwrap_or(match a.method {
            Method::Sgd => sfr::attack::sgd::BATCH_SIZE,
            _ => 32,
        }),
        checkpoint: Some(ckpt.clone()),
        resume: a.resume,
        checkpoint_every: std::time::Duration::from_secs_f64(a.checkpoint_every),
        progress: &mut report,
        defense: defense.as_ref().map(|d| d as &dyn sfr::classifier::Plant),
        filter: filter
            .as_ref()
            .map(|f| f as &dyn sfr::classifier::InputFilter),
    };
    let t0 = std::time::Instant::now();
    let p = match a.method {
        Method::Sgd => attack::sgd::run(&sgd, &mut ctx)?,
        Method::Deepfool => attack::deepfool::run(&deepfool, &mut ctx)?,
        Method::Fff => attack::activations::run(&act(Objective::Fff), &mut ctx)?,
        Method::Gduap => attack::activations::run(&act(Objective::GdUap), &mut ctx)?,
        Method::Random => attack::random::run(&mut ctx)?,
    };
    pb.finish_and_clear();
    let seconds = t0.elapsed().as_secs_f64();
    p.save(&a.out)?;
    let _ = std::fs::remove_file(&ckpt);
    for r in 1..a.restarts {
        let mut c = ckpt.clone().into_os_string();
        c.push(format!(".restart{r}"));
        let _ = std::fs::remove_file(c);
    }
    Ok((p, seconds))
}
