//! Code generation: `main` and `message`.

pub mod main;
pub mod message;
