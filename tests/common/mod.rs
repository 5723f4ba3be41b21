//! Shared test support: where `../shared` is, whether PyTorch is there, and visible skips.
//!
//! Tests that need `../shared` (override with `SFR_SHARED`) or Debian's PyTorch are reported as
//! `SKIPPED: …` on stderr when it is absent — except under CI (`CI=true`), where its absence fails.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Whether we run under CI.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Report a skip (or panic under CI) and return `None`.
pub fn skip<T>(why: &str) -> Option<T> {
    if in_ci() {
        panic!("required test material missing under CI: {why}");
    }
    eprintln!("SKIPPED: {why}");
    None
}

/// The shared material folder, if present.
pub fn shared_dir() -> Option<PathBuf> {
    let p = match std::env::var_os("SFR_SHARED") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"),
    };
    if p.join("data").is_dir() {
        Some(p)
    } else {
        skip(&format!(
            "shared material not found at {} (set SFR_SHARED)",
            p.display()
        ))
    }
}

/// The Python the reference scripts run with (`SFR_PYTHON`, default Debian's `/usr/bin/python3`),
/// if it can import every module in `modules` (e.g. `"torch, torchvision"`); else a visible skip
/// (a failure under CI) that names `packages`, the Debian packages that provide them.
pub fn python_with(modules: &str, packages: &str) -> Option<String> {
    let py = std::env::var("SFR_PYTHON").unwrap_or_else(|_| "/usr/bin/python3".into());
    let ok = Command::new(&py)
        .args(["-c", &format!("import {modules}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        Some(py)
    } else {
        skip(&format!(
            "{py} cannot import {modules} (apt-get install {packages}, or set SFR_PYTHON)"
        ))
    }
}

/// The Python that has PyTorch.
pub fn torch_python() -> Option<String> {
    python_with("torch, torchvision", "python3-torch python3-torchvision")
}

/// A folder for generated test material that persists across test runs.
pub fn scratch(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::create_dir_all(&p).expect("create test scratch dir");
    p
}

/// The PyTorch zoo references (weights + io), generated once by `tools/zoo_reference.py`.
pub fn zoo_reference() -> Option<PathBuf> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| {
        let py = torch_python()?;
        let out = scratch("zooref");
        let stamp = out.join("complete");
        if !stamp.is_file() {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/zoo_reference.py");
            let status = Command::new(&py)
                .arg(&script)
                .arg("--out")
                .arg(&out)
                .arg("--cache")
                .arg(scratch("zooref-cache"))
                .arg("--no-f64")
                .status()
                .expect("run tools/zoo_reference.py");
            assert!(status.success(), "tools/zoo_reference.py failed");
            std::fs::write(&stamp, "ok").expect("write stamp");
        }
        Some(out)
    })
    .clone()
}

/// The registry weights of `asset`, fetched through the same path as users (`sfr fetch`).
pub fn fetched(asset: &str) -> PathBuf {
    sfr::fetch::fetch_named(asset, &mut |m| eprintln!("{m}"))
        .unwrap_or_else(|e| panic!("fetching {asset}: {e}"))
}

/// Max absolute difference of two equally long slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The foolbox images and a random-sign training perturbation for them (`sfr attack random`),
/// made once per folder: material for tests that train a defence.
pub fn foolbox_and_random_uap(dir: &Path) -> (PathBuf, PathBuf) {
    random_uap(dir, "uap.safetensors", 10.0)
}

/// The foolbox images and a random-sign perturbation of ℓ∞ norm `eps` in `dir/name` (made once).
pub fn random_uap(dir: &Path, name: &str, eps: f64) -> (PathBuf, PathBuf) {
    let data = sfr::fetch::fetch_named("foolbox-imagenet", &mut |_| {}).unwrap();
    let uap = dir.join(name);
    if !uap.is_file() {
        let o = Command::new(env!("CARGO_BIN_EXE_sfr"))
            .args(["attack", "random", "--quiet", "--holdout", "2", "--data"])
            .arg(&data)
            .arg("--eps")
            .arg(eps.to_string())
            .arg("--out")
            .arg(&uap)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    (data, uap)
}
