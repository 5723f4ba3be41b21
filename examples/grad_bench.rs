//! Input-gradient throughput: the inner step of SGD-UAP (one perturbation shared by a batch,
//! cross-entropy against the clean prediction, gradient with respect to the perturbation).
//!
//! `cargo run --release --example grad_bench -- MODEL WEIGHTS [BATCH] [ITERS]` prints one JSON object
//! (`images_per_second` of the gradient pass, `forward_images_per_second` of the forward pass
//! alone). MODEL may be an ONNX file (WEIGHTS is then `-`).

use std::time::Instant;

use burn::tensor::{Distribution, Tensor};
use sfr::zoo::{self, NoTap};

/// Freed memory is kept for reuse (see `sfr::alloc`).
#[global_allocator]
static GLOBAL: sfr::alloc::Allocator = sfr::alloc::ALLOCATOR;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    sfr::alloc::configure();
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        return Err("usage: grad_bench MODEL WEIGHTS [BATCH] [ITERS]".into());
    }
    let batch: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(32);
    let iters: usize = args.get(4).map(|s| s.parse()).transpose()?.unwrap_or(5);
    let dev = sfr::device::default_device();
    let model = if args[1].ends_with(".onnx") {
        let pre = sfr::zoo::onnx::OnnxPreprocess::default();
        zoo::load_onnx(std::path::Path::new(&args[1]), &pre, &dev)?.0
    } else {
        zoo::load(&args[1], std::path::Path::new(&args[2]), &dev)?
    };
    let s = model.spec().input_size;
    let x: Tensor<4> = Tensor::random([batch, 3, s, s], Distribution::Uniform(0.0, 255.0), &dev);
    let adev = dev.clone().autodiff();
    let mut times = Vec::new();
    for i in 0..=iters {
        let t0 = Instant::now();
        let d: Tensor<4> = Tensor::zeros([1, 3, s, s], &adev).require_grad();
        let logits = model.forward_pixels(
            sfr::perturbation::apply(x.clone().autodiff(), d.clone(), true),
            &mut NoTap,
        );
        let labels = logits.clone().detach().argmax(1);
        let loss = burn::tensor::activation::log_softmax(logits, 1)
            .gather(1, labels)
            .neg()
            .mean();
        let grads = loss.backward();
        let g = d.grad(&grads).ok_or("no gradient")?.sign();
        let _ = g.into_data();
        if i > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    let per = times.iter().sum::<f64>() / times.len() as f64;
    let mut fwd = Vec::new();
    for i in 0..=iters {
        let t0 = Instant::now();
        let logits = model.forward_pixels(x.clone(), &mut NoTap);
        let _ = logits.into_data();
        if i > 0 {
            fwd.push(t0.elapsed().as_secs_f64());
        }
    }
    let fwd = fwd.iter().sum::<f64>() / fwd.len() as f64;
    println!(
        "{}",
        serde_json::json!({"workload": "grad", "model": args[1], "batch_size": batch, "images_per_second": batch as f64 / per, "forward_images_per_second": batch as f64 / fwd, "device": sfr::device::describe()})
    );
    Ok(())
}
