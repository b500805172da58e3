//! Behaviour every command shares: output to a reader that went away ends
//! quietly, output that cannot be written is an error, never a panic.

mod common;

use std::fs::OpenOptions;
use std::process::Stdio;

use common::World;

#[test]
fn a_closed_or_full_stdout_is_never_a_panic() {
    let world = World::new();
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let gone = world
        .lazyblk()
        .arg("list")
        .stdout(Stdio::from(writer))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&gone.stderr);
    assert!(gone.status.success(), "{:?}: {stderr}", gone.status);
    assert!(stderr.is_empty(), "{stderr}");

    let full = OpenOptions::new().write(true).open("/dev/full").unwrap();
    let failed = world
        .lazyblk()
        .arg("list")
        .stdout(Stdio::from(full))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert_eq!(failed.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("write to standard output"), "{stderr}");
}
