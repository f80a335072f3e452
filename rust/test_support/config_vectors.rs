//! The check behind the shared config vectors (`tests/vectors/config/`), included by each
//! crate whose configuration Python mirrors (`#[path]` from its `tests/config_vectors.rs`):
//! `written` must deserialize, serialize to `canonical`, round-trip, and equal the
//! committed file; `TARTARUS_UPDATE_VECTORS=1` rewrites the file after an intended change.

use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

pub fn check<T: DeserializeOwned + Serialize>(type_name: &str, name: &str, written: Value) {
    let value: T =
        serde_json::from_value(written.clone()).unwrap_or_else(|e| panic!("{name}: {e}"));
    let canonical = serde_json::to_value(&value).unwrap();
    let again: T = serde_json::from_value(canonical.clone()).unwrap();
    assert_eq!(
        serde_json::to_value(&again).unwrap(),
        canonical,
        "{name}: not a round trip"
    );
    let doc = json!({"type": type_name, "written": written, "canonical": canonical});
    let mut text = serde_json::to_string_pretty(&doc).unwrap();
    text.push('\n');
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/vectors/config")
        .join(format!("{name}.json"));
    if std::env::var_os("TARTARUS_UPDATE_VECTORS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &text).unwrap();
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{name}: {e}; run TARTARUS_UPDATE_VECTORS=1 cargo test -p {} --test config_vectors",
            env!("CARGO_PKG_NAME")
        )
    });
    assert_eq!(
        on_disk, text,
        "{name} differs; config changed? rerun with TARTARUS_UPDATE_VECTORS=1"
    );
}
