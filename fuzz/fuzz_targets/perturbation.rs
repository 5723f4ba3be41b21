//! sfr's own perturbation files (safetensors with metadata), through `Perturbation::load`.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let p = common::scratch("p.safetensors", data);
    let _ = sfr::perturbation::Perturbation::load(&p);
});
