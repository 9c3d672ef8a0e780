//! `empf-simd`: bit-level kernels for binary synapses (see `simd/README.md`).
//!
//! This crate knows nothing about neural networks: slices in, slices out. All `unsafe` code of the
//! empf workspace lives here, each block with a SAFETY comment.
