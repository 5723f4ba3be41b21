//! Decoding JPEG and PNG files to 8-bit RGB exactly as PIL's `Image.open(p).convert("RGB")` does.
//!
//! PIL's rules, which [`load_rgb`] follows:
//! - grey → the grey value in all three channels; an alpha channel (grey+alpha, RGBA, a palette's
//!   or a `tRNS` transparency) is dropped, never blended;
//! - palette → the palette's RGB entry;
//! - 16-bit PNG: RGB, RGBA and grey+alpha keep the high byte of each sample; 16-bit *grey* (PIL's
//!   mode `I`) is clipped to 0..=255, so that any value above 255 becomes white (PIL's quirk);
//! - CMYK JPEG: PIL assumes Adobe's inverted CMYK and gives `R = (255-C)(255-K)/255` on the
//!   un-inverted inks, i.e. `R = c·k/255` (rounded) on the stored bytes; the `image` crate's
//!   decoder (zune-jpeg) computes the same, as does it for YCCK;
//! - a truncated JPEG (no end-of-image marker) is an error, as in PIL without
//!   `LOAD_TRUNCATED_IMAGES`; EXIF orientation is not applied (PIL's `open` does not either).

use std::io::Cursor;
use std::path::Path;

use image::{DynamicImage, ImageFormat, ImageReader};

use super::DataError;

/// An 8-bit RGB image, rows top to bottom, pixels interleaved (HWC): the value of channel `c` of
/// pixel `(x, y)` is `data[(y * width + x) * 3 + c]`.
#[derive(Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl std::fmt::Debug for RgbImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RgbImage")
            .field("width", &self.width)
            .field("height", &self.height)
            .field("data_len", &self.data.len())
            .finish()
    }
}

impl RgbImage {
    /// An image from its HWC RGB bytes; fails unless `data.len() == width * height * 3`.
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Result<Self, DataError> {
        let image = RgbImage {
            width,
            height,
            data,
        };
        image.check("RgbImage::new")?;
        Ok(image)
    }

    /// A black image.
    pub fn black(width: usize, height: usize) -> Self {
        RgbImage {
            width,
            height,
            data: vec![0; width * height * 3],
        }
    }

    /// The pixel at `(x, y)`, or `None` outside the image.
    pub fn pixel(&self, x: usize, y: usize) -> Option<[u8; 3]> {
        if x >= self.width || y >= self.height {
            return None;
        }
        let i = (y * self.width + x) * 3;
        let p = self.data.get(i..i + 3)?;
        Some([p[0], p[1], p[2]])
    }

    /// Fails unless the buffer length matches the size (the fields are public, so a caller can
    /// break this).
    pub(crate) fn check(&self, operation: &'static str) -> Result<(), DataError> {
        let expected = self
            .width
            .checked_mul(self.height)
            .and_then(|n| n.checked_mul(3));
        if expected != Some(self.data.len()) {
            return Err(DataError::InvalidSize {
                operation,
                reason: format!(
                    "the image is {}x{} but holds {} bytes; expected width*height*3",
                    self.width,
                    self.height,
                    self.data.len()
                ),
            });
        }
        Ok(())
    }
}

/// Reads and decodes a JPEG or PNG file to RGB, as PIL's `Image.open(path).convert("RGB")`.
pub fn load_rgb(path: impl AsRef<Path>) -> Result<RgbImage, DataError> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    decode_rgb(&bytes, path)
}

/// Decodes JPEG or PNG bytes to RGB, as PIL's `Image.open(...).convert("RGB")`; `path` only
/// names the source in errors. The format is judged by the first bytes, never by the name.
pub fn decode_rgb(bytes: &[u8], path: &Path) -> Result<RgbImage, DataError> {
    if bytes.is_empty() {
        return Err(DataError::EmptyFile {
            path: path.to_path_buf(),
        });
    }
    let (format, name) = if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        (ImageFormat::Jpeg, "JPEG")
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        (ImageFormat::Png, "PNG")
    } else {
        let magic = bytes
            .iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" ");
        return Err(DataError::UnsupportedFormat {
            path: path.to_path_buf(),
            magic,
        });
    };
    let decode_error = |reason: String| DataError::Decode {
        path: path.to_path_buf(),
        format: name,
        reason,
    };
    if format == ImageFormat::Jpeg {
        check_jpeg_complete(bytes).map_err(decode_error)?;
    }
    // PNG grey of 16 bits is PIL's mode `I`, clipped rather than shifted to 8 bits.
    let png_grey16 =
        format == ImageFormat::Png && bytes.get(24) == Some(&16) && bytes.get(25) == Some(&0);
    // A decoder panic on a hostile file becomes an error naming the file.
    let decode = |bytes: &[u8]| {
        std::panic::catch_unwind(|| ImageReader::with_format(Cursor::new(bytes), format).decode())
            .unwrap_or_else(|_| {
                Err(image::ImageError::Decoding(
                    image::error::DecodingError::new(
                        format.into(),
                        "the decoder crashed on this file",
                    ),
                ))
            })
    };
    let decoded = match decode(bytes) {
        Ok(decoded) => decoded,
        // PIL stops reading a PNG once the image data is complete, so that a file cut inside
        // or before its IEND chunk still loads; the `png` crate insists on IEND.
        Err(e) if format == ImageFormat::Png && !bytes.ends_with(PNG_IEND) => {
            decode(&[bytes, PNG_IEND].concat()).map_err(|_| decode_error(e.to_string()))?
        }
        Err(e) => return Err(decode_error(e.to_string())),
    };
    let (width, height) = (decoded.width() as usize, decoded.height() as usize);
    if width == 0 || height == 0 {
        return Err(decode_error(format!("the image is {width}x{height}")));
    }
    let data = match decoded {
        DynamicImage::ImageRgb8(buf) => buf.into_raw(),
        DynamicImage::ImageLuma8(buf) => buf.as_raw().iter().flat_map(|&l| [l, l, l]).collect(),
        DynamicImage::ImageLumaA8(buf) => buf
            .as_raw()
            .chunks_exact(2)
            .flat_map(|p| [p[0], p[0], p[0]])
            .collect(),
        DynamicImage::ImageRgba8(buf) => buf
            .as_raw()
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect(),
        DynamicImage::ImageLuma16(buf) => buf
            .as_raw()
            .iter()
            .flat_map(|&l| {
                let l = grey16_to_8(l, png_grey16);
                [l, l, l]
            })
            .collect(),
        DynamicImage::ImageLumaA16(buf) => buf
            .as_raw()
            .chunks_exact(2)
            .flat_map(|p| {
                let l = grey16_to_8(p[0], png_grey16);
                [l, l, l]
            })
            .collect(),
        DynamicImage::ImageRgb16(buf) => buf.as_raw().iter().map(|&v| high_byte(v)).collect(),
        DynamicImage::ImageRgba16(buf) => buf
            .as_raw()
            .chunks_exact(4)
            .flat_map(|p| [high_byte(p[0]), high_byte(p[1]), high_byte(p[2])])
            .collect(),
        other => {
            return Err(DataError::UnsupportedPixels {
                path: path.to_path_buf(),
                layout: format!("{:?}", other.color()),
            });
        }
    };
    let image = RgbImage {
        width,
        height,
        data,
    };
    image
        .check("decode")
        .map_err(|e| decode_error(e.to_string()))?;
    Ok(image)
}

/// The final chunk of every PNG: length 0, type IEND, CRC.
const PNG_IEND: &[u8] = &[0, 0, 0, 0, b'I', b'E', b'N', b'D', 0xAE, 0x42, 0x60, 0x82];

fn high_byte(v: u16) -> u8 {
    (v >> 8) as u8
}

/// PIL reads 16-bit grey PNGs as 32-bit integers (mode `I`) and converts those to RGB by
/// clipping to 0..=255; 16-bit grey+alpha keeps the high byte.
fn grey16_to_8(v: u16, clip: bool) -> u8 {
    if clip { v.min(255) as u8 } else { high_byte(v) }
}

/// Walks the JPEG marker structure and fails unless it reaches the end-of-image marker: the
/// `image` crate's decoder silently fills a truncated scan with grey, where PIL reports
/// "image file is truncated".
pub(crate) fn check_jpeg_complete(bytes: &[u8]) -> Result<(), String> {
    if !bytes.starts_with(&[0xFF, 0xD8]) {
        return Err("no start-of-image marker".into());
    }
    let truncated = |at: usize| {
        Err(format!(
            "the file is truncated: it ends at byte {} (inside the segment that starts at byte {at}) before the end-of-image marker",
            bytes.len()
        ))
    };
    let mut i = 2;
    loop {
        // Skip anything before the next marker (libjpeg warns and skips too), then fill bytes.
        while i < bytes.len() && bytes[i] != 0xFF {
            i += 1;
        }
        while i < bytes.len() && bytes[i] == 0xFF {
            i += 1;
        }
        let Some(&marker) = bytes.get(i) else {
            return truncated(i.saturating_sub(1));
        };
        let start = i - 1;
        i += 1;
        match marker {
            0xD9 => return Ok(()),
            0x01 | 0xD0..=0xD7 => continue,
            _ => {}
        }
        let (Some(&hi), Some(&lo)) = (bytes.get(i), bytes.get(i + 1)) else {
            return truncated(start);
        };
        let len = usize::from(hi) << 8 | usize::from(lo);
        if len < 2 {
            return Err(format!(
                "the marker segment at byte {start} has the invalid length {len}"
            ));
        }
        i += len;
        if i > bytes.len() {
            return truncated(start);
        }
        if marker == 0xDA {
            // Entropy-coded data runs to the next marker other than a stuffed 0xFF00 or a restart.
            loop {
                let Some(ff) = bytes[i..].iter().position(|&b| b == 0xFF) else {
                    return truncated(start);
                };
                i += ff;
                match bytes.get(i + 1) {
                    None => return truncated(start),
                    Some(0x00 | 0xD0..=0xD7) => i += 2,
                    Some(_) => break,
                }
            }
        }
    }
}

/// Planar float copy of an image: `out[c * h * w + y * w + x]`, channels R, G, B, values 0..=255
/// (no scaling or normalisation; models apply their own).
pub fn to_chw_f32(image: &RgbImage) -> Vec<f32> {
    let plane = image.width * image.height;
    let mut out = vec![0.0f32; plane * 3];
    let (r, rest) = out.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for (i, p) in image.data.chunks_exact(3).take(plane).enumerate() {
        r[i] = f32::from(p[0]);
        g[i] = f32::from(p[1]);
        b[i] = f32::from(p[2]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jpeg(segments: &[&[u8]]) -> Vec<u8> {
        segments.concat()
    }

    #[test]
    fn jpeg_structure_complete_and_truncated() {
        let app0: &[u8] = &[0xFF, 0xE0, 0x00, 0x04, 0xAA, 0xBB];
        let sos: &[u8] = &[0xFF, 0xDA, 0x00, 0x02];
        // Entropy data with a stuffed byte, a restart marker and an 0xFF 0xFF fill before EOI.
        let scan: &[u8] = &[0x12, 0xFF, 0x00, 0x34, 0xFF, 0xD0, 0x56];
        let eoi: &[u8] = &[0xFF, 0xFF, 0xD9];
        let full = jpeg(&[&[0xFF, 0xD8], app0, sos, scan, eoi]);
        assert_eq!(check_jpeg_complete(&full), Ok(()));
        for cut in 2..full.len() {
            assert!(check_jpeg_complete(&full[..cut]).is_err(), "cut at {cut}");
        }
        // Trailing garbage after EOI is fine (PIL ignores it too).
        let mut trailing = full.clone();
        trailing.extend_from_slice(b"garbage");
        assert_eq!(check_jpeg_complete(&trailing), Ok(()));
        // An EOI-looking pair inside an APP segment does not count.
        let app_with_eoi: &[u8] = &[0xFF, 0xE1, 0x00, 0x04, 0xFF, 0xD9];
        let fake = jpeg(&[&[0xFF, 0xD8], app_with_eoi, sos, scan]);
        assert!(check_jpeg_complete(&fake).is_err());
        assert!(check_jpeg_complete(&[0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x01]).is_err());
    }

    #[test]
    fn decode_rejects_garbage_and_empty() {
        let p = Path::new("x.jpg");
        assert!(matches!(
            decode_rgb(&[], p),
            Err(DataError::EmptyFile { .. })
        ));
        assert!(matches!(
            decode_rgb(b"GIF89a....", p),
            Err(DataError::UnsupportedFormat { .. })
        ));
        let err = decode_rgb(&[0xFF, 0xD8, 0xFF, 0xE0, 0x00], p).unwrap_err();
        assert!(err.to_string().contains("x.jpg"), "{err}");
    }

    #[test]
    fn grey16_rules() {
        assert_eq!(grey16_to_8(300, true), 255);
        assert_eq!(grey16_to_8(200, true), 200);
        assert_eq!(grey16_to_8(0x1234, false), 0x12);
    }

    #[test]
    fn chw_layout() {
        let img = RgbImage::new(2, 1, vec![1, 2, 3, 4, 5, 6]).unwrap();
        assert_eq!(to_chw_f32(&img), vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
        assert_eq!(img.pixel(1, 0), Some([4, 5, 6]));
        assert_eq!(img.pixel(2, 0), None);
        assert!(RgbImage::new(2, 2, vec![0; 3]).is_err());
    }
}
