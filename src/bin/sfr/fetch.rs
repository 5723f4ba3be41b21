//! `sfr fetch`: registry assets into the cache.

use anyhow::Result;
use serde_json::json;

use sfr::fetch;

use crate::common::*;

pub(crate) fn fetch_cmd(
    assets: Vec<String>,
    list: bool,
    all: bool,
    json: bool,
    quiet: bool,
) -> Result<()> {
    if list {
        let rows: Vec<_> = fetch::ASSETS
            .iter()
            .map(|a| {
                json!({
                    "name": a.name,
                    "description": a.description,
                    "package": a.package,
                    "fetched": fetch::is_fetched(a),
                    "path": fetch::asset_path(a),
                })
            })
            .collect();
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(
                    &json!({ "cache": fetch::cache_dir(), "assets": rows })
                )?
            );
        } else {
            println!("cache: {}", fetch::cache_dir().display());
            for a in fetch::ASSETS {
                let state = if fetch::is_fetched(a) {
                    "cached "
                } else {
                    "missing"
                };
                println!(
                    "  {state}  {:<20} {} ({})",
                    a.name, a.description, a.package
                );
            }
        }
        return Ok(());
    }
    let names: Vec<String> = if all {
        fetch::ASSETS.iter().map(|a| a.name.to_string()).collect()
    } else if assets.is_empty() {
        fetch::DEFAULT_ASSETS
            .iter()
            .map(|s| s.to_string())
            .collect()
    } else {
        assets
    };
    let mut out = Vec::new();
    let mut log = note(quiet);
    for n in &names {
        let p = fetch::fetch_named(n, &mut log)?;
        if !json {
            println!("{n}: {}", p.display());
        }
        out.push(json!({ "name": n, "path": p }));
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "fetched": out }))?
        );
    }
    Ok(())
}
