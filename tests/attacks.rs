//! Attacks end to end on small real data: budgets hold, runs repeat exactly from a seed, a killed
//! run resumes from its checkpoint to the same result, and published perturbations import so that
//! their fooling rate matches a PyTorch script of the same protocol.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sfr::perturbation::Perturbation;

fn sfr_cmd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sfr"))
}

fn foolbox() -> PathBuf {
    sfr::fetch::fetch_named("foolbox-imagenet", &mut |m| eprintln!("{m}"))
        .expect("fetch foolbox images")
}

fn run_attack(args: &[&str]) -> serde_json::Value {
    let o = sfr_cmd()
        .args(args)
        .arg("--json")
        .arg("--quiet")
        .output()
        .expect("run");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("one JSON object")
}

#[test]
fn sgd_respects_budgets_and_repeats_from_its_seed() {
    let data = foolbox();
    let dir = common::scratch("attacks_sgd");
    let d = data.to_str().unwrap();
    for (norm, eps) in [("linf", "10"), ("l2", "2000")] {
        let a = dir.join(format!("{norm}_a.safetensors"));
        let b = dir.join(format!("{norm}_b.safetensors"));
        for out in [&a, &b] {
            let v = run_attack(&[
                "attack",
                "sgd",
                "--data",
                d,
                "--norm",
                norm,
                "--eps",
                eps,
                "--epochs",
                "2",
                "--holdout",
                "4",
                "--batch-size",
                "8",
                "--seed",
                "7",
                "--out",
                out.to_str().unwrap(),
            ]);
            assert_eq!(v["attack"], "sgd");
            assert!(v["fooling_rate"].as_f64().is_some());
        }
        let pa = Perturbation::load(&a).expect("load");
        let pb = Perturbation::load(&b).expect("load");
        assert_eq!(
            pa.data, pb.data,
            "{norm}: the same seed gives the same perturbation"
        );
        let eps: f64 = eps.parse().unwrap();
        let n = if norm == "linf" { pa.linf() } else { pa.l2() };
        assert!(n <= eps * 1.0001, "{norm}: norm {n} over ξ = {eps}");
        // 4 steps of 0.1·ξ (then 0.08·ξ) on 16 images: the perturbation must have moved.
        assert!(n > eps * 0.1, "{norm}: the attack moved (norm {n})");
        assert_eq!(pa.meta.seed, Some(7));
        assert_eq!(pa.meta.model.as_deref(), Some("mobilenet_v2"));
    }
}

#[test]
fn targeted_margin_and_restarts_are_recorded_and_measured() {
    let data = foolbox();
    let dir = common::scratch("attacks_targeted");
    let d = data.to_str().unwrap();
    let t = dir.join("targeted.safetensors");
    let v = run_attack(&[
        "attack",
        "sgd",
        "--data",
        d,
        "--target",
        "1",
        "--epochs",
        "2",
        "--holdout",
        "4",
        "--batch-size",
        "8",
        "--seed",
        "3",
        "--out",
        t.to_str().unwrap(),
    ]);
    assert_eq!(v["params"]["target"], 1);
    let s = v["params"]["holdout_targeted_success_rate"]
        .as_f64()
        .expect("success rate");
    assert!((0.0..=1.0).contains(&s));
    assert!(
        v["fooling_rate"].is_null(),
        "a targeted run reports its success rate instead"
    );
    // eval reports the targeted success rate of a targeted perturbation.
    let o = sfr_cmd()
        .args([
            "eval",
            "--data",
            d,
            "-p",
            t.to_str().unwrap(),
            "--json",
            "--quiet",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let e: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(e["target_class"], 1);
    let r = e["targeted_success_rate"]
        .as_f64()
        .expect("targeted success rate");
    assert!((0.0..=1.0).contains(&r));
    // Margin loss, random start, two restarts: the kept one is the best on the held-out slice.
    let m = dir.join("margin.safetensors");
    let v = run_attack(&[
        "attack",
        "sgd",
        "--data",
        d,
        "--loss",
        "margin",
        "--random-start",
        "--restarts",
        "2",
        "--epochs",
        "1",
        "--holdout",
        "4",
        "--batch-size",
        "8",
        "--seed",
        "5",
        "--out",
        m.to_str().unwrap(),
    ]);
    assert_eq!(v["params"]["loss"], "margin");
    let per: Vec<f64> = v["params"]["holdout_fooling_rate_per_restart"]
        .as_array()
        .expect("per-restart figures")
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(per.len(), 2);
    let best = per.iter().cloned().fold(f64::MIN, f64::max);
    assert_eq!(v["fooling_rate"].as_f64(), Some(best));
    let seed = v["params"]["best_seed"].as_u64().unwrap();
    assert_eq!(per[(seed - 5) as usize], best);
    // A random start moves every pixel: no zero left in the perturbation.
    let p = Perturbation::load(&m).unwrap();
    assert!(p.data.iter().filter(|x| **x == 0.0).count() < p.data.len() / 100);
    assert!(
        !dir.join("margin.safetensors.ckpt.restart1").exists(),
        "restart checkpoints are removed"
    );
}

#[test]
fn harden_runs_rounds_of_adaptive_attack_and_retraining() {
    let data = foolbox();
    let d = data.to_str().unwrap();
    let dir = common::scratch("attacks_harden");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let uap = dir.join("uap.safetensors");
    run_attack(&[
        "attack",
        "sgd",
        "--data",
        d,
        "--epochs",
        "1",
        "--holdout",
        "4",
        "--batch-size",
        "8",
        "--out",
        uap.to_str().unwrap(),
    ]);
    let def = dir.join("def.safetensors");
    let o = sfr_cmd()
        .args([
            "defend",
            "--data",
            d,
            "--uap",
            uap.to_str().unwrap(),
            "--epochs",
            "2",
            "--val",
            "4",
        ])
        .args(["--loss", "distill", "--gate", "--sites"])
        .args(["features.0.0,features.1.conv.1"])
        .args([
            "--batch-size",
            "8",
            "--out",
            def.to_str().unwrap(),
            "--quiet",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = dir.join("h");
    let harden = || {
        let o = sfr_cmd()
            .args(["harden", "--data", d, "--defense", def.to_str().unwrap()])
            .args([
                "--uap",
                uap.to_str().unwrap(),
                "--test",
                d,
                "--test-uap",
                uap.to_str().unwrap(),
            ])
            .args([
                "--rounds",
                "1",
                "--out-dir",
                out.to_str().unwrap(),
                "--json",
                "--quiet",
            ])
            .args([
                "--attack-arg=--epochs=1",
                "--attack-arg=--holdout=4",
                "--attack-arg=--batch-size=8",
            ])
            .args([
                "--defend-arg=--epochs=1",
                "--defend-arg=--val=4",
                "--defend-arg=--batch-size=8",
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).expect("one JSON object")
    };
    let r = harden();
    let rounds = r["rounds"].as_array().unwrap();
    assert_eq!(
        rounds.len(),
        2,
        "round 0 on the given defence, round 1 on the retrained one"
    );
    for (i, round) in rounds.iter().enumerate() {
        for k in [
            "defended_fooling_rate",
            "bare_fooling_rate",
            "restoration_accuracy",
            "held_out_uaps_restoration_accuracy",
        ] {
            let v = round[k]
                .as_f64()
                .unwrap_or_else(|| panic!("round {i}: {k}"));
            assert!((0.0..=1.5).contains(&v), "round {i}: {k} = {v}");
        }
    }
    assert!(
        rounds[0]["retrain_command"]
            .as_str()
            .unwrap()
            .contains("round0_adaptive.safetensors")
    );
    let retrained = out.join("round1_defense.safetensors");
    // The retraining remakes the given defence's kind and recipe (gated units at its two
    // sites, the distillation loss), but for what --defend-arg sets (one epoch, not two).
    let line = rounds[0]["retrain_command"].as_str().unwrap();
    for want in [
        "--gate",
        "--gate-loss 1",
        "--loss distill",
        "--sites features.0.0,features.1.conv.1",
        "--epochs=1",
    ] {
        assert!(line.contains(want), "{want} in {line}");
    }
    assert!(!line.contains("--epochs 2"), "{line}");
    let model = sfr::zoo::load(
        "mobilenet_v2",
        &common::fetched("mobilenet_v2"),
        &sfr::device::default_device(),
    )
    .unwrap();
    let d1 = sfr::defense::Defense::load(&retrained, &model, model.device()).unwrap();
    assert!(d1.meta.gated && d1.meta.sites.len() == 2);
    assert_eq!(d1.meta.training["config"]["loss"], "distill");
    assert_eq!(d1.meta.training["config"]["gate_loss"], 1.0);
    let a1 = out.join("round1_adaptive.safetensors");
    let p = Perturbation::load(&a1).unwrap();
    assert!(
        p.meta.params["through_defense"].is_object(),
        "round 1 attacks through a defence"
    );
    // A rerun reuses every file and reports the same figures.
    let before = std::fs::read(&retrained).unwrap();
    assert_eq!(harden(), r);
    assert_eq!(std::fs::read(&retrained).unwrap(), before);
}

/// Both the plain sign steps and the defaults (momentum, mirroring) resume exactly: with
/// momentum the accumulated gradient is state too, and a resumed run that restarted it from zero
/// (or mirrored other images) would end elsewhere. The defaults' run checkpoints after every
/// batch, so its kill lands inside an epoch.
#[test]
fn killed_sgd_resumes_to_the_same_result() {
    let plain = kill_sgd_and_resume("attacks_resume", &["--momentum", "0", "--no-flip"]);
    assert_eq!(plain.meta.params["momentum"], 0.0);
    assert_eq!(plain.meta.params["flip"], false);
    let p = kill_sgd_and_resume("attacks_resume_momentum", &["--checkpoint-every", "0"]);
    assert_eq!(p.meta.params["momentum"], sfr::attack::sgd::MOMENTUM);
    assert_eq!(p.meta.params["flip"], true);
    // The options act: the plain run ends elsewhere.
    assert_ne!(p.data, plain.data, "momentum and flips change the steps");
}

/// Run `attack sgd` (3 epochs, batch 8, foolbox images) whole, then again killed at its first
/// checkpoint and resumed; the two results must be identical. Returns the result.
fn kill_sgd_and_resume(scratch: &str, extra: &[&str]) -> Perturbation {
    let data = foolbox();
    let dir = common::scratch(scratch);
    let d = data.to_str().unwrap();
    let args = |out: &Path| -> Vec<String> {
        [
            "attack",
            "sgd",
            "--data",
            d,
            "--epochs",
            "3",
            "--holdout",
            "4",
            "--batch-size",
            "8",
            "--seed",
            "3",
            "--quiet",
            "--out",
            out.to_str().unwrap(),
        ]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect()
    };
    let whole = dir.join("whole.safetensors");
    let o = sfr_cmd().args(args(&whole)).output().expect("run");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let cut = dir.join("cut.safetensors");
    let ckpt = dir.join("cut.safetensors.ckpt");
    let _ = std::fs::remove_file(&cut);
    let _ = std::fs::remove_file(&ckpt);
    let mut child = sfr_cmd()
        .args(args(&cut))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let t0 = Instant::now();
    while !ckpt.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().expect("kill");
    let _ = child.wait();
    assert!(!cut.exists(), "killed before the end: no output yet");
    let mut resumed = args(&cut);
    resumed.push("--resume".into());
    let o = sfr_cmd().args(resumed).output().expect("resume");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        !ckpt.exists(),
        "the checkpoint is removed once the output is written"
    );
    let a = Perturbation::load(&whole).unwrap();
    let b = Perturbation::load(&cut).unwrap();
    assert_eq!(
        a.data, b.data,
        "resuming reproduces the uninterrupted run exactly"
    );
    a
}

#[test]
fn resume_refuses_a_checkpoint_of_another_run() {
    let data = foolbox();
    let dir = common::scratch("attacks_resume_other");
    let out = dir.join("x.safetensors");
    let ckpt = dir.join("x.safetensors.ckpt");
    let mut map = sfr::weights::TensorMap::new();
    map.insert(
        "delta",
        sfr::weights::RawTensor {
            shape: vec![3, 224, 224],
            data: vec![0.0; 3 * 224 * 224],
        },
    );
    let meta = [
        ("fingerprint".to_string(), "another run".to_string()),
        ("epochs_done".to_string(), "1".to_string()),
    ]
    .into_iter()
    .collect();
    sfr::weights::save_safetensors(&map, &meta, &ckpt).unwrap();
    let o = sfr_cmd()
        .args([
            "attack",
            "sgd",
            "--data",
            data.to_str().unwrap(),
            "--epochs",
            "1",
            "--holdout",
            "4",
            "--resume",
        ])
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("another run"));
}

#[test]
fn random_control_and_data_free_attacks_run() {
    let data = foolbox();
    let dir = common::scratch("attacks_misc");
    let d = data.to_str().unwrap();
    let r = dir.join("random.safetensors");
    let v = run_attack(&[
        "attack",
        "random",
        "--data",
        d,
        "--holdout",
        "10",
        "--out",
        r.to_str().unwrap(),
    ]);
    assert_eq!(v["attack"], "random");
    let p = Perturbation::load(&r).unwrap();
    assert!((p.linf() - 10.0).abs() < 1e-4);
    assert!(v["fooling_rate"].as_f64().is_some());
    // With nothing held out the control is still made; it just has no fooling rate.
    let v = run_attack(&[
        "attack",
        "random",
        "--data",
        d,
        "--holdout",
        "0",
        "--out",
        r.to_str().unwrap(),
    ]);
    assert!(v["fooling_rate"].is_null(), "{v}");
    for (m, extra) in [("fff", vec![]), ("gduap", vec!["--prior", "range"])] {
        let out = dir.join(format!("{m}.safetensors"));
        let mut args = vec![
            "attack",
            m,
            "--data",
            d,
            "--holdout",
            "10",
            "--iterations",
            "3",
        ];
        args.extend(extra);
        args.extend(["--out", out.to_str().unwrap()]);
        let v = run_attack(&args);
        assert_eq!(v["attack"], m);
        let p = Perturbation::load(&out).unwrap();
        assert!(p.linf() <= 10.0 + 1e-4);
    }
}

/// Published perturbations applied to mobilenet_v2 on nips17 give the fooling rate a PyTorch
/// script of the same protocol gives (`tools/torch_uap_eval.py`), within 1 point.
#[test]
fn published_perturbations_match_pytorch_fooling_rate() {
    let Some(shared) = common::shared_dir() else {
        return;
    };
    let Some(py) = common::torch_python() else {
        return;
    };
    let weights = common::fetched("mobilenet_v2");
    let data = shared.join("data/nips17");
    let limit = 300;
    let dev = sfr::device::default_device();
    let model = sfr::zoo::load("mobilenet_v2", &weights, &dev).unwrap();
    let ds = sfr::data::Dataset::open(&data, None).unwrap().limit(limit);
    for rel in [
        "attacks/lts4/VGG-16.mat",
        "attacks/sfr-release/UAP/VGG16/vgg16_adv_iter_1.h5",
    ] {
        let file = shared.join(rel);
        let p = Perturbation::load(&file).expect("import");
        let r = sfr::eval::evaluate(
            &model,
            &ds,
            &[(rel.to_string(), p)],
            None,
            &sfr::eval::EvalOptions::default(),
            &mut |_, _| {},
        )
        .unwrap();
        let ours = r.attacked.expect("attacked").fooling_rate;
        let o = Command::new(&py)
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/torch_uap_eval.py"))
            .arg("--weights")
            .arg(&weights)
            .arg("--data")
            .arg(&data)
            .args(["--limit", &limit.to_string()])
            .arg("--perturbation")
            .arg(&file)
            .output()
            .expect("run torch_uap_eval.py");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let theirs = v["fooling_rate"].as_f64().unwrap();
        eprintln!("{rel}: sfr fooling rate {ours:.4}, PyTorch {theirs:.4} ({limit} nips17 images)");
        assert!(
            (ours - theirs).abs() <= 0.01,
            "{rel}: sfr {ours} vs PyTorch {theirs}"
        );
    }
}
