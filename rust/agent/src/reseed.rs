//! Reseeding the kernel's random number generator after a snapshot restore.
//!
//! Every clone of a microVM snapshot starts with the same memory, the kernel's RNG
//! state included, so until it reseeds each clone would hand out the same "random"
//! bytes. The guest kernel has no VM-generation driver it could use here (no ACPI, no
//! /dev/mem), so the host sends `reseed` with fresh entropy once it reconnects after a
//! restore. The bytes are credited with `RNDADDENTROPY` and the RNG is reseeded at once
//! with `RNDRESEEDCRNG` (both need CAP_SYS_ADMIN: the agent is PID 1 as root in a
//! microVM). Without the capability the bytes are still mixed in by writing them to
//! the device, which needs no privilege but credits nothing and reseeds later.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;

use tartarus_proto::codes;

/// At least 16 bytes: less cannot make clones diverge by much. At most 512: more
/// adds nothing the kernel keeps.
pub const MIN_ENTROPY_BYTES: usize = 16;
pub const MAX_ENTROPY_BYTES: usize = 512;

const RANDOM_DEVICE: &str = "/dev/urandom";

// linux/random.h: _IOW('R', 0x03, int[2]) and _IO('R', 0x07).
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// How the entropy went in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reseeded {
    /// Credited and the RNG reseeded now.
    Credited,
    /// Mixed in without credit (no CAP_SYS_ADMIN); the kernel reseeds on its schedule.
    Mixed,
}

pub fn check(entropy: &[u8]) -> Result<(), (&'static str, String)> {
    if !(MIN_ENTROPY_BYTES..=MAX_ENTROPY_BYTES).contains(&entropy.len()) {
        return Err((
            codes::INVALID_ARGUMENT,
            format!(
                "reseed takes {MIN_ENTROPY_BYTES} to {MAX_ENTROPY_BYTES} bytes of entropy, not {}",
                entropy.len()
            ),
        ));
    }
    Ok(())
}

/// Feeds `entropy` to the kernel's RNG through `device` (`/dev/urandom` outside tests).
pub fn reseed_via(device: &Path, entropy: &[u8]) -> Result<Reseeded, (&'static str, String)> {
    check(entropy)?;
    let fail = |what: &str, e: std::io::Error| {
        (
            codes::IO,
            format!("cannot {what} {}: {e}", device.display()),
        )
    };
    let mut file = OpenOptions::new()
        .write(true)
        .open(device)
        .map_err(|e| fail("open", e))?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + entropy.len());
    info.extend_from_slice(&((entropy.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(entropy.len() as i32).to_ne_bytes());
    info.extend_from_slice(entropy);
    // SAFETY: `info` is a valid rand_pool_info (two ints, then buf_size bytes) that
    // outlives the call; the kernel only reads from it.
    let credited = unsafe { libc::ioctl(file.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) } == 0;
    if credited {
        // SAFETY: RNDRESEEDCRNG takes no argument. Kernels before 5.0 lack it; the
        // credited bytes still reach the RNG at its next reseed then.
        unsafe { libc::ioctl(file.as_raw_fd(), RNDRESEEDCRNG) };
        return Ok(Reseeded::Credited);
    }
    let denied = std::io::Error::last_os_error();
    if denied.raw_os_error() != Some(libc::EPERM) && denied.raw_os_error() != Some(libc::ENOTTY) {
        return Err(fail("add entropy through", denied));
    }
    file.write_all(entropy)
        .map_err(|e| fail("write entropy to", e))?;
    Ok(Reseeded::Mixed)
}

pub fn reseed(entropy: &[u8]) -> Result<Reseeded, (&'static str, String)> {
    reseed_via(Path::new(RANDOM_DEVICE), entropy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entropy_outside_the_bounds_is_refused() {
        for n in [0, 15, 513, 4096] {
            let (code, message) = check(&vec![7; n]).unwrap_err();
            assert_eq!(code, codes::INVALID_ARGUMENT);
            assert!(message.contains(&n.to_string()), "{message}");
        }
        check(&[1; 16]).unwrap();
        check(&[1; 512]).unwrap();
    }

    #[test]
    fn a_device_that_is_not_an_rng_gets_the_bytes_written() {
        // A regular file answers the ioctls with ENOTTY: the bytes are written instead.
        let path = std::env::temp_dir().join(format!("tartarus-reseed-{}", std::process::id()));
        std::fs::write(&path, b"").unwrap();
        assert_eq!(reseed_via(&path, &[9; 32]).unwrap(), Reseeded::Mixed);
        assert_eq!(std::fs::read(&path).unwrap(), vec![9; 32]);
        std::fs::remove_file(&path).unwrap();
        let missing = path.with_extension("missing");
        let (code, message) = reseed_via(&missing, &[9; 32]).unwrap_err();
        assert_eq!(code, codes::IO);
        assert!(message.contains("cannot open"), "{message}");
    }

    #[test]
    fn the_kernel_rng_takes_the_bytes() {
        // Credited with CAP_SYS_ADMIN (root outside a container), mixed in otherwise.
        let how = reseed(&[0x5a; 32]).unwrap();
        if !nix::unistd::geteuid().is_root() {
            assert_eq!(how, Reseeded::Mixed);
        }
    }
}
