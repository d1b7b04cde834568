//! The thread that applies a pipeline's batches to the store.
//!
//! Always the same thread, instead of whichever blocking-pool thread is idle: what one batch
//! frees (redb's page buffers, the batch's items) is what the next one allocates, so its
//! allocator heap and CPU caches stay warm. A profile of a redb-only catch-up showed tokio's
//! blocking pool alternating two threads between batches.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc;

use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send>;

/// Why a job gave no result.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApplierError {
    /// The job panicked.
    #[error("the applying thread panicked: {0}")]
    Panicked(String),
    /// The thread is gone.
    #[error("the applying thread is not running")]
    Stopped,
}

/// One thread running jobs in order; it ends when the applier is dropped (after the jobs
/// already sent).
pub struct Applier {
    jobs: mpsc::Sender<Job>,
}

impl Applier {
    /// Starts the thread, named `name`.
    pub fn start(name: &str) -> std::io::Result<Applier> {
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                for job in queue {
                    job();
                }
            })?;
        Ok(Applier { jobs })
    }

    /// Queues `job` on the thread at once; the future returned waits for its result. Like a
    /// blocking-pool task, the job runs to its end even if that future is dropped.
    pub fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> impl Future<Output = Result<T, ApplierError>> + Send + 'static {
        let (done, result) = oneshot::channel();
        let job: Job = Box::new(move || {
            let outcome = std::panic::catch_unwind(AssertUnwindSafe(job))
                .map_err(|panic| crate::store::panic_message(&panic));
            // The waiter may be gone (its future dropped): nothing to tell then.
            let _ = done.send(outcome);
        });
        let queued = self.jobs.send(job).is_ok();
        async move {
            if !queued {
                return Err(ApplierError::Stopped);
            }
            match result.await {
                Ok(Ok(value)) => Ok(value),
                Ok(Err(panic)) => Err(ApplierError::Panicked(panic)),
                Err(_) => Err(ApplierError::Stopped),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_in_order_on_one_named_thread_and_a_panic_is_an_error() {
        let applier = Applier::start("test-applier").unwrap();
        let name = || std::thread::current().name().map(str::to_owned);
        let first = applier.run(name).await.unwrap();
        let second = applier.run(name).await.unwrap();
        assert_eq!(first.as_deref(), Some("test-applier"));
        assert_eq!(first, second);
        let id = applier.run(|| std::thread::current().id()).await.unwrap();
        assert_eq!(
            id,
            applier.run(|| std::thread::current().id()).await.unwrap()
        );
        let panicked = applier.run(|| -> u8 { panic!("boom") }).await;
        assert!(matches!(panicked, Err(ApplierError::Panicked(m)) if m.contains("boom")));
        // The thread survives a panicking job.
        assert_eq!(applier.run(|| 7).await.unwrap(), 7);
    }
}
