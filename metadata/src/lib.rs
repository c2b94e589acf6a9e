//! ClaudeFS metadata: the namespace as a deterministic state machine (no I/O, no clocks, no
//! async), so Raft can replicate it unchanged and the simulator can run it.

#![forbid(unsafe_code)]

pub mod codec;
pub mod command;
pub mod namespace;
pub mod placement;
pub mod session;
pub mod shard;
pub mod tier;
pub mod txn;
pub mod types;

pub use namespace::{Namespace, RenameFlags, SetAttr, TimeSet, XattrMode, CHUNK_BYTES};
pub use types::{Attr, ChunkId, Creds, Errno, FileType, InodeId, Timespec};
