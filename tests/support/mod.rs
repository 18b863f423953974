//! Shared helpers for embedcar's integration tests. Each test file that needs them declares
//! `mod support;`; not every test uses every helper, hence the `dead_code` allowance.
#![allow(dead_code)]

pub mod fake_upstream;
pub mod harness;
