//! Image-domain baseline defences (the comparisons of the paper's Table 6 and of feature
//! squeezing): each transforms the input image, clean or attacked, before the network sees it.
//! They act on RGB pixels on the 0–255 scale, image by image, in parallel.

use std::fmt;

use burn::tensor::{Tensor, TensorData};
use rayon::prelude::*;
use serde::Serialize;

use crate::error::{Result, SfrError};

/// One image-domain defence.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ImageDefense {
    /// JPEG compression at `quality` (1–100), decoded again.
    Jpeg {
        /// Encoder quality.
        quality: u8,
    },
    /// Median filter over a `size`×`size` window per channel (edges replicated).
    Median {
        /// Window side (odd).
        size: usize,
    },
    /// Bit-depth reduction to `bits` bits per channel (feature squeezing).
    BitDepth {
        /// Bits kept (1–8).
        bits: u32,
    },
}

impl fmt::Display for ImageDefense {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageDefense::Jpeg { quality } => write!(f, "jpeg{quality}"),
            ImageDefense::Median { size } => write!(f, "median{size}"),
            ImageDefense::BitDepth { bits } => write!(f, "bits{bits}"),
        }
    }
}

impl std::str::FromStr for ImageDefense {
    type Err = SfrError;

    /// The names [`fmt::Display`] writes: `jpeg75`, `median3`, `bits4`.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            SfrError::param(
                "image defence",
                format!(
                    "`{s}` is not one: write jpegQ (quality 1–100), medianK (odd K) or bitsB (1–8)"
                ),
            )
        };
        let num = |rest: &str| rest.parse::<u32>().map_err(|_| bad());
        let d = if let Some(r) = s.strip_prefix("jpeg") {
            ImageDefense::Jpeg {
                quality: u8::try_from(num(r)?).map_err(|_| bad())?,
            }
        } else if let Some(r) = s.strip_prefix("median") {
            ImageDefense::Median {
                size: num(r)? as usize,
            }
        } else if let Some(r) = s.strip_prefix("bits") {
            ImageDefense::BitDepth { bits: num(r)? }
        } else {
            return Err(bad());
        };
        d.validate()?;
        Ok(d)
    }
}

impl ImageDefense {
    /// The three baselines of the suite: JPEG 75, median 3×3, 4-bit depth.
    pub fn suite() -> Vec<ImageDefense> {
        vec![
            ImageDefense::Jpeg { quality: 75 },
            ImageDefense::Median { size: 3 },
            ImageDefense::BitDepth { bits: 4 },
        ]
    }

    /// A sentence for reports.
    pub fn describe(&self) -> String {
        match self {
            ImageDefense::Jpeg { quality } => format!("JPEG compression, quality {quality}"),
            ImageDefense::Median { size } => format!("median filter {size}×{size}"),
            ImageDefense::BitDepth { bits } => format!("bit-depth reduction to {bits} bits"),
        }
    }

    /// Fail with a sentence on an impossible parameter.
    pub fn validate(&self) -> Result<()> {
        match *self {
            ImageDefense::Jpeg { quality } if !(1..=100).contains(&quality) => Err(
                SfrError::param("jpeg quality", format!("must be 1–100, got {quality}")),
            ),
            ImageDefense::Median { size } if size == 0 || size % 2 == 0 => Err(SfrError::param(
                "median size",
                format!("must be odd and positive, got {size}"),
            )),
            ImageDefense::BitDepth { bits } if !(1..=8).contains(&bits) => Err(SfrError::param(
                "bit depth",
                format!("must be 1–8, got {bits}"),
            )),
            _ => Ok(()),
        }
    }

    /// Apply to a batch `[n, 3, h, w]` of pixels on the 0–255 scale.
    pub fn apply(&self, pixels: Tensor<4>) -> Result<Tensor<4>> {
        self.validate()?;
        let dims = pixels.dims();
        let [n, c, h, w] = dims;
        if c != 3 {
            return Err(SfrError::param(
                "image defence",
                format!("expects RGB batches, got {c} channels"),
            ));
        }
        let device = pixels.device();
        let mut data = pixels.into_data().try_into_vec::<f32>().map_err(|e| {
            SfrError::param("image defence", format!("could not read pixels: {e:?}"))
        })?;
        let plane = 3 * h * w;
        data.par_chunks_mut(plane)
            .try_for_each(|img| self.apply_one(img, h, w))?;
        debug_assert_eq!(data.len(), n * plane);
        Ok(Tensor::from_data(TensorData::new(data, dims), &device))
    }

    /// Apply to one CHW image in place.
    pub fn apply_one(&self, img: &mut [f32], h: usize, w: usize) -> Result<()> {
        match *self {
            ImageDefense::BitDepth { bits } => {
                let levels = ((1u32 << bits) - 1) as f32;
                for v in img.iter_mut() {
                    let x = (v.clamp(0.0, 255.0) / 255.0 * levels).round() / levels;
                    *v = x * 255.0;
                }
                Ok(())
            }
            ImageDefense::Median { size } => {
                let r = (size / 2) as isize;
                let mut window = Vec::with_capacity(size * size);
                for ch in img.chunks_mut(h * w) {
                    let src = ch.to_vec();
                    for y in 0..h as isize {
                        for x in 0..w as isize {
                            window.clear();
                            for dy in -r..=r {
                                let yy = (y + dy).clamp(0, h as isize - 1) as usize;
                                for dx in -r..=r {
                                    let xx = (x + dx).clamp(0, w as isize - 1) as usize;
                                    window.push(src[yy * w + xx]);
                                }
                            }
                            window.sort_by(f32::total_cmp);
                            ch[y as usize * w + x as usize] = window[window.len() / 2];
                        }
                    }
                }
                Ok(())
            }
            ImageDefense::Jpeg { quality } => {
                use image::ImageEncoder;
                let mut rgb = vec![0u8; 3 * h * w];
                for c in 0..3 {
                    for i in 0..h * w {
                        rgb[i * 3 + c] = img[c * h * w + i].clamp(0.0, 255.0).round() as u8;
                    }
                }
                let mut buf = Vec::new();
                image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, quality)
                    .write_image(&rgb, w as u32, h as u32, image::ExtendedColorType::Rgb8)
                    .map_err(|e| SfrError::param("jpeg", format!("encoding failed: {e}")))?;
                let dec = image::load_from_memory_with_format(&buf, image::ImageFormat::Jpeg)
                    .map_err(|e| SfrError::param("jpeg", format!("decoding failed: {e}")))?
                    .into_rgb8();
                if dec.width() as usize != w || dec.height() as usize != h {
                    return Err(SfrError::param("jpeg", "the decoded size differs"));
                }
                let raw = dec.into_raw();
                for c in 0..3 {
                    for i in 0..h * w {
                        img[c * h * w + i] = raw[i * 3 + c] as f32;
                    }
                }
                Ok(())
            }
        }
    }
}

impl crate::classifier::InputFilter for ImageDefense {
    fn check(&self) -> Result<()> {
        self.validate()
    }

    fn filter(&self, pixels: Tensor<4>) -> Tensor<4> {
        // `check` passed and the zoo's inputs are RGB float batches, which is all `apply` asks.
        self.apply(pixels)
            .expect("a validated image defence on an RGB batch")
    }

    fn id(&self) -> String {
        self.to_string()
    }

    fn describe(&self) -> serde_json::Value {
        serde_json::json!({ "filter": self.to_string(), "description": self.describe() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(h: usize, w: usize, f: impl Fn(usize, usize, usize) -> f32) -> Vec<f32> {
        let mut v = vec![0.0; 3 * h * w];
        for c in 0..3 {
            for y in 0..h {
                for x in 0..w {
                    v[c * h * w + y * w + x] = f(c, y, x);
                }
            }
        }
        v
    }

    #[test]
    fn bit_depth_keeps_16_levels() {
        let mut v = img(4, 4, |c, y, x| (c * 80 + y * 16 + x * 3) as f32);
        ImageDefense::BitDepth { bits: 4 }
            .apply_one(&mut v, 4, 4)
            .unwrap();
        for x in &v {
            let level = x / 17.0;
            assert!(
                (level - level.round()).abs() < 1e-4,
                "{x} is not a 4-bit level"
            );
        }
    }

    #[test]
    fn median_removes_an_isolated_spike_and_keeps_flat_regions() {
        let mut v = img(5, 5, |_, y, x| if (y, x) == (2, 2) { 255.0 } else { 10.0 });
        ImageDefense::Median { size: 3 }
            .apply_one(&mut v, 5, 5)
            .unwrap();
        assert!(v.iter().all(|&x| x == 10.0));
    }

    #[test]
    fn jpeg_roundtrip_is_close_on_a_smooth_image_and_changes_noise() {
        let smooth = img(32, 32, |c, y, x| (40 + c * 30 + y * 2 + x) as f32);
        let mut v = smooth.clone();
        ImageDefense::Jpeg { quality: 75 }
            .apply_one(&mut v, 32, 32)
            .unwrap();
        let err = v
            .iter()
            .zip(&smooth)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(err < 12.0, "max error {err}");
        // ±10 checkerboard noise is mostly removed.
        let noisy = img(32, 32, |c, y, x| {
            (100 + c * 20) as f32 + if (x + y) % 2 == 0 { 10.0 } else { -10.0 }
        });
        let mut v = noisy.clone();
        ImageDefense::Jpeg { quality: 75 }
            .apply_one(&mut v, 32, 32)
            .unwrap();
        let dev: f32 = v
            .iter()
            .enumerate()
            .map(|(i, a)| (a - (100 + (i / 1024) * 20) as f32).abs())
            .sum::<f32>()
            / v.len() as f32;
        assert!(dev < 8.0, "mean deviation from the noise-free image {dev}");
    }

    #[test]
    fn bad_parameters_are_errors() {
        assert!(ImageDefense::Jpeg { quality: 0 }.validate().is_err());
        assert!(ImageDefense::Median { size: 2 }.validate().is_err());
        assert!(ImageDefense::BitDepth { bits: 9 }.validate().is_err());
    }
}
