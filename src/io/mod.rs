//! Files in and out, below every pipeline stage: reading inputs safely, the safetensors writer, hashing and
//! dtypes, tensor names, Hub downloads, the file list of a folder `bake` wrote, and creating or replacing output folders without
//! destroying anything `bake` did not write.

pub mod dtype;
pub mod failpoint;
pub mod fs;
pub mod gguf;
pub mod hash;
pub mod hub;
pub mod listing;
pub mod names;
pub mod output;
pub mod safetensors;
