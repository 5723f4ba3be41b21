//! The one place that picks the compute device.
//!
//! sfr runs on burn's pure-Rust CPU backend `flex` (multi-threaded with rayon, SIMD). A GPU
//! backend is future work: adding it means changing this module only.

use burn::tensor::Device;

/// The device every model, attack and defence runs on.
pub fn default_device() -> Device {
    Device::flex()
}

/// A short description of the device, for reports.
pub fn describe() -> String {
    format!("burn flex (CPU), {} threads", rayon::current_num_threads())
}
