//! Filter ranking by susceptibility: a filter's ℓ1 weight norm bounds how far additive noise can
//! move its response (‖W_j ∗ r‖∞ ≤ ‖W_j‖₁ · ‖r‖∞), so larger norms rank first.

use serde::Serialize;

use crate::error::{Result, SfrError};
use crate::zoo::Model;

/// One site's channels, most susceptible first.
#[derive(Debug, Clone, Serialize)]
pub struct SiteRanking {
    /// Site name.
    pub site: String,
    /// Channel indices ordered by descending ℓ1 norm (ties by index).
    pub order: Vec<usize>,
    /// ℓ1 norm of each channel's filter, indexed by channel (bias excluded).
    pub l1: Vec<f64>,
}

/// Rank the output channels of the conv at `site` by the ℓ1 norm of their filters.
pub fn rank_site(model: &Model, site: &str) -> Result<SiteRanking> {
    let conv = model.conv(site).ok_or_else(|| {
        SfrError::param(
            "site",
            format!(
                "`{site}` is not a site of {} (`sfr rank` lists them)",
                model.spec().name
            ),
        )
    })?;
    let [c, cin, kh, kw] = conv.weight.dims();
    let w = conv
        .weight
        .clone()
        .into_data()
        .try_into_vec::<f32>()
        .map_err(|e| {
            SfrError::param(
                "site",
                format!("cannot read the weights of `{site}`: {e:?}"),
            )
        })?;
    let per = cin * kh * kw;
    let l1: Vec<f64> = (0..c)
        .map(|j| {
            w[j * per..(j + 1) * per]
                .iter()
                .map(|v| v.abs() as f64)
                .sum()
        })
        .collect();
    let mut order: Vec<usize> = (0..c).collect();
    order.sort_by(|&a, &b| l1[b].total_cmp(&l1[a]).then(a.cmp(&b)));
    Ok(SiteRanking {
        site: site.to_string(),
        order,
        l1,
    })
}

/// Rank every site of the model.
pub fn rank_all(model: &Model) -> Result<Vec<SiteRanking>> {
    model
        .sites()
        .iter()
        .map(|s| rank_site(model, &s.name))
        .collect()
}
