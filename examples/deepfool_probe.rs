//! DeepFool cost: batched vs per-image, and one batched UAP pass.
//!
//! `cargo run --release --example deepfool_probe -- timing WEIGHTS DATA N [GRAD_ROWS...]`: DeepFool on
//! N images (the first N of the seed-0 shuffle, v = 0), once image by image and once batched (each
//! GRAD_ROWS: rows (image, candidate) per backward; default N); prints one JSON object per run.
//!
//! `cargo run --release --example deepfool_probe -- pass WEIGHTS DATA N [HOLDOUT] [BATCH] [per_image]`: one
//! UAP pass (batched unless `per_image`) (ℓ∞, ξ = 10) over N training images; prints the perturbation's metadata.

use std::path::Path;
use std::time::Instant;

use burn::tensor::{Tensor, TensorData};
use sfr::attack::deepfool::{self, DeepFoolConfig, DeepFoolResult};
use sfr::attack::{self, RunContext};
use sfr::data::Dataset;
use sfr::eval::load_batch;
use sfr::perturbation::Norm;
use sfr::zoo;

fn summary(name: &str, res: &DeepFoolResult, secs: f64, n: usize) -> serde_json::Value {
    let conv = res.converged.iter().filter(|c| **c).count();
    let it: f64 = res.iterations.iter().sum::<usize>() as f64 / n as f64;
    let l2: Vec<f64> = res
        .r
        .iter()
        .map(|r| r.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt())
        .collect();
    let linf: Vec<f64> = res
        .r
        .iter()
        .map(|r| r.iter().fold(0f64, |m, v| m.max(v.abs() as f64)))
        .collect();
    serde_json::json!({
        "run": name, "images": n, "seconds": secs, "seconds_per_image": secs / n as f64,
        "converged": conv, "mean_iterations": it,
        "mean_l2": l2.iter().sum::<f64>() / n as f64,
        "mean_linf": linf.iter().sum::<f64>() / n as f64,
        "threads": rayon::current_num_threads(),
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 5 {
        return Err("usage: deepfool_probe timing|pass WEIGHTS DATA N [...]".into());
    }
    let dev = sfr::device::default_device();
    let model = zoo::load("mobilenet_v2", Path::new(&a[2]), &dev)?;
    let ds = Dataset::open(&a[3], None)?;
    let n: usize = a[4].parse()?;
    let cfg = DeepFoolConfig::default();
    match a[1].as_str() {
        "timing" => {
            let order = attack::epoch_order(ds.samples.len(), 0, 0);
            let samples: Vec<_> = order[..n].iter().map(|&i| ds.samples[i].clone()).collect();
            let (b, _) = load_batch(&model, &samples, true)?;
            let x = b.ok_or("no images")?.pixels;
            let s = model.spec().input_size;
            let xs = x
                .clone()
                .into_data()
                .try_into_vec::<f32>()
                .map_err(|e| format!("{e:?}"))?;
            // Warm-up.
            let d = 3 * s * s;
            let w = Tensor::<4>::from_data(TensorData::new(xs[..d].to_vec(), [1, 3, s, s]), &dev);
            let _ = deepfool::deepfool_chunked(
                &model,
                &w,
                true,
                &DeepFoolConfig {
                    max_iter: 1,
                    ..cfg.clone()
                },
                Norm::Linf,
                9,
            )?;
            // Per image.
            let t0 = Instant::now();
            let mut per = DeepFoolResult {
                r: vec![],
                converged: vec![],
                iterations: vec![],
                labels: vec![],
                final_labels: vec![],
            };
            for i in 0..n {
                let xi = Tensor::<4>::from_data(
                    TensorData::new(xs[i * d..(i + 1) * d].to_vec(), [1, 3, s, s]),
                    &dev,
                );
                let r = deepfool::deepfool(&model, &xi, true, &cfg, Norm::Linf)?;
                per.r.extend(r.r);
                per.converged.extend(r.converged);
                per.iterations.extend(r.iterations);
                per.labels.extend(r.labels);
                per.final_labels.extend(r.final_labels);
            }
            println!(
                "{}",
                summary("per_image", &per, t0.elapsed().as_secs_f64(), n)
            );
            let rows: Vec<usize> = if a.len() > 5 {
                a[5..].iter().map(|v| v.parse()).collect::<Result<_, _>>()?
            } else {
                vec![n]
            };
            for gr in rows {
                let t0 = Instant::now();
                let res = deepfool::deepfool_chunked(&model, &x, true, &cfg, Norm::Linf, gr)?;
                let mut v = summary(
                    &format!("batched_rows_{gr}"),
                    &res,
                    t0.elapsed().as_secs_f64(),
                    n,
                );
                // Agreement with the per-image run.
                let same_conv = (0..n)
                    .filter(|&i| res.converged[i] == per.converged[i])
                    .count();
                let rel: f64 = (0..n)
                    .map(|i| {
                        let num: f64 = res.r[i]
                            .iter()
                            .zip(&per.r[i])
                            .map(|(p, q)| ((p - q) as f64).powi(2))
                            .sum();
                        let den: f64 = per.r[i].iter().map(|q| (*q as f64).powi(2)).sum();
                        (num / den.max(1e-12)).sqrt()
                    })
                    .fold(0.0, f64::max);
                v["same_converged_as_per_image"] = serde_json::json!(same_conv);
                v["max_rel_diff_r_vs_per_image"] = serde_json::json!(rel);
                println!("{v}");
            }
        }
        "pass" => {
            let holdout: usize = a.get(5).map(|v| v.parse()).transpose()?.unwrap_or(100);
            let batch: usize = a.get(6).map(|v| v.parse()).transpose()?.unwrap_or(32);
            let (train, hold) = attack::split_holdout(&ds, holdout, 0)?;
            let mut report = |p: &attack::Progress| {
                eprintln!(
                    "{} {}/{} {:?}",
                    p.phase, p.done, p.total, p.holdout_fooling_rate
                )
            };
            let mut ctx = RunContext {
                model: &model,
                train: &train,
                holdout: &hold,
                norm: Norm::Linf,
                eps: 10.0,
                seed: 0,
                clip: true,
                batch_size: batch,
                checkpoint: None,
                resume: false,
                checkpoint_every: sfr::attack::CHECKPOINT_EVERY,
                progress: &mut report,
                defense: None,
                filter: None,
            };
            let per_image = a.get(7).is_some_and(|v| v == "per_image");
            let c = DeepFoolConfig {
                max_passes: 1,
                max_images_per_pass: Some(n),
                per_image,
                ..cfg
            };
            let t0 = Instant::now();
            let p = deepfool::run(&c, &mut ctx)?;
            let mut m = serde_json::to_value(&p.meta)?;
            m["seconds_total"] = serde_json::json!(t0.elapsed().as_secs_f64());
            m["linf"] = serde_json::json!(p.linf());
            println!("{m}");
        }
        _ => return Err("first argument: timing or pass".into()),
    }
    Ok(())
}
