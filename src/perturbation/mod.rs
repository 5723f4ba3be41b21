//! The `Perturbation` artefact: one image-sized noise pattern (RGB, C×H×W, float32, pixel units
//! on the 0–255 scale) with metadata that says what made it, and importers for the layouts the
//! papers published theirs in.
//!
//! Every model applies a perturbation the same way: added to the RGB pixels on the 0–255 scale
//! *before* the model's own normalisation, then clipped to [0, 255] (the physically meaningful
//! choice; the paper's release does not clip, which [`apply`] offers as an option).

pub mod import;

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::error::{Result, SfrError};
use crate::weights::{self, RawTensor, TensorMap};

/// The norm that bounds a perturbation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Norm {
    /// ‖v‖∞ ≤ ξ.
    Linf,
    /// ‖v‖₂ ≤ ξ.
    L2,
}

impl std::fmt::Display for Norm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Norm::Linf => "linf",
            Norm::L2 => "l2",
        })
    }
}

/// What made a perturbation, and what was measured of it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PerturbationMeta {
    /// The norm bounding it.
    pub norm: Norm,
    /// The budget ξ (pixel units, 0–255 scale).
    pub eps: f64,
    /// The attack (`sgd`, `deepfool`, `fff`, `gduap`, `random`, or `import`).
    pub attack: String,
    /// The attack's parameters.
    pub params: serde_json::Value,
    /// The model it was computed on (None for imports of unknown origin).
    pub model: Option<String>,
    /// Data folders used.
    pub data: Vec<String>,
    /// Number of images used to compute it.
    pub n_images: usize,
    /// Random seed.
    pub seed: Option<u64>,
    /// Fooling rate measured while computing it (label change vs clean prediction).
    pub fooling_rate: Option<f64>,
    /// On how many held-out images that fooling rate was measured.
    pub fooling_rate_n: Option<usize>,
    /// Whether perturbed pixels were clipped to [0, 255] when it was computed and measured.
    pub clip: bool,
    /// For imports: the original file and how it was converted.
    pub source: Option<String>,
    /// sfr version.
    pub sfr_version: String,
}

impl PerturbationMeta {
    /// Metadata for a perturbation sfr computes.
    pub fn new(attack: &str, norm: Norm, eps: f64) -> Self {
        PerturbationMeta {
            norm,
            eps,
            attack: attack.to_string(),
            params: serde_json::Value::Null,
            model: None,
            data: Vec::new(),
            n_images: 0,
            seed: None,
            fooling_rate: None,
            fooling_rate_n: None,
            clip: true,
            source: None,
            sfr_version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}

/// A universal perturbation.
#[derive(Debug, Clone)]
pub struct Perturbation {
    /// Height in pixels.
    pub height: usize,
    /// Width in pixels.
    pub width: usize,
    /// RGB, C×H×W, pixel units on the 0–255 scale.
    pub data: Vec<f32>,
    /// Metadata.
    pub meta: PerturbationMeta,
}

const TENSOR_KEY: &str = "perturbation";
const META_KEY: &str = "sfr_perturbation";

impl Perturbation {
    /// A perturbation from C×H×W RGB data; fails on a wrong length or non-finite values.
    pub fn new(
        height: usize,
        width: usize,
        data: Vec<f32>,
        meta: PerturbationMeta,
    ) -> Result<Self> {
        if height == 0 || width == 0 || data.len() != 3 * height * width {
            return Err(SfrError::param(
                "perturbation",
                format!(
                    "expected 3×{height}×{width} = {} values, found {}",
                    3 * height * width,
                    data.len()
                ),
            ));
        }
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            return Err(SfrError::param(
                "perturbation",
                format!(
                    "value {i} is {} (NaN or infinite values are not a perturbation)",
                    data[i]
                ),
            ));
        }
        Ok(Perturbation {
            height,
            width,
            data,
            meta,
        })
    }

    /// ‖v‖∞.
    pub fn linf(&self) -> f64 {
        self.data.iter().fold(0f64, |m, v| m.max(v.abs() as f64))
    }

    /// ‖v‖₂.
    pub fn l2(&self) -> f64 {
        self.data
            .iter()
            .map(|v| (*v as f64) * (*v as f64))
            .sum::<f64>()
            .sqrt()
    }

    /// The norm the metadata names.
    pub fn norm_value(&self) -> f64 {
        match self.meta.norm {
            Norm::Linf => self.linf(),
            Norm::L2 => self.l2(),
        }
    }

    /// Fail when the perturbation exceeds its stated budget (by more than float rounding).
    pub fn check_budget(&self) -> Result<()> {
        let n = self.norm_value();
        if n > self.meta.eps * (1.0 + 1e-4) + 1e-4 {
            return Err(SfrError::param(
                "perturbation",
                format!(
                    "its {} norm is {n:.4}, over its stated budget ξ = {}",
                    self.meta.norm, self.meta.eps
                ),
            ));
        }
        Ok(())
    }

    /// Check the size against a model's input.
    pub fn check_size(&self, size: usize, what: &str) -> Result<()> {
        if self.height != size || self.width != size {
            return Err(SfrError::param(
                "perturbation",
                format!(
                    "{what} is {}×{}, the model expects {size}×{size}; import it with --fit crop or --fit resize",
                    self.height, self.width
                ),
            ));
        }
        Ok(())
    }

    /// `[1, 3, h, w]` tensor on `device`.
    pub fn to_tensor(&self, device: &Device) -> Tensor<4> {
        Tensor::from_data(
            TensorData::new(self.data.clone(), [1, 3, self.height, self.width]),
            device,
        )
    }

    /// Save as safetensors (tensor `perturbation`, metadata `sfr_perturbation` as JSON), atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut map = TensorMap::new();
        map.insert(
            TENSOR_KEY,
            RawTensor {
                shape: vec![3, self.height, self.width],
                data: self.data.clone(),
            },
        );
        let mut meta = BTreeMap::new();
        let json = serde_json::to_string(&self.meta)
            .map_err(|e| SfrError::param("perturbation metadata", e.to_string()))?;
        meta.insert(META_KEY.to_string(), json);
        meta.insert("format".to_string(), "sfr-perturbation-v1".to_string());
        weights::save_safetensors(&map, &meta, path)?;
        Ok(())
    }

    /// Load a perturbation: sfr's safetensors, or one of the published layouts (see
    /// [`import_file`], with the layout inferred from the file).
    pub fn load(path: &Path) -> Result<Self> {
        let is_st = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
        if !is_st {
            return import_file(path, &ImportOptions::default());
        }
        let map = weights::load(path)?;
        let meta = weights::read_safetensors_metadata(path)?;
        let t = map.get(TENSOR_KEY).ok_or_else(|| {
            SfrError::param(
                "perturbation",
                format!(
                    "{} holds no tensor `{TENSOR_KEY}`: not an sfr perturbation",
                    path.display()
                ),
            )
        })?;
        if t.shape.len() != 3 || t.shape[0] != 3 {
            return Err(SfrError::param(
                "perturbation",
                format!(
                    "{}: tensor `{TENSOR_KEY}` has shape {:?}, expected [3, H, W]",
                    path.display(),
                    t.shape
                ),
            ));
        }
        let m: PerturbationMeta = match meta.get(META_KEY) {
            Some(j) => serde_json::from_str(j).map_err(|e| {
                SfrError::param(
                    "perturbation",
                    format!("{}: unreadable metadata: {e}", path.display()),
                )
            })?,
            None => {
                return Err(SfrError::param(
                    "perturbation",
                    format!(
                        "{} has no `{META_KEY}` metadata: not an sfr perturbation",
                        path.display()
                    ),
                ));
            }
        };
        let p = Perturbation::new(t.shape[1], t.shape[2], t.data.clone(), m)
            .map_err(|e| SfrError::param("perturbation", format!("{}: {e}", path.display())))?;
        p.check_budget()
            .map_err(|e| SfrError::param("perturbation", format!("{}: {e}", path.display())))?;
        Ok(p)
    }

    /// Centre-crop or bilinearly resize to `size`×`size`.
    pub fn fit(&self, size: usize, how: Fit) -> Result<Self> {
        if self.height == size && self.width == size {
            return Ok(self.clone());
        }
        let mut out = vec![0f32; 3 * size * size];
        match how {
            Fit::Crop => {
                if self.height < size || self.width < size {
                    return Err(SfrError::param(
                        "--fit crop",
                        format!(
                            "cannot crop a {}×{} perturbation to {size}×{size}",
                            self.height, self.width
                        ),
                    ));
                }
                let top = (self.height - size) / 2;
                let left = (self.width - size) / 2;
                for c in 0..3 {
                    for y in 0..size {
                        let src = c * self.height * self.width + (top + y) * self.width + left;
                        out[c * size * size + y * size..c * size * size + (y + 1) * size]
                            .copy_from_slice(&self.data[src..src + size]);
                    }
                }
            }
            Fit::Resize => {
                // Bilinear, align_corners = false; keeps values inside the original range.
                let (h, w) = (self.height, self.width);
                for c in 0..3 {
                    for y in 0..size {
                        let sy = ((y as f64 + 0.5) * h as f64 / size as f64 - 0.5)
                            .clamp(0.0, (h - 1) as f64);
                        let y0 = sy.floor() as usize;
                        let y1 = (y0 + 1).min(h - 1);
                        let fy = (sy - y0 as f64) as f32;
                        for x in 0..size {
                            let sx = ((x as f64 + 0.5) * w as f64 / size as f64 - 0.5)
                                .clamp(0.0, (w - 1) as f64);
                            let x0 = sx.floor() as usize;
                            let x1 = (x0 + 1).min(w - 1);
                            let fx = (sx - x0 as f64) as f32;
                            let at = |yy: usize, xx: usize| self.data[c * h * w + yy * w + xx];
                            let top = at(y0, x0) * (1.0 - fx) + at(y0, x1) * fx;
                            let bot = at(y1, x0) * (1.0 - fx) + at(y1, x1) * fx;
                            out[c * size * size + y * size + x] = top * (1.0 - fy) + bot * fy;
                        }
                    }
                }
            }
        }
        let mut meta = self.meta.clone();
        let note = format!(
            "{:?} from {}×{} to {size}×{size}",
            how, self.height, self.width
        )
        .to_lowercase();
        meta.source = Some(match meta.source {
            Some(s) => format!("{s}; {note}"),
            None => note,
        });
        if meta.norm == Norm::L2 {
            // An ℓ2 budget does not survive resizing unchanged: restate it as measured.
            let p = Perturbation::new(size, size, out, meta)?;
            let n = p.l2();
            let mut p = p;
            p.meta.eps = p.meta.eps.max(n);
            return Ok(p);
        }
        Perturbation::new(size, size, out, meta)
    }
}

/// How to make a perturbation fit a model's input size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Fit {
    /// Centre crop (e.g. 227 → 224).
    Crop,
    /// Bilinear resize.
    Resize,
}

/// A published file layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
pub enum Layout {
    /// H×W×C (or 1×H×W×C) RGB: `.npy` files of NAG, GUAP, FFF; LTS4's `.mat` (MATLAB's
    /// rows × columns × channels).
    Hwc,
    /// The SFR release's `.h5`: C×W×H, BGR (transpose to C×H×W, reverse the channels).
    SfrH5,
    /// C×H×W RGB (or 1×C×H×W).
    Chw,
}

/// How to read a published perturbation.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// The layout; inferred from the file when None.
    pub layout: Option<Layout>,
    /// Multiply the values by this (GAP ×16, GUAP ×1.5 as the paper applied them); inferred from
    /// the path when None.
    pub scale: Option<f64>,
    /// The norm to state; inferred (ℓ2 for files under an `L_2` folder, else ℓ∞).
    pub norm: Option<Norm>,
}

/// What sfr infers about a published file from its path: (layout, scale, norm).
pub fn infer_import(path: &Path) -> (Layout, f64, Norm) {
    let s = path.to_string_lossy().to_lowercase();
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_lowercase();
    let layout = if ext == "h5" || ext == "hdf5" {
        // Every .h5 of the SFR release (UAP, sPGD, SFool, GAP) is C×W×H BGR.
        Layout::SfrH5
    } else {
        Layout::Hwc
    };
    let scale = if s.contains("/gap/") || s.contains("_gap_") {
        16.0
    } else if s.contains("/guap/") {
        1.5
    } else {
        1.0
    };
    let norm = if s.contains("/l_2/") || s.contains("_l2_") {
        Norm::L2
    } else {
        Norm::Linf
    };
    (layout, scale, norm)
}

/// Import a published perturbation (`.npy`, `.mat`, `.h5`) into sfr's convention.
pub fn import_file(path: &Path, opts: &ImportOptions) -> Result<Perturbation> {
    let raw = import::read_any(path).map_err(|e| SfrError::param("perturbation", e.to_string()))?;
    let (g_layout, g_scale, g_norm) = infer_import(path);
    let layout = opts.layout.unwrap_or(g_layout);
    let scale = opts.scale.unwrap_or(g_scale);
    let norm = opts.norm.unwrap_or(g_norm);
    let mut shape = raw.shape.clone();
    while shape.len() > 3 && shape[0] == 1 {
        shape.remove(0);
    }
    let bad = |want: &str| {
        SfrError::param(
            "perturbation",
            format!(
                "{}: array of shape {:?} does not fit the {want} layout",
                path.display(),
                raw.shape
            ),
        )
    };
    if shape.len() != 3 {
        return Err(bad(&format!("{layout:?}")));
    }
    let (h, w, data) = match layout {
        Layout::Hwc => {
            let (h, w, c) = (shape[0], shape[1], shape[2]);
            if c != 3 {
                return Err(bad("H×W×3"));
            }
            let mut out = vec![0f32; 3 * h * w];
            for y in 0..h {
                for x in 0..w {
                    for ch in 0..3 {
                        out[ch * h * w + y * w + x] = raw.data[(y * w + x) * 3 + ch];
                    }
                }
            }
            (h, w, out)
        }
        Layout::Chw => {
            if shape[0] != 3 {
                return Err(bad("3×H×W"));
            }
            (shape[1], shape[2], raw.data.clone())
        }
        Layout::SfrH5 => {
            // stored [c][x][y] with c in B, G, R order.
            let (c, wd, ht) = (shape[0], shape[1], shape[2]);
            if c != 3 {
                return Err(bad("3×W×H"));
            }
            let mut out = vec![0f32; 3 * ht * wd];
            for ch in 0..3 {
                let src_c = 2 - ch;
                for x in 0..wd {
                    for y in 0..ht {
                        out[ch * ht * wd + y * wd + x] = raw.data[src_c * wd * ht + x * ht + y];
                    }
                }
            }
            (ht, wd, out)
        }
    };
    let data: Vec<f32> = data.into_iter().map(|v| v * scale as f32).collect();
    let mut meta = PerturbationMeta::new("import", norm, 0.0);
    meta.source = Some(format!(
        "{} (layout {layout:?}, scale {scale})",
        path.display()
    ));
    let mut p = Perturbation::new(h, w, data, meta)
        .map_err(|e| SfrError::param("perturbation", format!("{}: {e}", path.display())))?;
    // The stated budget of an import is what it measures.
    p.meta.eps = p.norm_value();
    Ok(p)
}

/// Add a perturbation to pixels `[n, 3, h, w]` (0–255) and clip to [0, 255] when `clip`.
pub fn apply(pixels: Tensor<4>, v: Tensor<4>, clip: bool) -> Tensor<4> {
    crate::engine::perturb(pixels, v, clip)
}

/// Project `delta` onto the ℓ∞ or ℓ2 ball of radius `eps`.
pub fn project(delta: Tensor<4>, norm: Norm, eps: f64) -> Tensor<4> {
    match norm {
        Norm::Linf => delta.clamp(-eps, eps),
        Norm::L2 => {
            let n: f64 = delta.clone().powf_scalar(2.0).sum().into_scalar::<f32>() as f64;
            let n = n.sqrt();
            if n > eps {
                delta.mul_scalar(eps / n)
            } else {
                delta
            }
        }
    }
}

/// Check an attack budget: ξ > 0 and within what a perturbation on 0–255 pixels can mean.
pub fn check_eps(norm: Norm, eps: f64) -> Result<()> {
    if !(eps.is_finite() && eps > 0.0) {
        return Err(SfrError::param(
            "--eps",
            format!("must be a positive number, got {eps}"),
        ));
    }
    if norm == Norm::Linf && eps > 255.0 {
        return Err(SfrError::param(
            "--eps",
            format!("an ℓ∞ budget above 255 is meaningless on 0–255 pixels, got {eps}"),
        ));
    }
    Ok(())
}

/// Write the pattern as a PNG, contrast-stretched per image to the full 0–255 range (as UAPs are
/// usually shown).
pub fn write_png(p: &Perturbation, path: &Path) -> Result<()> {
    let (lo, hi) = p
        .data
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    let span = if hi > lo { hi - lo } else { 1.0 };
    let (h, w) = (p.height, p.width);
    let mut rgb = vec![0u8; h * w * 3];
    for y in 0..h {
        for x in 0..w {
            for c in 0..3 {
                let v = (p.data[c * h * w + y * w + x] - lo) / span * 255.0;
                rgb[(y * w + x) * 3 + c] = v.round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    Ok(crate::atomic::write_atomic(path, &encode_png(rgb, w, h)?)?)
}

/// PNG bytes of an interleaved RGB (H×W×3) 8-bit image.
pub fn encode_png(rgb: Vec<u8>, w: usize, h: usize) -> Result<Vec<u8>> {
    let img = image::RgbImage::from_raw(w as u32, h as u32, rgb)
        .ok_or_else(|| SfrError::param("png", "image buffer size mismatch"))?;
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .map_err(|e| SfrError::param("png", e.to_string()))?;
    Ok(bytes)
}
