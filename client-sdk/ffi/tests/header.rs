//! The committed C header (`include/starling.h`) is exactly what cbindgen generates from
//! this crate; `STARLING_BLESS_HEADER=1` rewrites it instead of failing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

#[test]
fn committed_header_matches_cbindgen() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_config(config)
        .with_src(dir.join("src/lib.rs"))
        .generate()
        .expect("cbindgen generates the header")
        .write(&mut generated);
    let generated = String::from_utf8(generated).expect("UTF-8 header");
    let path = dir.join("include/starling.h");
    if std::env::var_os("STARLING_BLESS_HEADER").is_some() {
        std::fs::write(&path, &generated).expect("write the header");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    if committed != generated {
        let line = committed
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .map_or_else(
                || committed.lines().count().min(generated.lines().count()) + 1,
                |i| i + 1,
            );
        panic!(
            "{} differs from what cbindgen generates (first at line {line}); regenerate it with\n  \
             STARLING_BLESS_HEADER=1 cargo test -p starling-sdk-ffi --test header\nand commit it",
            path.display()
        );
    }
    // The header names every entry point.
    for f in [
        "starling_config_default",
        "starling_viewer_new",
        "starling_viewer_start",
        "starling_viewer_read",
        "starling_viewer_set_data_callback",
        "starling_viewer_stats",
        "starling_viewer_stop",
        "starling_viewer_free",
        "starling_last_error",
    ] {
        assert!(generated.contains(&format!("{f}(")), "{f} missing");
    }
}
