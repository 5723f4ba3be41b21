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
