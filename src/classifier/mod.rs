//! The layer every later stage runs networks through: a [`Classifier`] (a zoo model, optionally
//! with FRUs planted at its sites) that turns batches of images into logits, predictions and
//! input gradients; the batching of images into tensors ([`batch`]); the FRU units and the tap
//! that plants them ([`fru`]).
//!
//! Attacks, the defence's training and ranking, and evaluation all use this layer and none of
//! them imports another: data → zoo → classifier → attack / defense → eval.

pub mod batch;
pub mod fru;

use burn::module::Module;
use burn::tensor::{Int, Tensor, TensorData};

pub use batch::{Batch, Skipped, load_batch, logits_rows, prepare_image};
use fru::{BnStats, FruSet, Placement, Regenerate};

use crate::data::Sample;
use crate::error::{Result, SfrError};
use crate::perturbation;
use crate::zoo::{Model, NoTap};

/// A network as every later stage uses it: a zoo model, optionally with trained FRUs planted at
/// its sites (frozen: nothing run through a classifier changes the units).
pub struct Classifier<'a> {
    /// The backbone.
    pub model: &'a Model,
    defended: Option<FrozenDefense>,
    filter: Option<&'a dyn InputFilter>,
}

/// An image-domain defence in front of the network (`defense::baselines::ImageDefense`
/// implements it): a transform of RGB pixels on the 0–255 scale. Gradients pass it straight
/// through (BPDA: JPEG, median and bit-depth reduction have no useful derivative).
pub trait InputFilter: Sync {
    /// Fail with a sentence when the filter cannot run (an impossible parameter).
    fn check(&self) -> Result<()>;
    /// The filtered batch (`[n, 3, h, w]`); only called after [`InputFilter::check`] passed.
    fn filter(&self, pixels: Tensor<4>) -> Tensor<4>;
    /// A short identifier.
    fn id(&self) -> String;
    /// What an artefact made through the filter records about it.
    fn describe(&self) -> serde_json::Value;
}

/// Trained FRUs as a defence plants them: the units, where they act, their statistics.
#[derive(Debug, Clone)]
pub struct Planted {
    /// The units, in site order.
    pub frus: FruSet,
    /// Their placements (same order).
    pub placements: Vec<Placement>,
    /// Their batch-norm running statistics.
    pub stats: BnStats,
    /// The backbone convs whose weights the defence changes (`frus.deltas`, same order).
    pub tuned: Vec<String>,
}

/// Something that plants FRUs on a backbone: a defence file (`defense::Defense`) implements it,
/// so that this layer needs nothing of the stages above it.
pub trait Plant {
    /// The units for `model`; an error names the mismatch when they were trained on another
    /// backbone.
    fn plant(&self, model: &Model) -> Result<Planted>;
    /// A short identifier (recorded by runs made through the units).
    fn id(&self) -> String;
    /// What an artefact made through the units records about them.
    fn describe(&self) -> serde_json::Value;
}

struct FrozenDefense {
    plain: FruSet,
    grad: FruSet,
    placements: Vec<Placement>,
    stats: BnStats,
    tuned: Vec<String>,
    straight_through: bool,
}

/// How gradients pass the FRUs of a defended classifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FruGradient {
    /// Through the units (the exact gradient of the defended network).
    #[default]
    Exact,
    /// Straight through (BPDA): forward with the units, backward as if each regenerated site
    /// were the identity, i.e. the bare network's gradient at the defended activations.
    StraightThrough,
}

/// A tap that regenerates in the forward pass and is the identity in the backward pass.
struct StraightThrough<'t, 'a>(&'t mut Regenerate<'a>);

impl crate::zoo::Tap for StraightThrough<'_, '_> {
    fn wants(&self, site: &str) -> bool {
        self.0.wants(site)
    }

    fn visit(&mut self, site: &str, x: Tensor<4>) -> Tensor<4> {
        let y = self.0.visit(site, x.clone());
        x.clone() + (y - x).detach()
    }

    fn input(&mut self, x: Tensor<4>) -> Tensor<4> {
        if self.0.wants(fru::INPUT_SITE) {
            let y = self.0.input(x.clone());
            x.clone() + (y - x).detach()
        } else {
            x
        }
    }

    /// A tuned conv forward, the backbone's own conv backward.
    fn conv(&mut self, conv: &crate::zoo::layers::Conv, x: Tensor<4>) -> Tensor<4> {
        if self.0.tuned.contains(&conv.name) {
            let plain = conv.raw(x.clone());
            let y = self.0.conv(conv, x);
            plain.clone() + (y - plain).detach()
        } else {
            let y = conv.raw(x);
            self.visit(&conv.name, y)
        }
    }
}

impl<'a> Classifier<'a> {
    /// The bare network.
    pub fn plain(model: &'a Model) -> Self {
        Classifier {
            model,
            defended: None,
            filter: None,
        }
    }

    /// The bare network behind an image-domain filter; gradients pass the filter straight
    /// through (BPDA).
    pub fn filtered(model: &'a Model, filter: &'a dyn InputFilter) -> Result<Self> {
        filter.check()?;
        Ok(Classifier {
            model,
            defended: None,
            filter: Some(filter),
        })
    }

    /// The network with `defense`'s units in place (inference mode; the units get no
    /// gradients).
    pub fn defended(model: &'a Model, defense: &dyn Plant) -> Result<Self> {
        Self::defended_with(model, defense, FruGradient::Exact)
    }

    /// [`Classifier::defended`] with the given gradient through the units.
    pub fn defended_with(
        model: &'a Model,
        defense: &dyn Plant,
        gradient: FruGradient,
    ) -> Result<Self> {
        let p = defense.plant(model)?;
        let adev = model.device().clone().autodiff();
        Ok(Classifier {
            model,
            defended: Some(FrozenDefense {
                grad: p.frus.clone().to_device(&adev).no_grad(),
                plain: p.frus,
                placements: p.placements,
                stats: p.stats,
                tuned: p.tuned,
                straight_through: gradient == FruGradient::StraightThrough,
            }),
            filter: None,
        })
    }

    /// Whether a defence (units or a filter) is in place.
    pub fn is_defended(&self) -> bool {
        self.defended.is_some() || self.filter.is_some()
    }

    /// Logits for pixels on the 0–255 scale (no gradient).
    pub fn logits(&self, pixels: Tensor<4>) -> Tensor<2> {
        self.forward(pixels, false)
    }

    /// Logits for pixels on the autodiff device (gradients reach the input).
    pub fn logits_grad(&self, pixels: Tensor<4>) -> Tensor<2> {
        self.forward(pixels, true)
    }

    fn forward(&self, pixels: Tensor<4>, grad: bool) -> Tensor<2> {
        let pixels = match self.filter {
            None => pixels,
            Some(f) if grad => {
                // Straight through: the filtered values forward, the identity backward.
                let plain = pixels.clone().detach();
                let filtered = f.filter(plain.clone().inner()).autodiff();
                pixels + (filtered - plain).detach()
            }
            Some(f) => f.filter(pixels),
        };
        match &self.defended {
            None => self.model.forward_pixels(pixels, &mut NoTap),
            Some(d) => {
                let mut stats = d.stats.clone();
                let mut tap = Regenerate::new(
                    if grad { &d.grad } else { &d.plain },
                    &d.placements,
                    &mut stats,
                    false,
                    &d.tuned,
                );
                if grad && d.straight_through {
                    self.model
                        .forward_pixels(pixels, &mut StraightThrough(&mut tap))
                } else {
                    self.model.forward_pixels(pixels, &mut tap)
                }
            }
        }
    }
}

/// Clean top-1 predictions of `model` on `samples` (unreadable images: `None`).
pub fn clean_predictions(
    target: &Classifier,
    samples: &[Sample],
    batch_size: usize,
    mut progress: impl FnMut(usize),
) -> Result<Vec<Option<usize>>> {
    let mut out = Vec::with_capacity(samples.len());
    for (i, chunk) in samples.chunks(batch_size).enumerate() {
        let (batch, _) = load_batch(target.model, chunk, false)?;
        let mut preds = vec![None; chunk.len()];
        if let Some(b) = batch {
            let rows = logits_rows(target.logits(b.pixels))?;
            let mut k = 0;
            for (j, s) in chunk.iter().enumerate() {
                if k < b.samples.len() && b.samples[k].path == s.path {
                    preds[j] = Some(argmax(&rows[k]));
                    k += 1;
                }
            }
        }
        out.extend(preds);
        progress((i * batch_size + chunk.len()).min(samples.len()));
    }
    Ok(out)
}

/// Index of the largest value.
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best
}

/// (clean prediction, prediction under `delta`) of every readable image of `samples` that has a
/// clean prediction in `clean`.
fn perturbed_predictions(
    target: &Classifier,
    samples: &[Sample],
    clean: &[Option<usize>],
    delta: &Tensor<4>,
    clip: bool,
    batch_size: usize,
) -> Result<Vec<(usize, usize)>> {
    let mut out = Vec::with_capacity(samples.len());
    for (ci, chunk) in samples.chunks(batch_size).enumerate() {
        let (batch, _) = load_batch(target.model, chunk, false)?;
        let Some(b) = batch else { continue };
        let x = perturbation::apply(b.pixels, delta.clone(), clip);
        let rows = logits_rows(target.logits(x))?;
        let mut k = 0;
        for (j, s) in chunk.iter().enumerate() {
            if k < b.samples.len() && b.samples[k].path == s.path {
                if let Some(c) = clean[ci * batch_size + j] {
                    out.push((c, argmax(&rows[k])));
                }
                k += 1;
            }
        }
    }
    Ok(out)
}

/// Fooling rate of `delta` (`[1, 3, h, w]`) on `samples` whose clean predictions are `clean`:
/// the fraction of readable images whose top-1 label changes.
pub fn fooling_rate(
    target: &Classifier,
    samples: &[Sample],
    clean: &[Option<usize>],
    delta: &Tensor<4>,
    clip: bool,
    batch_size: usize,
) -> Result<f64> {
    let preds = perturbed_predictions(target, samples, clean, delta, clip, batch_size)?;
    if preds.is_empty() {
        return Err(SfrError::NoImages("no held-out image could be read".into()));
    }
    let fooled = preds.iter().filter(|(c, p)| c != p).count();
    Ok(fooled as f64 / preds.len() as f64)
}

/// Targeted success rate of `delta` on `samples`: of the readable images whose clean
/// prediction (`clean`) is not `class`, the fraction the perturbation sends to `class`; with
/// the number of such images.
pub fn targeted_success_rate(
    target: &Classifier,
    samples: &[Sample],
    clean: &[Option<usize>],
    delta: &Tensor<4>,
    class: usize,
    clip: bool,
    batch_size: usize,
) -> Result<(f64, usize)> {
    let preds = perturbed_predictions(target, samples, clean, delta, clip, batch_size)?;
    let eligible: Vec<_> = preds.iter().filter(|(c, _)| *c != class).collect();
    if eligible.is_empty() {
        return Err(SfrError::NoImages(format!(
            "no held-out image could be read whose clean prediction is not the target {class}"
        )));
    }
    let hit = eligible.iter().filter(|(_, p)| *p == class).count();
    Ok((hit as f64 / eligible.len() as f64, eligible.len()))
}

/// Labels as an `[n, 1]` Int tensor.
pub fn label_tensor(labels: &[usize], device: &burn::tensor::Device) -> Tensor<2, Int> {
    let v: Vec<i64> = labels.iter().map(|&l| l as i64).collect();
    Tensor::from_data(TensorData::new(v, [labels.len(), 1]), device)
}
