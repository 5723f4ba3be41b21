//! The perturbation importers against the Python stack: every published perturbation under
//! `../shared/attacks` (override with `SFR_SHARED`) and a set of synthetic files covering the
//! formats' variants are read in Rust and compared, shape and every value bit for bit (as
//! `f32`), with what numpy / h5py / scipy.io give (`tools/dump_arrays.py`, run with Debian's
//! `/usr/bin/python3` or `SFR_PYTHON`). Bad input — truncated copies, random bytes, empty files,
//! corrupted headers, missing datasets — must give errors, never panics.
//!
//! Missing material is reported as `SKIPPED: …` on stderr, except under CI (`CI=true`), where
//! it fails.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use sfr::perturbation::import::{ImportError, RawArray, read_any, read_h5, read_mat, read_npy};

const EXTS: [&str; 4] = ["npy", "mat", "h5", "hdf5"];

// ---------------------------------------------------------------- support

/// `../shared/attacks` (or `$SFR_SHARED/attacks`), if present.
fn attacks_dir() -> Option<PathBuf> {
    let p = common::shared_dir()?.join("attacks");
    if p.is_dir() {
        Some(p)
    } else {
        common::skip(&format!(
            "published perturbations not found at {} (set SFR_SHARED)",
            p.display()
        ))
    }
}

/// A Python with numpy, h5py and scipy.
fn python() -> Option<String> {
    common::python_with(
        "numpy, h5py, scipy.io",
        "python3-numpy python3-h5py python3-scipy",
    )
}

fn scratch(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("import-formats")
        .join(name);
    std::fs::create_dir_all(&p).expect("create test scratch dir");
    p
}

/// Run `tools/dump_arrays.py` into a fresh folder; returns it.
fn run_dump(name: &str, args: &[&std::ffi::OsStr]) -> Option<PathBuf> {
    let py = python()?;
    let out = scratch(name);
    let _ = std::fs::remove_dir_all(&out);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/dump_arrays.py");
    let status = Command::new(&py)
        .arg(&script)
        .arg("--out")
        .arg(&out)
        .args(args)
        .status()
        .expect("run tools/dump_arrays.py");
    assert!(status.success(), "tools/dump_arrays.py failed: {status}");
    Some(out)
}

/// Reference dump of every published file.
fn published_dump() -> Option<&'static (PathBuf, PathBuf)> {
    static DUMP: OnceLock<Option<(PathBuf, PathBuf)>> = OnceLock::new();
    DUMP.get_or_init(|| {
        let root = attacks_dir()?;
        let out = run_dump("published", &["--root".as_ref(), root.as_os_str()])?;
        Some((root, out))
    })
    .as_ref()
}

/// Synthetic fixtures and their reference dump.
fn fixtures_dump() -> Option<&'static PathBuf> {
    static DUMP: OnceLock<Option<PathBuf>> = OnceLock::new();
    DUMP.get_or_init(|| run_dump("fixtures", &["--fixtures".as_ref()]))
        .as_ref()
}

struct Entry {
    file: PathBuf,
    reader: String,
    arg: Option<String>,
    expect: Expect,
}

enum Expect {
    Array { shape: Vec<usize>, raw: PathBuf },
    Error(String),
}

fn manifest(dir: &Path) -> Vec<Entry> {
    let text = std::fs::read_to_string(dir.join("manifest.json")).expect("read manifest.json");
    let json: serde_json::Value = serde_json::from_str(&text).expect("parse manifest.json");
    let s = |e: &serde_json::Value, k: &str| e[k].as_str().map(str::to_string);
    json.as_array()
        .expect("manifest is a list")
        .iter()
        .map(|e| Entry {
            file: PathBuf::from(s(e, "file").expect("file")),
            reader: s(e, "reader").expect("reader"),
            arg: s(e, "arg"),
            expect: match s(e, "error") {
                Some(v) => Expect::Error(v),
                None => Expect::Array {
                    shape: e["shape"]
                        .as_array()
                        .expect("shape")
                        .iter()
                        .map(|d| d.as_u64().expect("dim") as usize)
                        .collect(),
                    raw: dir.join(s(e, "raw").expect("raw")),
                },
            },
        })
        .collect()
}

fn call(reader: &str, file: &Path, arg: Option<&str>) -> Result<RawArray, ImportError> {
    match reader {
        "any" => read_any(file),
        "npy" => read_npy(file),
        "mat" => read_mat(file, arg),
        "h5" => read_h5(file, arg.unwrap_or("v")),
        other => panic!("unknown reader {other} in manifest"),
    }
}

fn variant(e: &ImportError) -> &'static str {
    match e {
        ImportError::Io { .. } => "Io",
        ImportError::BadMagic { .. } => "BadMagic",
        ImportError::Truncated { .. } => "Truncated",
        ImportError::Malformed { .. } => "Malformed",
        ImportError::Unsupported { .. } => "Unsupported",
        ImportError::MatV73 { .. } => "MatV73",
        ImportError::NoSuchArray { .. } => "NoSuchArray",
        ImportError::Hdf5 { .. } => "Hdf5",
        ImportError::UnknownExtension { .. } => "UnknownExtension",
    }
}

/// Compare bit for bit (any NaN equals any NaN); returns the number of values.
fn assert_same(what: &str, got: &RawArray, shape: &[usize], raw: &Path) -> usize {
    let bytes = std::fs::read(raw).expect("read reference values");
    let want: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(got.shape, shape, "{what}: shape");
    assert_eq!(got.data.len(), want.len(), "{what}: element count");
    let bad: Vec<usize> = (0..want.len())
        .filter(|&i| {
            let (a, b) = (got.data[i], want[i]);
            a.to_bits() != b.to_bits() && !(a.is_nan() && b.is_nan())
        })
        .collect();
    assert!(
        bad.is_empty(),
        "{what}: {} of {} values differ, first at {}: got {} want {}",
        bad.len(),
        want.len(),
        bad[0],
        got.data[bad[0]],
        want[bad[0]]
    );
    want.len()
}

fn files_under(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read dir") {
            let p = entry.expect("dir entry").path();
            if p.is_dir() {
                stack.push(p);
            } else if p
                .extension()
                .is_some_and(|e| EXTS.contains(&e.to_string_lossy().to_ascii_lowercase().as_str()))
            {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Files to abuse: the first published file of each format, and the synthetic ones.
fn victims() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some((root, _)) = published_dump() {
        for ext in ["npy", "mat", "h5"] {
            if let Some(p) = files_under(root)
                .into_iter()
                .find(|p| p.extension().is_some_and(|e| e == ext))
            {
                v.push(p);
            }
        }
    }
    if let Some(dir) = fixtures_dump() {
        v.extend(files_under(&dir.join("fixtures")));
    }
    v
}

/// Write `bytes` to a scratch file with `ext`, read it with `read_any`, remove it.
fn read_bytes(
    dir: &Path,
    stem: &str,
    ext: &str,
    bytes: &[u8],
) -> (PathBuf, Result<RawArray, ImportError>) {
    let p = dir.join(format!("{stem}.{ext}"));
    std::fs::write(&p, bytes).expect("write scratch file");
    let r = read_any(&p);
    let _ = std::fs::remove_file(&p);
    (p, r)
}

/// A deterministic pseudo-random generator (PCG-style LCG).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 16
    }
}

// ---------------------------------------------------------------- tests

#[test]
fn every_published_file_matches_python_exactly() {
    let Some((root, dump)) = published_dump() else {
        return;
    };
    let files = files_under(root);
    assert!(
        !files.is_empty(),
        "no .npy/.mat/.h5 files under {}",
        root.display()
    );
    let entries = manifest(dump);
    assert_eq!(entries.len(), files.len(), "dumped vs found files");
    let (mut values, mut by_ext) = (0usize, std::collections::BTreeMap::<String, usize>::new());
    for e in &entries {
        let Expect::Array { shape, raw } = &e.expect else {
            panic!("{}: no reference array", e.file.display());
        };
        let what = e.file.display().to_string();
        let got = read_any(&e.file).unwrap_or_else(|err| panic!("{err}"));
        values += assert_same(&what, &got, shape, raw);
        // The format's own reader, with the names the releases use, agrees.
        let ext = e
            .file
            .extension()
            .map(|x| x.to_string_lossy().to_ascii_lowercase());
        let direct = match ext.as_deref() {
            Some("npy") => read_npy(&e.file),
            Some("mat") => read_mat(&e.file, Some("r")).or_else(|_| read_mat(&e.file, None)),
            _ => read_h5(&e.file, "v"),
        }
        .unwrap_or_else(|err| panic!("{err}"));
        assert_eq!(direct, got, "{what}: format reader vs read_any");
        *by_ext.entry(ext.unwrap_or_default()).or_default() += 1;
    }
    eprintln!(
        "import: {} published files ({by_ext:?}), {values} values, all bit-identical to numpy/h5py/scipy",
        entries.len()
    );
}

#[test]
fn synthetic_variants_match_python_exactly() {
    let Some(dump) = fixtures_dump() else {
        return;
    };
    let entries = manifest(dump);
    assert!(entries.len() > 30, "too few fixtures: {}", entries.len());
    for e in &entries {
        let what = format!("{} ({} {:?})", e.file.display(), e.reader, e.arg);
        let r = call(&e.reader, &e.file, e.arg.as_deref());
        match (&e.expect, r) {
            (Expect::Array { shape, raw }, Ok(got)) => {
                assert_same(&what, &got, shape, raw);
            }
            (Expect::Array { .. }, Err(err)) => panic!("{what}: {err}"),
            (Expect::Error(v), Ok(got)) => {
                panic!("{what}: expected a {v} error, read shape {:?}", got.shape)
            }
            (Expect::Error(v), Err(err)) => {
                assert_eq!(variant(&err), v, "{what}: {err}");
                let msg = err.to_string();
                assert!(msg.starts_with(&e.file.display().to_string()), "{msg}");
                eprintln!("import: as expected: {msg}");
            }
        }
    }
}

#[test]
fn truncated_copies_are_errors() {
    let dir = scratch("truncated");
    let mut checked = 0;
    for src in victims() {
        let bytes = std::fs::read(&src).expect("read");
        let ext = src
            .extension()
            .map(|e| e.to_string_lossy().into_owned())
            .unwrap_or_default();
        let len = bytes.len();
        let mut cuts = vec![
            0, 1, 4, 6, 8, 9, 10, 12, 16, 24, 40, 64, 96, 100, 127, 128, 129, 132, 136, 200, 300,
            512, 600, 800, 1000, 1400, 2048, 2100, 4096,
        ];
        cuts.extend([
            len / 3,
            len / 2,
            len.saturating_sub(8),
            len.saturating_sub(1),
        ]);
        cuts.retain(|&c| c < len);
        cuts.dedup();
        // Published files hold one array, stored last: any cut must be noticed. A synthetic file
        // may be cut between two variables, or in bytes nothing reads (HDF5 heap free space):
        // there a cut only must not panic.
        let strict = !src.starts_with(scratch("fixtures"));
        for cut in cuts {
            let (p, r) = read_bytes(&dir, "cut", &ext, &bytes[..cut]);
            checked += 1;
            match r {
                Err(e) => {
                    let msg = e.to_string();
                    assert!(msg.starts_with(&p.display().to_string()), "{msg}");
                }
                Ok(a) if strict => panic!(
                    "{} cut to {cut} of {len} bytes read as shape {:?}",
                    src.display(),
                    a.shape
                ),
                Ok(_) => {}
            }
        }
    }
    if checked == 0 {
        common::skip::<()>("no files to truncate (neither published files nor Python fixtures)");
    } else {
        eprintln!("import: {checked} truncated copies handled");
    }
}

#[test]
fn empty_random_and_missing_inputs_are_errors() {
    let dir = scratch("random");
    let mut rng = Lcg(0x5eed);
    for ext in EXTS {
        // Empty.
        let (p, r) = read_bytes(&dir, "empty", ext, &[]);
        let e = r.expect_err("empty file read");
        assert!(
            matches!(
                e,
                ImportError::BadMagic { .. } | ImportError::Truncated { .. }
            ),
            "{e}"
        );
        assert!(e.to_string().starts_with(&p.display().to_string()), "{e}");
        // Random bytes, bare and behind each format's signature.
        let mut mat_header = b"MATLAB 5.0 MAT-file, Platform: GLNXA64".to_vec();
        mat_header.resize(116, b' ');
        mat_header.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0x00, 0x01, b'I', b'M']);
        let prefixes: [&[u8]; 4] = [b"", b"\x93NUMPY\x01\x00", b"\x89HDF\r\n\x1a\n", &mat_header];
        for prefix in prefixes {
            for size in [1usize, 7, 64, 1000, 5000] {
                let mut bytes = prefix.to_vec();
                bytes.extend((0..size).map(|_| rng.next() as u8));
                let (_, r) = read_bytes(&dir, "random", ext, &bytes);
                assert!(r.is_err(), "random {ext} of {} bytes read", bytes.len());
            }
        }
    }
    // Not there at all.
    let e = read_any(dir.join("absent.npy")).expect_err("absent file");
    assert!(matches!(e, ImportError::Io { .. }), "{e}");
    let e = read_any(dir.join("thing.png")).expect_err("unknown extension");
    assert!(matches!(e, ImportError::UnknownExtension { .. }), "{e}");
}

#[test]
fn corrupted_headers_never_panic() {
    let dir = scratch("mutated");
    let mut rng = Lcg(42);
    let mut runs = 0;
    for src in victims() {
        let bytes = std::fs::read(&src).expect("read");
        let ext = src
            .extension()
            .map(|e| e.to_string_lossy().into_owned())
            .unwrap_or_default();
        let span = bytes.len().min(4096);
        let rounds = if bytes.len() > 100_000 { 150 } else { 300 };
        for _ in 0..rounds {
            let mut b = bytes.clone();
            for _ in 0..1 + rng.next() % 4 {
                let i = (rng.next() as usize) % span;
                b[i] = rng.next() as u8;
            }
            // Ok (an unread byte changed) or Err are both fine; a panic fails the test.
            let (p, r) = read_bytes(&dir, "mut", &ext, &b);
            if let Err(e) = r {
                assert!(e.to_string().starts_with(&p.display().to_string()), "{e}");
            }
            runs += 1;
        }
    }
    if runs == 0 {
        common::skip::<()>("no files to corrupt (neither published files nor Python fixtures)");
    } else {
        eprintln!("import: {runs} corrupted copies handled without panics");
    }
}

#[test]
fn missing_dataset_and_variable_are_named() {
    let Some((root, _)) = published_dump() else {
        return;
    };
    let files = files_under(root);
    if let Some(h5) = files
        .iter()
        .find(|p| p.extension().is_some_and(|e| e == "h5"))
    {
        let e = read_h5(h5, "nope").expect_err("missing dataset");
        let msg = e.to_string();
        assert!(matches!(e, ImportError::NoSuchArray { .. }), "{msg}");
        assert!(msg.contains("\"nope\"") && msg.contains("only: v"), "{msg}");
        // An .h5 file read as the other formats.
        assert!(matches!(read_npy(h5), Err(ImportError::BadMagic { .. })));
        assert!(matches!(
            read_mat(h5, None),
            Err(ImportError::BadMagic { .. })
        ));
    }
    if let Some(mat) = files
        .iter()
        .find(|p| p.extension().is_some_and(|e| e == "mat"))
    {
        let e = read_mat(mat, Some("v")).expect_err("missing variable");
        let msg = e.to_string();
        assert!(msg.contains("\"r\" (single 224×224×3)"), "{msg}");
        assert!(matches!(
            read_h5(mat, "v"),
            Err(ImportError::BadMagic { .. })
        ));
    }
}
