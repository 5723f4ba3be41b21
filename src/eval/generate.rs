//! The attacks a suite computes for itself: the seen kind at a held-out seed, the unseen kinds
//! (FFF, GD-UAP, DeepFool-UAP), stronger budgets, the other norm, the adaptive attack through
//! the defence, and the random control. Each is an ordinary perturbation file in the suite's
//! folder: a rerun reuses the ones already made and resumes an interrupted one from its
//! checkpoint.

use std::path::{Path, PathBuf};

use super::suite::{AttackRow, Category, Rival};
use crate::attack::activations::{ActivationConfig, Objective, Prior};
use crate::attack::deepfool::DeepFoolConfig;
use crate::attack::sgd::SgdConfig;
use crate::attack::{self, Progress, RunContext};
use crate::data::Dataset;
use crate::defense::Defense;
use crate::defense::baselines::ImageDefense;
use crate::error::{Result, SfrError};
use crate::perturbation::{Norm, Perturbation};
use crate::zoo::Model;

/// An attack kind the suite can compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// SGD-UAP.
    Sgd,
    /// FFF (data-free).
    Fff,
    /// GD-UAP with a prior.
    GdUap(Prior),
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Sgd => "sgd",
            Kind::Fff => "FFF",
            Kind::GdUap(Prior::None) => "GD-UAP",
            Kind::GdUap(Prior::Range) => "GD-UAP (range prior)",
            Kind::GdUap(Prior::Data) => "GD-UAP (data prior)",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Kind::Sgd => "sgd",
            Kind::Fff => "fff",
            Kind::GdUap(Prior::None) => "gduap",
            Kind::GdUap(Prior::Range) => "gduap_range",
            Kind::GdUap(Prior::Data) => "gduap_data",
        }
    }

    fn job(self) -> Job {
        match self {
            Kind::Sgd => Job::Sgd {
                through: Through::Nothing,
            },
            Kind::Fff => Job::Activation(Objective::Fff, Prior::None),
            Kind::GdUap(p) => Job::Activation(Objective::GdUap, p),
        }
    }
}

/// What to compute.
#[derive(Debug, Clone)]
pub struct GeneratePlan {
    /// Base seed; the suite's attacks use seeds from `seed + 100` on, away from training seeds.
    pub seed: u64,
    /// The kind, norm and budget of the defence's training perturbations: the seen row, and
    /// the kind of the stronger and cross-norm rows.
    pub seen: (Kind, Norm, f64),
    /// Unseen kinds (besides DeepFool-UAP).
    pub unseen: Vec<Kind>,
    /// Stronger ℓ∞ budgets.
    pub stronger: Vec<f64>,
    /// ℓ2 budget of the cross-norm row (none: no row).
    pub cross_l2: Option<f64>,
    /// SGD-UAP settings (also the adaptive attack's).
    pub sgd: SgdConfig,
    /// FFF and GD-UAP iterations.
    pub activation_iterations: usize,
    /// DeepFool-UAP (none: no row).
    pub deepfool: Option<DeepFoolConfig>,
    /// The adaptive attack: SGD-UAP through the defended network.
    pub adaptive: bool,
    /// Learned rivals (`sfr suite --rival`): with `adaptive`, an SGD-UAP row through each,
    /// with exact gradients, as through the defence under test.
    pub rivals: Vec<Rival>,
    /// Adaptive rows for image-domain baselines too: SGD-UAP through each filter, straight
    /// through it (BPDA), so that every column faces an attacker who knows it.
    pub adaptive_baselines: Vec<ImageDefense>,
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
            seen: (Kind::Sgd, Norm::Linf, 10.0),
            unseen: vec![Kind::Fff, Kind::GdUap(Prior::Range)],
            stronger: vec![15.0, 20.0, 25.0],
            cross_l2: Some(2000.0),
            sgd: SgdConfig::default(),
            activation_iterations: 200,
            deepfool: Some(DeepFoolConfig {
                max_passes: 1,
                overshoot: crate::attack::deepfool::ONE_PASS_OVERSHOOT,
                ..DeepFoolConfig::default()
            }),
            adaptive: true,
            rivals: Vec::new(),
            adaptive_baselines: ImageDefense::suite(),
            holdout: 50,
            batch_size: 32,
            clip: true,
        }
    }
}

/// What an SGD-UAP job differentiates through.
#[derive(Clone, Copy, PartialEq)]
enum Through {
    /// The bare network.
    Nothing,
    /// The defence under test.
    Defence,
    /// A learned rival (its index in the plan's rivals).
    Rival(usize),
    /// An image-domain baseline, straight through.
    Filter(ImageDefense),
}

#[derive(Clone)]
enum Job {
    Sgd { through: Through },
    Random,
    Activation(Objective, Prior),
    DeepFool(DeepFoolConfig),
}

struct Planned {
    key: String,
    name: String,
    category: Category,
    seed: u64,
    norm: Norm,
    eps: f64,
    job: Job,
}

fn eps_key(e: f64) -> String {
    format!("{}", e).replace('.', "p")
}

fn sym(n: Norm) -> &'static str {
    if n == Norm::Linf { "ℓ∞" } else { "ℓ2" }
}

fn plan_jobs(plan: &GeneratePlan) -> Vec<Planned> {
    let s = plan.seed + 100;
    let (kind, sn, se) = plan.seen;
    let job = |key: String, name: String, category, norm, eps, job| Planned {
        key,
        name,
        category,
        seed: s,
        norm,
        eps,
        job,
    };
    let mut v = vec![
        job(
            format!("seen_{}_{sn}_{}", kind.key(), eps_key(se)),
            format!("{} {} {} (held-out seed)", kind.label(), sym(sn), se),
            Category::Seen,
            sn,
            se,
            kind.job(),
        ),
        job(
            format!("control_random_{sn}_{}", eps_key(se)),
            format!("random sign noise {} {}", sym(sn), se),
            Category::Control,
            sn,
            se,
            Job::Random,
        ),
    ];
    for &k in plan.unseen.iter().filter(|&&k| k != kind) {
        v.push(job(
            format!("unseen_{}", k.key()),
            format!("{} {} {}", k.label(), sym(sn), se),
            Category::Unseen,
            sn,
            se,
            k.job(),
        ));
    }
    if let Some(df) = &plan.deepfool {
        v.push(job(
            "unseen_deepfool".into(),
            format!("DeepFool-UAP {} {}", sym(sn), se),
            Category::Unseen,
            sn,
            se,
            Job::DeepFool(df.clone()),
        ));
    }
    for &e in &plan.stronger {
        v.push(job(
            format!("stronger_{}_linf_{}", kind.key(), eps_key(e)),
            format!("{} ℓ∞ {e}", kind.label()),
            Category::Stronger,
            Norm::Linf,
            e,
            kind.job(),
        ));
    }
    if let Some(e) = plan.cross_l2 {
        v.push(job(
            format!("crossnorm_{}_l2_{}", kind.key(), eps_key(e)),
            format!("{} ℓ2 {e}", kind.label()),
            Category::CrossNorm,
            Norm::L2,
            e,
            kind.job(),
        ));
    }
    if plan.adaptive {
        v.push(job(
            format!("adaptive_sgd_{sn}_{}", eps_key(se)),
            format!("adaptive sgd {} {} through the defence", sym(sn), se),
            Category::Adaptive,
            sn,
            se,
            Job::Sgd {
                through: Through::Defence,
            },
        ));
        for (i, r) in plan.rivals.iter().enumerate() {
            v.push(job(
                format!("adaptive_sgd_{sn}_{}_through_{}", eps_key(se), r.name),
                format!("adaptive sgd {} {} through {}", sym(sn), se, r.name),
                Category::Adaptive,
                sn,
                se,
                Job::Sgd {
                    through: Through::Rival(i),
                },
            ));
        }
        for b in &plan.adaptive_baselines {
            v.push(job(
                format!("adaptive_sgd_{sn}_{}_through_{b}", eps_key(se)),
                format!("adaptive sgd {} {} through {b} (BPDA)", sym(sn), se),
                Category::Adaptive,
                sn,
                se,
                Job::Sgd {
                    through: Through::Filter(*b),
                },
            ));
        }
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
        let through = match job.job {
            Job::Sgd {
                through: Through::Defence,
            } => Some(defense),
            Job::Sgd {
                through: Through::Rival(i),
            } => Some(&plan.rivals[i].defense),
            _ => None,
        };
        let p = match reuse(&path, model, through, &job, &plan.sgd)? {
            Some(p) => p,
            None => {
                let (train, hold) = attack::split_holdout(data, holdout, job.seed)?;
                let mut ckpt = path.clone().into_os_string();
                ckpt.push(".ckpt");
                let ckpt = PathBuf::from(ckpt);
                let name = job.name.clone();
                let mut report = |p: &Progress| progress(&name, p);
                let mut ctx = RunContext {
                    model,
                    train: &train,
                    holdout: &hold,
                    norm: job.norm,
                    eps: job.eps,
                    seed: job.seed,
                    clip: plan.clip,
                    batch_size: plan.batch_size,
                    checkpoint: Some(ckpt.clone()),
                    resume: true,
                    checkpoint_every: attack::CHECKPOINT_EVERY,
                    progress: &mut report,
                    defense: through.map(|d| d as &dyn crate::classifier::Plant),
                    filter: match &job.job {
                        Job::Sgd {
                            through: Through::Filter(f),
                        } => Some(f as &dyn crate::classifier::InputFilter),
                        _ => None,
                    },
                };
                let p = match &job.job {
                    Job::Sgd { .. } => attack::sgd::run(&plan.sgd, &mut ctx)?,
                    Job::Random => attack::random::run(&mut ctx)?,
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

/// A perturbation made earlier by the same job (for an adaptive attack: through the same
/// defence, `through`), or None; a file of another job, model or defence under the job's name
/// is an error rather than silently reused or overwritten.
/// Whether an SGD-UAP file's parameters are those `sgd` would run with (files from before
/// momentum and mirroring existed lack those keys: they are plain sign steps).
fn sgd_settings_match(q: &serde_json::Value, sgd: &SgdConfig) -> bool {
    let num = |k: &str, absent: Option<f64>| q.get(k).map_or(absent, |v| v.as_f64());
    num("epochs", None) == Some(sgd.epochs as f64)
        && num("step", None) == Some(sgd.step)
        && num("decay", None) == Some(sgd.decay)
        && num("beta", None) == Some(sgd.beta)
        && num("momentum", Some(0.0)) == Some(sgd.momentum)
        && q.get("flip").map_or(Some(false), |v| v.as_bool()) == Some(sgd.flip)
}

fn reuse(
    path: &Path,
    model: &Model,
    through: Option<&Defense>,
    job: &Planned,
    sgd: &SgdConfig,
) -> Result<Option<Perturbation>> {
    if !path.is_file() {
        return Ok(None);
    }
    let p = Perturbation::load(path)?;
    let attack = match job.job {
        Job::Sgd { .. } => "sgd",
        Job::Random => "random",
        Job::Activation(Objective::Fff, _) => "fff",
        Job::Activation(Objective::GdUap, _) => "gduap",
        Job::DeepFool(_) => "deepfool",
    };
    let prior = match job.job {
        Job::Activation(_, p) => Some(serde_json::json!(p)),
        _ => None,
    };
    let same = p.meta.attack == attack
        && p.meta.model.as_deref() == Some(&*model.spec().name)
        && p.meta.seed == Some(job.seed)
        && p.meta.norm == job.norm
        && p.meta.eps == job.eps
        && prior.is_none_or(|pr| p.meta.params.get("prior") == Some(&pr))
        && p.meta
            .params
            .get("through_defense")
            .map(|t| t["id"].clone())
            == through.map(|d| serde_json::json!(d.id()))
        && p.meta
            .params
            .get("through_filter")
            .map(|t| t["filter"].clone())
            == match &job.job {
                Job::Sgd {
                    through: Through::Filter(f),
                } => Some(serde_json::json!(f.to_string())),
                _ => None,
            };
    let sgd_same = !matches!(job.job, Job::Sgd { .. }) || sgd_settings_match(&p.meta.params, sgd);
    if same && !sgd_same {
        return Err(SfrError::param(
            "suite",
            format!(
                "{} exists but is an SGD-UAP made with other settings (epochs, step, decay, β, momentum or mirroring) than this run's; move it away or choose another --out",
                path.display()
            ),
        ));
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reused_sgd_uap_must_have_the_runs_settings() {
        let sgd = SgdConfig::default();
        let made = |momentum: Option<f64>, flip: Option<bool>, epochs: usize| {
            let mut q = serde_json::json!({
                "epochs": epochs, "step": sgd.step, "decay": sgd.decay, "beta": sgd.beta,
            });
            if let Some(m) = momentum {
                q["momentum"] = m.into();
            }
            if let Some(f) = flip {
                q["flip"] = f.into();
            }
            q
        };
        assert!(sgd_settings_match(
            &made(Some(sgd.momentum), Some(true), sgd.epochs),
            &sgd
        ));
        // Another epoch count, no mirroring, or a file from before momentum existed.
        assert!(!sgd_settings_match(
            &made(Some(sgd.momentum), Some(true), 3),
            &sgd
        ));
        assert!(!sgd_settings_match(
            &made(Some(sgd.momentum), Some(false), sgd.epochs),
            &sgd
        ));
        assert!(!sgd_settings_match(&made(None, None, sgd.epochs), &sgd));
        let plain = SgdConfig {
            momentum: 0.0,
            flip: false,
            ..SgdConfig::default()
        };
        assert!(sgd_settings_match(&made(None, None, sgd.epochs), &plain));
    }
}
