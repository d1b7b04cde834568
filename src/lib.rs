//! nats-projector: turns NATS JetStream event streams into read models.
//!
//! The modules follow the data flow of one batch:
//! [`consume`] (durable pull consumer) → [`decode`] (envelopes) → [`key`] (key templates) →
//! [`reduce`] (reducers) → [`store`] (one redb transaction) → [`kv`] (compare-and-set writes
//! from the outbox) → ack, with [`dlq`] for poison events, and [`metrics`] and [`http`] beside
//! it. [`spec`] compiles a configured projection; [`pipeline`] drives one projection through
//! those steps; [`runtime`] runs them all until shutdown; [`cli`] is the command line.
#![warn(missing_docs)]

pub mod alias;
pub mod cli;
pub mod config;
pub mod consume;
pub mod decode;
pub mod dlq;
pub mod http;
pub mod key;
pub mod kv;
pub mod metrics;
pub mod pipeline;
pub mod reduce;
pub mod replay;
pub mod restore;
pub mod runtime;
pub mod snapshot;
pub mod spec;
pub mod store;

pub use reduce::{Change, Projection, ReduceError};
pub use runtime::Reducers;
