//! Creating or replacing an output folder without ever destroying what `bake` did not write.
//!
//! Rules, checked before any work ([`check`]):
//! - never `/`, the home folder, the working folder or one of its parents, a folder that contains (or is,
//!   or lies inside) the model folder, or one that contains the dataset;
//! - an existing folder is replaced only with `--force`, and only when `bake` wrote it, proven by content:
//!   its file list (`bake.json` for a bake, `outputs.json` for a probe report or a search) is exactly as bake
//!   serialized it, lists every file the folder holds, and each file has the size and sha256 recorded there
//!   (a bake's `bake.log` is not listed and must hold nothing but timings). An empty folder is used as is;
//!   anything else is refused, `--force` or not.
//!
//! Writing ([`Target::stage`], [`Staging::commit`]): everything goes into a staging folder beside the output,
//! unique to the run (`.OUT.bake-partial-PID-N`) and locked while the run lives. At the end the staging
//! folder is renamed into place; an existing bake is swapped with it in one atomic step
//! (`renameat2(RENAME_EXCHANGE)`) and removed only afterwards, so at every instant `OUT` is either the
//! complete old folder or the complete new one. Where the filesystem cannot swap, the old folder is first
//! renamed aside (`.OUT.bake-old-PID-N`); a run interrupted between the two renames leaves it complete
//! there, and the next run into `OUT` puts it back. Staging and set-aside folders of dead runs (their lock
//! is free) are cleaned up by the next run into the same `OUT`.

use std::fs::File;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::failpoint;
use super::listing::{
    entries_under, is_as_serialized, is_timings_log, FileListing, OutputsFile, BAKE_UNLISTED, MANIFEST_FILE,
    OUTPUTS_FILE, OUTPUTS_UNLISTED, TIMINGS_LOGS,
};
use crate::error::{BakeError, IoContext, Result};

/// A folder the output must keep clear of.
#[derive(Debug, Clone, Copy)]
pub struct Protected<'a> {
    pub path: &'a Path,
    /// How messages name it: "the model folder", "the dataset folder".
    pub what: &'static str,
    /// Also refuse an output inside it.
    pub refuse_inside: bool,
}

/// Which file list proves that bake wrote an existing folder (so that `--force` may replace it).
#[derive(Debug, Clone, Copy)]
pub enum Ownership {
    /// A bake: `bake.json`'s `outputs`.
    Manifest,
    /// A probe report or a search: `outputs.json`, which [`Staging::commit`] writes.
    Listing,
}

impl Ownership {
    fn list_file(self) -> &'static str {
        match self {
            Ownership::Manifest => MANIFEST_FILE,
            Ownership::Listing => OUTPUTS_FILE,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub out: &'a Path,
    pub force: bool,
    pub protected: Vec<Protected<'a>>,
    pub ownership: Ownership,
}

/// A checked output: where it goes and whether an existing folder of bake's will be replaced.
#[derive(Debug, Clone)]
pub struct Target {
    /// As the user gave it (for messages).
    pub out: PathBuf,
    /// Absolute, with every existing parent resolved.
    resolved: PathBuf,
    force: bool,
    ownership: Ownership,
    pub replaces: bool,
}

/// The state of `out` right now.
enum Existing {
    Missing,
    EmptyFolder,
    OwnedFolder,
}

/// Checks `request` without writing anything (used by `--dry-run` too).
pub fn check(request: &Request) -> Result<Target> {
    let out = request.out;
    let refuse = |message: String| BakeError::Output { path: out.into(), message };
    if out.to_str().is_none() {
        return Err(refuse(
            "is not valid UTF-8; give an output path that can be typed back (bake verify needs it)".into(),
        ));
    }
    if std::fs::symlink_metadata(out).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(refuse("is a symbolic link; bake writes only to a real folder path".into()));
    }
    let resolved = resolve(out)?;
    refuse_special_folders(&resolved, request).map_err(refuse)?;
    let existing = existing(&resolved, request.ownership).map_err(refuse)?;
    let replaces = matches!(existing, Existing::OwnedFolder);
    if replaces && !request.force {
        return Err(refuse("already exists; pass --force to replace it".into()));
    }
    Ok(Target { out: out.into(), resolved, force: request.force, ownership: request.ownership, replaces })
}

/// `path` made absolute with its deepest existing ancestor canonicalised (`..` and symbolic links resolved).
fn resolve(path: &Path) -> Result<PathBuf> {
    let cwd = std::env::current_dir().at(".")?;
    let absolute = cwd.join(path);
    let mut existing = absolute.as_path();
    let mut rest = Vec::new();
    loop {
        match existing.canonicalize() {
            Ok(base) => {
                let mut out = base;
                for part in rest.iter().rev() {
                    match part {
                        Component::ParentDir => {
                            out.pop();
                        }
                        Component::Normal(name) => out.push(name),
                        _ => {}
                    }
                }
                return Ok(out);
            }
            Err(_) => {
                rest.push(existing.components().next_back().expect("a path below the root has a last component"));
                existing = existing.parent().expect("the root folder exists");
            }
        }
    }
}

fn canonical(path: &Path) -> Option<PathBuf> {
    path.canonicalize().ok()
}

/// Why `resolved` must never be written, if it must not.
fn refuse_special_folders(resolved: &Path, request: &Request) -> std::result::Result<(), String> {
    if resolved.parent().is_none() {
        return Err("is the root folder; bake never writes or replaces it".into());
    }
    if let Some(home) = std::env::var_os("HOME").and_then(|h| canonical(Path::new(&h))) {
        if resolved == home {
            return Err(format!("is your home folder ({}); choose a new folder inside it", home.display()));
        }
    }
    if let Some(cwd) = std::env::current_dir().ok().and_then(|c| canonical(&c)) {
        if cwd.starts_with(resolved) {
            return Err("is the working folder or one of its parents; choose a new folder".into());
        }
    }
    for p in &request.protected {
        let Some(folder) = canonical(p.path) else { continue };
        if resolved == folder {
            return Err(format!("is {} itself; write the output elsewhere", p.what));
        }
        if folder.starts_with(resolved) {
            return Err(format!("contains {} {}; write the output elsewhere", p.what, folder.display()));
        }
        if p.refuse_inside && resolved.starts_with(&folder) {
            return Err(format!("lies inside {} {}; write the output elsewhere", p.what, folder.display()));
        }
    }
    Ok(())
}

/// What is at `resolved` now, or why it may not be replaced.
fn existing(resolved: &Path, ownership: Ownership) -> std::result::Result<Existing, String> {
    let metadata = match std::fs::symlink_metadata(resolved) {
        // Under a file, the output is missing: creating its staging folder will say why it cannot be written.
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory) => {
            return Ok(Existing::Missing)
        }
        Err(e) => return Err(format!("cannot be examined: {e}")),
        Ok(m) => m,
    };
    if !metadata.is_dir() {
        return Err("exists and is not a folder; bake replaces only folders it wrote".into());
    }
    let entries = entries_under(resolved).map_err(|e| format!("cannot be listed: {e}"))?;
    if entries.is_empty() && std::fs::read_dir(resolved).map_err(|e| e.to_string())?.next().is_none() {
        return Ok(Existing::EmptyFolder);
    }
    let not_ours = |why: String| {
        Err(format!(
            "is not empty and was not written by bake ({why}); bake replaces only folders it wrote, even with --force"
        ))
    };
    let list_file = ownership.list_file();
    let text = match super::fs::read_text(&resolved.join(list_file), super::fs::limits::JSON) {
        Ok(text) => text,
        Err(_) => return not_ours(format!("{} there, and no readable {list_file}", describe_some(&entries))),
    };
    if !is_as_serialized(&text) {
        return not_ours(format!("its {list_file} is not as bake wrote it"));
    }
    let (listing, unlisted_by_design) = match ownership {
        Ownership::Manifest => (FileListing::read(resolved), BAKE_UNLISTED),
        Ownership::Listing => (OutputsFile::read(resolved).map(|f| f.outputs), OUTPUTS_UNLISTED),
    };
    let listing = match listing {
        Ok(l) => l,
        Err(e) => return not_ours(format!("its {list_file} is not bake's: {e}")),
    };
    let differences = listing.differences(resolved, unlisted_by_design).map_err(|e| e.to_string())?;
    if let Some((name, what)) = differences.first() {
        let more = match differences.len() {
            1 => String::new(),
            n => format!(", and {} more", n - 1),
        };
        return not_ours(format!("`{name}`: {what} in its {list_file}{more}"));
    }
    for name in TIMINGS_LOGS {
        let log = resolved.join(name);
        if log.exists() && !super::fs::read_text(&log, 1 << 20).is_ok_and(|t| is_timings_log(&t)) {
            return not_ours(format!("its {name} holds more than bake's timings"));
        }
    }
    Ok(Existing::OwnedFolder)
}

fn describe_some(names: &[String]) -> String {
    let shown: Vec<String> = names.iter().take(3).map(|n| format!("`{n}`")).collect();
    match names.len() {
        1 => format!("{} is", shown[0]),
        n if n <= 3 => format!("{} are", shown.join(", ")),
        n => format!("{} and {} more are", shown.join(", "), n - 3),
    }
}

/// Names beside `out` that belong to runs into it: `.OUT.bake-partial-*` and `.OUT.bake-old-*`.
fn sibling_prefix(resolved: &Path, role: &str) -> String {
    let name = resolved.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    format!(".{name}.bake-{role}-")
}

fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    format!("{}-{nanos}{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// The process id a sibling folder's name carries.
fn owner_pid(name: &str, prefix: &str) -> Option<i32> {
    name.strip_prefix(prefix)?.split('-').next()?.parse().ok()
}

fn process_alive(pid: i32) -> bool {
    #[cfg(unix)]
    {
        // SAFETY: signal 0 only asks whether the process exists.
        let r = unsafe { libc::kill(pid, 0) };
        r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

/// Opens a folder and takes its exclusive lock without waiting; `None` when another process holds it.
fn try_lock_folder(path: &Path) -> Option<File> {
    let folder = File::open(path).ok()?;
    folder.try_lock().ok()?;
    Some(folder)
}

/// A staging folder being filled; removed on drop unless committed.
pub struct Staging {
    target: Target,
    path: PathBuf,
    /// Held for the whole run: other runs see the folder is alive.
    _lock: File,
    committed: bool,
    /// What the clean-up of earlier runs' leftovers did.
    pub notes: Vec<String>,
}

impl Target {
    /// Creates this run's staging folder beside the output (and the output's parents), after cleaning up
    /// what dead runs into the same output left. Fails here, before any work, when the place is not
    /// writable.
    pub fn stage(self) -> Result<Staging> {
        let parent = self.resolved.parent().expect("checked: not the root").to_path_buf();
        std::fs::create_dir_all(&parent).map_err(|e| self.cannot_write(&parent, e))?;
        let notes = self.clean_up_dead_runs(&parent);
        let path = parent.join(format!("{}{}", sibling_prefix(&self.resolved, "partial"), unique_suffix()));
        std::fs::create_dir(&path).map_err(|e| self.cannot_write(&parent, e))?;
        let lock = File::open(&path).at(&path)?;
        lock.try_lock().map_err(|e| self.cannot_write(&path, std::io::Error::other(e.to_string())))?;
        Ok(Staging { target: self, path, _lock: lock, committed: false, notes })
    }

    fn cannot_write(&self, at: &Path, e: std::io::Error) -> BakeError {
        BakeError::Output { path: self.out.clone(), message: format!("cannot be written ({}: {e})", at.display()) }
    }

    /// Removes staging folders of dead runs; puts back (or removes) a set-aside old output.
    fn clean_up_dead_runs(&self, parent: &Path) -> Vec<String> {
        let mut notes = Vec::new();
        let Ok(entries) = std::fs::read_dir(parent) else { return notes };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            for role in ["partial", "old"] {
                let prefix = sibling_prefix(&self.resolved, role);
                let Some(pid) = owner_pid(&name, &prefix) else { continue };
                let path = entry.path();
                if !entry.file_type().is_ok_and(|t| t.is_dir()) || process_alive(pid) {
                    continue;
                }
                let Some(_lock) = try_lock_folder(&path) else { continue };
                let outcome = if role == "old" && !self.resolved.exists() {
                    std::fs::rename(&path, &self.resolved)
                        .map(|()| format!("restored {} from an interrupted replacement", self.out.display()))
                } else {
                    std::fs::remove_dir_all(&path)
                        .map(|()| format!("removed {} left by an interrupted run", path.display()))
                };
                notes.push(outcome.unwrap_or_else(|e| format!("could not clean up {}: {e}", path.display())));
            }
        }
        notes
    }
}

/// What [`Staging::commit`] did.
#[derive(Debug)]
pub struct Published {
    pub out: PathBuf,
    /// An older folder of bake's was replaced.
    pub replaced: bool,
    /// The replaced folder could not be removed: where it is left, and why.
    pub leftover: Option<(PathBuf, String)>,
}

impl Staging {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Publishes the staging folder as the output. The output is checked again first: it may have changed
    /// during a long run.
    pub fn commit(mut self) -> Result<Published> {
        if matches!(self.target.ownership, Ownership::Listing) {
            let listing = OutputsFile::of_folder(&self.path)?;
            let path = self.path.join(OUTPUTS_FILE);
            std::fs::write(&path, listing.to_text()).at(&path)?;
        }
        failpoint::hit("commit").at(&self.path)?;
        let parent = self.path.parent().expect("a staging folder has a parent").to_path_buf();
        // Runs into the same parent commit one at a time, so the check below holds until the rename.
        let parent_lock = File::open(&parent).at(&parent)?;
        parent_lock.lock().map_err(|e| BakeError::io(&parent, e))?;
        let target = &self.target;
        let refuse = |message: String| BakeError::Output { path: target.out.clone(), message };
        let state = existing(&target.resolved, target.ownership)
            .map_err(|m| refuse(format!("changed while bake ran: it {m}")))?;
        let published = match state {
            Existing::Missing | Existing::EmptyFolder => {
                std::fs::rename(&self.path, &target.resolved).at(&target.resolved)?;
                self.committed = true;
                Published { out: target.out.clone(), replaced: false, leftover: None }
            }
            Existing::OwnedFolder if !target.force => {
                return Err(refuse("appeared while bake ran; pass --force to replace it".into()));
            }
            Existing::OwnedFolder => {
                let leftover = self.replace_existing()?;
                Published { out: self.target.out.clone(), replaced: true, leftover }
            }
        };
        sync_folder(&parent);
        Ok(published)
    }

    /// Swaps the staging folder with the existing output, then removes the old one.
    fn replace_existing(&mut self) -> Result<Option<(PathBuf, String)>> {
        let out = self.target.resolved.clone();
        let old = match exchange(&self.path, &out) {
            Ok(()) => {
                // The staging path now holds the old folder, still under this run's lock.
                self.committed = true;
                failpoint::hit("exchanged").at(&out)?;
                self.path.clone()
            }
            Err(e) if e.kind() == std::io::ErrorKind::Unsupported => self.replace_in_two_renames(&out)?,
            Err(e) => return Err(BakeError::io(&out, e)),
        };
        let removed = failpoint::hit("remove-old").and_then(|()| std::fs::remove_dir_all(&old));
        Ok(removed.err().map(|e| (old, e.to_string())))
    }

    /// Where the filesystem cannot swap: the old folder is renamed aside (locked, so that no other run
    /// takes it for a dead run's), the new one into place, and the old one is removed by the caller.
    fn replace_in_two_renames(&mut self, out: &Path) -> Result<PathBuf> {
        let aside = out.with_file_name(format!("{}{}", sibling_prefix(out, "old"), unique_suffix()));
        let old_lock = File::open(out).at(out)?;
        old_lock.try_lock().map_err(|e| BakeError::io(out, std::io::Error::other(e.to_string())))?;
        std::fs::rename(out, &aside).at(out)?;
        let moved = failpoint::hit("moved-aside").and_then(|()| std::fs::rename(&self.path, out));
        if let Err(e) = moved {
            // Put the old folder back: the output must stay complete.
            let _ = std::fs::rename(&aside, out);
            return Err(BakeError::io(out, e));
        }
        self.committed = true;
        Ok(aside)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Swaps two paths atomically; `Unsupported` where the system or filesystem cannot.
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    if failpoint::unsupported("exchange") {
        return Err(std::io::ErrorKind::Unsupported.into());
    }
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::ffi::OsStrExt;
        let (a, b) =
            (std::ffi::CString::new(a.as_os_str().as_bytes())?, std::ffi::CString::new(b.as_os_str().as_bytes())?);
        // SAFETY: two NUL-terminated paths; the call only renames.
        let r =
            unsafe { libc::renameat2(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), libc::RENAME_EXCHANGE) };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP) => Err(std::io::ErrorKind::Unsupported.into()),
            _ => Err(e),
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (a, b);
        Err(std::io::ErrorKind::Unsupported.into())
    }
}

/// Makes the renames durable; best effort (not every filesystem can sync a folder).
fn sync_folder(folder: &Path) {
    if let Ok(f) = File::open(folder) {
        let _ = f.sync_all();
    }
}
