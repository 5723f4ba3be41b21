//! The registry weights against PyTorch on the reference images (`../shared/reference`):
//! logits from the network input (`input_nchw`) and from the 224×224 pixels (`pixels_hwc_0_255`,
//! sfr's own normalisation) must match PyTorch's `logits` to 1e-3.

mod common;

use burn::tensor::{Tensor, TensorData};
use sfr::zoo::{self, NoTap};

fn check(name: &str) {
    let Some(shared) = common::shared_dir() else {
        return;
    };
    let dev = sfr::device::default_device();
    let model = zoo::load(name, &common::fetched(name), &dev).expect("load");
    let r = sfr::weights::load(&shared.join(format!("reference/{name}_nips17_first8.safetensors")))
        .expect("reference");
    let input = r.get("input_nchw").expect("input_nchw");
    let pixels = r.get("pixels_hwc_0_255").expect("pixels");
    let logits = r.get("logits").expect("logits");
    let n = input.shape[0];
    let s = model.spec().input_size;
    assert_eq!(input.shape, vec![n, 3, s, s]);
    let x: Tensor<4> = Tensor::from_data(TensorData::new(input.data.clone(), [n, 3, s, s]), &dev);
    let y = model
        .forward_normalized(x, &mut NoTap)
        .into_data()
        .try_into_vec::<f32>()
        .unwrap();
    let d_input = common::max_abs_diff(&y, &logits.data);
    let p: Tensor<4> = Tensor::from_data(TensorData::new(pixels.data.clone(), [n, s, s, 3]), &dev);
    let y = model
        .forward_pixels(p.permute([0, 3, 1, 2]), &mut NoTap)
        .into_data()
        .try_into_vec::<f32>()
        .unwrap();
    let d_pixels = common::max_abs_diff(&y, &logits.data);
    eprintln!(
        "{name}: max |logits − torch| from input_nchw {d_input:.2e}, from pixels {d_pixels:.2e} ({n} images)"
    );
    assert!(d_input < 1e-3, "{name}: from input_nchw {d_input}");
    assert!(d_pixels < 1e-3, "{name}: from pixels {d_pixels}");
}

#[test]
fn mobilenet_v2_matches_pytorch_reference() {
    check("mobilenet_v2");
}

#[test]
fn efficientnet_lite0_matches_pytorch_reference() {
    check("efficientnet_lite0");
}
