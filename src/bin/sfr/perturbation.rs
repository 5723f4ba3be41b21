//! `sfr perturbation`: inspect, show and import perturbation files.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use serde_json::json;

use sfr::perturbation::{Fit, ImportOptions, Layout, Norm, Perturbation};

#[derive(Subcommand)]
pub(crate) enum PerturbationCmd {
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
        #[arg(long, conflicts_with = "model")]
        size: Option<usize>,
        /// Crop or resize to this model's input size: an architecture or an ONNX file.
        #[arg(long, short)]
        model: Option<String>,
        #[command(flatten)]
        onnx: crate::common::OnnxArgs,
        /// How to reach --size.
        #[arg(long, value_enum, default_value_t = Fit::Crop)]
        fit: Fit,
        /// One JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
}

pub(crate) fn perturbation_cmd(c: PerturbationCmd) -> Result<()> {
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
            model,
            onnx,
            fit,
            json,
        } => {
            let size = match model {
                Some(m) if crate::common::is_onnx(&m) => {
                    let path = PathBuf::from(&m);
                    let device = sfr::device::default_device();
                    let (model, _) = sfr::zoo::load_onnx(&path, &onnx.preprocess(&path)?, &device)?;
                    Some(model.spec().input_size)
                }
                Some(m) => {
                    anyhow::ensure!(
                        !onnx.given(),
                        "--input-size, --resize, --resize-mode, --mean, --std and --bgr are for ONNX models; `{m}` is a zoo architecture"
                    );
                    Some(sfr::zoo::spec(&m)?.input_size)
                }
                None => size,
            };
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
