//! The boundary: every entry point runs its body through [`call`] (or [`call_or`]), which
//! catches panics (none unwinds into C), turns a [`Failure`] into its status code and the
//! thread-local message, and checks pointers ([`non_null`]).

use std::panic::{AssertUnwindSafe, catch_unwind};

use crate::status::{Failure, StarlingStatus, set_last_error};

/// Runs an entry point's body: its `Ok` status is returned as is; a failure or a panic
/// sets this thread's last error and returns the failure's code
/// (`STARLING_ERR_INTERNAL` for a panic).
pub fn call(name: &str, body: impl FnOnce() -> Result<StarlingStatus, Failure>) -> StarlingStatus {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(status)) => status,
        Ok(Err(f)) => {
            set_last_error(&format!("{name}: {}", f.message));
            f.status
        }
        Err(panic) => {
            set_last_error(&format!(
                "{name}: internal error (panic: {})",
                panic_message(panic.as_ref())
            ));
            StarlingStatus::StarlingErrInternal
        }
    }
}

/// For entry points that return a value rather than a status: `fallback` after a
/// panic (with the last error set).
pub fn call_or<T>(name: &str, fallback: T, body: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(v) => v,
        Err(panic) => {
            set_last_error(&format!(
                "{name}: internal error (panic: {})",
                panic_message(panic.as_ref())
            ));
            fallback
        }
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown".to_string()
    }
}

/// `Err(STARLING_ERR_INVALID_ARGUMENT)` naming `what` when `p` is NULL.
pub fn non_null<T>(p: *const T, what: &str) -> Result<(), Failure> {
    if p.is_null() {
        Err(Failure::invalid(format!("{what} is NULL")))
    } else {
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::status::last_error_ptr;

    fn last_error() -> String {
        // SAFETY: the pointer is this thread's NUL-terminated message, alive until the
        // next call that sets it (none in between).
        unsafe { std::ffi::CStr::from_ptr(last_error_ptr()) }
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn a_panic_becomes_an_internal_error_with_its_message() {
        let s = call("starling_test", || panic!("kaboom"));
        assert_eq!(s, StarlingStatus::StarlingErrInternal);
        assert!(last_error().contains("kaboom"), "{}", last_error());
        assert_eq!(call_or("starling_test", 7, || panic!("again")), 7);
        assert!(last_error().contains("again"));
    }

    #[test]
    fn a_failure_sets_code_and_message() {
        let s = call("starling_test", || Err(Failure::invalid("buf is NULL")));
        assert_eq!(s, StarlingStatus::StarlingErrInvalidArgument);
        assert_eq!(last_error(), "starling_test: buf is NULL");
        assert!(non_null(std::ptr::null::<u8>(), "x").is_err());
        assert!(non_null(&1u8 as *const u8, "x").is_ok());
    }
}
