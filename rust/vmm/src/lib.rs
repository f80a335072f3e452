//! Tartarus microVM monitor ("the pit"): a KVM virtual machine monitor, one process per
//! sandbox, built on the rust-vmm crates.
//!
//! This crate holds the library behind the `tartarus-vmm` binary. The foundation ships
//! the KVM flavour probe the doctor uses; the monitor itself grows around it.

pub mod devices;
pub mod probe;
