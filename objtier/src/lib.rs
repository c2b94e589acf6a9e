//! ClaudeFS object tier: cold extents leave flash for any S3-compatible store, packed into
//! blobs (64 MiB by default) that are written with one PUT, read back with ranged GETs and
//! removed with DELETE, never anything else (no LIST, no multipart).
//!
//! [`blob`] is the format (pure, checked both ways); [`policy`] decides what to flush, evict,
//! compact and when to push back (pure); [`s3`] moves blobs to and from a store.

#![forbid(unsafe_code)]

pub mod blob;
pub mod mover;
pub mod policy;
pub mod s3;
