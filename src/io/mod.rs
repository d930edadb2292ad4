//! Files in and out, below every pipeline stage: reading inputs safely, the file list of a folder `bake`
//! wrote, and creating or replacing output folders without destroying anything `bake` did not write.

pub mod failpoint;
pub mod fs;
pub mod listing;
pub mod output;
