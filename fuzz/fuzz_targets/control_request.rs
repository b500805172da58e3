//! Arbitrary bytes as JSON lines on a device's control socket: a request as
//! the device reads it, an answer as `lazyblk list`/`del` read it, and a
//! device record as read from the run directory.
//!
//! Properties: parsing never panics; whatever parses serialises back to one
//! line (the protocol is line-framed) that parses to the same value.
#![no_main]

use lazyblk::daemon::{ControlRequest, ControlResponse, DeviceRecord};
use libfuzzer_sys::fuzz_target;
use serde::{de::DeserializeOwned, Serialize};

fuzz_target!(|data: &[u8]| {
    // The device reads a line into a String: only UTF-8 reaches the parser.
    if let Ok(line) = std::str::from_utf8(data) {
        round_trip::<ControlRequest>(serde_json::from_str(line));
        round_trip::<ControlResponse>(serde_json::from_str(line));
    }
    round_trip::<DeviceRecord>(serde_json::from_slice(data));
});

fn round_trip<T: Serialize + DeserializeOwned>(parsed: serde_json::Result<T>) {
    let Ok(value) = parsed else {
        return;
    };
    let line = serde_json::to_string(&value).expect("parsed values serialise");
    assert!(
        !line.contains('\n'),
        "a serialised message spans lines: {line:?}"
    );
    let again: T = serde_json::from_str(&line).expect("a serialised message parses");
    let line_again = serde_json::to_string(&again).expect("parsed values serialise");
    assert_eq!(line_again, line, "a message changed on a round trip");
}
