//! The commands of the `bake` binary, one file each, over the flag groups they share ([`args`]), the output
//! folder's sequence ([`output`]) and the progress display ([`progress`]).

pub mod args;
pub mod bake;
pub mod eval;
pub mod gguf;
pub mod inspect;
pub mod output;
pub mod progress;
pub mod push;
pub mod search;
pub mod verify;
