//! sfr's own operations for frozen networks, with hand-written backward passes, plugged into
//! burn through its extension mechanism (concrete `Flex` / `Autodiff<Flex>` primitives via
//! `try_into_primitive` and `from_primitive`; no fork of burn).
//!
//! Why: on burn 0.22.1's CPU backend a convolution's input gradient is a transposed
//! convolution that, for depthwise layers, runs thousands of tiny GEMMs per image; eval-mode
//! batch norm and ReLU6 decompose into several single-threaded passes each way. The backbone
//! is frozen, so its batch norm folds into the convolution and the whole unit becomes one
//! operation:
//!
//! - [`FrozenConv`]: conv + folded batch norm (or bias) + activation (+ a residual joined
//!   before or after it), forward and input gradient; [`Affine`]: batch norm + activation on
//!   its own, for the sites a tap needs raw (`fused.rs`);
//! - the FRUs' operations (`fru_ops.rs`): [`conv2d_trainable`] (input and weight gradients),
//!   [`batch_norm_train_relu`] (batch statistics), [`gather_channels`] / [`replace_channels`];
//! - [`perturb`]: perturbed pixels clipped to [0, 255] (`pixels.rs`).
//!
//! Underneath, on plain `f32` slices: [`conv`] (1×1 convs as one GEMM per chunk of columns,
//! im2col + GEMM otherwise), [`depthwise`] (direct kernels), [`gemm`] (the `gemm` crate, AVX-512
//! on), [`elementwise`] (epilogues and masks), [`geom`] and [`scratch`]; `flex.rs` converts
//! between burn tensors and flex primitives.
//!
//! Every kernel runs on rayon's pool, cut into tasks by geometry only, so results do not
//! depend on the thread count. Tensors on another backend go through burn's own operations
//! ([`FrozenConv::forward`] says so), so the model code stays backend-neutral.

pub mod conv;
pub mod depthwise;
pub mod elementwise;
mod flex;
mod fru_ops;
mod fused;
pub mod gemm;
pub mod geom;
mod pixels;
pub mod scratch;

use std::sync::Arc;

pub use elementwise::{Act, Join};
pub use fru_ops::{
    BnTrainOutput, batch_norm_train_relu, conv2d_as, conv2d_trainable, gather_channels,
    replace_channels,
};
pub use fused::Affine;
pub use geom::ConvGeom;
pub use pixels::perturb;

/// How a convolution pads its input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Padding {
    /// Fixed `(begin, end)` padding for height and width.
    Explicit([(usize, usize); 2]),
    /// TensorFlow's "same" padding, computed from the input size (extra pixel at the end).
    TfSame,
}

impl Padding {
    /// Symmetric padding `p` on every side.
    pub fn same_all(p: usize) -> Self {
        Padding::Explicit([(p, p), (p, p)])
    }

    /// The `(begin, end)` pairs for an `h × w` input.
    pub fn pairs(&self, h: usize, w: usize, k: [usize; 2], s: [usize; 2]) -> [(usize, usize); 2] {
        match *self {
            Padding::Explicit(p) => p,
            Padding::TfSame => {
                let one = |i: usize, k: usize, s: usize| {
                    let o = i.div_ceil(s);
                    let total = ((o.max(1) - 1) * s + k).saturating_sub(i);
                    (total / 2, total - total / 2)
                };
                [one(h, k[0], s[0]), one(w, k[1], s[1])]
            }
        }
    }
}

/// A convolution whose weights never change, fused with what follows it: per-channel bias
/// (a folded batch norm's shift), an activation and optionally a residual input.
#[derive(Debug, Clone)]
pub struct FrozenConv {
    /// `[out, in / groups, kh, kw]`, row-major.
    pub weight: Arc<Vec<f32>>,
    /// `[out]`.
    pub bias: Arc<Vec<f32>>,
    /// Output channels.
    pub cout: usize,
    /// Input channels.
    pub cin: usize,
    /// `[kh, kw]`.
    pub kernel: [usize; 2],
    /// Stride.
    pub stride: [usize; 2],
    /// Padding.
    pub padding: Padding,
    /// Dilation.
    pub dilation: [usize; 2],
    /// Groups.
    pub groups: usize,
    /// Activation after the (biased) convolution.
    pub act: Act,
}

/// Frozen batch-norm parameters, per channel.
#[derive(Debug, Clone)]
pub struct BnParams<'a> {
    /// γ.
    pub gamma: &'a [f32],
    /// β.
    pub beta: &'a [f32],
    /// Running mean.
    pub mean: &'a [f32],
    /// Running variance.
    pub var: &'a [f32],
    /// ε.
    pub eps: f64,
}

impl BnParams<'_> {
    /// `(scale, shift)` with `bn(x) = x · scale + shift`, computed in f64 as PyTorch's
    /// `(x − mean) / sqrt(var + eps) · γ + β` rounds once per output.
    pub fn scale_shift(&self) -> (Vec<f32>, Vec<f32>) {
        let scale: Vec<f64> = self
            .gamma
            .iter()
            .zip(self.var)
            .map(|(&g, &v)| g as f64 / (v as f64 + self.eps).sqrt())
            .collect();
        let shift = self
            .beta
            .iter()
            .zip(self.mean)
            .zip(&scale)
            .map(|((&b, &m), &s)| (b as f64 - m as f64 * s) as f32)
            .collect();
        (scale.iter().map(|&s| s as f32).collect(), shift)
    }
}

impl FrozenConv {
    /// The geometry for an input of shape `dims`; panics with the layer's shapes if they do not
    /// fit (the zoo and the ONNX loader check shapes before running).
    pub fn geom(&self, dims: [usize; 4]) -> ConvGeom {
        let [_, c, h, w] = dims;
        assert_eq!(
            c, self.cin,
            "convolution expects {} input channels, got {c} (input {dims:?})",
            self.cin
        );
        let pads = self.padding.pairs(h, w, self.kernel, self.stride);
        ConvGeom::new(
            dims,
            self.cout,
            self.kernel,
            self.stride,
            pads,
            self.dilation,
            self.groups,
        )
        .unwrap_or_else(|| {
            panic!(
                "convolution {}→{} kernel {:?} stride {:?} does not fit input {dims:?}",
                self.cin, self.cout, self.kernel, self.stride
            )
        })
    }

    /// This convolution with a batch norm folded in: `w' = w · scale`, `b' = (b − mean) ·
    /// scale + β`, then `act`.
    pub fn fold(&self, bn: &BnParams, act: Act) -> FrozenConv {
        let (scale, shift) = bn.scale_shift();
        let per = self.weight.len() / self.cout;
        let weight: Vec<f32> = self
            .weight
            .chunks(per)
            .zip(&scale)
            .flat_map(|(row, &s)| row.iter().map(move |&v| v * s))
            .collect();
        let bias: Vec<f32> = self
            .bias
            .iter()
            .zip(&scale)
            .zip(&shift)
            .map(|((&b, &s), &t)| b.mul_add(s, t))
            .collect();
        FrozenConv {
            weight: Arc::new(weight),
            bias: Arc::new(bias),
            act,
            ..self.clone()
        }
    }
}
