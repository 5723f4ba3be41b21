use burn::tensor::{Tensor, Distribution};
use sfr::zoo;
fn main() {
    let dev = sfr::device::default_device();
    let m = zoo::load("mobilenet_v2", std::path::Path::new("/tmp/mnv2.safetensors"), &dev).unwrap();
    let x: Tensor<4> = Tensor::random([32, 3, 224, 224], Distribution::Uniform(0.0, 255.0), &dev);
    for _ in 0..2 {
        let t = std::time::Instant::now();
        let y = m.forward_pixels(x.clone(), &mut zoo::NoTap);
        let _ = y.into_data();
        println!("forward 32: {:?} -> {:.1} img/s", t.elapsed(), 32.0 / t.elapsed().as_secs_f64());
    }
    let adev = dev.clone().autodiff();
    for _ in 0..2 {
        let t = std::time::Instant::now();
        let d: Tensor<4> = Tensor::zeros([1, 3, 224, 224], &adev).require_grad();
        let xa = x.clone().autodiff();
        let y = m.forward_pixels(xa + d.clone(), &mut zoo::NoTap);
        let loss = y.sum();
        let g = loss.backward();
        let gd = d.grad(&g).unwrap();
        let _ = gd.into_data();
        println!("grad 32: {:?} -> {:.1} img/s", t.elapsed(), 32.0 / t.elapsed().as_secs_f64());
    }
}
