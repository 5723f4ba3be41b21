//! The defence end to end on small real data: an untrained defence is the identity, a defence
//! file round-trips and refuses another backbone, ranking is by ℓ1 norm, and a killed
//! `sfr defend` resumes from its last epoch.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use burn::tensor::{Tensor, TensorData};
use sfr::defense::{Defense, Method, PlanOptions, Selection};
use sfr::zoo::{self, NoTap};

fn mobilenet() -> zoo::Model {
    let w = common::fetched("mobilenet_v2");
    zoo::load("mobilenet_v2", &w, &sfr::device::default_device()).expect("load")
}

fn pixels(model: &zoo::Model) -> Tensor<4> {
    let data = sfr::fetch::fetch_named("foolbox-imagenet", &mut |_| {}).unwrap();
    let ds = sfr::data::Dataset::open(&data, None).unwrap().limit(4);
    let (b, _) = sfr::eval::load_batch(model, &ds.samples, true).unwrap();
    b.unwrap().pixels
}

fn values(t: Tensor<2>) -> Vec<f32> {
    t.into_data().try_into_vec::<f32>().unwrap()
}

#[test]
fn untrained_defence_is_the_identity_and_round_trips() {
    let model = mobilenet();
    let dev = model.device().clone();
    let x = pixels(&model);
    let base = values(model.forward_pixels(x.clone(), &mut NoTap));
    let mut d = Defense::plant(&model, &PlanOptions::default(), &dev).unwrap();
    assert_eq!(d.meta.sites.len(), 6);
    let out = values(d.forward_pixels(&model, x.clone()));
    assert!(
        common::max_abs_diff(&base, &out) < 1e-4,
        "zero-initialised FRUs change nothing"
    );

    // Perturb the FRUs so the round trip is meaningful, then save and load.
    let w4 = d.frus.units[0].w4.val();
    d.frus.units[0].w4 = burn::module::Param::from_tensor(w4.ones_like().mul_scalar(0.01));
    let changed = values(d.forward_pixels(&model, x.clone()));
    assert!(
        common::max_abs_diff(&base, &changed) > 1e-4,
        "a non-zero FRU changes the output"
    );
    let path = common::scratch("defense").join("d.safetensors");
    d.save(&path).unwrap();
    let mut e = Defense::load(&path, &model, &dev).unwrap();
    let again = values(e.forward_pixels(&model, x));
    assert!(
        common::max_abs_diff(&changed, &again) < 1e-5,
        "load reproduces the saved defence"
    );
    assert_eq!(e.meta.regen, d.meta.regen);
}

#[test]
fn defence_refuses_another_backbone() {
    let model = mobilenet();
    let dev = model.device().clone();
    let d = Defense::plant(&model, &PlanOptions::default(), &dev).unwrap();
    let path = common::scratch("defense").join("other.safetensors");
    d.save(&path).unwrap();
    let lite = zoo::load(
        "efficientnet_lite0",
        &common::fetched("efficientnet_lite0"),
        &dev,
    )
    .unwrap();
    let e = Defense::load(&path, &lite, &dev).expect_err("another architecture must fail");
    assert!(e.to_string().contains("mobilenet_v2"), "{e}");
    // Same architecture, other weights.
    let mut map = sfr::weights::load(&common::fetched("mobilenet_v2")).unwrap();
    let t = map.remove("features.0.0.weight").unwrap();
    map.insert(
        "features.0.0.weight",
        sfr::weights::RawTensor {
            shape: t.shape.clone(),
            data: t.data.iter().map(|v| v * 1.01).collect(),
        },
    );
    let other = zoo::build("mobilenet_v2", map, &dev).unwrap();
    let e = Defense::load(&path, &other, &dev).expect_err("other weights must fail");
    assert!(e.to_string().contains("fingerprint"), "{e}");
}

#[test]
fn ranking_is_by_l1_norm_and_random_selection_differs() {
    let model = mobilenet();
    let r = sfr::defense::ranking::rank_site(&model, "features.0.0").unwrap();
    let w = model
        .conv("features.0.0")
        .unwrap()
        .weight
        .clone()
        .into_data()
        .try_into_vec::<f32>()
        .unwrap();
    let per = 3 * 3 * 3;
    for (j, l1) in r.l1.iter().enumerate() {
        let direct: f64 = w[j * per..(j + 1) * per]
            .iter()
            .map(|v| v.abs() as f64)
            .sum();
        assert!((direct - l1).abs() < 1e-6);
    }
    for pair in r.order.windows(2) {
        assert!(r.l1[pair[0]] >= r.l1[pair[1]]);
    }
    let dev = model.device().clone();
    let ranked = Defense::plant(&model, &PlanOptions::default(), &dev).unwrap();
    assert_eq!(ranked.meta.regen[0], r.order[..16].to_vec());
    let random = Defense::plant(
        &model,
        &PlanOptions {
            selection: Selection::Random,
            ..Default::default()
        },
        &dev,
    )
    .unwrap();
    assert_eq!(random.meta.regen[0].len(), 16);
    assert_ne!(random.meta.regen, ranked.meta.regen);
    assert!(sfr::defense::ranking::rank_site(&model, "no.such.site").is_err());
}

#[test]
fn killed_defend_resumes_losing_at_most_one_epoch() {
    let dir = common::scratch("defense_resume");
    // A training perturbation: the random control is enough to exercise the loop.
    let (data, uap) = common::foolbox_and_random_uap(&dir);
    let out: PathBuf = dir.join("d.safetensors");
    let ckpt = dir.join("d.safetensors.ckpt");
    let _ = std::fs::remove_file(&out);
    let _ = std::fs::remove_file(&ckpt);
    let args = |resume: bool| {
        let mut v: Vec<String> = [
            "defend",
            "--quiet",
            "--epochs",
            "3",
            "--batch-size",
            "4",
            "--val",
            "2",
            "--keep-best",
            "--schedule",
            "cosine",
            "--crop-scale",
            "0.5",
            "--data",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.push(data.display().to_string());
        v.extend([
            "--uap".into(),
            uap.display().to_string(),
            "--out".into(),
            out.display().to_string(),
        ]);
        if resume {
            v.push("--resume".into());
        }
        v
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_sfr"))
        .args(args(false))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !ckpt.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Mid-epoch 2.
    std::thread::sleep(Duration::from_millis(300));
    child.kill().unwrap();
    let _ = child.wait();
    let meta = sfr::weights::read_safetensors_metadata(&ckpt).unwrap();
    let done: serde_json::Value = serde_json::from_str(&meta["sfr_defense"]).unwrap();
    let done = done["training"]["epochs_done"].as_u64().unwrap();
    assert!(done >= 1, "the checkpoint holds at least the first epoch");
    let o = Command::new(env!("CARGO_BIN_EXE_sfr"))
        .args(args(true))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let meta = sfr::weights::read_safetensors_metadata(&out).unwrap();
    let m: serde_json::Value = serde_json::from_str(&meta["sfr_defense"]).unwrap();
    assert_eq!(m["training"]["epochs_done"], 3);
    assert_eq!(
        m["training"]["validation"].as_array().map(|v| v.len()),
        Some(3),
        "one validation per epoch, none lost"
    );
    assert!(!ckpt.exists());
    // --keep-best: the file holds the first epoch with the best validation restoration (after
    // the kill that epoch's weights came back from the file kept beside the checkpoint).
    let history: Vec<f64> = m["training"]["validation"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["restoration_accuracy"].as_f64().unwrap())
        .collect();
    let best = history
        .iter()
        .enumerate()
        .fold((0, f64::MIN), |b, (i, &r)| if r > b.1 { (i, r) } else { b });
    assert_eq!(m["training"]["selected_epoch"], best.0 + 1);
    let model = mobilenet();
    let mut d = Defense::load(&out, &model, model.device()).unwrap();
    let ds = sfr::data::Dataset::open(&data, None).unwrap();
    let (_, val) = sfr::attack::split_holdout(&ds, 2, 0).unwrap();
    let p = sfr::perturbation::Perturbation::load(&uap).unwrap();
    let v = sfr::defense::train::validate(&model, &mut d, &val, &[p], true, 16).unwrap();
    assert_eq!(
        v.restoration_accuracy, best.1,
        "the kept weights are the best epoch's"
    );
    assert!(!dir.join("d.safetensors.ckpt.best").exists());
    let _ = TensorData::new(vec![0f32], [1]);
}

#[test]
fn masking_with_every_channel_restored_gives_the_clean_accuracy() {
    let model = mobilenet();
    let data = sfr::fetch::fetch_named("foolbox-imagenet", &mut |_| {}).unwrap();
    let ds = sfr::data::Dataset::open(&data, None).unwrap().limit(8);
    // A strong, structured perturbation: ±40 stripes.
    let s = model.spec().input_size;
    let v: Vec<f32> = (0..3 * s * s)
        .map(|i| if (i / 7) % 2 == 0 { 40.0 } else { -40.0 })
        .collect();
    let meta =
        sfr::perturbation::PerturbationMeta::new("test", sfr::perturbation::Norm::Linf, 40.0);
    let p = sfr::perturbation::Perturbation::new(s, s, v, meta).unwrap();
    let sites = vec!["features.0.0".to_string(), "features.2.conv.2".to_string()];
    let rows = sfr::defense::ranking::masking(
        &model,
        &ds,
        &p,
        &sites,
        &[0.5, 1.0],
        true,
        4,
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(rows.len(), 4);
    let clean = rows[0].clean_top1;
    assert!(
        rows[0].perturbed_top1 < clean,
        "the stripes must hurt ({} vs {clean})",
        rows[0].perturbed_top1
    );
    for r in &rows {
        assert_eq!(r.n, 8);
        if r.k == r.channels {
            // Every channel of the site clean: the rest of the network sees clean input.
            assert_eq!(r.top_k_restored_top1, clean, "{r:?}");
            assert_eq!(r.bottom_k_restored_top1, clean, "{r:?}");
        } else {
            assert_eq!(r.k, r.channels / 2);
        }
    }
    // An unknown site and an impossible fraction are errors.
    assert!(
        sfr::defense::ranking::masking(
            &model,
            &ds,
            &p,
            &["nope".into()],
            &[0.5],
            true,
            4,
            &mut |_, _| {}
        )
        .is_err()
    );
    assert!(
        sfr::defense::ranking::masking(&model, &ds, &p, &sites, &[1.5], true, 4, &mut |_, _| {})
            .is_err()
    );
}

#[test]
fn gradients_reach_the_input_through_the_defence() {
    // Through an untrained defence (the identity) the input gradient equals the bare network's;
    // through a changed one it differs but stays non-zero: the adaptive attack sees the FRUs.
    let model = mobilenet();
    let dev = model.device().clone();
    let x = pixels(&model);
    let grad = |target: &sfr::attack::Target| -> Vec<f32> {
        let xa = x.clone().autodiff().require_grad();
        let logits = target.logits_grad(xa.clone());
        let loss = logits.clone().sum_dim(1).mean() + logits.max_dim(1).mean();
        let g = loss.backward();
        xa.grad(&g)
            .unwrap()
            .into_data()
            .try_into_vec::<f32>()
            .unwrap()
    };
    let mut d = Defense::plant(&model, &PlanOptions::default(), &dev).unwrap();
    // The bare network with the defended sites computed unfused, as the defence computes them
    // (fusing batch norm into the conv rounds differently, which is not what is tested here).
    struct Unfused(Vec<String>);
    impl sfr::zoo::Tap for Unfused {
        fn visit(&mut self, _site: &str, x: Tensor<4>) -> Tensor<4> {
            x
        }
        fn wants(&self, site: &str) -> bool {
            self.0.iter().any(|s| s == site)
        }
    }
    let sites: Vec<String> = d.placements().into_iter().map(|p| p.site).collect();
    let plain = {
        let xa = x.clone().autodiff().require_grad();
        let logits = model.forward_pixels(xa.clone(), &mut Unfused(sites));
        let loss = logits.clone().sum_dim(1).mean() + logits.max_dim(1).mean();
        let g = loss.backward();
        xa.grad(&g)
            .unwrap()
            .into_data()
            .try_into_vec::<f32>()
            .unwrap()
    };
    let through = grad(&sfr::attack::Target::defended(&model, &d).unwrap());
    let scale = plain.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(scale > 0.0);
    assert!(
        common::max_abs_diff(&plain, &through) <= 1e-4 * scale,
        "identity defence: same gradient"
    );
    let w4 = d.frus.units[0].w4.val();
    d.frus.units[0].w4 = burn::module::Param::from_tensor(w4.ones_like().mul_scalar(0.05));
    let changed = grad(&sfr::attack::Target::defended(&model, &d).unwrap());
    assert!(common::max_abs_diff(&plain, &changed) > 1e-3 * scale);
    assert!(changed.iter().any(|v| *v != 0.0));
}

#[test]
fn straight_through_gradient_skips_the_units_but_not_their_forward() {
    // BPDA: the forward pass is the defended network's; the backward pass treats each
    // regenerated site as the identity, so it differs from the exact gradient through the units.
    use sfr::classifier::{Classifier, FruGradient};
    let model = mobilenet();
    let dev = model.device().clone();
    let x = pixels(&model);
    let run = |c: &Classifier| -> (Vec<f32>, Vec<f32>) {
        let xa = x.clone().autodiff().require_grad();
        let logits = c.logits_grad(xa.clone());
        let values = logits
            .clone()
            .detach()
            .inner()
            .into_data()
            .try_into_vec::<f32>()
            .unwrap();
        let loss = logits.clone().sum_dim(1).mean() + logits.max_dim(1).mean();
        let g = loss.backward();
        let g = xa
            .grad(&g)
            .unwrap()
            .into_data()
            .try_into_vec::<f32>()
            .unwrap();
        (values, g)
    };
    let mut d = Defense::plant(&model, &PlanOptions::default(), &dev).unwrap();
    let w4 = d.frus.units[0].w4.val();
    d.frus.units[0].w4 = burn::module::Param::from_tensor(w4.ones_like().mul_scalar(0.05));
    let (exact_logits, exact) = run(&Classifier::defended(&model, &d).unwrap());
    let (st_logits, st) =
        run(&Classifier::defended_with(&model, &d, FruGradient::StraightThrough).unwrap());
    let (plain_logits, _) = run(&Classifier::plain(&model));
    assert!(common::max_abs_diff(&exact_logits, &st_logits) <= 1e-5);
    assert!(
        common::max_abs_diff(&exact_logits, &plain_logits) > 1e-3,
        "the units act"
    );
    let scale = exact.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(st.iter().any(|v| *v != 0.0));
    assert!(
        common::max_abs_diff(&exact, &st) > 1e-3 * scale,
        "straight-through equals the exact gradient: the units were not skipped"
    );
}

#[test]
fn label_free_losses_train_the_units_on_unlabelled_images() {
    let model = mobilenet();
    let dev = model.device().clone();
    let data = sfr::fetch::fetch_named("foolbox-imagenet", &mut |_| {}).unwrap();
    let mut ds = sfr::data::Dataset::open(&data, None).unwrap().limit(8);
    for s in &mut ds.samples {
        s.label = None;
    }
    let s = model.spec().input_size;
    let v: Vec<f32> = (0..3 * s * s)
        .map(|i| if (i / 5) % 2 == 0 { 10.0 } else { -10.0 })
        .collect();
    let meta =
        sfr::perturbation::PerturbationMeta::new("test", sfr::perturbation::Norm::Linf, 10.0);
    let uap = sfr::perturbation::Perturbation::new(s, s, v, meta).unwrap();
    let x = pixels(&model);
    let base = values(model.forward_pixels(x.clone(), &mut NoTap));
    for loss in [
        sfr::defense::train::Loss::Distill,
        sfr::defense::train::Loss::Logits,
    ] {
        let mut d = Defense::plant(&model, &PlanOptions::default(), &dev).unwrap();
        let cfg = sfr::defense::train::TrainConfig {
            epochs: 1,
            batch_size: 4,
            loss,
            ..Default::default()
        };
        let empty = sfr::data::Dataset::default();
        let mut losses = Vec::new();
        sfr::defense::train::train(
            &model,
            &mut d,
            &ds,
            &empty,
            std::slice::from_ref(&uap),
            &cfg,
            None,
            &mut |p| losses.extend(p.loss),
        )
        .unwrap();
        assert_eq!(losses.len(), 2, "{loss:?}: two batches of four");
        assert!(
            losses.iter().all(|l| l.is_finite() && *l >= 0.0),
            "{loss:?}: {losses:?}"
        );
        let out = values(d.forward_pixels(&model, x.clone()));
        assert!(
            common::max_abs_diff(&base, &out) > 1e-5,
            "{loss:?}: training moved the units off the identity"
        );
    }
}

/// `defend --seeds 3`: three defences from consecutive seeds on one validation split (the
/// undefended top-1 on it is the same for each), a summary whose mean and spread are those of
/// the three files' kept validations, and a rerun with --resume that reuses the files.
#[test]
fn defend_seeds_trains_each_seed_on_one_validation_split_and_reports_the_spread() {
    let dir = common::scratch("defense_seeds");
    let (data, uap) = common::foolbox_and_random_uap(&dir);
    let out = dir.join("d.safetensors");
    let run = |resume: bool| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_sfr"));
        c.args([
            "defend",
            "--quiet",
            "--json",
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--val",
            "6",
            "--seed",
            "7",
            "--seeds",
            "3",
            "--data",
        ])
        .arg(&data)
        .arg("--uap")
        .arg(&uap)
        .arg("--out")
        .arg(&out);
        if resume {
            c.arg("--resume");
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
    };
    for s in 7..10 {
        let _ = std::fs::remove_file(dir.join(format!("d.seed{s}.safetensors")));
    }
    let summary = run(false);
    let on_disk: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("d.seeds.json")).unwrap()).unwrap();
    assert_eq!(summary, on_disk, "the summary printed is the one written");
    assert_eq!(summary["val_seed"], 7);
    let runs = summary["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 3);
    let mut ra = Vec::new();
    let mut base = Vec::new();
    for (k, r) in runs.iter().enumerate() {
        let seed = 7 + k as u64;
        assert_eq!(r["seed"], seed);
        let file = dir.join(format!("d.seed{seed}.safetensors"));
        let meta = sfr::weights::read_safetensors_metadata(&file).unwrap();
        let m: serde_json::Value = serde_json::from_str(&meta["sfr_defense"]).unwrap();
        assert_eq!(m["training"]["config"]["seed"], seed, "{}", file.display());
        let v = &m["training"]["validation"][0];
        assert_eq!(&r["validation"], v);
        ra.push(v["restoration_accuracy"].as_f64().unwrap());
        base.push(v["baseline_clean_top1"].as_f64().unwrap());
    }
    assert!(
        base.iter().all(|b| *b == base[0]),
        "one validation split for every seed: {base:?}"
    );
    let mean = ra.iter().sum::<f64>() / 3.0;
    let sd = (ra.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 2.0).sqrt();
    let got = &summary["restoration_accuracy"];
    assert!((got["mean"].as_f64().unwrap() - mean).abs() < 1e-12);
    assert!((got["sd"].as_f64().unwrap() - sd).abs() < 1e-12);
    assert_eq!(
        got["min"].as_f64().unwrap(),
        ra.iter().cloned().fold(f64::INFINITY, f64::min)
    );
    // A rerun with --resume reuses the three files: the same summary.
    let mtime = std::fs::metadata(dir.join("d.seed8.safetensors"))
        .unwrap()
        .modified()
        .unwrap();
    let again = run(true);
    assert_eq!(
        again["restoration_accuracy"],
        summary["restoration_accuracy"]
    );
    assert_eq!(
        std::fs::metadata(dir.join("d.seed8.safetensors"))
            .unwrap()
            .modified()
            .unwrap(),
        mtime,
        "reused, not retrained"
    );
}

#[test]
fn prn_rectifier_acts_on_the_input_trains_and_round_trips() {
    let model = mobilenet();
    let dev = model.device().clone();
    let x = pixels(&model);
    let base = values(model.forward_pixels(x.clone(), &mut NoTap));
    let prn = PlanOptions {
        method: Method::Prn,
        ..Default::default()
    };
    // Untrained: one unit at the input, all three channels, and the identity.
    let mut d = Defense::plant(&model, &prn, &dev).unwrap();
    assert_eq!(d.meta.method, Method::Prn);
    assert_eq!(d.meta.sites, [sfr::defense::fru::INPUT_SITE]);
    assert_eq!(d.meta.regen, [vec![0, 1, 2]]);
    assert_eq!(d.meta.width, [sfr::defense::PRN_WIDTH]);
    assert_eq!(base, values(d.forward_pixels(&model, x.clone())));
    // A changed unit changes the output, survives a round trip, and the adaptive attack's
    // gradient reaches the input through it.
    let w4 = d.frus.units[0].w4.val();
    d.frus.units[0].w4 = burn::module::Param::from_tensor(w4.ones_like().mul_scalar(0.05));
    let changed = values(d.forward_pixels(&model, x.clone()));
    assert!(common::max_abs_diff(&base, &changed) > 1e-3);
    let dir = common::scratch("prn");
    let path = dir.join("prn.safetensors");
    d.save(&path).unwrap();
    let mut e = Defense::load(&path, &model, &dev).unwrap();
    assert_eq!(e.meta.method, Method::Prn);
    assert!(common::max_abs_diff(&changed, &values(e.forward_pixels(&model, x.clone()))) < 1e-5);
    assert_gradient_reaches_the_input(&model, &e, &x);
    // --sites makes no sense for it.
    let bad = PlanOptions {
        method: Method::Prn,
        sites: vec!["features.0.0".into()],
        ..Default::default()
    };
    let err = Defense::plant(&model, &bad, &dev).unwrap_err().to_string();
    assert!(err.contains("--sites"), "{err}");

    // `sfr defend --method prn` trains it (the loss falls from the identity's) and `sfr eval`
    // runs the network behind it.
    let (data, uap) = common::foolbox_and_random_uap(&dir);
    let out = dir.join("trained.safetensors");
    let o = Command::new(env!("CARGO_BIN_EXE_sfr"))
        .args([
            "defend", "--quiet", "--method", "prn", "--epochs", "2", "--val", "4",
        ])
        .args(["--json", "--data"])
        .arg(&data)
        .arg("--uap")
        .arg(&uap)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["method"], "prn");
    let trained = Defense::load(&out, &model, &dev).unwrap();
    assert_ne!(
        trained.frus.units[0]
            .w4
            .val()
            .into_data()
            .try_into_vec::<f32>()
            .unwrap(),
        vec![0.0; 3 * sfr::defense::PRN_WIDTH],
        "training moved the rectifier off the identity"
    );
    let o = Command::new(env!("CARGO_BIN_EXE_sfr"))
        .args(["eval", "--quiet", "--json", "--data"])
        .arg(&data)
        .arg("--defense")
        .arg(&out)
        .arg("-p")
        .arg(&uap)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn defence_files_whose_placements_do_not_fit_the_network_are_refused() {
    let model = mobilenet();
    let dev = model.device().clone();
    let dir = common::scratch("misplaced");
    let good = Defense::plant(&model, &PlanOptions::default(), &dev).unwrap();
    let c0 = good.meta.channels[0];
    type Change = Box<dyn Fn(&mut Defense)>;
    let cases: Vec<(&str, Change, &str)> = vec![
        (
            "beyond",
            Box::new(move |d| d.meta.regen[0][0] = c0 + 5),
            "beyond its",
        ),
        (
            "repeated",
            Box::new(|d| {
                let first = d.meta.regen[0][0];
                d.meta.regen[0][1] = first;
            }),
            "repeated",
        ),
        (
            "channels",
            Box::new(|d| d.meta.channels[0] += 1),
            "channels, the file says",
        ),
        (
            "site",
            Box::new(|d| d.meta.sites[0] = "no.such.conv".into()),
            "is not a site",
        ),
        (
            "input",
            Box::new(|d| d.meta.sites[0] = sfr::defense::fru::INPUT_SITE.into()),
            "only a PRN",
        ),
    ];
    for (name, change, want) in cases {
        let mut d = good.clone();
        change(&mut d);
        let path = dir.join(format!("{name}.safetensors"));
        d.save(&path).unwrap();
        let e = Defense::load(&path, &model, &dev).unwrap_err().to_string();
        assert!(
            e.contains(want) && e.contains(&*path.to_string_lossy()),
            "{name}: {e}"
        );
    }
}

/// Universal adversarial training (`--method uat`): untrained, it is the backbone (every conv
/// tuned, each change zero); a changed weight changes the output, survives a round trip and
/// passes gradients to the input; `sfr defend --method uat` moves the weights and its own
/// perturbation (inside the ℓ∞ ball of the first training perturbation), a killed run resumes
/// to the uninterrupted run's tensors bit for bit, and `sfr eval` runs the tuned network.
#[test]
fn uat_tunes_the_backbone_trains_resumes_exactly_and_round_trips() {
    let model = mobilenet();
    let dev = model.device().clone();
    let x = pixels(&model);
    let base = values(model.forward_pixels(x.clone(), &mut NoTap));
    let uat = PlanOptions {
        method: Method::Uat,
        ..Default::default()
    };
    let mut d = Defense::plant(&model, &uat, &dev).unwrap();
    let sites: Vec<String> = model.sites().into_iter().map(|s| s.name).collect();
    assert_eq!(d.meta.tuned, sites);
    assert!(d.meta.sites.is_empty() && d.frus.units.is_empty());
    // Unfused (conv, then batch norm) against fused: rounding only.
    let same = values(d.forward_pixels(&model, x.clone()));
    assert!(common::max_abs_diff(&base, &same) < 1e-3);
    let w0 = d.frus.deltas[0].val();
    d.frus.deltas[0] = burn::module::Param::from_tensor(w0.ones_like().mul_scalar(0.01));
    let changed = values(d.forward_pixels(&model, x.clone()));
    assert!(common::max_abs_diff(&base, &changed) > 1e-2);
    let dir = common::scratch("uat");
    let path = dir.join("uat.safetensors");
    d.save(&path).unwrap();
    let mut e = Defense::load(&path, &model, &dev).unwrap();
    assert_eq!(e.meta.method, Method::Uat);
    assert!(common::max_abs_diff(&changed, &values(e.forward_pixels(&model, x.clone()))) < 1e-5);
    assert_gradient_reaches_the_input(&model, &e, &x);
    // A file that tunes a conv twice, or one the network lacks, is refused.
    for (name, change, want) in [
        ("twice", sites[0].clone(), "tuned twice"),
        ("absent", "no.such.conv".to_string(), "not a conv"),
    ] {
        let mut bad = Defense::load(&path, &model, &dev).unwrap();
        bad.meta.tuned[1] = change;
        let p = dir.join(format!("{name}.safetensors"));
        bad.save(&p).unwrap();
        let err = Defense::load(&p, &model, &dev).unwrap_err().to_string();
        assert!(err.contains(want), "{err}");
    }
    // --sites names the convs to tune; the site rule (an FRU placement) is refused.
    let one = PlanOptions {
        method: Method::Uat,
        sites: vec!["features.18.0".into()],
        ..Default::default()
    };
    assert_eq!(
        Defense::plant(&model, &one, &dev).unwrap().meta.tuned,
        ["features.18.0"]
    );
    let rule = PlanOptions {
        method: Method::Uat,
        sites: vec!["rule".into()],
        ..Default::default()
    };
    let err = Defense::plant(&model, &rule, &dev).unwrap_err().to_string();
    assert!(err.contains("--sites"), "{err}");

    let (data, uap) = common::foolbox_and_random_uap(&dir);
    let args = |out: &PathBuf, resume: bool| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_sfr"));
        c.args(["defend", "--quiet", "--method", "uat", "--epochs", "3"])
            .args(["--batch-size", "4", "--val", "2", "--seed", "3", "--data"])
            .arg(&data)
            .arg("--uap")
            .arg(&uap)
            .arg("--out")
            .arg(out);
        if resume {
            c.arg("--resume");
        }
        c
    };
    let whole = dir.join("whole.safetensors");
    let o = args(&whole, false).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cut = dir.join("cut.safetensors");
    let ckpt = dir.join("cut.safetensors.ckpt");
    let _ = std::fs::remove_file(&cut);
    let _ = std::fs::remove_file(&ckpt);
    let mut child = args(&cut, false)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !ckpt.exists() && !cut.exists() {
        assert!(t0.elapsed() < Duration::from_secs(300), "no checkpoint");
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap();
    let _ = child.wait();
    let o = args(&cut, true).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (a, b) = (
        sfr::weights::load(&whole).unwrap(),
        sfr::weights::load(&cut).unwrap(),
    );
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "same tensors"
    );
    for (k, t) in a.iter() {
        assert_eq!(
            t.data,
            b.get(k).unwrap().data,
            "`{k}` differs after the resume"
        );
    }
    // Training moved the weights and the perturbation, which stayed in the ball.
    let trained = Defense::load(&whole, &model, &dev).unwrap();
    let moved = trained
        .frus
        .deltas
        .iter()
        .any(|p| values4(p.val()).iter().any(|v| *v != 0.0));
    assert!(moved, "training changed no weight");
    let start = sfr::perturbation::Perturbation::load(&uap).unwrap();
    assert_eq!(trained.uat_perturbation.len(), start.data.len());
    assert_ne!(trained.uat_perturbation, start.data);
    assert!(
        trained
            .uat_perturbation
            .iter()
            .all(|v| v.abs() <= start.meta.eps as f32 + 1e-4)
    );
    let o = Command::new(env!("CARGO_BIN_EXE_sfr"))
        .args(["eval", "--quiet", "--json", "--data"])
        .arg(&data)
        .arg("--defense")
        .arg(&whole)
        .arg("-p")
        .arg(&uap)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// The adaptive attack's gradient reaches the input through `defense`: finite, not all zero.
/// `--gate`: each unit's change scaled by a per-image switch in (0, 1). Shut, the defended
/// network is the backbone; open, it is the ungated defence; the switch is trained with the
/// units, survives a round trip, passes the adaptive attack's gradient, and a gated file that
/// lacks a gate is refused.
#[test]
fn gated_units_switch_between_the_backbone_and_the_ungated_defence() {
    let model = mobilenet();
    let dev = model.device().clone();
    let x = pixels(&model);
    let base = values(model.forward_pixels(x.clone(), &mut NoTap));
    let gated = PlanOptions {
        gate: true,
        ..Default::default()
    };
    let mut d = Defense::plant(&model, &gated, &dev).unwrap();
    assert!(d.meta.gated && d.summary().ends_with(", gated"));
    assert_eq!(d.frus.gates.len(), d.meta.sites.len());
    assert!(common::max_abs_diff(&base, &values(d.forward_pixels(&model, x.clone()))) < 1e-4);
    let mut plain = Defense::plant(&model, &PlanOptions::default(), &dev).unwrap();
    for e in [&mut d, &mut plain] {
        let w4 = e.frus.units[0].w4.val();
        e.frus.units[0].w4 = burn::module::Param::from_tensor(w4.ones_like().mul_scalar(0.01));
    }
    let ungated = values(plain.forward_pixels(&model, x.clone()));
    assert!(common::max_abs_diff(&base, &ungated) > 1e-3);
    let set_bias = |d: &mut Defense, b: f32| {
        let c = d.meta.channels[0];
        let mut g = vec![0.0f32; c + 1];
        g[c] = b;
        d.frus.gates[0] =
            burn::module::Param::from_tensor(Tensor::from_data(TensorData::new(g, [c + 1]), &dev));
    };
    set_bias(&mut d, -10.0);
    assert!(common::max_abs_diff(&base, &values(d.forward_pixels(&model, x.clone()))) < 1e-4);
    set_bias(&mut d, 10.0);
    assert!(common::max_abs_diff(&ungated, &values(d.forward_pixels(&model, x.clone()))) < 1e-4);
    // Half open: between the two, on every logit within their span.
    set_bias(&mut d, 0.0);
    let half = values(d.forward_pixels(&model, x.clone()));
    assert!(
        common::max_abs_diff(&base, &half) > 1e-4 && common::max_abs_diff(&ungated, &half) > 1e-4
    );

    let dir = common::scratch("gate");
    let path = dir.join("gated.safetensors");
    d.save(&path).unwrap();
    let mut e = Defense::load(&path, &model, &dev).unwrap();
    assert!(e.meta.gated);
    assert!(common::max_abs_diff(&half, &values(e.forward_pixels(&model, x.clone()))) < 1e-5);
    assert_gradient_reaches_the_input(&model, &e, &x);
    // The same file without the first gate is refused, naming the tensor.
    let mut map = sfr::weights::load(&path).unwrap();
    map.remove("fru.0.gate");
    let md = sfr::weights::read_safetensors_metadata(&path).unwrap();
    let cut = dir.join("cut.safetensors");
    sfr::weights::save_safetensors(&map, &md, &cut).unwrap();
    let err = Defense::load(&cut, &model, &dev).unwrap_err().to_string();
    assert!(err.contains("fru.0.gate"), "{err}");
    // Not for universal adversarial training, which has no units.
    let uat = PlanOptions {
        gate: true,
        method: Method::Uat,
        ..Default::default()
    };
    let err = Defense::plant(&model, &uat, &dev).unwrap_err().to_string();
    assert!(err.contains("--gate"), "{err}");

    // `sfr defend --gate` trains the switches with the units. A random-sign perturbation of
    // ξ = 60, plain enough for a detector to learn in eight steps.
    let (data, uap) = common::random_uap(&dir, "loud.safetensors", 60.0);
    let out = dir.join("trained.safetensors");
    let o = Command::new(env!("CARGO_BIN_EXE_sfr"))
        .args([
            "defend", "--quiet", "--json", "--gate", "--epochs", "2", "--val", "4",
        ])
        .args(["--batch-size", "4", "--lr", "0.01"])
        .args(["--sites", "features.0.0,features.1.conv.1", "--data"])
        .arg(&data)
        .arg("--uap")
        .arg(&uap)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Each epoch's validation says how far each unit's switch opened, clean and perturbed.
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for key in ["gate_clean", "gate_perturbed"] {
        let g = j["training"]["validation"][1][key].as_array().unwrap();
        assert_eq!(g.len(), 2, "{key}");
        assert!(
            g.iter()
                .all(|v| v.as_f64().is_some_and(|v| v > 0.0 && v < 1.0)),
            "{key}"
        );
    }
    // Supervised as detectors (the default --gate-loss), the switches open further on the
    // perturbed validation images than on the clean ones, at every unit (measured: by 0.30 and
    // 0.24; by 0.17 and 0.16 with --gate-loss 0).
    let v = &j["training"]["validation"][1];
    let open = |key: &str| -> Vec<f64> {
        v[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let (shut, open) = (open("gate_clean"), open("gate_perturbed"));
    eprintln!("switches: clean {shut:?}, perturbed {open:?}");
    assert!(
        shut.iter().zip(&open).all(|(c, p)| p - c > 0.2),
        "clean {shut:?}, perturbed {open:?}"
    );
    assert_eq!(
        j["training"]["config"]["gate_loss"].as_f64(),
        Some(sfr::defense::train::GATE_LOSS)
    );
    let trained = Defense::load(&out, &model, &dev).unwrap();
    assert!(trained.meta.gated);
    for g in &trained.frus.gates {
        let v = g.val().into_data().try_into_vec::<f32>().unwrap();
        assert!(v.iter().any(|x| *x != 0.0), "training moved every switch");
    }
}

fn assert_gradient_reaches_the_input(model: &zoo::Model, defense: &Defense, x: &Tensor<4>) {
    let t = sfr::attack::Target::defended(model, defense).unwrap();
    let xa = x.clone().autodiff().require_grad();
    let g = t.logits_grad(xa.clone()).max_dim(1).mean().backward();
    let gx = xa
        .grad(&g)
        .unwrap()
        .into_data()
        .try_into_vec::<f32>()
        .unwrap();
    assert!(gx.iter().all(|v| v.is_finite()) && gx.iter().any(|v| *v != 0.0));
}

fn values4(t: Tensor<4>) -> Vec<f32> {
    t.into_data().try_into_vec::<f32>().unwrap()
}

/// The relative squared distance between the first unit's regenerated channels on perturbed
/// images and the undefended network's same channels on the clean ones.
fn first_unit_error(model: &zoo::Model, d: &mut Defense, x: &Tensor<4>, v: &Tensor<4>) -> f64 {
    let placements = d.placements();
    let sites: Vec<String> = placements.iter().map(|p| p.site.clone()).collect();
    let mut rec = zoo::Record::new(&sites);
    model.forward_pixels(x.clone(), &mut rec);
    let clean = rec.get(&placements[0].site).unwrap().clone();
    let regen = std::sync::Arc::new(placements[0].regen.clone());
    let t = sfr::engine::gather_channels(clean, &regen);
    let xp = sfr::perturbation::apply(x.clone(), v.clone(), true);
    let mut tap = sfr::defense::fru::Regenerate::new(
        &d.frus,
        &placements,
        &mut d.stats,
        false,
        &d.meta.tuned,
    )
    .keeping_outputs();
    model.forward_pixels(xp, &mut tap);
    let y = tap.outputs[0].1.clone();
    sfr::defense::fru::regeneration_error(y, t).into_scalar::<f32>() as f64
}

/// `--feature-loss`: the units learn to give back the undefended network's channels of the
/// clean image. Trained with it, the first unit's regenerated channels on perturbed images come
/// nearer the clean ones than they were, and nearer than after the same steps without it; the
/// weight is recorded, and refused where there are no units to train or when negative.
#[test]
fn feature_loss_pulls_the_regenerated_channels_towards_the_clean_ones() {
    let model = mobilenet();
    let dev = model.device().clone();
    let dir = common::scratch("feature-loss");
    let (data, uap_path) = common::random_uap(&dir, "loud.safetensors", 30.0);
    let uap = sfr::perturbation::Perturbation::load(&uap_path).unwrap();
    let ds = sfr::data::Dataset::open(&data, None).unwrap().limit(16);
    let x = pixels(&model);
    let s = model.spec().input_size;
    let v = Tensor::<4>::from_data(TensorData::new(uap.data.clone(), [1, 3, s, s]), &dev);
    let plan = PlanOptions {
        sites: vec!["features.0.0".into(), "features.1.conv.1".into()],
        ..Default::default()
    };
    let train = |d: &mut Defense, cfg: &sfr::defense::train::TrainConfig| {
        let no_val = sfr::data::Dataset::default();
        sfr::defense::train::train(
            &model,
            d,
            &ds,
            &no_val,
            std::slice::from_ref(&uap),
            cfg,
            None,
            &mut |_| {},
        )
    };
    let mut errors = Vec::new();
    for weight in [None, Some(20.0)] {
        let mut d = Defense::plant(&model, &plan, &dev).unwrap();
        let before = first_unit_error(&model, &mut d, &x, &v);
        let cfg = sfr::defense::train::TrainConfig {
            epochs: 3,
            batch_size: 4,
            lr: 1e-2,
            loss: sfr::defense::train::Loss::Logits,
            synthetic: false,
            feature_loss: weight,
            ..Default::default()
        };
        train(&mut d, &cfg).unwrap();
        let after = first_unit_error(&model, &mut d, &x, &v);
        eprintln!("feature loss {weight:?}: first unit's error {before:.4} -> {after:.4}");
        assert_eq!(
            d.meta.training["config"]["feature_loss"].as_f64(),
            weight,
            "recorded"
        );
        errors.push((before, after));
    }
    let ((b0, a0), (b1, a1)) = (errors[0], errors[1]);
    assert!((b0 - b1).abs() < 1e-9, "the same untrained start");
    assert!(a1 < 0.95 * b1, "with the feature loss: {b1} -> {a1}");
    assert!(a1 < 0.95 * a0, "with {a1}, without {a0}");

    for w in [-1.0, f64::NAN] {
        let cfg = sfr::defense::train::TrainConfig {
            feature_loss: Some(w),
            ..Default::default()
        };
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("--feature-loss"), "{err}");
    }
    let uat = PlanOptions {
        method: Method::Uat,
        ..Default::default()
    };
    let mut d = Defense::plant(&model, &uat, &dev).unwrap();
    let cfg = sfr::defense::train::TrainConfig {
        epochs: 1,
        batch_size: 4,
        feature_loss: Some(1.0),
        ..Default::default()
    };
    let err = train(&mut d, &cfg).unwrap_err().to_string();
    assert!(err.contains("--feature-loss"), "{err}");
}
