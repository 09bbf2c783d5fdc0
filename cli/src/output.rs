//! Output: human or JSON summaries on stdout, and progress as a terminal bar (for people)
//! or as JSON lines (for programs, `--progress json`; the schema is in docs/PROGRESS.md).

use std::fs::OpenOptions;
use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use tessera_engine::{Progress, UNKNOWN_TOTAL};

/// How progress is shown (`--progress`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressMode {
    /// A bar on stderr when it is a terminal and --quiet is not given.
    Auto,
    /// JSON lines, one event per line (docs/PROGRESS.md), on stderr or --progress-fd.
    Json,
    /// No progress at all.
    None,
}

/// At most this many progress events a second, besides phase changes and the last one.
const EVENTS_PER_SECOND: u32 = 10;

/// Where a command's output goes, honouring `--quiet` and `--progress`.
pub struct Output {
    quiet: bool,
    mode: ProgressMode,
    bar: Mutex<Option<ProgressBar>>,
    events: Option<Mutex<Events>>,
}

impl Output {
    /// Output for `command`; JSON progress events go to descriptor `fd` (stderr if `None`).
    ///
    /// # Errors
    /// If `fd` is 0 or 1 (stdin; stdout carries results and `sync INDEX -` images) or
    /// cannot be opened for writing.
    pub fn new(
        quiet: bool,
        mode: ProgressMode,
        fd: Option<u32>,
        command: &str,
    ) -> anyhow::Result<Output> {
        anyhow::ensure!(
            fd.is_none() || mode == ProgressMode::Json,
            "--progress-fd needs --progress json"
        );
        let sink: Box<dyn Write + Send> = match fd {
            Some(0 | 1) => anyhow::bail!(
                "--progress-fd {}: descriptors 0 and 1 are stdin and stdout (which carries \
                 results and, for `sync INDEX -`, the image); use 2 or a descriptor of your own",
                fd.unwrap_or(0)
            ),
            Some(2) | None => Box::new(std::io::stderr()),
            Some(n) => {
                let path = format!("/proc/self/fd/{n}");
                let file = OpenOptions::new().append(true).open(&path).map_err(|e| {
                    anyhow::anyhow!(
                        "--progress-fd {n}: cannot write to descriptor {n} ({path}): {e}; \
                         open it for writing when starting tessera (e.g. `3>FILE` or `3>&1`)"
                    )
                })?;
                Box::new(file)
            }
        };
        let events = (mode == ProgressMode::Json).then(|| Mutex::new(Events::new(sink, command)));
        Ok(Output {
            quiet,
            mode,
            bar: Mutex::new(None),
            events,
        })
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

    /// Prints a human line on stderr unless quiet (for commands whose stdout carries data).
    pub fn note(&self, text: impl AsRef<str>) {
        self.finish_progress();
        if !self.quiet {
            eprintln!("{}", text.as_ref());
        }
    }

    /// Clears any progress bar.
    pub fn finish_progress(&self) {
        if let Some(bar) = self.bar.lock().expect("progress lock").take() {
            bar.finish_and_clear();
        }
    }

    /// Ends the progress event stream with its `done` event: `exit_code` 0 for success,
    /// else the process's exit status and the error message.
    pub fn finish(&self, exit_code: u8, error: Option<String>) {
        self.finish_progress();
        if let Some(events) = &self.events {
            events.lock().expect("events lock").done(exit_code, error);
        }
    }
}

impl Progress for Output {
    fn start(&self, what: &str, total: u64) {
        if let Some(events) = &self.events {
            events.lock().expect("events lock").start(what, total);
            return;
        }
        let mut slot = self.bar.lock().expect("progress lock");
        if let Some(old) = slot.take() {
            old.finish_and_clear();
        }
        if self.quiet || self.mode == ProgressMode::None || !std::io::stderr().is_terminal() {
            return;
        }
        let known = (total != UNKNOWN_TOTAL).then_some(total);
        let bar = ProgressBar::with_draw_target(known, ProgressDrawTarget::stderr());
        let template = if known.is_some() {
            "{msg:>10} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}"
        } else {
            "{msg:>10} {spinner} {bytes} {binary_bytes_per_sec}"
        };
        bar.set_style(
            ProgressStyle::with_template(template)
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_message(what.to_string());
        *slot = Some(bar);
    }

    fn advance(&self, bytes: u64) {
        if let Some(events) = &self.events {
            events.lock().expect("events lock").advance(bytes);
        } else if let Some(bar) = self.bar.lock().expect("progress lock").as_ref() {
            bar.inc(bytes);
        }
    }

    fn chunks(&self, n: u64) {
        if let Some(events) = &self.events {
            events.lock().expect("events lock").chunks += n;
        }
    }

    fn requests(&self, n: u64) {
        if let Some(events) = &self.events {
            events.lock().expect("events lock").requests += n;
        }
    }

    fn resumed(&self) {
        if let Some(events) = &self.events {
            events.lock().expect("events lock").resumed = true;
        }
    }
}

/// The state behind the JSON event stream.
struct Events {
    sink: Box<dyn Write + Send>,
    /// False after a write failed (a reader that went away): progress is advisory, the
    /// command goes on without it.
    open: bool,
    command: String,
    started: Instant,
    step: u64,
    phase: &'static str,
    task: String,
    phase_started: Instant,
    phase_done: u64,
    phase_total: u64,
    /// Bytes of the run done before the current phase started.
    run_base: u64,
    chunks: u64,
    requests: u64,
    resumed: bool,
    last_emit: Option<Instant>,
    /// Something changed since the last event.
    dirty: bool,
}

/// One line of the stream (docs/PROGRESS.md).
#[derive(Serialize)]
struct Event<'a> {
    command: &'a str,
    phase: &'a str,
    task: &'a str,
    step: u64,
    phase_bytes_done: u64,
    phase_bytes_total: Option<u64>,
    bytes_done: u64,
    bytes_total: Option<u64>,
    chunks: u64,
    requests: u64,
    eta_seconds: Option<f64>,
    elapsed_seconds: f64,
    resumed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    ok: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exit_code: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// The phase an engine step belongs to.
fn phase_of(task: &str) -> &'static str {
    match task {
        "chunking" | "scanning" => "scan",
        "planning" => "plan",
        "writing" => "write",
        _ => "verify", // "verifying", "verity"
    }
}

impl Events {
    fn new(sink: Box<dyn Write + Send>, command: &str) -> Events {
        let now = Instant::now();
        Events {
            sink,
            open: true,
            command: command.to_string(),
            started: now,
            step: 0,
            phase: "scan",
            task: String::new(),
            phase_started: now,
            phase_done: 0,
            phase_total: 0,
            run_base: 0,
            chunks: 0,
            requests: 0,
            resumed: false,
            last_emit: None,
            dirty: false,
        }
    }

    fn start(&mut self, task: &str, total: u64) {
        if self.step > 0 && self.dirty {
            self.emit(None, None);
        }
        self.run_base += self.phase_done;
        self.step += 1;
        self.phase = phase_of(task);
        self.task = task.to_string();
        self.phase_started = Instant::now();
        self.phase_done = 0;
        self.phase_total = total;
        self.emit(None, None);
    }

    fn advance(&mut self, bytes: u64) {
        self.phase_done += bytes;
        self.dirty = true;
        let gap = Duration::from_secs(1) / EVENTS_PER_SECOND;
        if self.last_emit.is_none_or(|t| t.elapsed() >= gap) {
            self.emit(None, None);
        }
    }

    /// The `done` event: its `phase_bytes_total` is what the last phase left undone (0
    /// after a success), so `bytes_total` never shrinks.
    fn done(&mut self, exit_code: u8, error: Option<String>) {
        if self.step > 0 && self.dirty {
            self.emit(None, None);
        }
        let undone = match self.phase_total {
            UNKNOWN_TOTAL => 0,
            total => total.saturating_sub(self.phase_done),
        };
        self.run_base += self.phase_done;
        self.step += 1;
        self.phase = "done";
        self.task = "done".to_string();
        self.phase_done = 0;
        self.phase_total = undone;
        self.emit(Some(exit_code), error);
    }

    fn emit(&mut self, exit_code: Option<u8>, error: Option<String>) {
        self.dirty = false;
        self.last_emit = Some(Instant::now());
        if !self.open {
            return;
        }
        let known = (self.phase_total != UNKNOWN_TOTAL).then_some(self.phase_total);
        let elapsed = self.phase_started.elapsed().as_secs_f64();
        let eta = match known {
            Some(total) if self.phase_done > 0 && elapsed > 0.0 => {
                let rate = self.phase_done as f64 / elapsed;
                Some((total.saturating_sub(self.phase_done) as f64 / rate * 10.0).round() / 10.0)
            }
            Some(0) => Some(0.0),
            _ => None,
        };
        let event = Event {
            command: &self.command,
            phase: self.phase,
            task: &self.task,
            step: self.step,
            phase_bytes_done: self.phase_done,
            phase_bytes_total: known,
            bytes_done: self.run_base + self.phase_done,
            bytes_total: known.map(|t| self.run_base + t.max(self.phase_done)),
            chunks: self.chunks,
            requests: self.requests,
            eta_seconds: eta,
            elapsed_seconds: (self.started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
            resumed: self.resumed,
            ok: exit_code.map(|c| c == 0),
            exit_code,
            error,
        };
        let mut line = serde_json::to_vec(&event).expect("events serialize");
        line.push(b'\n');
        if self
            .sink
            .write_all(&line)
            .and_then(|()| self.sink.flush())
            .is_err()
        {
            self.open = false;
        }
    }
}

/// Formats a byte count for humans (`1.50 GiB`).
pub fn human_bytes(n: u64) -> String {
    indicatif::BinaryBytes(n).to_string()
}
