//! TEMPORARY STUB (replaced by the full reader).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub struct RawTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}
#[derive(Default)]
pub struct TensorMap {
    t: BTreeMap<String, RawTensor>,
}
impl TensorMap {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn insert(&mut self, k: impl Into<String>, v: RawTensor) {
        self.t.insert(k.into(), v);
    }
    pub fn get(&self, k: &str) -> Option<&RawTensor> {
        self.t.get(k)
    }
    pub fn remove(&mut self, k: &str) -> Option<RawTensor> {
        self.t.remove(k)
    }
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.t.keys().map(|s| s.as_str())
    }
    pub fn len(&self) -> usize {
        self.t.len()
    }
    pub fn is_empty(&self) -> bool {
        self.t.is_empty()
    }
}
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{0}: {1}")]
    Bad(PathBuf, String),
}
pub fn load(path: &Path) -> Result<TensorMap, WeightsError> {
    let bytes = std::fs::read(path).map_err(|e| WeightsError::Bad(path.into(), e.to_string()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| WeightsError::Bad(path.into(), e.to_string()))?;
    let mut m = TensorMap::new();
    for (name, v) in st.tensors() {
        let data: Vec<f32> = match v.dtype() {
            safetensors::Dtype::F32 => v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            safetensors::Dtype::I64 => v
                .data()
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
            d => return Err(WeightsError::Bad(path.into(), format!("dtype {d:?}"))),
        };
        m.insert(
            name,
            RawTensor {
                shape: v.shape().to_vec(),
                data,
            },
        );
    }
    Ok(m)
}
pub fn read_safetensors_metadata(path: &Path) -> Result<BTreeMap<String, String>, WeightsError> {
    let bytes = std::fs::read(path).map_err(|e| WeightsError::Bad(path.into(), e.to_string()))?;
    let (_, m) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| WeightsError::Bad(path.into(), e.to_string()))?;
    Ok(m.metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect())
}
pub fn save_safetensors(_m: &TensorMap, _meta: &BTreeMap<String, String>, p: &Path) -> Result<(), WeightsError> { Err(WeightsError::Bad(p.into(), "stub".into())) }
