//! nats-projector: turns NATS JetStream event streams into read models.
//!
//! The modules follow the data flow of one batch:
//! [`consume`] (durable pull consumer) → [`decode`] (envelopes) → [`key`] (key templates) →
//! [`reduce`] (reducers) → [`store`] (one redb transaction) → [`kv`] (compare-and-set writes
//! from the outbox) → ack, with [`dlq`] for poison events, and [`metrics`] and [`http`] beside
//! it. [`pipeline`] drives one projection through those steps; [`runtime`] runs them all until
//! shutdown; [`cli`] is the command line.

pub mod config;
pub mod decode;
pub mod dlq;
pub mod key;
pub mod reduce;
pub mod spec;
pub mod store;
