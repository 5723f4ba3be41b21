//! PyTorch checkpoints: the restricted unpickler behind legacy and zip `.pth` files (and
//! whatever else `sfr::weights::load` sniffs), from arbitrary bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = sfr::weights::pth::load_pth_bytes(std::path::Path::new("fuzz.pth"), data);
    let _ = sfr::weights::load_bytes(std::path::Path::new("fuzz.pth"), data);
});
