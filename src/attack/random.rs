//! The random control: a random-sign pattern of the same norm and budget (ℓ∞: ±ξ per pixel;
//! ℓ2: random signs scaled to ‖v‖₂ = ξ). Any attack worth its name must beat it.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use super::{RunContext, base_meta, finish};
use crate::classifier::{clean_predictions, fooling_rate};
use crate::error::Result;
use crate::perturbation::{self, Norm, Perturbation};

/// Draw the random-sign perturbation and measure it on the held-out images.
pub fn run(ctx: &mut RunContext) -> Result<Perturbation> {
    perturbation::check_eps(ctx.norm, ctx.eps)?;
    let size = ctx.model.spec().input_size;
    let mut rng = ChaCha8Rng::seed_from_u64(ctx.seed);
    let n = 3 * size * size;
    let scale = match ctx.norm {
        Norm::Linf => ctx.eps,
        Norm::L2 => ctx.eps / (n as f64).sqrt(),
    } as f32;
    let values: Vec<f32> = (0..n)
        .map(|_| if rng.random::<bool>() { scale } else { -scale })
        .collect();
    let mut meta = base_meta(ctx, "random", json!({ "distribution": "random sign" }));
    meta.n_images = 0;
    let hold = &ctx.holdout.samples;
    let p = finish(values, size, meta)?;
    if hold.is_empty() {
        // `--holdout 0`: nothing to measure the control on.
        return Ok(p);
    }
    let target = ctx.target()?;
    let clean = clean_predictions(&target, hold, ctx.batch_size, |_| {})?;
    let fr = fooling_rate(
        &target,
        hold,
        &clean,
        &p.to_tensor(ctx.model.device()),
        ctx.clip,
        ctx.batch_size,
    )?;
    let mut p = p;
    p.meta.fooling_rate = Some(fr);
    p.meta.fooling_rate_n = Some(hold.len());
    Ok(p)
}
