//! Accuracy of the registry weights on the shared ImageNet images, against the PyTorch reference
//! (`../shared/reference/accuracy.json`): top-1 within 1 point. Weights come through `sfr fetch`.

mod common;

use sfr::data::Dataset;
use sfr::eval::{self, EvalOptions};
use sfr::zoo;

fn check(model_name: &str, data: &str) {
    let Some(shared) = common::shared_dir() else {
        return;
    };
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(shared.join("reference/accuracy.json")).expect("accuracy.json"),
    )
    .expect("json");
    let weights = common::fetched(model_name);
    let model = zoo::load(model_name, &weights, &sfr::device::default_device()).expect("load");
    let ds = Dataset::open(shared.join("data").join(data), None).expect("data");
    let r = eval::evaluate(
        &model,
        &ds,
        &[],
        None,
        &EvalOptions::default(),
        &mut |_, _| {},
    )
    .expect("eval");
    let want = find(&reference, model_name, data, "top1");
    let want5 = find(&reference, model_name, data, "top5");
    eprintln!(
        "{model_name} on {data}: top-1 {:.4} (torch {want:.4}), top-5 {:.4} (torch {want5:.4}), n {}, {:.1} images/s",
        r.clean_top1, r.clean_top5, r.n, r.images_per_second
    );
    assert_eq!(r.n, 1000);
    assert!(r.skipped.is_empty());
    assert!(
        (r.clean_top1 - want).abs() <= 0.01,
        "top-1 {} vs PyTorch {want}",
        r.clean_top1
    );
    assert!(
        (r.clean_top5 - want5).abs() <= 0.01,
        "top-5 {} vs PyTorch {want5}",
        r.clean_top5
    );
}

/// `metric` of `model` on `data` in accuracy.json (keys `model/data`).
fn find(v: &serde_json::Value, model: &str, data: &str, metric: &str) -> f64 {
    v[format!("{model}/{data}")][metric]
        .as_f64()
        .unwrap_or_else(|| panic!("accuracy.json lacks {model}/{data} {metric}"))
}

#[test]
fn mobilenet_v2_nips17() {
    check("mobilenet_v2", "nips17");
}

#[test]
fn mobilenet_v2_imagenet_sample() {
    check("mobilenet_v2", "imagenet-sample");
}

#[test]
fn efficientnet_lite0_nips17() {
    check("efficientnet_lite0", "nips17");
}

#[test]
fn efficientnet_lite0_imagenet_sample() {
    check("efficientnet_lite0", "imagenet-sample");
}
