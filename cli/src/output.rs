//! Terminal output: progress bars on a terminal, JSON or human summaries.

use std::io::IsTerminal;
use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use tessera_engine::Progress;

/// Where a command's output goes, honouring `--quiet`.
pub struct Output {
    quiet: bool,
    bar: Mutex<Option<ProgressBar>>,
}

impl Output {
    /// Output that shows progress only when stderr is a terminal and not `quiet`.
    pub fn new(quiet: bool) -> Output {
        Output {
            quiet,
            bar: Mutex::new(None),
        }
    }

    /// Prints a JSON value on stdout.
    pub fn json<T: Serialize>(&self, value: &T) -> anyhow::Result<()> {
        self.finish_progress();
        println!("{}", serde_json::to_string_pretty(value)?);
        Ok(())
    }

    /// Prints a human line on stdout unless quiet.
    pub fn line(&self, text: impl AsRef<str>) {
        self.finish_progress();
        if !self.quiet {
            println!("{}", text.as_ref());
        }
    }

    /// Prints a note for people on stderr unless quiet.
    pub fn note(&self, text: impl AsRef<str>) {
        self.finish_progress();
        if !self.quiet {
            eprintln!("tessera: {}", text.as_ref());
        }
    }

    /// Clears any progress bar.
    pub fn finish_progress(&self) {
        if let Some(bar) = self.bar.lock().expect("progress lock").take() {
            bar.finish_and_clear();
        }
    }
}

impl Progress for Output {
    fn start(&self, what: &str, total: u64) {
        let mut slot = self.bar.lock().expect("progress lock");
        if let Some(old) = slot.take() {
            old.finish_and_clear();
        }
        if self.quiet || !std::io::stderr().is_terminal() {
            return;
        }
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{msg:>10} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_message(what.to_string());
        *slot = Some(bar);
    }

    fn advance(&self, bytes: u64) {
        if let Some(bar) = self.bar.lock().expect("progress lock").as_ref() {
            bar.inc(bytes);
        }
    }
}

/// Formats a byte count for humans (`1.50 GiB`).
pub fn human_bytes(n: u64) -> String {
    indicatif::BinaryBytes(n).to_string()
}
