//! UAP with DeepFool on foolbox's 20 images and mobilenet_v2: DeepFool flips a label with a small
//! step, batched DeepFool equals image-by-image DeepFool, the universal perturbation respects its
//! budget, repeats from its seed, and resumes from its checkpoint.

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;

use burn::tensor::{Tensor, TensorData};
use sfr::attack::deepfool::{self, DeepFoolConfig};
use sfr::attack::{self, RunContext, argmax};
use sfr::data::Dataset;
use sfr::eval::{load_batch, logits_rows};
use sfr::perturbation::{Norm, Perturbation};
use sfr::zoo::{self, Model, NoTap};

fn model() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| {
        let w = common::fetched("mobilenet_v2");
        zoo::load("mobilenet_v2", &w, &sfr::device::default_device()).expect("load mobilenet_v2")
    })
}

fn foolbox() -> Dataset {
    let dir: PathBuf = sfr::fetch::fetch_named("foolbox-imagenet", &mut |m| eprintln!("{m}"))
        .expect("fetch foolbox images");
    Dataset::open(dir, None).expect("open foolbox images")
}

fn images(idx: &[usize]) -> Tensor<4> {
    let ds = foolbox();
    let samples: Vec<_> = idx.iter().map(|&i| ds.samples[i].clone()).collect();
    let (b, _) = load_batch(model(), &samples, true).expect("load");
    b.expect("images").pixels
}

fn vals(t: Tensor<4>) -> Vec<f32> {
    t.into_data().try_into_vec::<f32>().unwrap()
}

fn l2(v: &[f32]) -> f64 {
    v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt()
}

#[test]
fn deepfool_flips_the_label_with_a_small_step() {
    let m = model();
    let x = images(&[0]);
    let s = m.spec().input_size;
    let cfg = DeepFoolConfig::default();
    let res = deepfool::deepfool(m, &x, true, &cfg, Norm::L2).expect("deepfool");
    assert_eq!(res.r.len(), 1);
    assert!(
        res.converged[0],
        "DeepFool did not converge in {} iterations",
        cfg.max_iter
    );
    assert!(res.iterations[0] >= 1 && res.iterations[0] <= cfg.max_iter);
    assert_ne!(res.final_labels[0], res.labels[0]);
    // Check independently: x + r (clipped) has another label than x.
    let clean = argmax(&logits_rows(m.forward_pixels(x.clone(), &mut NoTap)).unwrap()[0]);
    assert_eq!(clean, res.labels[0]);
    let r = Tensor::<4>::from_data(TensorData::new(res.r[0].clone(), [1, 3, s, s]), m.device());
    let adv = argmax(
        &logits_rows(m.forward_pixels((x.clone() + r).clamp(0.0, 255.0), &mut NoTap)).unwrap()[0],
    );
    assert_ne!(adv, clean, "x + r keeps the clean label {clean}");
    assert_eq!(adv, res.final_labels[0]);
    // Minimal: far smaller than the image, and not zero.
    let nr = l2(&res.r[0]);
    let nx = l2(&vals(x));
    assert!(nr > 0.0 && nr < 0.05 * nx, "‖r‖₂ = {nr}, ‖x‖₂ = {nx}");
    // One iteration less than it needed does not flip the label (the step is not gratuitous).
    if res.iterations[0] > 1 {
        let short = DeepFoolConfig {
            max_iter: res.iterations[0] - 1,
            ..cfg
        };
        let res2 = deepfool::deepfool(m, &images(&[0]), true, &short, Norm::L2).unwrap();
        assert!(!res2.converged[0]);
        assert_eq!(res2.final_labels[0], clean);
    }
}

#[test]
fn linf_deepfool_takes_sign_steps_and_flips_the_label() {
    let m = model();
    let x = images(&[0]);
    let s = m.spec().input_size;
    let cfg = DeepFoolConfig {
        step_norm: deepfool::StepNorm::Budget,
        ..DeepFoolConfig::default()
    };
    let res = deepfool::deepfool(m, &x, true, &cfg, Norm::Linf).expect("deepfool");
    assert!(res.converged[0], "ℓ∞ DeepFool did not converge");
    // Every step is a multiple of a sign vector, so (for one iteration) every pixel moves by the
    // same amount; over several iterations the magnitudes take at most 2^iterations values.
    let r = &res.r[0];
    let mut mags: Vec<f32> = r.iter().map(|v| v.abs()).collect();
    mags.sort_by(f32::total_cmp);
    mags.dedup_by(|a, b| (*a - *b).abs() <= 1e-5 * b.max(1e-6));
    assert!(
        mags.len() <= (1 << res.iterations[0]) + 1,
        "{} distinct step magnitudes after {} iterations",
        mags.len(),
        res.iterations[0]
    );
    let linf = r.iter().fold(0f32, |a, v| a.max(v.abs()));
    assert!(linf > 0.0 && linf < 10.0, "‖r‖∞ = {linf}");
    let rt = Tensor::<4>::from_data(TensorData::new(r.clone(), [1, 3, s, s]), m.device());
    let clean = res.labels[0];
    let adv =
        argmax(&logits_rows(m.forward_pixels((x + rt).clamp(0.0, 255.0), &mut NoTap)).unwrap()[0]);
    assert_ne!(adv, clean, "x + r keeps the clean label {clean}");
    // The ℓ2 geometry (the UAP paper's DeepFool) needs a larger ℓ∞ step for the same flip.
    let l2res = deepfool::deepfool(m, &images(&[0]), true, &cfg, Norm::L2).unwrap();
    let l2inf = l2res.r[0].iter().fold(0f32, |a, v| a.max(v.abs()));
    assert!(linf < l2inf, "ℓ∞ step {linf} vs ℓ2 step's ℓ∞ {l2inf}");
}

#[test]
fn batched_deepfool_equals_image_by_image() {
    let m = model();
    let idx = [1, 2, 3];
    let cfg = DeepFoolConfig {
        candidates: 5,
        ..DeepFoolConfig::default()
    };
    let batched = deepfool::deepfool(m, &images(&idx), true, &cfg, Norm::Linf).expect("batched");
    // Several rows chunks must give the same steps too.
    let chunked =
        deepfool::deepfool_chunked(m, &images(&idx), true, &cfg, Norm::Linf, 5).expect("chunked");
    for (k, &i) in idx.iter().enumerate() {
        let one = deepfool::deepfool(m, &images(&[i]), true, &cfg, Norm::Linf).expect("single");
        for other in [&batched, &chunked] {
            assert_eq!(other.converged[k], one.converged[0], "image {i}");
            assert_eq!(other.iterations[k], one.iterations[0], "image {i}");
            assert_eq!(other.final_labels[k], one.final_labels[0], "image {i}");
            let diff: Vec<f32> = other.r[k]
                .iter()
                .zip(&one.r[0])
                .map(|(a, b)| a - b)
                .collect();
            let rel = l2(&diff) / l2(&one.r[0]).max(1e-9);
            assert!(
                rel < 1e-3,
                "image {i}: batched r differs by {rel} (relative)"
            );
        }
    }
}

fn run(
    cfg: &DeepFoolConfig,
    norm: Norm,
    eps: f64,
    seed: u64,
    ckpt: Option<PathBuf>,
    resume: bool,
) -> sfr::Result<Perturbation> {
    let ds = foolbox();
    let (train, hold) = attack::split_holdout(&ds, 4, seed).unwrap();
    let mut report = |_: &attack::Progress| {};
    let mut ctx = RunContext {
        model: model(),
        train: &train,
        holdout: &hold,
        norm,
        eps,
        seed,
        clip: true,
        batch_size: 3,
        checkpoint: ckpt,
        resume,
        checkpoint_every: sfr::attack::CHECKPOINT_EVERY,
        progress: &mut report,
        defense: None,
        filter: None,
    };
    deepfool::run(cfg, &mut ctx)
}

fn small() -> DeepFoolConfig {
    DeepFoolConfig {
        per_image: false,
        candidates: 4,
        max_passes: 1,
        max_images_per_pass: Some(4),
        ..DeepFoolConfig::default()
    }
}

#[test]
fn uap_respects_budgets_repeats_and_resumes() {
    let dir = common::scratch("deepfool");
    let ckpt = dir.join("linf.ckpt");
    let _ = std::fs::remove_file(&ckpt);
    let cfg = small();
    // Budgets small enough that the projection binds (one DeepFool step of mobilenet_v2 alone has
    // ℓ∞ ≈ 1.6 and ℓ2 ≈ 35 on these images).
    let a = run(&cfg, Norm::Linf, 1.0, 5, Some(ckpt.clone()), false).expect("linf run");
    assert!(a.linf() <= 1.0001, "ℓ∞ {} over ξ = 1", a.linf());
    assert!(
        a.linf() > 0.99,
        "the attack did not reach the budget (ℓ∞ {})",
        a.linf()
    );
    assert_eq!(a.meta.attack, "deepfool");
    assert_eq!(a.meta.params["passes_run"], 1);
    assert_eq!(a.meta.params["batch"], 3);
    assert!(a.meta.params["passes"][0]["converged"].as_u64().unwrap() >= 1);
    assert!(a.meta.fooling_rate.is_some());
    assert_eq!(a.meta.fooling_rate_n, Some(4));
    // Same seed, same perturbation.
    let b = run(&cfg, Norm::Linf, 1.0, 5, None, false).expect("linf again");
    assert_eq!(a.data, b.data, "the same seed gives the same perturbation");
    // Resuming a finished run reads the checkpoint back: no pass, the same result and history.
    assert!(ckpt.is_file(), "no checkpoint written");
    let c = run(&cfg, Norm::Linf, 1.0, 5, Some(ckpt.clone()), true).expect("resume");
    assert_eq!(a.data, c.data);
    assert_eq!(c.meta.params["passes_run"], 1);
    assert_eq!(
        c.meta.params["train_fooling_rate"],
        a.meta.params["train_fooling_rate"]
    );
    // A checkpoint of another run is refused.
    let e = run(&cfg, Norm::Linf, 1.0, 6, Some(ckpt.clone()), true);
    assert!(e.is_err(), "a checkpoint of another seed was used");

    // ℓ2: inside the ball.
    let p = run(&cfg, Norm::L2, 20.0, 5, None, false).expect("l2 run");
    assert!(p.l2() <= 20.0 * 1.0001, "ℓ2 {} over ξ = 20", p.l2());
    assert!(
        p.l2() > 19.9,
        "the attack did not reach the budget (ℓ2 {})",
        p.l2()
    );

    // The exact sequential original: one image at a time.
    let q = run(
        &DeepFoolConfig {
            per_image: true,
            ..cfg
        },
        Norm::Linf,
        1.0,
        5,
        None,
        false,
    )
    .expect("per-image run");
    assert!(
        q.linf() <= 1.0001 && q.linf() > 0.99,
        "per-image ℓ∞ {}",
        q.linf()
    );
    assert_eq!(q.meta.params["batch"], 1);
    assert_eq!(q.meta.params["per_image"], true);
}

#[test]
fn impossible_parameters_are_refused() {
    let d = DeepFoolConfig::default();
    assert_eq!(d.candidates, 10);
    assert_eq!(d.overshoot, 5.0);
    assert_eq!(d.max_iter, 10);
    assert_eq!(d.delta, 0.2);
    assert_eq!(d.max_passes, 10);
    assert!(d.per_image);
    assert_eq!(d.step_norm, deepfool::StepNorm::L2);
    let e = DeepFoolConfig::exact();
    assert_eq!((e.overshoot, e.per_image), (0.02, true));
    assert!(d.validate().is_ok());
    for bad in [
        DeepFoolConfig {
            candidates: 1,
            ..d.clone()
        },
        DeepFoolConfig {
            overshoot: -0.1,
            ..d.clone()
        },
        DeepFoolConfig {
            overshoot: f64::NAN,
            ..d.clone()
        },
        DeepFoolConfig {
            max_iter: 0,
            ..d.clone()
        },
        DeepFoolConfig {
            delta: 1.5,
            ..d.clone()
        },
        DeepFoolConfig {
            max_passes: 0,
            ..d.clone()
        },
        DeepFoolConfig {
            max_images_per_pass: Some(0),
            ..d.clone()
        },
    ] {
        let e = bad.validate().expect_err("an impossible value passed");
        assert!(e.to_string().len() > 10);
    }
    let too_many = DeepFoolConfig {
        candidates: 1001,
        ..d
    };
    let e = deepfool::deepfool(model(), &images(&[0]), true, &too_many, Norm::Linf)
        .expect_err("1001 candidates of 1000 classes");
    assert!(e.to_string().contains("1000"), "{e}");
}
