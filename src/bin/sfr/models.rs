//! `sfr models`: the zoo.

use std::path::Path;

use anyhow::Result;
use serde_json::json;

use sfr::zoo::{self};

use crate::common::OnnxArgs;

/// `sfr models FILE.onnx`: the graph's input and output, its sites, the preprocessing in force.
pub(crate) fn onnx_model(path: &Path, args: &OnnxArgs, json: bool) -> Result<()> {
    let pre = args.preprocess(path)?;
    let device = sfr::device::default_device();
    let (model, info) = zoo::load_onnx(path, &pre, &device)?;
    let spec = model.spec();
    let sites = model.sites();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "model": spec,
                "graph": info,
                "sites": sites,
            }))?
        );
        return Ok(());
    }
    let shape = |s: &[Option<usize>]| {
        s.iter()
            .map(|d| d.map_or("?".to_string(), |d| d.to_string()))
            .collect::<Vec<_>>()
            .join("×")
    };
    println!("{} ({} nodes)", path.display(), info.nodes);
    println!("input   {} [{}]", info.input.0, shape(&info.input.1));
    println!("output  {} [{}]", info.output.0, shape(&info.output.1));
    let p = spec.preprocess;
    println!(
        "preprocessing: resize {} ({:?}), centre crop {}, mean {:?}, std {:?}, {:?}",
        spec.resize, spec.resize_mode, spec.input_size, p.mean_rgb, p.std_rgb, p.order
    );
    for n in &info.notes {
        println!("note: {n}");
    }
    println!("{} sites (conv outputs, in forward order):", sites.len());
    for s in sites {
        println!(
            "  {:>3}  {:<48} {:>4} → {:<4} k{}×{} s{} g{}",
            s.index,
            s.name,
            s.in_channels,
            s.out_channels,
            s.kernel[0],
            s.kernel[1],
            s.stride[0],
            s.groups
        );
    }
    Ok(())
}

pub(crate) fn models(json: bool) -> Result<()> {
    let specs = zoo::specs();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "models": specs }))?
        );
        return Ok(());
    }
    println!(
        "{:<20} {:>5} {:>12}  {:<32}  weights",
        "model", "input", "resize", "preprocessing"
    );
    for s in specs {
        let p = s.preprocess;
        let pre = format!(
            "{:?} mean {:.1},{:.1},{:.1} std {:.1},{:.1},{:.1}",
            p.order,
            p.mean_rgb[0],
            p.mean_rgb[1],
            p.mean_rgb[2],
            p.std_rgb[0],
            p.std_rgb[1],
            p.std_rgb[2]
        );
        let resize = match s.resize_mode {
            zoo::ResizeMode::ShorterSide => format!("short {}", s.resize),
            zoo::ResizeMode::Squash => format!("{0}x{0}", s.resize),
        };
        let mut fetchable = match s.fetch {
            Some(a) => format!(" [sfr fetch {a}]"),
            None => String::new(),
        };
        for m in s.measured {
            fetchable.push_str(&format!(" [top-1 {:.3} on {}]", m.top1, m.data));
        }
        println!(
            "{:<20} {:>5} {:>12}  {:<32}  {}{}",
            s.name,
            s.input_size,
            resize,
            pre.replace("Rgb", "RGB").replace("Bgr", "BGR"),
            s.weights,
            fetchable
        );
    }
    Ok(())
}
