//! Published perturbations as `.h5` files, through the importer `sfr perturbation import` uses.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = sfr::perturbation::import::read_any_bytes(std::path::Path::new("fuzz.h5"), data);
});
