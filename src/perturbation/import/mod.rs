//! TEMPORARY STUB (replaced by the full importers).
use std::path::{Path, PathBuf};
pub struct RawArray { pub shape: Vec<usize>, pub data: Vec<f32> }
#[derive(Debug, thiserror::Error)]
pub enum ImportError { #[error("{0}: {1}")] Bad(PathBuf, String) }
pub fn read_any(path: &Path) -> Result<RawArray, ImportError> { Err(ImportError::Bad(path.into(), "stub".into())) }
