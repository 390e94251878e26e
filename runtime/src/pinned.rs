//! Small future adapters written as structs rather than `async fn`s: an `async fn`
//! keeps its argument in the state machine's prefix *and* the pinned local it is moved
//! into, so `tracked(f)` and `race(a, b)` were each twice the size of what they wrap, and
//! every connection's handler (wrapped in both) was copied through all of it on spawn.
//! A struct holds its futures once, pinned in place (structural pinning).
#![allow(unsafe_code)]

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::worker::Either;

/// `f`, with every poll counted as activity for busy polling ([`crate::busy::tracked`]).
#[must_use = "futures do nothing unless polled"]
pub struct Tracked<F> {
    f: F,
}

impl<F> Tracked<F> {
    pub(crate) fn new(f: F) -> Self {
        Tracked { f }
    }
}

impl<F: Future> Future for Tracked<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        crate::busy::note_activity();
        // SAFETY: `f` is structurally pinned: `Tracked` never moves it out of a pinned
        // `self` (no method hands out `&mut F` or takes it by value once pinned), has no
        // `Drop` impl, and is `Unpin` only when `F` is (auto trait), so `f` stays at this
        // address until it is dropped in place with `self`.
        unsafe { self.map_unchecked_mut(|t| &mut t.f) }.poll(cx)
    }
}

/// The first of two futures to finish ([`crate::worker::race`]).
#[must_use = "futures do nothing unless polled"]
pub struct Race<A, B> {
    a: A,
    b: B,
}

impl<A, B> Race<A, B> {
    pub(crate) fn new(a: A, b: B) -> Self {
        Race { a, b }
    }
}

impl<A: Future, B: Future> Future for Race<A, B> {
    type Output = Either<A::Output, B::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // SAFETY: `a` and `b` are structurally pinned, as `f` in `Tracked`: never moved out
        // of a pinned `self`, no `Drop` impl, `Unpin` only when both are; the two pins
        // borrow disjoint fields of the one `&mut Self`.
        let (a, b) = unsafe {
            let me = self.get_unchecked_mut();
            (Pin::new_unchecked(&mut me.a), Pin::new_unchecked(&mut me.b))
        };
        if let Poll::Ready(x) = a.poll(cx) {
            return Poll::Ready(Either::Left(x));
        }
        if let Poll::Ready(x) = b.poll(cx) {
            return Poll::Ready(Either::Right(x));
        }
        Poll::Pending
    }
}

/// `f`, with a panic during one of its polls caught: then `f` is not polled again, the
/// payload goes to `on_panic`, and this future completes with `None`. The task running it
/// ends as if `f` had returned, instead of the panic unwinding through the worker's runtime
/// and ending the worker (every other connection it holds and its accept loops).
///
/// Nothing on the path that does not panic: `catch_unwind` is free until something unwinds.
#[must_use = "futures do nothing unless polled"]
pub struct CatchPanic<F, P> {
    f: F,
    on_panic: Option<P>,
}

impl<F, P> CatchPanic<F, P> {
    pub(crate) fn new(f: F, on_panic: P) -> Self {
        CatchPanic {
            f,
            on_panic: Some(on_panic),
        }
    }
}

impl<F: Future, P: FnOnce(Box<dyn std::any::Any + Send>)> Future for CatchPanic<F, P> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // SAFETY: `f` is structurally pinned, as in `Tracked` (never moved out of a pinned
        // `self`, no `Drop` impl, `Unpin` only when `F` and `P` are); `on_panic` is not
        // pinned (only taken by value through `&mut`, never pinned), and the two borrow
        // disjoint fields of the one `&mut Self`.
        let (f, on_panic) = unsafe {
            let me = self.get_unchecked_mut();
            (Pin::new_unchecked(&mut me.f), &mut me.on_panic)
        };
        if on_panic.is_none() {
            // Panicked before: `f` is left as the unwinding left it, never polled again.
            return Poll::Ready(None);
        }
        // Unwind safety: after a panic `f` is never polled again; state it shares with other
        // tasks (`RefCell`s, counters) is released by the unwinding's drops as for any
        // early return.
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f.poll(cx))) {
            Ok(Poll::Ready(x)) => Poll::Ready(Some(x)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(payload) => {
                if let Some(report) = on_panic.take() {
                    report(payload);
                }
                Poll::Ready(None)
            }
        }
    }
}

/// A panic's message (the `&str` or `String` it was raised with).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&'static str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "(not a string)"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn holds(buf: [u8; 4096]) -> u8 {
        std::future::ready(()).await;
        buf[4095]
    }

    /// The adapters add only their own few bytes to what they wrap (the `async fn`
    /// versions doubled it).
    #[test]
    fn adapters_hold_their_futures_once() {
        let f = holds([7; 4096]);
        let inner = std::mem::size_of_val(&f);
        let t = Tracked::new(f);
        assert!(
            std::mem::size_of_val(&t) <= inner + 16,
            "{}",
            std::mem::size_of_val(&t)
        );
        let r = Race::new(holds([1; 4096]), holds([2; 4096]));
        assert!(std::mem::size_of_val(&r) <= 2 * inner + 16);
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .build()
            .expect("runtime");
        assert_eq!(rt.block_on(t), 7);
        assert!(matches!(rt.block_on(r), Either::Left(1)));
    }
}
