//! Supervision of long-lived threads: one unit of work (an engine step, a scoring job, an
//! unlearning job, an audit pass) runs under [`catch`], so a panic fails that unit with an error
//! and the thread that ran it lives on.
//!
//! Invariants:
//! - [`catch`] turns an unwinding panic into `Err(message)`, logged with its component. Its
//!   callers count it (`lethe_panics_total{component}`) and fail only the work the unit owned:
//!   its requests get an error; a job's takedown becomes `failed`, or, when the job held
//!   several, each goes back to the queue to run alone.
//! - State a panicking unit may have left half-updated is discarded by the caller (a decode
//!   batch is rebuilt, a job's weights are a copy), never reused.
//! - [`FaultHook`]s are for tests only: no flag or request sets one, so in production
//!   [`Faults::at`] calls nothing.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

/// Where a test may inject a fault.
#[derive(Debug)]
pub enum FaultPoint<'a> {
    /// The engine is about to prefill rows into a batch.
    EngineAdmit { prompts: &'a [&'a [u32]] },
    /// The engine is about to run one decode step of a batch.
    EngineStep,
    /// The engine is about to score sequences.
    EngineScore { sequences: &'a [Vec<u32>] },
    /// The unlearning worker starts a job on these takedown sequences.
    Job { sequences: &'a [Vec<u32>] },
    /// The unlearning worker's loop, outside any job: a panic here ends the worker thread
    /// (what liveness must notice).
    WorkerLoop,
}

/// A test-only hook called at each [`FaultPoint`]; it injects a fault by panicking.
pub type FaultHook = Arc<dyn Fn(&FaultPoint<'_>) + Send + Sync>;

/// An optional [`FaultHook`], carried in the configs of the engine and the worker.
#[derive(Clone, Default)]
pub struct Faults(pub Option<FaultHook>);

impl Faults {
    /// A hook for tests.
    pub fn hook(f: impl Fn(&FaultPoint<'_>) + Send + Sync + 'static) -> Self {
        Self(Some(Arc::new(f)))
    }

    /// Calls the hook at `point`, if there is one.
    pub fn at(&self, point: FaultPoint<'_>) {
        if let Some(h) = &self.0 {
            h(&point);
        }
    }
}

impl std::fmt::Debug for Faults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Faults(hook)"
        } else {
            "Faults(none)"
        })
    }
}

/// Runs `f`; a panic becomes `Err(message)`, logged as an error of `component`.
///
/// `f` is asserted unwind-safe: callers discard whatever state it may have left half-updated
/// (see the module invariants).
pub fn catch<T>(component: &str, f: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|payload| {
        let message = panic_message(payload.as_ref());
        tracing::error!(component, panic = %message, "caught a panic; the work unit failed");
        message
    })
}

/// The text of a panic payload (`panic!` with a literal or a formatted message).
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        format!("panic: {s}")
    } else if let Some(s) = payload.downcast_ref::<String>() {
        format!("panic: {s}")
    } else {
        "panic with a non-text payload".to_string()
    }
}

/// Sets an atomic flag when dropped, including while unwinding (so a helper thread waiting on
/// the flag stops even when the work it watched panicked).
pub struct SetOnDrop<'a>(pub &'a std::sync::atomic::AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_its_message_and_a_value_passes_through() {
        assert_eq!(catch("test", || 7), Ok(7));
        let e = catch("test", || -> u8 { panic!("boom {}", 1) }).unwrap_err();
        assert_eq!(e, "panic: boom 1");
        let e = catch("test", || -> u8 { std::panic::panic_any(5u8) }).unwrap_err();
        assert!(e.contains("non-text"), "{e}");
    }

    #[test]
    fn set_on_drop_fires_during_unwinding() {
        let flag = std::sync::atomic::AtomicBool::new(false);
        let _ = catch("test", || {
            let _g = SetOnDrop(&flag);
            panic!("x");
        });
        assert!(flag.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[test]
    fn a_hook_sees_its_point() {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let faults = {
            let seen = seen.clone();
            Faults::hook(move |p| seen.lock().unwrap().push(format!("{p:?}")))
        };
        faults.at(FaultPoint::EngineStep);
        Faults::default().at(FaultPoint::EngineStep);
        assert_eq!(seen.lock().unwrap().as_slice(), ["EngineStep"]);
        assert_eq!(format!("{faults:?}"), "Faults(hook)");
    }
}
