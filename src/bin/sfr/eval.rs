//! `sfr eval`: top-1/top-5, fooling rate and restoration accuracy on labelled images.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use sfr::defense::Defense;
use sfr::eval::{self, EvalOptions};
use sfr::perturbation::Fit;

use crate::common::*;

#[derive(Args)]
pub(crate) struct EvalArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    #[command(flatten)]
    pub(crate) data: DataArgs,
    /// Images per forward pass.
    #[arg(long, default_value_t = 32)]
    pub(crate) batch_size: usize,
    /// Fail on an unreadable image instead of skipping it (skips are always reported).
    #[arg(long)]
    pub(crate) strict: bool,
    /// Also evaluate every image perturbed; with several files each image gets one chosen at
    /// random from --seed (the paper's protocol). sfr .safetensors, or a published .npy/.mat/.h5.
    #[arg(long = "perturbation", short = 'p')]
    pub(crate) perturbations: Vec<PathBuf>,
    /// Make perturbations of another size fit the model's input.
    #[arg(long, value_enum)]
    pub(crate) fit: Option<Fit>,
    /// Do not clip perturbed pixels to [0, 255] (the paper's release does not clip).
    #[arg(long)]
    pub(crate) no_clip: bool,
    /// Seed of the per-image choice among perturbations.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Also evaluate the defended network (an `sfr defend` file for this backbone).
    #[arg(long)]
    pub(crate) defense: Option<PathBuf>,
    /// Exactly one JSON object on stdout.
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) fn eval_cmd(a: EvalArgs, quiet: bool) -> Result<()> {
    let model = load_model(&a.model, quiet)?;
    let ds = a.data.open(quiet)?;
    let pb = progress_bar(ds.samples.len(), quiet, &format!("eval {}", a.model.model));
    let opts = EvalOptions {
        batch_size: a.batch_size,
        strict: a.strict,
        clip: !a.no_clip,
        seed: a.seed,
    };
    let perts = load_perturbations(&a.perturbations, a.fit, model.spec().input_size)?;
    let mut defense = match &a.defense {
        Some(p) => Some(
            Defense::load(p, &model, model.device())
                .with_context(|| format!("loading defence {}", p.display()))?,
        ),
        None => None,
    };
    let dname = a
        .defense
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let report = eval::evaluate(
        &model,
        &ds,
        &perts,
        defense.as_mut().map(|d| (dname.as_str(), d)),
        &opts,
        &mut |done, _| pb.set_position(done as u64),
    )?;
    pb.finish_and_clear();
    if !quiet {
        for s in report.skipped.iter().take(10) {
            eprintln!("skipped {}: {}", s.file.display(), s.error);
        }
        if report.skipped.len() > 10 {
            eprintln!("… and {} more skipped images", report.skipped.len() - 10);
        }
    }
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("model      {}", report.model);
        println!(
            "data       {} ({} images, {} skipped)",
            report.data.join(" + "),
            report.n,
            report.skipped.len()
        );
        println!(
            "top-1      {:.4}  (clean accuracy: label = top prediction)",
            report.clean_top1
        );
        println!("top-5      {:.4}", report.clean_top5);
        if let Some(at) = &report.attacked {
            println!(
                "attacked   {} perturbation file(s), one per image at random (seed {}), pixels {}",
                at.perturbations.len(),
                at.seed,
                if at.clip {
                    "clipped to [0, 255]"
                } else {
                    "not clipped"
                }
            );
            println!("perturbed top-1     {:.4}", at.perturbed_top1);
            println!(
                "fooling rate        {:.4}  (top-1 label changed vs the clean prediction)",
                at.fooling_rate
            );
            println!(
                "error rate          {:.4}  (perturbed images misclassified)",
                at.error_rate
            );
            println!(
                "restoration (none)  {:.4}  ((clean + perturbed top-1) / (2 · clean top-1), undefended)",
                at.restoration_accuracy_baseline
            );
            if let (Some(t), Some(r)) = (at.target_class, at.targeted_success_rate) {
                println!(
                    "targeted success    {r:.4}  (images sent to class {t}, of those not predicted {t} clean)"
                );
            }
        }
        if let Some(d) = &report.defended {
            println!("defence    {}", d.defense);
            println!("defended clean top-1      {:.4}", d.defended_clean_top1);
            if let (Some(p), Some(r)) = (d.defended_perturbed_top1, d.restoration_accuracy) {
                println!("defended perturbed top-1  {p:.4}");
                println!(
                    "restoration accuracy      {r:.4}  ((defended clean + defended perturbed top-1) / (2 · undefended clean top-1))"
                );
            }
            if let Some(r) = d.defended_targeted_success_rate {
                println!("defended targeted success {r:.4}");
            }
        }
        println!(
            "speed      {:.1} images/s ({:.1} s, batch {}, {})",
            report.images_per_second, report.seconds, report.batch_size, report.device
        );
    }
    Ok(())
}
