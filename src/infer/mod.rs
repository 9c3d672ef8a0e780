//! Deployment: the exported model file ([`format`]), the exporter from a training graph
//! ([`export`]) and the inference runtime ([`runtime`]), with no training machinery.
//!
//! ```text
//! checkpoint --empf export--> model.empfm --Model::load--> Runtime::new(precision) --run--> logits
//! ```

pub mod bench;
pub mod export;
pub mod format;
pub mod runtime;

pub use export::export;
pub use format::{Model, Op};
pub use runtime::{Precision, Runtime};
