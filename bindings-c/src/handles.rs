//! Live-handle registry: every handle given to C is recorded; every call checks its handle is
//! still live, so a call after `_delete` (or a double delete) reports an error instead of
//! touching freed memory.

use std::collections::HashSet;
use std::sync::Mutex;

pub struct Registry<T> {
    name: &'static str,
    live: Mutex<Option<HashSet<usize>>>,
    _t: std::marker::PhantomData<fn() -> T>,
}

impl<T> Registry<T> {
    pub const fn new(name: &'static str) -> Self {
        Registry {
            name,
            live: Mutex::new(None),
            _t: std::marker::PhantomData,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<HashSet<usize>>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn insert(&self, value: T) -> *mut T {
        let p = Box::into_raw(Box::new(value));
        self.lock()
            .get_or_insert_with(HashSet::new)
            .insert(p as usize);
        p
    }

    fn check(&self, p: *const T) -> crate::Res<()> {
        if p.is_null() {
            return Err(crate::invalid(self.name, "must not be NULL"));
        }
        if !self
            .lock()
            .as_ref()
            .is_some_and(|s| s.contains(&(p as usize)))
        {
            return Err(crate::invalid(
                self.name,
                "is not a live handle (used after its _delete?)",
            ));
        }
        Ok(())
    }

    /// Run `f` on a live handle. The handle stays registered while `f` runs; deleting it from
    /// another thread at the same time is the caller's bug, as with any C API.
    pub fn with<R>(&self, p: *const T, f: impl FnOnce(&T) -> R) -> crate::Res<R> {
        self.check(p)?;
        // SAFETY: `p` came from `insert` and has not been removed.
        Ok(f(unsafe { &*p }))
    }

    pub fn with_mut<R>(&self, p: *mut T, f: impl FnOnce(&mut T) -> R) -> crate::Res<R> {
        self.check(p)?;
        // SAFETY: as in `with`; C callers do not share a request object across threads.
        Ok(f(unsafe { &mut *p }))
    }

    /// Free a live handle; NULL and unknown pointers are ignored.
    pub fn remove(&self, p: *mut T) {
        if p.is_null() {
            return;
        }
        let was_live = self
            .lock()
            .as_mut()
            .is_some_and(|s| s.remove(&(p as usize)));
        if was_live {
            // SAFETY: it was live, so it came from Box::into_raw and is freed exactly once.
            drop(unsafe { Box::from_raw(p) });
        }
    }
}
