//! An application that wants only the network layer gets only what the transports need: with
//! the `app` feature off, none of the application side's dependencies is in the normal
//! dependency tree.

use std::process::Command;

/// Crates only the application side (CLI, demo store, benchmark harness) may pull in.
const APP_ONLY: &[&str] = &[
    "clap",
    "tracing-subscriber",
    "tempfile",
    "mimalloc",
    "redb",
    "metrics-exporter-prometheus",
];

/// The crate names `cargo tree -e normal` lists for raftwire built with `features`.
fn normal_dependencies(features: &str) -> Vec<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["tree", "-e", "normal", "--prefix", "none", "--format", "{p}"])
        .args(["--no-default-features", "--features", features])
        .arg("--offline")
        .output()
        .expect("cargo runs");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

#[test]
fn the_library_alone_pulls_in_no_application_dependency() {
    let lean = normal_dependencies("grpc,quic");
    assert!(
        lean.iter().any(|c| c == "tonic"),
        "the tree lists the transports: {lean:?}"
    );
    for app in APP_ONLY {
        assert!(
            !lean.iter().any(|c| c == app),
            "{app} is in the library's dependency tree without the `app` feature"
        );
    }
    // The control: with the application side, they are there.
    let full = normal_dependencies("grpc,quic,app");
    for app in APP_ONLY {
        assert!(
            full.iter().any(|c| c == app),
            "{app} missing with `app`: {full:?}"
        );
    }
}
