//! The build service: what happens around a sandboxed build.

pub mod outputs;
