//! Resolving playlist URIs against the playlist's URL (RFC 3986 §5.2, for the
//! `http://` URLs ingest supports), and recognising HLS sources.

/// True when the URL's path (query and fragment ignored) ends in `.m3u8` (any case).
pub fn is_hls_url(url: &str) -> bool {
    let path = url.split(['?', '#']).next().unwrap_or("");
    path.len() >= 5 && path[path.len() - 5..].eq_ignore_ascii_case(".m3u8")
}

/// True for the HLS playlist content types (`application/vnd.apple.mpegurl`,
/// `audio/mpegurl`, `application/x-mpegurl`, `audio/x-mpegurl`), parameters ignored.
pub fn is_hls_content_type(ct: &str) -> bool {
    let ct = ct.split(';').next().unwrap_or("").trim();
    [
        "application/vnd.apple.mpegurl",
        "application/x-mpegurl",
        "audio/mpegurl",
        "audio/x-mpegurl",
    ]
    .iter()
    .any(|t| ct.eq_ignore_ascii_case(t))
}

/// Resolves `reference` against the absolute `base` URL. `None` when `base` is not an
/// absolute `scheme://authority...` URL.
pub fn resolve(base: &str, reference: &str) -> Option<String> {
    let base = base.split('#').next().unwrap_or("");
    let reference = reference.split('#').next().unwrap_or("");
    if has_scheme(reference) {
        return Some(reference.to_owned());
    }
    let (scheme, rest) = base.split_once("://")?;
    if scheme.is_empty() || !has_scheme(base) {
        return None;
    }
    let auth_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path_query) = rest.split_at(auth_end);
    if authority.is_empty() {
        return None;
    }
    let (base_path, base_query) = match path_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_query, None),
    };
    if let Some(net) = reference.strip_prefix("//") {
        return Some(format!("{scheme}://{net}"));
    }
    let (ref_path, ref_query) = match reference.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (reference, None),
    };
    let (path, query) = if ref_path.is_empty() {
        (base_path.to_owned(), ref_query.or(base_query))
    } else if ref_path.starts_with('/') {
        (remove_dot_segments(ref_path), ref_query)
    } else {
        let dir = match base_path.rfind('/') {
            Some(i) => &base_path[..=i],
            None => "/",
        };
        (remove_dot_segments(&format!("{dir}{ref_path}")), ref_query)
    };
    let path = if path.is_empty() { "/".into() } else { path };
    Some(match query {
        Some(q) => format!("{scheme}://{authority}{path}?{q}"),
        None => format!("{scheme}://{authority}{path}"),
    })
}

fn has_scheme(s: &str) -> bool {
    match s.find(':') {
        Some(i) if i > 0 => {
            let scheme = &s[..i];
            scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
                && !s[..i].contains('/')
        }
        _ => false,
    }
}

fn remove_dot_segments(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let segs: Vec<&str> = path.split('/').collect();
    let last = segs.len().saturating_sub(1);
    for (i, seg) in segs.iter().enumerate() {
        match *seg {
            "." => {
                if i == last {
                    out.push("");
                }
            }
            ".." => {
                if out.len() > 1 {
                    out.pop();
                }
                if i == last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    let joined = out.join("/");
    if path.starts_with('/') && !joined.starts_with('/') {
        format!("/{joined}")
    } else {
        joined
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn recognises_hls_sources() {
        assert!(is_hls_url("http://h/live/index.m3u8"));
        assert!(is_hls_url("http://h/live/INDEX.M3U8?token=1#x"));
        assert!(!is_hls_url("http://h/live.ts"));
        assert!(!is_hls_url("http://h/m3u8"));
        assert!(is_hls_content_type("application/vnd.apple.mpegurl"));
        assert!(is_hls_content_type("Audio/MpegURL; charset=utf-8"));
        assert!(is_hls_content_type("application/x-mpegURL"));
        assert!(!is_hls_content_type("video/mp2t"));
    }

    #[test]
    fn rfc3986_examples_and_playlist_cases() {
        let base = "http://a/b/c/d;p?q";
        for (r, want) in [
            ("g", "http://a/b/c/g"),
            ("./g", "http://a/b/c/g"),
            ("g/", "http://a/b/c/g/"),
            ("/g", "http://a/g"),
            ("//g", "http://g"),
            ("?y", "http://a/b/c/d;p?y"),
            ("g?y", "http://a/b/c/g?y"),
            ("", "http://a/b/c/d;p?q"),
            (".", "http://a/b/c/"),
            ("./", "http://a/b/c/"),
            ("..", "http://a/b/"),
            ("../", "http://a/b/"),
            ("../g", "http://a/b/g"),
            ("../..", "http://a/"),
            ("../../g", "http://a/g"),
            ("../../../g", "http://a/g"),
            ("g.", "http://a/b/c/g."),
            ("g/../h", "http://a/b/c/h"),
            ("http://other:8080/x.ts", "http://other:8080/x.ts"),
        ] {
            assert_eq!(resolve(base, r).as_deref(), Some(want), "{r:?}");
        }
        assert_eq!(
            resolve("http://127.0.0.1:8000/hls/live.m3u8", "live12.ts").as_deref(),
            Some("http://127.0.0.1:8000/hls/live12.ts")
        );
        assert_eq!(
            resolve("http://h:1", "seg.ts").as_deref(),
            Some("http://h:1/seg.ts")
        );
        assert_eq!(resolve("not a url", "seg.ts"), None);
        assert_eq!(resolve("http://", "seg.ts"), None);
    }
}
