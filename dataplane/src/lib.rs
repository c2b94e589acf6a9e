//! ClaudeFS data plane: polled per-core reactors and the chunk store.
//!
//! Layering: [`store`] holds the on-disk format (pure encoders in `store::format`, the
//! allocator in `store::alloc`) and the per-shard engine; [`exec`] and [`io`] are the
//! single-threaded task executor and queue-pair plumbing a reactor runs; [`reactor`] starts the
//! pinned reactor threads and routes requests to them by message passing; [`config`] reads the
//! TOML configuration.

#![forbid(unsafe_code)]

pub mod block_cache;
pub mod cluster;
pub mod config;
pub mod exec;
pub mod fs_service;
pub mod identity;
pub mod io;
pub mod meta_store;
pub mod raft_store;
pub mod reactor;
pub mod replication;
pub mod rma;
pub mod sharding;
pub mod store;
pub mod tier;
pub mod workload;
