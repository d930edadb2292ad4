//! The only way the library talks to a person: stages, counted work and notes go through [`Progress`].
//! The CLI draws them with indicatif; tests and library users get [`Silent`].

pub trait Progress: Sync {
    /// A named pipeline stage begins (`activations`, `probes`, `write`, ...).
    fn stage(&self, _name: &str) {}
    /// Counted work of `total` items (`unit`: "prompts", "bytes", ...) begins.
    fn start(&self, _total: u64, _unit: &str) {}
    /// `n` more items are done.
    fn advance(&self, _n: u64) {}
    /// The counted work has ended.
    fn finish(&self) {}
    /// A remark worth showing (a cache hit, a skipped file).
    fn note(&self, _message: &str) {}
    /// Something the user must see even when progress is hidden: the run goes on, but not as they may think.
    fn warn(&self, message: &str) {
        self.note(&format!("warning: {message}"));
    }
}

/// Reports nothing.
pub struct Silent;

impl Progress for Silent {}

/// Seconds of consecutive named parts of a run, each measured from the end of the one before.
pub struct Laps {
    clock: std::time::Instant,
    pub done: Vec<(String, f64)>,
}

impl Laps {
    pub fn start() -> Self {
        Laps { clock: std::time::Instant::now(), done: Vec::new() }
    }

    pub fn lap(&mut self, name: &str) {
        self.done.push((name.to_string(), self.clock.elapsed().as_secs_f64()));
        self.clock = std::time::Instant::now();
    }
}
