//! Images and data sets: decoding JPEG/PNG to RGB the way PIL does, PIL-exact bilinear resizing
//! with torchvision's `Resize`/`CenterCrop` rules, data set listings (`labels.csv` or ImageFolder
//! trees) and the ImageNet class table.
//!
//! Every fallible function returns [`DataError`], whose variants name the file (and row) at fault
//! and what was expected.

pub mod cache;
pub mod classes;
pub mod dataset;
pub mod image;
pub mod resize;

use std::path::PathBuf;

pub use classes::ClassTable;
pub use dataset::{Dataset, Sample, epoch_order, load_batch};
pub use image::{RgbImage, decode_rgb, load_rgb, to_chw_f32};
pub use resize::{
    center_crop, center_crop_rect, resize_and_center_crop, resize_exact, resize_shorter,
    shorter_side_size,
};

/// Number of ImageNet-1k classes: labels must lie in `0..NUM_CLASSES`.
pub const NUM_CLASSES: usize = 1000;

/// Errors of the image pipeline and data sets. Each variant names the file (and, for tables, the
/// line) at fault and what was expected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// A file or folder could not be read.
    #[error("cannot read `{path}`: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An image file has no bytes at all.
    #[error("image `{path}` is empty (0 bytes); expected a JPEG or PNG file")]
    EmptyFile { path: PathBuf },
    /// An image file is neither JPEG nor PNG (judged by its first bytes, as PIL does).
    #[error(
        "image `{path}` is neither JPEG nor PNG (it starts with the bytes {magic}); expected a JPEG or PNG file"
    )]
    UnsupportedFormat { path: PathBuf, magic: String },
    /// An image file is corrupt or truncated.
    #[error("cannot decode image `{path}`: {reason}; expected a complete, valid {format} file")]
    Decode {
        path: PathBuf,
        format: &'static str,
        reason: String,
    },
    /// An image decoded to a pixel layout that has no RGB conversion here.
    #[error(
        "image `{path}` decoded to the pixel layout {layout}, which cannot be converted to RGB; expected 8- or 16-bit grey, grey+alpha, RGB, RGBA, palette or CMYK"
    )]
    UnsupportedPixels { path: PathBuf, layout: String },
    /// A resize or crop was asked for an empty size, or given an image whose buffer does not
    /// match its size.
    #[error("{operation}: {reason}")]
    InvalidSize {
        operation: &'static str,
        reason: String,
    },
    /// A data set folder does not exist (or is not a folder).
    #[error("data set folder `{path}` does not exist or is not a folder")]
    MissingDir { path: PathBuf },
    /// A data set folder has neither `labels.csv` nor class sub-folders.
    #[error(
        "data set folder `{path}` has no `labels.csv`, no class sub-folders and no images; expected a `labels.csv` (columns `file`,`label`), sub-folders named by WordNet synset (like `n01440764`), or image files (unlabelled)"
    )]
    NoClassFolders { path: PathBuf },
    /// A folder (class folder of an ImageFolder tree) holds no image files.
    #[error("folder `{path}` holds no images; expected files ending in .jpg, .jpeg or .png")]
    NoImages { path: PathBuf },
    /// `labels.csv` lists no rows.
    #[error("labels file `{path}` lists no images; expected a header line and at least one row")]
    EmptyLabels { path: PathBuf },
    /// `labels.csv`'s header lacks a required column.
    #[error(
        "labels file `{path}`: the header {found:?} lacks the column `{column}`; expected a header with the columns `file` and `label`"
    )]
    MissingColumn {
        path: PathBuf,
        column: &'static str,
        found: Vec<String>,
    },
    /// `labels.csv` is not well-formed CSV, or a row lacks fields.
    #[error("labels file `{path}`, line {line}: {reason}")]
    MalformedCsv {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    /// A label in `labels.csv` is not an integer class index.
    #[error(
        "labels file `{path}`, line {line}: label `{value}` is not an integer in 0..{num_classes}"
    )]
    BadLabel {
        path: PathBuf,
        line: usize,
        value: String,
        num_classes: usize,
    },
    /// An ImageFolder tree was opened without a class table to map synsets to indices.
    #[error(
        "data set folder `{path}` is an ImageFolder tree (no `labels.csv`), but no class table was given; expected a ClassTable to map WordNet synsets (like `n01440764`) to class indices"
    )]
    NoClassTable { path: PathBuf },
    /// A class folder is not named by a synset of the class table.
    #[error(
        "class folder `{path}`: `{name}` is not a known WordNet synset; expected a folder named like `n01440764` that appears in the class table"
    )]
    UnknownSynset { path: PathBuf, name: String },
    /// A class table (TSV) line is malformed.
    #[error("class table `{path}`, line {line}: {reason}")]
    ClassTable {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    /// A class file (JSON) is malformed.
    #[error("class file `{path}`: {reason}")]
    ClassFile { path: PathBuf, reason: String },
}
