//! Reading input files safely: only regular files are opened (a FIFO would block forever, a folder or a
//! device gives a confusing error), and whole-file reads are bounded so that a wrong path such as
//! `/dev/zero` or a 100 GB log cannot exhaust memory.

use std::fs::{File, OpenOptions};
use std::path::Path;

use crate::error::{BakeError, IoContext, Result};

/// The largest text files `bake` reads whole, by kind.
pub mod limits {
    /// A recipe: the shipped one is 2 KB.
    pub const RECIPE: u64 = 1 << 20;
    /// `config.json`, `bake.json`, an index or a pyvene config.
    pub const JSON: u64 = 64 << 20;
    /// `tokenizer.json` (Llama 3's is 9 MB).
    pub const TOKENIZER: u64 = 256 << 20;
    /// One TruthfulQA file or a corpus file.
    pub const DATA: u64 = 1 << 30;
}

/// Opens `path` for reading if it is a regular file (symbolic links are followed). The open itself never
/// blocks: a FIFO is opened non-blocking and refused before anything is read from it.
pub fn open_regular(path: &Path) -> Result<File> {
    let mut options = OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = options.open(path).at(path)?;
    let kind = file.metadata().at(path)?.file_type();
    if !kind.is_file() {
        return Err(BakeError::Input {
            path: path.into(),
            message: format!("is {}; expected a regular file", describe(kind)),
        });
    }
    Ok(file)
}

/// Checks that `path` names a regular file without opening it (for paths handed to other libraries).
pub fn require_regular(path: &Path) -> Result<()> {
    open_regular(path).map(drop)
}

fn describe(kind: std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if kind.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if kind.is_socket() {
            return "a socket";
        }
        if kind.is_block_device() || kind.is_char_device() {
            return "a device";
        }
    }
    if kind.is_dir() {
        "a folder"
    } else {
        "not a regular file"
    }
}

/// The whole content of a regular file of at most `limit` bytes.
pub fn read_bytes(path: &Path, limit: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let file = open_regular(path)?;
    let size = file.metadata().at(path)?.len();
    check_size(path, size, limit)?;
    let mut bytes = Vec::with_capacity(size as usize);
    // `take` guards against a file that grows while it is read.
    file.take(limit + 1).read_to_end(&mut bytes).at(path)?;
    check_size(path, bytes.len() as u64, limit)?;
    Ok(bytes)
}

/// The whole content of a regular UTF-8 text file of at most `limit` bytes.
pub fn read_text(path: &Path, limit: u64) -> Result<String> {
    String::from_utf8(read_bytes(path, limit)?).map_err(|e| BakeError::Input {
        path: path.into(),
        message: format!("is not UTF-8 text (byte {})", e.utf8_error().valid_up_to()),
    })
}

fn check_size(path: &Path, size: u64, limit: u64) -> Result<()> {
    if size > limit {
        return Err(BakeError::Input {
            path: path.into(),
            message: format!(
                "is {} bytes; files of this kind are refused above {} bytes (is it the right file?)",
                size, limit
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_and_fifos_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let err = read_text(dir.path(), 10).unwrap_err().to_string();
        assert!(err.contains("is a folder; expected a regular file"), "{err}");
        let fifo = dir.path().join("pipe");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a plain mkfifo on a path inside our temporary folder.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = read_text(&fifo, 10).unwrap_err().to_string();
        assert!(err.contains("FIFO"), "{err}");
    }

    #[test]
    fn sizes_above_the_limit_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        std::fs::write(&path, vec![b'a'; 11]).unwrap();
        let err = read_text(&path, 10).unwrap_err().to_string();
        assert!(err.contains("11 bytes") && err.contains("above 10 bytes"), "{err}");
        assert_eq!(read_text(&path, 11).unwrap().len(), 11);
        let err = read_text(Path::new("/dev/zero"), 10).unwrap_err().to_string();
        assert!(err.contains("a device"), "{err}");
    }
}
