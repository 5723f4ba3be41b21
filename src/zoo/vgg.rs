//! AlexNet and VGG-16 in torchvision's layout (`features.N`, `classifier.N`).

use burn::tensor::Tensor;

use super::layers::{Act, Conv, Linear, Loader, Padding, Tap, adaptive_avg_flat, max_pool};
use super::{ArchSpec, Network, ResizeMode, TORCHVISION};
use crate::error::Result;

/// AlexNet (torchvision's one-tower variant: 64-192-384-256-256).
pub fn alexnet_spec() -> ArchSpec {
    ArchSpec {
        name: "alexnet".into(),
        description: "AlexNet (torchvision layout, one tower)".into(),
        input_size: 224,
        resize: 256,
        resize_mode: ResizeMode::ShorterSide,
        preprocess: TORCHVISION,
        weights:
            "torchvision's alexnet-owt-7be5be79.pth (not on the package registries: pass the file)"
                .into(),
        fetch: None,
        measured: &[],
    }
}

/// VGG-16 without batch norm.
pub fn vgg16_spec() -> ArchSpec {
    ArchSpec {
        name: "vgg16".into(),
        description: "VGG-16 (torchvision layout, no batch norm)".into(),
        input_size: 224,
        resize: 256,
        resize_mode: ResizeMode::ShorterSide,
        preprocess: TORCHVISION,
        weights: "torchvision's vgg16-397923af.pth (not on the package registries: pass the file)"
            .into(),
        fetch: None,
        measured: &[],
    }
}

enum Layer {
    Conv(Box<Conv>),
    Pool { k: usize, s: usize },
}

/// A plain conv/ReLU/max-pool stack followed by adaptive pooling and three linear layers.
pub struct PlainNet {
    features: Vec<Layer>,
    pool_to: usize,
    fc: Vec<Linear>,
}

impl Network for PlainNet {
    fn forward(&self, mut x: Tensor<4>, tap: &mut dyn Tap) -> Tensor<2> {
        for layer in &self.features {
            x = match layer {
                Layer::Conv(c) => c.forward_act(x, Act::Relu, tap),
                Layer::Pool { k, s } => max_pool(x, *k, *s, 0, false),
            };
        }
        let mut y = adaptive_avg_flat(x, self.pool_to, self.pool_to);
        let last = self.fc.len() - 1;
        for (i, fc) in self.fc.iter().enumerate() {
            y = fc.forward(y);
            if i < last {
                y = burn::tensor::activation::relu(y);
            }
        }
        y
    }

    fn convs(&self) -> Vec<&Conv> {
        self.features
            .iter()
            .filter_map(|l| match l {
                Layer::Conv(c) => Some(c.as_ref()),
                Layer::Pool { .. } => None,
            })
            .collect()
    }
}

/// Build AlexNet from torchvision keys.
pub fn build_alexnet(_name: &str, l: &mut Loader) -> Result<Box<dyn Network>> {
    let p = Padding::same_all;
    let features = vec![
        Layer::Conv(Box::new(l.conv(
            "features.0",
            3,
            64,
            11,
            4,
            p(2),
            1,
            true,
        )?)),
        Layer::Pool { k: 3, s: 2 },
        Layer::Conv(Box::new(l.conv(
            "features.3",
            64,
            192,
            5,
            1,
            p(2),
            1,
            true,
        )?)),
        Layer::Pool { k: 3, s: 2 },
        Layer::Conv(Box::new(l.conv(
            "features.6",
            192,
            384,
            3,
            1,
            p(1),
            1,
            true,
        )?)),
        Layer::Conv(Box::new(l.conv(
            "features.8",
            384,
            256,
            3,
            1,
            p(1),
            1,
            true,
        )?)),
        Layer::Conv(Box::new(l.conv(
            "features.10",
            256,
            256,
            3,
            1,
            p(1),
            1,
            true,
        )?)),
        Layer::Pool { k: 3, s: 2 },
    ];
    let fc = vec![
        l.linear("classifier.1", 256 * 36, 4096)?,
        l.linear("classifier.4", 4096, 4096)?,
        l.linear("classifier.6", 4096, 1000)?,
    ];
    Ok(Box::new(PlainNet {
        features,
        pool_to: 6,
        fc,
    }))
}

/// Build VGG-16 from torchvision keys.
pub fn build_vgg16(_name: &str, l: &mut Loader) -> Result<Box<dyn Network>> {
    // torchvision's configuration "D": channels, 0 = max pool.
    const CFG: [usize; 18] = [
        64, 64, 0, 128, 128, 0, 256, 256, 256, 0, 512, 512, 512, 0, 512, 512, 512, 0,
    ];
    let mut features = Vec::new();
    let mut cin = 3;
    let mut idx = 0;
    for c in CFG {
        if c == 0 {
            features.push(Layer::Pool { k: 2, s: 2 });
            idx += 1;
        } else {
            let name = format!("features.{idx}");
            features.push(Layer::Conv(Box::new(l.conv(
                &name,
                cin,
                c,
                3,
                1,
                Padding::same_all(1),
                1,
                true,
            )?)));
            cin = c;
            idx += 2; // conv, ReLU
        }
    }
    let fc = vec![
        l.linear("classifier.0", 512 * 49, 4096)?,
        l.linear("classifier.3", 4096, 4096)?,
        l.linear("classifier.6", 4096, 1000)?,
    ];
    Ok(Box::new(PlainNet {
        features,
        pool_to: 7,
        fc,
    }))
}
