//! Publishing a baked folder to the Hugging Face Hub (`bake push`). Downloads are in [`crate::io::hub`].

pub mod push;
