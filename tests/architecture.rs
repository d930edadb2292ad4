//! The structure of the library, checked: modules form layers in pipeline order, no module imports a later one
//! and no command another, and no two source files import each other (directly or around a longer loop).
//!
//! Imports are read from the source: every `use crate::…` / `use super::…` tree and every inline
//! `crate::…` / `super::…` path; the binary (`main.rs`, `cli/`) is left out. A module re-exporting its children (`pub use child::X`) is its interface,
//! not a dependency, and is not counted. Run it alone with `cargo test --test architecture`; set
//! `BAKE_SOURCE_DIR` to check another checkout's `src/` (an older commit, say).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The library's top-level modules, lowest first. A module may import its own layer and the ones before, except
/// that a command never imports another command.
const LAYERS: &[&[&str]] = &[
    &["error", "progress", "units", "rng", "io", "figure"], // below every stage: errors, reporting, files, plots
    &["recipe"],                                            // every choice of a run
    &["model"],                                             // stage 1: resolve, config, weights, forward pass
    &["data"],                                              // stage 2: TruthfulQA and the prompts
    &["activations"],                                       // stage 3: the activation pass
    &["probes"],                                            // stage 4: probes, heads, directions, σ, δ
    &["surgery"],                                           // stage 5: δ → biases
    &["export"],                                            // stage 6: the baked folder and its manifest
    &["pipeline", "inspect"],                               // stages 2–6 in one call; what a bake will cost
    &["scoring"],                                           // MC1/MC2, CE/KL and folds; the model run for logits
    &["verify"],                                            // the proof that a baked folder is base + diff
    COMMANDS,
];

/// The commands built on the stages and the scoring layer (`bake`, `probe` and `inspect` are the pipeline's).
const COMMANDS: &[&str] = &["hub", "eval", "search"];

fn layer_of(module: &str) -> usize {
    LAYERS
        .iter()
        .position(|l| l.contains(&module))
        .unwrap_or_else(|| panic!("module `{module}` has no layer in LAYERS"))
}

/// src/a/b.rs → ["a", "b"]; src/a/mod.rs → ["a"]; src/lib.rs → [].
fn module_path(file: &Path, src: &Path) -> Vec<String> {
    let relative = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = relative.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
        parts.pop();
    }
    parts
}

fn source_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            source_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") && path.file_name().unwrap() != "main.rs" {
            out.push(path);
        }
    }
}

/// The code without comments (doc comments included) and without its unit-test module (always last), so
/// that prose and tests never count as imports.
fn library_code(text: &str) -> String {
    let code = text.split("#[cfg(test)]\nmod tests").next().unwrap_or(text);
    code.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n")
}

/// Expands a use tree such as `crate::{a::b, c::{d, e}}` into paths (`crate::a::b`, `crate::c::d`, ...).
fn expand(tree: &str) -> Vec<String> {
    let tree: String = tree.chars().filter(|c| !c.is_whitespace()).collect();
    let Some(open) = tree.find('{') else { return vec![tree] };
    let (prefix, rest) = tree.split_at(open);
    let inner = &rest[1..rest.rfind('}').unwrap()];
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    parts.into_iter().filter(|p| !p.is_empty()).flat_map(|p| expand(&format!("{prefix}{p}"))).collect()
}

/// Every module path `file` imports, as absolute segment lists.
fn imports(code: &str, module: &[String]) -> Vec<Vec<String>> {
    let mut paths = Vec::new();
    // `use` statements (not `pub use` re-exports).
    let mut rest = code;
    while let Some(at) = rest.find("use ") {
        let before = &rest[..at];
        let statement_start = before.trim_end().is_empty() || before.ends_with(['\n', ' ', '{', ';']);
        let after = &rest[at + 4..];
        let end = after.find(';').unwrap_or(after.len());
        let public = before.trim_end().ends_with("pub") || before.trim_end().ends_with("pub(crate)");
        if statement_start && !public {
            paths.extend(expand(&after[..end]));
        }
        rest = &after[end.min(after.len())..];
    }
    // Inline paths.
    for keyword in ["crate::", "super::"] {
        let mut from = 0;
        while let Some(i) = code[from..].find(keyword).map(|i| i + from) {
            let preceded = code[..i].chars().next_back().is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':');
            let path: String =
                code[i..].chars().take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':').collect();
            // A path that opens a `{` group is a use tree, read above.
            let opens_group = code[i + path.len()..].starts_with('{');
            if !preceded && !opens_group {
                paths.push(path.trim_end_matches(':').to_string());
            }
            from = i + keyword.len();
        }
    }
    paths
        .into_iter()
        .filter_map(|p| {
            let segments: Vec<&str> = p.split("::").filter(|s| !s.is_empty()).collect();
            // `super` is the parent of the file's module (for `a/mod.rs`, module `a`, that is the crate).
            let parent_len = module.len().saturating_sub(1);
            let absolute: Vec<String> = match *segments.first()? {
                "crate" => segments[1..].iter().map(|s| s.to_string()).collect(),
                "super" => {
                    module[..parent_len].iter().cloned().chain(segments[1..].iter().map(|s| s.to_string())).collect()
                }
                _ => return None,
            };
            Some(absolute).filter(|a| !a.is_empty())
        })
        .collect()
}

struct Tree {
    /// Module path → the file that defines it.
    files: BTreeMap<Vec<String>, PathBuf>,
    /// File → the module paths it imports.
    imports: BTreeMap<PathBuf, Vec<Vec<String>>>,
    modules: BTreeMap<PathBuf, Vec<String>>,
}

fn read_tree() -> Tree {
    let src = std::env::var_os("BAKE_SOURCE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    let mut files = Vec::new();
    source_files(&src, &mut files);
    // The binary (main.rs and its commands in cli/) sits above the library: it may import any of it.
    files.retain(|f| !f.starts_with(src.join("cli")));
    let mut tree = Tree { files: BTreeMap::new(), imports: BTreeMap::new(), modules: BTreeMap::new() };
    for file in files {
        let module = module_path(&file, &src);
        let code = library_code(&std::fs::read_to_string(&file).unwrap());
        tree.imports.insert(file.clone(), imports(&code, &module));
        tree.files.insert(module.clone(), file.clone());
        tree.modules.insert(file, module);
    }
    tree
}

impl Tree {
    /// The file defining the longest prefix of `path` that is a module.
    fn file_of(&self, path: &[String]) -> Option<&PathBuf> {
        (1..=path.len()).rev().find_map(|n| self.files.get(&path[..n]))
    }
}

#[test]
fn no_module_imports_a_later_stage_or_another_command() {
    let tree = read_tree();
    let mut upward = BTreeSet::new();
    for (file, imports) in &tree.imports {
        let Some(own) = tree.modules[file].first() else { continue };
        for path in imports {
            let target = &path[0];
            // Items of the crate root (`crate::VERSION`) are below every stage.
            let is_module = tree.files.contains_key(&path[..1]);
            let another_command = COMMANDS.contains(&target.as_str()) && COMMANDS.contains(&own.as_str());
            if is_module && target != own && (layer_of(target) > layer_of(own) || another_command) {
                upward.insert(format!("{} imports {}", file.display(), path.join("::")));
            }
        }
    }
    assert!(
        upward.is_empty(),
        "imports from a later stage or another command:\n{}",
        upward.into_iter().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn no_two_files_import_each_other() {
    let tree = read_tree();
    let edges: BTreeMap<&PathBuf, BTreeSet<&PathBuf>> = tree
        .imports
        .iter()
        .map(|(file, imports)| (file, imports.iter().filter_map(|p| tree.file_of(p)).filter(|t| *t != file).collect()))
        .collect();
    // Depth-first search for a back edge.
    fn visit<'a>(
        file: &'a PathBuf,
        edges: &BTreeMap<&'a PathBuf, BTreeSet<&'a PathBuf>>,
        stack: &mut Vec<&'a PathBuf>,
        done: &mut BTreeSet<&'a PathBuf>,
    ) -> Option<Vec<&'a PathBuf>> {
        if let Some(at) = stack.iter().position(|f| *f == file) {
            return Some(stack[at..].to_vec());
        }
        if !done.insert(file) {
            return None;
        }
        stack.push(file);
        for next in edges.get(file).into_iter().flatten() {
            if let Some(cycle) = visit(next, edges, stack, done) {
                return Some(cycle);
            }
        }
        stack.pop();
        None
    }
    let mut done = BTreeSet::new();
    for file in edges.keys() {
        if let Some(cycle) = visit(file, &edges, &mut Vec::new(), &mut done) {
            let names: Vec<String> = cycle.iter().map(|f| f.display().to_string()).collect();
            panic!("these files import each other in a loop: {}", names.join(" → "));
        }
    }
}

#[test]
fn the_import_reader_reads_trees_and_paths() {
    let code = "use crate::io::{fs::{read_text, limits}, names};\npub use child::X;\nlet x = crate::model::Llama::load();\nuse super::Sibling;";
    let module = vec!["export".to_string(), "baked".to_string()];
    let found: BTreeSet<String> = imports(code, &module).into_iter().map(|p| p.join("::")).collect();
    let expected: BTreeSet<String> =
        ["io::fs::read_text", "io::fs::limits", "io::names", "model::Llama::load", "export::Sibling"]
            .map(String::from)
            .into();
    assert_eq!(found, expected);
}

/// candle gives each CUDA device it creates an id of its own, and tensors of two never meet: a command creates
/// its device once, when it resolves its run (`pipeline::Resolved::new`), and hands it down. Checked by
/// construction: `pick_device` has that one caller, and only `pick_device` creates a CUDA device.
#[test]
fn the_device_is_created_in_one_place() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    source_files(&src, &mut files);
    files.push(src.join("main.rs"));
    let mut callers = Vec::new();
    let mut creators = Vec::new();
    for file in &files {
        let code = library_code(&std::fs::read_to_string(file).unwrap());
        let relative = file.strip_prefix(&src).unwrap().display().to_string();
        let calls = code.matches("pick_device(").count() - code.matches("fn pick_device(").count();
        callers.extend(std::iter::repeat_n(relative.clone(), calls));
        creators.extend(std::iter::repeat_n(relative, code.matches("new_cuda(").count()));
    }
    assert_eq!(callers, ["pipeline.rs"], "pick_device is called from more than the run's resolution");
    assert_eq!(creators, ["model/mod.rs"], "a CUDA device is created outside pick_device");
}
