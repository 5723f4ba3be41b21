//! CaffeNet and VGG-F, the paper's two AlexNet-like networks, as their Caffe deploy files define
//! them, loaded from safetensors (or a `.pth`) with the Caffe layer names as keys:
//! `conv1.weight` `[out, in/groups, k, k]`, `conv1.bias`, … `conv5.*`, `fc6.weight` `[4096, 9216]`
//! (PyTorch `Linear` layout `[out, in]`, inputs flattened in C×H×W order), `fc7.*`, `fc8.*`.
//! Input: BGR, 0–255 minus the ImageNet mean, no scaling; 224×224 crops as in the paper.
//!
//! - CaffeNet (`bvlc_reference_caffenet`): conv1 96×11×11/4 → ReLU → max pool 3/2 → LRN →
//!   conv2 256×5×5 pad 2, 2 groups → ReLU → pool → LRN → conv3 384×3×3 → conv4 384 (2 groups) →
//!   conv5 256 (2 groups) → pool → fc6 4096 → fc7 4096 → fc8 1000; LRN size 5, α 1e-4, β 0.75, k 1.
//! - VGG-F (`VGG_CNN_F`, Chatfield et al. 2014): conv1 64×11×11/4 → ReLU → LRN → pool 3/2 →
//!   conv2 256×5×5 pad 2 → ReLU → LRN → pool → conv3/4/5 256×3×3 → pool → fc6 → fc7 → fc8;
//!   LRN size 5, α 5e-4, β 0.75, k 2.
//!
//! Caffe pools round the output size up (PyTorch's `ceil_mode`).

use burn::tensor::Tensor;

use super::layers::{Act, Conv, Linear, Loader, Padding, Tap, flatten, lrn, max_pool};
use super::{ArchSpec, CAFFE, Network, ResizeMode};
use crate::error::{Result, SfrError};

/// CaffeNet.
pub fn caffenet_spec() -> ArchSpec {
    ArchSpec {
        name: "caffenet".into(),
        description: "CaffeNet (bvlc_reference_caffenet), Caffe layer names".into(),
        input_size: 224,
        resize: 256,
        resize_mode: ResizeMode::Squash,
        preprocess: CAFFE,
        weights: "safetensors converted from bvlc_reference_caffenet.caffemodel; keys conv1..conv5, fc6..fc8 (see module docs)".into(),
        fetch: None,
        measured: &[],
    }
}

/// VGG-F.
pub fn vgg_f_spec() -> ArchSpec {
    ArchSpec {
        name: "vgg_f".into(),
        description: "VGG-F (VGG_CNN_F), Caffe layer names".into(),
        input_size: 224,
        resize: 256,
        resize_mode: ResizeMode::ShorterSide,
        preprocess: CAFFE,
        weights: "safetensors converted from VGG_CNN_F.caffemodel; keys conv1..conv5, fc6..fc8 (see module docs)".into(),
        fetch: None,
        measured: &[],
    }
}

/// (out, k, stride, pad, groups) of the five convs.
type ConvCfg = [(usize, usize, usize, usize, usize); 5];

/// Local response normalisation parameters (size, α, β, k).
type LrnParams = (usize, f64, f64, f64);

/// An AlexNet-like Caffe network.
pub struct CaffeNet {
    convs: Vec<Conv>,
    fc: [Linear; 3],
    lrn: LrnParams,
    /// LRN before the pool (VGG-F) instead of after (CaffeNet).
    lrn_first: bool,
}

/// Build `caffenet` or `vgg_f`.
pub fn build(name: &str, l: &mut Loader) -> Result<Box<dyn Network>> {
    let p = Padding::same_all;
    // (out, k, stride, pad, groups) per conv.
    let (cfg, lrn, lrn_first): (ConvCfg, LrnParams, bool) = match name {
        "caffenet" => (
            [
                (96, 11, 4, 0, 1),
                (256, 5, 1, 2, 2),
                (384, 3, 1, 1, 1),
                (384, 3, 1, 1, 2),
                (256, 3, 1, 1, 2),
            ],
            (5, 1e-4, 0.75, 1.0),
            false,
        ),
        "vgg_f" => (
            [
                (64, 11, 4, 0, 1),
                (256, 5, 1, 2, 1),
                (256, 3, 1, 1, 1),
                (256, 3, 1, 1, 1),
                (256, 3, 1, 1, 1),
            ],
            (5, 5e-4, 0.75, 2.0),
            true,
        ),
        other => {
            return Err(SfrError::param(
                "model",
                format!("`{other}` is not a Caffe network sfr knows"),
            ));
        }
    };
    let mut convs = Vec::new();
    let mut cin = 3;
    for (i, (cout, k, s, pad, g)) in cfg.into_iter().enumerate() {
        convs.push(l.conv(&format!("conv{}", i + 1), cin, cout, k, s, p(pad), g, true)?);
        cin = cout;
    }
    let fc = [
        l.linear("fc6", 256 * 36, 4096)?,
        l.linear("fc7", 4096, 4096)?,
        l.linear("fc8", 4096, 1000)?,
    ];
    Ok(Box::new(CaffeNet {
        convs,
        fc,
        lrn,
        lrn_first,
    }))
}

impl Network for CaffeNet {
    fn forward(&self, mut x: Tensor<4>, tap: &mut dyn Tap) -> Tensor<2> {
        let (size, alpha, beta, k) = self.lrn;
        for (i, c) in self.convs.iter().enumerate() {
            x = c.forward_act(x, Act::Relu, tap);
            if i < 2 {
                if self.lrn_first {
                    x = max_pool(lrn(x, size, alpha, beta, k), 3, 2, 0, true);
                } else {
                    x = lrn(max_pool(x, 3, 2, 0, true), size, alpha, beta, k);
                }
            } else if i == 4 {
                x = max_pool(x, 3, 2, 0, true);
            }
        }
        let mut y = flatten(x);
        for (i, fc) in self.fc.iter().enumerate() {
            y = fc.forward(y);
            if i < 2 {
                y = burn::tensor::activation::relu(y);
            }
        }
        y
    }

    fn convs(&self) -> Vec<&Conv> {
        self.convs.iter().collect()
    }
}
