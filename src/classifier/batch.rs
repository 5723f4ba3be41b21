//! Images into tensors: decoding, resizing and cropping as a model's spec says, batched in
//! parallel, and logits back into rows.

use std::path::{Path, PathBuf};

use burn::tensor::{Tensor, TensorData};
use rayon::prelude::*;
use serde::Serialize;

use crate::data::{self, Sample};
use crate::error::{Result, SfrError};
use crate::zoo::{ArchSpec, Model, ResizeMode};

/// Decode, resize and centre-crop one image as the model's spec says: RGB, CHW, 0–255 floats.
///
/// Prepared images are kept in [`data::cache`] for the next pass over the same files.
pub fn prepare_image(path: &Path, spec: &ArchSpec) -> Result<Vec<f32>> {
    let mode = match spec.resize_mode {
        ResizeMode::ShorterSide => 0,
        ResizeMode::Squash => 1,
    };
    let img = data::cache::prepared(path, (mode, spec.resize, spec.input_size), || {
        let img = data::load_rgb(path)?;
        let img = match spec.resize_mode {
            ResizeMode::ShorterSide => data::resize_shorter(&img, spec.resize)?,
            ResizeMode::Squash => data::resize_exact(&img, spec.resize, spec.resize)?,
        };
        data::center_crop(&img, spec.input_size)
    })?;
    Ok(data::to_chw_f32(&img))
}

/// A batch of prepared images.
pub struct Batch {
    /// `[n, 3, s, s]` RGB pixels on the 0–255 scale.
    pub pixels: Tensor<4>,
    /// The samples that made it (bad images left out).
    pub samples: Vec<Sample>,
}

/// An image that could not be used, with why.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    /// The file.
    pub file: PathBuf,
    /// The error.
    pub error: String,
}

/// Decode a slice of samples in parallel into one batch; bad images are returned as skipped
/// (or fail the call when `strict`).
pub fn load_batch(
    model: &Model,
    samples: &[Sample],
    strict: bool,
) -> Result<(Option<Batch>, Vec<Skipped>)> {
    let spec = model.spec();
    let decoded: Vec<(Sample, Result<Vec<f32>>)> = samples
        .par_iter()
        .map(|s| (s.clone(), prepare_image(&s.path, spec)))
        .collect();
    let mut pixels = Vec::with_capacity(samples.len() * 3 * spec.input_size * spec.input_size);
    let mut kept = Vec::new();
    let mut skipped = Vec::new();
    for (s, r) in decoded {
        match r {
            Ok(p) => {
                pixels.extend_from_slice(&p);
                kept.push(s);
            }
            Err(e) if !strict => skipped.push(Skipped {
                file: s.path.clone(),
                error: e.to_string(),
            }),
            Err(e) => return Err(e),
        }
    }
    if kept.is_empty() {
        return Ok((None, skipped));
    }
    let n = kept.len();
    let s = spec.input_size;
    let pixels = Tensor::from_data(TensorData::new(pixels, [n, 3, s, s]), model.device());
    Ok((
        Some(Batch {
            pixels,
            samples: kept,
        }),
        skipped,
    ))
}

/// Logits as rows.
pub fn logits_rows(logits: Tensor<2>) -> Result<Vec<Vec<f32>>> {
    let [_, c] = logits.dims();
    let v = logits.into_data().try_into_vec::<f32>().map_err(|e| {
        SfrError::param(
            "logits",
            format!("could not read the model's output: {e:?}"),
        )
    })?;
    Ok(v.chunks(c).map(|r| r.to_vec()).collect())
}
