//! A bound on concurrent calls that grows and shrinks with a pool's
//! membership (workers found by DNS come and go).
//!
//! Shrinking forgets idle permits at once; permits in use when it shrinks
//! are owed, and forgotten as they come back, so the bound settles at the
//! new size without cancelling a call.

use std::sync::Arc;
use std::sync::Mutex;

use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore, TryAcquireError};

pub struct Slots {
    sem: Arc<Semaphore>,
    /// (size, permits still to forget as they are released).
    state: Mutex<(usize, usize)>,
}

impl Slots {
    pub fn new(size: usize) -> Self {
        Self { sem: Arc::new(Semaphore::new(size)), state: Mutex::new((size, 0)) }
    }

    /// The bound now.
    pub fn size(&self) -> usize {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).0
    }

    pub fn resize(&self, size: usize) {
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (old, owed) = *state;
        if size >= old {
            let grow = size - old;
            let paid = grow.min(owed);
            self.sem.add_permits(grow - paid);
            *state = (size, owed - paid);
        } else {
            let shrink = old - size;
            let forgotten = self.sem.forget_permits(shrink);
            *state = (size, owed + shrink - forgotten);
        }
    }

    /// Keep `permit` unless a permit is owed, in which case it is forgotten.
    fn settle(&self, permit: OwnedSemaphorePermit) -> Option<OwnedSemaphorePermit> {
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if state.1 == 0 {
            return Some(permit);
        }
        state.1 -= 1;
        permit.forget();
        None
    }

    pub async fn acquire(&self) -> Result<OwnedSemaphorePermit, AcquireError> {
        loop {
            if let Some(p) = self.settle(self.sem.clone().acquire_owned().await?) {
                return Ok(p);
            }
        }
    }

    pub fn try_acquire(&self) -> Result<OwnedSemaphorePermit, TryAcquireError> {
        loop {
            if let Some(p) = self.settle(self.sem.clone().try_acquire_owned()?) {
                return Ok(p);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn it_grows_and_shrinks_without_taking_back_permits_in_use() {
        let slots = Slots::new(2);
        let a = slots.try_acquire().unwrap();
        let b = slots.try_acquire().unwrap();
        assert!(slots.try_acquire().is_err());
        slots.resize(3);
        let c = slots.try_acquire().unwrap();
        // Down to 1 while 3 are in use: two are owed.
        slots.resize(1);
        assert_eq!(slots.size(), 1);
        drop(a);
        drop(b);
        assert!(slots.try_acquire().is_err(), "released permits paid the debt");
        drop(c);
        let d = slots.try_acquire().unwrap();
        assert!(slots.try_acquire().is_err(), "the bound is 1 now");
        // Growing again first cancels any debt, then adds.
        slots.resize(2);
        let _e = slots.try_acquire().unwrap();
        drop(d);
        assert!(slots.try_acquire().is_ok());
    }

    #[tokio::test]
    async fn shrinking_idle_permits_takes_effect_at_once() {
        let slots = Slots::new(4);
        slots.resize(1);
        let _a = slots.acquire().await.unwrap();
        assert!(slots.try_acquire().is_err());
        slots.resize(0);
        assert!(slots.try_acquire().is_err());
    }
}
