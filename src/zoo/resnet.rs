//! ResNet-18/50/152 (He et al. 2016; torchvision's v1.5: stride on the 3×3 conv) in torchvision's
//! layout (`conv1`, `bn1`, `layerL.B.convK`, `layerL.B.downsample.{0,1}`, `fc`).

use burn::tensor::Tensor;

use super::layers::{
    Act, Conv, ConvBn, Linear, Loader, Padding, Tap, global_avg_pool, max_pool, relu,
};
use super::{ArchSpec, Network, ResizeMode, TORCHVISION};
use crate::error::{Result, SfrError};

fn spec(name: &'static str, description: &'static str, weights: &'static str) -> ArchSpec {
    ArchSpec {
        name: name.into(),
        description: description.into(),
        input_size: 224,
        resize: 256,
        resize_mode: ResizeMode::ShorterSide,
        preprocess: TORCHVISION,
        weights: weights.into(),
        fetch: None,
        measured: &[],
    }
}

/// ResNet-18.
pub fn resnet18_spec() -> ArchSpec {
    spec(
        "resnet18",
        "ResNet-18 (torchvision layout)",
        "torchvision's resnet18-f37072fd.pth (not on the package registries: pass the file)",
    )
}

/// ResNet-50.
pub fn resnet50_spec() -> ArchSpec {
    spec(
        "resnet50",
        "ResNet-50 v1.5 (torchvision layout)",
        "torchvision's resnet50-0676ba61.pth or -11ad3fa6.pth (not on the package registries: pass the file)",
    )
}

/// ResNet-152.
pub fn resnet152_spec() -> ArchSpec {
    spec(
        "resnet152",
        "ResNet-152 v1.5 (torchvision layout)",
        "torchvision's resnet152-394f9c45.pth (not on the package registries: pass the file)",
    )
}

const BN_EPS: f64 = 1e-5;

struct Block {
    convs: Vec<ConvBn>,
    downsample: Option<ConvBn>,
}

/// A ResNet.
pub struct ResNet {
    stem: ConvBn,
    blocks: Vec<Block>,
    fc: Linear,
}

/// Build `resnet18`, `resnet50` or `resnet152` from torchvision keys.
pub fn build(name: &str, l: &mut Loader) -> Result<Box<dyn Network>> {
    let (bottleneck, layers): (bool, [usize; 4]) = match name {
        "resnet18" => (false, [2, 2, 2, 2]),
        "resnet50" => (true, [3, 4, 6, 3]),
        "resnet152" => (true, [3, 8, 36, 3]),
        other => {
            return Err(SfrError::param(
                "model",
                format!("`{other}` is not a ResNet depth sfr knows"),
            ));
        }
    };
    let expansion = if bottleneck { 4 } else { 1 };
    let p = Padding::same_all;
    let stem = l.conv_bn("conv1", "bn1", 3, 64, 7, 2, p(3), 1, BN_EPS, Act::Relu)?;
    let mut blocks = Vec::new();
    let mut inplanes = 64;
    for (li, (&n, planes)) in layers.iter().zip([64, 128, 256, 512]).enumerate() {
        for b in 0..n {
            let stride = if b == 0 && li > 0 { 2 } else { 1 };
            let pre = format!("layer{}.{b}", li + 1);
            let cb = |l: &mut Loader, k: usize, cin, cout, s, act| {
                l.conv_bn(
                    &format!("{pre}.conv{k}"),
                    &format!("{pre}.bn{k}"),
                    cin,
                    cout,
                    if bottleneck && k != 2 { 1 } else { 3 },
                    s,
                    p(if bottleneck && k != 2 { 0 } else { 1 }),
                    1,
                    BN_EPS,
                    act,
                )
            };
            let convs = if bottleneck {
                vec![
                    cb(l, 1, inplanes, planes, 1, Act::Relu)?,
                    cb(l, 2, planes, planes, stride, Act::Relu)?,
                    cb(l, 3, planes, planes * 4, 1, Act::None)?,
                ]
            } else {
                vec![
                    cb(l, 1, inplanes, planes, stride, Act::Relu)?,
                    cb(l, 2, planes, planes, 1, Act::None)?,
                ]
            };
            let downsample = if stride != 1 || inplanes != planes * expansion {
                Some(l.conv_bn(
                    &format!("{pre}.downsample.0"),
                    &format!("{pre}.downsample.1"),
                    inplanes,
                    planes * expansion,
                    1,
                    stride,
                    p(0),
                    1,
                    BN_EPS,
                    Act::None,
                )?)
            } else {
                None
            };
            blocks.push(Block { convs, downsample });
            inplanes = planes * expansion;
        }
    }
    let fc = l.linear("fc", 512 * expansion, 1000)?;
    Ok(Box::new(ResNet { stem, blocks, fc }))
}

impl Network for ResNet {
    fn forward(&self, x: Tensor<4>, tap: &mut dyn Tap) -> Tensor<2> {
        let x = self.stem.forward(x, tap);
        let mut x = max_pool(x, 3, 2, 1, false);
        for b in &self.blocks {
            let (last, inner) = b.convs.split_last().expect("a block has convs");
            let mut y = x.clone();
            for c in inner {
                y = c.forward(y, tap);
            }
            let ds_tapped = b.downsample.as_ref().is_some_and(|d| d.tapped(tap));
            if last.tapped(tap) || ds_tapped {
                // Sites in forward order: the last conv, then the downsample.
                let y = last.forward(y, tap);
                let identity = match &b.downsample {
                    Some(d) => d.forward(x, tap),
                    None => x,
                };
                x = relu(y + identity);
            } else {
                // Neither site is visited: the sum and ReLU fuse into the last conv.
                let identity = match &b.downsample {
                    Some(d) => d.forward(x.clone(), tap),
                    None => x,
                };
                x = last.forward_add_then(y, identity, Act::Relu, tap);
            }
        }
        self.fc.forward(global_avg_pool(x))
    }

    fn convs(&self) -> Vec<&Conv> {
        let mut v = vec![&self.stem.conv];
        for b in &self.blocks {
            v.extend(b.convs.iter().map(|c| &c.conv));
            if let Some(d) = &b.downsample {
                v.push(&d.conv);
            }
        }
        v
    }
}
