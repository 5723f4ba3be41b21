//! `sfr classify`: the top-5 classes of each image.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use serde_json::json;

use sfr::defense::Defense;
use sfr::eval::{self};
use sfr::zoo::NoTap;

use crate::common::*;

#[derive(Args)]
pub(crate) struct ClassifyArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Images (JPEG or PNG).
    #[arg(required = true)]
    pub(crate) images: Vec<PathBuf>,
    /// Class table (TSV: index, synset, name); default: fetched.
    #[arg(long)]
    pub(crate) classes: Option<PathBuf>,
    /// Classify with the defended network (an `sfr defend` file for this backbone).
    #[arg(long)]
    pub(crate) defense: Option<PathBuf>,
    /// One JSON object on stdout.
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) fn classify_cmd(a: ClassifyArgs, quiet: bool) -> Result<()> {
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
