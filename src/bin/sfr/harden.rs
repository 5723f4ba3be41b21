//! `sfr harden`: the paper's answer to a white-box attacker (its Section 5.2.5) as rounds of
//! adaptive attack → retrain the FRUs with those perturbations added → adaptive attack again.
//!
//! Each round's attack and defence are the very `sfr attack sgd --defense` and `sfr defend`
//! commands a user would type (printed, and recorded in the report), so every file can be
//! remade by hand; a round whose file exists is not redone, so a killed run resumes.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser};
use serde_json::json;

use sfr::defense::Defense;
use sfr::eval::{self, EvalOptions};

use crate::attack::{AttackArgs, attack_run};
use crate::common::*;
use crate::defend::{DefendArgs, defend_run};

#[derive(Args)]
pub(crate) struct HardenArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    #[command(flatten)]
    pub(crate) data: TrainDataArgs,
    /// The defence to harden (an `sfr defend` file for this backbone).
    #[arg(long, required = true)]
    pub(crate) defense: PathBuf,
    /// The perturbations that defence was trained on (repeat); every retraining keeps them.
    #[arg(long = "uap", required = true)]
    pub(crate) uaps: Vec<PathBuf>,
    /// Held-out test images for each round's figures (folders, repeat).
    #[arg(long, required = true)]
    pub(crate) test: Vec<PathBuf>,
    /// Use at most N test images.
    #[arg(long)]
    pub(crate) test_limit: Option<usize>,
    /// Skip the first N test images.
    #[arg(long, default_value_t = 0)]
    pub(crate) test_skip: usize,
    /// Held-out non-adaptive perturbations, also evaluated every round (repeat).
    #[arg(long = "test-uap")]
    pub(crate) test_uaps: Vec<PathBuf>,
    /// Retraining rounds (the adaptive attack runs rounds + 1 times).
    #[arg(long, default_value_t = 2)]
    pub(crate) rounds: usize,
    /// Folder for every round's perturbation, defence and the report (`harden.json`).
    #[arg(long)]
    pub(crate) out_dir: PathBuf,
    /// One more argument for every adaptive attack (repeat), e.g. `--attack-arg=--straight-through`.
    #[arg(long = "attack-arg", allow_hyphen_values = true)]
    pub(crate) attack_args: Vec<String>,
    /// One more argument for every retraining (repeat), e.g. `--defend-arg=--epochs=6`.
    #[arg(long = "defend-arg", allow_hyphen_values = true)]
    pub(crate) defend_args: Vec<String>,
    /// Seed (round r's attack uses seed + r).
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// One JSON object on stdout.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Parser)]
#[command(no_binary_name = true)]
struct AttackLine {
    #[command(flatten)]
    a: AttackArgs,
}

#[derive(Parser)]
#[command(no_binary_name = true)]
struct DefendLine {
    #[command(flatten)]
    a: DefendArgs,
}

fn s(p: &std::path::Path) -> String {
    p.display().to_string()
}

pub(crate) fn harden_cmd(a: HardenArgs, quiet: bool) -> Result<()> {
    if a.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    if !a.defense.is_file() {
        bail!(
            "--defense {}: no such file (harden starts from a trained defence; make one with `sfr defend`)",
            a.defense.display()
        );
    }
    if a.model.onnx.given() {
        bail!(
            "sfr harden takes an ONNX model's preprocessing from MODEL.json beside it, not from options"
        );
    }
    for u in &a.uaps {
        if !u.is_file() {
            bail!("--uap {}: no such file", u.display());
        }
    }
    let model = load_model(&a.model, quiet)?;
    let size = model.spec().input_size;
    // The defence must fit the backbone before hours are spent on it.
    let given = Defense::load(&a.defense, &model, model.device())
        .with_context(|| format!("reading the defence {}", a.defense.display()))?;
    // Every retraining trains the same kind of defence with the same recipe as the given one,
    // but for what --defend-arg sets.
    let carried: Vec<String> = recipe_of(&given, &model)
        .into_iter()
        .filter(|(flag, _)| {
            !a.defend_args
                .iter()
                .any(|u| u == flag || u.starts_with(&format!("{flag}=")))
        })
        .flat_map(|(flag, value)| std::iter::once(flag).chain(value))
        .collect();
    let test = open_data(
        &a.test,
        &a.data.slice.classes,
        a.test_skip,
        a.test_limit,
        quiet,
    )?;
    let test_uaps = load_perturbations(&a.test_uaps, None, size)?;
    std::fs::create_dir_all(&a.out_dir)
        .with_context(|| format!("creating {}", a.out_dir.display()))?;

    let mut base: Vec<String> = vec!["--model".into(), a.model.model.clone()];
    if let Some(w) = &a.model.weights {
        base.extend(["--weights".into(), s(w)]);
    }
    for d in &a.data.data {
        base.extend(["--data".into(), s(d)]);
    }
    if let Some(c) = &a.data.slice.classes {
        base.extend(["--classes".into(), s(c)]);
    }
    if let Some(n) = a.data.slice.limit {
        base.extend(["--limit".into(), n.to_string()]);
    }
    if a.data.slice.skip > 0 {
        base.extend(["--skip".into(), a.data.slice.skip.to_string()]);
    }
    let opts = EvalOptions::default();
    let report_path = a.out_dir.join("harden.json");
    let write_report = |rounds: &[serde_json::Value], n: usize| -> Result<()> {
        let report = json!({
            "model": model.spec().name,
            "test": a.test.iter().map(|p| s(p)).collect::<Vec<_>>(),
            "test_images": n,
            "rounds": rounds,
            "protocol": "round r: SGD-UAP through defence r (sfr attack sgd --defense), evaluated on the test images with defence r; defence r+1: sfr defend on the training UAPs plus every adaptive UAP so far",
        });
        sfr::atomic::write_atomic(
            &report_path,
            serde_json::to_string_pretty(&report)?.as_bytes(),
        )?;
        Ok(())
    };
    let mut defenses = vec![a.defense.clone()];
    let mut adaptive: Vec<PathBuf> = Vec::new();
    let mut rounds = Vec::new();
    for r in 0..=a.rounds {
        let d = defenses[r].clone();
        let ap = a.out_dir.join(format!("round{r}_adaptive.safetensors"));
        let mut line: Vec<String> = vec!["sgd".into()];
        line.extend(base.iter().cloned());
        line.extend([
            "--defense".into(),
            s(&d),
            "--out".into(),
            s(&ap),
            "--seed".into(),
            (a.seed + r as u64).to_string(),
            "--resume".into(),
        ]);
        line.extend(a.attack_args.iter().cloned());
        let attack_line = format!("sfr attack {}", line.join(" "));
        if !ap.is_file() {
            if !quiet {
                eprintln!("round {r}: {attack_line}");
            }
            let args = AttackLine::try_parse_from(&line)
                .with_context(|| format!("the adaptive attack's arguments: {attack_line}"))?
                .a;
            attack_run(args, quiet)?;
        }
        adaptive.push(ap.clone());

        let mut def = Defense::load(&d, &model, model.device())
            .with_context(|| format!("reading the defence {}", d.display()))?;
        let uap = load_perturbations(std::slice::from_ref(&ap), None, size)?;
        let dn = s(&d);
        let rep = eval::evaluate(
            &model,
            &test,
            &uap,
            Some((&dn, &mut def)),
            &opts,
            &mut |_, _| {},
        )?;
        let held_out = if test_uaps.is_empty() {
            None
        } else {
            let t = eval::evaluate(
                &model,
                &test,
                &test_uaps,
                Some((&dn, &mut def)),
                &opts,
                &mut |_, _| {},
            )?;
            t.defended.and_then(|x| x.restoration_accuracy)
        };
        let at = rep.attacked.as_ref();
        let df = rep.defended.as_ref();
        rounds.push(json!({
            "round": r,
            "defense": dn,
            "adaptive_attack": s(&ap),
            "adaptive_attack_command": attack_line,
            "clean_top1": rep.clean_top1,
            "defended_clean_top1": df.map(|x| x.defended_clean_top1),
            "bare_fooling_rate": at.map(|x| x.fooling_rate),
            "defended_fooling_rate": df.and_then(|x| x.defended_fooling_rate),
            "restoration_accuracy": df.and_then(|x| x.restoration_accuracy),
            "restoration_accuracy_baseline": at.map(|x| x.restoration_accuracy_baseline),
            "held_out_uaps_restoration_accuracy": held_out,
        }));
        if !quiet {
            eprintln!(
                "round {r}: adaptive attack fools the defended network on {:.3} (bare {:.3}); restoration {:.3}{}",
                df.and_then(|x| x.defended_fooling_rate).unwrap_or(f64::NAN),
                at.map_or(f64::NAN, |x| x.fooling_rate),
                df.and_then(|x| x.restoration_accuracy).unwrap_or(f64::NAN),
                held_out
                    .map(|h| format!(", {h:.3} against the held-out perturbations"))
                    .unwrap_or_default()
            );
        }
        if r < a.rounds {
            let next = a
                .out_dir
                .join(format!("round{}_defense.safetensors", r + 1));
            let mut line: Vec<String> = base.clone();
            line.extend([
                "--out".into(),
                s(&next),
                "--seed".into(),
                a.seed.to_string(),
                "--resume".into(),
            ]);
            for u in a.uaps.iter().chain(&adaptive) {
                line.extend(["--uap".into(), s(u)]);
            }
            line.extend(carried.iter().cloned());
            line.extend(a.defend_args.iter().cloned());
            let defend_line = format!("sfr defend {}", line.join(" "));
            if !next.is_file() {
                if !quiet {
                    eprintln!("round {r}: {defend_line}");
                }
                let args = DefendLine::try_parse_from(&line)
                    .with_context(|| format!("the retraining's arguments: {defend_line}"))?
                    .a;
                defend_run(args, quiet)?;
            }
            rounds.last_mut().expect("this round")["retrain_command"] = json!(defend_line);
            defenses.push(next);
        }
        write_report(&rounds, rep.n)?;
    }
    let text = std::fs::read_to_string(&report_path)?;
    if a.json {
        let v: serde_json::Value = serde_json::from_str(&text)?;
        println!("{}", serde_json::to_string(&v)?);
    } else {
        println!("round  defended fooling  bare fooling  restoration  held-out UAPs");
        for r in &rounds {
            let f = |k: &str| r[k].as_f64().map_or("—".to_string(), |v| format!("{v:.4}"));
            println!(
                "{:<6} {:<17} {:<13} {:<12} {}",
                r["round"],
                f("defended_fooling_rate"),
                f("bare_fooling_rate"),
                f("restoration_accuracy"),
                f("held_out_uaps_restoration_accuracy")
            );
        }
        println!("wrote {}", report_path.display());
    }
    Ok(())
}

/// The `sfr defend` options that remake `d`: its kind and placement (method, sites or tuned
/// convs, fraction, width, selection, gate) and, from the training configuration it records,
/// its recipe (loss, epochs, batch, rate, schedule, …). Options at their defaults are left out.
fn recipe_of(d: &Defense, model: &sfr::zoo::Model) -> Vec<(String, Option<String>)> {
    use sfr::defense::{Method, PRN_WIDTH, PlanOptions, Selection};
    let mut r: Vec<(String, Option<String>)> = Vec::new();
    let mut put = |flag: &str, value: Option<String>| r.push((flag.to_string(), value));
    let m = &d.meta;
    let plan = PlanOptions::default();
    if m.method != Method::Sfr {
        put("--method", Some(m.method.to_string()));
    }
    match m.method {
        Method::Sfr => {
            put("--sites", Some(m.sites.join(",")));
            if m.fraction != plan.fraction {
                put("--fraction", Some(m.fraction.to_string()));
            }
            let ratios: Vec<f64> = m
                .width
                .iter()
                .zip(&m.regen)
                .map(|(&w, r)| w as f64 / r.len().max(1) as f64)
                .collect();
            if let Some(&q) = ratios.first()
                && ratios.iter().all(|&x| (x - q).abs() < 1e-9)
                && q != plan.width_ratio
            {
                put("--width", Some(q.to_string()));
            }
            if m.selection == Selection::Random {
                put("--selection", Some("random".into()));
            }
        }
        Method::Prn => {
            if let Some(&w) = m.width.first()
                && w != PRN_WIDTH
            {
                put("--prn-width", Some(w.to_string()));
            }
        }
        Method::Uat => {
            if m.tuned.len() != model.sites().len() {
                put("--sites", Some(m.tuned.join(",")));
            }
        }
    }
    if m.gated {
        put("--gate", None);
    }
    let c = &m.training["config"];
    let text = |k: &str| c.get(k).and_then(|v| v.as_str()).map(str::to_string);
    let num = |k: &str| c.get(k).and_then(|v| v.as_f64());
    let yes = |k: &str| c.get(k).and_then(|v| v.as_bool());
    let defaults = sfr::defense::train::TrainConfig::default();
    if let Some(l) = text("loss").filter(|l| l != "ce") {
        put("--loss", Some(l));
    }
    if let Some(s) = text("schedule").filter(|s| s != "constant") {
        put("--schedule", Some(s));
    }
    for (flag, key, default) in [
        ("--epochs", "epochs", defaults.epochs as f64),
        ("--batch-size", "batch_size", defaults.batch_size as f64),
        ("--clean-weight", "clean_weight", defaults.clean_weight),
        ("--crop-scale", "crop_scale", defaults.crop_scale),
    ] {
        if let Some(v) = num(key).filter(|&v| v != default) {
            put(flag, Some(v.to_string()));
        }
    }
    // The rate's default depends on the method, so it is always carried.
    if let Some(v) = num("lr") {
        put("--lr", Some(v.to_string()));
    }
    if let Some(v) = num("uat_step") {
        put("--uat-step", Some(v.to_string()));
    }
    if let Some(v) = num("feature_loss") {
        put("--feature-loss", Some(v.to_string()));
    }
    if m.gated {
        // A gated file without the weight predates the supervision: its switches were not.
        put(
            "--gate-loss",
            Some(num("gate_loss").unwrap_or(0.0).to_string()),
        );
    }
    for (flag, key, when) in [
        ("--keep-best", "keep_best", true),
        ("--pseudo-labels", "pseudo_labels", true),
        ("--no-synthetic", "synthetic", false),
        ("--no-augment", "augment", false),
        ("--no-clip", "clip", false),
    ] {
        if yes(key) == Some(when) {
            put(flag, None);
        }
    }
    r
}
