//! Named points where a test makes `bake` fail on purpose, to prove what an interruption leaves behind
//! without relying on timing: `BAKE_FAILPOINTS=name=action[,name=action...]`, where `action` is
//! - `abort`: the process dies at that point, as under `kill -9` (no destructor, no clean-up runs);
//! - `error`: the step fails with an I/O error, as a full disk or a permission problem would make it;
//! - `unsupported`: the step reports that the filesystem does not support it (exercises fallbacks);
//! - `wait:PATH`: the process creates `PATH.reached` and pauses until PATH exists (at most a minute), so
//!   that a test can run something else at exactly that point.
//!
//! Unset (every normal run), each point costs one lookup in an empty list.

use std::sync::OnceLock;

fn configured() -> &'static [(String, String)] {
    static POINTS: OnceLock<Vec<(String, String)>> = OnceLock::new();
    POINTS.get_or_init(|| {
        std::env::var("BAKE_FAILPOINTS")
            .unwrap_or_default()
            .split(',')
            .filter_map(|p| p.split_once('='))
            .map(|(n, a)| (n.trim().to_string(), a.trim().to_string()))
            .collect()
    })
}

fn action(name: &str) -> Option<&'static str> {
    configured().iter().find(|(n, _)| n == name).map(|(_, a)| a.as_str())
}

/// Passes through unless the point `name` is configured to abort or to fail.
pub fn hit(name: &str) -> std::io::Result<()> {
    match action(name) {
        Some("abort") => std::process::abort(),
        Some("error") => Err(std::io::Error::other(format!("failure injected at `{name}` (BAKE_FAILPOINTS)"))),
        Some(a) if a.starts_with("wait:") => {
            let go = std::path::Path::new(&a["wait:".len()..]);
            std::fs::write(format!("{}.reached", go.display()), b"")?;
            let started = std::time::Instant::now();
            while !go.exists() && started.elapsed() < std::time::Duration::from_secs(60) {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Whether the point `name` is configured to report the operation as unsupported.
pub fn unsupported(name: &str) -> bool {
    action(name) == Some("unsupported")
}
