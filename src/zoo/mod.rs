//! The model zoo: pretrained ImageNet classifiers with their weights specs.
//!
//! Every architecture is one file that builds the network from a weight file (checking every key
//! and shape) and runs it with a [`Tap`] that sees each conv output as a named site. Each
//! architecture carries its [`ArchSpec`]: input size, resizing, preprocessing, where its weights
//! come from and the accuracy measured for it, so that the model and the facts needed to use it
//! correctly live together.

pub mod caffe;
pub mod efficientnet_lite;
pub mod googlenet;
pub mod layers;
pub mod mobilenet_v2;
pub mod onnx;
pub mod resnet;
pub mod vgg;

use std::borrow::Cow;
use std::path::Path;

use std::sync::Arc;

use burn::tensor::{Device, Tensor};
use serde::Serialize;

pub use layers::{Conv, NoTap, Record, Tap};

use crate::engine::{Act, Affine};
use crate::error::{Result, SfrError};
use crate::weights::{self, TensorMap};

/// How images are resized before the centre crop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ResizeMode {
    /// The shorter side becomes `resize`, keeping the aspect ratio (torchvision's `Resize(n)`).
    ShorterSide,
    /// Both sides become `resize` (Caffe's squash to 256×256).
    Squash,
}

/// Channel order the network expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelOrder {
    /// Red, green, blue.
    Rgb,
    /// Blue, green, red (Caffe).
    Bgr,
}

/// Pixel preprocessing: `(x − mean) / std` per channel on the 0–255 scale, then the channel order.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Preprocess {
    /// Channel order fed to the network.
    pub order: ChannelOrder,
    /// Per-channel mean on the 0–255 scale, in R, G, B order.
    pub mean_rgb: [f32; 3],
    /// Per-channel standard deviation on the 0–255 scale, in R, G, B order.
    pub std_rgb: [f32; 3],
}

/// torchvision's ImageNet normalisation.
pub const TORCHVISION: Preprocess = Preprocess {
    order: ChannelOrder::Rgb,
    mean_rgb: [0.485 * 255.0, 0.456 * 255.0, 0.406 * 255.0],
    std_rgb: [0.229 * 255.0, 0.224 * 255.0, 0.225 * 255.0],
};

/// The TF EfficientNet-Lite normalisation `(x − 127) / 128`.
pub const TF_LITE: Preprocess = Preprocess {
    order: ChannelOrder::Rgb,
    mean_rgb: [127.0, 127.0, 127.0],
    std_rgb: [128.0, 128.0, 128.0],
};

/// Caffe's BGR mean subtraction without scaling (CaffeNet, VGG-F, VGG-16 of the paper).
pub const CAFFE: Preprocess = Preprocess {
    order: ChannelOrder::Bgr,
    mean_rgb: [123.68, 116.779, 103.939],
    std_rgb: [1.0, 1.0, 1.0],
};

/// A measured accuracy of a model with its registry weights.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Measured {
    /// Data set folder name.
    pub data: &'static str,
    /// Number of images.
    pub n: usize,
    /// Top-1 accuracy.
    pub top1: f64,
    /// Top-5 accuracy.
    pub top5: f64,
}

/// The facts needed to use an architecture correctly.
#[derive(Debug, Clone, Serialize)]
pub struct ArchSpec {
    /// Name used on the command line (an ONNX model: its file name).
    pub name: Cow<'static, str>,
    /// One-line description.
    pub description: Cow<'static, str>,
    /// Centre-crop size fed to the network (square).
    pub input_size: usize,
    /// Resize target before the crop.
    pub resize: usize,
    /// How the resize treats the aspect ratio.
    pub resize_mode: ResizeMode,
    /// Normalisation and channel order.
    pub preprocess: Preprocess,
    /// Where pretrained weights come from and their key layout.
    pub weights: Cow<'static, str>,
    /// Asset name for `sfr fetch`, where a package registry ships the weights.
    pub fetch: Option<&'static str>,
    /// Accuracy measured with sfr itself (see README for how).
    pub measured: &'static [Measured],
}

/// A site: one conv output a tap can act on.
#[derive(Debug, Clone, Serialize)]
pub struct SiteInfo {
    /// Name (the conv's weight-key prefix).
    pub name: String,
    /// Position in forward order.
    pub index: usize,
    /// Input channels.
    pub in_channels: usize,
    /// Output channels (what a tap sees).
    pub out_channels: usize,
    /// Kernel size.
    pub kernel: [usize; 2],
    /// Stride.
    pub stride: [usize; 2],
    /// Groups.
    pub groups: usize,
}

impl SiteInfo {
    /// The shape of the conv's weight: `[out, in / groups, kh, kw]`.
    pub fn weight_shape(&self) -> [usize; 4] {
        [
            self.out_channels,
            self.in_channels / self.groups,
            self.kernel[0],
            self.kernel[1],
        ]
    }
}

/// A network body: normalised NCHW input in, logits out, with taps at every conv output.
pub trait Network: Send + Sync {
    /// Logits `[batch, 1000]` for normalised input `[batch, 3, h, w]`.
    fn forward(&self, x: Tensor<4>, tap: &mut dyn Tap) -> Tensor<2>;
    /// Every conv in forward order.
    fn convs(&self) -> Vec<&Conv>;
}

/// A pretrained classifier: its spec, its network, and its preprocessing as tensors.
pub struct Model {
    spec: ArchSpec,
    net: Box<dyn Network>,
    /// `(x − mean) / std` per channel as one engine operation.
    normalizer: Arc<Affine>,
    device: Device,
}

impl Model {
    /// The architecture's spec.
    pub fn spec(&self) -> &ArchSpec {
        &self.spec
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Normalise RGB pixels on the 0–255 scale `[batch, 3, h, w]` as the network expects.
    pub fn normalize(&self, pixels: Tensor<4>) -> Tensor<4> {
        let x = self.normalizer.forward(pixels, None);
        match self.spec.preprocess.order {
            ChannelOrder::Rgb => x,
            ChannelOrder::Bgr => x.flip([1]),
        }
    }

    /// Logits for RGB pixels on the 0–255 scale (perturbations are added in this space).
    pub fn forward_pixels(&self, pixels: Tensor<4>, tap: &mut dyn Tap) -> Tensor<2> {
        self.forward_normalized(self.normalize(pixels), tap)
    }

    /// Logits for already-normalised input (as PyTorch reference scripts feed it); the tap
    /// sees the input first ([`Tap::input`]).
    pub fn forward_normalized(&self, x: Tensor<4>, tap: &mut dyn Tap) -> Tensor<2> {
        let x = tap.input(x);
        self.net.forward(x, tap)
    }

    /// Every site, in forward order.
    pub fn sites(&self) -> Vec<SiteInfo> {
        self.net
            .convs()
            .into_iter()
            .enumerate()
            .map(|(index, c)| SiteInfo {
                name: c.name.clone(),
                index,
                in_channels: c.in_channels(),
                out_channels: c.out_channels(),
                kernel: c.kernel(),
                stride: c.stride,
                groups: c.groups,
            })
            .collect()
    }

    /// `names` in forward order (as the taps see them); a name that is not a site is an error
    /// that names it.
    pub fn order_sites(&self, names: &[String]) -> Result<Vec<String>> {
        let ordered: Vec<String> = self
            .sites()
            .into_iter()
            .map(|s| s.name)
            .filter(|n| names.contains(n))
            .collect();
        if let Some(bad) = names.iter().find(|s| !ordered.contains(s)) {
            return Err(SfrError::param(
                "--sites",
                format!(
                    "`{bad}` is not a site of {} (`sfr rank` lists them)",
                    self.spec.name
                ),
            ));
        }
        Ok(ordered)
    }

    /// The conv at site `name`.
    pub fn conv(&self, name: &str) -> Option<&Conv> {
        self.net.convs().into_iter().find(|c| c.name == name)
    }
}

type Builder = fn(&str, &mut layers::Loader) -> Result<Box<dyn Network>>;

struct Entry {
    spec: fn() -> ArchSpec,
    build: Builder,
}

fn registry() -> Vec<Entry> {
    let mut v = vec![Entry {
        spec: mobilenet_v2::spec,
        build: mobilenet_v2::build,
    }];
    v.extend(efficientnet_lite::SPECS.iter().map(|&spec| Entry {
        spec,
        build: efficientnet_lite::build,
    }));
    v.push(Entry {
        spec: vgg::alexnet_spec,
        build: vgg::build_alexnet,
    });
    v.push(Entry {
        spec: vgg::vgg16_spec,
        build: vgg::build_vgg16,
    });
    v.push(Entry {
        spec: googlenet::spec,
        build: googlenet::build,
    });
    for s in [
        resnet::resnet18_spec,
        resnet::resnet50_spec,
        resnet::resnet152_spec,
    ] {
        v.push(Entry {
            spec: s,
            build: resnet::build,
        });
    }
    v.push(Entry {
        spec: caffe::caffenet_spec,
        build: caffe::build,
    });
    v.push(Entry {
        spec: caffe::vgg_f_spec,
        build: caffe::build,
    });
    v
}

/// The specs of every architecture in the zoo.
pub fn specs() -> Vec<ArchSpec> {
    registry().iter().map(|e| (e.spec)()).collect()
}

/// The spec of architecture `name`.
pub fn spec(name: &str) -> Result<ArchSpec> {
    registry()
        .iter()
        .map(|e| (e.spec)())
        .find(|s| s.name == name)
        .ok_or_else(|| unknown(name))
}

fn unknown(name: &str) -> SfrError {
    SfrError::UnknownModel {
        name: name.to_string(),
        known: specs()
            .iter()
            .map(|s| s.name.to_string())
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// Build architecture `name` from the tensors of a weight file.
pub fn build(name: &str, tensors: TensorMap, device: &Device) -> Result<Model> {
    let reg = registry();
    let entry = reg
        .iter()
        .find(|e| (e.spec)().name == name)
        .ok_or_else(|| unknown(name))?;
    let spec = (entry.spec)();
    let mut loader = layers::Loader::new(name, tensors, device);
    let net = (entry.build)(name, &mut loader)?;
    loader.finish()?;
    Ok(Model::new(spec, net, device))
}

impl Model {
    /// A model from its facts and its network (a zoo architecture or an ONNX graph).
    pub fn new(spec: ArchSpec, net: Box<dyn Network>, device: &Device) -> Model {
        let p = spec.preprocess;
        let scale: Vec<f32> = p.std_rgb.iter().map(|s| 1.0 / s).collect();
        let shift: Vec<f32> = p.mean_rgb.iter().zip(&scale).map(|(m, s)| -m * s).collect();
        let normalizer = Arc::new(Affine {
            scale: Arc::new(scale),
            shift: Arc::new(shift),
            act: Act::None,
        });
        Model {
            spec,
            net,
            normalizer,
            device: device.clone(),
        }
    }
}

/// Load an ONNX classifier (see [`onnx`]): the model, and what was found in the graph.
pub fn load_onnx(
    path: &Path,
    pre: &onnx::OnnxPreprocess,
    device: &Device,
) -> Result<(Model, onnx::GraphInfo)> {
    let (spec, net, info) = onnx::load(path, pre, device)?;
    Ok((Model::new(spec, net, device), info))
}

/// Load architecture `name` from a weight file (`.pth` or safetensors).
pub fn load(name: &str, path: &Path, device: &Device) -> Result<Model> {
    // Check the name before reading a possibly large file.
    spec(name)?;
    let tensors = weights::load(path)?;
    build(name, tensors, device)
}
