//! # sfr — Selective Feature Regeneration against universal adversarial perturbations
//!
//! A toolkit around the defence of Borkar, Heide and Karam (CVPR 2020): pretrained ImageNet
//! classifiers ([`zoo`]) loaded from PyTorch or safetensors files ([`weights`]), an image pipeline
//! that matches torchvision's preprocessing ([`data`]), and evaluation ([`eval`]).
//!
//! Data flows one way: images → [`data`] → [`zoo`] (a classifier with taps at its conv outputs)
//! → attacks → defence → [`eval`] → report.

pub mod alloc;
pub mod atomic;
pub mod attack;
pub mod classifier;
pub mod data;
pub mod defense;
pub mod demo;
pub mod device;
pub mod engine;
pub mod error;
pub mod eval;
pub mod fetch;
pub mod metrics;
pub mod perturbation;
pub mod weights;
pub mod zoo;

pub use error::{Result, SfrError};
