//! Data set listings: a folder with a `labels.csv`, or an ImageFolder tree of synset-named class
//! folders. Listed files are not opened here; decoding (and so a missing file) is reported per
//! item by [`load_batch`].

use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::classes::ClassTable;
use super::{DataError, NUM_CLASSES};

/// One image of a data set and its class index (if known).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub path: PathBuf,
    pub label: Option<usize>,
}

/// A list of samples and the folders they were listed from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dataset {
    pub samples: Vec<Sample>,
    pub sources: Vec<PathBuf>,
}

/// Extensions of image files in ImageFolder trees (compared case-insensitively).
pub const IMAGE_EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

fn is_image_file(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Dataset {
    /// Lists the data set in `dir`.
    ///
    /// With a `dir/labels.csv`: its header must have the columns `file` and `label` (others are
    /// ignored); `file` is relative to `dir`, `label` an integer in `0..1000`.
    ///
    /// Otherwise, a folder holding only image files (no sub-folders) is listed unlabelled, in
    /// sorted order. Otherwise `dir` is an ImageFolder tree: each sub-folder is named by a WordNet synset that
    /// `classes` maps to a class index, and holds (possibly in nested folders) images ending in
    /// .jpg/.jpeg/.png in any case, listed in sorted order. Hidden entries (starting with `.`)
    /// are skipped.
    pub fn open(dir: impl AsRef<Path>, classes: Option<&ClassTable>) -> Result<Self, DataError> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(DataError::MissingDir {
                path: dir.to_path_buf(),
            });
        }
        let csv = dir.join("labels.csv");
        let samples = if csv.is_file() {
            let text = std::fs::read_to_string(&csv).map_err(io_error(&csv))?;
            parse_labels_csv(&text, &csv, dir)?
        } else {
            open_image_folder(dir, classes)?
        };
        Ok(Dataset {
            samples,
            sources: vec![dir.to_path_buf()],
        })
    }

    /// All samples of the data sets in order.
    pub fn concat(datasets: Vec<Dataset>) -> Dataset {
        let mut out = Dataset::default();
        for d in datasets {
            out.samples.extend(d.samples);
            out.sources.extend(d.sources);
        }
        out
    }

    /// Keeps the first `n` samples.
    pub fn limit(mut self, n: usize) -> Dataset {
        self.samples.truncate(n);
        self
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

/// Decodes (or otherwise loads) each sample's file in parallel on rayon's pool, in order; each
/// item's error is kept so that the caller can skip it with a warning or stop.
///
/// ```no_run
/// use sfr::data::{Dataset, load_batch, load_rgb, resize_and_center_crop};
/// # fn main() -> Result<(), sfr::data::DataError> {
/// let dataset = Dataset::open("images", None)?;
/// let batch = load_batch(&dataset.samples, |p| resize_and_center_crop(&load_rgb(p)?, 256, 224));
/// for (sample, result) in dataset.samples.iter().zip(&batch) {
///     if let Err(e) = result {
///         eprintln!("skipping {}: {e}", sample.path.display());
///     }
/// }
/// # Ok(())
/// # }
/// ```
pub fn load_batch<T, F>(samples: &[Sample], loader: F) -> Vec<Result<T, DataError>>
where
    T: Send,
    F: Fn(&Path) -> Result<T, DataError> + Sync,
{
    samples.par_iter().map(|s| loader(&s.path)).collect()
}

fn open_image_folder(dir: &Path, classes: Option<&ClassTable>) -> Result<Vec<Sample>, DataError> {
    let mut class_dirs = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_error(dir))? {
        let entry = entry.map_err(io_error(dir))?;
        let path = entry.path();
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        if !hidden && path.is_dir() {
            class_dirs.push(path);
        }
    }
    if class_dirs.is_empty() {
        // A flat folder of images: unlabelled (for attacks and `--pseudo-labels` training).
        let mut files = Vec::new();
        collect_images(dir, &mut files)?;
        if files.is_empty() {
            return Err(DataError::NoClassFolders {
                path: dir.to_path_buf(),
            });
        }
        files.sort();
        return Ok(files
            .into_iter()
            .map(|path| Sample { path, label: None })
            .collect());
    }
    let Some(classes) = classes else {
        return Err(DataError::NoClassTable {
            path: dir.to_path_buf(),
        });
    };
    class_dirs.sort();
    let mut samples = Vec::new();
    for class_dir in class_dirs {
        let name = class_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let label = classes
            .index_of_synset(&name)
            .ok_or_else(|| DataError::UnknownSynset {
                path: class_dir.clone(),
                name: name.clone(),
            })?;
        let mut files = Vec::new();
        collect_images(&class_dir, &mut files)?;
        if files.is_empty() {
            return Err(DataError::NoImages { path: class_dir });
        }
        files.sort();
        samples.extend(files.into_iter().map(|path| Sample {
            path,
            label: Some(label),
        }));
    }
    Ok(samples)
}

/// Image files under `dir`, recursively (as torchvision's ImageFolder walks).
fn collect_images(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), DataError> {
    for entry in std::fs::read_dir(dir).map_err(io_error(dir))? {
        let entry = entry.map_err(io_error(dir))?;
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        if path.is_dir() {
            collect_images(&path, out)?;
        } else if is_image_file(&path) {
            out.push(path);
        }
    }
    Ok(())
}

/// One CSV record and the 1-based line it starts on.
type Record = (usize, Vec<String>);

/// RFC 4180 CSV: comma-separated, fields optionally in double quotes (which may hold commas,
/// newlines and `""` for a quote), `\n` or `\r\n` line ends; blank lines are skipped. Characters
/// after a closing quote are kept, as Python's `csv` module does. On error, the line where the
/// bad record starts and what is wrong.
pub(crate) fn parse_csv(text: &str) -> Result<Vec<Record>, (usize, String)> {
    let mut records = Vec::new();
    let mut record: Vec<String> = Vec::new();
    let mut field = String::new();
    let mut in_quotes = false;
    let mut at_field_start = true;
    let mut has_content = false;
    let mut line = 1;
    let mut record_line = 1;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if in_quotes {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => in_quotes = false,
                '\n' => {
                    line += 1;
                    field.push('\n');
                }
                _ => field.push(c),
            }
            continue;
        }
        match c {
            '"' if at_field_start => {
                in_quotes = true;
                at_field_start = false;
                has_content = true;
            }
            ',' => {
                record.push(std::mem::take(&mut field));
                at_field_start = true;
                has_content = true;
            }
            '\r' | '\n' => {
                if c == '\r' && chars.peek() == Some(&'\n') {
                    chars.next();
                }
                if has_content {
                    record.push(std::mem::take(&mut field));
                    records.push((record_line, std::mem::take(&mut record)));
                }
                line += 1;
                record_line = line;
                at_field_start = true;
                has_content = false;
            }
            _ => {
                field.push(c);
                at_field_start = false;
                has_content = true;
            }
        }
    }
    if in_quotes {
        return Err((
            record_line,
            "a quoted field is not closed before the end of the file".into(),
        ));
    }
    if has_content {
        record.push(field);
        records.push((record_line, record));
    }
    Ok(records)
}

/// Samples from the text of a `labels.csv` (at `csv`, files relative to `dir`).
pub fn parse_labels_csv(text: &str, csv: &Path, dir: &Path) -> Result<Vec<Sample>, DataError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let records = parse_csv(text).map_err(|(line, reason)| DataError::MalformedCsv {
        path: csv.to_path_buf(),
        line,
        reason,
    })?;
    let mut records = records.into_iter();
    let Some((_, header)) = records.next() else {
        return Err(DataError::EmptyLabels {
            path: csv.to_path_buf(),
        });
    };
    let column = |name: &'static str| {
        header
            .iter()
            .position(|h| h.trim().eq_ignore_ascii_case(name))
            .ok_or_else(|| DataError::MissingColumn {
                path: csv.to_path_buf(),
                column: name,
                found: header.clone(),
            })
    };
    let file_col = column("file")?;
    let label_col = column("label")?;
    let needed = file_col.max(label_col) + 1;
    let mut samples = Vec::new();
    for (line, record) in records {
        let malformed = |reason: String| DataError::MalformedCsv {
            path: csv.to_path_buf(),
            line,
            reason,
        };
        if record.len() < needed {
            return Err(malformed(format!(
                "the row has {} fields; expected at least {needed} to reach the `file` and `label` columns",
                record.len()
            )));
        }
        let file = &record[file_col];
        if file.trim().is_empty() {
            return Err(malformed(
                "the `file` field is empty; expected an image path relative to the folder".into(),
            ));
        }
        let value = &record[label_col];
        let label = value
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|&l| l < NUM_CLASSES)
            .ok_or_else(|| DataError::BadLabel {
                path: csv.to_path_buf(),
                line,
                value: value.clone(),
                num_classes: NUM_CLASSES,
            })?;
        samples.push(Sample {
            path: dir.join(file),
            label: Some(label),
        });
    }
    if samples.is_empty() {
        return Err(DataError::EmptyLabels {
            path: csv.to_path_buf(),
        });
    }
    Ok(samples)
}

/// Shuffled order of `n` items for `epoch`, from `seed`.
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut ChaCha8Rng::seed_from_u64(
        seed.wrapping_mul(1_000_003).wrapping_add(epoch as u64),
    ));
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(text: &str) -> Vec<(usize, Vec<String>)> {
        parse_csv(text).unwrap()
    }

    fn rec(line: usize, f: &[&str]) -> (usize, Vec<String>) {
        (line, f.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn csv_quotes_commas_newlines() {
        let text = "file,label,url\r\n\"a,b.jpg\",3,\"say \"\"hi\"\"\"\n\nc.jpg,4,\"multi\nline\"\nd.jpg,5,";
        let r = fields(text);
        assert_eq!(
            r,
            vec![
                rec(1, &["file", "label", "url"]),
                rec(2, &["a,b.jpg", "3", "say \"hi\""]),
                rec(4, &["c.jpg", "4", "multi\nline"]),
                rec(6, &["d.jpg", "5", ""]),
            ]
        );
        assert_eq!(parse_csv("a,\"b\n").unwrap_err().0, 1);
        assert_eq!(fields("\"a\"x,b"), vec![rec(1, &["ax", "b"])]);
        assert!(fields("\n\n").is_empty());
    }

    #[test]
    fn labels_csv_rules() {
        let csv = Path::new("/d/labels.csv");
        let dir = Path::new("/d");
        let s = parse_labels_csv(
            "\u{feff}url,Label,file\n\"x,y\",999,\"a, b.jpg\"\n",
            csv,
            dir,
        )
        .unwrap();
        assert_eq!(
            s,
            vec![Sample {
                path: PathBuf::from("/d/a, b.jpg"),
                label: Some(999)
            }]
        );
        let e = parse_labels_csv("file,label\na.jpg,1\nb.jpg,1000\n", csv, dir).unwrap_err();
        assert!(
            matches!(&e, DataError::BadLabel { line: 3, value, .. } if value == "1000"),
            "{e}"
        );
        assert!(e.to_string().contains("labels.csv") && e.to_string().contains("1000"));
        for bad in ["-1", "1.5", "", "cat"] {
            let text = format!("file,label\na.jpg,{bad}\n");
            assert!(
                matches!(
                    parse_labels_csv(&text, csv, dir),
                    Err(DataError::BadLabel { .. })
                ),
                "{bad}"
            );
        }
        let e = parse_labels_csv("name,label\na.jpg,1\n", csv, dir).unwrap_err();
        assert!(
            matches!(e, DataError::MissingColumn { column: "file", .. }),
            "{e}"
        );
        let e = parse_labels_csv("file,label\na.jpg\n", csv, dir).unwrap_err();
        assert!(matches!(e, DataError::MalformedCsv { line: 2, .. }), "{e}");
        assert!(matches!(
            parse_labels_csv("file,label\n", csv, dir),
            Err(DataError::EmptyLabels { .. })
        ));
        assert!(matches!(
            parse_labels_csv("", csv, dir),
            Err(DataError::EmptyLabels { .. })
        ));
    }

    #[test]
    fn extensions() {
        assert!(is_image_file(Path::new("a/B.JPG")));
        assert!(is_image_file(Path::new("a/b.Jpeg")));
        assert!(is_image_file(Path::new("b.png")));
        assert!(!is_image_file(Path::new("b.gif")));
        assert!(!is_image_file(Path::new("jpg")));
    }
}
