//! What stands between a caller and an upstream that is slow, rate-limited or down, in the
//! order the outbound stack (`upstream::outbound`) applies it: the retry loop with its backoff
//! and budget (`retry`), the per-credential rate gates (`rate_gate`), the circuit breaker
//! (`breaker`), and the concurrency places with their bounded wait (`limits`) under the learnt
//! limit (`adaptive_limit`).
//!
//! A folder of its own because these are the layers of the one outbound stack, shared by
//! pass-through and the embeddings engine: each decides whether, when and how often a call may
//! go upstream, and none of them knows which handler made it.

pub mod adaptive_limit;
pub mod breaker;
pub mod limits;
pub mod rate_gate;
pub mod retry;
