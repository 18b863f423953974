//! The inbound HTTP side, between the listener and a handler: the tower stack every request
//! goes through (`stack`, which orders the `layers`), the router that picks the handler, and
//! what every route shares: one body type and its bounded wrappers (`body`), the one error type
//! with its status and OpenAI-shaped reply (`errors`), and the bounded endpoint label (`route`).
//!
//! A folder of its own because it is the same for every request, whichever handler serves it:
//! a change here touches pass-through and embeddings alike, and nothing here calls the upstream.

pub mod body;
pub mod errors;
pub mod layers;
pub mod route;
pub mod router;
pub mod stack;
