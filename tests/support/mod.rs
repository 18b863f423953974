//! Shared helpers for embedcar's integration tests. Each test file that needs them declares
//! `mod support;`; not every test uses every helper, hence the `dead_code` allowance. The fake
//! OpenAI upstream they run against is the `fake-openai` crate (fake-openai/).
#![allow(dead_code)]

pub mod client;
pub mod harness;
