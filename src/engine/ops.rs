//! The operations on burn tensors: concrete `Flex` primitives for the forward pass, a
//! hand-written `Backward` step on `Autodiff<Flex>`, and burn's own operations for tensors on
//! any other backend.

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::{FlexTensor, Layout};
use burn::backend::{Autodiff, Flex};
use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Bytes, DType, Shape, Tensor, TensorData};
use rayon::prelude::*;

use super::FrozenConv;
#[cfg(test)]
use super::Padding;
use super::conv::{self, ConvGeom, Epilogue};
use super::elementwise::{
    Act, Join, add_clip, clip_mask, epilogue_row, mask_grad, relu_affine_grad, relu_grad_sums,
    scale_row, sum, sum_sq_dev,
};
use super::scratch::zeroed;

type Ad = Autodiff<Flex>;
type AdTensor = <Ad as burn::backend::BackendTypes>::FloatTensorPrimitive;

/// A contiguous f32 copy-free view of a flex tensor (copies only if strided).
fn dense(t: FlexTensor) -> FlexTensor {
    assert_eq!(t.dtype(), DType::F32, "sfr's engine runs on f32 tensors");
    if t.as_slice::<f32>()
        .is_some_and(|s| s.len() == t.layout().num_elements())
    {
        t
    } else {
        t.to_contiguous()
    }
}

fn data(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("dense tensor")
}

fn tensor(v: Vec<f32>, shape: [usize; 4]) -> FlexTensor {
    FlexTensor::new(
        Bytes::from_elems(v),
        Layout::contiguous(Shape::from(shape.to_vec())),
        DType::F32,
    )
}

fn dims(t: &FlexTensor) -> [usize; 4] {
    let s = t.layout().shape();
    [s[0], s[1], s[2], s[3]]
}

/// Owned, writable f32 storage of `t` (in place when nothing else holds it; otherwise a copy
/// made in parallel).
fn owned(t: FlexTensor) -> FlexTensor {
    let t = dense(t);
    if t.is_unique() {
        return t;
    }
    let src = data(&t);
    let mut v = zeroed(src.len());
    v.par_chunks_mut(1 << 16)
        .zip(src.par_chunks(1 << 16))
        .for_each(|(d, s)| d.copy_from_slice(s));
    FlexTensor::new(
        Bytes::from_elems(v),
        Layout::contiguous(t.layout().shape().clone()),
        DType::F32,
    )
}

fn mut_data(t: &mut FlexTensor) -> &mut [f32] {
    t.try_storage_mut::<f32>().expect("owned tensor")
}

/// A tensor on the flex device, as a primitive (`None`: another backend).
fn as_flex(x: &Tensor<4>) -> Option<FlexTensor> {
    x.clone().try_into_primitive::<Flex>().ok()
}

fn as_ad(x: &Tensor<4>) -> Option<AdTensor> {
    x.clone().try_into_primitive::<Ad>().ok()
}

/// `gy · act'(y)` per element, in parallel, reusing `gy`'s storage when it can.
fn masked(gy: FlexTensor, y: &FlexTensor, act: Act) -> FlexTensor {
    if act == Act::None {
        return dense(gy);
    }
    let mut g = owned(gy);
    let y = data(y);
    mut_data(&mut g)
        .par_chunks_mut(1 << 14)
        .zip(y.par_chunks(1 << 14))
        .for_each(|(g, y)| mask_grad(g, y, act));
    g
}

// ---------------------------------------------------------------------------------------------
// FrozenConv

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

trait TransposeOpt<T> {
    /// `None` → `Some(None)`; `Some(Some(v))` → `Some(Some(v))`; `Some(None)` → `None`.
    fn transpose_opt(self) -> Option<Option<T>>;
}

impl<T> TransposeOpt<T> for Option<Option<T>> {
    fn transpose_opt(self) -> Option<Option<T>> {
        match self {
            None => Some(None),
            Some(Some(v)) => Some(Some(v)),
            Some(None) => None,
        }
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

fn train_forward_flex(g: &ConvGeom, x: &FlexTensor, w: &FlexTensor) -> FlexTensor {
    let zeros = zeroed(g.cout);
    let ep = Epilogue {
        bias: &zeros,
        act: Act::None,
        residual: None,
    };
    let mut y = zeroed(g.n * g.out_len());
    conv::forward(g, data(x), data(w), &ep, &mut y);
    tensor(y, [g.n, g.cout, g.ho, g.wo])
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
    let burn_conv = |x: Tensor<4>, w: Tensor<4>| {
        conv2d(
            x,
            w,
            None,
            ConvOptions::new([stride, stride], [pad, pad], [1, 1], groups),
        )
    };
    if x.is_autodiff() || w.is_autodiff() {
        let (x, w) = (x.autodiff(), w.autodiff());
        let (Some(xa), Some(wa)) = (as_ad(&x), as_ad(&w)) else {
            return burn_conv(x, w);
        };
        let g = train_geom(x.dims(), w.dims(), stride, pad, groups);
        let out = match TrainConvBackward
            .prepare::<NoCheckpointing>([xa.node(), wa.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let xp = dense(xa.into_primitive());
                let wp = dense(wa.into_primitive());
                let y = train_forward_flex(&g, &xp, &wp);
                prep.finish((g, Some(xp), Some(wp)), y)
            }
            OpsKind::UnTracked(prep) => {
                let xp = dense(xa.into_primitive());
                let wp = dense(wa.into_primitive());
                prep.finish(train_forward_flex(&g, &xp, &wp))
            }
        };
        return Tensor::from_primitive::<Ad>(out);
    }
    if let (Some(xf), Some(wf)) = (as_flex(&x), as_flex(&w)) {
        let g = train_geom(x.dims(), w.dims(), stride, pad, groups);
        return Tensor::from_primitive::<Flex>(train_forward_flex(&g, &dense(xf), &dense(wf)));
    }
    burn_conv(x, w)
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

fn vec_tensor(v: Vec<f32>) -> FlexTensor {
    let n = v.len();
    FlexTensor::new(
        Bytes::from_elems(v),
        Layout::contiguous(Shape::from(vec![n])),
        DType::F32,
    )
}

fn vec1(t: &FlexTensor) -> Vec<f32> {
    dense(t.clone()).as_slice::<f32>().expect("dense").to_vec()
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

// ---------------------------------------------------------------------------------------------
// Perturbed pixels: x + v, clipped to [0, 255]

/// Images per task of the perturbation sum.
fn perturb_flex(x: &FlexTensor, v: &FlexTensor, clip: bool) -> FlexTensor {
    let d = dims(x);
    let per = d[1] * d[2] * d[3];
    let (xs, vs) = (data(x), data(v));
    let broadcast = vs.len() == per;
    let mut y = zeroed(xs.len());
    y.par_chunks_mut(per).enumerate().for_each(|(i, out)| {
        let xv = &xs[i * per..(i + 1) * per];
        let vv = if broadcast {
            vs
        } else {
            &vs[i * per..(i + 1) * per]
        };
        add_clip(out, xv, vv, clip);
    });
    tensor(y, d)
}

#[derive(Debug)]
struct PerturbBackward;

impl Backward<Flex, 2> for PerturbBackward {
    /// Pixels, perturbation, clip.
    type State = (FlexTensor, FlexTensor, bool);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_v] = ops.parents;
        let (x, v, clip) = ops.state;
        let g = dense(grads.consume::<Flex>(&ops.node));
        let d = dims(&x);
        let per = d[1] * d[2] * d[3];
        let vd = dims(&v);
        let broadcast = vd[0] == 1 && d[0] != 1;
        // g where x + v lies in [0, 255] (PyTorch's clamp passes the gradient at the bounds).
        let masked = if clip {
            let (xs, vs) = (data(&x), data(&v));
            let mut m = owned(g);
            mut_data(&mut m)
                .par_chunks_mut(per)
                .enumerate()
                .for_each(|(i, gi)| {
                    let xv = &xs[i * per..(i + 1) * per];
                    let vv = if vs.len() == per {
                        vs
                    } else {
                        &vs[i * per..(i + 1) * per]
                    };
                    clip_mask(gi, xv, vv);
                });
            m
        } else {
            g
        };
        if let Some(node) = node_v {
            let gv = if broadcast {
                let ms = data(&masked);
                let n = d[0];
                // Σ over the batch, in image order (deterministic), parallel over pixels.
                let mut acc = zeroed(per);
                acc.par_chunks_mut(1 << 12).enumerate().for_each(|(j, a)| {
                    let at = j << 12;
                    for i in 0..n {
                        let src = &ms[i * per + at..i * per + at + a.len()];
                        for (o, &s) in a.iter_mut().zip(src) {
                            *o += s;
                        }
                    }
                });
                tensor(acc, vd)
            } else {
                masked.clone()
            };
            grads.register::<Flex>(node.id, gv);
        }
        if let Some(node) = node_x {
            grads.register::<Flex>(node.id, masked);
        }
    }
}

/// `pixels + v` (`v` of the same shape or one image broadcast over the batch), clipped to
/// [0, 255] when `clip`, with gradients for both.
pub fn perturb(pixels: Tensor<4>, v: Tensor<4>, clip: bool) -> Tensor<4> {
    let [n, c, h, w] = pixels.dims();
    let vd = v.dims();
    let fits = vd == [n, c, h, w] || vd == [1, c, h, w];
    let burn_way = |x: Tensor<4>, v: Tensor<4>| {
        let y = x + v;
        if clip { y.clamp(0.0, 255.0) } else { y }
    };
    if !fits {
        // Leave shape errors to burn's broadcasting rules (and their messages).
        return burn_way(pixels, v);
    }
    if pixels.is_autodiff() || v.is_autodiff() {
        let (x, v) = (pixels.autodiff(), v.autodiff());
        let (Some(xa), Some(va)) = (as_ad(&x), as_ad(&v)) else {
            return burn_way(x, v);
        };
        let out = match PerturbBackward
            .prepare::<NoCheckpointing>([xa.node(), va.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (xp, vp) = (dense(xa.into_primitive()), dense(va.into_primitive()));
                let y = perturb_flex(&xp, &vp, clip);
                prep.finish((xp, vp, clip), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(perturb_flex(
                &dense(xa.into_primitive()),
                &dense(va.into_primitive()),
                clip,
            )),
        };
        return Tensor::from_primitive::<Ad>(out);
    }
    match (as_flex(&pixels), as_flex(&v)) {
        (Some(xf), Some(vf)) => {
            Tensor::from_primitive::<Flex>(perturb_flex(&dense(xf), &dense(vf), clip))
        }
        _ => burn_way(pixels, v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::BnParams;
    use burn::tensor::{Device, Distribution};

    fn close(a: Tensor<4>, b: Tensor<4>, tol: f32) {
        let a = a.into_data().try_into_vec::<f32>().unwrap();
        let b = b.into_data().try_into_vec::<f32>().unwrap();
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1.0);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= tol * scale, "{x} vs {y}");
        }
    }

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
    fn perturb_matches_add_and_clamp() {
        let dev = Device::flex();
        // Pixels on the bounds and beyond them after the perturbation.
        let x: Tensor<4> = Tensor::random([3, 3, 4, 5], Distribution::Uniform(-20.0, 275.0), &dev)
            .clamp(0.0, 255.0);
        for (vn, clip) in [(1, true), (3, true), (1, false)] {
            let v: Tensor<4> =
                Tensor::random([vn, 3, 4, 5], Distribution::Uniform(-10.0, 10.0), &dev);
            let gy: Tensor<4> = Tensor::random([3, 3, 4, 5], Distribution::Normal(0.0, 1.0), &dev);
            let run = |fast: bool| {
                let xa = x.clone().autodiff().require_grad();
                let va = v.clone().autodiff().require_grad();
                let y = if fast {
                    perturb(xa.clone(), va.clone(), clip)
                } else {
                    let y = xa.clone() + va.clone();
                    if clip { y.clamp(0.0, 255.0) } else { y }
                };
                let g = (y.clone() * gy.clone().autodiff()).sum().backward();
                (y.inner(), xa.grad(&g).unwrap(), va.grad(&g).unwrap())
            };
            let (a, ax, av) = run(true);
            let (b, bx, bv) = run(false);
            close(a, b, 0.0);
            close(ax, bx, 0.0);
            close(av, bv, 1e-6);
        }
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
