//! `sfr demo`: attack, defence and suite end to end on registry data (`sfr::demo` does the
//! work; this shows its progress).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Args;
use indicatif::ProgressBar;

use sfr::attack::Progress;
use sfr::defense::train::TrainProgress;
use sfr::demo::{DemoOptions, Observer};

use crate::common::{print_suite, progress_bar};

#[derive(Args)]
pub(crate) struct DemoArgs {
    /// Output folder (perturbations, the defence, the report); rerunning reuses what is done.
    #[arg(long, short, default_value = "sfr-demo")]
    pub(crate) out: PathBuf,
    /// Defence training epochs over the photos (batches of 8).
    #[arg(long, default_value_t = 10)]
    pub(crate) epochs: usize,
    /// Print the report as one JSON object on stdout.
    #[arg(long)]
    pub(crate) json: bool,
}

/// Timestamped lines, and one progress bar for the step under way.
struct Show {
    quiet: bool,
    t0: Instant,
    /// Lines for each attack started when stderr is not a terminal (logs).
    lines: bool,
    bar: Option<(&'static str, ProgressBar)>,
    attack: String,
}

impl Show {
    fn bar(&mut self, what: &'static str, done: usize, total: usize) -> &ProgressBar {
        if self.bar.as_ref().is_none_or(|(w, _)| *w != what) {
            self.finish();
            self.bar = Some((what, progress_bar(total, self.quiet, what)));
        }
        let (_, pb) = self.bar.as_ref().expect("bar");
        pb.set_length(total as u64);
        pb.set_position(done as u64);
        pb
    }

    fn finish(&mut self) {
        if let Some((_, pb)) = self.bar.take() {
            pb.finish_and_clear();
        }
    }

    fn line(&self, m: &str) {
        if !self.quiet {
            eprintln!("[{:>4.0} s] {m}", self.t0.elapsed().as_secs_f64());
        }
    }
}

impl Observer for Show {
    fn say(&mut self, line: &str) {
        self.finish();
        self.line(line);
    }

    fn attack(&mut self, name: &str, p: &Progress) {
        if name != self.attack {
            self.attack = name.to_string();
            if self.lines {
                self.line(&format!("attack: {name}"));
            }
        }
        let mut msg = format!("{name}: {}", p.phase);
        if let Some(f) = p.holdout_fooling_rate {
            msg.push_str(&format!(" held-out fooling {f:.3}"));
        }
        self.bar("attacks", p.done, p.total).set_message(msg);
    }

    fn train(&mut self, p: &TrainProgress) {
        let msg = format!(
            "epoch {}{}",
            p.epoch,
            p.loss.map(|l| format!(" loss {l:.3}")).unwrap_or_default()
        );
        self.bar("defend", p.done, p.total).set_message(msg);
    }

    fn suite(&mut self, done: usize, total: usize) {
        self.bar("suite", done, total);
    }
}

pub(crate) fn demo_cmd(a: DemoArgs, quiet: bool) -> Result<()> {
    let opts = DemoOptions {
        out: a.out,
        epochs: a.epochs,
    };
    let mut show = Show {
        quiet,
        t0: Instant::now(),
        lines: !quiet && !std::io::stderr().is_terminal(),
        bar: None,
        attack: String::new(),
    };
    let result = sfr::demo::run(&opts, &mut show);
    show.finish();
    let (report, written) = result?;
    print_suite(&report, &written, a.json)
}
