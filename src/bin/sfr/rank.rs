//! `sfr rank`: the sites, their channel ranking, and the masking experiment.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use serde_json::json;

use crate::common::*;

#[derive(Args)]
pub(crate) struct RankArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Only these sites (default: every site; with --mask, the default FRU sites).
    #[arg(long, value_delimiter = ',')]
    pub(crate) sites: Vec<String>,
    /// The masking experiment: top-1 on perturbed images when the top-k versus the bottom-k
    /// ranked channels of one site get their clean activations back (needs --data and
    /// --perturbation).
    #[arg(long, requires_all = ["data", "perturbation"])]
    pub(crate) mask: bool,
    #[command(flatten)]
    pub(crate) data: DataArgs,
    /// The perturbation for --mask.
    #[arg(long, short)]
    pub(crate) perturbation: Option<PathBuf>,
    /// Fractions of a site's channels restored (k = ⌊C·f⌋).
    #[arg(long, value_delimiter = ',', default_value = "0.25,0.5")]
    pub(crate) fraction: Vec<f64>,
    /// Images per batch.
    #[arg(long, default_value_t = 16)]
    pub(crate) batch_size: usize,
    /// Do not clip perturbed pixels to [0, 255].
    #[arg(long)]
    pub(crate) no_clip: bool,
    /// One JSON object on stdout.
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) fn rank_cmd(a: RankArgs, quiet: bool) -> Result<()> {
    if a.mask {
        return mask_cmd(a, quiet);
    }
    let model = load_model(&a.model, quiet)?;
    let sites: Vec<String> = if a.sites.is_empty() {
        model.sites().into_iter().map(|s| s.name).collect()
    } else {
        sfr::defense::resolve_sites(&model, &a.sites)?
    };
    let hand = sfr::defense::hand_sites(&model);
    let rule = sfr::defense::rule_sites(&model).unwrap_or_default();
    let defaults = hand.clone().unwrap_or_else(|| rule.clone());
    let mut out = Vec::new();
    for s in &sites {
        out.push(sfr::defense::ranking::rank_site(&model, s)?);
    }
    if a.json {
        println!(
            "{}",
            serde_json::to_string(&json!({
                "model": model.spec().name,
                "default_sites": defaults,
                "hand_sites": hand,
                "rule_sites": rule,
                "rule": sfr::defense::RULE,
                "sites": out
            }))?
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
            let mark = match (defaults.contains(&r.site), rule.contains(&r.site)) {
                (true, true) => " * r",
                (true, false) => " *",
                (false, true) => "   r",
                (false, false) => "",
            };
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
        match &hand {
            Some(_) => println!(
                "* default FRU site for {} (its hand placement)",
                model.spec().name
            ),
            None => println!(
                "* default FRU site for {} (no hand placement: the rule's)",
                model.spec().name
            ),
        }
        println!(
            "r the site rule's choice (`sfr defend --sites rule`): {}",
            sfr::defense::RULE
        );
    }
    Ok(())
}

pub(crate) fn mask_cmd(a: RankArgs, quiet: bool) -> Result<()> {
    let model = load_model(&a.model, quiet)?;
    let sites = sfr::defense::resolve_sites(&model, &a.sites)?;
    let file = a
        .perturbation
        .clone()
        .context("--mask needs --perturbation FILE")?;
    let p = load_perturbations(std::slice::from_ref(&file), None, model.spec().input_size)?
        .remove(0)
        .1;
    let ds = a.data.open(quiet)?;
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
