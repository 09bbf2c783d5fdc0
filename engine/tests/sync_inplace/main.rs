//! In-place sync, engine level: synthetic release pairs on file targets, bad sources,
//! the property test of the planner and executor, and simulated power cuts.
//!
//! One test binary with shared helpers in `util`.

mod layouts;
mod names;
mod powercut;
mod props;
mod util;
