//! The kernel command line: validated (printable ASCII, bounded length) before it goes
//! anywhere near guest memory.

use linux_loader::cmdline::{Cmdline, Error as LoaderCmdlineError};

use crate::layout::CMDLINE_MAX_SIZE;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CmdlineError {
    #[error("kernel command line is {len} bytes; the limit is {max} bytes including the NUL")]
    TooLong { len: usize, max: usize },
    #[error("kernel command line is invalid: {0}")]
    Invalid(String),
}

impl From<LoaderCmdlineError> for CmdlineError {
    fn from(e: LoaderCmdlineError) -> Self {
        match e {
            LoaderCmdlineError::TooLarge => CmdlineError::TooLong {
                len: 0,
                max: CMDLINE_MAX_SIZE,
            },
            other => CmdlineError::Invalid(other.to_string()),
        }
    }
}

/// Parses the caller's command line into a builder the VMM can append device
/// parameters to. An empty line is allowed (probe guests ignore it).
pub fn parse_cmdline(raw: &str) -> Result<Cmdline, CmdlineError> {
    // +1: the NUL the guest sees after the text.
    if raw.len() + 1 > CMDLINE_MAX_SIZE {
        return Err(CmdlineError::TooLong {
            len: raw.len() + 1,
            max: CMDLINE_MAX_SIZE,
        });
    }
    if let Some(bad) = raw.chars().find(|c| !(' '..='~').contains(c)) {
        return Err(CmdlineError::Invalid(format!(
            "character {bad:?} is not printable ASCII"
        )));
    }
    if raw.trim().is_empty() {
        return Ok(Cmdline::new(CMDLINE_MAX_SIZE)?);
    }
    Ok(Cmdline::try_from(raw, CMDLINE_MAX_SIZE)?)
}

/// The NUL-terminated bytes the guest reads.
pub fn cmdline_bytes(cmdline: &Cmdline) -> Result<Vec<u8>, CmdlineError> {
    let bytes = cmdline.as_cstring()?.into_bytes_with_nul();
    if bytes.len() > CMDLINE_MAX_SIZE {
        return Err(CmdlineError::TooLong {
            len: bytes.len(),
            max: CMDLINE_MAX_SIZE,
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_line_at_the_limit_is_accepted_one_past_is_not() {
        let ok = "a".repeat(CMDLINE_MAX_SIZE - 1);
        assert_eq!(
            cmdline_bytes(&parse_cmdline(&ok).unwrap()).unwrap().len(),
            CMDLINE_MAX_SIZE
        );
        let long = "a".repeat(CMDLINE_MAX_SIZE);
        assert_eq!(
            parse_cmdline(&long).unwrap_err(),
            CmdlineError::TooLong {
                len: CMDLINE_MAX_SIZE + 1,
                max: CMDLINE_MAX_SIZE
            }
        );
    }

    #[test]
    fn nul_and_non_ascii_are_rejected() {
        assert!(matches!(
            parse_cmdline("console=ttyS0\0x"),
            Err(CmdlineError::Invalid(_))
        ));
        assert!(matches!(
            parse_cmdline("init=/bin/é"),
            Err(CmdlineError::Invalid(_))
        ));
    }

    #[test]
    fn empty_line_is_a_lone_nul() {
        assert_eq!(cmdline_bytes(&parse_cmdline("").unwrap()).unwrap(), b"\0");
    }

    #[test]
    fn appending_past_the_limit_fails() {
        let mut c = parse_cmdline(&"a".repeat(CMDLINE_MAX_SIZE - 4)).unwrap();
        assert!(c.insert("key", "value").is_err());
    }

    proptest! {
        #[test]
        fn printable_words_round_trip(words in proptest::collection::vec("[a-zA-Z0-9_.=/,:-]{1,12}", 1..40)) {
            let raw = words.join(" ");
            let bytes = cmdline_bytes(&parse_cmdline(&raw).unwrap()).unwrap();
            prop_assert_eq!(&bytes[..bytes.len() - 1], raw.as_bytes());
            prop_assert_eq!(bytes[bytes.len() - 1], 0);
        }

        #[test]
        fn arbitrary_input_never_panics(raw in ".{0,5000}") {
            if let Ok(c) = parse_cmdline(&raw) {
                let bytes = cmdline_bytes(&c).unwrap();
                prop_assert!(bytes.len() <= CMDLINE_MAX_SIZE);
            }
        }
    }
}
