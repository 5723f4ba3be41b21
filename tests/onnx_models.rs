//! ONNX networks outside the zoo (torchvision exports made by `tools/onnx_reference.py` with
//! Debian's CPU torch: random weights, batch-norm statistics randomised) against PyTorch: logits
//! and the first two sites, by name and value; MobileNetV2 exported with its registry weights
//! against the built-in model; bad ONNX input gets clear errors.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use burn::tensor::{Tensor, TensorData};
use sfr::zoo::onnx::OnnxPreprocess;
use sfr::zoo::{self, NoTap, Tap};

/// The exports, made once per target folder.
fn exports() -> Option<PathBuf> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| {
        let py = common::torch_python()?;
        let out = common::scratch("onnxref");
        let stamp = out.join("complete");
        if !stamp.is_file() {
            let script =
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/onnx_reference.py");
            let status = Command::new(&py)
                .arg(&script)
                .arg("--out")
                .arg(&out)
                .arg("--mobilenet-v2")
                .arg(common::fetched("mobilenet_v2"))
                .status()
                .expect("run tools/onnx_reference.py");
            assert!(status.success(), "tools/onnx_reference.py failed");
            std::fs::write(&stamp, "ok").expect("write stamp");
        }
        Some(out)
    })
    .clone()
}

/// Records every site's name and the values of the ones asked for.
struct Record {
    want: Vec<String>,
    got: HashMap<String, Vec<f32>>,
    order: Vec<String>,
}

impl Tap for Record {
    fn visit(&mut self, site: &str, x: Tensor<4>) -> Tensor<4> {
        self.order.push(site.to_string());
        if self.want.iter().any(|w| w == site) {
            let v = x.clone().into_data().try_into_vec::<f32>().unwrap();
            self.got.insert(site.to_string(), v);
        }
        x
    }
}

fn scale(v: &[f32]) -> f32 {
    v.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6)
}

fn check(arch: &str) {
    let Some(dir) = exports() else {
        return;
    };
    let dev = sfr::device::default_device();
    let (model, info) = zoo::load_onnx(
        &dir.join(format!("{arch}.onnx")),
        &OnnxPreprocess::default(),
        &dev,
    )
    .unwrap_or_else(|e| panic!("{arch}: {e}"));
    let io = sfr::weights::load(&dir.join(format!("{arch}_io.safetensors"))).expect("io");
    let meta = sfr::weights::read_safetensors_metadata(&dir.join(format!("{arch}_io.safetensors")))
        .unwrap();
    let input = io.get("input").unwrap();
    let logits = &io.get("logits").unwrap().data;
    let s = &input.shape;
    let x = || {
        Tensor::<4>::from_data(
            TensorData::new(input.data.clone(), [s[0], s[1], s[2], s[3]]),
            &dev,
        )
    };
    let fused = model
        .forward_normalized(x(), &mut NoTap)
        .into_data()
        .try_into_vec::<f32>()
        .unwrap();
    let d = common::max_abs_diff(&fused, logits) / scale(logits);
    let sites: Vec<String> = meta["sites"].split(',').map(String::from).collect();
    let mut rec = Record {
        want: sites.clone(),
        got: HashMap::new(),
        order: Vec::new(),
    };
    let unfused = model
        .forward_normalized(x(), &mut rec)
        .into_data()
        .try_into_vec::<f32>()
        .unwrap();
    let du = common::max_abs_diff(&unfused, logits) / scale(logits);
    eprintln!(
        "{arch}: {} nodes, {} sites; max |logits − torch| / max |logits| = {d:.2e} fused, {du:.2e} unfused; notes {:?}",
        info.nodes,
        model.sites().len(),
        info.notes
    );
    assert!(d < 1e-3, "{arch}: logits differ by {d:.2e} of their scale");
    assert!(du < 1e-3, "{arch}: unfused logits differ by {du:.2e}");
    assert_eq!(
        &rec.order[..2],
        &sites[..],
        "{arch}: the first two sites' names"
    );
    let declared: Vec<String> = model.sites().into_iter().map(|s| s.name).collect();
    assert_eq!(
        rec.order, declared,
        "{arch}: tap order differs from Model::sites()"
    );
    for (k, site) in sites.iter().enumerate() {
        let r = &io.get(&format!("site.{k}")).unwrap().data;
        let ds = common::max_abs_diff(&rec.got[site], r) / scale(r);
        assert!(
            ds < 1e-4,
            "{arch}: site {site} differs by {ds:.2e} of its scale"
        );
    }
}

#[test]
fn resnet34() {
    check("resnet34");
}

#[test]
fn densenet121() {
    check("densenet121");
}

#[test]
fn mobilenet_v3_large() {
    check("mobilenet_v3_large");
}

#[test]
fn shufflenet_v2_x1_0() {
    check("shufflenet_v2_x1_0");
}

#[test]
fn squeezenet1_1() {
    check("squeezenet1_1");
}

#[test]
fn regnet_x_400mf() {
    check("regnet_x_400mf");
}

#[test]
fn efficientnet_b0() {
    check("efficientnet_b0");
}

fn sfr_cmd(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sfr"))
        .args(args)
        .output()
        .expect("run sfr")
}

fn ok_json(args: &[&str]) -> serde_json::Value {
    let o = sfr_cmd(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "sfr {args:?} failed: {err}");
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("sfr {args:?}: no JSON ({e}): {err}"))
}

/// Attack, defence, evaluation with the defence, the masking ranking and the suite, end to end
/// on an ONNX model (squeezenet1_1 at 64×64: small enough for a test).
#[test]
fn the_pipeline_runs_on_an_onnx_model() {
    let (Some(dir), Some(shared)) = (exports(), common::shared_dir()) else {
        return;
    };
    let model = dir.join("squeezenet1_1.onnx").display().to_string();
    let train = shared.join("data/imagenet-sample").display().to_string();
    let test = shared.join("data/nips17").display().to_string();
    let out = common::scratch("onnx_pipeline");
    let p = out.join("p.safetensors").display().to_string();
    let d = out.join("d.safetensors").display().to_string();
    let info = ok_json(&["models", &model, "--json"]);
    assert_eq!(info["model"]["input_size"], 64);
    assert_eq!(info["sites"][0]["name"], "features.0");
    let a = ok_json(&[
        "attack",
        "sgd",
        "-q",
        "--model",
        &model,
        "--data",
        &train,
        "--limit",
        "24",
        "--holdout",
        "8",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--out",
        &p,
        "--json",
    ]);
    assert_eq!(a["model"], "squeezenet1_1");
    assert!(a["fooling_rate"].as_f64().is_some(), "{a}");
    let t = ok_json(&[
        "defend",
        "-q",
        "--model",
        &model,
        "--data",
        &train,
        "--limit",
        "24",
        "--val",
        "8",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--uap",
        &p,
        "--no-synthetic",
        "--loss",
        "logits",
        "--sites",
        "features.0,features.3.squeeze",
        "--out",
        &d,
        "--json",
    ]);
    assert!(t["training"]["seconds"].as_f64().is_some(), "{t}");
    let e = ok_json(&[
        "eval",
        "-q",
        "--model",
        &model,
        "--data",
        &test,
        "--limit",
        "16",
        "-p",
        &p,
        "--defense",
        &d,
        "--json",
    ]);
    let r = e.to_string();
    assert!(r.contains("restoration_accuracy"), "{r}");
    let rank = ok_json(&["rank", "-q", "--model", &model, "--json"]);
    assert!(rank.to_string().contains("features.0"), "{rank}");
    let s = ok_json(&[
        "suite",
        "-q",
        "--model",
        &model,
        "--defense",
        &d,
        "--data",
        &test,
        "--limit",
        "16",
        "--attack",
        &format!("seen={p}"),
        "--out",
        &out.join("suite").display().to_string(),
        "--json",
    ]);
    assert_eq!(s["model"], "squeezenet1_1");
    assert!(out.join("suite/report.md").is_file());
    // A published perturbation fitted to the graph's input size.
    let fff = shared.join("attacks/sfr-release/FFF/perturbation_caffenet_mean.npy");
    let i = ok_json(&[
        "perturbation",
        "import",
        &fff.display().to_string(),
        "--model",
        &model,
        "--out",
        &out.join("fff.safetensors").display().to_string(),
        "--json",
    ]);
    let fitted = sfr::perturbation::Perturbation::load(&out.join("fff.safetensors")).unwrap();
    assert_eq!((fitted.height, fitted.width), (64, 64), "{i}");
    // The defence belongs to this graph: another ONNX graph refuses it.
    let other = dir.join("resnet34.onnx").display().to_string();
    let o = sfr_cmd(&[
        "eval",
        "-q",
        "--model",
        &other,
        "--data",
        &test,
        "--limit",
        "4",
        "--defense",
        &d,
    ]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Files that are not ONNX, truncated ones, an unsupported operator, a dynamic input size
/// without --input-size, a graph with no Conv, preprocessing flags on a zoo model: clear errors.
#[test]
fn bad_onnx_input_gets_clear_errors() {
    let Some(dir) = exports() else {
        return;
    };
    let scratch = common::scratch("onnx_bad");
    let text = scratch.join("text.onnx");
    std::fs::write(&text, "this is not a model").unwrap();
    let whole = std::fs::read(dir.join("squeezenet1_1.onnx")).unwrap();
    let trunc = scratch.join("trunc.onnx");
    std::fs::write(&trunc, &whole[..whole.len() / 3]).unwrap();
    let empty = scratch.join("empty.onnx");
    std::fs::write(&empty, b"").unwrap();
    let cases: Vec<(String, Vec<&str>)> = vec![
        (text.display().to_string(), vec!["text.onnx", "ONNX"]),
        (trunc.display().to_string(), vec!["trunc.onnx", "ONNX"]),
        (empty.display().to_string(), vec!["empty.onnx", "empty"]),
        (
            dir.join("bad_leaky_relu.onnx").display().to_string(),
            vec!["LeakyRelu", "supported: Conv"],
        ),
        (
            dir.join("bad_dynamic_size.onnx").display().to_string(),
            vec!["dynamic", "--input-size"],
        ),
        (
            dir.join("bad_no_conv.onnx").display().to_string(),
            vec!["no Conv"],
        ),
        (
            scratch.join("missing.onnx").display().to_string(),
            vec!["missing.onnx"],
        ),
    ];
    for (file, needles) in cases {
        let o = sfr_cmd(&["models", &file]);
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{file}: {e}");
        assert!(!e.contains("panicked"), "{file}: {e}");
        for n in needles {
            assert!(e.contains(n), "{file}: the error should mention `{n}`: {e}");
        }
    }
    // The dynamic graph runs once it is given a size.
    let dynamic = dir.join("bad_dynamic_size.onnx").display().to_string();
    let o = sfr_cmd(&["models", &dynamic, "--input-size", "32"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Preprocessing flags belong to ONNX models.
    let o = sfr_cmd(&[
        "eval",
        "--model",
        "mobilenet_v2",
        "--input-size",
        "100",
        "--data",
        "nowhere",
    ]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("ONNX"), "{e}");
    // Bad means.
    let sq = dir.join("squeezenet1_1.onnx").display().to_string();
    let o = sfr_cmd(&["models", &sq, "--mean", "1,2"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--mean"));
}

/// MobileNetV2 exported with its registry weights gives the built-in model's nips17 accuracy.
#[test]
fn mobilenet_v2_exported_matches_the_built_in_accuracy() {
    let (Some(dir), Some(shared)) = (exports(), common::shared_dir()) else {
        return;
    };
    let model = dir.join("mobilenet_v2_registry.onnx").display().to_string();
    let data = shared.join("data/nips17").display().to_string();
    let a = ok_json(&["eval", "-q", "--model", &model, "--data", &data, "--json"]);
    let b = ok_json(&[
        "eval",
        "-q",
        "--model",
        "mobilenet_v2",
        "--data",
        &data,
        "--json",
    ]);
    eprintln!(
        "nips17 top-1/top-5: ONNX {}/{}, built-in {}/{}",
        a["clean_top1"], a["clean_top5"], b["clean_top1"], b["clean_top5"]
    );
    assert_eq!(a["clean_top1"], b["clean_top1"]);
    assert_eq!(a["clean_top5"], b["clean_top5"]);
}
