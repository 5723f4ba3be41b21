//! A process-wide cache of prepared images (decoded, resized, centre-cropped), so that jobs
//! that pass over the same images many times — attack epochs, FRU-training epochs, their
//! validation — decode each file once.
//!
//! Entries are keyed by path, file length and modification time (a changed file is decoded
//! again) and by the preparation (resize mode, resize, crop). The cache holds at most
//! `SFR_IMAGE_CACHE_MB` mebibytes (default 2048; 0 turns it off) of RGB bytes and stops adding
//! when full, so memory stays bounded and nothing is evicted mid-run.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use super::RgbImage;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    path: PathBuf,
    len: u64,
    modified: Option<SystemTime>,
    prep: (u8, usize, usize),
}

struct Cache {
    map: Mutex<HashMap<Key, Arc<RgbImage>>>,
    bytes: AtomicUsize,
    budget: usize,
}

fn cache() -> &'static Cache {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    CACHE.get_or_init(|| {
        let mb = std::env::var("SFR_IMAGE_CACHE_MB")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(2048);
        Cache {
            map: Mutex::new(HashMap::new()),
            bytes: AtomicUsize::new(0),
            budget: mb.saturating_mul(1 << 20),
        }
    })
}

/// The prepared image of `path` for preparation `prep` (an identifier of resize mode, resize
/// and crop), from the cache or from `make` (whose result is cached while the budget allows).
pub fn prepared<E>(
    path: &Path,
    prep: (u8, usize, usize),
    make: impl FnOnce() -> Result<RgbImage, E>,
) -> Result<Arc<RgbImage>, E> {
    let c = cache();
    if c.budget == 0 {
        return make().map(Arc::new);
    }
    let meta = std::fs::metadata(path).ok();
    let key = Key {
        path: path.to_path_buf(),
        len: meta.as_ref().map_or(0, |m| m.len()),
        modified: meta.and_then(|m| m.modified().ok()),
        prep,
    };
    if let Some(hit) = c.map.lock().ok().and_then(|m| m.get(&key).cloned()) {
        return Ok(hit);
    }
    let img = Arc::new(make()?);
    let size = img.data.len();
    if c.bytes.load(Ordering::Relaxed) + size <= c.budget
        && let Ok(mut m) = c.map.lock()
        && m.insert(key, img.clone()).is_none()
    {
        c.bytes.fetch_add(size, Ordering::Relaxed);
    }
    Ok(img)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_file_is_prepared_again() {
        let dir = std::env::temp_dir().join(format!("sfr-cache-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.bin");
        std::fs::write(&p, b"one").unwrap();
        let mut calls = 0;
        let mut get = |v: u8| {
            prepared::<()>(&p, (0, 1, 1), || {
                calls += 1;
                Ok(RgbImage::new(1, 1, vec![v, v, v]).unwrap())
            })
            .unwrap()
        };
        assert_eq!(get(1).data, vec![1, 1, 1]);
        assert_eq!(
            get(2).data,
            vec![1, 1, 1],
            "second call served from the cache"
        );
        std::fs::write(&p, b"longer").unwrap();
        assert_eq!(
            get(3).data,
            vec![3, 3, 3],
            "a different length is a different file"
        );
        assert_eq!(calls, 2);
        std::fs::remove_dir_all(&dir).ok();
    }
}
