//! Bad input through the command line: a clear error (exit 1, a sentence naming the thing) or a
//! stated, visible skip — never a panic (exit 101).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn sfr(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sfr"))
        .args(args)
        .output()
        .expect("run sfr")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Exit 1 with an error that mentions every word of `needles`.
fn assert_error(o: &Output, needles: &[&str]) {
    let e = stderr(o);
    assert_eq!(
        o.status.code(),
        Some(1),
        "expected a clean error, got {:?}: {e}",
        o.status
    );
    for n in needles {
        assert!(e.contains(n), "error should mention `{n}`: {e}");
    }
    assert!(!e.contains("panicked"), "panic: {e}");
}

/// A valid 224×224 perturbation file of ones (ℓ∞ 10) at `path`.
fn flat_perturbation(path: &Path) {
    let meta =
        sfr::perturbation::PerturbationMeta::new("test", sfr::perturbation::Norm::Linf, 10.0);
    sfr::perturbation::Perturbation::new(224, 224, vec![1.0; 3 * 224 * 224], meta)
        .unwrap()
        .save(path)
        .unwrap();
}

fn dir(name: &str) -> PathBuf {
    let d = common::scratch("cli_errors").join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("mkdir");
    d
}

/// A valid 300×240 PNG with structured content.
fn write_png(path: &Path) {
    let img = image::RgbImage::from_fn(300, 240, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x * y) % 256) as u8])
    });
    img.save(path).expect("png");
}

fn mobilenet() -> String {
    common::fetched("mobilenet_v2").display().to_string()
}

#[test]
fn unknown_model_lists_the_known_ones() {
    let o = sfr(&[
        "eval",
        "--model",
        "resnet9000",
        "--weights",
        "x.pth",
        "--data",
        ".",
    ]);
    assert_error(&o, &["resnet9000", "mobilenet_v2", "efficientnet_lite0"]);
}

#[test]
fn missing_weight_file_is_named() {
    let o = sfr(&[
        "eval",
        "--model",
        "mobilenet_v2",
        "--weights",
        "/nonexistent/w.pth",
        "--data",
        ".",
    ]);
    assert_error(&o, &["/nonexistent/w.pth"]);
}

#[test]
fn weights_of_another_architecture_name_the_key() {
    let d = dir("wrongarch");
    write_png(&d.join("a.png"));
    std::fs::write(d.join("labels.csv"), "file,label\na.png,1\n").unwrap();
    let w = mobilenet();
    let o = sfr(&[
        "eval",
        "--model",
        "efficientnet_lite0",
        "--weights",
        &w,
        "--data",
        d.to_str().unwrap(),
    ]);
    assert_error(&o, &["_conv_stem.weight", "another architecture"]);
}

#[test]
fn wrong_shape_names_key_and_shapes() {
    // mobilenet_v2 weights with one tensor of the wrong shape.
    let mut map = sfr::weights::load(Path::new(&mobilenet())).expect("load");
    let t = map.remove("classifier.1.weight").expect("fc");
    map.insert(
        "classifier.1.weight",
        sfr::weights::RawTensor {
            shape: vec![10, 1280],
            data: t.data[..12800].to_vec(),
        },
    );
    let d = dir("wrongshape");
    let w = d.join("w.safetensors");
    sfr::weights::save_safetensors(&map, &Default::default(), &w).expect("save");
    let o = sfr(&[
        "classify",
        "--model",
        "mobilenet_v2",
        "--weights",
        w.to_str().unwrap(),
        "x.png",
    ]);
    assert_error(&o, &["classifier.1.weight", "[10, 1280]", "[1000, 1280]"]);
}

#[test]
fn truncated_pth_is_an_error_not_a_panic() {
    let bytes = std::fs::read(mobilenet()).expect("read");
    let d = dir("truncated");
    for cut in [100, bytes.len() / 2, bytes.len() - 10] {
        let w = d.join(format!("cut{cut}.pth"));
        std::fs::write(&w, &bytes[..cut]).unwrap();
        let o = sfr(&[
            "classify",
            "--model",
            "mobilenet_v2",
            "--weights",
            w.to_str().unwrap(),
            "x.png",
        ]);
        assert_error(&o, &[w.to_str().unwrap()]);
    }
}

#[test]
fn empty_data_folder() {
    let d = dir("empty");
    let w = mobilenet();
    let o = sfr(&[
        "eval",
        "--model",
        "mobilenet_v2",
        "--weights",
        &w,
        "--data",
        d.to_str().unwrap(),
    ]);
    assert_error(&o, &[d.to_str().unwrap()]);
}

#[test]
fn label_out_of_range_names_the_row() {
    let d = dir("badlabel");
    write_png(&d.join("a.png"));
    std::fs::write(d.join("labels.csv"), "file,label\na.png,1000\n").unwrap();
    let w = mobilenet();
    let o = sfr(&[
        "eval",
        "--model",
        "mobilenet_v2",
        "--weights",
        &w,
        "--data",
        d.to_str().unwrap(),
    ]);
    assert_error(&o, &["labels.csv", "1000"]);
}

#[test]
fn missing_and_corrupt_images_are_skipped_visibly_or_fail_with_strict() {
    let d = dir("badimages");
    write_png(&d.join("good.png"));
    std::fs::write(
        d.join("corrupt.jpg"),
        b"\xff\xd8\xff\xe0 this is not a jpeg",
    )
    .unwrap();
    std::fs::write(
        d.join("labels.csv"),
        "file,label\ngood.png,1\nmissing.jpg,2\ncorrupt.jpg,3\n",
    )
    .unwrap();
    let w = mobilenet();
    let ds = d.to_str().unwrap();
    let o = sfr(&[
        "eval",
        "--model",
        "mobilenet_v2",
        "--weights",
        &w,
        "--data",
        ds,
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value =
        serde_json::from_slice(&o.stdout).expect("one JSON object on stdout");
    assert_eq!(v["n"], 1);
    let skipped = v["skipped"].as_array().expect("skipped list");
    assert_eq!(skipped.len(), 2);
    let e = stderr(&o);
    assert!(
        e.contains("missing.jpg") && e.contains("corrupt.jpg"),
        "skips are stated on stderr: {e}"
    );
    let o = sfr(&[
        "eval",
        "--model",
        "mobilenet_v2",
        "--weights",
        &w,
        "--data",
        ds,
        "--strict",
    ]);
    assert_error(&o, &["missing.jpg"]);
}

#[test]
fn classify_names_a_missing_image() {
    let w = mobilenet();
    let o = sfr(&[
        "classify",
        "--model",
        "mobilenet_v2",
        "--weights",
        &w,
        "/nonexistent/cat.jpg",
    ]);
    assert_error(&o, &["/nonexistent/cat.jpg"]);
}

#[test]
fn bad_perturbations_are_rejected() {
    let d = dir("badpert");
    write_png(&d.join("a.png"));
    std::fs::write(d.join("labels.csv"), "file,label\na.png,1\n").unwrap();
    let w = mobilenet();
    let ds = d.to_str().unwrap();
    let mk = |name: &str, size: usize, fill: f32, eps: f64| {
        let mut data = vec![fill; 3 * size * size];
        data[0] = fill;
        let meta =
            sfr::perturbation::PerturbationMeta::new("test", sfr::perturbation::Norm::Linf, eps);
        // Bypass the constructor's checks to write a bad file, as a foreign tool could.
        let p = sfr::perturbation::Perturbation {
            height: size,
            width: size,
            data,
            meta,
        };
        let path = d.join(name);
        p.save(&path).expect("save");
        path.display().to_string()
    };
    // Wrong size.
    let f = mk("small.safetensors", 200, 1.0, 10.0);
    let o = sfr(&[
        "eval",
        "--model",
        "mobilenet_v2",
        "--weights",
        &w,
        "--data",
        ds,
        "--perturbation",
        &f,
    ]);
    assert_error(&o, &["200×200", "224×224"]);
    // NaN.
    let f = mk("nan.safetensors", 224, f32::NAN, 10.0);
    let o = sfr(&[
        "eval",
        "--model",
        "mobilenet_v2",
        "--weights",
        &w,
        "--data",
        ds,
        "--perturbation",
        &f,
    ]);
    assert_error(&o, &["NaN"]);
    // Over its budget.
    let f = mk("over.safetensors", 224, 12.0, 10.0);
    let o = sfr(&[
        "eval",
        "--model",
        "mobilenet_v2",
        "--weights",
        &w,
        "--data",
        ds,
        "--perturbation",
        &f,
    ]);
    assert_error(&o, &["budget"]);
    // ξ ≤ 0 for an attack.
    let o = sfr(&[
        "attack",
        "sgd",
        "--model",
        "mobilenet_v2",
        "--weights",
        &w,
        "--data",
        ds,
        "--eps",
        "0",
        "--out",
        "x.safetensors",
    ]);
    assert_error(&o, &["--eps", "positive"]);
    let o = sfr(&[
        "attack",
        "sgd",
        "--model",
        "mobilenet_v2",
        "--weights",
        &w,
        "--data",
        ds,
        "--eps=-3",
        "--out",
        "x.safetensors",
    ]);
    assert_error(&o, &["--eps"]);
}

#[test]
fn suite_and_demo_refuse_bad_input() {
    let d = dir("suite");
    let w = mobilenet();
    // A missing defence file names it.
    let missing = d.join("nope.safetensors");
    let o = sfr(&[
        "suite",
        "--weights",
        &w,
        "--defense",
        &missing.display().to_string(),
        "--out",
        &d.join("out").display().to_string(),
    ]);
    assert_error(&o, &["nope.safetensors"]);
    // A perturbation file is not a defence.
    let p = d.join("p.safetensors");
    flat_perturbation(&p);
    let o = sfr(&[
        "suite",
        "--weights",
        &w,
        "--defense",
        &p.display().to_string(),
        "--out",
        &d.join("out").display().to_string(),
    ]);
    assert_error(&o, &["p.safetensors"]);
    // --out must be a folder.
    let file = d.join("file.txt");
    std::fs::write(&file, "x").unwrap();
    let o = sfr(&["demo", "--out", &file.display().to_string()]);
    assert_error(&o, &["file.txt", "folder"]);
    // An impossible stronger budget.
    let o = sfr(&[
        "suite",
        "--weights",
        &w,
        "--defense",
        &p.display().to_string(),
        "--stronger=-5",
        "--out",
        &d.join("out").display().to_string(),
    ]);
    assert_error(&o, &["--stronger", "-5"]);
}

#[test]
fn defend_refuses_impossible_training_parameters() {
    let d = dir("defend_params");
    write_png(&d.join("a.png"));
    write_png(&d.join("b.png"));
    std::fs::write(d.join("labels.csv"), "file,label\na.png,1\nb.png,2\n").unwrap();
    let w = mobilenet();
    let p = d.join("p.safetensors");
    flat_perturbation(&p);
    let out = d.join("d.safetensors");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "defend",
            "--weights",
            &w,
            "--data",
            d.to_str().unwrap(),
            "--uap",
            p.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        sfr(&args)
    };
    assert_error(&run(&["--crop-scale", "0"]), &["--crop-scale", "(0, 1]"]);
    assert_error(&run(&["--crop-scale", "1.5"]), &["--crop-scale", "1.5"]);
    assert_error(
        &run(&["--clean-weight", "0"]),
        &["--clean-weight", "positive"],
    );
    assert_error(
        &run(&["--keep-best", "--val", "0"]),
        &["--keep-best", "--val"],
    );
    assert_error(&run(&["--seeds", "0"]), &["--seeds", "at least 1"]);
    assert_error(
        &run(&["--seeds", "3", "--val", "0"]),
        &["--seeds", "--val > 0"],
    );
    assert_error(
        &run(&["--method", "prn", "--fraction", "0.25"]),
        &["--fraction", "--method prn"],
    );
    assert_error(
        &run(&["--method", "prn", "--val", "0", "--sites", "features.0.0"]),
        &["--sites", "PRN"],
    );
    assert_error(
        &run(&["--method", "prn", "--val", "0", "--prn-width", "0"]),
        &["--prn-width", "1..=1024"],
    );
    assert_error(
        &run(&["--method", "uat", "--selection", "random"]),
        &["--selection", "--method uat"],
    );
    assert_error(&run(&["--uat-step", "2"]), &["--uat-step", "--method uat"]);
    assert_error(
        &run(&["--method", "uat", "--uat-step", "0"]),
        &["--uat-step", "positive"],
    );
    assert_error(
        &run(&["--method", "uat", "--val", "0", "--sites", "no.such.conv"]),
        &["no.such.conv"],
    );
    assert!(!out.exists(), "nothing written on a refused run");
}

#[test]
fn targeted_attack_and_hardening_refuse_bad_input() {
    let d = dir("targeted");
    let out = d.join("t.safetensors");
    let o = sfr(&[
        "attack",
        "sgd",
        "--weights",
        &mobilenet(),
        "--target",
        "1000",
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    assert_error(&o, &["--target", "class 1000 does not exist", "0–999"]);
    let o = sfr(&[
        "attack",
        "deepfool",
        "--weights",
        &mobilenet(),
        "--target",
        "3",
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    assert_error(&o, &["--target", "sfr attack sgd"]);
    for m in ["1", "-0.5", "NaN"] {
        let o = sfr(&[
            "attack",
            "sgd",
            "--weights",
            &mobilenet(),
            &format!("--momentum={m}"),
            "--out",
            out.to_str().unwrap(),
            "--quiet",
        ]);
        assert_error(&o, &["--momentum", "[0, 1)"]);
    }
    let o = sfr(&[
        "attack",
        "fff",
        "--weights",
        &mobilenet(),
        "--no-flip",
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    assert_error(&o, &["--no-flip", "sfr attack sgd"]);
    assert!(!out.exists(), "no file for a refused run");
    for bad in ["-1", "NaN", "inf"] {
        let o = sfr(&[
            "attack",
            "sgd",
            "--weights",
            &mobilenet(),
            &format!("--checkpoint-every={bad}"),
            "--out",
            out.to_str().unwrap(),
            "--quiet",
        ]);
        assert_error(&o, &["--checkpoint-every", "seconds ≥ 0"]);
    }
    // --defense names a file or an image-domain filter.
    let o = sfr(&[
        "attack",
        "sgd",
        "--weights",
        &mobilenet(),
        "--defense",
        "jpeg101",
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    assert_error(&o, &["--defense jpeg101", "quality", "1–100"]);
    let o = sfr(&[
        "attack",
        "sgd",
        "--weights",
        &mobilenet(),
        "--defense",
        "no/such/def.safetensors",
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    assert_error(&o, &["no/such/def.safetensors", "no such file", "jpegQ"]);
    // A retraining round with no defence file.
    let uap = d.join("u.safetensors");
    flat_perturbation(&uap);
    let missing = d.join("missing_defense.safetensors");
    let o = sfr(&[
        "harden",
        "--weights",
        &mobilenet(),
        "--defense",
        missing.to_str().unwrap(),
        "--uap",
        uap.to_str().unwrap(),
        "--data",
        d.to_str().unwrap(),
        "--test",
        d.to_str().unwrap(),
        "--out-dir",
        d.join("h").to_str().unwrap(),
        "--quiet",
    ]);
    assert_error(
        &o,
        &[
            "--defense",
            "missing_defense.safetensors",
            "no such file",
            "sfr defend",
        ],
    );
    // A file that is not a defence.
    let o = sfr(&[
        "harden",
        "--weights",
        &mobilenet(),
        "--defense",
        uap.to_str().unwrap(),
        "--uap",
        uap.to_str().unwrap(),
        "--data",
        d.to_str().unwrap(),
        "--test",
        d.to_str().unwrap(),
        "--out-dir",
        d.join("h").to_str().unwrap(),
        "--quiet",
    ]);
    assert_error(&o, &["reading the defence", "u.safetensors"]);
    let o = sfr(&[
        "harden",
        "--weights",
        &mobilenet(),
        "--defense",
        uap.to_str().unwrap(),
        "--uap",
        uap.to_str().unwrap(),
        "--data",
        d.to_str().unwrap(),
        "--test",
        d.to_str().unwrap(),
        "--out-dir",
        d.join("h").to_str().unwrap(),
        "--rounds",
        "0",
        "--quiet",
    ]);
    assert_error(&o, &["--rounds"]);
}
