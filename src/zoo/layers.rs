//! Building blocks shared by the zoo: convolutions that expose their output as a *site*, frozen
//! batch norm, linear layers, pooling, LRN, and the [`Loader`] that fills them from a weight file
//! with shape checks.

use std::collections::BTreeSet;
use std::sync::Arc;

use burn::tensor::module::{adaptive_avg_pool2d, avg_pool2d, max_pool2d};
use burn::tensor::ops::{AvgPoolOptions, MaxPoolOptions};
use burn::tensor::{Device, Tensor, TensorData};

pub use crate::engine::{Act, Padding};
use crate::engine::{Affine, BnParams, FrozenConv, Join};
use crate::error::{Result, SfrError};
use crate::weights::{RawTensor, TensorMap};

/// Something that acts on a network's intermediate conv outputs.
///
/// A model calls [`Tap::visit`] once per *site* (the raw output of a convolution, after its bias
/// and before any batch norm or nonlinearity) in forward order, and continues with what the tap
/// returns. A tap can pass the tensor through, record it, regenerate channels (SFR's FRUs) or
/// replace them.
///
/// A site the tap does not [want](Tap::wants) is never visited, so the network may fuse it with
/// what follows (batch norm, activation, residual) into one operation.
pub trait Tap {
    /// Called with the site's name and its output `[batch, channels, height, width]`.
    fn visit(&mut self, site: &str, x: Tensor<4>) -> Tensor<4>;

    /// Whether [`Tap::visit`] needs to see `site` (default: every site). Must not change with
    /// visits: a model asks before running the site.
    fn wants(&self, _site: &str) -> bool {
        true
    }

    /// Called once with the network's normalised input `[batch, 3, h, w]` before its first
    /// layer (default: unchanged). A rectifier in front of the network (`sfr defend --method
    /// prn`) acts here, through the same tap as the FRUs.
    fn input(&mut self, x: Tensor<4>) -> Tensor<4> {
        x
    }

    /// Runs the convolution of a site the tap [wants](Tap::wants) on its input `x`. By default
    /// the convolution runs as it is and [`Tap::visit`] sees its output; a tap that changes the
    /// convolution's own weights (`sfr defend --method uat`) runs it itself.
    fn conv(&mut self, conv: &Conv, x: Tensor<4>) -> Tensor<4> {
        let y = conv.raw(x);
        self.visit(&conv.name, y)
    }
}

/// The tap that changes nothing.
pub struct NoTap;

impl Tap for NoTap {
    fn visit(&mut self, _site: &str, x: Tensor<4>) -> Tensor<4> {
        x
    }

    fn wants(&self, _site: &str) -> bool {
        false
    }
}

/// The tap that changes nothing and records the chosen sites' outputs, in forward order (and
/// the network's normalised input, when `input` is asked for).
pub struct Record<'a> {
    /// The sites to record.
    pub sites: &'a [String],
    /// Their outputs, in visit (forward) order, with the site's name.
    pub out: Vec<(String, Tensor<4>)>,
    /// Record the network's normalised input as `input`.
    pub keep_input: bool,
    /// The normalised input, when `keep_input`.
    pub input: Option<Tensor<4>>,
}

impl<'a> Record<'a> {
    /// A recorder of `sites`, nothing recorded yet.
    pub fn new(sites: &'a [String]) -> Self {
        Record {
            sites,
            out: Vec::new(),
            keep_input: false,
            input: None,
        }
    }

    /// The recorded output of `site`, if it was visited.
    pub fn get(&self, site: &str) -> Option<&Tensor<4>> {
        self.out.iter().find(|(s, _)| s == site).map(|(_, t)| t)
    }
}

impl Tap for Record<'_> {
    fn wants(&self, site: &str) -> bool {
        self.sites.iter().any(|s| s == site)
    }

    fn visit(&mut self, site: &str, x: Tensor<4>) -> Tensor<4> {
        if self.wants(site) {
            self.out.push((site.to_string(), x.clone()));
        }
        x
    }

    fn input(&mut self, x: Tensor<4>) -> Tensor<4> {
        if self.keep_input {
            self.input = Some(x.clone());
        }
        x
    }
}

/// A frozen 2-D convolution whose output is a named site.
#[derive(Debug, Clone)]
pub struct Conv {
    /// Site name: the weight key's prefix in the weight file (e.g. `features.0.0`).
    pub name: String,
    /// `[out, in / groups, kh, kw]`.
    pub weight: Tensor<4>,
    /// `[out]`, if the layer has a bias.
    pub bias: Option<Tensor<1>>,
    /// Stride.
    pub stride: [usize; 2],
    /// Padding.
    pub padding: Padding,
    /// Groups (`in` for depthwise).
    pub groups: usize,
    /// The same convolution as an engine operation (bias, no activation).
    pub op: Arc<FrozenConv>,
}

impl Conv {
    /// Output channels.
    pub fn out_channels(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Input channels.
    pub fn in_channels(&self) -> usize {
        self.weight.dims()[1] * self.groups
    }

    /// Kernel size `[kh, kw]`.
    pub fn kernel(&self) -> [usize; 2] {
        let d = self.weight.dims();
        [d[2], d[3]]
    }

    /// The convolution alone, without visiting the tap.
    pub fn raw(&self, x: Tensor<4>) -> Tensor<4> {
        self.op.forward(x, None)
    }

    /// The convolution, then the tap at this site.
    pub fn forward(&self, x: Tensor<4>, tap: &mut dyn Tap) -> Tensor<4> {
        if tap.wants(&self.name) {
            tap.conv(self, x)
        } else {
            self.raw(x)
        }
    }

    /// The convolution, the tap, then `act` (one fused operation where the tap does not want
    /// the site).
    pub fn forward_act(&self, x: Tensor<4>, act: Act, tap: &mut dyn Tap) -> Tensor<4> {
        if tap.wants(&self.name) {
            let y = tap.conv(self, x);
            return match act {
                Act::None => y,
                Act::Relu => relu(y),
                Act::Relu6 => relu6(y),
            };
        }
        let op = Arc::new(FrozenConv {
            act,
            ..(*self.op).clone()
        });
        op.forward(x, None)
    }
}

/// Frozen batch normalisation (inference statistics).
#[derive(Debug, Clone)]
pub struct BatchNorm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
    mean: Vec<f32>,
    var: Vec<f32>,
    eps: f64,
}

impl BatchNorm {
    fn params(&self) -> BnParams<'_> {
        BnParams {
            gamma: &self.gamma,
            beta: &self.beta,
            mean: &self.mean,
            var: &self.var,
            eps: self.eps,
        }
    }

    /// The normalisation followed by `act`, as one operation.
    pub fn with_act(&self, act: Act) -> Affine {
        let (scale, shift) = self.params().scale_shift();
        Affine {
            scale: Arc::new(scale),
            shift: Arc::new(shift),
            act,
        }
    }

    /// Normalise with the running statistics.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        Arc::new(self.with_act(Act::None)).forward(x, None)
    }
}

/// A frozen fully connected layer.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[in, out]` (transposed from PyTorch's `[out, in]`).
    weight_t: Tensor<2>,
    bias: Option<Tensor<1>>,
}

impl Linear {
    /// `x · Wᵀ + b` for `x` of shape `[batch, in]`.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let y = x.matmul(self.weight_t.clone());
        match &self.bias {
            Some(b) => y + b.clone().unsqueeze_dim(0),
            None => y,
        }
    }
}

/// A conv whose output site is followed by batch norm and an activation.
#[derive(Debug, Clone)]
pub struct ConvBn {
    /// The conv (its output is the site).
    pub conv: Conv,
    /// The batch norm.
    pub bn: BatchNorm,
    /// The activation.
    pub act: Act,
    /// conv + folded batch norm + activation as one operation.
    fused: Arc<FrozenConv>,
    /// Batch norm + activation, after a site a tap wants raw.
    affine: Arc<Affine>,
}

impl ConvBn {
    /// Builds the unit and its fused forms.
    pub fn new(conv: Conv, bn: BatchNorm, act: Act) -> Self {
        let fused = Arc::new(conv.op.fold(&bn.params(), act));
        let affine = Arc::new(bn.with_act(act));
        ConvBn {
            conv,
            bn,
            act,
            fused,
            affine,
        }
    }

    fn wants(&self, tap: &dyn Tap) -> bool {
        tap.wants(&self.conv.name)
    }

    /// conv → tap → BN → activation.
    pub fn forward(&self, x: Tensor<4>, tap: &mut dyn Tap) -> Tensor<4> {
        if self.wants(tap) {
            let y = self.conv.forward(x, tap);
            self.affine.forward(y, None)
        } else {
            self.fused.forward(x, None)
        }
    }

    /// conv → tap → BN → activation, then `+ skip` (MobileNet's and EfficientNet's inverted
    /// residual: a linear bottleneck plus the block's input).
    pub fn forward_plus(&self, x: Tensor<4>, skip: Tensor<4>, tap: &mut dyn Tap) -> Tensor<4> {
        if self.wants(tap) {
            self.forward(x, tap) + skip
        } else {
            self.fused.forward(x, Some((skip, Join::AfterAct)))
        }
    }

    /// conv → tap → BN, `+ skip`, then `then` (ResNet's block end: `relu(bn3(conv3(x)) +
    /// identity)`); the unit's own activation must be [`Act::None`].
    pub fn forward_add_then(
        &self,
        x: Tensor<4>,
        skip: Tensor<4>,
        then: Act,
        tap: &mut dyn Tap,
    ) -> Tensor<4> {
        debug_assert_eq!(self.act, Act::None, "forward_add_then on an activated unit");
        if self.wants(tap) {
            let y = self.conv.forward(x, tap);
            let a = Arc::new(self.bn.with_act(then));
            a.forward(y, Some(skip))
        } else {
            let op = Arc::new(FrozenConv {
                act: then,
                ..(*self.fused).clone()
            });
            op.forward(x, Some((skip, Join::BeforeAct)))
        }
    }

    /// Whether a tap wants this unit's site.
    pub fn tapped(&self, tap: &dyn Tap) -> bool {
        self.wants(tap)
    }
}

/// ReLU.
pub fn relu(x: Tensor<4>) -> Tensor<4> {
    burn::tensor::activation::relu(x)
}

/// ReLU6 (`min(max(x, 0), 6)`).
pub fn relu6(x: Tensor<4>) -> Tensor<4> {
    x.clamp(0.0, 6.0)
}

/// Max pooling, `k`×`k`, stride `s`, symmetric padding `p`, PyTorch's ceil mode if asked.
pub fn max_pool(x: Tensor<4>, k: usize, s: usize, p: usize, ceil: bool) -> Tensor<4> {
    max_pool2d(
        x,
        MaxPoolOptions::new([k, k])
            .with_stride([s, s])
            .with_padding([p, p])
            .with_ceil_mode(ceil),
    )
}

/// Average pooling to `[1, 1]` then flatten: `[batch, channels]`.
pub fn global_avg_pool(x: Tensor<4>) -> Tensor<2> {
    let [n, c, _, _] = x.dims();
    adaptive_avg_pool2d(x, [1, 1]).reshape([n, c])
}

/// Adaptive average pooling to `[h, w]` then flatten.
pub fn adaptive_avg_flat(x: Tensor<4>, h: usize, w: usize) -> Tensor<2> {
    let [n, c, _, _] = x.dims();
    adaptive_avg_pool2d(x, [h, w]).reshape([n, c * h * w])
}

/// Flatten `[n, c, h, w]` to `[n, c·h·w]` (PyTorch's `view(n, -1)` order).
pub fn flatten(x: Tensor<4>) -> Tensor<2> {
    let [n, c, h, w] = x.dims();
    x.reshape([n, c * h * w])
}

/// Local response normalisation across channels, as Caffe and `torch.nn.LocalResponseNorm`
/// define it: `x / (k + alpha/size · Σ x²)^beta` over a window of `size` channels (zero padded).
pub fn lrn(x: Tensor<4>, size: usize, alpha: f64, beta: f64, k: f64) -> Tensor<4> {
    let [n, c, h, w] = x.dims();
    let sq = x.clone().powf_scalar(2.0).reshape([n, 1, c, h * w]);
    let pad_lo = size / 2;
    let pad_hi = (size - 1) / 2;
    let avg = avg_pool2d(
        sq,
        AvgPoolOptions::new([size, 1])
            .with_stride([1, 1])
            .with_padding_pairs([(pad_lo, pad_hi), (0, 0)])
            .with_count_include_pad(true),
    )
    .reshape([n, c, h, w]);
    let div = avg.mul_scalar(alpha).add_scalar(k).powf_scalar(beta);
    x / div
}

/// Fills layers from a [`TensorMap`], checking every shape, and reports keys left unused.
pub struct Loader {
    model: String,
    map: TensorMap,
    device: Device,
}

impl Loader {
    /// A loader for `model` over the tensors of a weight file.
    pub fn new(model: &str, map: TensorMap, device: &Device) -> Self {
        Loader {
            model: model.to_string(),
            map,
            device: device.clone(),
        }
    }

    /// The device the tensors go to.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Take the raw tensor `key`, checking its shape.
    pub fn raw(&mut self, key: &str, shape: &[usize]) -> Result<RawTensor> {
        let t = self.map.remove(key).ok_or_else(|| SfrError::MissingKey {
            model: self.model.clone(),
            key: key.to_string(),
            expected: shape.to_vec(),
        })?;
        if t.shape != shape {
            return Err(SfrError::ShapeMismatch {
                model: self.model.clone(),
                key: key.to_string(),
                expected: shape.to_vec(),
                found: t.shape,
            });
        }
        if t.data.iter().any(|v| !v.is_finite()) {
            return Err(SfrError::NonFinite {
                model: self.model.clone(),
                key: key.to_string(),
            });
        }
        Ok(t)
    }

    /// Take tensor `key` of shape `shape` onto the device.
    pub fn tensor<const D: usize>(&mut self, key: &str, shape: [usize; D]) -> Result<Tensor<D>> {
        let t = self.raw(key, &shape)?;
        Ok(Tensor::from_data(
            TensorData::new(t.data, shape),
            &self.device,
        ))
    }

    /// Whether the weight file holds `key`.
    pub fn has(&self, key: &str) -> bool {
        self.map.get(key).is_some()
    }

    /// A convolution at `prefix` (`prefix.weight`, optional `prefix.bias`).
    #[allow(clippy::too_many_arguments)]
    pub fn conv(
        &mut self,
        prefix: &str,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        padding: Padding,
        groups: usize,
        bias: bool,
    ) -> Result<Conv> {
        let shape = [cout, cin / groups, k, k];
        let w = self.raw(&format!("{prefix}.weight"), &shape)?;
        let b = if bias {
            Some(self.raw(&format!("{prefix}.bias"), &[cout])?.data)
        } else {
            None
        };
        let op = Arc::new(FrozenConv {
            weight: Arc::new(w.data.clone()),
            bias: Arc::new(b.clone().unwrap_or_else(|| vec![0.0; cout])),
            cout,
            cin,
            kernel: [k, k],
            stride: [stride, stride],
            padding,
            dilation: [1, 1],
            groups,
            act: Act::None,
        });
        Ok(Conv {
            name: prefix.to_string(),
            weight: Tensor::from_data(TensorData::new(w.data, shape), &self.device),
            bias: b.map(|b| Tensor::from_data(TensorData::new(b, [cout]), &self.device)),
            stride: [stride, stride],
            padding,
            groups,
            op,
        })
    }

    /// A batch norm at `prefix` (`weight`, `bias`, `running_mean`, `running_var`;
    /// `num_batches_tracked` is ignored).
    pub fn bn(&mut self, prefix: &str, c: usize, eps: f64) -> Result<BatchNorm> {
        let _ = self.map.remove(&format!("{prefix}.num_batches_tracked"));
        Ok(BatchNorm {
            gamma: self.raw(&format!("{prefix}.weight"), &[c])?.data,
            beta: self.raw(&format!("{prefix}.bias"), &[c])?.data,
            mean: self.raw(&format!("{prefix}.running_mean"), &[c])?.data,
            var: self.raw(&format!("{prefix}.running_var"), &[c])?.data,
            eps,
        })
    }

    /// A bias-free conv at `conv` followed by the batch norm at `bn` and `act`.
    #[allow(clippy::too_many_arguments)]
    pub fn conv_bn(
        &mut self,
        conv: &str,
        bn: &str,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        padding: Padding,
        groups: usize,
        eps: f64,
        act: Act,
    ) -> Result<ConvBn> {
        Ok(ConvBn::new(
            self.conv(conv, cin, cout, k, stride, padding, groups, false)?,
            self.bn(bn, cout, eps)?,
            act,
        ))
    }

    /// A linear layer at `prefix` (PyTorch layout `[out, in]`).
    pub fn linear(&mut self, prefix: &str, cin: usize, cout: usize) -> Result<Linear> {
        let w: Tensor<2> = self.tensor(&format!("{prefix}.weight"), [cout, cin])?;
        let bias = Some(self.tensor(&format!("{prefix}.bias"), [cout])?);
        Ok(Linear {
            weight_t: w.transpose(),
            bias,
        })
    }

    /// Drop every tensor whose key starts with `prefix` (parts a checkpoint carries that the
    /// inference network does not use, such as GoogLeNet's auxiliary classifiers).
    pub fn discard_prefix(&mut self, prefix: &str) {
        let keys: Vec<String> = self
            .map
            .keys()
            .filter(|k| k.starts_with(prefix))
            .map(|k| k.to_string())
            .collect();
        for k in keys {
            self.map.remove(&k);
        }
    }

    /// Fail if the file holds tensors the architecture did not take.
    pub fn finish(self) -> Result<()> {
        let left: BTreeSet<&str> = self
            .map
            .keys()
            .filter(|k| !k.ends_with("num_batches_tracked"))
            .collect();
        if let Some(first) = left.iter().next() {
            return Err(SfrError::UnexpectedKeys {
                model: self.model,
                count: left.len(),
                first: first.to_string(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tf_same_padding_matches_tensorflow() {
        // stride 2, k 3, even input: TF pads 0 before, 1 after.
        assert_eq!(
            Padding::TfSame.pairs(224, 224, [3, 3], [2, 2]),
            [(0, 1), (0, 1)]
        );
        // stride 2, k 5: total 3 → (1, 2).
        assert_eq!(
            Padding::TfSame.pairs(112, 112, [5, 5], [2, 2]),
            [(1, 2), (1, 2)]
        );
        // stride 1, k 3: symmetric.
        assert_eq!(
            Padding::TfSame.pairs(7, 7, [3, 3], [1, 1]),
            [(1, 1), (1, 1)]
        );
        // odd input, stride 2, k 3: total 2 → (1, 1).
        assert_eq!(
            Padding::TfSame.pairs(15, 15, [3, 3], [2, 2]),
            [(1, 1), (1, 1)]
        );
    }
}
