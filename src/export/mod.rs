//! Stage 5: writing the baked checkpoint, the pyvene activation diff, the model card and the manifest.

pub mod shards;
