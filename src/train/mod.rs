//! Training: the time loop (online, random back-propagation, BPTT), optimisers, schedules.

pub mod checkpoint;
pub mod optim;
pub mod step;
pub mod trainer;
