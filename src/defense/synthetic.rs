//! Synthetic training perturbations (Borkar et al. 2020): convex combinations of a small set V of
//! real UAPs of one norm type, grown until their ℓ2 norm exceeds the smallest in V:
//!
//! ```text
//! η = min over v in V of ‖v‖₂;  v_syn = 0
//! while ‖v_syn‖₂ ≤ η:  α ~ U(0,1);  v_new ~ uniform from V;  v_syn = α·v_new + (1−α)·v_syn
//! ```
//! Each step is a convex combination, so ‖v_syn‖∞ stays within the set's ℓ∞ budget.

use rand::Rng;

use crate::error::{Result, SfrError};

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
        // The loop ends almost surely; the bound only guards against pathological sets.
        for _ in 0..10_000 {
            if l2(&v) > self.eta {
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
        for _ in 0..20 {
            let v = s.draw(&mut rng);
            assert!(v.iter().all(|x| x.abs() <= 10.0 + 1e-4));
            assert!(l2(&v) > s.eta);
        }
    }

    #[test]
    fn empty_set_is_an_error() {
        assert!(Synthesizer::new(&[]).is_err());
    }
}
