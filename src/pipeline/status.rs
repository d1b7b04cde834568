//! The live status of one projection, shared by its pipeline, `/readyz` and `status`.

use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// What a projection reports about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Projection name.
    pub projection: String,
    /// Projection version.
    pub version: u32,
    /// Source stream.
    pub stream: String,
    /// Durable consumer.
    pub consumer: String,
    /// KV bucket, when the projection has one.
    pub kv_bucket: Option<String>,
    /// The consumer is bound and the startup outbox flush is done.
    pub bound: bool,
    /// A consumer info sample has been taken since binding.
    pub sampled: bool,
    /// Highest stream sequence durably processed.
    pub last_applied_seq: u64,
    /// The stream's last sequence (sampled).
    pub stream_last_seq: u64,
    /// Consumer num_pending (sampled).
    pub pending: u64,
    /// Consumer num_ack_pending (sampled).
    pub ack_pending: u64,
    /// Keys whose KV copy is behind the store.
    pub kv_outbox: u64,
    /// A current infrastructure failure the projection is retrying through.
    pub failure: Option<String>,
    /// A fail-closed condition (gap, corruption) that needs an operator.
    pub gap: Option<String>,
    /// This version was promoted by a rebuild: its bucket's alias points at it.
    #[serde(default)]
    pub promoted: bool,
}

impl Status {
    /// `Ok` when ready; otherwise one line saying why not.
    pub fn readiness(&self, max_lag: u64) -> Result<(), String> {
        if let Some(gap) = &self.gap {
            return Err(format!("failed closed: {gap}"));
        }
        if !self.bound {
            return Err(match &self.failure {
                Some(failure) => format!("not bound: {failure}"),
                None => "not bound to its consumer yet".into(),
            });
        }
        if let Some(failure) = &self.failure {
            return Err(failure.clone());
        }
        if !self.sampled {
            return Err("lag not measured yet".into());
        }
        let lag = self.pending + self.ack_pending;
        if lag > max_lag {
            return Err(format!(
                "catching up: {lag} messages behind (ready at {max_lag})"
            ));
        }
        Ok(())
    }
}

/// A [`Status`] behind a lock.
#[derive(Debug, Default)]
pub struct StatusCell(Mutex<Status>);

impl StatusCell {
    /// A cell holding `status`.
    pub fn new(status: Status) -> StatusCell {
        StatusCell(Mutex::new(status))
    }

    /// A copy of the current status.
    pub fn get(&self) -> Status {
        match self.0.lock() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Changes the status.
    pub fn update(&self, change: impl FnOnce(&mut Status)) {
        let mut guard = match self.0.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        change(&mut guard);
    }
}
