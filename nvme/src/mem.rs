//! In-memory backend with seeded fault injection and power loss.
//!
//! Model: reads see every write that has *executed*; a flush makes every executed write durable.
//! Commands execute when the owner polls, in a seeded shuffled order, as a real device may
//! reorder them. [`MemDevice::cut_power_after`] makes the device die after N more commands:
//! every later command fails with [`IoStatus::PowerLost`] until [`MemDevice::power_cycle`],
//! which keeps the durable image and, of each unflushed write, all of it, none of it or a
//! random subset of its blocks (a torn write), chosen by the seed. Queue pairs created before
//! a power cycle stay dead.

use crate::rng::SimRng;
use crate::{
    validate, BlockDevice, Command, Completion, DeviceError, IoError, IoStatus, Namespace, Opcode,
    QueuePair, QueuePairConfig, SubmitError,
};
use std::sync::{Arc, Mutex, MutexGuard};

struct State {
    /// What reads see.
    current: Vec<u8>,
    /// What survives power loss.
    durable: Vec<u8>,
    /// Writes executed since the last flush: (byte offset, length).
    unflushed: Vec<(usize, usize)>,
    rng: SimRng,
    /// Power generation; queue pairs of older generations are dead.
    generation: u64,
    /// Commands left before the power goes; `Some(0)` means it is gone.
    power_budget: Option<u64>,
    /// Fail each command with this probability (parts per million).
    fail_ppm: u32,
    /// Commands executed so far.
    executed: u64,
}

/// A RAM-backed device; clones share the same media.
#[derive(Clone)]
pub struct MemDevice {
    name: Arc<str>,
    ns: Namespace,
    state: Arc<Mutex<State>>,
}

impl MemDevice {
    /// A zero-filled device of `lba_count` blocks of `lba_size` bytes.
    pub fn new(name: &str, lba_size: u32, lba_count: u64, seed: u64) -> MemDevice {
        let bytes = (u64::from(lba_size) * lba_count) as usize;
        MemDevice {
            name: name.into(),
            ns: Namespace {
                lba_size,
                lba_count,
            },
            state: Arc::new(Mutex::new(State {
                current: vec![0; bytes],
                durable: vec![0; bytes],
                unflushed: Vec::new(),
                rng: SimRng::new(seed),
                generation: 0,
                power_budget: None,
                fail_ppm: 0,
                executed: 0,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a test failure already; keep the state usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// After `n` more commands the power goes out.
    pub fn cut_power_after(&self, n: u64) {
        self.lock().power_budget = Some(n);
    }

    /// Fails each command with probability `ppm` per million (0 disables).
    pub fn set_fail_ppm(&self, ppm: u32) {
        self.lock().fail_ppm = ppm;
    }

    /// Whether the power is out.
    pub fn is_powered_off(&self) -> bool {
        self.lock().power_budget == Some(0)
    }

    /// Commands executed so far (all generations).
    pub fn executed(&self) -> u64 {
        self.lock().executed
    }

    /// Simulates power loss and restore: unflushed writes survive whole, not at all, or torn.
    pub fn power_cycle(&self) {
        let lba = self.ns.lba_size as usize;
        let mut s = self.lock();
        let unflushed = std::mem::take(&mut s.unflushed);
        for (off, len) in unflushed {
            match s.rng.below(3) {
                0 => {
                    let (cur, dur) = (&s.current[off..off + len].to_vec(), &mut s.durable);
                    dur[off..off + len].copy_from_slice(cur);
                }
                1 => {}
                _ => {
                    for b in (off..off + len).step_by(lba) {
                        if s.rng.chance(1, 2) {
                            let blk = s.current[b..b + lba].to_vec();
                            s.durable[b..b + lba].copy_from_slice(&blk);
                        }
                    }
                }
            }
        }
        s.current = s.durable.clone();
        s.generation += 1;
        s.power_budget = None;
    }

    /// Flips one bit of the durable and current image (media corruption).
    pub fn flip_bit(&self, byte: usize, bit: u8) {
        let mut s = self.lock();
        s.current[byte] ^= 1 << bit;
        s.durable[byte] ^= 1 << bit;
    }

    fn execute(&self, generation: u64, cmd: &mut Command) -> Result<(), IoStatus> {
        let mut s = self.lock();
        s.executed += 1;
        if s.generation != generation || s.power_budget == Some(0) {
            return Err(IoStatus::PowerLost);
        }
        if let Some(b) = s.power_budget.as_mut() {
            *b -= 1;
        }
        if s.fail_ppm > 0 {
            let ppm = u64::from(s.fail_ppm);
            if s.rng.chance(ppm, 1_000_000) {
                return Err(IoStatus::InjectedFault);
            }
        }
        if let Some(status) = validate(&self.ns, cmd) {
            return Err(status);
        }
        let lba = self.ns.lba_size as usize;
        let off = cmd.lba as usize * lba;
        let len = cmd.nlb as usize * lba;
        match cmd.opcode {
            Opcode::Read => {
                let buf = cmd.buf.as_mut().ok_or(IoStatus::InvalidBuffer)?;
                buf.as_mut_slice()[..len].copy_from_slice(&s.current[off..off + len]);
            }
            Opcode::Write => {
                let buf = cmd.buf.as_ref().ok_or(IoStatus::InvalidBuffer)?;
                s.current[off..off + len].copy_from_slice(&buf.as_slice()[..len]);
                s.unflushed.push((off, len));
            }
            Opcode::WriteZeroes | Opcode::Deallocate => {
                s.current[off..off + len].fill(0);
                s.unflushed.push((off, len));
            }
            Opcode::Flush => {
                let unflushed = std::mem::take(&mut s.unflushed);
                for (o, l) in unflushed {
                    let data = s.current[o..o + l].to_vec();
                    s.durable[o..o + l].copy_from_slice(&data);
                }
            }
        }
        Ok(())
    }
}

impl BlockDevice for MemDevice {
    fn name(&self) -> &str {
        &self.name
    }
    fn namespace(&self) -> Namespace {
        self.ns
    }
    fn create_queue_pair(&self, cfg: QueuePairConfig) -> Result<Box<dyn QueuePair>, DeviceError> {
        let mut s = self.lock();
        let seed = s.rng.next_u64();
        let generation = s.generation;
        drop(s);
        Ok(Box::new(MemQueuePair {
            dev: self.clone(),
            generation,
            depth: cfg.depth.max(1),
            queued: Vec::new(),
            rng: SimRng::new(seed),
        }))
    }
}

struct MemQueuePair {
    dev: MemDevice,
    generation: u64,
    depth: u32,
    queued: Vec<Command>,
    rng: SimRng,
}

impl QueuePair for MemQueuePair {
    fn submit(&mut self, cmd: Command) -> Result<(), SubmitError> {
        if self.queued.len() >= self.depth as usize {
            return Err(SubmitError::QueueFull(cmd));
        }
        self.queued.push(cmd);
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<Completion>, max: usize) -> usize {
        let mut done = 0;
        while done < max && !self.queued.is_empty() {
            let i = self.rng.below(self.queued.len() as u64) as usize;
            let mut cmd = self.queued.swap_remove(i);
            let result = self
                .dev
                .execute(self.generation, &mut cmd)
                .map_err(|status| IoError {
                    device: Arc::clone(&self.dev.name),
                    opcode: cmd.opcode,
                    lba: cmd.lba,
                    nlb: cmd.nlb,
                    status,
                });
            out.push(Completion {
                tag: cmd.tag,
                result,
                buf: cmd.buf.take(),
            });
            done += 1;
        }
        done
    }

    fn in_flight(&self) -> u32 {
        self.queued.len() as u32
    }

    fn depth(&self) -> u32 {
        self.depth
    }
}
