//! A wall-clock bound on rendering (added for hearth; not in upstream minijinja).
//!
//! Fuel counts instructions, but one instruction can do unbounded work: `seq * n` builds a lazy
//! sequence of any length at no cost, and printing it, or any filter or operator that walks it,
//! runs inside a single instruction. A deadline set by the caller is checked before every
//! instruction and by every lazily built sequence as it yields each item, so a render that
//! passes its deadline stops within one item's work and fails.

use std::cell::Cell;
use std::time::Instant;

thread_local! {
    static DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Sets (or clears, with `None`) the deadline for renders on this thread. A render that is
/// still running at the deadline fails with `ErrorKind::OutOfFuel`.
pub fn set_render_deadline(deadline: Option<Instant>) {
    DEADLINE.with(|d| d.set(deadline));
}

/// Whether this thread's render deadline has passed.
#[inline]
pub(crate) fn passed() -> bool {
    DEADLINE.with(|d| d.get().is_some_and(|deadline| Instant::now() >= deadline))
}
