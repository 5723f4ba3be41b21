//! [`FrozenConv`] and [`Affine`] on burn tensors: concrete `Flex` primitives for the forward
//! pass, a hand-written `Backward` step on `Autodiff<Flex>`, and burn's own operations for
//! tensors on any other backend.

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
use super::elementwise::{Act, Join, epilogue_row, scale_row};
use super::flex::*;
use super::scratch::zeroed;

fn conv_forward_flex(
    k: &FrozenConv,
    x: FlexTensor,
    residual: Option<(FlexTensor, Join)>,
) -> (FlexTensor, ConvGeom) {
    let x = dense(x);
    let g = k.geom(dims(&x));
    let r = residual.map(|(r, j)| (dense(r), j));
    let mut y = zeroed(g.n * g.out_len());
    let ep = Epilogue {
        bias: &k.bias,
        act: k.act,
        residual: r.as_ref().map(|(r, j)| (data(r), *j)),
    };
    conv::forward(&g, data(&x), &k.weight, &ep, &mut y);
    (tensor(y, [g.n, g.cout, g.ho, g.wo]), g)
}

#[derive(Debug)]
struct ConvBackward;

/// What the backward pass of a [`FrozenConv`] keeps: the unit, the geometry, its output (for
/// the activation's mask) and whether a residual was joined before the activation.
type ConvState = (Arc<FrozenConv>, ConvGeom, Option<FlexTensor>);

impl Backward<Flex, 2> for ConvBackward {
    type State = ConvState;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_r] = ops.parents;
        let (k, g, y) = ops.state;
        let gy = grads.consume::<Flex>(&ops.node);
        let gz = match &y {
            Some(y) => masked(gy, y, k.act),
            None => dense(gy),
        };
        if let Some(node) = node_r {
            grads.register::<Flex>(node.id, gz.clone());
        }
        if let Some(node) = node_x {
            let mut dx = zeroed(g.n * g.in_len());
            conv::backward_input(&g, data(&gz), &k.weight, &mut dx);
            grads.register::<Flex>(node.id, tensor(dx, [g.n, g.cin, g.h, g.w]));
        }
    }
}

#[derive(Debug)]
struct ConvBackward1;

impl Backward<Flex, 1> for ConvBackward1 {
    type State = ConvState;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let (k, g, y) = ops.state;
        let gy = grads.consume::<Flex>(&ops.node);
        if let Some(node) = node_x {
            let gz = match &y {
                Some(y) => masked(gy, y, k.act),
                None => dense(gy),
            };
            let mut dx = zeroed(g.n * g.in_len());
            conv::backward_input(&g, data(&gz), &k.weight, &mut dx);
            grads.register::<Flex>(node.id, tensor(dx, [g.n, g.cin, g.h, g.w]));
        }
    }
}

impl FrozenConv {
    /// `act(conv(x) + bias)`, with `residual` joined before or after the activation.
    ///
    /// On the flex device (plain or autodiff) this runs sfr's fused kernels; on any other
    /// backend, burn's `conv2d` and element-wise operations compute the same function.
    pub fn forward(
        self: &Arc<Self>,
        x: Tensor<4>,
        residual: Option<(Tensor<4>, Join)>,
    ) -> Tensor<4> {
        // A residual after a nonlinearity would need act(z) for the mask: add it separately.
        if let Some((r, Join::AfterAct)) = &residual
            && self.act != Act::None
        {
            return self.forward(x, None) + r.clone();
        }
        let tracked = x.is_autodiff() || residual.as_ref().is_some_and(|(r, _)| r.is_autodiff());
        if tracked {
            let x = x.autodiff();
            let residual = residual.map(|(r, j)| (r.autodiff(), j));
            if let (Some(xa), Some(ra)) = (
                as_ad(&x),
                residual
                    .as_ref()
                    .map(|(r, j)| as_ad(r).map(|r| (r, *j)))
                    .transpose_opt(),
            ) {
                return Tensor::from_primitive::<Ad>(self.forward_ad(xa, ra));
            }
            return self.forward_burn(x, residual);
        }
        if let (Some(xf), Some(rf)) = (
            as_flex(&x),
            residual
                .as_ref()
                .map(|(r, j)| as_flex(r).map(|r| (r, *j)))
                .transpose_opt(),
        ) {
            return Tensor::from_primitive::<Flex>(conv_forward_flex(self, xf, rf).0);
        }
        self.forward_burn(x, residual)
    }

    fn forward_ad(self: &Arc<Self>, x: AdTensor, residual: Option<(AdTensor, Join)>) -> AdTensor {
        match residual {
            None => match ConvBackward1
                .prepare::<NoCheckpointing>([x.node()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    let (y, g) = conv_forward_flex(self, x.into_primitive(), None);
                    let keep = (self.act != Act::None).then(|| y.clone());
                    prep.finish((self.clone(), g, keep), y)
                }
                OpsKind::UnTracked(prep) => {
                    prep.finish(conv_forward_flex(self, x.into_primitive(), None).0)
                }
            },
            Some((r, join)) => match ConvBackward
                .prepare::<NoCheckpointing>([x.node(), r.node()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    let (y, g) = conv_forward_flex(
                        self,
                        x.into_primitive(),
                        Some((r.into_primitive(), join)),
                    );
                    let keep = (self.act != Act::None).then(|| y.clone());
                    prep.finish((self.clone(), g, keep), y)
                }
                OpsKind::UnTracked(prep) => prep.finish(
                    conv_forward_flex(self, x.into_primitive(), Some((r.into_primitive(), join))).0,
                ),
            },
        }
    }

    /// The same function from burn's standard operations (any backend).
    fn forward_burn(&self, x: Tensor<4>, residual: Option<(Tensor<4>, Join)>) -> Tensor<4> {
        let [_, _, h, w] = x.dims();
        let dev = x.device();
        let [kh, kw] = self.kernel;
        let weight = Tensor::<4>::from_data(
            TensorData::new(
                self.weight.to_vec(),
                [self.cout, self.cin / self.groups, kh, kw],
            ),
            &dev,
        );
        let bias = Tensor::<1>::from_data(TensorData::new(self.bias.to_vec(), [self.cout]), &dev);
        let pads = self.padding.pairs(h, w, self.kernel, self.stride);
        let options = ConvOptions::new_with_padding(self.stride, pads, self.dilation, self.groups);
        let z = conv2d(x, weight, Some(bias), options);
        let (z, after) = match residual {
            Some((r, Join::BeforeAct)) => (z + r, None),
            Some((r, Join::AfterAct)) => (z, Some(r)),
            None => (z, None),
        };
        let y = act_burn(z, self.act);
        match after {
            Some(r) => y + r,
            None => y,
        }
    }
}

fn act_burn(z: Tensor<4>, act: Act) -> Tensor<4> {
    match act {
        Act::None => z,
        Act::Relu => burn::tensor::activation::relu(z),
        Act::Relu6 => z.clamp(0.0, 6.0),
    }
}

// ---------------------------------------------------------------------------------------------
// Affine: batch norm + activation alone (after a site a tap needed raw)

/// `act(x · scale + shift)` per channel, optionally with a residual joined before the
/// activation: a frozen batch norm and its activation as one operation.
#[derive(Debug, Clone)]
pub struct Affine {
    /// Per channel.
    pub scale: Arc<Vec<f32>>,
    /// Per channel.
    pub shift: Arc<Vec<f32>>,
    /// Activation.
    pub act: Act,
}

fn affine_flex(a: &Affine, x: FlexTensor, residual: Option<(FlexTensor, Join)>) -> FlexTensor {
    let x = dense(x);
    let [n, c, h, w] = dims(&x);
    assert_eq!(
        c,
        a.scale.len(),
        "batch norm over {} channels got {c}",
        a.scale.len()
    );
    let r = residual.map(|(r, j)| (dense(r), j));
    let hw = h * w;
    let mut y = zeroed(n * c * hw);
    let xs = data(&x);
    let rs = r.as_ref().map(|(r, j)| (data(r), *j));
    y.par_chunks_mut(hw).enumerate().for_each(|(i, out)| {
        let ch = i % c;
        let res = rs.map(|(r, j)| (&r[i * hw..(i + 1) * hw], j));
        epilogue_row(
            out,
            &xs[i * hw..(i + 1) * hw],
            a.scale[ch],
            a.shift[ch],
            a.act,
            res,
        );
    });
    tensor(y, [n, c, h, w])
}

/// The gradient of an [`Affine`] at its input, from the one at its output.
fn affine_grads(
    a: &Affine,
    y: Option<FlexTensor>,
    gy: FlexTensor,
    want_x: bool,
    want_r: bool,
) -> (Option<FlexTensor>, Option<FlexTensor>) {
    let gz = match &y {
        Some(y) => masked(gy, y, a.act),
        None => dense(gy),
    };
    let gr = want_r.then(|| gz.clone());
    let gx = want_x.then(|| {
        let [_, c, h, w] = dims(&gz);
        let mut gx = owned(gz);
        mut_data(&mut gx)
            .par_chunks_mut(h * w)
            .enumerate()
            .for_each(|(i, row)| scale_row(row, a.scale[i % c]));
        gx
    });
    (gx, gr)
}

#[derive(Debug)]
struct AffineBackward;

impl Backward<Flex, 2> for AffineBackward {
    type State = (Arc<Affine>, Option<FlexTensor>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_r] = ops.parents;
        let (a, y) = ops.state;
        let gy = grads.consume::<Flex>(&ops.node);
        let (gx, gr) = affine_grads(&a, y, gy, node_x.is_some(), node_r.is_some());
        if let (Some(node), Some(g)) = (node_r, gr) {
            grads.register::<Flex>(node.id, g);
        }
        if let (Some(node), Some(g)) = (node_x, gx) {
            grads.register::<Flex>(node.id, g);
        }
    }
}

#[derive(Debug)]
struct AffineBackward1;

impl Backward<Flex, 1> for AffineBackward1 {
    type State = (Arc<Affine>, Option<FlexTensor>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let (a, y) = ops.state;
        let gy = grads.consume::<Flex>(&ops.node);
        if let (Some(node), (Some(g), _)) = (node_x, affine_grads(&a, y, gy, true, false)) {
            grads.register::<Flex>(node.id, g);
        }
    }
}

impl Affine {
    /// `act(x · scale + shift (+ residual))`.
    pub fn forward(self: &Arc<Self>, x: Tensor<4>, residual: Option<Tensor<4>>) -> Tensor<4> {
        let tracked = x.is_autodiff() || residual.as_ref().is_some_and(|r| r.is_autodiff());
        if tracked {
            let x = x.autodiff();
            let residual = residual.map(|r| r.autodiff());
            let xa = as_ad(&x);
            let ra = match &residual {
                Some(r) => as_ad(r).map(Some),
                None => Some(None),
            };
            if let (Some(xa), Some(ra)) = (xa, ra) {
                let keep = |y: &FlexTensor| (self.act != Act::None).then(|| y.clone());
                let out = match ra {
                    None => match AffineBackward1
                        .prepare::<NoCheckpointing>([xa.node()])
                        .compute_bound()
                        .stateful()
                    {
                        OpsKind::Tracked(prep) => {
                            let y = affine_flex(self, xa.into_primitive(), None);
                            prep.finish((self.clone(), keep(&y)), y)
                        }
                        OpsKind::UnTracked(prep) => {
                            prep.finish(affine_flex(self, xa.into_primitive(), None))
                        }
                    },
                    Some(ra) => match AffineBackward
                        .prepare::<NoCheckpointing>([xa.node(), ra.node()])
                        .compute_bound()
                        .stateful()
                    {
                        OpsKind::Tracked(prep) => {
                            let r = Some((ra.into_primitive(), Join::BeforeAct));
                            let y = affine_flex(self, xa.into_primitive(), r);
                            prep.finish((self.clone(), keep(&y)), y)
                        }
                        OpsKind::UnTracked(prep) => {
                            let r = Some((ra.into_primitive(), Join::BeforeAct));
                            prep.finish(affine_flex(self, xa.into_primitive(), r))
                        }
                    },
                };
                return Tensor::from_primitive::<Ad>(out);
            }
            return self.forward_burn(x, residual);
        }
        let xf = as_flex(&x);
        let rf = match &residual {
            Some(r) => as_flex(r).map(Some),
            None => Some(None),
        };
        if let (Some(xf), Some(rf)) = (xf, rf) {
            return Tensor::from_primitive::<Flex>(affine_flex(
                self,
                xf,
                rf.map(|r| (r, Join::BeforeAct)),
            ));
        }
        self.forward_burn(x, residual)
    }

    fn forward_burn(&self, x: Tensor<4>, residual: Option<Tensor<4>>) -> Tensor<4> {
        let dev = x.device();
        let c = self.scale.len();
        let s = Tensor::<4>::from_data(TensorData::new(self.scale.to_vec(), [1, c, 1, 1]), &dev);
        let t = Tensor::<4>::from_data(TensorData::new(self.shift.to_vec(), [1, c, 1, 1]), &dev);
        let z = x * s + t;
        let z = match residual {
            Some(r) => z + r,
            None => z,
        };
        act_burn(z, self.act)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::flex::test_util::close;
    use crate::engine::{BnParams, Padding};
    use burn::tensor::{Device, Distribution};

    fn unit(
        cin: usize,
        cout: usize,
        k: usize,
        s: usize,
        groups: usize,
        act: Act,
    ) -> Arc<FrozenConv> {
        let dev = Device::flex();
        let w: Tensor<4> = Tensor::random(
            [cout, cin / groups, k, k],
            Distribution::Normal(0.0, 0.5),
            &dev,
        );
        let b: Tensor<1> = Tensor::random([cout], Distribution::Normal(0.0, 0.5), &dev);
        Arc::new(FrozenConv {
            weight: Arc::new(w.into_data().try_into_vec::<f32>().unwrap()),
            bias: Arc::new(b.into_data().try_into_vec::<f32>().unwrap()),
            cout,
            cin,
            kernel: [k, k],
            stride: [s, s],
            padding: Padding::same_all(k / 2),
            dilation: [1, 1],
            groups,
            act,
        })
    }

    /// The fused op and burn's own operations agree in value and in input gradient, with and
    /// without a residual, for each kernel kind.
    #[test]
    fn fused_conv_matches_burn_forward_and_gradient() {
        let dev = Device::flex();
        for (cin, cout, k, s, groups, act, join) in [
            (6, 6, 3, 2, 6, Act::Relu6, None),
            (6, 10, 1, 1, 1, Act::None, Some(Join::AfterAct)),
            (4, 8, 3, 1, 1, Act::Relu, Some(Join::BeforeAct)),
            (3, 8, 3, 2, 1, Act::Relu6, None),
        ] {
            let u = unit(cin, cout, k, s, groups, act);
            let x: Tensor<4> = Tensor::random([3, cin, 9, 9], Distribution::Normal(0.0, 2.0), &dev);
            let ho = (9 + 2 * (k / 2) - k) / s + 1;
            let r: Tensor<4> =
                Tensor::random([3, cout, ho, ho], Distribution::Normal(0.0, 1.0), &dev);
            let res = join.map(|j| (r.clone(), j));
            close(
                u.forward(x.clone(), res.clone()),
                u.forward_burn(x.clone(), res.clone()),
                1e-5,
            );
            let adev = dev.clone().autodiff();
            let gy: Tensor<4> =
                Tensor::random([3, cout, ho, ho], Distribution::Normal(0.0, 1.0), &dev);
            let grads = |use_burn: bool| {
                let xa = x.clone().autodiff().require_grad();
                let ra = r.clone().autodiff().require_grad();
                let res = join.map(|j| (ra.clone(), j));
                let y = if use_burn {
                    u.forward_burn(xa.clone(), res)
                } else {
                    u.forward(xa.clone(), res)
                };
                let g = (y * gy.clone().autodiff()).sum().backward();
                let gx = xa.grad(&g).unwrap();
                let gr = join.map(|_| ra.grad(&g).unwrap());
                (gx, gr)
            };
            let (a, ar) = grads(false);
            let (b, br) = grads(true);
            close(a, b, 1e-4);
            if let (Some(a), Some(b)) = (ar, br) {
                close(a, b, 1e-5);
            }
            let _ = adev;
        }
    }

    #[test]
    fn folded_batch_norm_matches_conv_then_bn() {
        let u = unit(4, 5, 3, 1, 1, Act::None);
        let gamma = [1.5, -0.5, 2.0, 0.1, 1.0];
        let beta = [0.1, 0.2, -0.3, 0.0, 1.0];
        let mean = [0.5, -1.0, 0.0, 2.0, 0.3];
        let var = [1.0, 0.25, 4.0, 0.01, 2.0];
        let bn = BnParams {
            gamma: &gamma,
            beta: &beta,
            mean: &mean,
            var: &var,
            eps: 1e-5,
        };
        let folded = Arc::new(u.fold(&bn, Act::Relu6));
        let (scale, shift) = bn.scale_shift();
        let affine = Arc::new(Affine {
            scale: Arc::new(scale),
            shift: Arc::new(shift),
            act: Act::Relu6,
        });
        let dev = Device::flex();
        let x: Tensor<4> = Tensor::random([2, 4, 7, 7], Distribution::Normal(0.0, 2.0), &dev);
        close(
            folded.forward(x.clone(), None),
            affine.forward(u.forward(x.clone(), None), None),
            1e-5,
        );
        // And the affine op's gradient against burn's.
        let z = u.forward(x, None);
        let gy: Tensor<4> = Tensor::random(z.dims(), Distribution::Normal(0.0, 1.0), &dev);
        let g_of = |use_burn: bool| {
            let za = z.clone().autodiff().require_grad();
            let y = if use_burn {
                affine.forward_burn(za.clone(), None)
            } else {
                affine.forward(za.clone(), None)
            };
            let g = (y * gy.clone().autodiff()).sum().backward();
            za.grad(&g).unwrap()
        };
        close(g_of(false), g_of(true), 1e-5);
    }
}
