//! The kernel command line's `tartarus.*` parameters, which the microVM backend uses to
//! tell the agent (PID 1) about the guest's disks.

/// Where the kernel command line is read from, unless `--kernel-cmdline` says otherwise.
pub const KERNEL_CMDLINE: &str = "/proc/cmdline";

/// What to do with the scratch disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScratchMode {
    /// An overlay root: the read-only root below, the scratch disk above (the default).
    Overlay,
    /// Only mount the scratch disk at this absolute path.
    Mount(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scratch {
    pub device: String,
    pub mode: ScratchMode,
}

/// The command line split into parameters the way the kernel splits it: on whitespace,
/// except inside double quotes (which are dropped), up to a lone `--` (the rest belongs
/// to init).
fn parameters(cmdline: &str) -> Vec<String> {
    let mut params = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut in_param = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                in_param = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_param {
                    if current == "--" {
                        return params;
                    }
                    params.push(std::mem::take(&mut current));
                    in_param = false;
                }
            }
            c => {
                current.push(c);
                in_param = true;
            }
        }
    }
    if in_param && current != "--" {
        params.push(current);
    }
    params
}

/// The scratch disk the command line names, if any. `Err` says why a parameter that is
/// present cannot be honoured (the caller logs it and leaves the disk alone).
pub fn scratch(cmdline: &str) -> Result<Option<Scratch>, String> {
    let mut device = None;
    let mut mode = None;
    // The last occurrence wins, as with the kernel's own parameters.
    for param in parameters(cmdline) {
        if let Some(value) = param.strip_prefix("tartarus.scratch=") {
            device = Some(value.to_owned());
        } else if let Some(value) = param.strip_prefix("tartarus.scratch_mode=") {
            mode = Some(value.to_owned());
        }
    }
    let Some(device) = device else {
        return match mode {
            Some(_) => Err("tartarus.scratch_mode= without tartarus.scratch=<device>".into()),
            None => Ok(None),
        };
    };
    if !device.starts_with('/') {
        return Err(format!(
            "tartarus.scratch={device:?} is not a device path (want e.g. /dev/vdb)"
        ));
    }
    let mode = match mode.as_deref() {
        None | Some("overlay") => ScratchMode::Overlay,
        Some(other) => match other.strip_prefix("mount:") {
            Some(path) if path.starts_with('/') && path != "/" => {
                ScratchMode::Mount(path.to_owned())
            }
            _ => {
                return Err(format!(
                    "tartarus.scratch_mode={other:?} is not `overlay` or `mount:/absolute/path`"
                ))
            }
        },
    };
    Ok(Some(Scratch { device, mode }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overlay(device: &str) -> Result<Option<Scratch>, String> {
        Ok(Some(Scratch {
            device: device.into(),
            mode: ScratchMode::Overlay,
        }))
    }

    #[test]
    fn finds_the_scratch_device_among_other_parameters() {
        let line = "console=ttyS0 reboot=k root=/dev/vda ro tartarus.scratch=/dev/vdb \
                    -- serve --init --listen vsock:1024\n";
        assert_eq!(scratch(line), overlay("/dev/vdb"));
    }

    #[test]
    fn no_parameter_means_no_scratch() {
        assert_eq!(scratch("console=ttyS0 root=/dev/vda ro\n"), Ok(None));
        assert_eq!(scratch(""), Ok(None));
        assert_eq!(scratch("   \n"), Ok(None));
        // Near misses are other parameters.
        assert_eq!(
            scratch("tartarus.scratchy=/dev/vdb tartarus.scratch"),
            Ok(None)
        );
    }

    #[test]
    fn arguments_for_init_are_not_parameters() {
        assert_eq!(scratch("ro -- tartarus.scratch=/dev/vdb"), Ok(None));
        assert_eq!(
            scratch("tartarus.scratch=/dev/vdb --"),
            overlay("/dev/vdb"),
            "a trailing -- ends nothing"
        );
    }

    #[test]
    fn quotes_group_and_are_dropped() {
        assert_eq!(
            scratch("a=\"x y\" tartarus.scratch=\"/dev/v db\""),
            overlay("/dev/v db")
        );
        assert_eq!(parameters("a=\"x  y\" b"), vec!["a=x  y", "b"]);
        assert_eq!(parameters("\"\" b"), vec!["", "b"]);
    }

    #[test]
    fn the_last_occurrence_wins() {
        assert_eq!(
            scratch("tartarus.scratch=/dev/vdc tartarus.scratch=/dev/vdb"),
            overlay("/dev/vdb")
        );
    }

    #[test]
    fn modes() {
        assert_eq!(
            scratch("tartarus.scratch=/dev/vdb tartarus.scratch_mode=overlay"),
            overlay("/dev/vdb")
        );
        assert_eq!(
            scratch("tartarus.scratch_mode=mount:/scratch tartarus.scratch=/dev/vdb"),
            Ok(Some(Scratch {
                device: "/dev/vdb".into(),
                mode: ScratchMode::Mount("/scratch".into())
            }))
        );
    }

    #[test]
    fn bad_values_say_why() {
        for line in [
            "tartarus.scratch=vdb",
            "tartarus.scratch=",
            "tartarus.scratch=/dev/vdb tartarus.scratch_mode=tmpfs",
            "tartarus.scratch=/dev/vdb tartarus.scratch_mode=mount:relative",
            "tartarus.scratch=/dev/vdb tartarus.scratch_mode=mount:/",
            "tartarus.scratch=/dev/vdb tartarus.scratch_mode=mount:",
            "tartarus.scratch_mode=overlay",
        ] {
            let err = scratch(line).expect_err(line);
            assert!(err.contains("tartarus.scratch"), "{line}: {err}");
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panics(line in "[ \t\n\"=./a-z_:-]{0,200}") {
            let _ = scratch(&line);
        }

        #[test]
        fn finds_the_device_after_any_other_parameters(
            others in proptest::collection::vec("[a-z_./:=]{1,20}", 0..20),
            separators in proptest::collection::vec("[ \t\n]{1,3}", 21),
            device in "/[a-z0-9/]{1,12}",
        ) {
            let mut line = String::new();
            for (param, sep) in others.iter().zip(&separators) {
                if !param.starts_with("tartarus.scratch") {
                    line.push_str(param);
                    line.push_str(sep);
                }
            }
            line.push_str(&format!("tartarus.scratch={device}{}", separators[20]));
            proptest::prop_assert_eq!(scratch(&line), overlay(&device));
        }
    }
}
