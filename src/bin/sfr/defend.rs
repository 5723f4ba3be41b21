//! `sfr defend`: train the FRUs.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::json;

use sfr::attack::{self};
use sfr::defense::{Defense, Method, PlanOptions, Selection};
use sfr::perturbation::Perturbation;

use crate::common::*;

#[derive(Args, Clone)]
pub(crate) struct DefendArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    #[command(flatten)]
    pub(crate) data: TrainDataArgs,
    /// Real training perturbations (repeat); synthetic ones are drawn from them unless --no-synthetic.
    #[arg(long = "uap", required = true)]
    pub(crate) uaps: Vec<PathBuf>,
    /// Output defence file (.safetensors).
    #[arg(long, short)]
    pub(crate) out: PathBuf,
    /// Passes over the training images.
    #[arg(long, default_value_t = 4)]
    pub(crate) epochs: usize,
    /// Images per mini-batch (half clean, half perturbed).
    #[arg(long, default_value_t = 16)]
    pub(crate) batch_size: usize,
    /// Adam learning rate (default: 1e-3; 1e-5 for --method uat, which fine-tunes the backbone).
    #[arg(long)]
    pub(crate) lr: Option<f64>,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Images held out for the validation restoration estimate after each epoch.
    #[arg(long, default_value_t = 100)]
    pub(crate) val: usize,
    /// Seed of the validation split (default: --seed; with --seeds, the first seed's for all).
    #[arg(long)]
    pub(crate) val_seed: Option<u64>,
    /// Train N defences, seeds SEED…SEED+N−1 on the same validation split, written as
    /// OUT-STEM.seedK.safetensors, and report their mean and spread (OUT-STEM.seeds.json).
    #[arg(long, default_value_t = 1)]
    pub(crate) seeds: usize,
    /// The defence: `sfr`, FRUs at conv sites (the paper); `prn`, a PRN-style rectifier in
    /// front of the network; or `uat`, universal adversarial training of the backbone's conv
    /// weights (BN frozen) against a perturbation updated by sign steps between mini-batches.
    /// The rivals train in the same loop; --fraction, --width and --selection do not apply to
    /// them, and --sites names the convs UAT tunes (default: all).
    #[arg(long, value_enum, default_value_t = Method::Sfr)]
    pub(crate) method: Method,
    /// `--method prn`: the rectifier's width (inner channels).
    #[arg(long, default_value_t = sfr::defense::PRN_WIDTH)]
    pub(crate) prn_width: usize,
    /// `--method uat`: the sign step (0–255 scale) of its perturbation after each mini-batch
    /// (default 0.1; the perturbation starts as the first --uap and stays in its ℓ∞ ball).
    #[arg(long)]
    pub(crate) uat_step: Option<f64>,
    /// Scale each unit's change by a learned per-image switch on the site's channel energies,
    /// which can learn to leave clean images alone (beyond the paper; sfr and prn).
    #[arg(long)]
    pub(crate) gate: bool,
    /// `--gate`: weight of the switches' supervision as detectors (binary cross-entropy against
    /// shut on clean, open on perturbed images) beside the task loss; 0 lets them learn from the
    /// task loss alone [default: 1].
    #[arg(long)]
    pub(crate) gate_loss: Option<f64>,
    /// Weight of a feature loss beside the task loss: each unit's regenerated channels against
    /// the undefended network's on the clean image (squared error relative to their mean
    /// square), for clean and perturbed images alike (beyond the paper; sfr and prn).
    #[arg(long)]
    pub(crate) feature_loss: Option<f64>,
    /// Sites to defend, or `rule` for sfr's site rule (default: the architecture's hand
    /// placement, the rule for networks without one; `sfr rank` shows both).
    #[arg(long, value_delimiter = ',')]
    pub(crate) sites: Vec<String>,
    /// Fraction of each site's channels to regenerate.
    #[arg(long, default_value_t = PlanOptions::default().fraction)]
    pub(crate) fraction: f64,
    /// FRU width D as a multiple of N.
    #[arg(long, default_value_t = PlanOptions::default().width_ratio)]
    pub(crate) width: f64,
    /// Which channels: the ℓ1-ranked ones (the paper) or random ones (ablation).
    #[arg(long, value_enum, default_value_t = PlanOptions::default().selection)]
    pub(crate) selection: Selection,
    /// Train on the real perturbations only (no synthesis).
    #[arg(long)]
    pub(crate) no_synthetic: bool,
    /// Train on the network's clean predictions instead of labels (unlabelled folders).
    #[arg(long)]
    pub(crate) pseudo_labels: bool,
    /// Objective: `ce` (the paper's cross-entropy), `distill` (match the undefended network's
    /// clean softmax) or `logits` (match its clean logits, squared error); the last two for clean
    /// and perturbed images alike, and need no labels.
    #[arg(long, value_enum, default_value_t = sfr::defense::train::Loss::Ce)]
    pub(crate) loss: sfr::defense::train::Loss,
    /// No random horizontal flips.
    #[arg(long)]
    pub(crate) no_augment: bool,
    /// Random-resized crops covering at least this fraction of each image's area (1 = none).
    #[arg(long, default_value_t = 1.0)]
    pub(crate) crop_scale: f64,
    /// Learning-rate schedule over the run.
    #[arg(long, value_enum, default_value_t = sfr::defense::train::Schedule::Constant)]
    pub(crate) schedule: sfr::defense::train::Schedule,
    /// Keep the epoch with the best validation restoration accuracy (needs --val > 0).
    #[arg(long)]
    pub(crate) keep_best: bool,
    /// Weight of the clean half of each mini-batch in the loss (the perturbed half weighs 1).
    #[arg(long, default_value_t = 1.0)]
    pub(crate) clean_weight: f64,
    /// Do not clip perturbed pixels to [0, 255].
    #[arg(long)]
    pub(crate) no_clip: bool,
    /// Continue from the checkpoint next to --out (OUT.ckpt) if there is one.
    #[arg(long)]
    pub(crate) resume: bool,
    /// One JSON object on stdout.
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) fn defend_cmd(a: DefendArgs, quiet: bool) -> Result<()> {
    if a.seeds == 0 {
        bail!("--seeds must be at least 1");
    }
    if a.seeds > 1 {
        return seeds_cmd(a, quiet);
    }
    let (json_out, out) = (a.json, a.out.clone());
    let (defense, history, val_n, seconds) = defend_run(a, quiet)?;
    if json_out {
        let mut v = serde_json::to_value(&defense.meta)?;
        v["method"] = json!(defense.meta.method);
        v["file"] = json!(out);
        v["seconds"] = json!(seconds);
        println!("{}", serde_json::to_string(&v)?);
    } else {
        println!(
            "wrote {} ({}; {:.1} s)",
            out.display(),
            defense.summary(),
            seconds
        );
        let selected = defense.meta.training["selected_epoch"]
            .as_u64()
            .map_or(history.len(), |e| e as usize);
        if let Some(v) = selected.checked_sub(1).and_then(|i| history.get(i)) {
            println!(
                "kept epoch {selected} of {}; its validation ({val_n} images): undefended clean top-1 {:.4}, defended clean {:.4}, defended perturbed {:.4}, restoration accuracy {:.4}",
                history.len(),
                v.baseline_clean_top1,
                v.defended_clean_top1,
                v.defended_perturbed_top1,
                v.restoration_accuracy
            );
            if let (Some(c), Some(p)) = (&v.gate_clean, &v.gate_perturbed) {
                let list = |g: &[f64]| {
                    g.iter()
                        .map(|x| format!("{x:.3}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                };
                println!(
                    "mean gate per unit: clean {}, perturbed {}",
                    list(c),
                    list(p)
                );
            }
        }
    }
    Ok(())
}

/// Train the defence `a` describes and write its file: the defence, each epoch's validation,
/// the number of validation images and the seconds it took.
pub(crate) fn defend_run(
    a: DefendArgs,
    quiet: bool,
) -> Result<(Defense, Vec<sfr::defense::train::Validation>, usize, f64)> {
    if a.uat_step.is_some() && a.method != Method::Uat {
        bail!("--uat-step sets universal adversarial training; it needs --method uat");
    }
    if a.gate_loss.is_some() && !a.gate {
        bail!("--gate-loss weighs the switches' supervision; it needs --gate");
    }
    let uat = a.method == Method::Uat;
    let cfg = sfr::defense::train::TrainConfig {
        epochs: a.epochs,
        batch_size: a.batch_size,
        lr: a.lr.unwrap_or(if uat {
            sfr::defense::train::UAT_LR
        } else {
            1e-3
        }),
        synthetic: !a.no_synthetic,
        pseudo_labels: a.pseudo_labels,
        loss: a.loss,
        augment: !a.no_augment,
        crop_scale: a.crop_scale,
        schedule: a.schedule,
        keep_best: a.keep_best,
        clean_weight: a.clean_weight,
        seed: a.seed,
        clip: !a.no_clip,
        uat_step: uat.then(|| a.uat_step.unwrap_or(sfr::defense::train::UAT_STEP)),
        gate_loss: a
            .gate
            .then(|| a.gate_loss.unwrap_or(sfr::defense::train::GATE_LOSS)),
        feature_loss: a.feature_loss,
    };
    cfg.validate()?;
    if a.method != Method::Sfr {
        let d = PlanOptions::default();
        let fru_only = [
            ("--fraction", a.fraction != d.fraction),
            ("--width", a.width != d.width_ratio),
            ("--selection", a.selection != d.selection),
        ];
        if let Some((flag, _)) = fru_only.iter().find(|(_, given)| *given) {
            bail!(
                "{flag} sets the FRUs; it does not apply to --method {}",
                a.method
            );
        }
    }
    if a.method != Method::Prn && a.prn_width != sfr::defense::PRN_WIDTH {
        bail!("--prn-width sets the rectifier; it needs --method prn");
    }
    let model = load_model(&a.model, quiet)?;
    let size = model.spec().input_size;
    let uaps: Vec<Perturbation> = load_perturbations(&a.uaps, None, size)?
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    let ds = a.data.open(quiet)?;
    let (train, val) = if a.val == 0 {
        (
            ds,
            sfr::data::Dataset {
                samples: Vec::new(),
                sources: Vec::new(),
            },
        )
    } else {
        attack::split_holdout(&ds, a.val, a.val_seed.unwrap_or(a.seed))?
    };
    let mut ckpt = a.out.clone().into_os_string();
    ckpt.push(".ckpt");
    let ckpt = PathBuf::from(ckpt);
    let device = model.device().clone();
    let mut defense = if a.resume && ckpt.is_file() {
        let d = Defense::load(&ckpt, &model, &device)
            .with_context(|| format!("resuming from {}", ckpt.display()))?;
        if !quiet {
            eprintln!(
                "resuming from {} ({} epochs done)",
                ckpt.display(),
                d.meta
                    .training
                    .get("epochs_done")
                    .and_then(|v| v.as_u64())
                    .unwrap_or(0)
            );
        }
        d
    } else {
        let opts = PlanOptions {
            sites: a.sites.clone(),
            fraction: a.fraction,
            width_ratio: a.width,
            selection: a.selection,
            seed: a.seed,
            method: a.method,
            prn_width: a.prn_width,
            gate: a.gate,
        };
        Defense::plant(&model, &opts, &device)?
    };
    let pb = progress_bar(train.samples.len(), quiet, "defend");
    let lines = !quiet && !std::io::stderr().is_terminal();
    let mut last_epoch = 0;
    let t0 = std::time::Instant::now();
    let history = sfr::defense::train::train(
        &model,
        &mut defense,
        &train,
        &val,
        &uaps,
        &cfg,
        Some(&ckpt),
        &mut |p| {
            pb.set_length(p.total as u64);
            pb.set_position(p.done as u64);
            let mut msg = format!("epoch {}/{}", p.epoch, cfg.epochs);
            if let Some(l) = p.mean_loss {
                msg.push_str(&format!(" mean loss {l:.3}"));
            }
            // During an epoch the validation shown is the last finished epoch's; the report
            // that closes an epoch (no batch loss) carries its own.
            if let Some(r) = p.val_restoration {
                let which = if p.loss.is_none() {
                    ""
                } else {
                    " (last epoch)"
                };
                msg.push_str(&format!(" val restoration{which} {r:.3}"));
            }
            pb.set_message(msg.clone());
            if lines && p.loss.is_none() && p.epoch != last_epoch {
                eprintln!("{msg}");
                last_epoch = p.epoch;
            }
        },
    )?;
    pb.finish_and_clear();
    defense.save(&a.out)?;
    let _ = std::fs::remove_file(&ckpt);
    Ok((
        defense,
        history,
        val.samples.len(),
        t0.elapsed().as_secs_f64(),
    ))
}

/// `OUT` with `.seedK` before its extension (`def.safetensors` → `def.seed3.safetensors`), or
/// with `.NAME` for the summary.
fn beside(out: &std::path::Path, tag: &str, ext: &str) -> PathBuf {
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    out.with_file_name(format!("{stem}.{tag}.{ext}"))
}

/// The validation of the epoch a defence file kept.
fn kept_validation(d: &Defense) -> Option<serde_json::Value> {
    let t = &d.meta.training;
    let h = t.get("validation")?.as_array()?;
    let e = t
        .get("selected_epoch")
        .and_then(|v| v.as_u64())
        .map_or(h.len(), |e| e as usize);
    h.get(e.checked_sub(1)?).cloned()
}

/// Mean, sample standard deviation, min and max.
fn spread(xs: &[f64]) -> serde_json::Value {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let sd = if xs.len() > 1 {
        (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    let min = xs.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = xs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    json!({ "mean": mean, "sd": sd, "min": min, "max": max, "values": xs })
}

/// `sfr defend --seeds N`: N trainings from consecutive seeds on one validation split, each
/// written (and, with --resume, reused when its file exists), and their figures' mean and spread.
fn seeds_cmd(a: DefendArgs, quiet: bool) -> Result<()> {
    let val_seed = a.val_seed.unwrap_or(a.seed);
    if a.val == 0 {
        bail!("--seeds compares the seeds on the validation split; give --val > 0");
    }
    let summary_path = beside(&a.out, "seeds", "json");
    let mut runs = Vec::new();
    let (mut ra, mut clean, mut drop) = (Vec::new(), Vec::new(), Vec::new());
    for k in 0..a.seeds {
        let mut one = a.clone();
        one.seed = a.seed + k as u64;
        one.seeds = 1;
        one.val_seed = Some(val_seed);
        one.out = beside(&a.out, &format!("seed{}", one.seed), "safetensors");
        let (defense, seconds) = if a.resume && one.out.is_file() {
            let model = load_model(&a.model, true)?;
            let d = Defense::load(&one.out, &model, model.device())
                .with_context(|| format!("reusing {}", one.out.display()))?;
            if !quiet {
                eprintln!("seed {}: reusing {}", one.seed, one.out.display());
            }
            let s = d.meta.training["seconds"].as_f64().unwrap_or(f64::NAN);
            (d, s)
        } else {
            if !quiet {
                eprintln!("seed {} ({}/{}):", one.seed, k + 1, a.seeds);
            }
            let out = one.out.clone();
            let (d, _, _, s) = defend_run(one, quiet).with_context(|| {
                format!("training seed {} ({})", a.seed + k as u64, out.display())
            })?;
            (d, s)
        };
        let v = kept_validation(&defense).context("the defence file records no validation")?;
        let f = |key: &str| v[key].as_f64().unwrap_or(f64::NAN);
        ra.push(f("restoration_accuracy"));
        clean.push(f("defended_clean_top1"));
        drop.push(f("baseline_clean_top1") - f("defended_clean_top1"));
        runs.push(json!({
            "seed": a.seed + k as u64,
            "file": beside(&a.out, &format!("seed{}", a.seed + k as u64), "safetensors"),
            "selected_epoch": defense.meta.training.get("selected_epoch"),
            "validation": v,
            "seconds": seconds,
        }));
        // After each seed, so a kill loses at most the seed in progress.
        let summary = json!({
            "seeds": runs.len(),
            "val_seed": val_seed,
            "val_images": a.val,
            "restoration_accuracy": spread(&ra),
            "defended_clean_top1": spread(&clean),
            "clean_top1_drop": spread(&drop),
            "definition": "each seed's validation at its kept epoch; sd is the sample standard deviation",
            "runs": runs,
        });
        sfr::atomic::write_atomic(
            &summary_path,
            serde_json::to_string_pretty(&summary)?.as_bytes(),
        )?;
        if k + 1 == a.seeds {
            if a.json {
                println!("{}", serde_json::to_string(&summary)?);
            } else {
                let pm = |v: &serde_json::Value| {
                    format!(
                        "{:.4} ± {:.4} (min {:.4}, max {:.4})",
                        v["mean"].as_f64().unwrap_or(f64::NAN),
                        v["sd"].as_f64().unwrap_or(f64::NAN),
                        v["min"].as_f64().unwrap_or(f64::NAN),
                        v["max"].as_f64().unwrap_or(f64::NAN)
                    )
                };
                println!(
                    "wrote {} defences and {}; validation ({} images, split seed {val_seed}):",
                    a.seeds,
                    summary_path.display(),
                    a.val
                );
                println!(
                    "  restoration accuracy {}",
                    pm(&summary["restoration_accuracy"])
                );
                println!(
                    "  defended clean top-1 {}",
                    pm(&summary["defended_clean_top1"])
                );
                println!("  clean top-1 drop     {}", pm(&summary["clean_top1_drop"]));
            }
        }
    }
    Ok(())
}
