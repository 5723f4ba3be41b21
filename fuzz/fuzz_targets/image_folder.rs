//! ImageFolder listings: each input line names a file (`class/file`, at most two components)
//! created empty in a fresh folder, which `Dataset::open` then lists; a line `labels.csv`
//! followed by text makes that the folder's labels.csv instead.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let dir = std::env::temp_dir().join(format!("sfr-fuzz-folder-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch folder");
    if let Some(csv) = text.strip_prefix("labels.csv\n") {
        std::fs::write(dir.join("labels.csv"), csv).expect("labels.csv");
    } else {
        for line in text.lines().take(16) {
            let parts: Vec<&str> = line.split('/').collect();
            let ok = !line.is_empty()
                && parts.len() <= 2
                && parts
                    .iter()
                    .all(|p| !p.is_empty() && *p != "." && *p != ".." && !p.contains('\0'));
            if !ok || line.len() > 100 {
                continue;
            }
            let p = dir.join(line);
            if let Some(parent) = p.parent() {
                let _ = std::fs::create_dir_all(parent);
            }
            let _ = std::fs::write(&p, b"");
        }
    }
    let _ = sfr::data::Dataset::open(&dir, None);
});
