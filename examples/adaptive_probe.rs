//! Why an attack through the defence does (not) optimise: the input gradient of SGD-UAP's loss
//! with and without the FRUs, at several perturbations.
//!
//! `cargo run --release --example adaptive_probe -- MODEL DEFENCE DATA N [UAP…]` loads the first
//! N images of DATA and, at δ = 0, at random ±ξ signs and at each UAP given, prints one JSON line
//! per (δ, network): the loss (clamped cross-entropy against that network's clean predictions,
//! β = 10, and unclamped), the fraction of images whose cross-entropy is at the clamp (they give
//! no gradient), the fraction already fooled, ‖∇δ‖₂, the share of exactly-zero gradient entries,
//! the cosine between the defended and the bare gradient (and the agreement of their signs),
//! and a central finite-difference check of the defended gradient along its own sign direction
//! (h = 0.25 on the 0–255 scale): a gradient that masks or lies shows up as a ratio far from 1.

use std::path::Path;

use burn::tensor::{Distribution, Tensor, TensorData};
use serde_json::json;
use sfr::classifier::{Classifier, argmax, label_tensor, load_batch, logits_rows};
use sfr::data::Dataset;
use sfr::defense::Defense;
use sfr::perturbation::{self, Perturbation};
use sfr::zoo;

#[global_allocator]
static GLOBAL: sfr::alloc::Allocator = sfr::alloc::ALLOCATOR;

const BETA: f64 = 10.0;

struct Eval {
    clamped: f64,
    ce: f64,
    at_clamp: f64,
    fooled: f64,
    grad: Vec<f32>,
}

fn eval(c: &Classifier, x: &Tensor<4>, labels: &[usize], delta: &[f32], s: usize) -> Eval {
    let adev = c.model.device().clone().autodiff();
    let d: Tensor<4> =
        Tensor::from_data(TensorData::new(delta.to_vec(), [1, 3, s, s]), &adev).require_grad();
    let logits = c.logits_grad(perturbation::apply(x.clone().autodiff(), d.clone(), true));
    let rows = logits_rows(logits.clone().detach().inner()).unwrap();
    let fooled = rows
        .iter()
        .zip(labels)
        .filter(|(r, l)| argmax(r) != **l)
        .count() as f64
        / labels.len() as f64;
    let ce = burn::tensor::activation::log_softmax(logits, 1)
        .gather(1, label_tensor(labels, &adev))
        .neg();
    let cev: Vec<f32> = ce
        .clone()
        .detach()
        .inner()
        .into_data()
        .try_into_vec()
        .unwrap();
    let loss = ce.clamp_max(BETA).mean();
    let grads = loss.clone().backward();
    let g: Vec<f32> = d.grad(&grads).unwrap().into_data().try_into_vec().unwrap();
    let n = cev.len() as f64;
    Eval {
        clamped: loss.into_scalar::<f32>() as f64,
        ce: cev.iter().map(|v| *v as f64).sum::<f64>() / n,
        at_clamp: cev.iter().filter(|v| **v as f64 >= BETA).count() as f64 / n,
        fooled,
        grad: g,
    }
}

fn norm(v: &[f32]) -> f64 {
    v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    sfr::alloc::configure();
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 5 {
        return Err("usage: adaptive_probe MODEL DEFENCE DATA N [UAP…]".into());
    }
    let dev = sfr::device::default_device();
    let weights = sfr::fetch::fetch_named(&a[1], &mut |_| {})?;
    let model = zoo::load(&a[1], &weights, &dev)?;
    let defense = Defense::load(Path::new(&a[2]), &model, &dev)?;
    let ds = Dataset::open(std::path::PathBuf::from(&a[3]), None)?;
    let n: usize = a[4].parse()?;
    let (b, _) = load_batch(&model, &ds.samples[..n.min(ds.samples.len())], true)?;
    let x = b.ok_or("no images")?.pixels;
    let s = model.spec().input_size;
    let plain = Classifier::plain(&model);
    let defended = Classifier::defended(&model, &defense)?;
    let pred = |c: &Classifier| -> Vec<usize> {
        logits_rows(c.logits(x.clone()))
            .unwrap()
            .iter()
            .map(|r| argmax(r))
            .collect()
    };
    let (lp, ld) = (pred(&plain), pred(&defended));
    let eps = 10.0f32;
    let mut deltas: Vec<(String, Vec<f32>)> = vec![("zero".into(), vec![0.0; 3 * s * s])];
    let r: Tensor<4> = Tensor::random([1, 3, s, s], Distribution::Uniform(-1.0, 1.0), &dev);
    deltas.push((
        "random_sign".into(),
        r.sign()
            .mul_scalar(eps)
            .into_data()
            .try_into_vec::<f32>()
            .unwrap(),
    ));
    for p in &a[5..] {
        let u = Perturbation::load(Path::new(p))?;
        deltas.push((p.clone(), u.data.clone()));
    }
    for (name, delta) in &deltas {
        let ep = eval(&plain, &x, &lp, delta, s);
        let ed = eval(&defended, &x, &ld, delta, s);
        let dot: f64 = ep
            .grad
            .iter()
            .zip(&ed.grad)
            .map(|(a, b)| *a as f64 * *b as f64)
            .sum();
        let cos = dot / (norm(&ep.grad) * norm(&ed.grad)).max(1e-30);
        let sign_agree = ep
            .grad
            .iter()
            .zip(&ed.grad)
            .filter(|(a, b)| a.signum() == b.signum())
            .count() as f64
            / ep.grad.len() as f64;
        // Finite difference of the defended loss along u = sign(g)/‖sign(g)‖.
        let h = 0.25f32;
        let sg: Vec<f32> = ed.grad.iter().map(|v| v.signum()).collect();
        let un = norm(&sg) as f32;
        let shift = |k: f32| -> Vec<f32> {
            delta
                .iter()
                .zip(&sg)
                .map(|(d, u)| d + k * h * u / un)
                .collect()
        };
        let lplus = eval(&defended, &x, &ld, &shift(1.0), s).clamped;
        let lminus = eval(&defended, &x, &ld, &shift(-1.0), s).clamped;
        let fd = (lplus - lminus) / (2.0 * h as f64);
        let analytic = ed
            .grad
            .iter()
            .zip(&sg)
            .map(|(g, u)| *g as f64 * *u as f64)
            .sum::<f64>()
            / un as f64;
        let zeros = |g: &[f32]| g.iter().filter(|v| **v == 0.0).count() as f64 / g.len() as f64;
        for (net, e) in [("bare", &ep), ("defended", &ed)] {
            println!(
                "{}",
                json!({
                    "delta": name, "network": net, "images": lp.len(),
                    "loss_clamped": e.clamped, "ce": e.ce, "at_clamp": e.at_clamp,
                    "fooled": e.fooled, "grad_l2": norm(&e.grad), "grad_zero_share": zeros(&e.grad),
                })
            );
        }
        println!(
            "{}",
            json!({
                "delta": name, "cosine_defended_vs_bare": cos, "sign_agreement": sign_agree,
                "defended_fd_along_sign": fd, "defended_analytic_along_sign": analytic,
                "fd_over_analytic": fd / analytic,
            })
        );
    }
    Ok(())
}
