//! Stage 6: writing the baked checkpoint, the pyvene activation diff, the model card and the manifest.

pub mod baked;
pub mod card;
pub mod gguf;
pub mod manifest;
pub mod pyvene;
pub mod runtimes;
