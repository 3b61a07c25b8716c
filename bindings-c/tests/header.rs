//! The checked-in include/anyvm.h must match what cbindgen generates from the source.
//! Regenerate with `ANYVM_UPDATE_HEADER=1 cargo test -p anyvm-c --test header`.

#[test]
fn header_is_up_to_date() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).unwrap();
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_crate(dir)
        .with_config(config)
        .generate()
        .expect("cbindgen")
        .write(&mut generated);
    let path = dir.join("include/anyvm.h");
    if std::env::var_os("ANYVM_UPDATE_HEADER").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let current = std::fs::read(&path).unwrap_or_default();
    assert!(
        current == generated,
        "include/anyvm.h is stale; run ANYVM_UPDATE_HEADER=1 cargo test -p anyvm-c --test header"
    );
}
