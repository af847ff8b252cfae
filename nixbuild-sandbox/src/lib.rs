//! nixbuild's Linux namespace sandbox: a pure, tested plan and a small executor.
//!
//! Not implemented yet: this crate is a placeholder in the workspace until the sandbox issue.
//! It is the only crate of the workspace allowed to contain `unsafe` code.
