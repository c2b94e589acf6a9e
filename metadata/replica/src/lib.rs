//! Metadata shards under Raft (raft-rs): the log store and the replica driver. No I/O, no
//! clocks: the server and the simulator drive it.
#![forbid(unsafe_code)]

pub mod replica;
pub mod storage;

pub use raft::eraftpb::{ConfState, Message, MessageType};
pub use replica::{
    initial_namespace, Applied, MemberChange, Output, PersistJob, ProposeError, Replica,
    ReplicaConfig, ReplicaError, StepError,
};
pub use storage::LogStore;
