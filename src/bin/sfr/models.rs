//! `sfr models`: the zoo.

use anyhow::Result;
use serde_json::json;

use sfr::zoo::{self};

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
