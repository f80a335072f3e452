//! Tartarus microVM monitor ("the pit"): a KVM virtual machine monitor, one process per
//! sandbox, built on the rust-vmm crates.
//!
//! `boot` loads a kernel and writes what it reads at entry, `devices` holds the buses
//! and the devices on them, `vcpu` runs guest code, `machine` ties a VM together,
//! `api` serves the control socket, `snapshot` saves and restores machines (Nyx), and
//! `seccomp` and `jail` confine the process. The configuration, the API messages and
//! client, the snapshot reader and the KVM probe are in `tartarus-vmm-api`.

pub mod api;
pub mod boot;
pub mod control;
pub mod devices;
pub mod jail;
pub mod layout;
pub mod machine;
pub mod memory;
pub mod metrics;
pub mod seccomp;
pub mod snapshot;
pub mod vcpu;
pub mod vmm;
