//! Codec tests: round trips, the shared vectors, and property tests that hostile bytes
//! give typed errors, never a panic.

use std::path::PathBuf;

use proptest::prelude::*;
use tartarus_proto::*;

fn vectors_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/vectors/protocol")
}

fn error_kind(err: &DecodeError) -> &'static str {
    match err {
        DecodeError::Truncated { .. } => vectors::TRUNCATED,
        DecodeError::Oversized { .. } => vectors::OVERSIZED,
        DecodeError::Malformed(_) => vectors::MALFORMED,
        DecodeError::UnknownMessage { .. } => vectors::UNKNOWN_MESSAGE,
        DecodeError::VersionMismatch { .. } => vectors::VERSION_MISMATCH,
    }
}

/// Decodes one complete input the way the agent does, including the version check.
fn decode_checked(bytes: &[u8]) -> Result<Envelope, DecodeError> {
    let envelope = decode_complete_frame(bytes)?;
    if let Message::Hello(hello) = &envelope.body {
        check_version(hello.version)?;
    }
    Ok(envelope)
}

#[test]
fn every_message_type_has_a_vector() {
    let covered: std::collections::BTreeSet<&str> = vectors::valid()
        .iter()
        .map(|(_, e)| e.body.type_name())
        .collect();
    let all: std::collections::BTreeSet<&str> = MESSAGE_TYPES.iter().copied().collect();
    assert_eq!(covered, all);
}

#[test]
fn valid_vectors_round_trip() {
    // Requests come first in MESSAGE_TYPES, then the replies from `hello_ok` on.
    let first_response = MESSAGE_TYPES.iter().position(|t| *t == "hello_ok").unwrap();
    for (name, envelope) in vectors::valid() {
        let bytes = encode_frame(&envelope).unwrap();
        let back = decode_checked(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(back, envelope, "{name}");
        assert_eq!(
            back.body.is_request(),
            MESSAGE_TYPES
                .iter()
                .position(|t| *t == back.body.type_name())
                .unwrap()
                < first_response,
            "{name}"
        );
    }
}

#[test]
fn invalid_vectors_give_their_error() {
    for (name, bytes, expected) in vectors::invalid() {
        let err = decode_checked(&bytes).expect_err(name);
        assert_eq!(error_kind(&err), expected, "{name}: {err}");
        assert!(
            err.to_string().len() < 400,
            "{name}: error message is bounded"
        );
    }
}

#[test]
fn unknown_message_keeps_its_request_id() {
    let (_, bytes, _) = vectors::invalid()
        .into_iter()
        .find(|(n, _, _)| *n == "unknown_type")
        .unwrap();
    match decode_complete_frame(&bytes) {
        Err(DecodeError::UnknownMessage { id, type_name }) => {
            assert_eq!(id, Some(5));
            assert_eq!(type_name, "teleport");
        }
        other => panic!("{other:?}"),
    }
}

/// The vectors on disk are exactly what this code produces; `TARTARUS_UPDATE_VECTORS=1`
/// rewrites them after an intended protocol change.
#[test]
fn vectors_on_disk_match() {
    let dir = vectors_dir();
    let update = std::env::var_os("TARTARUS_UPDATE_VECTORS").is_some();
    let mut index = Vec::new();
    let mut files = Vec::new();
    for (name, envelope) in vectors::valid() {
        let file = format!("valid_{name}.bin");
        index.push(serde_json::json!({"name": name, "file": file, "type": envelope.body.type_name(), "id": envelope.id}));
        files.push((file, encode_frame(&envelope).unwrap()));
    }
    for (name, bytes, error) in vectors::invalid() {
        let file = format!("invalid_{name}.bin");
        index.push(serde_json::json!({"name": name, "file": file, "error": error}));
        files.push((file, bytes));
    }
    let index_doc = serde_json::json!({
        "protocol_version": PROTOCOL_VERSION,
        "max_frame_bytes": MAX_FRAME_BYTES,
        "vectors": index,
    });
    let mut index_text = serde_json::to_string_pretty(&index_doc).unwrap();
    index_text.push('\n');
    files.push(("index.json".into(), index_text.into_bytes()));
    if update {
        std::fs::create_dir_all(&dir).unwrap();
        for (file, bytes) in &files {
            std::fs::write(dir.join(file), bytes).unwrap();
        }
    }
    for (file, bytes) in &files {
        let on_disk = std::fs::read(dir.join(file)).unwrap_or_else(|e| {
            panic!("{file}: {e}; run TARTARUS_UPDATE_VECTORS=1 cargo test -p tartarus-proto")
        });
        assert_eq!(
            &on_disk, bytes,
            "{file} differs; protocol changed? rerun with TARTARUS_UPDATE_VECTORS=1"
        );
    }
}

#[test]
fn encode_refuses_oversized_messages() {
    let big = Envelope::new(
        1,
        Message::FileData {
            data: vec![0; MAX_FRAME_BYTES],
            size: 0,
        },
    );
    assert!(matches!(
        encode_frame(&big),
        Err(EncodeError::Oversized { .. })
    ));
}

#[test]
fn decode_frame_reports_partial_input_as_incomplete() {
    let bytes = encode_frame(&Envelope::new(9, Message::Pong {})).unwrap();
    for cut in 0..bytes.len() {
        assert_eq!(decode_frame(&bytes[..cut]).unwrap(), None);
    }
    let (envelope, used) = decode_frame(&bytes).unwrap().unwrap();
    assert_eq!((envelope.id, used), (9, bytes.len()));
}

fn stream_strategy() -> impl Strategy<Value = Stream> {
    prop_oneof![Just(Stream::Stdout), Just(Stream::Stderr)]
}

fn message_strategy() -> impl Strategy<Value = Message> {
    prop_oneof![
        (
            any::<u32>(),
            stream_strategy(),
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..2048)
        )
            .prop_map(|(pid, stream, seq, data)| Message::Output(Output {
                pid,
                stream,
                seq,
                data
            })),
        (
            proptest::option::of(proptest::collection::vec(".*", 0..4)),
            proptest::option::of(".*"),
            proptest::collection::btree_map("[A-Z_]{1,8}", ".*", 0..4),
            proptest::option::of(".*"),
            any::<bool>(),
            proptest::option::of((any::<u16>(), any::<u16>())),
            proptest::option::of(0.0f64..1e9),
            proptest::option::of(any::<u64>()),
        )
            .prop_map(
                |(argv, shell, env, cwd, stdin, pty, timeout_s, buffer_bytes)| {
                    Message::Exec(Exec {
                        argv,
                        shell,
                        env,
                        cwd,
                        user: None,
                        stdin,
                        pty: pty.map(|(rows, cols)| PtySize { rows, cols }),
                        timeout_s,
                        background: !stdin,
                        buffer_bytes,
                    })
                }
            ),
        (
            any::<u32>(),
            proptest::option::of(any::<i32>()),
            proptest::option::of(any::<i32>()),
            any::<bool>(),
            any::<u64>(),
            0.0f64..1e6
        )
            .prop_map(
                |(pid, code, signal, timed_out, dropped_chunks, duration_s)| {
                    Message::Exit(ExitInfo {
                        pid,
                        code,
                        signal,
                        timed_out,
                        dropped_chunks,
                        duration_s,
                    })
                }
            ),
        (".*", ".*").prop_map(|(code, message)| Message::Error { code, message }),
        (
            any::<u64>(),
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..512)
        )
            .prop_map(|(handle, offset, data)| Message::WriteChunk {
                handle,
                offset,
                data
            }),
        (any::<u64>(), any::<bool>())
            .prop_map(|(since_seq, follow)| Message::Logs { since_seq, follow }),
    ]
}

proptest! {
    #[test]
    fn round_trip(id in any::<u64>(), body in message_strategy()) {
        let envelope = Envelope::new(id, body);
        let bytes = encode_frame(&envelope).unwrap();
        prop_assert_eq!(decode_complete_frame(&bytes).unwrap(), envelope);
    }

    #[test]
    fn any_truncation_is_a_truncated_error(id in any::<u64>(), body in message_strategy(), cut in any::<prop::sample::Index>()) {
        let bytes = encode_frame(&Envelope::new(id, body)).unwrap();
        let cut = cut.index(bytes.len());
        let err = decode_complete_frame(&bytes[..cut]).unwrap_err();
        prop_assert!(matches!(err, DecodeError::Truncated { .. }), "{err}");
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = decode_complete_frame(&bytes);
        let _ = decode_frame(&bytes);
        let _ = decode_body(&bytes);
        let _ = peek_id(&bytes);
    }

    #[test]
    fn corrupted_frames_never_panic(id in any::<u64>(), body in message_strategy(), flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let mut bytes = encode_frame(&Envelope::new(id, body)).unwrap();
        let len = bytes.len();
        for (at, value) in flips {
            // Leave the header alone so the body decoder sees the damage.
            let i = HEADER_BYTES + at.index(len - HEADER_BYTES);
            bytes[i] = value;
        }
        let _ = decode_complete_frame(&bytes);
    }

    #[test]
    fn headers_above_the_limit_are_rejected(len in (MAX_FRAME_BYTES as u32 + 1)..=u32::MAX) {
        let err = body_length(len.to_be_bytes()).unwrap_err();
        prop_assert!(matches!(err, DecodeError::Oversized { .. }), "oversized header must be rejected");
    }
}
