//! The data plane's plain-HTTP request head parser (`GET /live/ID`, `/healthz`,
//! `/metrics`, tokens from the query or `Authorization`). Never panics; a request it
//! serves as a stream must be a `GET` of `/live/...`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use starling_dataplane::fuzz_api::http_head;

fuzz_target!(|data: &[u8]| {
    if let Some(what) = http_head(data)
        && what.starts_with("Live(")
    {
        // Empty lines before the request line are skipped (RFC 9112, 2.2).
        let start = data
            .iter()
            .position(|&b| b != b'\r' && b != b'\n')
            .unwrap_or(0);
        let data = &data[start..];
        assert!(data.starts_with(b"GET "), "served a non-GET: {what}");
        let line_end = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
        let line = &data[..line_end];
        assert!(
            line.windows(6).any(|w| w == b"/live/"),
            "served a path outside /live/: {what}"
        );
    }
});
