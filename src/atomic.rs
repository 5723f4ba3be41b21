//! The one way sfr writes a file: a temporary file in the same folder, written and synced, then
//! renamed over the destination, then the folder synced. A reader (or a resumed run) sees the
//! old file or the new one, never half of one; a full disk, a file-size limit or an unwritable
//! folder fails with the destination named and leaves the previous file as it was.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A file could not be written.
#[derive(Debug, thiserror::Error)]
#[error("writing {}: {source} ({})", path.display(), self.note())]
pub struct WriteError {
    /// The destination.
    pub path: PathBuf,
    /// Whether the destination had been replaced when the error happened (only the final
    /// folder sync can fail after the rename).
    pub replaced: bool,
    /// Whether a file was there before.
    pub existed: bool,
    /// The cause.
    #[source]
    pub source: std::io::Error,
}

impl WriteError {
    fn note(&self) -> &'static str {
        match (self.replaced, self.existed) {
            (true, _) => "the new file is in place but its folder could not be synced",
            (false, true) => "the previous file is intact",
            (false, false) => "nothing was written there",
        }
    }
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Write `bytes` to `path` atomically: `.NAME.tmp-PID-N` beside it, `fsync`, rename over
/// `path`, `fsync` of the folder. Creates the folder if needed. On failure the temporary file
/// is removed and `path` is untouched.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    let existed = path.exists();
    let err = |replaced: bool| {
        move |source| WriteError {
            path: path.to_path_buf(),
            replaced,
            existed,
            source,
        }
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    fs::create_dir_all(dir).map_err(err(false))?;
    let name = path.file_name().and_then(|f| f.to_str()).unwrap_or("out");
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let written = (|| {
        let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(err(false)(e));
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(err(true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_files_and_leaves_no_temporary_behind() {
        let dir = std::env::temp_dir().join(format!("sfr-atomic-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let p = dir.join("sub/a.bin");
        write_atomic(&p, b"first").unwrap();
        write_atomic(&p, b"second, longer").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"second, longer");
        let names: Vec<_> = fs::read_dir(dir.join("sub"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("a.bin")]);
        // A destination that is a folder cannot be replaced: the error names it.
        let e = write_atomic(&dir.join("sub"), b"x").unwrap_err();
        assert!(e.to_string().starts_with("writing "), "{e}");
        assert!(e.to_string().contains("sub"), "{e}");
        assert!(e.to_string().contains("the previous file is intact"), "{e}");
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1, "no temporary left");
        let _ = fs::remove_dir_all(&dir);
    }
}
