//! `sfr suite`: attack rows against defence columns, and the report.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;

use sfr::attack::activations::Prior;
use sfr::attack::sgd::SgdConfig;
use sfr::attack::{self};
use sfr::data::Dataset;
use sfr::defense::Defense;
use sfr::perturbation::Norm;
use sfr::zoo::Model;

use crate::common::*;

#[derive(Args)]
pub(crate) struct SuiteArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// The defence to evaluate (an `sfr defend` file for this backbone).
    #[arg(long, required = true)]
    pub(crate) defense: PathBuf,
    /// A learned rival to compare with, in a column of its own (an `sfr defend --method prn`
    /// file, or another `sfr defend` file for this backbone; repeat). With --generate-from it
    /// also gets an adaptive row through it.
    #[arg(long = "rival")]
    pub(crate) rivals: Vec<PathBuf>,
    #[command(flatten)]
    pub(crate) data: DataArgs,
    /// Perturbation files to evaluate, one row each (`NAME=FILE`, or FILE named by its stem);
    /// the row's kind (seen, unseen, stronger, …) is read from its metadata.
    #[arg(long = "attack")]
    pub(crate) attacks: Vec<String>,
    /// A folder of published perturbations laid out like ../shared/attacks (lts4/, sfr-release/):
    /// one transferred row per family.
    #[arg(long)]
    pub(crate) published: Option<PathBuf>,
    /// Images to compute the suite's own attacks from (never the evaluation images); without
    /// it only --attack and --published rows are evaluated.
    #[arg(long)]
    pub(crate) generate_from: Vec<PathBuf>,
    /// Use at most N generation images.
    #[arg(long)]
    pub(crate) generate_limit: Option<usize>,
    /// The attack the defence was trained on (the seen kind; also the stronger and cross-norm
    /// rows' kind).
    #[arg(long, value_enum, default_value_t = SeenKind::Sgd)]
    pub(crate) seen: SeenKind,
    /// Norm of the defence's training perturbations.
    #[arg(long, value_enum, default_value_t = Norm::Linf)]
    pub(crate) norm: Norm,
    /// Budget of the defence's training perturbations.
    #[arg(long, default_value_t = 10.0)]
    pub(crate) eps: f64,
    /// Stronger ℓ∞ budgets to generate.
    #[arg(long, value_delimiter = ',', default_value = "15,20,25")]
    pub(crate) stronger: Vec<f64>,
    /// ℓ2 budget of the cross-norm row (0: none).
    #[arg(long, default_value_t = 2000.0)]
    cross_l2: f64,
    /// sgd passes over the generation images.
    #[arg(long, default_value_t = 6)]
    pub(crate) attack_epochs: usize,
    /// FFF and GD-UAP iterations (0: no rows).
    #[arg(long, default_value_t = 200)]
    pub(crate) activation_iterations: usize,
    /// DeepFool-UAP: images of its one pass (0: no row; it costs about 0.5–1 s per image on 2 cores).
    #[arg(long, default_value_t = 100)]
    pub(crate) deepfool_images: usize,
    /// No adaptive attacks (through the defence, and straight through each baseline).
    #[arg(long)]
    pub(crate) no_adaptive: bool,
    /// Images per batch.
    #[arg(long, default_value_t = 32)]
    pub(crate) batch_size: usize,
    /// Seed (per-image choice of perturbation; the generated attacks use seed + 100).
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Do not clip perturbed pixels to [0, 255].
    #[arg(long)]
    pub(crate) no_clip: bool,
    /// Example images in the report.
    #[arg(long, default_value_t = 4)]
    pub(crate) examples: usize,
    /// Output folder (report.json, report.md, plots, the generated attacks).
    #[arg(long, short)]
    pub(crate) out: PathBuf,
    /// Print report.json's content as one JSON object on stdout.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum SeenKind {
    /// SGD-UAP.
    Sgd,
    /// FFF.
    Fff,
    /// GD-UAP, no prior.
    Gduap,
    /// GD-UAP, range prior.
    GduapRange,
    /// GD-UAP, data prior.
    GduapData,
}

impl SeenKind {
    pub(crate) fn kind(self) -> sfr::eval::generate::Kind {
        use sfr::eval::generate::Kind;
        match self {
            SeenKind::Sgd => Kind::Sgd,
            SeenKind::Fff => Kind::Fff,
            SeenKind::Gduap => Kind::GdUap(Prior::None),
            SeenKind::GduapRange => Kind::GdUap(Prior::Range),
            SeenKind::GduapData => Kind::GdUap(Prior::Data),
        }
    }

    pub(crate) fn attack(self) -> &'static str {
        match self {
            SeenKind::Sgd => "sgd",
            SeenKind::Fff => "fff",
            _ => "gduap",
        }
    }
}

/// Generate (or reuse) the suite's own attacks with a progress bar.
pub(crate) fn generate_rows(
    plan: &sfr::eval::generate::GeneratePlan,
    model: &Model,
    defense: &Defense,
    data: &Dataset,
    dir: &Path,
    quiet: bool,
    t0: std::time::Instant,
) -> Result<Vec<sfr::eval::suite::AttackRow>> {
    let names = sfr::eval::generate::planned_names(plan);
    let pb = progress_bar(data.samples.len(), quiet, "attacks");
    let lines = !quiet && !std::io::stderr().is_terminal();
    let mut current = String::new();
    let rows = sfr::eval::generate::generate(plan, model, defense, data, dir, &mut |name, p| {
        if name != current {
            current = name.to_string();
            let k = names.iter().position(|n| n == name).map_or(0, |i| i + 1);
            if lines {
                eprintln!(
                    "[{:>4.0} s] attack {k}/{}: {name}",
                    t0.elapsed().as_secs_f64(),
                    names.len()
                );
            }
        }
        pb.set_length(p.total as u64);
        pb.set_position(p.done as u64);
        let mut msg = format!("{name}: {}", p.phase);
        if let Some(f) = p.holdout_fooling_rate {
            msg.push_str(&format!(" held-out fooling {f:.3}"));
        }
        pb.set_message(msg);
    })?;
    pb.finish_and_clear();
    Ok(rows)
}

/// Evaluate the rows and write the report, with a progress bar.
#[allow(clippy::too_many_arguments)]
fn evaluate_and_report(
    model: &Model,
    defense: &mut Defense,
    defense_file: &Path,
    data: &Dataset,
    rows: &[sfr::eval::suite::AttackRow],
    opts: &sfr::eval::suite::SuiteOptions,
    out: &Path,
    quiet: bool,
) -> Result<(sfr::eval::suite::SuiteReport, sfr::eval::report::Written)> {
    let pb = progress_bar(data.samples.len(), quiet, "suite");
    pb.set_message(format!(
        "suite: {} attack rows × {} defences",
        rows.len(),
        2 + opts.rivals.len() + opts.baselines.len()
    ));
    let result = sfr::eval::assemble::evaluate_and_report(
        model,
        defense,
        defense_file,
        data,
        rows,
        opts,
        out,
        &mut |d, t| {
            pb.set_length(t as u64);
            pb.set_position(d as u64);
        },
        &mut note(quiet),
    );
    pb.finish_and_clear();
    Ok(result?)
}

pub(crate) fn suite_cmd(a: SuiteArgs, quiet: bool) -> Result<()> {
    sfr::perturbation::check_eps(a.norm, a.eps)?;
    if let Some(e) = a.stronger.iter().find(|e| !(e.is_finite() && **e > 0.0)) {
        bail!("invalid --stronger: every budget must be a positive number, got {e}");
    }
    if !(a.cross_l2.is_finite() && a.cross_l2 >= 0.0) {
        bail!(
            "invalid --cross-l2: must be a positive ℓ2 budget (0 for no row), got {}",
            a.cross_l2
        );
    }
    if a.out.is_file() {
        bail!("--out {} is a file; give a folder", a.out.display());
    }
    let model = load_model(&a.model, quiet)?;
    let size = model.spec().input_size;
    let mut defense = Defense::load(&a.defense, &model, model.device())
        .with_context(|| format!("reading the defence {}", a.defense.display()))?;
    let mut rival_files = Vec::new();
    for f in &a.rivals {
        let d = Defense::load(f, &model, model.device())
            .with_context(|| format!("reading the rival {}", f.display()))?;
        rival_files.push((f.display().to_string(), d));
    }
    let rivals = sfr::eval::suite::name_rivals(&defense, rival_files);
    let data = a.data.open(quiet)?;
    let mut rows = Vec::new();
    if !a.generate_from.is_empty() {
        let gen_data = open_data(
            &a.generate_from,
            &a.data.slice.classes,
            0,
            a.generate_limit,
            quiet,
        )?;
        let eval_paths: std::collections::HashSet<_> =
            data.samples.iter().map(|s| s.path.clone()).collect();
        if let Some(s) = gen_data
            .samples
            .iter()
            .find(|s| eval_paths.contains(&s.path))
        {
            bail!(
                "{} is both an evaluation image and an attack-generation image; the suite's attacks must come from other images",
                s.path.display()
            );
        }
        let plan = sfr::eval::generate::GeneratePlan {
            seed: a.seed,
            seen: (a.seen.kind(), a.norm, a.eps),
            unseen: vec![
                sfr::eval::generate::Kind::Sgd,
                sfr::eval::generate::Kind::Fff,
                sfr::eval::generate::Kind::GdUap(Prior::Range),
            ],
            stronger: a.stronger.clone(),
            cross_l2: (a.cross_l2 > 0.0).then_some(a.cross_l2),
            sgd: SgdConfig {
                epochs: a.attack_epochs,
                ..SgdConfig::default()
            },
            activation_iterations: a.activation_iterations,
            deepfool: (a.deepfool_images > 0).then(|| attack::deepfool::DeepFoolConfig {
                max_passes: 1,
                max_images_per_pass: Some(a.deepfool_images),
                overshoot: attack::deepfool::ONE_PASS_OVERSHOOT,
                ..Default::default()
            }),
            adaptive: !a.no_adaptive,
            rivals: rivals.clone(),
            adaptive_baselines: if a.no_adaptive {
                Vec::new()
            } else {
                sfr::defense::baselines::ImageDefense::suite()
            },
            holdout: 50,
            batch_size: a.batch_size,
            clip: !a.no_clip,
        };
        rows.extend(generate_rows(
            &plan,
            &model,
            &defense,
            &gen_data,
            &a.out.join("attacks"),
            quiet,
            std::time::Instant::now(),
        )?);
    }
    rows.extend(sfr::eval::assemble::rows_from_specs(
        &a.attacks,
        size,
        (a.seen.attack(), a.norm, a.eps),
    )?);
    if let Some(dir) = &a.published {
        rows.extend(sfr::eval::suite::published_rows(dir, size)?);
    }
    if rows.is_empty() {
        bail!("nothing to evaluate: give --generate-from DIR, --attack FILE or --published DIR");
    }
    let opts = sfr::eval::suite::SuiteOptions {
        batch_size: a.batch_size,
        seed: a.seed,
        clip: !a.no_clip,
        examples: a.examples,
        rivals,
        ..Default::default()
    };
    let (report, written) = evaluate_and_report(
        &model,
        &mut defense,
        &a.defense,
        &data,
        &rows,
        &opts,
        &a.out,
        quiet,
    )?;
    print_suite(&report, &written, a.json)
}
