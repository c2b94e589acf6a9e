//! A single-threaded, run-to-completion task executor for one reactor.
//!
//! Tasks are plain futures polled only on the reactor's own thread; I/O completions and local
//! events wake them through [`std::task::Wake`]. There are no locks: the ready queue is a
//! lock-free queue (wake-ups may come from the reactor itself, and in principle from any
//! thread). The reactor loop alternates [`Executor::run_ready`] with polling its queue pairs.

use crossbeam_queue::SegQueue;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

type Task = Pin<Box<dyn Future<Output = ()>>>;

struct TaskWaker {
    id: usize,
    ready: Arc<SegQueue<usize>>,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.ready.push(self.id);
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.ready.push(self.id);
    }
}

/// The executor. Cheap to share within the thread through `Rc`.
#[derive(Default)]
pub struct Executor {
    tasks: RefCell<Vec<Option<(Task, Waker)>>>,
    free_ids: RefCell<Vec<usize>>,
    ready: Arc<SegQueue<usize>>,
    spawned: RefCell<VecDeque<Task>>,
    live: Cell<usize>,
}

impl Executor {
    /// A new executor.
    pub fn new() -> Rc<Executor> {
        Rc::new(Executor::default())
    }

    /// Queues a task; it first runs at the next [`Executor::run_ready`].
    pub fn spawn(&self, fut: impl Future<Output = ()> + 'static) {
        self.spawned.borrow_mut().push_back(Box::pin(fut));
        self.live.set(self.live.get() + 1);
    }

    /// Tasks not yet finished.
    pub fn live_tasks(&self) -> usize {
        self.live.get()
    }

    /// Polls every newly spawned task and every woken task once; returns how many were polled.
    pub fn run_ready(&self) -> usize {
        let mut polled = 0;
        loop {
            let next = self.spawned.borrow_mut().pop_front();
            let Some(task) = next else { break };
            let id = match self.free_ids.borrow_mut().pop() {
                Some(id) => id,
                None => {
                    let mut t = self.tasks.borrow_mut();
                    t.push(None);
                    t.len() - 1
                }
            };
            let waker = Waker::from(Arc::new(TaskWaker {
                id,
                ready: Arc::clone(&self.ready),
            }));
            self.tasks.borrow_mut()[id] = Some((task, waker));
            self.ready.push(id);
        }
        // Bounded: tasks woken during this pass run in the next one.
        let n = self.ready.len();
        for _ in 0..n {
            let Some(id) = self.ready.pop() else { break };
            // Take the task out so it can spawn or wake others while being polled.
            let entry = self.tasks.borrow_mut().get_mut(id).and_then(Option::take);
            let Some((mut task, waker)) = entry else {
                continue;
            }; // stale wake-up
            polled += 1;
            let mut cx = Context::from_waker(&waker);
            match task.as_mut().poll(&mut cx) {
                Poll::Ready(()) => {
                    self.free_ids.borrow_mut().push(id);
                    self.live.set(self.live.get() - 1);
                }
                Poll::Pending => self.tasks.borrow_mut()[id] = Some((task, waker)),
            }
        }
        polled
            + if self.spawned.borrow().is_empty() {
                0
            } else {
                self.run_ready()
            }
    }

    /// Whether any task is queued to run.
    pub fn has_ready(&self) -> bool {
        !self.ready.is_empty() || !self.spawned.borrow().is_empty()
    }
}

/// A one-shot value passed between tasks of one thread.
pub struct LocalOneshot<T> {
    value: RefCell<Option<T>>,
    waker: RefCell<Option<Waker>>,
}

impl<T> LocalOneshot<T> {
    /// An empty slot.
    pub fn new() -> Rc<LocalOneshot<T>> {
        Rc::new(LocalOneshot {
            value: RefCell::new(None),
            waker: RefCell::new(None),
        })
    }

    /// Fills the slot and wakes the waiter.
    pub fn set(&self, v: T) {
        *self.value.borrow_mut() = Some(v);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// Waits for the value.
    pub fn wait(self: &Rc<Self>) -> OneshotWait<T> {
        OneshotWait(Rc::clone(self))
    }
}

/// Future returned by [`LocalOneshot::wait`].
pub struct OneshotWait<T>(Rc<LocalOneshot<T>>);

impl<T> Future for OneshotWait<T> {
    type Output = T;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        if let Some(v) = self.0.value.borrow_mut().take() {
            return Poll::Ready(v);
        }
        *self.0.waker.borrow_mut() = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// Wakes every waiting task when something changes (buffers freed, locks released).
#[derive(Default)]
pub struct Notify {
    waiters: RefCell<Vec<Waker>>,
    epoch: Cell<u64>,
}

impl Notify {
    /// Wakes all current waiters.
    pub fn notify_all(&self) {
        self.epoch.set(self.epoch.get() + 1);
        for w in self.waiters.borrow_mut().drain(..) {
            w.wake();
        }
    }

    /// A future that completes at the next `notify_all`.
    pub fn notified(&self) -> Notified<'_> {
        Notified {
            notify: self,
            epoch: self.epoch.get(),
        }
    }
}

/// Future returned by [`Notify::notified`].
pub struct Notified<'a> {
    notify: &'a Notify,
    epoch: u64,
}

impl Future for Notified<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.notify.epoch.get() != self.epoch {
            return Poll::Ready(());
        }
        self.notify.waiters.borrow_mut().push(cx.waker().clone());
        Poll::Pending
    }
}

/// Yields once to let other tasks run.
pub async fn yield_now() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_run_and_pass_values() {
        let ex = Executor::new();
        let slot = LocalOneshot::new();
        let out = Rc::new(Cell::new(0));
        let (s2, o2) = (Rc::clone(&slot), Rc::clone(&out));
        ex.spawn(async move { o2.set(s2.wait().await) });
        let s3 = Rc::clone(&slot);
        ex.spawn(async move {
            yield_now().await;
            s3.set(42);
        });
        for _ in 0..10 {
            ex.run_ready();
        }
        assert_eq!(out.get(), 42);
        assert_eq!(ex.live_tasks(), 0);
    }
}
