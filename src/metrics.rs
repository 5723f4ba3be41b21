//! Metrics, each named as it is printed: top-k accuracy against labels, fooling rate (label
//! change against the clean prediction), restoration accuracy (Borkar et al.'s formula).

/// The `k` highest-scoring classes of one row of logits, best first.
pub fn top_k(logits: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    let k = k.min(idx.len());
    idx.select_nth_unstable_by(k.saturating_sub(1), |&a, &b| {
        logits[b].total_cmp(&logits[a]).then(a.cmp(&b))
    });
    idx.truncate(k);
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    idx
}

/// Softmax of one row of logits.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = logits.iter().map(|&v| (v - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

/// Running top-1 / top-5 counts.
#[derive(Debug, Default, Clone, Copy)]
pub struct TopK {
    /// Images counted.
    pub n: usize,
    /// Images whose label is the top-1 prediction.
    pub top1: usize,
    /// Images whose label is among the top-5 predictions.
    pub top5: usize,
}

impl TopK {
    /// Count one image.
    pub fn add(&mut self, logits: &[f32], label: usize) {
        let t = top_k(logits, 5);
        self.n += 1;
        if t.first() == Some(&label) {
            self.top1 += 1;
        }
        if t.contains(&label) {
            self.top5 += 1;
        }
    }

    /// Top-1 accuracy (0 when nothing was counted).
    pub fn top1_rate(&self) -> f64 {
        ratio(self.top1, self.n)
    }

    /// Top-5 accuracy.
    pub fn top5_rate(&self) -> f64 {
        ratio(self.top5, self.n)
    }
}

/// `a / b`, 0 when `b` is 0.
pub fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

/// Restoration accuracy (Borkar et al. 2020): `(acc_clean_defended + acc_perturbed_defended) /
/// (2 · acc_clean_baseline)`.
pub fn restoration_accuracy(
    defended_clean: f64,
    defended_perturbed: f64,
    baseline_clean: f64,
) -> f64 {
    if baseline_clean <= 0.0 {
        return 0.0;
    }
    (defended_clean + defended_perturbed) / (2.0 * baseline_clean)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_orders_and_breaks_ties_by_index() {
        let l = [0.1, 3.0, 2.0, 3.0, -1.0];
        assert_eq!(top_k(&l, 3), vec![1, 3, 2]);
        assert_eq!(top_k(&l, 10), vec![1, 3, 2, 0, 4]);
    }

    #[test]
    fn topk_counts() {
        let mut t = TopK::default();
        let mut l = vec![0.0f32; 10];
        l[7] = 5.0;
        l[2] = 4.0;
        t.add(&l, 7);
        t.add(&l, 2);
        t.add(&l, 9);
        // Label 9 is not among the top five (7, 2, then the zeros 0, 1, 3 by index).
        assert_eq!((t.n, t.top1, t.top5), (3, 1, 2));
        assert!((t.top1_rate() - 1.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn restoration_of_undefended_baseline() {
        // (1 + acc_adv/acc_clean)/2 for the undefended network.
        let r = restoration_accuracy(0.8, 0.4, 0.8);
        assert!((r - 0.75).abs() < 1e-12);
    }

    #[test]
    fn softmax_sums_to_one() {
        let p = softmax(&[1.0, 2.0, 3.0]);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(p[2] > p[1] && p[1] > p[0]);
    }
}
