//! PIL-exact bilinear resizing and torchvision's `Resize(n)` / `CenterCrop(n)` rules.
//!
//! [`resize_exact`] ports Pillow's `ImagingResample` (`src/libImaging/Resample.c`) for 8-bit
//! images with the bilinear filter, as used by `Image.resize((w, h), Image.BILINEAR)`: a separable,
//! antialiased filter whose support grows with the downscale factor, coefficients computed in
//! `double` by `precompute_coeffs`, normalised, turned into fixed point with
//! `PRECISION_BITS = 32 - 8 - 2`, a horizontal pass over only the rows the vertical pass needs,
//! clipping to 8 bits, then the vertical pass. The integer sums are exact, so the result is
//! byte-for-byte Pillow's.

use super::DataError;
use super::image::RgbImage;

/// Fixed-point precision of Pillow's 8-bit resampling.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's bilinear ("triangle") filter; its support is 1.
fn bilinear_filter(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 { 1.0 - x } else { 0.0 }
}

const BILINEAR_SUPPORT: f64 = 1.0;

/// Resampling coefficients of one axis: for output index `i`, the inputs
/// `bounds[i].0 .. bounds[i].0 + bounds[i].1` weighted by `kk[i * ksize ..][.. bounds[i].1]`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Coeffs<K> {
    pub ksize: usize,
    pub bounds: Vec<(usize, usize)>,
    pub kk: Vec<K>,
}

/// Pillow's `precompute_coeffs` for the bilinear filter and the input range `in0..in1` (Pillow's
/// `box`, in `float`).
pub(crate) fn precompute_coeffs(
    in_size: usize,
    in0: f32,
    in1: f32,
    out_size: usize,
) -> Coeffs<f64> {
    let scale = f64::from(in1 - in0) / out_size as f64;
    let filterscale = if scale < 1.0 { 1.0 } else { scale };
    let support = BILINEAR_SUPPORT * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut kk = vec![0.0f64; out_size * ksize];
    let mut bounds = Vec::with_capacity(out_size);
    let in_size = in_size as i64;
    for xx in 0..out_size {
        let center = f64::from(in0) + (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // `(int)` in C truncates toward zero, as `as` does.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size);
        let count = (xmax - xmin).clamp(0, ksize as i64) as usize;
        let k = &mut kk[xx * ksize..xx * ksize + count];
        let mut ww = 0.0;
        for (x, w) in k.iter_mut().enumerate() {
            *w = bilinear_filter(((x as i64 + xmin) as f64 - center + 0.5) * ss);
            ww += *w;
        }
        if ww != 0.0 {
            for w in k.iter_mut() {
                *w /= ww;
            }
        }
        bounds.push((xmin as usize, count));
    }
    Coeffs { ksize, bounds, kk }
}

/// Pillow's `normalize_coeffs_8bpc`: round half away from zero to fixed point.
pub(crate) fn normalize_coeffs_8bpc(c: Coeffs<f64>) -> Coeffs<i32> {
    let one = f64::from(1u32 << PRECISION_BITS);
    let kk =
        c.kk.iter()
            .map(|&v| {
                if v < 0.0 {
                    (-0.5 + v * one) as i32
                } else {
                    (0.5 + v * one) as i32
                }
            })
            .collect();
    Coeffs {
        ksize: c.ksize,
        bounds: c.bounds,
        kk,
    }
}

/// Pillow's `clip8`: the sum's integer part, clipped to 0..=255.
#[inline]
fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

const ROUNDING: i32 = 1 << (PRECISION_BITS - 1);

/// Horizontal pass over the rows `offset .. offset + out_height` of `src` (`src_w` pixels wide).
fn resample_horizontal(
    src: &[u8],
    src_w: usize,
    offset: usize,
    out_height: usize,
    c: &Coeffs<i32>,
) -> Vec<u8> {
    let out_w = c.bounds.len();
    let mut out = vec![0u8; out_w * out_height * 3];
    for (yy, out_row) in out.chunks_exact_mut(out_w * 3).enumerate() {
        let row_start = (yy + offset) * src_w * 3;
        let row = &src[row_start..row_start + src_w * 3];
        for (xx, px) in out_row.chunks_exact_mut(3).enumerate() {
            let (xmin, count) = c.bounds[xx];
            let k = &c.kk[xx * c.ksize..xx * c.ksize + count];
            let (mut s0, mut s1, mut s2) = (ROUNDING, ROUNDING, ROUNDING);
            for (p, &w) in row[xmin * 3..(xmin + count) * 3].chunks_exact(3).zip(k) {
                s0 += i32::from(p[0]) * w;
                s1 += i32::from(p[1]) * w;
                s2 += i32::from(p[2]) * w;
            }
            px[0] = clip8(s0);
            px[1] = clip8(s1);
            px[2] = clip8(s2);
        }
    }
    out
}

/// Vertical pass; `c.bounds` index rows of `src` (`width` pixels wide). The per-column sums are
/// the same integers as Pillow's, accumulated row by row for speed.
fn resample_vertical(src: &[u8], width: usize, c: &Coeffs<i32>) -> Vec<u8> {
    let stride = width * 3;
    let out_h = c.bounds.len();
    let mut out = vec![0u8; stride * out_h];
    let mut acc = vec![0i32; stride];
    for (yy, out_row) in out.chunks_exact_mut(stride).enumerate() {
        let (ymin, count) = c.bounds[yy];
        let k = &c.kk[yy * c.ksize..yy * c.ksize + count];
        acc.fill(ROUNDING);
        for (y, &w) in k.iter().enumerate() {
            let row_start = (ymin + y) * stride;
            let row = &src[row_start..row_start + stride];
            for (a, &p) in acc.iter_mut().zip(row) {
                *a += i32::from(p) * w;
            }
        }
        for (o, &a) in out_row.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    out
}

fn check_target(
    operation: &'static str,
    image: &RgbImage,
    w: usize,
    h: usize,
) -> Result<(), DataError> {
    image.check(operation)?;
    if image.width == 0 || image.height == 0 {
        return Err(DataError::InvalidSize {
            operation,
            reason: format!(
                "the input image is {}x{}; expected a non-empty image",
                image.width, image.height
            ),
        });
    }
    if w == 0 || h == 0 {
        return Err(DataError::InvalidSize {
            operation,
            reason: format!("the requested size is {w}x{h}; expected both sides > 0"),
        });
    }
    Ok(())
}

/// `image.resize((width, height), Image.BILINEAR)` in Pillow, byte for byte (no aspect ratio kept:
/// this is also the "squash" resize that Caffe models were evaluated with).
pub fn resize_exact(image: &RgbImage, width: usize, height: usize) -> Result<RgbImage, DataError> {
    check_target("resize", image, width, height)?;
    let (in_w, in_h) = (image.width, image.height);
    let need_horizontal = width != in_w;
    let need_vertical = height != in_h;
    if !need_horizontal && !need_vertical {
        return Ok(image.clone());
    }
    let mut vert = normalize_coeffs_8bpc(precompute_coeffs(in_h, 0.0, in_h as f32, height));
    let mut data: Option<Vec<u8>> = None;
    if need_horizontal {
        // Only the rows that the vertical pass reads.
        let first = vert.bounds.first().map_or(0, |b| b.0);
        let last = vert.bounds.last().map_or(in_h, |b| b.0 + b.1);
        for b in &mut vert.bounds {
            b.0 -= first;
        }
        let horiz = normalize_coeffs_8bpc(precompute_coeffs(in_w, 0.0, in_w as f32, width));
        data = Some(resample_horizontal(
            &image.data,
            in_w,
            first,
            last - first,
            &horiz,
        ));
    }
    let src = data.as_deref().unwrap_or(&image.data);
    let out = if need_vertical {
        resample_vertical(src, width, &vert)
    } else {
        src.to_vec()
    };
    Ok(RgbImage {
        width,
        height,
        data: out,
    })
}

/// The size torchvision's `Resize(size)` gives an image of `width`x`height`: the shorter side
/// becomes `size`, the longer `int(size * long / short)` (truncated). Returns `(width, height)`.
pub fn shorter_side_size(width: usize, height: usize, size: usize) -> (usize, usize) {
    let (short, long) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    if short == 0 {
        return (width, height);
    }
    // Python's int / int is the correctly rounded quotient, as is f64 division of exact values.
    let new_long = ((size as u128 * long as u128) as f64 / short as f64) as usize;
    if width <= height {
        (size, new_long)
    } else {
        (new_long, size)
    }
}

/// torchvision's `Resize(size)` (bilinear, PIL backend) on an image: the shorter side becomes
/// `size`, the aspect ratio is kept with the longer side truncated.
pub fn resize_shorter(image: &RgbImage, size: usize) -> Result<RgbImage, DataError> {
    check_target("resize_shorter", image, size, size)?;
    let (w, h) = shorter_side_size(image.width, image.height, size);
    resize_exact(image, w, h)
}

/// Python 3's `int(round(d / 2.0))` for `d >= 0`: halves go to the even neighbour.
pub(crate) fn half_round_even(d: usize) -> usize {
    let q = d / 2;
    if d % 2 == 1 && q % 2 == 1 { q + 1 } else { q }
}

/// torchvision's `CenterCrop((height, width))` on a PIL image: an image smaller than the crop is
/// first padded with black (left/top get `(crop - side) // 2`), then the crop's top-left corner is
/// `int(round((side - crop) / 2.0))`.
pub fn center_crop_rect(
    image: &RgbImage,
    width: usize,
    height: usize,
) -> Result<RgbImage, DataError> {
    image.check("center_crop")?;
    if width == 0 || height == 0 {
        return Err(DataError::InvalidSize {
            operation: "center_crop",
            reason: format!("the requested crop is {width}x{height}; expected both sides > 0"),
        });
    }
    let padded;
    let image = if width > image.width || height > image.height {
        let left = width.saturating_sub(image.width) / 2;
        let top = height.saturating_sub(image.height) / 2;
        let (pw, ph) = (image.width.max(width), image.height.max(height));
        let mut canvas = RgbImage::black(pw, ph);
        for y in 0..image.height {
            let src = &image.data[y * image.width * 3..(y + 1) * image.width * 3];
            let dst_start = ((y + top) * pw + left) * 3;
            canvas.data[dst_start..dst_start + src.len()].copy_from_slice(src);
        }
        padded = canvas;
        &padded
    } else {
        image
    };
    let top = half_round_even(image.height - height);
    let left = half_round_even(image.width - width);
    let mut data = Vec::with_capacity(width * height * 3);
    for y in top..top + height {
        let start = (y * image.width + left) * 3;
        data.extend_from_slice(&image.data[start..start + width * 3]);
    }
    Ok(RgbImage {
        width,
        height,
        data,
    })
}

/// torchvision's `CenterCrop(size)`: a `size`x`size` crop from the centre.
pub fn center_crop(image: &RgbImage, size: usize) -> Result<RgbImage, DataError> {
    center_crop_rect(image, size, size)
}

/// torchvision's `Compose([Resize(resize), CenterCrop(crop)])` on a PIL image.
pub fn resize_and_center_crop(
    image: &RgbImage,
    resize: usize,
    crop: usize,
) -> Result<RgbImage, DataError> {
    center_crop(&resize_shorter(image, resize)?, crop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coefficients_downscale_by_two() {
        // 4 -> 2: scale 2, support 2, ksize 5; output 0 is centred on 1.0 and reads inputs 0..3
        // with the triangle weights 0.75, 0.75, 0.25, normalised by their sum 1.75.
        let c = precompute_coeffs(4, 0.0, 4.0, 2);
        assert_eq!(c.ksize, 5);
        assert_eq!(c.bounds, vec![(0, 3), (1, 3)]);
        let k0 = &c.kk[0..5];
        let expect = [0.75 / 1.75, 0.75 / 1.75, 0.25 / 1.75, 0.0, 0.0];
        for (a, b) in k0.iter().zip(expect) {
            assert!((a - b).abs() < 1e-15, "{k0:?}");
        }
        let n = normalize_coeffs_8bpc(c);
        let one = 1i64 << PRECISION_BITS;
        assert_eq!(n.kk[0], ((0.75 / 1.75) * one as f64 + 0.5) as i32);
        assert_eq!(n.kk[2], ((0.25 / 1.75) * one as f64 + 0.5) as i32);
        // Output 1 is centred on 3.0: inputs 1..4 with weights 0.25, 0.75, 0.75.
        assert!((n.kk[5] - n.kk[2]).abs() <= 1);
    }

    #[test]
    fn coefficients_upscale_use_unit_support() {
        // 2 -> 4: scale 0.5, filterscale 1, support 1, ksize 3.
        let c = precompute_coeffs(2, 0.0, 2.0, 4);
        assert_eq!(c.ksize, 3);
        // centre 0.25: xmin = int(-0.25) = 0 (truncation toward zero), xmax = int(1.75) = 1.
        assert_eq!(c.bounds[0], (0, 1));
        assert_eq!(c.kk[0], 1.0);
        // centre 0.75: inputs 0..2, weights 1-|0-0.75+0.5| = 0.75 and 1-|1-0.75+0.5| = 0.25.
        assert_eq!(c.bounds[1], (0, 2));
        assert_eq!(&c.kk[3..5], &[0.75, 0.25]);
        assert_eq!(c.bounds[3], (1, 1));
    }

    #[test]
    fn normalize_rounds_half_away_from_zero() {
        let c = Coeffs {
            ksize: 2,
            bounds: vec![(0, 2)],
            kk: vec![-0.25, 0.5],
        };
        let n = normalize_coeffs_8bpc(c);
        assert_eq!(n.kk, vec![-(1 << 20), 1 << 21]);
        assert_eq!(clip8(-5), 0);
        assert_eq!(clip8(300 << PRECISION_BITS), 255);
        assert_eq!(clip8((7 << PRECISION_BITS) + ROUNDING), 7);
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = RgbImage::new(7, 5, [10u8, 200, 77].repeat(35)).unwrap();
        for (w, h) in [(3, 2), (13, 11), (7, 2), (2, 5), (1, 1)] {
            let r = resize_exact(&img, w, h).unwrap();
            assert_eq!((r.width, r.height), (w, h));
            assert!(
                r.data.chunks_exact(3).all(|p| p == [10, 200, 77]),
                "{w}x{h}"
            );
        }
        assert_eq!(resize_exact(&img, 7, 5).unwrap(), img);
        assert!(resize_exact(&img, 0, 5).is_err());
    }

    #[test]
    fn torchvision_resize_rule() {
        assert_eq!(shorter_side_size(500, 375, 256), (341, 256));
        assert_eq!(shorter_side_size(375, 500, 256), (256, 341));
        assert_eq!(shorter_side_size(300, 300, 256), (256, 256));
        // 256 * 333 / 299 = 285.11 -> 285 (truncation, not rounding)
        assert_eq!(shorter_side_size(333, 299, 256), (285, 256));
        // 256 * 683 / 512 = 341.5 -> 341
        assert_eq!(shorter_side_size(512, 683, 256), (256, 341));
    }

    #[test]
    fn python_round_half_even() {
        // int(round(d / 2.0)) in Python 3
        let expect = [0, 0, 1, 2, 2, 2, 3, 4, 4, 4, 5];
        for (d, e) in expect.iter().enumerate() {
            assert_eq!(half_round_even(d), *e, "d = {d}");
        }
    }

    #[test]
    fn center_crop_offsets_and_padding() {
        // 5x1 image, crop 2 wide: (5-2)/2 = 1.5 rounds to 2.
        let img = RgbImage::new(5, 1, (0..15).collect()).unwrap();
        let c = center_crop_rect(&img, 2, 1).unwrap();
        assert_eq!(c.data, vec![6, 7, 8, 9, 10, 11]);
        // 3x1 padded to 6 wide: left pad (6-3)//2 = 1, right 2.
        let img = RgbImage::new(3, 1, vec![1; 9]).unwrap();
        let c = center_crop_rect(&img, 6, 1).unwrap();
        let lit: Vec<bool> = c.data.chunks_exact(3).map(|p| p[0] == 1).collect();
        assert_eq!(lit, vec![false, true, true, true, false, false]);
        assert!(center_crop(&img, 0).is_err());
    }
}
