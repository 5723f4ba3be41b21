//! The attacks a suite computes for itself: the seen kind at a held-out seed, the unseen kinds
//! (FFF, GD-UAP, DeepFool-UAP), stronger budgets, the other norm, the adaptive attack through
//! the defence, and the random control. Each is an ordinary perturbation file in the suite's
//! folder: a rerun reuses the ones already made and resumes an interrupted one from its
//! checkpoint.

use std::path::{Path, PathBuf};

use super::suite::{AttackRow, Category};
use crate::attack::activations::{ActivationConfig, Objective, Prior};
use crate::attack::deepfool::DeepFoolConfig;
use crate::attack::sgd::SgdConfig;
use crate::attack::{self, Progress, RunContext};
use crate::data::Dataset;
use crate::defense::Defense;
use crate::error::{Result, SfrError};
use crate::perturbation::{Norm, Perturbation};
use crate::zoo::Model;

/// What to compute.
#[derive(Debug, Clone)]
pub struct GeneratePlan {
    /// Base seed; the suite's attacks use seeds from `seed + 100` on, away from training seeds.
    pub seed: u64,
    /// Norm and budget of the defence's training perturbations (the seen kind).
    pub seen: (Norm, f64),
    /// Stronger ℓ∞ budgets.
    pub stronger: Vec<f64>,
    /// ℓ2 budget of the cross-norm row (none: no row).
    pub cross_l2: Option<f64>,
    /// SGD-UAP settings (seen, stronger, cross-norm, adaptive).
    pub sgd: SgdConfig,
    /// FFF and GD-UAP (range prior) iterations (0: no rows).
    pub activation_iterations: usize,
    /// DeepFool-UAP (none: no row).
    pub deepfool: Option<DeepFoolConfig>,
    /// The adaptive attack through the defence.
    pub adaptive: bool,
    /// Images held out from the generation data for the attacks' running estimate.
    pub holdout: usize,
    /// Images per batch.
    pub batch_size: usize,
    /// Clip perturbed pixels.
    pub clip: bool,
}

impl Default for GeneratePlan {
    fn default() -> Self {
        GeneratePlan {
            seed: 0,
            seen: (Norm::Linf, 10.0),
            stronger: vec![15.0, 20.0, 25.0],
            cross_l2: Some(2000.0),
            sgd: SgdConfig::default(),
            activation_iterations: 200,
            deepfool: Some(DeepFoolConfig {
                max_passes: 1,
                ..DeepFoolConfig::default()
            }),
            adaptive: true,
            holdout: 50,
            batch_size: 32,
            clip: true,
        }
    }
}

enum Job {
    Sgd(Norm, f64, bool),
    Random(Norm, f64),
    Activation(Objective, Prior),
    DeepFool(DeepFoolConfig),
}

struct Planned {
    key: String,
    name: String,
    category: Category,
    seed: u64,
    job: Job,
}

fn eps_key(e: f64) -> String {
    format!("{}", e).replace('.', "p")
}

fn plan_jobs(plan: &GeneratePlan) -> Vec<Planned> {
    let s = plan.seed + 100;
    let (sn, se) = plan.seen;
    let sym = |n: Norm| if n == Norm::Linf { "ℓ∞" } else { "ℓ2" };
    let mut v = vec![
        Planned {
            key: format!("seen_sgd_{sn}_{}", eps_key(se)),
            name: format!("sgd {} {} (held-out seed)", sym(sn), se),
            category: Category::Seen,
            seed: s,
            job: Job::Sgd(sn, se, false),
        },
        Planned {
            key: format!("control_random_{sn}_{}", eps_key(se)),
            name: format!("random sign noise {} {}", sym(sn), se),
            category: Category::Control,
            seed: s,
            job: Job::Random(sn, se),
        },
    ];
    if plan.activation_iterations > 0 {
        v.push(Planned {
            key: "unseen_fff".into(),
            name: format!("FFF {} {}", sym(sn), se),
            category: Category::Unseen,
            seed: s,
            job: Job::Activation(Objective::Fff, Prior::None),
        });
        v.push(Planned {
            key: "unseen_gduap_range".into(),
            name: format!("GD-UAP (range prior) {} {}", sym(sn), se),
            category: Category::Unseen,
            seed: s,
            job: Job::Activation(Objective::GdUap, Prior::Range),
        });
    }
    if let Some(df) = &plan.deepfool {
        v.push(Planned {
            key: "unseen_deepfool".into(),
            name: format!("DeepFool-UAP {} {}", sym(sn), se),
            category: Category::Unseen,
            seed: s,
            job: Job::DeepFool(df.clone()),
        });
    }
    for &e in &plan.stronger {
        v.push(Planned {
            key: format!("stronger_sgd_linf_{}", eps_key(e)),
            name: format!("sgd ℓ∞ {e}"),
            category: Category::Stronger,
            seed: s,
            job: Job::Sgd(Norm::Linf, e, false),
        });
    }
    if let Some(e) = plan.cross_l2 {
        v.push(Planned {
            key: format!("crossnorm_sgd_l2_{}", eps_key(e)),
            name: format!("sgd ℓ2 {e}"),
            category: Category::CrossNorm,
            seed: s,
            job: Job::Sgd(Norm::L2, e, false),
        });
    }
    if plan.adaptive {
        v.push(Planned {
            key: format!("adaptive_sgd_{sn}_{}", eps_key(se)),
            name: format!("adaptive sgd {} {} through the defence", sym(sn), se),
            category: Category::Adaptive,
            seed: s,
            job: Job::Sgd(sn, se, true),
        });
    }
    v
}

/// Names of the rows [`generate`] would make, in order (for progress displays).
pub fn planned_names(plan: &GeneratePlan) -> Vec<String> {
    plan_jobs(plan).into_iter().map(|p| p.name).collect()
}

/// Compute (or reuse from `dir`) every planned attack on `data` and return them as rows.
/// `progress(row name, attack progress)` reports as they go.
pub fn generate(
    plan: &GeneratePlan,
    model: &Model,
    defense: &Defense,
    data: &Dataset,
    dir: &Path,
    progress: &mut dyn FnMut(&str, &Progress),
) -> Result<Vec<AttackRow>> {
    plan.sgd.validate()?;
    if let Some(df) = &plan.deepfool {
        df.validate()?;
    }
    if data.samples.len() < 2 {
        return Err(SfrError::NoImages(
            "the attack-generation data needs at least 2 images".into(),
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| SfrError::io(dir, e))?;
    let holdout = plan.holdout.min(data.samples.len() / 2).max(1);
    let mut rows = Vec::new();
    for job in plan_jobs(plan) {
        let path = dir.join(format!("{}.safetensors", job.key));
        let p = match reuse(&path, model, defense, &job)? {
            Some(p) => p,
            None => {
                let (train, hold) = attack::split_holdout(data, holdout, job.seed)?;
                let (norm, eps) = match &job.job {
                    Job::Sgd(n, e, _) | Job::Random(n, e) => (*n, *e),
                    _ => plan.seen,
                };
                let mut ckpt = path.clone().into_os_string();
                ckpt.push(".ckpt");
                let ckpt = PathBuf::from(ckpt);
                let name = job.name.clone();
                let mut report = |p: &Progress| progress(&name, p);
                let mut ctx = RunContext {
                    model,
                    train: &train,
                    holdout: &hold,
                    norm,
                    eps,
                    seed: job.seed,
                    clip: plan.clip,
                    batch_size: plan.batch_size,
                    checkpoint: Some(ckpt.clone()),
                    resume: true,
                    progress: &mut report,
                    defense: match job.job {
                        Job::Sgd(_, _, true) => Some(defense),
                        _ => None,
                    },
                };
                let p = match &job.job {
                    Job::Sgd(..) => attack::sgd::run(&plan.sgd, &mut ctx)?,
                    Job::Random(..) => attack::random::run(&mut ctx)?,
                    Job::Activation(o, pr) => {
                        let mut c = ActivationConfig::new(*o, *pr);
                        c.iterations = plan.activation_iterations;
                        attack::activations::run(&c, &mut ctx)?
                    }
                    Job::DeepFool(c) => attack::deepfool::run(c, &mut ctx)?,
                };
                p.save(&path)?;
                let _ = std::fs::remove_file(&ckpt);
                p
            }
        };
        rows.push(AttackRow {
            name: job.name,
            category: job.category,
            files: vec![path.display().to_string()],
            perturbations: vec![p],
        });
    }
    Ok(rows)
}

/// A perturbation made earlier by the same job (for the adaptive attack: through the same
/// defence), or None; a file of another job, model or defence under the job's name is an error
/// rather than silently reused or overwritten.
fn reuse(
    path: &Path,
    model: &Model,
    defense: &Defense,
    job: &Planned,
) -> Result<Option<Perturbation>> {
    if !path.is_file() {
        return Ok(None);
    }
    let p = Perturbation::load(path)?;
    let attack = match job.job {
        Job::Sgd(..) => "sgd",
        Job::Random(..) => "random",
        Job::Activation(Objective::Fff, _) => "fff",
        Job::Activation(Objective::GdUap, _) => "gduap",
        Job::DeepFool(_) => "deepfool",
    };
    let same = p.meta.attack == attack
        && p.meta.model.as_deref() == Some(model.spec().name)
        && p.meta.seed == Some(job.seed)
        && match job.job {
            Job::Sgd(n, e, _) | Job::Random(n, e) => p.meta.norm == n && p.meta.eps == e,
            _ => true,
        }
        && p.meta
            .params
            .get("through_defense")
            .map(|t| t["id"].clone())
            == matches!(job.job, Job::Sgd(_, _, true)).then(|| serde_json::json!(defense.id()));
    if !same {
        return Err(SfrError::param(
            "suite",
            format!(
                "{} exists but was made by another run ({} {} ξ={} on {:?}); move it away or choose another --out",
                path.display(),
                p.meta.attack,
                p.meta.norm,
                p.meta.eps,
                p.meta.model
            ),
        ));
    }
    Ok(Some(p))
}
