//! A per-process scratch file for readers that take a path.
use std::path::PathBuf;

pub fn scratch(name: &str, data: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sfr-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch folder");
    let p = dir.join(name);
    std::fs::write(&p, data).expect("scratch file");
    p
}
