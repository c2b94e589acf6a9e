//! Per-reactor I/O plumbing: a driver that owns one queue pair and turns completions into task
//! wake-ups, and the reactor's buffer pool share with waiting on exhaustion.

use crate::exec::Notify;
use cfs_hugepages::{DmaBuf, PoolCore};
use cfs_nvme::{Command, Completion, IoError, QueuePair, SubmitError};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

enum Slot {
    Free,
    Waiting(Option<Waker>),
    Done(Completion),
    /// The waiter went away; drop the completion (and return its buffer) when it arrives.
    Abandoned,
}

/// Owns one queue pair on one device for one reactor.
pub struct IoDriver {
    qp: RefCell<Box<dyn QueuePair>>,
    slots: RefCell<Vec<Slot>>,
    free: RefCell<Vec<u32>>,
    /// Commands waiting for room in the queue pair (bounded by the number of slots).
    backlog: RefCell<VecDeque<Command>>,
    scratch: RefCell<Vec<Completion>>,
    /// Commands were queued since the last poll (so the poll does submission work).
    queued: std::cell::Cell<bool>,
}

impl IoDriver {
    /// Wraps a queue pair; `max_waiting` bounds commands in flight plus backlog.
    pub fn new(qp: Box<dyn QueuePair>, max_waiting: u32) -> Rc<IoDriver> {
        Rc::new(IoDriver {
            qp: RefCell::new(qp),
            slots: RefCell::new((0..max_waiting).map(|_| Slot::Free).collect()),
            free: RefCell::new((0..max_waiting).rev().collect()),
            backlog: RefCell::new(VecDeque::new()),
            scratch: RefCell::new(Vec::with_capacity(64)),
            queued: std::cell::Cell::new(false),
        })
    }

    /// Queues a command now and returns a future for its completion. When every slot is busy
    /// the future first waits for one (the limit on this queue).
    pub fn submit(self: &Rc<Self>, cmd: Command) -> IoFuture {
        let mut f = IoFuture {
            driver: Rc::clone(self),
            slot: None,
            cmd: Some(cmd),
        };
        f.try_start();
        f
    }

    fn start(&self, mut cmd: Command, slot: u32) {
        cmd.tag = u64::from(slot);
        self.queued.set(true);
        if !self.backlog.borrow().is_empty() {
            self.backlog.borrow_mut().push_back(cmd);
            return;
        }
        if let Err(SubmitError::QueueFull(cmd)) = self.qp.borrow_mut().submit(cmd) {
            self.backlog.borrow_mut().push_back(cmd);
        }
    }

    /// Moves backlog into the queue pair, submits, and dispatches completions; returns the
    /// completions seen, plus one if it had commands to submit (both are work, not idling).
    pub fn poll(&self) -> usize {
        let submitted = usize::from(self.queued.replace(false));
        let mut qp = self.qp.borrow_mut();
        loop {
            let Some(cmd) = self.backlog.borrow_mut().pop_front() else {
                break;
            };
            if let Err(SubmitError::QueueFull(cmd)) = qp.submit(cmd) {
                self.backlog.borrow_mut().push_front(cmd);
                break;
            }
        }
        let mut out = self.scratch.borrow_mut();
        let n = qp.poll(&mut out, 256) + submitted;
        drop(qp);
        let mut slots = self.slots.borrow_mut();
        for c in out.drain(..) {
            let i = c.tag as usize;
            let prev = std::mem::replace(&mut slots[i], Slot::Free);
            match prev {
                Slot::Waiting(w) => {
                    slots[i] = Slot::Done(c);
                    if let Some(w) = w {
                        w.wake();
                    }
                }
                Slot::Abandoned => self.free.borrow_mut().push(i as u32),
                Slot::Free | Slot::Done(_) => panic!("completion for idle I/O slot {i}"),
            }
        }
        n
    }

    /// Commands submitted and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.slots.borrow().len() - self.free.borrow().len()
    }
}

/// Completion of one command.
pub struct IoFuture {
    driver: Rc<IoDriver>,
    slot: Option<u32>,
    cmd: Option<Command>,
}

impl IoFuture {
    fn try_start(&mut self) {
        if self.slot.is_some() {
            return;
        }
        let Some(slot) = self.driver.free.borrow_mut().pop() else {
            return;
        };
        self.driver.slots.borrow_mut()[slot as usize] = Slot::Waiting(None);
        self.slot = Some(slot);
        let cmd = self.cmd.take().expect("command present until started");
        self.driver.start(cmd, slot);
    }
}

impl Future for IoFuture {
    type Output = (Result<(), IoError>, Option<DmaBuf>);
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.try_start();
        let Some(slot) = self.slot else {
            // No free slot: retry on the next wake-up (any completion frees one).
            cx.waker().wake_by_ref();
            return Poll::Pending;
        };
        let mut slots = self.driver.slots.borrow_mut();
        match std::mem::replace(&mut slots[slot as usize], Slot::Free) {
            Slot::Done(c) => {
                drop(slots);
                self.driver.free.borrow_mut().push(slot);
                self.slot = None;
                Poll::Ready((c.result, c.buf))
            }
            Slot::Waiting(_) => {
                slots[slot as usize] = Slot::Waiting(Some(cx.waker().clone()));
                Poll::Pending
            }
            Slot::Free | Slot::Abandoned => panic!("I/O slot {slot} lost its state"),
        }
    }
}

impl Drop for IoFuture {
    fn drop(&mut self) {
        if let Some(slot) = self.slot {
            let mut slots = self.driver.slots.borrow_mut();
            if matches!(slots[slot as usize], Slot::Done(_)) {
                slots[slot as usize] = Slot::Free;
                self.driver.free.borrow_mut().push(slot);
            } else {
                slots[slot as usize] = Slot::Abandoned;
            }
        }
    }
}

/// The reactor's share of the hugepage pool.
pub struct Buffers {
    core: RefCell<PoolCore>,
    freed: Notify,
}

impl Buffers {
    /// Wraps a pool share.
    pub fn new(core: PoolCore) -> Rc<Buffers> {
        Rc::new(Buffers {
            core: RefCell::new(core),
            freed: Notify::default(),
        })
    }

    /// Bytes per buffer.
    pub fn buf_bytes(&self) -> usize {
        self.core.borrow().buf_bytes()
    }

    /// The region, for registration with queue pairs.
    pub fn region(&self) -> cfs_hugepages::RegionInfo {
        self.core.borrow().region()
    }

    /// A buffer; waits while the share is exhausted (back-pressure, never an unbounded pool).
    pub async fn get(&self) -> DmaBuf {
        loop {
            let notified = self.freed.notified();
            if let Some(b) = self.core.borrow_mut().alloc() {
                return b;
            }
            notified.await;
        }
    }

    /// A buffer if one is free right now.
    pub fn try_get(&self) -> Option<DmaBuf> {
        self.core.borrow_mut().alloc()
    }

    /// Returns a buffer and wakes waiters.
    pub fn put(&self, buf: DmaBuf) {
        self.core.borrow_mut().free(buf);
        self.freed.notify_all();
    }

    /// Free buffers right now.
    pub fn free_count(&self) -> usize {
        self.core.borrow().free_count()
    }
}
