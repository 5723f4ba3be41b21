//! GoogLeNet / Inception-v1 (Szegedy et al. 2015) in torchvision's layout (`conv1.conv`,
//! `inception3a.branch2.1.conv`, …; every conv is followed by batch norm, ε = 1e-3). As with
//! torchvision's pretrained weights, the input is re-normalised (`transform_input`) from the
//! ImageNet mean/std to the (x − 0.5)/0.5 the weights were trained with. The auxiliary
//! classifiers (`aux1.*`, `aux2.*`) are not used at inference and are ignored when present.

use burn::tensor::Tensor;

use super::layers::{Act, Conv, ConvBn, Linear, Loader, Padding, Tap, global_avg_pool, max_pool};
use super::{ArchSpec, Network, ResizeMode, TORCHVISION};
use crate::error::Result;

/// The spec.
pub fn spec() -> ArchSpec {
    ArchSpec {
        name: "googlenet".into(),
        description:
            "GoogLeNet / Inception-v1 with batch norm (torchvision layout, transform_input)".into(),
        input_size: 224,
        resize: 256,
        resize_mode: ResizeMode::ShorterSide,
        preprocess: TORCHVISION,
        weights:
            "torchvision's googlenet-1378be20.pth (not on the package registries: pass the file)"
                .into(),
        fetch: None,
        measured: &[],
    }
}

const BN_EPS: f64 = 1e-3;

fn basic(
    l: &mut Loader,
    p: &str,
    cin: usize,
    cout: usize,
    k: usize,
    s: usize,
    pad: usize,
) -> Result<ConvBn> {
    l.conv_bn(
        &format!("{p}.conv"),
        &format!("{p}.bn"),
        cin,
        cout,
        k,
        s,
        Padding::same_all(pad),
        1,
        BN_EPS,
        Act::Relu,
    )
}

struct Inception {
    b1: ConvBn,
    b2: [ConvBn; 2],
    b3: [ConvBn; 2],
    b4: ConvBn,
}

impl Inception {
    #[allow(clippy::too_many_arguments)]
    fn load(
        l: &mut Loader,
        p: &str,
        cin: usize,
        c1: usize,
        c3r: usize,
        c3: usize,
        c5r: usize,
        c5: usize,
        pool: usize,
    ) -> Result<Self> {
        Ok(Inception {
            b1: basic(l, &format!("{p}.branch1"), cin, c1, 1, 1, 0)?,
            b2: [
                basic(l, &format!("{p}.branch2.0"), cin, c3r, 1, 1, 0)?,
                basic(l, &format!("{p}.branch2.1"), c3r, c3, 3, 1, 1)?,
            ],
            // torchvision uses a 3×3 conv in the "5×5" branch (a known deviation kept for its weights).
            b3: [
                basic(l, &format!("{p}.branch3.0"), cin, c5r, 1, 1, 0)?,
                basic(l, &format!("{p}.branch3.1"), c5r, c5, 3, 1, 1)?,
            ],
            b4: basic(l, &format!("{p}.branch4.1"), cin, pool, 1, 1, 0)?,
        })
    }

    fn forward(&self, x: Tensor<4>, tap: &mut dyn Tap) -> Tensor<4> {
        let y1 = self.b1.forward(x.clone(), tap);
        let y2 = self.b2[1].forward(self.b2[0].forward(x.clone(), tap), tap);
        let y3 = self.b3[1].forward(self.b3[0].forward(x.clone(), tap), tap);
        let y4 = self.b4.forward(max_pool(x, 3, 1, 1, true), tap);
        Tensor::cat(vec![y1, y2, y3, y4], 1)
    }

    fn convs(&self) -> [&Conv; 6] {
        [
            &self.b1.conv,
            &self.b2[0].conv,
            &self.b2[1].conv,
            &self.b3[0].conv,
            &self.b3[1].conv,
            &self.b4.conv,
        ]
    }
}

/// GoogLeNet.
pub struct GoogLeNet {
    stem: [ConvBn; 3],
    inception: Vec<(Inception, Option<(usize, usize)>)>,
    fc: Linear,
}

/// Build from torchvision keys.
pub fn build(_name: &str, l: &mut Loader) -> Result<Box<dyn Network>> {
    let stem = [
        basic(l, "conv1", 3, 64, 7, 2, 3)?,
        basic(l, "conv2", 64, 64, 1, 1, 0)?,
        basic(l, "conv3", 64, 192, 3, 1, 1)?,
    ];
    // (name, in, 1×1, 3×3 reduce, 3×3, "5×5" reduce, "5×5", pool proj, max pool after (k, s)).
    #[allow(clippy::type_complexity)]
    const CFG: [(
        &str,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        Option<(usize, usize)>,
    ); 9] = [
        ("inception3a", 192, 64, 96, 128, 16, 32, 32, None),
        ("inception3b", 256, 128, 128, 192, 32, 96, 64, Some((3, 2))),
        ("inception4a", 480, 192, 96, 208, 16, 48, 64, None),
        ("inception4b", 512, 160, 112, 224, 24, 64, 64, None),
        ("inception4c", 512, 128, 128, 256, 24, 64, 64, None),
        ("inception4d", 512, 112, 144, 288, 32, 64, 64, None),
        (
            "inception4e",
            528,
            256,
            160,
            320,
            32,
            128,
            128,
            Some((2, 2)),
        ),
        ("inception5a", 832, 256, 160, 320, 32, 128, 128, None),
        ("inception5b", 832, 384, 192, 384, 48, 128, 128, None),
    ];
    let mut inception = Vec::new();
    for (p, cin, c1, c3r, c3, c5r, c5, pool, after) in CFG {
        inception.push((
            Inception::load(l, p, cin, c1, c3r, c3, c5r, c5, pool)?,
            after,
        ));
    }
    let fc = l.linear("fc", 1024, 1000)?;
    l.discard_prefix("aux1.");
    l.discard_prefix("aux2.");
    Ok(Box::new(GoogLeNet {
        stem,
        inception,
        fc,
    }))
}

impl Network for GoogLeNet {
    fn forward(&self, x: Tensor<4>, tap: &mut dyn Tap) -> Tensor<2> {
        // transform_input: from ImageNet mean/std normalisation to (x − 0.5)/0.5.
        let m = [0.485f32, 0.456, 0.406];
        let s = [0.229f32, 0.224, 0.225];
        let chans: Vec<Tensor<4>> = (0..3)
            .map(|c| {
                x.clone()
                    .narrow(1, c, 1)
                    .mul_scalar(s[c] / 0.5)
                    .add_scalar((m[c] - 0.5) / 0.5)
            })
            .collect();
        let x = Tensor::cat(chans, 1);
        let x = self.stem[0].forward(x, tap);
        let x = max_pool(x, 3, 2, 0, true);
        let x = self.stem[1].forward(x, tap);
        let x = self.stem[2].forward(x, tap);
        let mut x = max_pool(x, 3, 2, 0, true);
        for (inc, after) in &self.inception {
            x = inc.forward(x, tap);
            if let Some((k, s)) = after {
                x = max_pool(x, *k, *s, 0, true);
            }
        }
        self.fc.forward(global_avg_pool(x))
    }

    fn convs(&self) -> Vec<&Conv> {
        let mut v: Vec<&Conv> = self.stem.iter().map(|c| &c.conv).collect();
        for (inc, _) in &self.inception {
            v.extend(inc.convs());
        }
        v
    }
}
