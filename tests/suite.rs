//! `sfr suite` end to end at a small scale: a briefly trained defence, every generated attack
//! row (seen, control, unseen, stronger, cross-norm, adaptive) plus the published ones, seven
//! defence columns (the PRN and UAT rivals among them), the report's files, restoration accuracy recomputed from its own cells, a
//! rerun that reuses the attacks, and the refusal to evaluate on attack-generation images.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn sfr(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sfr"))
        .args(args)
        .output()
        .expect("run sfr")
}

fn ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    );
}

#[test]
fn suite_reports_every_row_and_column() {
    let Some(shared) = common::shared_dir() else {
        return;
    };
    let data = shared.join("data");
    let dir = common::scratch("suite");
    let s = |p: &Path| p.display().to_string();
    let uap = dir.join("uap.safetensors");
    let defense = dir.join("defense.safetensors");
    let out = dir.join("report");
    let _ = std::fs::remove_dir_all(&out);
    let isample = s(&data.join("imagenet-sample"));
    let nips = s(&data.join("nips17"));

    // A training perturbation and a briefly trained defence (small, not meant to be good).
    let o = sfr(&[
        "attack",
        "sgd",
        "-q",
        "--data",
        &isample,
        "--limit",
        "48",
        "--holdout",
        "8",
        "--epochs",
        "1",
        "--out",
        &s(&uap),
    ]);
    ok(&o, "attack");
    // The defence, and the learned rivals trained the same way.
    let prn = dir.join("prn.safetensors");
    let uat = dir.join("uat.safetensors");
    for (method, out) in [("sfr", &defense), ("prn", &prn), ("uat", &uat)] {
        let o = sfr(&[
            "defend",
            "-q",
            "--method",
            method,
            "--data",
            &isample,
            "--skip",
            "48",
            "--limit",
            "32",
            "--val",
            "0",
            "--epochs",
            "1",
            "--uap",
            &s(&uap),
            "--out",
            &s(out),
        ]);
        ok(&o, &format!("defend --method {method}"));
    }

    let args = [
        "suite",
        "-q",
        "--defense",
        &s(&defense),
        "--rival",
        &s(&prn),
        "--rival",
        &s(&uat),
        "--data",
        &nips,
        "--limit",
        "12",
        "--generate-from",
        &isample,
        "--generate-limit",
        "40",
        "--attack-epochs",
        "1",
        "--activation-iterations",
        "4",
        "--deepfool-images",
        "2",
        "--stronger",
        "15",
        "--published",
        &s(&shared.join("attacks")),
        "--out",
        &s(&out),
        "--json",
    ];
    let o = sfr(&args);
    ok(&o, "suite");
    let r: Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    let on_disk: Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(r, on_disk, "--json prints report.json");
    assert_eq!(r["n"], 12);
    let base = r["clean_top1"].as_f64().unwrap();
    let columns: Vec<&str> = r["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        columns,
        ["none", "sfr", "prn", "uat", "jpeg75", "median3", "bits4"]
    );
    let rows = r["rows"].as_array().unwrap();
    let cats: Vec<&str> = rows
        .iter()
        .map(|x| x["category"].as_str().unwrap())
        .collect();
    for want in [
        "seen",
        "control",
        "unseen",
        "stronger",
        "cross-norm",
        "adaptive",
        "transferred",
    ] {
        assert!(cats.contains(&want), "a {want} row in {cats:?}");
    }
    // 13 generated rows (seen, control, fff, gduap, deepfool, ℓ∞ 15, ℓ2, adaptive through the
    // defence, through each rival and through each of the 3 baselines) + 9 published.
    assert_eq!(rows.len(), 22, "{cats:?}");
    for row in rows {
        let cells = row["cells"].as_array().unwrap();
        assert_eq!(cells.len(), 7);
        assert_eq!(row["n"], 12);
        for c in cells {
            let ct = c["clean_top1"].as_f64().unwrap();
            let at = c["attacked_top1"].as_f64().unwrap();
            let ra = c["restoration_accuracy"].as_f64().unwrap();
            assert!((ra - (ct + at) / (2.0 * base)).abs() < 1e-9, "{c}");
            let f = c["fooling_rate"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&f));
        }
        // The undefended column's clean top-1 is the report's.
        assert_eq!(cells[0]["clean_top1"].as_f64().unwrap(), base);
    }
    for f in [
        "report.md",
        "restoration.svg",
        "examples.svg",
        "perturbations/sgd_linf_10_held_out_seed.png",
    ] {
        assert!(out.join(f).is_file(), "{f} written");
    }
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains(
        "| attack | kind | budget | none | sfr | prn | uat | jpeg75 | median3 | bits4 |"
    ));
    let adaptive = sfr::perturbation::Perturbation::load(
        &out.join("attacks/adaptive_sgd_linf_10.safetensors"),
    )
    .unwrap();
    assert!(
        adaptive.meta.params.get("through_defense").is_some(),
        "the adaptive attack records the defence it went through"
    );
    let through_prn = sfr::perturbation::Perturbation::load(
        &out.join("attacks/adaptive_sgd_linf_10_through_prn.safetensors"),
    )
    .unwrap();
    assert_eq!(
        through_prn.meta.params["through_defense"]["method"], "prn",
        "the adaptive attack on the rival went through the rival"
    );
    assert_ne!(
        through_prn.meta.params["through_defense"]["id"],
        adaptive.meta.params["through_defense"]["id"]
    );
    let through_uat = sfr::perturbation::Perturbation::load(
        &out.join("attacks/adaptive_sgd_linf_10_through_uat.safetensors"),
    )
    .unwrap();
    assert_eq!(
        through_uat.meta.params["through_defense"]["method"], "uat",
        "the adaptive attack on UAT went through the tuned network"
    );
    let through_jpeg = sfr::perturbation::Perturbation::load(
        &out.join("attacks/adaptive_sgd_linf_10_through_jpeg75.safetensors"),
    )
    .unwrap();
    assert_eq!(
        through_jpeg.meta.params["through_filter"]["filter"],
        "jpeg75"
    );

    // A rerun reuses the generated attacks (same bytes) and gives the same report.
    let seen = out.join("attacks/seen_sgd_linf_10.safetensors");
    let before = std::fs::read(&seen).unwrap();
    let o = sfr(&args);
    ok(&o, "suite rerun");
    assert_eq!(std::fs::read(&seen).unwrap(), before);
    let again: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(again["rows"].as_array().unwrap().len(), rows.len());
    for (a, b) in again["rows"].as_array().unwrap().iter().zip(rows) {
        assert_eq!(a["cells"], b["cells"], "same numbers on a rerun");
    }

    // Evaluating on the generation images is refused.
    let o = sfr(&[
        "suite",
        "-q",
        "--defense",
        &s(&defense),
        "--data",
        &isample,
        "--limit",
        "4",
        "--generate-from",
        &isample,
        "--generate-limit",
        "8",
        "--out",
        &s(&dir.join("overlap")),
    ]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("attack-generation image"), "{e}");

    // The adaptive attack exists only for sgd (and the random control).
    let o = sfr(&[
        "attack",
        "fff",
        "-q",
        "--data",
        &isample,
        "--limit",
        "4",
        "--defense",
        &s(&defense),
        "--out",
        &s(&dir.join("x.safetensors")),
    ]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("adaptive"), "{e}");
}
