//! `labels.csv` of a data folder (CSV with quoting, BOM, header columns, labels).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let dir = std::path::Path::new("/nonexistent-sfr-fuzz");
    let _ = sfr::data::dataset::parse_labels_csv(&text, &dir.join("labels.csv"), dir);
});
