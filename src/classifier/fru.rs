//! Feature Regeneration Units (Borkar et al. 2020): a residual block applied to the most
//! susceptible ⌊C/2⌋ channels of a site, `out = x_top + F(x_top)` with
//! F = conv1×1 (N→D) → BN → ReLU → conv3×3 (D→D) → BN → ReLU → conv3×3 (D→D) → BN → ReLU →
//! conv1×1 (D→N); no conv biases, stride 1, the last conv zero-initialised so that an untrained
//! unit is the identity. The regenerated channels go back among the untouched ones in their
//! original order (an index gather, as the release's frozen permutation convs do).

use burn::module::{Module, Param};
use burn::tensor::module::batch_norm;
use burn::tensor::{Device, Distribution, Tensor, TensorData};

use std::sync::Arc;

use crate::engine::{
    Act, Affine, BnParams, batch_norm_train_relu, conv2d_as, conv2d_trainable, gather_channels,
    replace_channels,
};
use crate::zoo::Tap;
use crate::zoo::layers::Conv;

const BN_EPS: f64 = 1e-5;
const BN_MOMENTUM: f32 = 0.1;

/// The trainable parameters of one FRU.
#[derive(Module, Debug)]
pub struct Fru {
    /// conv1×1 N→D `[D, N, 1, 1]`.
    pub w1: Param<Tensor<4>>,
    /// BN 1 scale and shift.
    pub g1: Param<Tensor<1>>,
    /// BN 1 shift.
    pub b1: Param<Tensor<1>>,
    /// conv3×3 D→D.
    pub w2: Param<Tensor<4>>,
    /// BN 2 scale.
    pub g2: Param<Tensor<1>>,
    /// BN 2 shift.
    pub b2: Param<Tensor<1>>,
    /// conv3×3 D→D.
    pub w3: Param<Tensor<4>>,
    /// BN 3 scale.
    pub g3: Param<Tensor<1>>,
    /// BN 3 shift.
    pub b3: Param<Tensor<1>>,
    /// conv1×1 D→N `[N, D, 1, 1]`, zero at initialisation.
    pub w4: Param<Tensor<4>>,
}

/// What a defence trains: its FRUs, in site order, and — for universal adversarial training
/// (`sfr defend --method uat`) — the change to each tuned backbone conv's weight.
#[derive(Module, Debug, Default)]
pub struct FruSet {
    /// One unit per site.
    pub units: Vec<Fru>,
    /// Gated units (`sfr defend --gate`): per unit, `[C + 1]` values — a weight per channel
    /// of the site and a bias — of the per-image switch [`gate_logit`]. Empty: ungated (the paper).
    pub gates: Vec<Param<Tensor<1>>>,
    /// One weight change `[out, in / groups, kh, kw]` per tuned conv, in the order of the
    /// [`Regenerate::tuned`] sites: the conv runs with its weight plus this (zero at the start).
    pub deltas: Vec<Param<Tensor<4>>>,
}

/// Running batch-norm statistics of the FRUs (not trained by gradient).
#[derive(Debug, Clone)]
pub struct BnStats {
    /// Per FRU, per BN (3): running mean.
    pub mean: Vec<[Vec<f32>; 3]>,
    /// Per FRU, per BN (3): running variance.
    pub var: Vec<[Vec<f32>; 3]>,
}

fn kaiming(shape: [usize; 4], device: &Device) -> Tensor<4> {
    let fan_in = (shape[1] * shape[2] * shape[3]) as f64;
    Tensor::random(
        shape,
        Distribution::Normal(0.0, (2.0 / fan_in).sqrt()),
        device,
    )
}

impl Fru {
    /// A fresh unit for `n` channels with width `d` (identity at start).
    pub fn new(n: usize, d: usize, device: &Device) -> Self {
        let ones = |c| Param::from_tensor(Tensor::ones([c], device));
        let zeros = |c| Param::from_tensor(Tensor::zeros([c], device));
        Fru {
            w1: Param::from_tensor(kaiming([d, n, 1, 1], device)),
            g1: ones(d),
            b1: zeros(d),
            w2: Param::from_tensor(kaiming([d, d, 3, 3], device)),
            g2: ones(d),
            b2: zeros(d),
            w3: Param::from_tensor(kaiming([d, d, 3, 3], device)),
            g3: ones(d),
            b3: zeros(d),
            w4: Param::from_tensor(Tensor::zeros([n, d, 1, 1], device)),
        }
    }

    /// Channels in (N) and width (D).
    pub fn dims(&self) -> (usize, usize) {
        let [d, n, _, _] = self.w1.val().dims();
        (n, d)
    }

    /// `x + F(x)`; in training mode BN uses batch statistics and updates `stats`.
    pub fn forward(
        &self,
        x: Tensor<4>,
        stats: &mut [Vec<f32>; 3],
        vars: &mut [Vec<f32>; 3],
        training: bool,
    ) -> Tensor<4> {
        x.clone() + self.residual(x, stats, vars, training)
    }

    /// `F(x)`, the correction the unit adds (see [`Fru::forward`]).
    pub fn residual(
        &self,
        x: Tensor<4>,
        stats: &mut [Vec<f32>; 3],
        vars: &mut [Vec<f32>; 3],
        training: bool,
    ) -> Tensor<4> {
        let conv = |x: Tensor<4>, w: Tensor<4>, pad: usize| conv2d_trainable(x, w, 1, pad, 1);
        let layers = [
            (self.w1.val(), self.g1.val(), self.b1.val(), 0),
            (self.w2.val(), self.g2.val(), self.b2.val(), 1),
            (self.w3.val(), self.g3.val(), self.b3.val(), 1),
        ];
        let mut h = x;
        for (i, (w, g, b, pad)) in layers.into_iter().enumerate() {
            let y = conv(h, w, pad);
            h = if training {
                let out = batch_norm_train_relu(y, g, b, BN_EPS);
                if out.mean.len() == stats[i].len() && out.variance.len() == vars[i].len() {
                    for (r, bm) in stats[i].iter_mut().zip(&out.mean) {
                        *r = (1.0 - BN_MOMENTUM) * *r + BN_MOMENTUM * bm;
                    }
                    for (r, bv) in vars[i].iter_mut().zip(&out.variance) {
                        *r = (1.0 - BN_MOMENTUM) * *r + BN_MOMENTUM * bv;
                    }
                }
                out.output
            } else if !g.is_require_grad() && !b.is_require_grad() {
                // Frozen unit (evaluation, attacks through the defence): BN + ReLU as one op.
                let values = |t: Tensor<1>| t.into_data().try_into_vec::<f32>().unwrap_or_default();
                let (gv, bv) = (values(g), values(b));
                let bn = BnParams {
                    gamma: &gv,
                    beta: &bv,
                    mean: &stats[i],
                    var: &vars[i],
                    eps: BN_EPS,
                };
                let (scale, shift) = bn.scale_shift();
                let affine = Affine {
                    scale: Arc::new(scale),
                    shift: Arc::new(shift),
                    act: Act::Relu,
                };
                Arc::new(affine).forward(y, None)
            } else {
                let dev = y.device();
                let c = stats[i].len();
                let mean = Tensor::from_data(TensorData::new(stats[i].clone(), [c]), &dev);
                let var = Tensor::from_data(TensorData::new(vars[i].clone(), [c]), &dev);
                burn::tensor::activation::relu(batch_norm(y, g, b, mean, var, BN_EPS))
            };
        }
        conv(h, self.w4.val(), 0)
    }
}

/// Multiplies the gate's logit, so that Adam's steps (about the learning rate in size, whatever
/// the gradient's scale) move the switch within a few hundred mini-batches.
pub const GATE_GAIN: f64 = 4.0;

/// The per-image switch of a gated unit, in (0, 1), shape `[B, 1, 1, 1]` (to scale its
/// change): the logistic function of the switch logits `z` of [`gate_logit`] (`[B, 1]`).
pub fn switch(z: Tensor<2>) -> Tensor<4> {
    let b = z.dims()[0];
    burn::tensor::activation::sigmoid(z).reshape([b, 1, 1, 1])
}

/// The logit of a gated unit's per-image switch, shape `[B, 1]`: the site's log channel
/// energies `ln(mean_hw x_c² + ε)`, centred per image (so that an image's overall contrast
/// cancels), weighted by `g[..C]`, plus the bias `g[C]`, times [`GATE_GAIN`]. The zero gate
/// gives ½. A universal perturbation raises the energy of the filters it excites, the
/// ℓ1-ranked ones most (the paper's premise), so the switch can learn to open on perturbed
/// images and stay shut on clean ones, where a unit's change can only cost; training
/// supervises it as such a detector (`sfr defend --gate-loss`).
pub fn gate_logit(x: Tensor<4>, g: Tensor<1>) -> Tensor<2> {
    let [b, c, _, _] = x.dims();
    let g = match (x.is_autodiff(), g.is_autodiff()) {
        (true, false) => g.autodiff(),
        _ => g,
    };
    let e = x
        .powi_scalar(2)
        .mean_dim(3)
        .mean_dim(2)
        .reshape([b, c])
        .add_scalar(1e-6)
        .log();
    let e = e.clone() - e.mean_dim(1);
    let w = g.clone().narrow(0, 0, c).reshape([c, 1]);
    let bias = g.narrow(0, c, 1).reshape([1, 1]);
    (e.matmul(w) + bias).mul_scalar(GATE_GAIN)
}

/// The feature loss of one unit (`sfr defend --feature-loss`): the mean squared error between
/// its regenerated channels `y` and the undefended network's same channels `clean` on the clean
/// image, relative to the mean square of `clean` (so that sites of any scale weigh alike).
/// `clean` is a constant: an autodiff `y` gets its gradient, `clean` none.
pub fn regeneration_error(y: Tensor<4>, clean: Tensor<4>) -> Tensor<1> {
    let scale = clean.clone().powi_scalar(2).mean().into_scalar::<f32>() as f64;
    let clean = if y.is_autodiff() && !clean.is_autodiff() {
        clean.autodiff()
    } else {
        clean
    };
    (y - clean)
        .powi_scalar(2)
        .mean()
        .div_scalar(scale.max(1e-12))
}

/// Binary cross-entropy of switch logits `z` (`[B, 1]`) against targets `t` (`[B, 1]`, 0 or
/// 1), per image, in the stable form `max(z, 0) − t·z + ln(1 + e^−|z|)`.
pub fn switch_bce(z: Tensor<2>, t: Tensor<2>) -> Tensor<2> {
    let soft = z.clone().abs().neg().exp().add_scalar(1.0).log();
    z.clone().clamp_min(0.0) - t * z + soft
}

impl BnStats {
    /// Fresh statistics (mean 0, variance 1) for units of widths `ds`.
    pub fn new(ds: &[usize]) -> Self {
        BnStats {
            mean: ds
                .iter()
                .map(|&d| [vec![0.0; d], vec![0.0; d], vec![0.0; d]])
                .collect(),
            var: ds
                .iter()
                .map(|&d| [vec![1.0; d], vec![1.0; d], vec![1.0; d]])
                .collect(),
        }
    }
}

/// Where one FRU acts: the site and the channel split.
#[derive(Debug, Clone)]
pub struct Placement {
    /// Site name.
    pub site: String,
    /// Channels at the site (C).
    pub channels: usize,
    /// The regenerated channels (N of them), in ranked order.
    pub regen: Vec<usize>,
}

impl Placement {
    /// Channels left untouched, in index order.
    pub fn rest(&self) -> Vec<usize> {
        (0..self.channels)
            .filter(|c| !self.regen.contains(c))
            .collect()
    }

    /// The inverse of the permutation `regen ++ rest`: position of each original channel.
    pub fn inverse(&self) -> Vec<usize> {
        let mut inv = vec![0; self.channels];
        for (pos, &c) in self.regen.iter().chain(self.rest().iter()).enumerate() {
            inv[c] = pos;
        }
        inv
    }
}

/// The placement's site name of a unit that acts on the network's normalised input (all three
/// channels) rather than on a conv's output: a rectifier in front of the network
/// (`sfr defend --method prn`). No conv site has this name.
pub const INPUT_SITE: &str = "<input>";

/// The tap that regenerates channels at the defended sites (and at the input, for a unit
/// placed at [`INPUT_SITE`]).
pub struct Regenerate<'a> {
    /// The units.
    pub frus: &'a FruSet,
    /// Their placements (same order).
    pub placements: &'a [Placement],
    /// Running BN statistics (updated in training mode).
    pub stats: &'a mut BnStats,
    /// Training mode: BN on batch statistics, input made differentiable.
    pub training: bool,
    /// How many sites were regenerated in the last pass.
    pub visited: usize,
    /// The convs whose weights are tuned (`frus.deltas`, same order).
    pub tuned: &'a [String],
    /// Per gated unit visited in the last pass (unit index, switch logits `[B, 1]`), in visit
    /// order: for reporting how far the switches open and for supervising them.
    pub switches: Vec<(usize, Tensor<2>)>,
    /// Keep each unit's regenerated channels in [`Regenerate::outputs`] (for the feature loss
    /// of `sfr defend --feature-loss`).
    pub keep_outputs: bool,
    /// Per unit visited in the last pass, when `keep_outputs` (unit index, its regenerated
    /// channels `[B, N, H, W]` in ranked order), in visit order.
    pub outputs: Vec<(usize, Tensor<4>)>,
}

impl<'a> Regenerate<'a> {
    /// A tap for `frus` at `placements` (and the tuned convs), nothing visited yet.
    pub fn new(
        frus: &'a FruSet,
        placements: &'a [Placement],
        stats: &'a mut BnStats,
        training: bool,
        tuned: &'a [String],
    ) -> Self {
        Regenerate {
            frus,
            placements,
            stats,
            training,
            visited: 0,
            tuned,
            switches: Vec::new(),
            keep_outputs: false,
            outputs: Vec::new(),
        }
    }

    /// The same tap, keeping each unit's regenerated channels ([`Regenerate::outputs`]).
    pub fn keeping_outputs(mut self) -> Self {
        self.keep_outputs = true;
        self
    }

    /// Per unit (placement order), each image's switch in (0, 1) from the last pass; empty for
    /// an ungated unit.
    pub fn open(&self) -> Result<Vec<Vec<f32>>, String> {
        if self.switches.is_empty() {
            return Ok(Vec::new());
        }
        let mut open = vec![Vec::new(); self.placements.len()];
        for (i, z) in &self.switches {
            open[*i] = burn::tensor::activation::sigmoid(z.clone().detach())
                .into_data()
                .try_into_vec::<f32>()
                .map_err(|e| format!("{e:?}"))?;
        }
        Ok(open)
    }
}

impl Tap for Regenerate<'_> {
    fn wants(&self, site: &str) -> bool {
        self.placements.iter().any(|p| p.site == site) || self.tuned.iter().any(|t| t == site)
    }

    fn conv(&mut self, conv: &Conv, x: Tensor<4>) -> Tensor<4> {
        let y = match self.tuned.iter().position(|t| *t == conv.name) {
            Some(j) => {
                let dw = self.frus.deltas[j].val();
                let w = if dw.is_autodiff() {
                    conv.weight.clone().autodiff() + dw
                } else {
                    conv.weight.clone() + dw
                };
                self.visited += 1;
                conv2d_as(x, w, &conv.op)
            }
            None => conv.raw(x),
        };
        self.visit(&conv.name, y)
    }

    fn visit(&mut self, site: &str, x: Tensor<4>) -> Tensor<4> {
        let Some(i) = self.placements.iter().position(|p| p.site == site) else {
            return x;
        };
        let p = &self.placements[i];
        let x = if self.training { x.autodiff() } else { x };
        let regen = Arc::new(p.regen.clone());
        let top = gather_channels(x.clone(), &regen);
        let (m, v) = (&mut self.stats.mean[i], &mut self.stats.var[i]);
        let y = match self.frus.gates.get(i) {
            Some(g) => {
                let r = self.frus.units[i].residual(top.clone(), m, v, self.training);
                let z = gate_logit(x.clone(), g.val());
                self.switches.push((i, z.clone()));
                top + r * switch(z)
            }
            None => self.frus.units[i].forward(top, m, v, self.training),
        };
        self.visited += 1;
        if self.keep_outputs {
            self.outputs.push((i, y.clone()));
        }
        replace_channels(x, y, &regen)
    }

    fn input(&mut self, x: Tensor<4>) -> Tensor<4> {
        if self.wants(INPUT_SITE) {
            self.visit(INPUT_SITE, x)
        } else {
            x
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_inverse_restores_order() {
        let p = Placement {
            site: "s".into(),
            channels: 5,
            regen: vec![3, 0],
        };
        assert_eq!(p.rest(), vec![1, 2, 4]);
        let perm: Vec<usize> = p.regen.iter().chain(p.rest().iter()).copied().collect();
        let inv = p.inverse();
        for c in 0..5 {
            assert_eq!(perm[inv[c]], c);
        }
    }

    #[test]
    fn untrained_fru_is_the_identity() {
        let dev = crate::device::default_device();
        let fru = Fru::new(4, 6, &dev);
        let x: Tensor<4> = Tensor::random([2, 4, 5, 5], Distribution::Normal(0.0, 1.0), &dev);
        let mut m = [vec![0.0; 6], vec![0.0; 6], vec![0.0; 6]];
        let mut v = [vec![1.0; 6], vec![1.0; 6], vec![1.0; 6]];
        let y = fru.forward(x.clone(), &mut m, &mut v, false);
        let a = x.into_data().try_into_vec::<f32>().unwrap();
        let b = y.into_data().try_into_vec::<f32>().unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn switch_bce_is_the_cross_entropy_of_the_logistic_and_stays_finite() {
        let dev = crate::device::default_device();
        let z = [-30.0f32, -2.0, 0.0, 0.5, 3.0, 40.0];
        let t = [0.0f32, 1.0, 0.0, 1.0, 0.0, 1.0];
        let zt = Tensor::<2>::from_data(TensorData::new(z.to_vec(), [6, 1]), &dev);
        let tt = Tensor::<2>::from_data(TensorData::new(t.to_vec(), [6, 1]), &dev);
        let got = switch_bce(zt, tt)
            .into_data()
            .try_into_vec::<f32>()
            .unwrap();
        for ((z, t), g) in z.iter().zip(t).zip(got) {
            let p = 1.0 / (1.0 + (-(*z as f64)).exp());
            let want = if t == 1.0 { -p.ln() } else { -(1.0 - p).ln() };
            assert!(
                (g as f64 - want).abs() < 1e-4 * want.max(1.0),
                "z {z} t {t}: {g} vs {want}"
            );
        }
    }
}
