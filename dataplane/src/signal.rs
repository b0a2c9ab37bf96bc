//! A one-shot signal between tasks of one core: fired once (a revocation, a port's
//! accept loop told to end), awaited by one task at a time. `!Send`: `Cell` and
//! `RefCell`, shared by `Rc`.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::task::{Context, Poll, Waker};

/// Fired once; a task waiting on it is woken then.
#[derive(Default)]
pub struct Signal {
    fired: Cell<bool>,
    /// The task waiting, if one is.
    waker: RefCell<Option<Waker>>,
}

impl Signal {
    /// Fires it, waking the task that waits.
    pub fn fire(&self) {
        self.fired.set(true);
        let waker = self.waker.borrow_mut().take();
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Ready once fired; else keeps `cx`'s waker (not cloned again while it would
    /// wake the same task: this is polled beside busy futures).
    fn poll_fired(&self, cx: &Context<'_>) -> Poll<()> {
        if self.fired.get() {
            self.waker.borrow_mut().take();
            return Poll::Ready(());
        }
        let mut waker = self.waker.borrow_mut();
        match waker.as_ref() {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => *waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// Resolves once fired.
    pub async fn fired(&self) {
        std::future::poll_fn(|cx| self.poll_fired(cx)).await
    }

    /// Resolves once `signal` (`Some`) is fired; never for none.
    pub async fn fired_if(signal: Option<&Self>) {
        match signal {
            Some(signal) => signal.fired().await,
            None => std::future::pending().await,
        }
    }

    /// Runs `fut` until it finishes (`Some`) or the signal fires (`None`; looked at
    /// before each poll of `fut`).
    pub async fn unless_fired<F: Future>(&self, fut: F) -> Option<F::Output> {
        let mut fut = std::pin::pin!(fut);
        std::future::poll_fn(|cx| {
            if self.poll_fired(cx).is_ready() {
                return Poll::Ready(None);
            }
            fut.as_mut().poll(cx).map(Some)
        })
        .await
    }
}
