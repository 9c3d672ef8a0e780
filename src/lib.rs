//! # empf
//!
//! A pure-Rust, CPU-first library and command-line tool that trains and deploys spiking neural
//! networks with the EM-PF model (floating-point spikes, binary synaptic weights, online training
//! whose memory does not grow with the number of time-steps). The model is specified equation by
//! equation in `EMPF.md`; module docs cite its sections.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod bench;
pub mod cli;
pub mod data;
pub mod dist;
pub mod error;
pub mod gradcheck;
pub mod infer;
pub mod io;
pub mod layers;
pub mod loss;
pub mod metrics;
pub mod model;
pub mod recipes;
pub mod rng;
pub mod separability;
pub mod tensor;
pub mod train;

pub use error::{Error, Result};
pub use layers::{Cache, GradMode, Layer, Param, ParamKind, State, StepCtx};
pub use tensor::{Real, Tensor};
