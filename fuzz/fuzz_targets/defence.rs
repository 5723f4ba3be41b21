//! Defence files, through `Defense::load` onto MobileNetV2 (the registry weights, loaded once:
//! a mutated copy of a real defence passes the backbone check and reaches the tensors).
#![no_main]
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fn model() -> &'static sfr::zoo::Model {
    static M: OnceLock<sfr::zoo::Model> = OnceLock::new();
    M.get_or_init(|| {
        let w = sfr::fetch::fetch_named("mobilenet_v2", &mut |_| {}).expect("mobilenet_v2");
        sfr::zoo::load("mobilenet_v2", &w, &sfr::device::default_device()).expect("load")
    })
}

fuzz_target!(|data: &[u8]| {
    let m = model();
    let p = common::scratch("d.safetensors", data);
    let _ = sfr::defense::Defense::load(&p, m, m.device());
});
