//! Metadata shards under Raft.
#![forbid(unsafe_code)]
