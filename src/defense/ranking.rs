//! Filter ranking by susceptibility: a filter's ℓ1 weight norm bounds how far additive noise can
//! move its response (‖W_j ∗ r‖∞ ≤ ‖W_j‖₁ · ‖r‖∞), so larger norms rank first.

use burn::tensor::{Tensor, TensorData};
use serde::Serialize;

use crate::classifier::{argmax, load_batch, logits_rows};
use crate::data::Dataset;
use crate::error::{Result, SfrError};
use crate::perturbation::{self, Perturbation};
use crate::zoo::{Model, NoTap, Record, Tap};

/// One site's channels, most susceptible first.
#[derive(Debug, Clone, Serialize)]
pub struct SiteRanking {
    /// Site name.
    pub site: String,
    /// Channel indices ordered by descending ℓ1 norm (ties by index).
    pub order: Vec<usize>,
    /// ℓ1 norm of each channel's filter, indexed by channel (bias excluded).
    pub l1: Vec<f64>,
}

/// Rank the output channels of the conv at `site` by the ℓ1 norm of their filters.
pub fn rank_site(model: &Model, site: &str) -> Result<SiteRanking> {
    let conv = model.conv(site).ok_or_else(|| {
        SfrError::param(
            "site",
            format!(
                "`{site}` is not a site of {} (`sfr rank` lists them)",
                model.spec().name
            ),
        )
    })?;
    let [c, cin, kh, kw] = conv.weight.dims();
    let w = conv
        .weight
        .clone()
        .into_data()
        .try_into_vec::<f32>()
        .map_err(|e| {
            SfrError::param(
                "site",
                format!("cannot read the weights of `{site}`: {e:?}"),
            )
        })?;
    let per = cin * kh * kw;
    let l1: Vec<f64> = (0..c)
        .map(|j| {
            w[j * per..(j + 1) * per]
                .iter()
                .map(|v| v.abs() as f64)
                .sum()
        })
        .collect();
    let mut order: Vec<usize> = (0..c).collect();
    order.sort_by(|&a, &b| l1[b].total_cmp(&l1[a]).then(a.cmp(&b)));
    Ok(SiteRanking {
        site: site.to_string(),
        order,
        l1,
    })
}

/// Rank every site of the model.
pub fn rank_all(model: &Model) -> Result<Vec<SiteRanking>> {
    model
        .sites()
        .iter()
        .map(|s| rank_site(model, &s.name))
        .collect()
}

/// One row of the masking experiment: at one site, the perturbed activations of k channels are
/// replaced by their clean values and the top-1 accuracy is measured.
#[derive(Debug, Clone, Serialize)]
pub struct MaskRow {
    /// Site.
    pub site: String,
    /// Channels at the site.
    pub channels: usize,
    /// Channels restored.
    pub k: usize,
    /// Top-1 on clean images.
    pub clean_top1: f64,
    /// Top-1 on perturbed images, nothing restored.
    pub perturbed_top1: f64,
    /// Top-1 with the k highest-ranked (largest ℓ1) channels restored.
    pub top_k_restored_top1: f64,
    /// Top-1 with the k lowest-ranked channels restored.
    pub bottom_k_restored_top1: f64,
    /// Labelled images measured.
    pub n: usize,
}

/// Replaces the masked channels of one site by the given (clean) activation.
struct Restore<'a> {
    site: &'a str,
    clean: Tensor<4>,
    mask: Tensor<4>,
}

impl Tap for Restore<'_> {
    fn wants(&self, site: &str) -> bool {
        site == self.site
    }

    fn visit(&mut self, site: &str, x: Tensor<4>) -> Tensor<4> {
        if site != self.site {
            return x;
        }
        let keep = self.mask.clone().neg().add_scalar(1.0);
        x * keep + self.clean.clone() * self.mask.clone()
    }
}

/// The paper's masking experiment (its evidence for ranking by ℓ1 norm): for each site and
/// each k (a fraction of the site's channels), the accuracy on perturbed images when
/// the activations of the top-k, or of the bottom-k, ranked channels are replaced by their
/// clean values; one site at a time, the rest of the network untouched.
#[allow(clippy::too_many_arguments)]
pub fn masking(
    model: &Model,
    data: &Dataset,
    perturbation: &Perturbation,
    sites: &[String],
    fractions: &[f64],
    clip: bool,
    batch_size: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<MaskRow>> {
    if batch_size == 0 {
        return Err(SfrError::param("--batch-size", "must be at least 1"));
    }
    if let Some(f) = fractions.iter().find(|f| !(**f > 0.0 && **f <= 1.0)) {
        return Err(SfrError::param(
            "--fraction",
            format!("must be in (0, 1], got {f}"),
        ));
    }
    perturbation.check_size(model.spec().input_size, "the masking perturbation")?;
    let ordered = model.order_sites(sites)?;
    let rankings: Vec<SiteRanking> = ordered
        .iter()
        .map(|s| rank_site(model, s))
        .collect::<Result<_>>()?;
    let dev = model.device().clone();
    let v = perturbation.to_tensor(&dev);
    // Per site, per fraction: (k, top mask, bottom mask).
    let masks: Vec<Vec<(usize, Tensor<4>, Tensor<4>)>> = rankings
        .iter()
        .map(|r| {
            let c = r.order.len();
            fractions
                .iter()
                .map(|f| {
                    let k = ((c as f64 * f).floor() as usize).clamp(1, c);
                    let mk = |chans: &[usize]| {
                        let mut m = vec![0f32; c];
                        for &ch in chans {
                            m[ch] = 1.0;
                        }
                        Tensor::<4>::from_data(TensorData::new(m, [1, c, 1, 1]), &dev)
                    };
                    (k, mk(&r.order[..k]), mk(&r.order[c - k..]))
                })
                .collect()
        })
        .collect();
    let nf = fractions.len();
    let (mut n, mut clean_ok, mut pert_ok) = (0usize, 0usize, 0usize);
    let mut top_ok = vec![vec![0usize; nf]; ordered.len()];
    let mut bottom_ok = vec![vec![0usize; nf]; ordered.len()];
    let total = data.samples.len();
    let mut done = 0;
    let correct = |logits: Tensor<2>, labels: &[Option<usize>]| -> Result<usize> {
        Ok(logits_rows(logits)?
            .iter()
            .zip(labels)
            .filter(|(r, l)| l.is_some_and(|l| argmax(r) == l))
            .count())
    };
    for chunk in data.samples.chunks(batch_size) {
        done += chunk.len();
        let (batch, _) = load_batch(model, chunk, false)?;
        let Some(b) = batch else {
            progress(done, total);
            continue;
        };
        let labels: Vec<Option<usize>> = b.samples.iter().map(|s| s.label).collect();
        n += labels.iter().filter(|l| l.is_some()).count();
        let mut rec = Record::new(&ordered);
        clean_ok += correct(model.forward_pixels(b.pixels.clone(), &mut rec), &labels)?;
        let xp = perturbation::apply(b.pixels, v.clone(), clip);
        pert_ok += correct(model.forward_pixels(xp.clone(), &mut NoTap), &labels)?;
        for (si, (_, clean)) in rec.out.into_iter().enumerate() {
            for (fi, (_, top, bottom)) in masks[si].iter().enumerate() {
                for (mask, acc) in [(top, &mut top_ok), (bottom, &mut bottom_ok)] {
                    let mut tap = Restore {
                        site: &ordered[si],
                        clean: clean.clone(),
                        mask: mask.clone(),
                    };
                    acc[si][fi] += correct(model.forward_pixels(xp.clone(), &mut tap), &labels)?;
                }
            }
        }
        progress(done, total);
    }
    if n == 0 {
        return Err(SfrError::NoImages(
            "no labelled image could be read for the masking experiment".into(),
        ));
    }
    let r = |k: usize| k as f64 / n as f64;
    let mut rows = Vec::new();
    for (si, site) in ordered.iter().enumerate() {
        for (fi, (k, _, _)) in masks[si].iter().enumerate() {
            rows.push(MaskRow {
                site: site.clone(),
                channels: rankings[si].order.len(),
                k: *k,
                clean_top1: r(clean_ok),
                perturbed_top1: r(pert_ok),
                top_k_restored_top1: r(top_ok[si][fi]),
                bottom_k_restored_top1: r(bottom_ok[si][fi]),
                n,
            });
        }
    }
    Ok(rows)
}
