//! Reading the control plane's URL (`scheme://authority/path`) without a URL parser:
//! the address part, which both the peer listener (what local IP routes to the control
//! plane) and the control channel (which IP to bind) need.

/// The authority of `url` (`user@host:port`, as written; the whole `url` when it has
/// no `scheme://`), up to the first `/`.
pub(crate) fn authority(url: &str) -> &str {
    url.split("://")
        .nth(1)
        .unwrap_or(url)
        .split('/')
        .next()
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_of_urls() {
        assert_eq!(authority("http://cp.example:7000/x/y"), "cp.example:7000");
        assert_eq!(authority("https://[::1]:7000"), "[::1]:7000");
        assert_eq!(authority("http://u@h"), "u@h");
        assert_eq!(authority("cp:7000/z"), "cp:7000");
        assert_eq!(authority("http://"), "");
    }
}
