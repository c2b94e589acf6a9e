//! Deterministic cluster simulation.
