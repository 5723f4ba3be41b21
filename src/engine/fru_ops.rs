//! The operations the FRUs train through: a convolution whose weight learns, batch norm on the
//! batch's statistics + ReLU, and the gather/replace of a site's regenerated channels.

use std::sync::Arc;

use burn::backend::Flex;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Tensor, TensorData};
use rayon::prelude::*;

use super::FrozenConv;
use super::conv::{self, ConvGeom, Epilogue};
use super::elementwise::{Act, epilogue_row, relu_affine_grad, relu_grad_sums, sum, sum_sq_dev};
use super::flex::*;
use super::scratch::zeroed;

// ---------------------------------------------------------------------------------------------
// A convolution that learns (the FRUs)

#[derive(Debug)]
struct TrainConvBackward;

impl Backward<Flex, 2> for TrainConvBackward {
    /// Geometry, the input (for the weight gradient), the weight (for the input gradient).
    type State = (ConvGeom, Option<FlexTensor>, Option<FlexTensor>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_w] = ops.parents;
        let (g, x, w) = ops.state;
        let gy = dense(grads.consume::<Flex>(&ops.node));
        if let (Some(node), Some(x)) = (node_w, x) {
            let mut dw = zeroed(g.weight_len());
            conv::backward_weight(&g, data(&x), data(&gy), &mut dw);
            let shape = [g.cout, g.cin / g.groups, g.kh, g.kw];
            grads.register::<Flex>(node.id, tensor(dw, shape));
        }
        if let (Some(node), Some(w)) = (node_x, w) {
            let mut dx = zeroed(g.n * g.in_len());
            conv::backward_input(&g, data(&gy), data(&w), &mut dx);
            grads.register::<Flex>(node.id, tensor(dx, [g.n, g.cin, g.h, g.w]));
        }
    }
}

fn train_geom(x: [usize; 4], w: [usize; 4], stride: usize, pad: usize, groups: usize) -> ConvGeom {
    ConvGeom::new(
        x,
        w[0],
        [w[2], w[3]],
        [stride, stride],
        [(pad, pad), (pad, pad)],
        [1, 1],
        groups,
    )
    .filter(|g| g.cin / g.groups == w[1])
    .unwrap_or_else(|| panic!("convolution weight {w:?} does not fit input {x:?}"))
}

fn train_forward_flex(g: &ConvGeom, x: &FlexTensor, w: &FlexTensor, bias: &[f32]) -> FlexTensor {
    let zeros;
    let bias = if bias.is_empty() {
        zeros = zeroed(g.cout);
        &zeros[..]
    } else {
        bias
    };
    let ep = Epilogue {
        bias,
        act: Act::None,
        residual: None,
    };
    let mut y = zeroed(g.n * g.out_len());
    conv::forward(g, data(x), data(w), &ep, &mut y);
    tensor(y, [g.n, g.cout, g.ho, g.wo])
}

/// The learning convolution on flex primitives (plain or autodiff): `None` for tensors on
/// another backend.
fn learn_flex(
    x: &Tensor<4>,
    w: &Tensor<4>,
    geom: impl Fn([usize; 4], [usize; 4]) -> ConvGeom,
    bias: &[f32],
) -> Option<Tensor<4>> {
    if x.is_autodiff() || w.is_autodiff() {
        let (x, w) = (x.clone().autodiff(), w.clone().autodiff());
        let (xa, wa) = (as_ad(&x)?, as_ad(&w)?);
        let g = geom(x.dims(), w.dims());
        let out = match TrainConvBackward
            .prepare::<NoCheckpointing>([xa.node(), wa.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let xp = dense(xa.into_primitive());
                let wp = dense(wa.into_primitive());
                let y = train_forward_flex(&g, &xp, &wp, bias);
                prep.finish((g, Some(xp), Some(wp)), y)
            }
            OpsKind::UnTracked(prep) => {
                let xp = dense(xa.into_primitive());
                let wp = dense(wa.into_primitive());
                prep.finish(train_forward_flex(&g, &xp, &wp, bias))
            }
        };
        return Some(Tensor::from_primitive::<Ad>(out));
    }
    let (xf, wf) = (as_flex(x)?, as_flex(w)?);
    let g = geom(x.dims(), w.dims());
    Some(Tensor::from_primitive::<Flex>(train_forward_flex(
        &g,
        &dense(xf),
        &dense(wf),
        bias,
    )))
}

/// `conv2d(x, w)` without bias, symmetric padding `pad`, with gradients for the input and the
/// weight (whichever is tracked). Other backends: burn's `conv2d`.
pub fn conv2d_trainable(
    x: Tensor<4>,
    w: Tensor<4>,
    stride: usize,
    pad: usize,
    groups: usize,
) -> Tensor<4> {
    let geom = |x, w| train_geom(x, w, stride, pad, groups);
    learn_flex(&x, &w, geom, &[]).unwrap_or_else(|| {
        conv2d(
            x,
            w,
            None,
            ConvOptions::new([stride, stride], [pad, pad], [1, 1], groups),
        )
    })
}

/// The frozen convolution `op` (its geometry and bias; its activation must be none) run with
/// the weight `w` instead of its own, with gradients for the input and for `w` (whichever is
/// tracked): a backbone conv whose weights learn (`sfr defend --method uat`). Other backends:
/// burn's `conv2d` (symmetric padding only).
pub fn conv2d_as(x: Tensor<4>, w: Tensor<4>, op: &FrozenConv) -> Tensor<4> {
    assert_eq!(op.act, Act::None, "conv2d_as runs a raw convolution");
    let geom = |xd: [usize; 4], wd: [usize; 4]| {
        let g = op.geom(xd);
        assert_eq!(
            wd,
            [op.cout, op.cin / op.groups, op.kernel[0], op.kernel[1]],
            "weight does not fit the convolution"
        );
        g
    };
    if let Some(y) = learn_flex(&x, &w, geom, &op.bias) {
        return y;
    }
    let [_, _, h, wd] = x.dims();
    let [(t, b), (l, r)] = op.padding.pairs(h, wd, op.kernel, op.stride);
    assert!(
        t == b && l == r,
        "asymmetric padding needs the flex backend"
    );
    let c = op.cout;
    let bias = Tensor::<1>::from_data(TensorData::new(op.bias.to_vec(), [c]), &x.device());
    conv2d(
        x,
        w,
        Some(bias),
        ConvOptions::new(op.stride, [t, l], op.dilation, op.groups),
    )
}

// ---------------------------------------------------------------------------------------------
// Channel gather / replace (the FRUs' split of a site into regenerated and untouched channels)

fn gather_flex(x: &FlexTensor, idx: &[usize]) -> FlexTensor {
    let [n, c, h, w] = dims(x);
    let hw = h * w;
    let xs = data(x);
    let k = idx.len();
    let mut y = zeroed(n * k * hw);
    y.par_chunks_mut(hw).enumerate().for_each(|(i, out)| {
        let (b, j) = (i / k, i % k);
        out.copy_from_slice(&xs[(b * c + idx[j]) * hw..][..hw]);
    });
    tensor(y, [n, k, h, w])
}

/// `g` scattered into a zero tensor of `c` channels at `idx`.
fn scatter_flex(g: &FlexTensor, idx: &[usize], c: usize) -> FlexTensor {
    let [n, k, h, w] = dims(g);
    let hw = h * w;
    let gs = data(g);
    let mut pos = vec![usize::MAX; c];
    for (j, &ch) in idx.iter().enumerate() {
        pos[ch] = j;
    }
    let mut y = zeroed(n * c * hw);
    y.par_chunks_mut(hw).enumerate().for_each(|(i, out)| {
        let (b, ch) = (i / c, i % c);
        if pos[ch] != usize::MAX {
            out.copy_from_slice(&gs[(b * k + pos[ch]) * hw..][..hw]);
        }
    });
    tensor(y, [n, c, h, w])
}

/// `x` with channels `idx` taken from `y` (which holds them in `idx` order).
fn replace_flex(x: &FlexTensor, y: &FlexTensor, idx: &[usize]) -> FlexTensor {
    let [n, c, h, w] = dims(x);
    let hw = h * w;
    let k = idx.len();
    let (xs, ys) = (data(x), data(y));
    let mut pos = vec![usize::MAX; c];
    for (j, &ch) in idx.iter().enumerate() {
        pos[ch] = j;
    }
    let mut out = zeroed(n * c * hw);
    out.par_chunks_mut(hw).enumerate().for_each(|(i, o)| {
        let (b, ch) = (i / c, i % c);
        let src = if pos[ch] == usize::MAX {
            &xs[i * hw..][..hw]
        } else {
            &ys[(b * k + pos[ch]) * hw..][..hw]
        };
        o.copy_from_slice(src);
    });
    tensor(out, [n, c, h, w])
}

fn check_channels(c: usize, idx: &[usize]) {
    let mut seen = vec![false; c];
    for &i in idx {
        assert!(
            i < c && !seen[i],
            "channel index {i} repeated or beyond {c} channels"
        );
        seen[i] = true;
    }
}

#[derive(Debug)]
struct GatherBackward;

impl Backward<Flex, 1> for GatherBackward {
    type State = (Arc<Vec<usize>>, usize);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let (idx, c) = ops.state;
        let g = dense(grads.consume::<Flex>(&ops.node));
        if let Some(node) = node {
            grads.register::<Flex>(node.id, scatter_flex(&g, &idx, c));
        }
    }
}

#[derive(Debug)]
struct ReplaceBackward;

impl Backward<Flex, 2> for ReplaceBackward {
    type State = Arc<Vec<usize>>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_y] = ops.parents;
        let idx = ops.state;
        let g = dense(grads.consume::<Flex>(&ops.node));
        if let Some(node) = node_y {
            grads.register::<Flex>(node.id, gather_flex(&g, &idx));
        }
        if let Some(node) = node_x {
            let [_, c, h, w] = dims(&g);
            let hw = h * w;
            let mut gx = owned(g);
            let mut hit = vec![false; c];
            for &i in idx.iter() {
                hit[i] = true;
            }
            mut_data(&mut gx)
                .par_chunks_mut(hw)
                .enumerate()
                .for_each(|(i, row)| {
                    if hit[i % c] {
                        row.fill(0.0);
                    }
                });
            grads.register::<Flex>(node.id, gx);
        }
    }
}

/// `x[:, idx]`: the channels `idx` of `x`, in that order (each at most once).
pub fn gather_channels(x: Tensor<4>, idx: &Arc<Vec<usize>>) -> Tensor<4> {
    let c = x.dims()[1];
    check_channels(c, idx);
    let burn_way = |x: Tensor<4>| {
        let dev = x.device();
        let i: Vec<i64> = idx.iter().map(|&i| i as i64).collect();
        x.select(
            1,
            Tensor::<1, burn::tensor::Int>::from_data(TensorData::new(i, [idx.len()]), &dev),
        )
    };
    if x.is_autodiff() {
        let Some(xa) = as_ad(&x) else {
            return burn_way(x);
        };
        let out = match GatherBackward
            .prepare::<NoCheckpointing>([xa.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let y = gather_flex(&dense(xa.into_primitive()), idx);
                prep.finish((idx.clone(), c), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(gather_flex(&dense(xa.into_primitive()), idx)),
        };
        return Tensor::from_primitive::<Ad>(out);
    }
    match as_flex(&x) {
        Some(xf) => Tensor::from_primitive::<Flex>(gather_flex(&dense(xf), idx)),
        None => burn_way(x),
    }
}

/// [`replace_channels`] from burn's `select` and `cat` (any backend).
fn replace_channels_burn(x: Tensor<4>, y: Tensor<4>, idx: &[usize]) -> Tensor<4> {
    let c = x.dims()[1];
    let dev = x.device();
    let mut pos = vec![usize::MAX; c];
    for (j, &ch) in idx.iter().enumerate() {
        pos[ch] = j;
    }
    let rest: Vec<usize> = (0..c).filter(|&ch| pos[ch] == usize::MAX).collect();
    // cat([y, x[:, rest]]) holds channel ch at pos[ch] or after y, in rest's order.
    let mut order = vec![0i64; c];
    for (r, &ch) in rest.iter().enumerate() {
        pos[ch] = idx.len() + r;
    }
    for (ch, o) in order.iter_mut().enumerate() {
        *o = pos[ch] as i64;
    }
    let int = |v: Vec<i64>| {
        let n = v.len();
        Tensor::<1, burn::tensor::Int>::from_data(TensorData::new(v, [n]), &dev)
    };
    let kept = x.select(1, int(rest.iter().map(|&r| r as i64).collect()));
    Tensor::cat(vec![y, kept], 1).select(1, int(order))
}

/// `x` with its channels `idx` replaced by those of `y` (`y[:, j]` goes to channel `idx[j]`).
pub fn replace_channels(x: Tensor<4>, y: Tensor<4>, idx: &Arc<Vec<usize>>) -> Tensor<4> {
    let [n, c, h, w] = x.dims();
    assert_eq!(
        y.dims(),
        [n, idx.len(), h, w],
        "replacement channels do not fit"
    );
    check_channels(c, idx);
    let burn_way = |x, y| replace_channels_burn(x, y, idx);
    if x.is_autodiff() || y.is_autodiff() {
        let (x, y) = (x.autodiff(), y.autodiff());
        let (Some(xa), Some(ya)) = (as_ad(&x), as_ad(&y)) else {
            return burn_way(x, y);
        };
        let out = match ReplaceBackward
            .prepare::<NoCheckpointing>([xa.node(), ya.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let o = replace_flex(
                    &dense(xa.into_primitive()),
                    &dense(ya.into_primitive()),
                    idx,
                );
                prep.finish(idx.clone(), o)
            }
            OpsKind::UnTracked(prep) => prep.finish(replace_flex(
                &dense(xa.into_primitive()),
                &dense(ya.into_primitive()),
                idx,
            )),
        };
        return Tensor::from_primitive::<Ad>(out);
    }
    match (as_flex(&x), as_flex(&y)) {
        (Some(xf), Some(yf)) => {
            Tensor::from_primitive::<Flex>(replace_flex(&dense(xf), &dense(yf), idx))
        }
        _ => burn_way(x, y),
    }
}

// ---------------------------------------------------------------------------------------------
// Batch norm on batch statistics + ReLU (the FRUs in training)

/// What [`batch_norm_train_relu`] returns.
pub struct BnTrainOutput {
    /// `relu(γ · (x − mean) / sqrt(var + ε) + β)`.
    pub output: Tensor<4>,
    /// Per-channel batch mean.
    pub mean: Vec<f32>,
    /// Per-channel biased batch variance (what burn's `batch_norm_train` returns).
    pub variance: Vec<f32>,
}

/// Per-channel mean and biased variance of `x` `[n, c, h, w]` (two passes, f64 totals).
fn channel_stats(x: &[f32], [n, c, h, w]: [usize; 4]) -> (Vec<f64>, Vec<f64>) {
    let hw = h * w;
    let count = (n * hw) as f64;
    (0..c)
        .into_par_iter()
        .map(|ch| {
            let plane = |b: usize| &x[(b * c + ch) * hw..][..hw];
            let mean = (0..n).map(|b| sum(plane(b))).sum::<f64>() / count;
            let sq: f64 = (0..n).map(|b| sum_sq_dev(plane(b), mean as f32)).sum();
            (mean, sq / count)
        })
        .unzip()
}

#[derive(Debug)]
struct BnTrainBackward;

/// Input, output, mean, 1/std, γ.
type BnTrainState = (
    FlexTensor,
    FlexTensor,
    Arc<Vec<f64>>,
    Arc<Vec<f64>>,
    Arc<Vec<f32>>,
);

impl Backward<Flex, 3> for BnTrainBackward {
    type State = BnTrainState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_g, node_b] = ops.parents;
        let (x, y, mean, inv_std, gamma) = ops.state;
        let gy = dense(grads.consume::<Flex>(&ops.node));
        let [n, c, h, w] = dims(&x);
        let hw = h * w;
        let (xs, ys, gs) = (data(&x), data(&y), data(&gy));
        let count = (n * hw) as f64;
        // Σ gz and Σ gz·x̂ per channel, with gz = gy where the ReLU passed.
        let sums: Vec<(f64, f64)> = (0..c)
            .into_par_iter()
            .map(|ch| {
                let m = mean[ch] as f32;
                let (mut sg, mut sgx) = (0.0f64, 0.0f64);
                for b in 0..n {
                    let at = (b * c + ch) * hw;
                    let r = at..at + hw;
                    let (a, d) = relu_grad_sums(&gs[r.clone()], &ys[r.clone()], &xs[r], m);
                    sg += a;
                    sgx += d;
                }
                (sg, sgx * inv_std[ch])
            })
            .collect();
        if let Some(node) = node_b {
            let db: Vec<f32> = sums.iter().map(|s| s.0 as f32).collect();
            grads.register::<Flex>(node.id, vec_tensor(db));
        }
        if let Some(node) = node_g {
            let dg: Vec<f32> = sums.iter().map(|s| s.1 as f32).collect();
            grads.register::<Flex>(node.id, vec_tensor(dg));
        }
        if let Some(node) = node_x {
            let mut dx = zeroed(n * c * hw);
            dx.par_chunks_mut(hw).enumerate().for_each(|(i, out)| {
                let ch = i % c;
                let (m, is) = (mean[ch], inv_std[ch]);
                // dx = γ/σ · (gz − mean(gz) − x̂ · mean(gz·x̂)), x̂ = (x − m)/σ.
                let k = gamma[ch] as f64 * is;
                let mg = sums[ch].0 / count;
                let mgx = sums[ch].1 / count;
                let c1 = -k * is * mgx;
                let c0 = -k * mg - c1 * m;
                let r = i * hw..(i + 1) * hw;
                relu_affine_grad(
                    out,
                    &gs[r.clone()],
                    &ys[r.clone()],
                    &xs[r],
                    k as f32,
                    c1 as f32,
                    c0 as f32,
                );
            });
            grads.register::<Flex>(node.id, tensor(dx, [n, c, h, w]));
        }
    }
}

/// Forward of the fused op on flex primitives: output, mean, 1/std, biased variance.
fn bn_train_flex(
    x: &FlexTensor,
    gamma: &[f32],
    beta: &[f32],
    eps: f64,
) -> (FlexTensor, Vec<f64>, Vec<f64>, Vec<f64>) {
    let d = dims(x);
    let [n, c, h, w] = d;
    assert_eq!(
        gamma.len(),
        c,
        "batch norm over {} channels got {c}",
        gamma.len()
    );
    let xs = data(x);
    let (mean, var) = channel_stats(xs, d);
    let inv_std: Vec<f64> = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    let hw = h * w;
    let mut y = zeroed(n * c * hw);
    y.par_chunks_mut(hw).enumerate().for_each(|(i, out)| {
        let ch = i % c;
        let scale = gamma[ch] as f64 * inv_std[ch];
        let shift = beta[ch] as f64 - mean[ch] * scale;
        epilogue_row(
            out,
            &xs[i * hw..][..hw],
            scale as f32,
            shift as f32,
            Act::Relu,
            None,
        );
    });
    (tensor(y, d), mean, inv_std, var)
}

/// Batch norm on the batch's own statistics, then ReLU, as one operation with gradients for
/// `x`, `γ` and `β` (an FRU's BN + ReLU in training). Other backends: burn's
/// `batch_norm_train` and `relu`.
pub fn batch_norm_train_relu(
    x: Tensor<4>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    eps: f64,
) -> BnTrainOutput {
    let burn_way = |x: Tensor<4>, gamma: Tensor<1>, beta: Tensor<1>| {
        let out = burn::tensor::module::batch_norm_train(x, gamma, beta, eps);
        let to_vec = |t: Tensor<1>| t.into_data().try_into_vec::<f32>().unwrap_or_default();
        BnTrainOutput {
            output: burn::tensor::activation::relu(out.output),
            mean: to_vec(out.mean),
            variance: to_vec(out.variance),
        }
    };
    let finish = |mean: Vec<f64>, var: Vec<f64>| {
        (
            mean.iter().map(|&m| m as f32).collect::<Vec<f32>>(),
            var.iter().map(|&v| v as f32).collect::<Vec<f32>>(),
        )
    };
    if x.is_autodiff() || gamma.is_autodiff() || beta.is_autodiff() {
        let (x, gamma, beta) = (x.autodiff(), gamma.autodiff(), beta.autodiff());
        let (Some(xa), Some(ga), Some(ba)) = (
            x.clone().try_into_primitive::<Ad>().ok(),
            gamma.clone().try_into_primitive::<Ad>().ok(),
            beta.clone().try_into_primitive::<Ad>().ok(),
        ) else {
            return burn_way(x, gamma, beta);
        };
        let (gv, bv) = (vec1(ga.primitive()), vec1(ba.primitive()));
        let stats;
        let out = match BnTrainBackward
            .prepare::<NoCheckpointing>([xa.node(), ga.node(), ba.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let xp = dense(xa.into_primitive());
                let (y, mean, inv_std, var) = bn_train_flex(&xp, &gv, &bv, eps);
                stats = Some(finish(mean.clone(), var));
                let state = (
                    xp,
                    y.clone(),
                    Arc::new(mean),
                    Arc::new(inv_std),
                    Arc::new(gv),
                );
                prep.finish(state, y)
            }
            OpsKind::UnTracked(prep) => {
                let xp = dense(xa.into_primitive());
                let (y, mean, _, var) = bn_train_flex(&xp, &gv, &bv, eps);
                stats = Some(finish(mean, var));
                prep.finish(y)
            }
        };
        let (mean, variance) = stats.expect("statistics computed");
        return BnTrainOutput {
            output: Tensor::from_primitive::<Ad>(out),
            mean,
            variance,
        };
    }
    let (Some(xf), Ok(gf), Ok(bf)) = (
        as_flex(&x),
        gamma.clone().try_into_primitive::<Flex>(),
        beta.clone().try_into_primitive::<Flex>(),
    ) else {
        return burn_way(x, gamma, beta);
    };
    let (y, mean, _, var) = bn_train_flex(&dense(xf), &vec1(&gf), &vec1(&bf), eps);
    let (mean, variance) = finish(mean, var);
    BnTrainOutput {
        output: Tensor::from_primitive::<Flex>(y),
        mean,
        variance,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::flex::test_util::close;
    use burn::tensor::{Device, Distribution};

    #[test]
    fn channel_gather_and_replace_match_select_and_cat() {
        let dev = Device::flex();
        let x: Tensor<4> = Tensor::random([2, 5, 3, 4], Distribution::Normal(0.0, 1.0), &dev);
        let idx = Arc::new(vec![3usize, 0]);
        let y: Tensor<4> = Tensor::random([2, 2, 3, 4], Distribution::Normal(0.0, 1.0), &dev);
        let gy: Tensor<4> = Tensor::random([2, 5, 3, 4], Distribution::Normal(0.0, 1.0), &dev);
        let run = |fast: bool| {
            let xa = x.clone().autodiff().require_grad();
            let ya = y.clone().autodiff().require_grad();
            let top = if fast {
                gather_channels(xa.clone(), &idx)
            } else {
                let i = Tensor::<1, burn::tensor::Int>::from_data(
                    TensorData::new(vec![3i64, 0], [2]),
                    &xa.device(),
                );
                xa.clone().select(1, i)
            };
            let out = if fast {
                replace_channels(xa.clone(), ya.clone() + top.clone(), &idx)
            } else {
                // Channel order 0..5 from cat([new(3), new(0), x1, x2, x4]).
                let i = Tensor::<1, burn::tensor::Int>::from_data(
                    TensorData::new(vec![1i64, 2, 3, 0, 4], [5]),
                    &xa.device(),
                );
                let rest = Tensor::<1, burn::tensor::Int>::from_data(
                    TensorData::new(vec![1i64, 2, 4], [3]),
                    &xa.device(),
                );
                Tensor::cat(
                    vec![ya.clone() + top.clone(), xa.clone().select(1, rest)],
                    1,
                )
                .select(1, i)
            };
            let g = (out.clone() * gy.clone().autodiff()).sum().backward();
            (out.inner(), xa.grad(&g).unwrap(), ya.grad(&g).unwrap())
        };
        let (a, ax, ay) = run(true);
        let (b, bx, by) = run(false);
        close(
            replace_channels_burn(x.clone(), y.clone(), &idx),
            replace_channels(x.clone(), y.clone(), &idx),
            0.0,
        );
        close(a, b, 1e-6);
        close(ax, bx, 1e-6);
        close(ay, by, 1e-6);
    }

    /// A backbone conv run with a learning weight (`--method uat`): its output, input gradient
    /// and weight gradient match burn's own `conv2d` and its autodiff, for a dense strided conv
    /// with a bias, a depthwise one and a grouped 1×1; TF "same" padding against the frozen
    /// conv's own forward.
    #[test]
    fn conv2d_as_matches_burn_conv2d_and_its_gradients() {
        use crate::engine::{FrozenConv, Padding};
        let dev = Device::flex();
        let cases = [
            // (cin, cout, k, stride, pad, groups)
            (3, 8, 3, 2, 1, 1),
            (6, 6, 3, 2, 1, 6),
            (8, 4, 1, 1, 0, 2),
        ];
        for (cin, cout, k, stride, pad, groups) in cases {
            let x: Tensor<4> = Tensor::random([2, cin, 9, 9], Distribution::Normal(0.0, 1.0), &dev);
            let w: Tensor<4> = Tensor::random(
                [cout, cin / groups, k, k],
                Distribution::Normal(0.0, 0.5),
                &dev,
            );
            let bias: Vec<f32> = (0..cout).map(|i| i as f32 * 0.1 - 0.2).collect();
            let op = FrozenConv {
                weight: Arc::new(w.clone().into_data().try_into_vec::<f32>().unwrap()),
                bias: Arc::new(bias.clone()),
                cout,
                cin,
                kernel: [k, k],
                stride: [stride, stride],
                padding: Padding::same_all(pad),
                dilation: [1, 1],
                groups,
                act: Act::None,
            };
            // One cotangent for both (drawn here: the device's generator is shared with the
            // tests running beside this one).
            let dims = conv2d_as(x.clone(), w.clone(), &op).dims();
            let gy = Tensor::<4>::random(dims, Distribution::Normal(0.0, 1.0), &dev);
            let run = |ours: bool| {
                let xa = x.clone().autodiff().require_grad();
                let wa = w.clone().autodiff().require_grad();
                let y = if ours {
                    conv2d_as(xa.clone(), wa.clone(), &op)
                } else {
                    let b = Tensor::<1>::from_data(TensorData::new(bias.clone(), [cout]), &dev);
                    conv2d(
                        xa.clone(),
                        wa.clone(),
                        Some(b.autodiff()),
                        ConvOptions::new([stride, stride], [pad, pad], [1, 1], groups),
                    )
                };
                let g = (y.clone() * gy.clone().autodiff()).sum().backward();
                (y.inner(), xa.grad(&g).unwrap(), wa.grad(&g).unwrap())
            };
            let (a, ax, aw) = run(true);
            let (b, bx, bw) = run(false);
            close(a, b, 1e-5);
            close(ax, bx, 1e-5);
            close(aw, bw, 1e-5);
            // Not learning: a plain forward, the frozen conv's own result.
            close(
                conv2d_as(x.clone(), w.clone(), &op),
                op_forward(&op, x),
                1e-5,
            );
        }
        // TF "same" at stride 2 (one pixel after, none before).
        let x: Tensor<4> = Tensor::random([1, 3, 8, 8], Distribution::Normal(0.0, 1.0), &dev);
        let w: Tensor<4> = Tensor::random([4, 3, 3, 3], Distribution::Normal(0.0, 0.5), &dev);
        let op = FrozenConv {
            weight: Arc::new(w.clone().into_data().try_into_vec::<f32>().unwrap()),
            bias: Arc::new(vec![0.5; 4]),
            cout: 4,
            cin: 3,
            kernel: [3, 3],
            stride: [2, 2],
            padding: Padding::TfSame,
            dilation: [1, 1],
            groups: 1,
            act: Act::None,
        };
        close(conv2d_as(x.clone(), w, &op), op_forward(&op, x), 1e-5);
    }

    fn op_forward(op: &FrozenConv, x: Tensor<4>) -> Tensor<4> {
        Arc::new(op.clone()).forward(x, None)
    }

    #[test]
    fn batch_norm_train_relu_matches_burn() {
        let dev = Device::flex();
        let x: Tensor<4> = Tensor::random([3, 4, 5, 6], Distribution::Normal(0.5, 2.0), &dev);
        let g: Tensor<1> = Tensor::random([4], Distribution::Normal(1.0, 0.5), &dev);
        let b: Tensor<1> = Tensor::random([4], Distribution::Normal(0.0, 0.5), &dev);
        let gy: Tensor<4> = Tensor::random([3, 4, 5, 6], Distribution::Normal(0.0, 1.0), &dev);
        let run = |fast: bool| {
            let xa = x.clone().autodiff().require_grad();
            let ga = g.clone().autodiff().require_grad();
            let ba = b.clone().autodiff().require_grad();
            let (y, mean, var) = if fast {
                let o = batch_norm_train_relu(xa.clone(), ga.clone(), ba.clone(), 1e-5);
                (o.output, o.mean, o.variance)
            } else {
                let o = burn::tensor::module::batch_norm_train(
                    xa.clone(),
                    ga.clone(),
                    ba.clone(),
                    1e-5,
                );
                let v = |t: Tensor<1>| t.into_data().try_into_vec::<f32>().unwrap();
                (
                    burn::tensor::activation::relu(o.output),
                    v(o.mean),
                    v(o.variance),
                )
            };
            let grads = (y.clone() * gy.clone().autodiff()).sum().backward();
            let v1 = |t: Tensor<1>| {
                Tensor::<4>::from_data(
                    TensorData::new(t.into_data().try_into_vec::<f32>().unwrap(), [1, 1, 1, 4]),
                    &dev,
                )
            };
            let stats =
                Tensor::<4>::from_data(TensorData::new([mean, var].concat(), [1, 1, 2, 4]), &dev);
            (
                y.inner(),
                xa.grad(&grads).unwrap(),
                v1(ga.grad(&grads).unwrap()),
                v1(ba.grad(&grads).unwrap()),
                stats,
            )
        };
        let a = run(true);
        let b = run(false);
        close(a.0, b.0, 1e-5);
        close(a.1, b.1, 1e-4);
        close(a.2, b.2, 1e-4);
        close(a.3, b.3, 1e-4);
        close(a.4, b.4, 1e-5);
    }

    #[test]
    fn trainable_conv_gradients_match_burn() {
        let dev = Device::flex();
        let x: Tensor<4> = Tensor::random([4, 6, 10, 10], Distribution::Normal(0.0, 1.0), &dev);
        for (k, pad) in [(3, 1), (1, 0)] {
            let w: Tensor<4> = Tensor::random([5, 6, k, k], Distribution::Normal(0.0, 0.3), &dev);
            let gy: Tensor<4> =
                Tensor::random([4, 5, 10, 10], Distribution::Normal(0.0, 1.0), &dev);
            let run = |use_burn: bool| {
                let xa = x.clone().autodiff().require_grad();
                let wa = w.clone().autodiff().require_grad();
                let y = if use_burn {
                    conv2d(
                        xa.clone(),
                        wa.clone(),
                        None,
                        ConvOptions::new([1, 1], [pad, pad], [1, 1], 1),
                    )
                } else {
                    conv2d_trainable(xa.clone(), wa.clone(), 1, pad, 1)
                };
                let g = (y.clone() * gy.clone().autodiff()).sum().backward();
                (y.inner(), xa.grad(&g).unwrap(), wa.grad(&g).unwrap())
            };
            let (y1, x1, w1) = run(false);
            let (y2, x2, w2) = run(true);
            close(y1, y2, 1e-5);
            close(x1, x2, 1e-4);
            close(w1, w2, 1e-4);
        }
    }
}
