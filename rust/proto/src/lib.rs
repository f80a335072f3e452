//! Wire types shared by the Tartarus agent, VMM and core.

/// Version of the agent wire protocol; bumped on incompatible changes.
pub const PROTOCOL_VERSION: u32 = 1;
