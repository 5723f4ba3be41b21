//! The defence: Selective Feature Regeneration (Borkar, Heide, Karam, CVPR 2020).
//!
//! Rank each chosen site's filters by ℓ1 norm ([`ranking`]), regenerate the most susceptible half
//! of its output with a Feature Regeneration Unit ([`fru`]) through the model's taps, and train
//! only the units on clean and perturbed images ([`train`]) with real or synthetic perturbations
//! ([`synthetic`]). The backbone stays frozen, batch-norm statistics included.
//!
//! Two rivals train in the same loop and live in the same file format ([`Method`]): a PRN-style
//! rectifier (one unit in front of the frozen network) and universal adversarial training, which
//! fine-tunes the backbone's conv weights (stored as changes, applied by the same tap) against a
//! universal perturbation of its own.

pub mod baselines;
pub mod ranking;
pub mod synthetic;
pub mod train;

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::Param;
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The FRU units and their tap (they live in the classifier layer, which plants them).
pub use crate::classifier::fru;
use crate::classifier::fru::{BnStats, Fru, FruSet, Placement, Regenerate};
use crate::classifier::{Plant, Planted};
use crate::error::{Result, SfrError};
use crate::weights::{self, RawTensor, TensorMap};
use crate::zoo::Model;

/// What a defence is: the units at the backbone's conv sites (the paper's defence), or a rival
/// trained the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Selective Feature Regeneration: FRUs regenerate the ℓ1-ranked half of the channels at
    /// early conv sites.
    #[default]
    Sfr,
    /// A PRN-style rectifier (after Akhtar et al. CVPR 2018, without its detector): one
    /// residual unit of the FRU's shape (1×1, 3×3, 3×3, 1×1 convs, BN and ReLU) on all three
    /// channels of the normalised input, in front of the frozen network, trained as the FRUs
    /// are.
    Prn,
    /// Universal adversarial training (after Shafahi et al., AAAI 2020): the backbone's conv
    /// weights fine-tuned against a universal perturbation that sign steps update between
    /// mini-batches, in the same loop as the FRUs; the batch norms (statistics and affine
    /// parameters), conv biases and the final linear layer stay frozen.
    Uat,
}

impl Method {
    /// Whether this is the paper's defence.
    pub fn is_sfr(&self) -> bool {
        *self == Method::Sfr
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Method::Sfr => "sfr",
            Method::Prn => "prn",
            Method::Uat => "uat",
        })
    }
}

/// PRN width (the unit's inner channels) `sfr defend --method prn` uses by default.
pub const PRN_WIDTH: usize = 16;

/// How channels to regenerate are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Selection {
    /// The paper's rule: the largest ℓ1 filter norms.
    Ranked,
    /// An ablation: channels drawn at random (same budget).
    Random,
}

/// The FRU sites `sfr defend` uses without `--sites`: the hand placement of the architecture
/// when there is one ([`hand_sites`]), [`rule_sites`] otherwise (ONNX networks, new
/// architectures).
pub fn default_sites(model: &Model) -> Result<Vec<String>> {
    match hand_sites(model) {
        Some(v) => Ok(v),
        None => rule_sites(model),
    }
}

/// The sites a user names (`--sites`): none means [`default_sites`], `rule` [`rule_sites`].
pub fn resolve_sites(model: &Model, named: &[String]) -> Result<Vec<String>> {
    if named.is_empty() {
        default_sites(model)
    } else if named == ["rule"] {
        rule_sites(model)
    } else {
        Ok(named.to_vec())
    }
}

/// The sites the rule may place at most: the paper's "at most 6 layers".
pub const RULE_MAX_SITES: usize = 6;

/// [`rule_sites`] in words.
pub const RULE: &str = "the stem, then in forward order every conv but the depthwise ones and the 1×1 expansions (1×1 convs that widen their input), at most 6";

/// Whether the rule passes over a site: a depthwise conv, or a 1×1 expansion.
pub fn rule_skips(s: &crate::zoo::SiteInfo) -> bool {
    let depthwise = s.groups > 1 && s.groups == s.in_channels;
    let expansion = s.kernel == [1, 1] && s.out_channels > s.in_channels;
    depthwise || expansion
}

/// sfr's site rule, for any network from its sites alone: the stem (the first conv in forward
/// order), then, in forward order, every conv but the depthwise ones and the 1×1 expansions
/// ([`rule_skips`]), up to [`RULE_MAX_SITES`] in all. Early layers, as the paper's placements:
/// on a plain network the first convs (CaffeNet and VGG-F: the paper's release, conv1–conv5;
/// AlexNet: its hand placement), on a
/// residual network with expansion blocks the convs that write the narrow trunk (MobileNetV2 and
/// the EfficientNet-Lite family: their hand placements, the stem and the first five
/// projections), on ResNet-18 its hand placement. `tests/zoo_parity.rs` prints it beside the
/// hand placement of every zoo family.
pub fn rule_sites(model: &Model) -> Result<Vec<String>> {
    let sites = model.sites();
    let Some(stem) = sites.first() else {
        return Err(SfrError::param(
            "--sites",
            format!("`{}` has no conv sites to defend", model.spec().name),
        ));
    };
    let mut out = vec![stem.name.clone()];
    out.extend(
        sites[1..]
            .iter()
            .filter(|s| !rule_skips(s))
            .take(RULE_MAX_SITES - 1)
            .map(|s| s.name.clone()),
    );
    Ok(out)
}

/// The paper's placements (mapped to sfr's site names) and sfr's placements of the other zoo
/// networks; `None` for networks without one.
pub fn hand_sites(model: &Model) -> Option<Vec<String>> {
    let name: &str = &model.spec().name;
    let v: Vec<&str> = match name {
        // The paper's release: CaffeNet and VGG-F conv1–conv5.
        "caffenet" | "vgg_f" => vec!["conv1", "conv2", "conv3", "conv4", "conv5"],
        // VGG-16 conv1_1, 1_2, 2_1, 3_1, 4_1, 5_1.
        "vgg16" => vec![
            "features.0",
            "features.2",
            "features.5",
            "features.10",
            "features.17",
            "features.24",
        ],
        // GoogLeNet: conv1, conv2 and the 3×3 and "5×5" branches of 3a, 3b, 4a, 4b, 4d, 5a.
        "googlenet" => {
            let mut v = vec!["conv1.conv", "conv3.conv"];
            v.extend([
                "inception3a.branch2.1.conv",
                "inception3a.branch3.1.conv",
                "inception3b.branch2.1.conv",
                "inception3b.branch3.1.conv",
                "inception4a.branch2.1.conv",
                "inception4a.branch3.1.conv",
                "inception4b.branch2.1.conv",
                "inception4b.branch3.1.conv",
                "inception4d.branch2.1.conv",
                "inception4d.branch3.1.conv",
                "inception5a.branch2.1.conv",
                "inception5a.branch3.1.conv",
            ]);
            v
        }
        // ResNet-152: conv1 and the 3×3 convs of residual blocks 1, 4, 12, 24, 30, 48, counting
        // blocks from 1 over layer1–4 (3, 8, 36, 3 blocks). The paper's network was a
        // pre-activation ResNet; on torchvision's v1.5 these are the corresponding blocks.
        "resnet152" => vec![
            "conv1",
            "layer1.0.conv2",
            "layer2.0.conv2",
            "layer3.0.conv2",
            "layer3.12.conv2",
            "layer3.18.conv2",
            "layer4.0.conv2",
        ],
        // sfr's placements of networks the paper did not defend (at most 6 early sites): the stem
        // conv and the linear projections of the first five blocks, the narrow outputs that
        // carry the residual stream forward ([`rule_sites`] states this as a rule).
        "mobilenet_v2" => vec![
            "features.0.0",
            "features.1.conv.1",
            "features.2.conv.2",
            "features.3.conv.2",
            "features.4.conv.2",
            "features.5.conv.2",
        ],
        n if n.starts_with("efficientnet_lite") => vec![
            "_conv_stem",
            "_blocks.0._project_conv",
            "_blocks.1._project_conv",
            "_blocks.2._project_conv",
            "_blocks.3._project_conv",
            "_blocks.4._project_conv",
        ],
        "resnet18" | "resnet50" => vec![
            "conv1",
            "layer1.0.conv1",
            "layer1.0.conv2",
            "layer1.1.conv1",
            "layer1.1.conv2",
            "layer2.0.conv1",
        ],
        "alexnet" => vec![
            "features.0",
            "features.3",
            "features.6",
            "features.8",
            "features.10",
        ],
        _ => return None,
    };
    Some(v.into_iter().map(String::from).collect())
}

/// A fingerprint of the backbone: SHA-256 over the names, shapes and weights of every conv.
pub fn backbone_fingerprint(model: &Model) -> String {
    let mut h = Sha256::new();
    h.update(model.spec().name.as_bytes());
    for s in model.sites() {
        h.update(s.name.as_bytes());
        if let Some(c) = model.conv(&s.name)
            && let Ok(v) = c.weight.clone().into_data().try_into_vec::<f32>()
        {
            for x in v {
                h.update(x.to_le_bytes());
            }
        }
    }
    hex::encode(h.finalize())
}

/// What a defence file records besides its weights.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DefenseMeta {
    /// What kind of defence. Absent means `sfr` (files written before there were rivals), and
    /// `sfr` is not written, so that an SFR defence's [`Defense::id`] is what it was.
    #[serde(default, skip_serializing_if = "Method::is_sfr")]
    pub method: Method,
    /// The backbone architecture.
    pub model: String,
    /// [`backbone_fingerprint`] of the backbone it was trained on.
    pub backbone: String,
    /// Sites, in forward order.
    pub sites: Vec<String>,
    /// Channels per site.
    pub channels: Vec<usize>,
    /// Regenerated channels per site (ranked order).
    pub regen: Vec<Vec<usize>>,
    /// FRU width D per site.
    pub width: Vec<usize>,
    /// Channel selection rule.
    pub selection: Selection,
    /// Backbone convs whose weights the defence changes (universal adversarial training),
    /// in forward order. Absent for FRU defences.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tuned: Vec<String>,
    /// Each unit's change is scaled by a learned per-image switch ([`fru::gate_logit`]; `sfr defend
    /// --gate`, beyond the paper). Absent means ungated.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gated: bool,
    /// Fraction of channels regenerated.
    pub fraction: f64,
    /// Training configuration and what was measured while training.
    pub training: serde_json::Value,
    /// sfr version.
    pub sfr_version: String,
}

impl DefenseMeta {
    /// The metadata of a fresh `method` defence for `model`: no sites, nothing tuned, ranked
    /// selection, fraction 0, no training yet; each kind fills in what it places.
    fn untrained(method: Method, model: &Model) -> Self {
        DefenseMeta {
            method,
            model: model.spec().name.to_string(),
            backbone: backbone_fingerprint(model),
            sites: Vec::new(),
            channels: Vec::new(),
            regen: Vec::new(),
            width: Vec::new(),
            selection: Selection::Ranked,
            tuned: Vec::new(),
            gated: false,
            fraction: 0.0,
            training: serde_json::Value::Null,
            sfr_version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}

/// A trained (or untrained) defence for one backbone.
#[derive(Debug, Clone)]
pub struct Defense {
    /// Metadata.
    pub meta: DefenseMeta,
    /// The units.
    pub frus: FruSet,
    /// Their BN running statistics.
    pub stats: BnStats,
    /// Universal adversarial training's perturbation as training left it (`[3, S, S]`, 0–255
    /// scale; empty for other defences): checkpointed for an exact resume, and saved as an
    /// artefact of the run.
    pub uat_perturbation: Vec<f32>,
}

/// Options for planting FRUs.
#[derive(Debug, Clone)]
pub struct PlanOptions {
    /// Sites (empty: the defaults).
    pub sites: Vec<String>,
    /// Fraction of each site's channels to regenerate (the paper: ½).
    pub fraction: f64,
    /// FRU width D as a multiple of N (the paper's default: 1).
    pub width_ratio: f64,
    /// Ranked or random channels.
    pub selection: Selection,
    /// Seed (random selection and FRU initialisation).
    pub seed: u64,
    /// SFR's units at conv sites, or a PRN-style rectifier at the input.
    pub method: Method,
    /// The rectifier's width D ([`Method::Prn`]; the FRU options do not apply to it).
    pub prn_width: usize,
    /// Gate each unit by a learned per-image switch ([`fru::gate_logit`]; SFR and PRN).
    pub gate: bool,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            method: Method::Sfr,
            prn_width: PRN_WIDTH,
            sites: Vec::new(),
            fraction: 0.5,
            width_ratio: 1.0,
            selection: Selection::Ranked,
            seed: 0,
            gate: false,
        }
    }
}

impl Defense {
    /// Fresh (identity) FRUs at the chosen sites of `model` (or a fresh rectifier at its input),
    /// on `device`.
    pub fn plant(model: &Model, opts: &PlanOptions, device: &Device) -> Result<Self> {
        match opts.method {
            Method::Prn => return Self::plant_prn(model, opts, device),
            Method::Uat => return Self::plant_uat(model, opts, device),
            Method::Sfr => {}
        }
        if !(opts.fraction > 0.0 && opts.fraction <= 1.0) {
            return Err(SfrError::param(
                "--fraction",
                format!("must be in (0, 1], got {}", opts.fraction),
            ));
        }
        if !(opts.width_ratio > 0.0 && opts.width_ratio.is_finite()) {
            return Err(SfrError::param(
                "--width",
                format!("must be positive, got {}", opts.width_ratio),
            ));
        }
        let sites = resolve_sites(model, &opts.sites)?;
        // Forward order, as the taps see them.
        let ordered = model.order_sites(&sites)?;
        burn::tensor::Device::seed(device, opts.seed);
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(opts.seed);
        let mut meta = DefenseMeta {
            selection: opts.selection,
            fraction: opts.fraction,
            ..DefenseMeta::untrained(Method::Sfr, model)
        };
        let mut units = Vec::new();
        for s in &ordered {
            let r = ranking::rank_site(model, s)?;
            let c = r.order.len();
            let n = ((c as f64 * opts.fraction).floor() as usize).max(1);
            let regen: Vec<usize> = match opts.selection {
                Selection::Ranked => r.order[..n].to_vec(),
                Selection::Random => {
                    use rand::seq::SliceRandom;
                    let mut idx: Vec<usize> = (0..c).collect();
                    idx.shuffle(&mut rng);
                    idx.truncate(n);
                    idx
                }
            };
            let d = ((n as f64 * opts.width_ratio).round() as usize).max(1);
            units.push(Fru::new(n, d, device));
            meta.sites.push(s.clone());
            meta.channels.push(c);
            meta.regen.push(regen);
            meta.width.push(d);
        }
        let stats = BnStats::new(&meta.width);
        let mut d = Defense {
            meta,
            frus: FruSet {
                units,
                ..Default::default()
            },
            stats,
            uat_perturbation: Vec::new(),
        };
        if opts.gate {
            d.add_gates(device);
        }
        Ok(d)
    }

    /// A fresh (identity) PRN-style rectifier in front of `model`: one unit at
    /// [`fru::INPUT_SITE`] regenerating all three input channels.
    fn plant_prn(model: &Model, opts: &PlanOptions, device: &Device) -> Result<Self> {
        if !opts.sites.is_empty() {
            return Err(SfrError::param(
                "--sites",
                "a PRN acts on the network's input, not at conv sites; drop --sites",
            ));
        }
        if opts.prn_width == 0 || opts.prn_width > 1024 {
            return Err(SfrError::param(
                "--prn-width",
                format!("must be in 1..=1024, got {}", opts.prn_width),
            ));
        }
        burn::tensor::Device::seed(device, opts.seed);
        let d = opts.prn_width;
        let meta = DefenseMeta {
            sites: vec![fru::INPUT_SITE.to_string()],
            channels: vec![3],
            regen: vec![vec![0, 1, 2]],
            width: vec![d],
            fraction: 1.0,
            ..DefenseMeta::untrained(Method::Prn, model)
        };
        let mut d = Defense {
            meta,
            frus: FruSet {
                units: vec![Fru::new(3, d, device)],
                ..Default::default()
            },
            stats: BnStats::new(&[d]),
            uat_perturbation: Vec::new(),
        };
        if opts.gate {
            d.add_gates(device);
        }
        Ok(d)
    }

    /// Universal adversarial training's starting point: every conv of `model` (or the
    /// `--sites` named) tuned, each weight change zero, so that the untrained defence is the
    /// backbone itself.
    fn plant_uat(model: &Model, opts: &PlanOptions, device: &Device) -> Result<Self> {
        if opts.gate {
            return Err(SfrError::param(
                "--gate",
                "universal adversarial training has no units to gate",
            ));
        }
        let sites = model.sites();
        let tuned = if opts.sites.is_empty() {
            sites.iter().map(|s| s.name.clone()).collect()
        } else {
            if opts.sites == ["rule"] {
                return Err(SfrError::param(
                    "--sites",
                    "the site rule places FRUs; for --method uat name the convs to tune, or give none to tune them all",
                ));
            }
            model.order_sites(&opts.sites)?
        };
        let deltas = tuned
            .iter()
            .map(|t| {
                let s = sites.iter().find(|s| &s.name == t).ok_or_else(|| {
                    SfrError::param(
                        "--sites",
                        format!("`{t}` is not a site of `{}`", model.spec().name),
                    )
                })?;
                Ok(Param::from_tensor(Tensor::zeros(s.weight_shape(), device)))
            })
            .collect::<Result<Vec<_>>>()?;
        let meta = DefenseMeta {
            tuned,
            ..DefenseMeta::untrained(Method::Uat, model)
        };
        Ok(Defense {
            meta,
            frus: FruSet {
                deltas,
                ..Default::default()
            },
            stats: BnStats::new(&[]),
            uat_perturbation: Vec::new(),
        })
    }

    /// Gates every unit, each gate at zero (a switch of ½ on every image).
    fn add_gates(&mut self, device: &Device) {
        self.meta.gated = true;
        self.frus.gates = self
            .meta
            .channels
            .iter()
            .map(|&c| Param::from_tensor(Tensor::zeros([c + 1], device)))
            .collect();
    }

    /// What the defence is, in a few words: `3 FRUs at a, b, c` or `a PRN-style rectifier: one
    /// residual unit on the input, width 16`.
    pub fn summary(&self) -> String {
        let s = self.summary_ungated();
        if self.meta.gated {
            format!("{s}, gated")
        } else {
            s
        }
    }

    fn summary_ungated(&self) -> String {
        match self.meta.method {
            Method::Sfr => format!(
                "{} FRUs at {}",
                self.meta.sites.len(),
                self.meta.sites.join(", ")
            ),
            Method::Prn => format!(
                "a PRN-style rectifier: one residual unit on the input, width {}",
                self.meta.width.first().copied().unwrap_or(0)
            ),
            Method::Uat => format!(
                "universal adversarial training: the weights of {} convs tuned",
                self.meta.tuned.len()
            ),
        }
    }

    /// An identifier of this trained defence: SHA-256 over its metadata (which records its
    /// training run) and BN statistics. Attacks computed through it record it.
    pub fn id(&self) -> String {
        let mut h = Sha256::new();
        h.update(
            serde_json::to_string(&self.meta)
                .unwrap_or_default()
                .as_bytes(),
        );
        for (m, v) in self.stats.mean.iter().zip(&self.stats.var) {
            for x in m.iter().chain(v.iter()).flatten() {
                h.update(x.to_le_bytes());
            }
        }
        hex::encode(h.finalize())
    }

    /// Placements of the units.
    pub fn placements(&self) -> Vec<Placement> {
        self.meta
            .sites
            .iter()
            .zip(&self.meta.channels)
            .zip(&self.meta.regen)
            .map(|((s, &c), r)| Placement {
                site: s.clone(),
                channels: c,
                regen: r.clone(),
            })
            .collect()
    }

    /// Fail unless this defence belongs to `model`'s backbone and its placements fit it.
    pub fn check_backbone(&self, model: &Model) -> Result<()> {
        if self.meta.model != model.spec().name {
            return Err(SfrError::param(
                "--defense",
                format!(
                    "this defence was trained for `{}`, not `{}`",
                    self.meta.model,
                    model.spec().name
                ),
            ));
        }
        if self.meta.backbone != backbone_fingerprint(model) {
            return Err(SfrError::param(
                "--defense",
                format!(
                    "this defence was trained on other `{}` weights (backbone fingerprint differs); load the weights it was trained with",
                    self.meta.model
                ),
            ));
        }
        self.check_placements(model)
    }

    /// Fail unless every placement fits `model`: a site it has (a rectifier: the input), its
    /// channel count, distinct channel indices below it.
    fn check_placements(&self, model: &Model) -> Result<()> {
        let sites = model.sites();
        if self.meta.method == Method::Uat {
            if !self.meta.sites.is_empty() {
                return Err(SfrError::param(
                    "--defense",
                    "a universal-adversarial-training defence has no FRU sites",
                ));
            }
            for (i, t) in self.meta.tuned.iter().enumerate() {
                if self.meta.tuned[..i].contains(t) {
                    return Err(SfrError::param(
                        "--defense",
                        format!("conv `{t}` is tuned twice"),
                    ));
                }
                if !sites.iter().any(|s| &s.name == t) {
                    return Err(SfrError::param(
                        "--defense",
                        format!("`{t}` is not a conv of `{}`", self.meta.model),
                    ));
                }
            }
            if self.meta.tuned.is_empty() {
                return Err(SfrError::param("--defense", "the file tunes no conv"));
            }
        } else if !self.meta.tuned.is_empty() {
            return Err(SfrError::param(
                "--defense",
                "only a universal-adversarial-training defence tunes backbone convs",
            ));
        }
        for p in self.placements() {
            let channels = if p.site == fru::INPUT_SITE {
                if self.meta.method != Method::Prn {
                    return Err(SfrError::param(
                        "--defense",
                        format!("only a PRN acts at `{}`", fru::INPUT_SITE),
                    ));
                }
                3
            } else {
                if self.meta.method == Method::Prn {
                    return Err(SfrError::param(
                        "--defense",
                        format!("a PRN acts at `{}`, not at `{}`", fru::INPUT_SITE, p.site),
                    ));
                }
                match sites.iter().find(|s| s.name == p.site) {
                    Some(s) => s.out_channels,
                    None => {
                        return Err(SfrError::param(
                            "--defense",
                            format!("`{}` is not a site of `{}`", p.site, self.meta.model),
                        ));
                    }
                }
            };
            if p.channels != channels {
                return Err(SfrError::param(
                    "--defense",
                    format!(
                        "site `{}` has {channels} channels, the file says {}",
                        p.site, p.channels
                    ),
                ));
            }
            let mut seen = vec![false; channels];
            for &c in &p.regen {
                if c >= channels || seen[c] {
                    return Err(SfrError::param(
                        "--defense",
                        format!(
                            "site `{}`: channel {c} is repeated or beyond its {channels} channels",
                            p.site
                        ),
                    ));
                }
                seen[c] = true;
            }
            if p.regen.is_empty() {
                return Err(SfrError::param(
                    "--defense",
                    format!("site `{}` regenerates no channel", p.site),
                ));
            }
        }
        Ok(())
    }

    /// Runs `f` with this defence's tap in inference mode.
    fn with_tap<R>(&mut self, f: impl FnOnce(&mut Regenerate) -> R) -> R {
        let placements = self.placements();
        let mut tap = Regenerate::new(
            &self.frus,
            &placements,
            &mut self.stats,
            false,
            &self.meta.tuned,
        );
        f(&mut tap)
    }

    /// [`Defense::forward_pixels`], and per gated unit each image's switch in (0, 1) (empty
    /// for an ungated defence).
    pub fn forward_pixels_gates(
        &mut self,
        model: &Model,
        pixels: Tensor<4>,
    ) -> Result<(Tensor<2>, Vec<Vec<f32>>)> {
        let (logits, open) = self.with_tap(|tap| {
            let logits = model.forward_pixels(pixels, tap);
            (logits, tap.open())
        });
        let open =
            open.map_err(|e| SfrError::param("defense", format!("unreadable switches: {e}")))?;
        Ok((logits, open))
    }

    /// Logits of the defended network for RGB pixels on the 0–255 scale (inference mode).
    pub fn forward_pixels(&mut self, model: &Model, pixels: Tensor<4>) -> Tensor<2> {
        self.with_tap(|tap| model.forward_pixels(pixels, tap))
    }

    /// Save as safetensors (FRU weights, BN statistics, placements and training configuration
    /// in the metadata), atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.save_with(path, BTreeMap::new())
    }

    /// [`Defense::save`] with `extra` entries in the file's metadata (a training checkpoint's
    /// optimiser state).
    pub fn save_with(&self, path: &Path, extra: BTreeMap<String, String>) -> Result<()> {
        let mut map = TensorMap::new();
        fn put<const D: usize>(map: &mut TensorMap, k: String, t: Tensor<D>) -> Result<()> {
            let shape = t.dims().to_vec();
            let data = t
                .into_data()
                .try_into_vec::<f32>()
                .map_err(|e| SfrError::param("defense", format!("{e:?}")))?;
            map.insert(k, RawTensor { shape, data });
            Ok(())
        }
        for (i, u) in self.frus.units.iter().enumerate() {
            put(&mut map, format!("fru.{i}.w1"), u.w1.val())?;
            put(&mut map, format!("fru.{i}.w2"), u.w2.val())?;
            put(&mut map, format!("fru.{i}.w3"), u.w3.val())?;
            put(&mut map, format!("fru.{i}.w4"), u.w4.val())?;
            for (j, (g, b)) in [(&u.g1, &u.b1), (&u.g2, &u.b2), (&u.g3, &u.b3)]
                .into_iter()
                .enumerate()
            {
                put(&mut map, format!("fru.{i}.bn{}.weight", j + 1), g.val())?;
                put(&mut map, format!("fru.{i}.bn{}.bias", j + 1), b.val())?;
                let d = self.stats.mean[i][j].len();
                map.insert(
                    format!("fru.{i}.bn{}.running_mean", j + 1),
                    RawTensor {
                        shape: vec![d],
                        data: self.stats.mean[i][j].clone(),
                    },
                );
                map.insert(
                    format!("fru.{i}.bn{}.running_var", j + 1),
                    RawTensor {
                        shape: vec![d],
                        data: self.stats.var[i][j].clone(),
                    },
                );
            }
        }
        for (i, g) in self.frus.gates.iter().enumerate() {
            put(&mut map, format!("fru.{i}.gate"), g.val())?;
        }
        for (t, d) in self.meta.tuned.iter().zip(&self.frus.deltas) {
            put(&mut map, format!("uat.delta.{t}"), d.val())?;
        }
        if !self.uat_perturbation.is_empty() {
            let n = self.uat_perturbation.len();
            let side = ((n / 3) as f64).sqrt().round() as usize;
            map.insert(
                "uat.perturbation".to_string(),
                RawTensor {
                    shape: vec![3, side, side],
                    data: self.uat_perturbation.clone(),
                },
            );
        }
        let mut meta = extra;
        meta.insert(
            "sfr_defense".to_string(),
            serde_json::to_string(&self.meta)
                .map_err(|e| SfrError::param("defense", e.to_string()))?,
        );
        meta.insert("format".to_string(), "sfr-defense-v1".to_string());
        weights::save_safetensors(&map, &meta, path)?;
        Ok(())
    }

    /// Load a defence file for `model` (checking that it belongs to this backbone) onto `device`.
    pub fn load(path: &Path, model: &Model, device: &Device) -> Result<Self> {
        let md = weights::read_safetensors_metadata(path)?;
        let meta: DefenseMeta = match md.get("sfr_defense") {
            Some(j) => serde_json::from_str(j).map_err(|e| {
                SfrError::param(
                    "--defense",
                    format!("{}: unreadable metadata: {e}", path.display()),
                )
            })?,
            None => {
                return Err(SfrError::param(
                    "--defense",
                    format!(
                        "{} is not an sfr defence file (no `sfr_defense` metadata)",
                        path.display()
                    ),
                ));
            }
        };
        let mut map = weights::load(path)?;
        let has_uat_perturbation = map.contains_key("uat.perturbation");
        // Nothing is sized from the metadata before it is checked against the tensors in the
        // file: a width of 10^11 must be an error, not an allocation.
        let no_stats = || BnStats {
            mean: Vec::new(),
            var: Vec::new(),
        };
        let d = Defense {
            meta: meta.clone(),
            frus: FruSet::default(),
            stats: no_stats(),
            uat_perturbation: Vec::new(),
        };
        if meta.width.len() != meta.regen.len()
            || meta.sites.len() != meta.regen.len()
            || meta.channels.len() != meta.regen.len()
        {
            return Err(SfrError::param(
                "--defense",
                format!(
                    "{}: metadata lists {} sites, {} channel counts, {} channel sets and {} widths",
                    path.display(),
                    meta.sites.len(),
                    meta.channels.len(),
                    meta.regen.len(),
                    meta.width.len()
                ),
            ));
        }
        if meta.gated && meta.method == Method::Uat {
            return Err(SfrError::param(
                "--defense",
                format!(
                    "{}: a universal-adversarial-training defence has no units to gate",
                    path.display()
                ),
            ));
        }
        d.check_backbone(model)
            .map_err(|e| SfrError::param("--defense", format!("{}: {e}", path.display())))?;
        let mut take = |k: String, shape: Vec<usize>| -> Result<Vec<f32>> {
            let t = map.remove(&k).ok_or_else(|| {
                SfrError::param(
                    "--defense",
                    format!("{} lacks tensor `{k}`", path.display()),
                )
            })?;
            if t.shape != shape {
                return Err(SfrError::param(
                    "--defense",
                    format!(
                        "{}: `{k}` has shape {:?}, expected {shape:?}",
                        path.display(),
                        t.shape
                    ),
                ));
            }
            if t.data.iter().any(|v| !v.is_finite()) {
                return Err(SfrError::param(
                    "--defense",
                    format!("{}: `{k}` holds NaN or infinite values", path.display()),
                ));
            }
            Ok(t.data)
        };
        let mut units = Vec::new();
        let mut stats = no_stats();
        for (i, (&dw, regen)) in meta.width.iter().zip(&meta.regen).enumerate() {
            let n = regen.len();
            let t4 = |v: Vec<f32>, s: [usize; 4]| {
                Param::from_tensor(Tensor::from_data(TensorData::new(v, s), device))
            };
            let t1 = |v: Vec<f32>| {
                Param::from_tensor(Tensor::from_data(TensorData::new(v, [dw]), device))
            };
            let w1 = t4(
                take(format!("fru.{i}.w1"), vec![dw, n, 1, 1])?,
                [dw, n, 1, 1],
            );
            let w2 = t4(
                take(format!("fru.{i}.w2"), vec![dw, dw, 3, 3])?,
                [dw, dw, 3, 3],
            );
            let w3 = t4(
                take(format!("fru.{i}.w3"), vec![dw, dw, 3, 3])?,
                [dw, dw, 3, 3],
            );
            let w4 = t4(
                take(format!("fru.{i}.w4"), vec![n, dw, 1, 1])?,
                [n, dw, 1, 1],
            );
            let mut gb = Vec::new();
            let (mut mean, mut var) = (Vec::new(), Vec::new());
            for j in 1..=3 {
                gb.push(t1(take(format!("fru.{i}.bn{j}.weight"), vec![dw])?));
                gb.push(t1(take(format!("fru.{i}.bn{j}.bias"), vec![dw])?));
                mean.push(take(format!("fru.{i}.bn{j}.running_mean"), vec![dw])?);
                var.push(take(format!("fru.{i}.bn{j}.running_var"), vec![dw])?);
            }
            let three = |v: Vec<Vec<f32>>| -> Result<[Vec<f32>; 3]> {
                v.try_into()
                    .map_err(|_| SfrError::param("--defense", "internal: not three BN layers"))
            };
            stats.mean.push(three(mean)?);
            stats.var.push(three(var)?);
            let mut gb = gb.into_iter();
            let mut next = || {
                gb.next()
                    .ok_or_else(|| SfrError::param("--defense", "internal: missing BN parameter"))
            };
            units.push(Fru {
                w1,
                g1: next()?,
                b1: next()?,
                w2,
                g2: next()?,
                b2: next()?,
                w3,
                g3: next()?,
                b3: next()?,
                w4,
            });
        }
        let mut gates = Vec::new();
        if meta.gated {
            for (i, &c) in meta.channels.iter().enumerate() {
                let v = take(format!("fru.{i}.gate"), vec![c + 1])?;
                gates.push(Param::from_tensor(Tensor::from_data(
                    TensorData::new(v, [c + 1]),
                    device,
                )));
            }
        }
        let sites = model.sites();
        let mut deltas = Vec::new();
        for t in &meta.tuned {
            let s = sites.iter().find(|s| &s.name == t).ok_or_else(|| {
                SfrError::param(
                    "--defense",
                    format!("{}: `{t}` is not a conv of the network", path.display()),
                )
            })?;
            let shape = s.weight_shape();
            let v = take(format!("uat.delta.{t}"), shape.to_vec())?;
            deltas.push(Param::from_tensor(Tensor::from_data(
                TensorData::new(v, shape),
                device,
            )));
        }
        let size = model.spec().input_size;
        let uat_perturbation = if meta.method == Method::Uat && has_uat_perturbation {
            take("uat.perturbation".to_string(), vec![3, size, size])?
        } else {
            Vec::new()
        };
        Ok(Defense {
            meta,
            frus: FruSet {
                units,
                gates,
                deltas,
            },
            stats,
            uat_perturbation,
        })
    }
}

impl Plant for Defense {
    fn plant(&self, model: &Model) -> Result<Planted> {
        self.check_backbone(model)?;
        Ok(Planted {
            frus: self.frus.clone(),
            placements: self.placements(),
            stats: self.stats.clone(),
            tuned: self.meta.tuned.clone(),
        })
    }

    fn id(&self) -> String {
        Defense::id(self)
    }

    fn describe(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "id": Defense::id(self),
            "method": self.meta.method,
            "sites": self.meta.sites,
            "selection": self.meta.selection,
            "training": self.meta.training.get("config"),
        });
        if !self.meta.tuned.is_empty() {
            v["tuned"] = serde_json::json!(self.meta.tuned.len());
        }
        if self.meta.gated {
            v["gated"] = serde_json::json!(true);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(method: Method) -> DefenseMeta {
        DefenseMeta {
            method,
            model: "m".into(),
            backbone: "b".into(),
            sites: vec!["s".into()],
            channels: vec![4],
            regen: vec![vec![1, 0]],
            width: vec![2],
            selection: Selection::Ranked,
            tuned: Vec::new(),
            gated: false,
            fraction: 0.5,
            training: serde_json::Value::Null,
            sfr_version: "0".into(),
        }
    }

    #[test]
    fn sfr_metadata_is_written_as_before_rivals_existed() {
        // An SFR defence's metadata has no `method` (so its id is what it was), and metadata
        // without one reads as SFR; a PRN's says so.
        let sfr = serde_json::to_value(meta(Method::Sfr)).unwrap();
        assert!(sfr.get("method").is_none(), "{sfr}");
        let back: DefenseMeta = serde_json::from_value(sfr).unwrap();
        assert_eq!(back.method, Method::Sfr);
        let prn = serde_json::to_value(meta(Method::Prn)).unwrap();
        assert_eq!(prn["method"], "prn");
        let back: DefenseMeta = serde_json::from_value(prn).unwrap();
        assert_eq!(back.method, Method::Prn);
    }
}
