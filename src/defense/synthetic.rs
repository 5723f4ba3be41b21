//! Synthetic training perturbations (Borkar et al. 2020): convex combinations of a small set V of
//! real UAPs of one norm type, grown until their ℓ2 norm exceeds the smallest in V:
//!
//! ```text
//! η = min over v in V of ‖v‖₂;  v_syn = 0
//! while ‖v_syn‖₂ ≤ η:  α ~ U(0,1);  v_new ~ uniform from V;  v_syn = α·v_new + (1−α)·v_syn
//! ```
//! Each step is a convex combination, so ‖v_syn‖∞ stays within the set's ℓ∞ budget.
//!
//! One change, for termination: a convex combination is never longer than the longest vector
//! combined, so when every v in V has the same ℓ2 norm (ℓ2 UAPs all sit on the radius ξ) the
//! literal loop never ends, and when the norms are close it runs for a long time and returns
//! little more than one of the originals. sfr stops once ‖v_syn‖₂ ≥ ρ·η, with ρ = 0.9
//! ([`STOP_RATIO`]), and after at most [`MAX_STEPS`] steps.

use rand::Rng;

use crate::error::{Result, SfrError};

/// The loop stops once ‖v_syn‖₂ reaches this fraction of η.
pub const STOP_RATIO: f64 = 0.9;

/// The most convex-combination steps per draw.
pub const MAX_STEPS: usize = 1000;

/// Draws synthetic perturbations from a set of real ones.
pub struct Synthesizer<'a> {
    set: &'a [Vec<f32>],
    eta: f64,
}

fn l2(v: &[f32]) -> f64 {
    v.iter()
        .map(|x| (*x as f64) * (*x as f64))
        .sum::<f64>()
        .sqrt()
}

impl<'a> Synthesizer<'a> {
    /// A synthesizer over `set` (equal-length perturbations).
    pub fn new(set: &'a [Vec<f32>]) -> Result<Self> {
        let first = set.first().ok_or_else(|| {
            SfrError::param("--uap", "synthesis needs at least one real perturbation")
        })?;
        if set.iter().any(|v| v.len() != first.len()) {
            return Err(SfrError::param(
                "--uap",
                "synthesis needs perturbations of one size",
            ));
        }
        let eta = set.iter().map(|v| l2(v)).fold(f64::INFINITY, f64::min);
        if eta <= 0.0 {
            return Err(SfrError::param(
                "--uap",
                "a zero perturbation cannot seed synthesis",
            ));
        }
        Ok(Synthesizer { set, eta })
    }

    /// One synthetic perturbation.
    pub fn draw(&self, rng: &mut impl Rng) -> Vec<f32> {
        let mut v = vec![0f32; self.set[0].len()];
        for _ in 0..MAX_STEPS {
            if l2(&v) >= STOP_RATIO * self.eta {
                break;
            }
            let a: f32 = rng.random();
            let pick = &self.set[rng.random_range(0..self.set.len())];
            for (x, p) in v.iter_mut().zip(pick) {
                *x = a * p + (1.0 - a) * *x;
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn synthetic_stays_in_the_linf_ball_and_reaches_eta() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let set: Vec<Vec<f32>> = (0..3)
            .map(|_| {
                (0..300)
                    .map(|_| if rng.random::<bool>() { 10.0 } else { -10.0 })
                    .collect()
            })
            .collect();
        let s = Synthesizer::new(&set).unwrap();
        let draws: Vec<Vec<f32>> = (0..20).map(|_| s.draw(&mut rng)).collect();
        for v in &draws {
            assert!(v.iter().all(|x| x.abs() <= 10.0 + 1e-4));
            assert!(l2(v) >= STOP_RATIO * s.eta);
        }
        // Draws differ from each other and from the members.
        assert!(draws.windows(2).any(|w| w[0] != w[1]));
        assert!(draws.iter().any(|v| set.iter().all(|m| m != v)));
    }

    #[test]
    fn empty_set_is_an_error() {
        assert!(Synthesizer::new(&[]).is_err());
    }
}
