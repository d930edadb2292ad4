//! How the command line shows the library's progress: bars on a terminal, plain timed lines in a log.

use std::sync::Mutex;
use std::time::Instant;

use bake::progress::Progress;
use indicatif::{ProgressBar, ProgressStyle};

/// Draws the library's progress events on stderr: each stage with the time since the run began, counted work
/// as a bar in human units on a terminal, and as a plain line at least every 30 seconds elsewhere (a log
/// file, `nohup`, `tee`, CI, a cluster job), where a bar shows nothing. `--quiet` keeps only warnings.
pub struct Bars {
    bar: Mutex<Option<ProgressBar>>,
    pub started: Instant,
    quiet: bool,
    /// Where stderr is no terminal: how often counted work prints a line.
    line_every: Option<std::time::Duration>,
    counted: Mutex<Option<Counted>>,
}

/// Counted work in progress, for the plain lines.
struct Counted {
    total: u64,
    unit: String,
    done: u64,
    started: Instant,
    last_line: Instant,
    /// `done` when the last line was printed.
    shown: u64,
}

impl Counted {
    /// `12.4 MB of 40.0 MB (31%), about 9 s left` or `110 of 307 prompts (36%), about 9 s left`.
    fn describe(&self) -> String {
        let (done, total) = match self.unit.as_str() {
            "bytes" => (bake::units::format_bytes(self.done), bake::units::format_bytes(self.total)),
            unit => (self.done.to_string(), format!("{} {unit}", self.total)),
        };
        let percent = 100.0 * self.done as f64 / self.total.max(1) as f64;
        let rate = self.done as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
        let left = match self.done {
            0 => "time left unknown".to_string(),
            _ => format!("about {:.0} s left", self.total.saturating_sub(self.done) as f64 / rate),
        };
        format!("{done} of {total} ({percent:.0}%), {left}")
    }
}

impl Bars {
    pub fn new(quiet: bool) -> Self {
        use std::io::IsTerminal;
        // BAKE_PROGRESS_SECONDS sets the interval of the plain lines (tests use 0: a line per step).
        let seconds = std::env::var("BAKE_PROGRESS_SECONDS").ok().and_then(|s| s.parse::<f64>().ok()).unwrap_or(30.0);
        let line_every =
            (!std::io::stderr().is_terminal()).then(|| std::time::Duration::from_secs_f64(seconds.max(0.0)));
        Bars { bar: Mutex::new(None), started: Instant::now(), quiet, line_every, counted: Mutex::new(None) }
    }

    /// `bake:   12.3 s  text`: the time since the run began, as every stage line.
    fn timed(&self, text: &str) -> String {
        format!("bake: {:>6.1} s  {text}", self.started.elapsed().as_secs_f64())
    }

    /// Prints a line above the bar, if one is drawn.
    fn line(&self, text: &str) {
        match self.bar.lock().unwrap().as_ref() {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }
}

/// A rate people read at a glance: `214/s`, `31.2/s`, `0.45/s`.
fn rounded_rate(state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write) {
    let rate = state.per_sec();
    let _ = match rate {
        r if r >= 100.0 => write!(w, "{r:.0}/s"),
        r if r >= 1.0 => write!(w, "{r:.1}/s"),
        r => write!(w, "{r:.2}/s"),
    };
}

impl Progress for Bars {
    fn stage(&self, name: &str) {
        if !self.quiet {
            self.line(&self.timed(name));
        }
    }

    fn start(&self, total: u64, unit: &str) {
        if self.quiet {
            return;
        }
        if self.line_every.is_some() {
            let now = Instant::now();
            *self.counted.lock().unwrap() =
                Some(Counted { total, unit: unit.to_string(), done: 0, started: now, last_line: now, shown: 0 });
            return;
        }
        let bar = ProgressBar::new(total);
        // Bytes in decimal units (MB = 10⁶ bytes), as every size bake prints; other counts with separators.
        let template = if unit == "bytes" {
            "  {bar:40} {decimal_bytes} / {decimal_total_bytes} ({decimal_bytes_per_sec}, ETA {eta})".to_string()
        } else {
            format!("  {{bar:40}} {{human_pos}} / {{human_len}} {unit} ({{rate}}, ETA {{eta}})")
        };
        let style = ProgressStyle::with_template(&template).expect("valid template").with_key("rate", rounded_rate);
        bar.set_style(style);
        *self.bar.lock().unwrap() = Some(bar);
    }

    fn advance(&self, n: u64) {
        if let Some(bar) = self.bar.lock().unwrap().as_ref() {
            bar.inc(n);
        }
        if let (Some(every), Some(counted)) = (self.line_every, self.counted.lock().unwrap().as_mut()) {
            counted.done += n;
            if counted.last_line.elapsed() >= every {
                counted.last_line = Instant::now();
                counted.shown = counted.done;
                self.line(&self.timed(&counted.describe()));
            }
        }
    }

    fn finish(&self) {
        if let Some(bar) = self.bar.lock().unwrap().take() {
            bar.finish_and_clear();
        }
        // A long count ends with its total, so a log shows it completed.
        if let (Some(every), Some(counted)) = (self.line_every, self.counted.lock().unwrap().take()) {
            if counted.started.elapsed() >= every && counted.shown != counted.done {
                self.line(&self.timed(&counted.describe()));
            }
        }
    }

    fn note(&self, message: &str) {
        if !self.quiet {
            self.line(&format!("bake: {message}"));
        }
    }

    fn warn(&self, message: &str) {
        self.line(&format!("bake: warning: {message}"));
    }
}
