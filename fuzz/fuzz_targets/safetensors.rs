//! safetensors weight files as sfr reads them (its own header checks, then the crate's).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = sfr::weights::safetensors_io::load_safetensors_bytes(
        std::path::Path::new("fuzz.safetensors"),
        data,
    );
});
