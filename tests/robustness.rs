//! Nothing lost, nothing crashes: a full disk while `sfr defend` writes its checkpoint leaves the
//! previous checkpoint intact; files whose headers claim ~10^11 elements are refused without
//! allocating them (the child's peak RSS is measured); `sfr defend`, `sfr attack sgd` and `sfr
//! attack deepfool`, each killed at ≥ 10 random moments and resumed each time, end bit-identical
//! to an uninterrupted run.

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn sfr() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sfr"))
}

/// Run `cmd` with a file-size limit of `limit` bytes (RLIMIT_FSIZE, as `ulimit -f` sets it).
fn output_with_fsize_limit(cmd: &mut Command, limit: u64) -> Output {
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let r = libc::rlimit {
                rlim_cur: limit as libc::rlim_t,
                rlim_max: limit as libc::rlim_t,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.output().expect("spawn sfr")
}

fn defend_args(data: &Path, uap: &Path, out: &Path, epochs: usize, resume: bool) -> Vec<String> {
    let mut v: Vec<String> = [
        "defend",
        "--quiet",
        "--batch-size",
        "4",
        "--val",
        "2",
        "--seed",
        "3",
        "--epochs",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push(epochs.to_string());
    for (k, p) in [("--data", data), ("--uap", uap), ("--out", out)] {
        v.push(k.into());
        v.push(p.display().to_string());
    }
    if resume {
        v.push("--resume".into());
    }
    v
}

fn ckpt_of(out: &Path) -> PathBuf {
    let mut p = out.as_os_str().to_owned();
    p.push(".ckpt");
    p.into()
}

fn epochs_done(path: &Path) -> u64 {
    let meta = sfr::weights::read_safetensors_metadata(path).unwrap();
    let m: serde_json::Value = serde_json::from_str(&meta["sfr_defense"]).unwrap();
    m["training"]["epochs_done"].as_u64().unwrap()
}

/// Start `sfr defend` and SIGKILL it once its first checkpoint is on disk.
fn run_until_first_checkpoint(args: &[String], ckpt: &Path) {
    let mut child = sfr()
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !ckpt.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "no checkpoint appeared"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "sfr defend ended before its first checkpoint"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap();
    let _ = child.wait();
}

#[test]
fn full_disk_while_defend_writes_its_checkpoint_leaves_the_previous_one() {
    let dir = common::scratch("robust_fsize");
    let (data, uap) = common::foolbox_and_random_uap(&dir);
    let out = dir.join("d.safetensors");
    let ckpt = ckpt_of(&out);
    let _ = std::fs::remove_file(&out);
    let _ = std::fs::remove_file(&ckpt);
    let epochs = 4;
    run_until_first_checkpoint(&defend_args(&data, &uap, &out, epochs, false), &ckpt);
    let before = std::fs::read(&ckpt).unwrap();
    let done = epochs_done(&ckpt);
    assert!((1..epochs as u64).contains(&done), "{done} epochs done");

    // Resume under a 16 KiB file-size limit: the next checkpoint cannot be written.
    let o = output_with_fsize_limit(
        sfr().args(defend_args(&data, &uap, &out, epochs, true)),
        16 << 10,
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "a clean failure: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.contains(&format!("writing {}", ckpt.display())),
        "the error names the checkpoint: {stderr}"
    );
    assert!(
        stderr.contains("File too large") && stderr.contains("the previous file is intact"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(&ckpt).unwrap(),
        before,
        "the previous checkpoint is byte-identical"
    );
    assert!(!out.exists(), "no output was written");
    let left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(left.is_empty(), "temporary files left behind: {left:?}");

    // The previous checkpoint still loads, and a resume without the limit finishes from it.
    let w = common::fetched("mobilenet_v2");
    let model = sfr::zoo::load("mobilenet_v2", &w, &sfr::device::default_device()).unwrap();
    sfr::defense::Defense::load(&ckpt, &model, model.device()).expect("the checkpoint loads");
    let o = sfr()
        .args(defend_args(&data, &uap, &out, epochs, true))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(epochs_done(&out), epochs as u64);
    assert!(!ckpt.exists());
}

// ------------------------------------------------------------ declared-size bombs

/// 10^11, the element count every bomb claims (400 GB of `f32`).
const CLAIM: u64 = 100_000_000_000;
/// Peak resident memory a refused bomb may cost the child, in KiB (ru_maxrss's unit).
const RSS_LIMIT_KIB: i64 = 100 * 1024;

struct Measured {
    code: Option<i32>,
    stderr: String,
    max_rss_kib: i64,
}

/// Run `sfr ARGS` and measure its peak resident memory (`wait4`'s rusage of that child).
#[allow(clippy::zombie_processes)] // reaped by wait4, which std cannot do with rusage
fn run_measured(args: &[&std::ffi::OsStr]) -> Measured {
    use std::io::Read;
    let mut child = sfr()
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sfr");
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: plain FFI calls on a child of this process that nothing else waits for.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    assert_eq!(r, pid, "wait4: {}", std::io::Error::last_os_error());
    let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
    if libc::WIFSIGNALED(status) {
        panic!(
            "sfr {args:?} died of signal {}: {stderr}",
            libc::WTERMSIG(status)
        );
    }
    Measured {
        code,
        stderr,
        max_rss_kib: ru.ru_maxrss,
    }
}

/// Check that `sfr ARGS` (which reads `file`) refuses it with exit status 1, an error naming
/// the file and each of `claims`, no panic, and a peak RSS under [`RSS_LIMIT_KIB`].
fn assert_refused(what: &str, file: &Path, args: &[&std::ffi::OsStr], claims: &[&str]) -> i64 {
    let m = run_measured(args);
    assert_eq!(m.code, Some(1), "{what}: exit status; stderr: {}", m.stderr);
    assert!(!m.stderr.contains("panicked"), "{what}: {}", m.stderr);
    assert!(
        m.stderr.contains(&file.display().to_string()),
        "{what}: the error names the file: {}",
        m.stderr
    );
    for c in claims {
        assert!(
            m.stderr.contains(c),
            "{what}: the error states the claim {c:?}: {}",
            m.stderr
        );
    }
    assert!(
        m.max_rss_kib < RSS_LIMIT_KIB,
        "{what}: peak RSS {} KiB, limit {RSS_LIMIT_KIB} KiB",
        m.max_rss_kib
    );
    eprintln!(
        "{what}: refused, peak RSS {:.1} MiB: {}",
        m.max_rss_kib as f64 / 1024.0,
        m.stderr.trim()
    );
    m.max_rss_kib
}

fn npy_bomb() -> Vec<u8> {
    let mut h =
        "{'descr': '<f4', 'fortran_order': False, 'shape': (100000, 100000, 10), }".to_string();
    while !(10 + h.len() + 1).is_multiple_of(64) {
        h.push(' ');
    }
    h.push('\n');
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend((h.len() as u16).to_le_bytes());
    b.extend(h.as_bytes());
    b.extend([0u8; 16]);
    b
}

/// A MATLAB v5 element: tag (type, size) and data padded to 8 bytes.
fn mat_element(ty: u32, data: &[u8]) -> Vec<u8> {
    let mut v = ty.to_le_bytes().to_vec();
    v.extend((data.len() as u32).to_le_bytes());
    v.extend(data);
    while !v.len().is_multiple_of(8) {
        v.push(0);
    }
    v
}

/// A single-precision 316228×316228 matrix `v` (10^11 elements) holding four values.
fn mat_bomb(compressed: bool) -> Vec<u8> {
    let mut header = b"MATLAB 5.0 MAT-file, written by sfr's tests".to_vec();
    header.resize(116, b' ');
    header.extend([0u8; 8]);
    header.extend(0x0100u16.to_le_bytes());
    header.extend(b"IM");
    let mut m = Vec::new();
    m.extend(mat_element(6, &[7, 0, 0, 0, 0, 0, 0, 0])); // array flags: mxSINGLE_CLASS
    let mut dims = 316_228i32.to_le_bytes().to_vec();
    dims.extend(316_228i32.to_le_bytes());
    m.extend(mat_element(5, &dims)); // miINT32 dimensions
    m.extend(mat_element(1, b"v")); // miINT8 name
    m.extend(mat_element(7, &[0u8; 16])); // miSINGLE real part
    let matrix = mat_element(14, &m);
    let mut b = header;
    if compressed {
        use std::io::Write;
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(&matrix).unwrap();
        b.extend(mat_element(15, &z.finish().unwrap()));
    } else {
        b.extend(matrix);
    }
    b
}

/// A safetensors file whose one tensor `name` claims `shape` over 16 bytes of data.
fn safetensors_bomb(name: &str, shape: &[u64], metadata: serde_json::Value) -> Vec<u8> {
    let n: u64 = shape.iter().product();
    let header = serde_json::json!({
        "__metadata__": metadata,
        name: {"dtype": "F32", "shape": shape, "data_offsets": [0, n * 4]},
    })
    .to_string();
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend(header.as_bytes());
    b.extend([0u8; 16]);
    b
}

/// A safetensors file rewritten: `edit` changes its JSON header, the data stays.
fn rewrite_safetensors(bytes: &[u8], edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let h = header.to_string();
    let mut b = (h.len() as u64).to_le_bytes().to_vec();
    b.extend(h.as_bytes());
    b.extend(&bytes[8 + n..]);
    b
}

// Pickle opcodes, as the unpickler reads them (protocol 2).
fn p_str(s: &str) -> Vec<u8> {
    let mut v = vec![b'X'];
    v.extend((s.len() as u32).to_le_bytes());
    v.extend(s.as_bytes());
    v
}
fn p_global(module: &str, name: &str) -> Vec<u8> {
    format!("c{module}\n{name}\n").into_bytes()
}
/// LONG1 of a non-negative integer below 2^39.
fn p_long(n: u64) -> Vec<u8> {
    let mut v = vec![0x8a, 5];
    v.extend(&n.to_le_bytes()[..5]);
    v
}

/// `{"w": _rebuild_tensor_v2(storage('0', FloatStorage, numel=CLAIM), 0, (CLAIM,), (1,))}`.
fn state_dict_pickle() -> Vec<u8> {
    let mut p = b"\x80\x02}".to_vec();
    p.extend(p_str("w"));
    p.extend(p_global("torch._utils", "_rebuild_tensor_v2"));
    p.extend(b"((");
    p.extend(p_str("storage"));
    p.extend(p_global("torch", "FloatStorage"));
    p.extend(p_str("0"));
    p.extend(p_str("cpu"));
    p.extend(p_long(CLAIM));
    p.extend(b"tQK\x00");
    p.extend(p_long(CLAIM));
    p.extend(b"\x85K\x01\x85\x89");
    p.extend(p_global("collections", "OrderedDict"));
    p.extend(b")RtRs.");
    p
}

/// A legacy (pre-1.6) torch.save file around `main` (its storage '0' holding 16 bytes and
/// declaring `count` elements).
fn legacy_pth(main: &[u8], count: u64) -> Vec<u8> {
    let mut b = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.".to_vec();
    b.extend(b"\x80\x02M\xe9\x03.");
    b.extend(b"\x80\x02}.");
    b.extend(main);
    b.extend(b"\x80\x02]");
    b.extend(p_str("0"));
    b.extend(b"a.");
    b.extend(count.to_le_bytes());
    b.extend([0u8; 16]);
    b
}

/// A torch >= 1.6 zip checkpoint with `pickle` as its data.pkl and 16 bytes of storage '0'.
fn zip_pth(pickle: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let o =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    z.start_file("archive/data.pkl", o).unwrap();
    z.write_all(pickle).unwrap();
    z.start_file("archive/data/0", o).unwrap();
    z.write_all(&[0u8; 16]).unwrap();
    z.start_file("archive/version", o).unwrap();
    z.write_all(b"3\n").unwrap();
    z.finish().unwrap().into_inner()
}

fn os(s: &str) -> &std::ffi::OsStr {
    std::ffi::OsStr::new(s)
}

#[test]
fn perturbation_files_claiming_1e11_elements_are_refused_without_allocating() {
    let dir = common::scratch("robust_bombs");
    let out = dir.join("imported.safetensors");
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut cases: Vec<(&str, PathBuf, Vec<&str>)> = Vec::new();
    let write = |name: &str, bytes: Vec<u8>| {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    cases.push((
        ".npy",
        write("bomb.npy", npy_bomb()),
        vec!["[100000, 100000, 10]"],
    ));
    cases.push((".mat", write("bomb.mat", mat_bomb(false)), vec!["316228"]));
    cases.push((
        ".mat (compressed)",
        write("bomb_z.mat", mat_bomb(true)),
        vec!["316228"],
    ));
    // h5py's own files (tools: `create_dataset('v', shape=(100000, 1000000), dtype='f4')`,
    // chunked+gzip and contiguous, never written): they read as 400 GB of fill value.
    for f in ["bomb_chunked.h5", "bomb_contiguous.h5"] {
        cases.push((".h5", fixtures.join(f), vec!["[100000, 1000000]"]));
    }
    for (what, file, claims) in &cases {
        let args = [
            os("perturbation"),
            os("import"),
            file.as_os_str(),
            os("--out"),
            out.as_os_str(),
        ];
        assert_refused(what, file, &args, claims);
        assert!(!out.exists(), "{what}: nothing written");
    }
    // sfr's own perturbation format.
    let st = write(
        "bomb_uap.safetensors",
        safetensors_bomb(
            "v",
            &[3, 100_000, 333_334],
            serde_json::json!({"attack": "x"}),
        ),
    );
    assert_refused(
        "perturbation .safetensors",
        &st,
        &[os("perturbation"), os("info"), st.as_os_str()],
        &["400000800000 bytes"],
    );
}

#[test]
fn weight_and_defence_files_claiming_1e11_elements_are_refused_without_allocating() {
    let dir = common::scratch("robust_bombs");
    let data = sfr::fetch::fetch_named("foolbox-imagenet", &mut |_| {}).unwrap();
    let image = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "jpg"))
        .unwrap();
    let write = |name: &str, bytes: Vec<u8>| {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let classify = |flag: &str, file: &Path| -> Vec<std::ffi::OsString> {
        vec![
            "classify".into(),
            flag.into(),
            file.as_os_str().to_owned(),
            image.as_os_str().to_owned(),
        ]
    };
    let check = |what: &str, flag: &str, file: &Path, claims: &[&str]| {
        let args = classify(flag, file);
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        assert_refused(what, file, &args, claims)
    };
    let claim = CLAIM.to_string();

    check(
        "weights .safetensors",
        "--weights",
        &write(
            "bomb_weights.safetensors",
            safetensors_bomb("features.0.0.weight", &[CLAIM], serde_json::json!({})),
        ),
        &["400000000000 bytes"],
    );
    check(
        "legacy .pth (storage)",
        "--weights",
        &write("bomb_legacy.pth", legacy_pth(&state_dict_pickle(), CLAIM)),
        &[&claim],
    );
    check(
        "zip .pth (storage)",
        "--weights",
        &write("bomb_zip.pth", zip_pth(&state_dict_pickle())),
        &[&claim],
    );
    // Hostile pickles, as a zip checkpoint's data.pkl and as a legacy file's main pickle.
    let deep = {
        let n = 1_000_000;
        let mut p = b"\x80\x02".to_vec();
        p.extend(std::iter::repeat_n(b']', n));
        p.extend(std::iter::repeat_n(b'a', n - 1));
        p.push(b'.');
        p
    };
    let huge_memo = b"\x80\x02}r\xfe\xff\xff\xffj\xfe\xff\xff\xffj\xfd\xff\xff\xff.".to_vec();
    let huge_str = {
        let mut p = b"\x80\x02}\x8d".to_vec();
        p.extend(CLAIM.to_le_bytes());
        p.extend(b"abc");
        p
    };
    let huge_bytes = {
        let mut p = b"\x80\x02}\x8e".to_vec();
        p.extend(CLAIM.to_le_bytes());
        p.extend(b"abc");
        p
    };
    for (what, pickle, claims) in [
        // Objects live in a flat arena that nothing walks recursively, so depth itself costs
        // no stack; their number is bounded (2^19), which bounds the memory.
        ("nesting 10^6 deep", &deep, vec!["more than 524288 objects"]),
        ("memo index 4294967294", &huge_memo, vec!["4294967293"]),
        ("string of 10^11 bytes", &huge_str, vec![claim.as_str()]),
        ("bytes of 10^11 bytes", &huge_bytes, vec![claim.as_str()]),
    ] {
        let zip = write("bomb_pickle.pth", zip_pth(pickle));
        check(&format!("zip .pth: {what}"), "--weights", &zip, &claims);
        let legacy = write("bomb_pickle_legacy.pth", legacy_pth(pickle, 4));
        check(
            &format!("legacy .pth: {what}"),
            "--weights",
            &legacy,
            &claims,
        );
    }

    // Defence files: a real one, its header edited to claim 10^11 (metadata width, tensor shape).
    let w = common::fetched("mobilenet_v2");
    let model = sfr::zoo::load("mobilenet_v2", &w, &sfr::device::default_device()).unwrap();
    let d = sfr::defense::Defense::plant(&model, &Default::default(), model.device()).unwrap();
    let real = dir.join("real_defence.safetensors");
    d.save(&real).unwrap();
    let bytes = std::fs::read(&real).unwrap();
    let wide = write(
        "bomb_defence_width.safetensors",
        rewrite_safetensors(&bytes, |h| {
            let m = h["__metadata__"]["sfr_defense"].as_str().unwrap();
            let mut m: serde_json::Value = serde_json::from_str(m).unwrap();
            m["width"][0] = serde_json::json!(CLAIM);
            h["__metadata__"]["sfr_defense"] = serde_json::json!(m.to_string());
        }),
    );
    check("defence: width 10^11", "--defense", &wide, &[&claim]);
    let shaped = write(
        "bomb_defence_tensor.safetensors",
        rewrite_safetensors(&bytes, |h| {
            h["fru.0.w2"]["shape"] = serde_json::json!([CLAIM]);
        }),
    );
    check("defence: tensor of 10^11", "--defense", &shaped, &[&claim]);
}

// ------------------------------------------------------------ crashes found by fuzzing

/// A `.npy` v1.0 file of three f4 zeros whose header dict carries `extra` before 'shape'.
fn npy_with_header_extra(extra: &str) -> Vec<u8> {
    let mut h =
        format!("{{'descr': '<f4', 'fortran_order': False, {extra}'shape': (3,), }}").into_bytes();
    while (10 + h.len() + 1) % 64 != 0 {
        h.push(b' ');
    }
    h.push(b'\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((h.len() as u16).to_le_bytes());
    bytes.extend(&h);
    bytes.extend([0u8; 12]);
    bytes
}

/// Found by `fuzz/run.sh` (target npy, a libFuzzer timeout): a 276-byte `.npy` whose header
/// nests brackets 60 deep kept npyz's header parser busy for minutes (the parser is
/// exponential in the nesting). sfr now refuses it at once, naming the nesting; the same
/// header without the brackets still loads.
#[test]
fn npy_header_nested_deep_is_refused_at_once() {
    let dir = common::scratch("robust_fuzz_npy");
    let deep = dir.join("nested.npy");
    std::fs::write(&deep, npy_with_header_extra(&"[".repeat(60))).unwrap();
    let t0 = Instant::now();
    let mut child = sfr()
        .args(["perturbation", "info"])
        .arg(&deep)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            panic!("`sfr perturbation info` still parsing the nested header after 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("nested.npy") && err.contains("nested 62 levels deep"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    // Quoted brackets are text, not nesting; the header without extra brackets loads.
    let plain = dir.join("plain.npy");
    std::fs::write(&plain, npy_with_header_extra("'k[[[[[[[[[[': 1, ")).unwrap();
    let a = sfr::perturbation::import::read_any(&plain).unwrap();
    assert_eq!(a.shape, vec![3]);
}

/// Found by `fuzz/run.sh` (target h5, a panic): a 1132-byte HDF5 file whose layout message
/// declares dimensions of 2³² − 1 makes hdf5-reader 0.12.1 multiply them without an overflow
/// check. Release builds wrap and refuse the file; builds with overflow checks panicked inside
/// the decoder, and sfr now turns that into an error too. Either way: an error naming the file.
#[test]
fn h5_layout_dimensions_overflowing_are_an_error() {
    let file =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz-h5-layout-overflow.h5");
    let e = sfr::perturbation::import::read_any(&file)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("fuzz-h5-layout-overflow.h5") && e.contains("HDF5"),
        "{e}"
    );
    let o = sfr()
        .args(["perturbation", "info"])
        .arg(&file)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

// ------------------------------------------------------------ kill anywhere, resume exactly

/// A tensor's name, shape and bits.
type Bits = (String, Vec<usize>, Vec<u32>);

/// Every tensor of a safetensors file, bit for bit, and its `sfr_defense` metadata without
/// the wall-clock seconds.
fn tensors_and_training(path: &Path) -> (Vec<Bits>, serde_json::Value) {
    let t = tensor_bits(path);
    let meta = sfr::weights::read_safetensors_metadata(path).unwrap();
    let mut m: serde_json::Value = serde_json::from_str(&meta["sfr_defense"]).unwrap();
    m["training"]
        .as_object_mut()
        .unwrap()
        .remove("seconds")
        .expect("training seconds");
    (t, m)
}

/// What [`kill_anywhere`] did.
struct Kills {
    /// SIGKILLs that landed while the run was going.
    kills: usize,
    /// Of those, the starts that resumed from a checkpoint.
    resumes: usize,
    /// Each start's checkpoint state (`fresh` without one).
    resumed_from: Vec<String>,
    /// Runs taken to the end (each one compared with the uninterrupted run).
    runs: usize,
}

/// The checkpoint's modification time, if there is one.
fn written_at(ckpt: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(ckpt).and_then(|m| m.modified()).ok()
}

/// Run `args(out)` once uninterrupted to `whole`; then again to `out` with `--resume`,
/// SIGKILLed at random moments and resumed each time until it ends, and `same(whole, out)`
/// checks the result. Starts alternate between two kinds of kill: at a random moment up to a
/// unit (one `units`-th of the work) past the uninterrupted run's first checkpoint (start-up,
/// loading, working, writing), and a random fraction of a unit after this start has written a
/// checkpoint of its own (so that every other start makes progress whatever the machine's
/// pace). Runs are repeated from scratch until at least 10 kills landed, at least 3 of them
/// on a start that had resumed, and `enough` holds. `state` describes a checkpoint (its epoch
/// and position).
fn kill_anywhere(
    args: &dyn Fn(&Path) -> Vec<String>,
    whole: &Path,
    out: &Path,
    units: u32,
    state: &dyn Fn(&Path) -> String,
    enough: &dyn Fn(&Kills) -> bool,
    same: &dyn Fn(&Path, &Path),
) -> Kills {
    // One at a time: the pace measured on the uninterrupted run holds best if no other kill
    // test starts or stops beside it.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    for p in [whole, &ckpt_of(whole), out, &ckpt_of(out)] {
        let _ = std::fs::remove_file(p);
    }
    // The uninterrupted run: when its first checkpoint appears (start-up and one unit of work).
    let t0 = Instant::now();
    let mut child = sfr()
        .args(args(whole))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = None;
    while child.try_wait().unwrap().is_none() {
        if first.is_none() && ckpt_of(whole).exists() {
            first = Some(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let run_time = t0.elapsed();
    let first = first.expect("the uninterrupted run wrote checkpoints");
    let unit = (run_time - first) / units;

    let ckpt = ckpt_of(out);
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut k = Kills {
        kills: 0,
        resumes: 0,
        resumed_from: Vec::new(),
        runs: 0,
    };
    while k.runs < 6 && !(k.kills >= 10 && k.resumes >= 3 && enough(&k)) {
        for p in [out, &ckpt] {
            let _ = std::fs::remove_file(p);
        }
        let mut start = 0u64;
        loop {
            let before = written_at(&ckpt);
            let resumed = before.is_some();
            let label = if resumed {
                state(&ckpt)
            } else {
                "fresh".to_string()
            };
            let mut child = sfr()
                .args(args(out))
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let t = Instant::now();
            let deadline = if start.is_multiple_of(2) {
                // Anywhere up to a unit past the first checkpoint's time.
                let window = (first + unit).as_millis() as u64;
                Duration::from_millis(20 + next() % window.max(1))
            } else {
                // A random fraction of a unit after this start's own first checkpoint.
                let limit = run_time * 4 + Duration::from_secs(30);
                while child.try_wait().unwrap().is_none()
                    && written_at(&ckpt) == before
                    && t.elapsed() < limit
                {
                    std::thread::sleep(Duration::from_millis(2));
                }
                t.elapsed() + Duration::from_millis(next() % (unit.as_millis() as u64).max(1))
            };
            while child.try_wait().unwrap().is_none() && t.elapsed() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
            start += 1;
            if child.try_wait().unwrap().is_some() {
                // It ended before this kill.
                let o = child.wait_with_output().unwrap();
                assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
                break;
            }
            child.kill().unwrap();
            let _ = child.wait();
            k.kills += 1;
            k.resumes += usize::from(resumed);
            k.resumed_from.push(label);
        }
        assert!(!ckpt.exists(), "the finished run left its checkpoint");
        same(whole, out);
        k.runs += 1;
    }
    eprintln!(
        "{} kills in {} runs; each started from: {:?}; uninterrupted run {:.1} s (first \
         checkpoint at {:.2} s, {:.2} s a unit)",
        k.kills,
        k.runs,
        k.resumed_from,
        run_time.as_secs_f64(),
        first.as_secs_f64(),
        unit.as_secs_f64()
    );
    assert!(k.kills >= 10, "only {} kills landed", k.kills);
    assert!(
        k.resumes >= 3,
        "too few kills resumed from a checkpoint: {:?}",
        k.resumed_from
    );
    assert!(
        enough(&k),
        "not enough kills of the kind wanted: {:?}",
        k.resumed_from
    );
    k
}

/// Both files' tensors are equal bit for bit.
fn assert_same_tensors(a: &[Bits], b: &[Bits]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.0, y.0);
        assert_eq!(x.1, y.1, "{}", x.0);
        assert!(
            x.2 == y.2,
            "tensor {} differs from the uninterrupted run's",
            x.0
        );
    }
}

#[test]
fn defend_killed_at_random_moments_and_resumed_ends_bit_identical() {
    let dir = common::scratch("robust_kill");
    let (data, uap) = common::foolbox_and_random_uap(&dir);
    let epochs = 12;
    let (whole, out) = (
        dir.join("whole.safetensors"),
        dir.join("killed.safetensors"),
    );
    kill_anywhere(
        &|o| defend_args(&data, &uap, o, epochs, true),
        &whole,
        &out,
        epochs as u32 - 1,
        &|c| format!("{} epochs", epochs_done(c)),
        &|_| true,
        &|whole, out| {
            let (a, ma) = tensors_and_training(whole);
            let (b, mb) = tensors_and_training(out);
            assert_same_tensors(&a, &b);
            assert_eq!(
                ma["training"]["validation"], mb["training"]["validation"],
                "validation metrics"
            );
            assert_eq!(ma, mb, "metadata (but the seconds)");
        },
    );
}

/// `sfr attack METHOD` on the foolbox images, checkpointing after every batch, with `--resume`.
fn attack_args(method: &str, data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "attack",
        method,
        "--quiet",
        "--holdout",
        "2",
        "--seed",
        "5",
        "--checkpoint-every",
        "0",
        "--resume",
    ]
    .iter()
    .chain(extra)
    .map(|s| s.to_string())
    .collect();
    for (k, p) in [("--data", data), ("--out", out)] {
        v.push(k.into());
        v.push(p.display().to_string());
    }
    v
}

/// A checkpoint's epoch and position in it.
fn attack_state(c: &Path) -> String {
    let m = sfr::weights::read_safetensors_metadata(c).unwrap();
    format!("{}+{}", m["epochs_done"], m["position"])
}

/// Every tensor of a safetensors file, bit for bit, sorted by name.
fn tensor_bits(path: &Path) -> Vec<Bits> {
    let map = sfr::weights::load(path).unwrap();
    let mut t: Vec<Bits> = map
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                v.shape.clone(),
                v.data.iter().map(|x| x.to_bits()).collect(),
            )
        })
        .collect();
    t.sort();
    t
}

/// A perturbation file's values bit for bit, and its metadata with `strip` applied.
fn perturbation_bits(
    path: &Path,
    strip: impl Fn(&mut serde_json::Value),
) -> (Vec<Bits>, serde_json::Value) {
    let t = tensor_bits(path);
    let meta = sfr::weights::read_safetensors_metadata(path).unwrap();
    let mut m = serde_json::to_value(&meta).unwrap();
    for (_, v) in m.as_object_mut().unwrap().iter_mut() {
        if let Some(parsed) = v.as_str().and_then(|s| serde_json::from_str(s).ok()) {
            *v = parsed;
        }
    }
    strip(&mut m);
    (t, m)
}

/// `sfr attack METHOD EXTRA…` on the foolbox images through [`kill_anywhere`], in folder
/// `name`, each run's file compared by `same`; at least one kill must have resumed inside an
/// epoch.
fn kill_attack(name: &str, method: &str, extra: &[&str], units: u32, same: &dyn Fn(&Path, &Path)) {
    let dir = common::scratch(name);
    let data = sfr::fetch::fetch_named("foolbox-imagenet", &mut |_| {}).unwrap();
    let (whole, out) = (
        dir.join("whole.safetensors"),
        dir.join("killed.safetensors"),
    );
    let mid = |k: &Kills| {
        k.resumed_from
            .iter()
            .any(|s| !s.ends_with("+0") && s != "fresh")
    };
    kill_anywhere(
        &|o| attack_args(method, &data, o, extra),
        &whole,
        &out,
        units,
        &attack_state,
        &mid,
        same,
    );
}

#[test]
fn attack_sgd_killed_at_random_moments_and_resumed_ends_byte_identical() {
    // 18 training images in batches of 4: 5 batches an epoch, 8 epochs.
    let extra = ["--epochs", "8", "--batch-size", "4", "--random-start"];
    // Nothing in an SGD-UAP file depends on the clock: the files are equal byte for byte.
    kill_attack("robust_kill_sgd", "sgd", &extra, 40, &|whole, out| {
        assert!(
            std::fs::read(whole).unwrap() == std::fs::read(out).unwrap(),
            "the resumed run's file differs from the uninterrupted run's"
        );
    });
}

#[test]
fn attack_deepfool_killed_at_random_moments_and_resumed_ends_bit_identical() {
    // One image at a time (the default), 18 images a pass, at most 8 passes; with δ = 0 it stops
    // by the rule once a pass finds every image fooled (after 3 passes: nearly all the work is
    // in the first).
    let extra = ["--max-passes", "8", "--candidates", "3", "--delta", "0"];
    // The wall-clock seconds aside, everything is equal.
    let strip = |m: &mut serde_json::Value| {
        let p = &mut m["sfr_perturbation"]["params"];
        p.as_object_mut()
            .unwrap()
            .remove("seconds_per_pass")
            .expect("seconds_per_pass");
        for r in p["passes"].as_array_mut().unwrap() {
            r.as_object_mut()
                .unwrap()
                .remove("seconds")
                .expect("a pass's seconds");
        }
    };
    kill_attack(
        "robust_kill_deepfool",
        "deepfool",
        &extra,
        24,
        &|whole, out| {
            let (a, ma) = perturbation_bits(whole, strip);
            let (b, mb) = perturbation_bits(out, strip);
            assert_same_tensors(&a, &b);
            assert_eq!(ma, mb, "metadata (but the seconds)");
        },
    );
}
