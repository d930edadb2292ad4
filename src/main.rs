//! The `bake` command line: a thin layer over the `bake` library.

use std::process::ExitCode;

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::Result;
use bake::export::baked::{BakeOptions, Sharding};
use bake::inspect;
use bake::model::{resolve::ALIASES, ModelFiles};
use bake::pipeline::{self, OutputKind, Resolved, RunOptions};
use bake::progress::Progress;
use bake::recipe::{DirectionKind, Overrides, Recipe};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser)]
#[command(
    name = "bake",
    version,
    about = "Bake Inference-Time Intervention into LLaMA checkpoints as o_proj biases",
    override_usage = "bake --model <MODEL> --recipe <RECIPE> --out <OUT> [OPTIONS]\n       bake <COMMAND>",
    after_help = "Without a command, bake runs the whole pipeline (see `bake run --help`):\n  \
                  bake --model llama2_chat_7B --recipe recipes/truthfulqa.yaml --out honest-llama2-chat-7b"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Print no progress on stderr (warnings and errors still are); results still go to stdout.
    #[arg(long, short, global = true)]
    quiet: bool,
}

#[derive(Args)]
struct BakeArgs {
    #[command(flatten)]
    recipe: RecipeArgs,
    /// Output folder for the baked checkpoint (written atomically); not needed with --dry-run.
    #[arg(long, short, required_unless_present = "dry_run")]
    out: Option<PathBuf>,
    /// Replace an existing output folder, if bake wrote it (a folder bake did not write is never replaced).
    #[arg(long)]
    force: bool,
    /// Show the execution plan of the activation pass (mode, peak host memory, bytes read) and stop.
    #[arg(long)]
    dry_run: bool,
    /// Rewrite every tensor into shards of at most this size (KB/MB/GB: powers of 1000, as Hugging Face;
    /// KiB/MiB/GiB: powers of 1024). Without it the base's weight files are copied whole and the new biases
    /// go in one added file, which is faster.
    #[arg(long, value_parser = parse_shard_size, allow_hyphen_values = true)]
    max_shard_size: Option<u64>,
}

/// `--max-shard-size`: at least 1 MB, or a model would be written as one file per tensor.
fn parse_shard_size(text: &str) -> std::result::Result<u64, String> {
    match bake::units::parse_size(text)? {
        n if n < 1_000_000 => {
            Err(format!("`{text}`: expected at least 1MB (smaller shards would hold one tensor each)"))
        }
        n => Ok(n),
    }
}

/// `--max-memory`: more than nothing.
fn parse_memory_size(text: &str) -> std::result::Result<u64, String> {
    match bake::units::parse_size(text)? {
        0 => Err(format!("`{text}`: expected more than 0 bytes")),
        n => Ok(n),
    }
}

#[derive(Subcommand)]
enum Command {
    /// Bake: activations, probes, shifts, then the checkpoint with o_proj biases (the default command).
    Run(BakeArgs),
    /// Show what bake understands of a model: shapes, dtype, files, and the memory a bake needs.
    Inspect(InspectArgs),
    /// List the short model names (as in the reference code) and the Hub repositories behind them.
    Models,
    /// Run the ITI core (activations, probes, heads, shifts) and write report.json and heatmap.png.
    Probe(ProbeArgs),
    /// Publish a baked folder to the Hugging Face Hub in one commit (only files the remote lacks), then check
    /// the remote weights' LFS sha256 against the manifest. Token: HF_TOKEN or the HF token file.
    Push(PushArgs),
    /// TruthfulQA MC1/MC2 (reference and leaderboard protocols) and CE/KL: the base, a baked folder made
    /// from it (--baked), or ITI fitted and applied fold by fold (--cv 2).
    Eval(EvalArgs),
    /// Prove a baked folder (or Hub repo) is exactly its base plus its diff. Exit 0: all hold; 1: a mismatch;
    /// 2: verification could not run.
    Verify(VerifyArgs),
    /// Choose K and α by cross-validation under a KL budget: search.json, tradeoff.png and a recipe.yaml
    /// that `bake --recipe` bakes.
    Search(SearchArgs),
}

#[derive(Args)]
struct SearchArgs {
    #[command(flatten)]
    recipe: RecipeArgs,
    /// Folder for search.json, search.log, tradeoff.png/.svg and recipe.yaml (written atomically).
    #[arg(long, short)]
    out: PathBuf,
    /// Replace an existing search folder, if bake wrote it.
    #[arg(long)]
    force: bool,
    /// Most KL(base ‖ edited) per token, in nats, on the corpus (mean of the folds).
    #[arg(long, default_value_t = bake::search::DEFAULT_KL_BUDGET, allow_negative_numbers = true)]
    kl_budget: f64,
    /// Most CE increase over the base, in nats per token (default: none).
    #[arg(long, allow_negative_numbers = true)]
    ce_budget: Option<f64>,
    /// The held-out number maximised (reference MC protocol).
    #[arg(long, value_enum, default_value = "mc2")]
    objective: ObjectiveArg,
    /// Contiguous folds of the questions, as `bake eval --cv`.
    #[arg(long, default_value_t = 2)]
    folds: usize,
    /// Most candidates measured on every held-out question and the whole corpus (the last rung of the halving).
    #[arg(long, default_value_t = bake::search::DEFAULT_TRIALS)]
    trials: usize,
    /// Evaluate every candidate on every question and document: no KL screen, no halving (slow; the
    /// reference the savings are measured against).
    #[arg(long)]
    full_grid: bool,
    /// Documents sampled from the corpus for CE and KL (overrides the recipe's `corpus.documents`).
    #[arg(long)]
    documents: Option<usize>,
}

#[derive(Clone, Copy, ValueEnum)]
enum ObjectiveArg {
    Mc2,
    Mc1,
}

#[derive(Args)]
struct PushArgs {
    /// The baked folder.
    dir: PathBuf,
    /// Target repository `org/name` (created when missing).
    #[arg(long)]
    repo: String,
    /// Create the repository as private.
    #[arg(long)]
    private: bool,
    /// Branch to commit to (default main; created when missing).
    #[arg(long)]
    revision: Option<String>,
    /// Open a pull request instead of committing to the branch.
    #[arg(long)]
    create_pr: bool,
    /// Show what would be uploaded; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    recipe: RecipeArgs,
    /// A baked folder made from --model: evaluated beside the base (KL against the base).
    #[arg(long, conflicts_with = "cv")]
    baked: Option<PathBuf>,
    /// Cross-validate ITI over N contiguous folds (the reference uses 2): fit on the other folds, apply to the
    /// held-out one as a bias (every position) and as the reference's hook (from the prompt's end).
    #[arg(long, value_name = "N")]
    cv: Option<usize>,
    /// Which multiple-choice protocols to run.
    #[arg(long, value_enum, default_value = "both")]
    protocol: ProtocolArg,
    /// The reference protocol's instruction prompt.
    #[arg(long, value_enum, default_value = "default")]
    instruction: Instruction,
    /// How answer tokens are found: from token offsets (any tokenizer), or the reference's
    /// `len(tok(prompt)) + 3` slice (LLaMA-1/2 tokenizers only).
    #[arg(long, value_enum, default_value = "offsets")]
    answer_tokens: AnswerTokensArg,
    /// Put the results table into the model card (README.md) of this baked folder, and its new hash into
    /// the folder's manifest.
    #[arg(long, value_name = "DIR")]
    card: Option<PathBuf>,
    /// Documents sampled from the corpus for CE and KL (overrides the recipe's `corpus.documents`).
    #[arg(long)]
    documents: Option<usize>,
    /// Print the results as JSON instead of a markdown table.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum ProtocolArg {
    Reference,
    Leaderboard,
    Both,
}

#[derive(Clone, Copy, ValueEnum)]
enum Instruction {
    Default,
    Informative,
    None,
}

#[derive(Clone, Copy, ValueEnum)]
enum AnswerTokensArg {
    Offsets,
    ReferenceSlice,
}

#[derive(Args)]
struct VerifyArgs {
    /// A baked folder, or a Hub repo id `org/name[@revision]` holding one.
    target: String,
    /// The base model (folder, Hub id or short name): enables the tensor, bias and config checks.
    #[arg(long)]
    base: Option<String>,
    /// Also run a forward pass: the logits must move away from the base's and equal base + δ.
    #[arg(long)]
    run: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct RecipeArgs {
    /// A model folder, a Hub repo id `org/name[@revision]`, or a short name (see `bake models`).
    #[arg(long, short)]
    model: String,
    /// The YAML recipe (default: the built-in recipes/truthfulqa.yaml).
    #[arg(long, short)]
    recipe: Option<PathBuf>,
    /// Shift strength α (overrides the recipe). `bake search`: the α to try, comma-separated (default
    /// 0,2.5,5,10,15,20,30).
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    alpha: Vec<f64>,
    /// Number of heads K (overrides the recipe). `bake search`: the K to try, comma-separated (default
    /// 8,16,32,48,64,96, up to the model's heads).
    #[arg(long, value_delimiter = ',')]
    heads: Vec<usize>,
    /// Seed for splits, tuning prompts and random directions (overrides the recipe).
    #[arg(long)]
    seed: Option<u64>,
    /// Dataset folder or Hub id (overrides the recipe).
    #[arg(long)]
    dataset: Option<String>,
    /// Only the first N questions in multiple_choice order.
    #[arg(long)]
    limit: Option<usize>,
    /// Prompts per forward pass when `bake eval` scores answers and documents.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Most tokens in one batch of the activation pass, or auto (from the model's shape and the memory).
    #[arg(long)]
    batch_tokens: Option<bake::recipe::BatchTokens>,
    /// cpu, cuda, cuda:N or auto (CUDA when built with it and a GPU is present).
    #[arg(long)]
    device: Option<bake::recipe::DeviceChoice>,
    /// The matmuls' dtype: auto (f32 on the CPU, the checkpoint's on a GPU), f32, bf16 or f16.
    #[arg(long)]
    dtype: Option<bake::recipe::DtypeChoice>,
    /// How directions are found.
    #[arg(long, value_enum)]
    direction: Option<Direction>,
    /// Do not read or write the activation cache ($BAKE_CACHE_DIR, default ~/.cache/bake/activations).
    #[arg(long)]
    no_cache: bool,
    /// Memory budget (e.g. 8GB = 8·10⁹ bytes, 8GiB = 8·2³⁰), of host memory on the CPU and of GPU memory on
    /// CUDA: the activation pass runs layer by layer when the whole model would not fit (see `bake --dry-run`).
    #[arg(long, value_parser = parse_memory_size, allow_hyphen_values = true)]
    max_memory: Option<u64>,
    /// Text corpus for CE and KL in `bake eval` (.jsonl with a `text` field, or plain text).
    #[arg(long)]
    corpus: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Direction {
    CenterOfMass,
    Probe,
    Random,
}

#[derive(Args)]
struct ProbeArgs {
    #[command(flatten)]
    recipe: RecipeArgs,
    /// Folder for report.json and heatmap.png (created if missing; written atomically).
    #[arg(long, short)]
    out: PathBuf,
    /// Replace an existing report folder, if bake wrote it.
    #[arg(long)]
    force: bool,
}

/// The one value of a flag that takes a list only in `bake search`.
fn single<T: Copy + std::fmt::Debug>(flag: &str, values: &[T]) -> Result<Option<T>> {
    match values {
        [] => Ok(None),
        [v] => Ok(Some(*v)),
        _ => anyhow::bail!("--{flag} {values:?}: expected one value here (lists are for `bake search`)"),
    }
}

impl RecipeArgs {
    /// The recipe with every flag applied.
    fn load(&self) -> Result<Recipe> {
        self.load_with(single("alpha", &self.alpha)?, single("heads", &self.heads)?)
    }

    /// The recipe with every flag applied but --alpha and --heads (which `bake search` takes as lists).
    fn load_with(&self, alpha: Option<f64>, heads: Option<usize>) -> Result<Recipe> {
        let mut recipe = match &self.recipe {
            Some(path) => Recipe::load(path)?,
            None => Recipe::shipped(),
        };
        recipe.apply(&Overrides {
            alpha,
            heads,
            seed: self.seed,
            dataset: self.dataset.clone(),
            limit: self.limit,
            batch_size: self.batch_size,
            batch_tokens: self.batch_tokens,
            device: self.device,
            dtype: self.dtype,
            direction: self.direction.map(|d| match d {
                Direction::CenterOfMass => DirectionKind::CenterOfMass,
                Direction::Probe => DirectionKind::Probe,
                Direction::Random => DirectionKind::Random,
            }),
            corpus: self.corpus.clone(),
        })?;
        Ok(recipe)
    }

    fn run_options(&self) -> RunOptions {
        RunOptions {
            cache_dir: (!self.no_cache).then(bake::activations::cache::default_dir),
            max_memory: self.max_memory,
        }
    }
}

/// Draws the library's progress events on stderr: each stage with the time since the run began, counted work
/// as a bar in human units on a terminal, and as a plain line at least every 30 seconds elsewhere (a log
/// file, `nohup`, `tee`, CI, a cluster job), where a bar shows nothing. `--quiet` keeps only warnings.
struct Bars {
    bar: Mutex<Option<ProgressBar>>,
    started: Instant,
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
    fn new(quiet: bool) -> Self {
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

#[derive(Args)]
struct InspectArgs {
    /// A model folder, a Hub repo id `org/name[@revision]`, or a short name (see `bake models`).
    #[arg(long, short)]
    model: String,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// candle allocates a fresh buffer for every tensor operation and frees it right after. glibc returns such
/// buffers to the kernel (mmap'd ones at once, the heap's top past 128 KiB), so the next operation pays page
/// faults and zeroing again: about 15% of the activation pass. Keeping freed memory in the heap for reuse
/// costs no extra peak memory, since the next batch needs the same sizes.
fn keep_freed_buffers_for_reuse() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; it is called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20); // glibc's maximum; larger buffers are still mapped.
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

/// Rust ignores SIGPIPE, so `bake ... | head` would panic on the closed pipe; like other Unix tools, bake
/// should simply end there.
fn end_quietly_on_closed_pipe() {
    #[cfg(unix)]
    // SAFETY: restores the default disposition of one signal before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> ExitCode {
    keep_freed_buffers_for_reuse();
    end_quietly_on_closed_pipe();
    // `bake --model ...` without a command means `bake run --model ...`.
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let first = argv.get(1).and_then(|a| a.to_str()).unwrap_or("");
    if first.starts_with('-') && !["-h", "--help", "-V", "--version"].contains(&first) {
        argv.insert(1, "run".into());
    }
    let cli = Cli::parse_from(argv);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("bake: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Run(args) => run_bake(&args, cli.quiet)?,
        Command::Inspect(args) => run_inspect(&args)?,
        Command::Probe(args) => run_probe(&args, cli.quiet)?,
        Command::Verify(args) => return run_verify(&args, cli.quiet),
        Command::Eval(args) => run_eval(&args, cli.quiet)?,
        Command::Search(args) => run_search(&args, cli.quiet)?,
        Command::Push(args) => run_push(&args, cli.quiet)?,
        Command::Models => {
            for (alias, repo) in ALIASES {
                println!("{alias:<22} {repo}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn run_inspect(args: &InspectArgs) -> Result<()> {
    let model = ModelFiles::open(&args.model)?;
    let report = inspect::inspect(&model);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    println!("model        {}", report.model);
    if let Some(repo) = &report.hub_repo {
        println!("hub repo     {repo}");
    }
    println!("folder       {}", report.folder);
    println!("family       {} ({})", report.family.model_type(), report.architecture);
    println!("layers       {}", report.layers);
    println!("heads        {} ({} KV heads, head_dim {})", report.heads, report.kv_heads, report.head_dim);
    println!(
        "hidden       {} (FFN {}, o_proj in {})",
        report.hidden_size, report.intermediate_size, report.o_proj_in_features
    );
    println!("vocab        {}", report.vocab_size);
    println!("parameters   {} ({:.2} B)", report.parameters, report.parameters as f64 / 1e9);
    println!("dtype        {:?}", report.dtype);
    for f in &report.files {
        println!("file         {} ({:.3} GiB)", f.path, gib(f.bytes));
    }
    let m = &report.bake_memory_estimate;
    println!(
        "bake memory  ~{:.2} GiB (f32 weights {:.2} + mapped weights {:.2} + activations {:.2} + writer {:.2})",
        gib(m.total_bytes),
        gib(m.weights_f32_bytes),
        gib(m.mapped_weights_bytes),
        gib(m.activations_bytes),
        gib(m.writer_bytes)
    );
    println!("activations  full TruthfulQA set: {}", report.activation_plan.describe());
    let (plan, machine) = (&report.activation_plan, &report.this_machine);
    let gb = |b: u64| b as f64 / 1e9;
    match (machine.available_bytes, machine.mode) {
        (Some(a), Some(bake::activations::plan::Mode::Resident)) => {
            println!("this machine ~{:.2} GB available: a bake runs resident", gb(a))
        }
        (Some(a), Some(bake::activations::plan::Mode::Streamed)) => println!(
            "this machine ~{:.2} GB available: a bake runs layer-streamed (resident needs ~{:.2} GB)",
            gb(a),
            gb(plan.resident_bytes)
        ),
        (Some(a), None) => println!(
            "warning: this machine has ~{:.2} GB available, less than a bake needs (resident ~{:.2} GB, \
             streamed ~{:.2} GB): try --dtype bf16, a GPU, or a machine with more memory",
            gb(a),
            gb(plan.resident_bytes),
            gb(plan.streamed_bytes)
        ),
        (None, _) => println!("this machine: available memory unknown; give --max-memory to bake"),
    }
    Ok(())
}

fn run_probe(args: &ProbeArgs, quiet: bool) -> Result<()> {
    let recipe = args.recipe.load()?;
    let model = ModelFiles::open(&args.recipe.model)?;
    let run = Resolved::new(&model, &recipe, &args.recipe.run_options())?;
    let staging = pipeline::check_output(&args.out, args.force, &model, &recipe, OutputKind::Report)?.stage()?;
    let bars = Bars::new(quiet);
    staging.notes.iter().for_each(|n| bars.note(n));
    let outcome = pipeline::run_probe(&model, &recipe, &run, &bars)?;
    let published = pipeline::publish_probe_outputs(&outcome.report, staging)?;
    print_heads(&outcome);
    note_leftover(&published, &bars);
    bars.note(&format!("wrote {}", args.out.join("report.json").display()));
    Ok(())
}

/// A replaced folder that could not be removed is worth saying, not failing for: the new output is in place.
fn note_leftover(published: &bake::io::output::Published, progress: &dyn Progress) {
    if let Some((path, why)) = &published.leftover {
        progress.warn(&format!("the replaced folder is left at {} ({why}); remove it when convenient", path.display()));
    }
}

fn print_heads(outcome: &pipeline::ProbeOutcome) {
    let r = &outcome.report;
    println!("{} probe prompts, {} tuning prompts, {} questions", r.probe_prompts, r.tuning_prompts, outcome.questions);
    println!("top heads (layer, head: validation accuracy, σ):");
    for &(l, h, sigma) in r.sigma.iter().take(10) {
        println!("  {l:>3}, {h:>3}: {:.3}, {sigma:.4}", r.val_accuracy[l][h]);
    }
    if r.heads.len() > 10 {
        println!("  ... and {} more", r.heads.len() - 10);
    }
}

fn run_bake(args: &BakeArgs, quiet: bool) -> Result<()> {
    let bars = Bars::new(quiet);
    let recipe = args.recipe.load()?;
    let model = ModelFiles::open(&args.recipe.model)?;
    let run = Resolved::new(&model, &recipe, &args.recipe.run_options())?;
    let target = args
        .out
        .as_ref()
        .map(|out| pipeline::check_output(out, args.force, &model, &recipe, OutputKind::Bake))
        .transpose()?;
    let Some(target) = target.filter(|_| !args.dry_run) else {
        let plan = pipeline::plan_run(&model, &recipe, &run)?;
        println!("activation pass: {}", plan.describe());
        println!("{}", serde_json::to_string_pretty(&plan)?);
        return Ok(());
    };
    let staging = target.stage()?;
    staging.notes.iter().for_each(|n| bars.note(n));
    let outcome = pipeline::run_probe(&model, &recipe, &run, &bars)?;
    let write_started = Instant::now();
    let sharding = args.max_shard_size.map_or(Sharding::KeepBase, Sharding::MaxBytes);
    let options = BakeOptions { sharding };
    let written = bake::export::baked::write_baked(&outcome.bake_input(&model), staging, &options, &bars)?;
    let write_seconds = write_started.elapsed().as_secs_f64();
    bars.stage("done");
    note_leftover(&written.published, &bars);
    print_heads(&outcome);
    print_bake_summary(args, &outcome, &written, write_seconds, bars.started.elapsed().as_secs_f64());
    Ok(())
}

/// The end of a bake on stdout: where the stages' time went, what was written, and what to run next.
fn print_bake_summary(
    args: &BakeArgs,
    outcome: &pipeline::ProbeOutcome,
    written: &bake::export::baked::BakeWritten,
    write_seconds: f64,
    total_seconds: f64,
) {
    let timings = outcome.report.timings.clone().unwrap_or_default();
    let stages = ["data", "activations", "probes"].map(|s| (s, timings.get(s).copied().unwrap_or(0.0)));
    let bytes: u64 = written.files.iter().map(|f| f.bytes).sum();
    let out_path = &written.published.out;
    let (report, out, model) = (&outcome.report, out_path.display(), &args.recipe.model);
    println!();
    println!("  stage        time");
    for (stage, seconds) in stages.into_iter().chain([("write", write_seconds)]) {
        println!("  {stage:<12} {seconds:>6.1} s");
    }
    for (part, seconds) in &written.timings {
        println!("    {part:<13} {seconds:>4.1} s");
    }
    println!("  {:<12} {total_seconds:>6.1} s", "total");
    println!();
    println!("  output       {out} ({} files, {})", written.files.len(), bake::units::format_bytes(bytes));
    println!("  heads (K)    {} of {}", report.heads.len(), report.layers * report.heads_per_layer);
    println!("  alpha        {}", report.recipe.alpha);
    println!(
        "  questions    {} ({} probe prompts, {} tuning prompts)",
        outcome.questions, report.probe_prompts, report.tuning_prompts
    );
    println!("  figure       {}", out_path.join("heatmap.png").display());
    println!();
    println!("next:");
    for (why, command) in [
        ("prove it is exactly the base plus the shift", format!("bake verify {out} --base {model}")),
        ("TruthfulQA MC1/MC2 and CE/KL against the base", format!("bake eval --model {model} --baked {out}")),
        ("publish it on the Hub", format!("bake push {out} --repo your-org/NAME")),
    ] {
        println!("  {why}:\n    {command}");
    }
}

fn run_verify(args: &VerifyArgs, quiet: bool) -> Result<ExitCode> {
    let dir = bake::verify::locate(&args.target)?;
    let options = bake::verify::VerifyOptions { base: args.base.clone(), run: args.run };
    let progress: Box<dyn Progress> =
        if args.json { Box::new(bake::progress::Silent) } else { Box::new(Bars::new(quiet)) };
    let report = bake::verify::verify(&dir, &options, progress.as_ref())?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({ "ok": report.ok(), "folder": report.folder, "scope": report.scope, "checks": report.checks, "mismatches": report.mismatches })
        );
    } else {
        for m in &report.mismatches {
            let tensor = m.tensor.as_deref().map(|t| format!(" tensor `{t}`:")).unwrap_or_default();
            println!("FAIL [{}] {}:{tensor} {}", m.check, m.file, m.message);
        }
        let verdict = if report.ok() { "OK" } else { "FAILED" };
        println!(
            "{verdict}: {} ({} mismatches; checks: {})",
            report.folder,
            report.mismatches.len(),
            report.checks.join(", ")
        );
        if report.scope == bake::verify::Scope::SelfConsistency {
            println!(
                "note: self-consistency only: the files match bake.json, and the figures, the diff and the \
                 manifest's recipe and heads agree with report.json; but nothing was compared with the base model, \
                 so replaced weights, tokenizer, chat template or config with updated hashes would pass. To prove \
                 every file is exactly what the base and the shift give: bake verify {} --base MODEL",
                args.target
            );
        }
    }
    Ok(if report.ok() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn run_search(args: &SearchArgs, quiet: bool) -> Result<()> {
    use bake::search::{self, output};
    let mut recipe = args.recipe.load_with(None, None)?;
    if let (Some(n), Some(corpus)) = (args.documents, recipe.corpus.as_mut()) {
        corpus.documents = n;
    }
    let model = ModelFiles::open(&args.recipe.model)?;
    let model_heads = model.config.num_layers * model.config.num_heads;
    let options = search::SearchOptions {
        heads: match args.recipe.heads.is_empty() {
            true => search::default_heads(model_heads),
            false => args.recipe.heads.clone(),
        },
        alphas: match args.recipe.alpha.is_empty() {
            true => search::DEFAULT_ALPHAS.to_vec(),
            false => args.recipe.alpha.clone(),
        },
        kl_budget: args.kl_budget,
        ce_budget: args.ce_budget,
        objective: match args.objective {
            ObjectiveArg::Mc2 => search::Objective::Mc2,
            ObjectiveArg::Mc1 => search::Objective::Mc1,
        },
        folds: args.folds,
        trials: args.trials,
        early_discard: !args.full_grid,
        min_rung_questions: search::MIN_RUNG_QUESTIONS,
        eval: reference_protocol(),
    };
    let run = Resolved::new(&model, &recipe, &args.recipe.run_options())?;
    let staging = pipeline::check_output(&args.out, args.force, &model, &recipe, OutputKind::Report)?.stage()?;
    let bars = Bars::new(quiet);
    staging.notes.iter().for_each(|n| bars.note(n));
    let outcome = search::search(&model, &recipe, &options, &run, &bars)?;
    output::write_files(&outcome, staging.path())?;
    let published = staging.commit()?;
    bars.stage("done");
    note_leftover(&published, &bars);
    print!("{}", output::table(&outcome.report));
    let chosen = outcome.report.chosen();
    println!("\nchosen: {} (see {})", chosen.point(), args.out.join("tradeoff.png").display());
    println!(
        "bake it:\n  bake --model {} --recipe {} --out OUT",
        args.recipe.model,
        args.out.join("recipe.yaml").display()
    );
    Ok(())
}

/// The reference MC protocol with the default instruction and answers found by token offsets.
fn reference_protocol() -> bake::scoring::ScoreOptions {
    use bake::scoring::mc;
    bake::scoring::ScoreOptions {
        protocols: vec![mc::Protocol::Reference],
        instruction: mc::INSTRUCTION_DEFAULT.into(),
        answer_tokens: mc::AnswerTokens::Offsets,
    }
}

fn run_eval(args: &EvalArgs, quiet: bool) -> Result<()> {
    use bake::eval;
    use bake::scoring::{mc, ScoreOptions};
    let mut recipe = args.recipe.load()?;
    if let (Some(n), Some(corpus)) = (args.documents, recipe.corpus.as_mut()) {
        corpus.documents = n;
    }
    let model = ModelFiles::open(&args.recipe.model)?;
    let compared = match (args.cv, &args.baked) {
        (Some(folds), _) => eval::card::Compared::CrossValidated { folds },
        (None, Some(_)) => eval::card::Compared::BakedAgainstBase,
        (None, None) => eval::card::Compared::Base,
    };
    if let Some(dir) = &args.card {
        // Before the evaluation, which takes minutes: the card must be intact and get only its own numbers.
        eval::card::check_target(dir, &model, compared, args.baked.as_deref(), &recipe)?;
    }
    let options = ScoreOptions {
        protocols: match args.protocol {
            ProtocolArg::Reference => vec![mc::Protocol::Reference],
            ProtocolArg::Leaderboard => vec![mc::Protocol::Leaderboard],
            ProtocolArg::Both => vec![mc::Protocol::Reference, mc::Protocol::Leaderboard],
        },
        instruction: match args.instruction {
            Instruction::Default => mc::INSTRUCTION_DEFAULT.into(),
            Instruction::Informative => mc::INSTRUCTION_INFORMATIVE.into(),
            Instruction::None => String::new(),
        },
        answer_tokens: match args.answer_tokens {
            AnswerTokensArg::Offsets => mc::AnswerTokens::Offsets,
            AnswerTokensArg::ReferenceSlice => mc::AnswerTokens::ReferenceSlice,
        },
    };
    let run = Resolved::new(&model, &recipe, &args.recipe.run_options())?;
    let bars = Bars::new(quiet);
    let report = match (args.cv, &args.baked) {
        (Some(folds), _) => eval::cross_validate(&model, &recipe, folds, &options, &run, &bars)?,
        (None, Some(dir)) => {
            let baked = ModelFiles::open(&dir.to_string_lossy())?;
            eval::evaluate(&model, Some(&baked), &recipe, &options, &run, &bars)?
        }
        (None, None) => eval::evaluate(&model, None, &recipe, &options, &run, &bars)?,
    };
    if let Some(dir) = &args.card {
        let published = eval::card::put_evaluation(dir, &eval::card::section(&report, compared))?;
        note_leftover(&published, &bars);
        bars.note(&format!("wrote the table into {}", dir.join("README.md").display()));
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", eval::markdown_table(&report));
        let documents = report.documents.map(|d| format!(", CE/KL over {d} documents")).unwrap_or_default();
        println!("\n{} questions{documents}; {:.0} s", report.questions, report.timings["total"]);
    }
    Ok(())
}

fn run_push(args: &PushArgs, quiet: bool) -> Result<()> {
    let options = bake::hub::push::PushOptions {
        repo: args.repo.clone(),
        private: args.private,
        revision: args.revision.clone(),
        create_pr: args.create_pr,
        dry_run: args.dry_run,
    };
    let progress: Box<dyn Progress> =
        if args.json { Box::new(bake::progress::Silent) } else { Box::new(Bars::new(quiet)) };
    let report = bake::hub::push::push(&args.dir, &options, progress.as_ref())?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let uploads: Vec<_> = report.files.iter().filter(|f| f.upload).collect();
    for f in &report.files {
        println!("{} {} ({} bytes)", if f.upload { "upload   " } else { "unchanged" }, f.path, f.bytes);
    }
    let action = if report.dry_run { "would upload" } else { "uploaded" };
    let created = if report.repo_created {
        if report.dry_run {
            " (would create the repository)"
        } else {
            " (repository created)"
        }
    } else {
        ""
    };
    println!(
        "{action} {} of {} files to {}@{}{created}",
        uploads.len(),
        report.files.len(),
        report.repo,
        report.revision
    );
    if let Some(url) = report.pr_url.as_ref().or(report.commit_url.as_ref()) {
        println!("{url}");
    }
    if !report.dry_run {
        println!("remote LFS sha256 matches the manifest for {} weight files", report.verified.len());
    }
    Ok(())
}
