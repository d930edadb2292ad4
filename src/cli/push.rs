//! `bake push`: publish a baked folder to the Hugging Face Hub in one commit, then check the remote weights.

use std::path::PathBuf;

use anyhow::Result;
use bake::progress::Progress;
use clap::Args;

use super::progress::Bars;

#[derive(Args)]
pub struct PushArgs {
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

pub fn run(args: &PushArgs, quiet: bool) -> Result<()> {
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
