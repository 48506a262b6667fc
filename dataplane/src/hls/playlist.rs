//! A small, strict-where-it-matters M3U8 parser (RFC 8216) for the tags live ingest
//! needs: master playlists (`EXT-X-STREAM-INF`, `EXT-X-MEDIA`) and media playlists
//! (`EXT-X-TARGETDURATION`, `EXT-X-MEDIA-SEQUENCE`, `EXTINF`, `EXT-X-DISCONTINUITY`,
//! `EXT-X-MAP`, `EXT-X-ENDLIST`, `EXT-X-GAP`, `EXT-X-KEY`, `EXT-X-BYTERANGE`).
//! Unknown tags and comments are ignored. Everything a hostile playlist controls is
//! bounded (line count, URI length, segment count, durations, sequence arithmetic); the
//! parser never panics and reports what it refuses as a [`PlaylistError`].

/// Segments accepted in one media playlist (a live window is a few dozen).
pub const MAX_SEGMENTS: usize = 10_000;
/// Variants accepted in one master playlist.
pub const MAX_VARIANTS: usize = 1_000;
/// Longest URI accepted.
pub const MAX_URI: usize = 4096;
/// Longest target or segment duration accepted, in seconds.
pub const MAX_DURATION_S: u64 = 3600;

/// Why a playlist was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlaylistError {
    #[error("not an M3U8 playlist (no #EXTM3U first line)")]
    NotM3u8,
    #[error("playlist has both variant streams and media segments")]
    Mixed,
    #[error("media playlist without #EXT-X-TARGETDURATION")]
    NoTargetDuration,
    #[error("line {line}: invalid {tag}: {why}")]
    Invalid {
        line: usize,
        tag: &'static str,
        why: String,
    },
    #[error("line {line}: URI longer than {MAX_URI} bytes")]
    UriTooLong { line: usize },
    #[error("more than {0} entries")]
    TooMany(usize),
    #[error("media sequence numbers overflow")]
    SequenceOverflow,
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("master playlist without a variant stream")]
    NoVariant,
}

/// A parsed playlist.
#[derive(Debug, Clone, PartialEq)]
pub enum Playlist {
    Master(MasterPlaylist),
    Media(MediaPlaylist),
}

/// A master (multivariant) playlist.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MasterPlaylist {
    pub variants: Vec<Variant>,
    /// `GROUP-ID`s of `EXT-X-MEDIA:TYPE=AUDIO` renditions that have their own URI (a
    /// variant in such a group carries its audio in a separate playlist).
    pub audio_groups_with_uri: Vec<String>,
}

/// One `EXT-X-STREAM-INF` entry.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Variant {
    pub uri: String,
    pub bandwidth: u64,
    pub codecs: Option<String>,
    pub resolution: Option<String>,
    pub audio_group: Option<String>,
}

/// A media playlist.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MediaPlaylist {
    /// `EXT-X-TARGETDURATION` in milliseconds.
    pub target_duration_ms: u64,
    /// `EXT-X-MEDIA-SEQUENCE` (sequence number of the first segment).
    pub media_sequence: u64,
    pub segments: Vec<Segment>,
    /// `EXT-X-ENDLIST` present (or `EXT-X-PLAYLIST-TYPE:VOD`).
    pub ended: bool,
}

impl MediaPlaylist {
    /// Sequence number of the segment after the last one (`media_sequence` when empty).
    pub fn end_sequence(&self) -> u64 {
        // Cannot overflow: the parser checked media_sequence + len.
        self.media_sequence
            .saturating_add(self.segments.len() as u64)
    }
}

/// One media segment.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Segment {
    pub seq: u64,
    pub uri: String,
    pub duration_ms: u64,
    /// `EXT-X-DISCONTINUITY` precedes it.
    pub discontinuity: bool,
    /// `EXT-X-GAP`: the segment is absent and must not be fetched.
    pub gap: bool,
    /// The `EXT-X-MAP` URI in effect (fMP4 / init segment), if any.
    pub map: Option<String>,
}

impl MasterPlaylist {
    /// The variant to ingest: among variants whose audio is in the variant itself (no
    /// `AUDIO` group with a separate rendition URI), the highest `BANDWIDTH`; the first
    /// listed wins a tie. If every variant has separate audio, the highest `BANDWIDTH`
    /// of all (its video only will be ingested).
    pub fn choose(&self) -> Option<&Variant> {
        let separate = |v: &Variant| {
            v.audio_group
                .as_ref()
                .is_some_and(|g| self.audio_groups_with_uri.contains(g))
        };
        let best = |muxed_only: bool| {
            let mut best: Option<&Variant> = None;
            for v in &self.variants {
                if muxed_only && separate(v) {
                    continue;
                }
                if best.is_none_or(|b| v.bandwidth > b.bandwidth) {
                    best = Some(v);
                }
            }
            best
        };
        best(true).or_else(|| best(false))
    }
}

/// Parses a playlist. Accepts CRLF, a UTF-8 byte-order mark and surrounding blanks.
pub fn parse(text: &str) -> Result<Playlist, PlaylistError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l.trim()));
    match lines.next() {
        Some((_, l)) if l == "#EXTM3U" || l.starts_with("#EXTM3U ") => {}
        _ => return Err(PlaylistError::NotM3u8),
    }
    let mut master = MasterPlaylist::default();
    let mut media = MediaPlaylist::default();
    let mut target: Option<u64> = None;
    let mut pending_variant: Option<Variant> = None;
    let mut pending_inf: Option<u64> = None;
    let mut pending_disc = false;
    let mut pending_gap = false;
    let mut map: Option<String> = None;
    let mut is_master = false;
    let mut is_media = false;
    for (n, line) in lines {
        if line.is_empty() {
            continue;
        }
        if let Some(tag) = line.strip_prefix('#') {
            if !tag.starts_with("EXT") {
                continue; // a comment
            }
            let (name, value) = tag.split_once(':').unwrap_or((tag, ""));
            match name {
                "EXT-X-STREAM-INF" => {
                    is_master = true;
                    let a = attributes(value, n, "EXT-X-STREAM-INF")?;
                    let bandwidth = match attr(&a, "BANDWIDTH") {
                        Some(b) => b.parse::<u64>().map_err(|e| invalid(n, "BANDWIDTH", e))?,
                        None => 0,
                    };
                    pending_variant = Some(Variant {
                        uri: String::new(),
                        bandwidth,
                        codecs: attr(&a, "CODECS").map(str::to_owned),
                        resolution: attr(&a, "RESOLUTION").map(str::to_owned),
                        audio_group: attr(&a, "AUDIO").map(str::to_owned),
                    });
                }
                "EXT-X-MEDIA" => {
                    is_master = true;
                    let a = attributes(value, n, "EXT-X-MEDIA")?;
                    if attr(&a, "TYPE") == Some("AUDIO")
                        && attr(&a, "URI").is_some()
                        && let Some(g) = attr(&a, "GROUP-ID")
                        && !master.audio_groups_with_uri.iter().any(|x| x == g)
                    {
                        if master.audio_groups_with_uri.len() >= MAX_VARIANTS {
                            return Err(PlaylistError::TooMany(MAX_VARIANTS));
                        }
                        master.audio_groups_with_uri.push(g.to_owned());
                    }
                }
                "EXT-X-TARGETDURATION" => {
                    is_media = true;
                    let t = value
                        .trim()
                        .parse::<u64>()
                        .map_err(|e| invalid(n, "EXT-X-TARGETDURATION", e))?;
                    if t > MAX_DURATION_S {
                        return Err(invalid(n, "EXT-X-TARGETDURATION", "too long"));
                    }
                    target = Some(t * 1000);
                }
                "EXT-X-MEDIA-SEQUENCE" => {
                    is_media = true;
                    media.media_sequence = value
                        .trim()
                        .parse::<u64>()
                        .map_err(|e| invalid(n, "EXT-X-MEDIA-SEQUENCE", e))?;
                }
                "EXTINF" => {
                    is_media = true;
                    let d = value.split(',').next().unwrap_or("").trim();
                    pending_inf = Some(
                        duration_ms(d)
                            .ok_or_else(|| invalid(n, "EXTINF", format!("duration {d:?}")))?,
                    );
                }
                "EXT-X-DISCONTINUITY" => {
                    is_media = true;
                    pending_disc = true;
                }
                "EXT-X-GAP" => {
                    is_media = true;
                    pending_gap = true;
                }
                "EXT-X-ENDLIST" => {
                    is_media = true;
                    media.ended = true;
                }
                "EXT-X-PLAYLIST-TYPE" if value.trim() == "VOD" => media.ended = true,
                "EXT-X-MAP" => {
                    is_media = true;
                    let a = attributes(value, n, "EXT-X-MAP")?;
                    if attr(&a, "BYTERANGE").is_some() {
                        return Err(PlaylistError::Unsupported(
                            "EXT-X-MAP with BYTERANGE".into(),
                        ));
                    }
                    let uri = attr(&a, "URI").ok_or_else(|| invalid(n, "EXT-X-MAP", "no URI"))?;
                    map = Some(check_uri(uri, n)?.to_owned());
                }
                "EXT-X-KEY" => {
                    let a = attributes(value, n, "EXT-X-KEY")?;
                    match attr(&a, "METHOD") {
                        Some("NONE") => {}
                        m => {
                            return Err(PlaylistError::Unsupported(format!(
                                "encrypted segments (EXT-X-KEY METHOD={})",
                                m.unwrap_or("?")
                            )));
                        }
                    }
                }
                "EXT-X-BYTERANGE" => {
                    return Err(PlaylistError::Unsupported(
                        "byte-range segments (EXT-X-BYTERANGE)".into(),
                    ));
                }
                _ => {}
            }
            if is_master && is_media {
                return Err(PlaylistError::Mixed);
            }
            continue;
        }
        // A URI line.
        let uri = check_uri(line, n)?;
        if let Some(mut v) = pending_variant.take() {
            if master.variants.len() >= MAX_VARIANTS {
                return Err(PlaylistError::TooMany(MAX_VARIANTS));
            }
            v.uri = uri.to_owned();
            master.variants.push(v);
        } else if let Some(d) = pending_inf.take() {
            if media.segments.len() >= MAX_SEGMENTS {
                return Err(PlaylistError::TooMany(MAX_SEGMENTS));
            }
            let seq = media
                .media_sequence
                .checked_add(media.segments.len() as u64)
                .ok_or(PlaylistError::SequenceOverflow)?;
            media.segments.push(Segment {
                seq,
                uri: uri.to_owned(),
                duration_ms: d,
                discontinuity: std::mem::take(&mut pending_disc),
                gap: std::mem::take(&mut pending_gap),
                map: map.clone(),
            });
        } else {
            // A URI without EXTINF / STREAM-INF: RFC 8216 requires one; ignore it.
        }
    }
    if is_master {
        if master.variants.is_empty() {
            return Err(PlaylistError::NoVariant);
        }
        return Ok(Playlist::Master(master));
    }
    media.target_duration_ms = target.ok_or(PlaylistError::NoTargetDuration)?;
    media
        .media_sequence
        .checked_add(media.segments.len() as u64)
        .ok_or(PlaylistError::SequenceOverflow)?;
    Ok(Playlist::Media(media))
}

fn invalid(line: usize, tag: &'static str, why: impl ToString) -> PlaylistError {
    PlaylistError::Invalid {
        line,
        tag,
        why: why.to_string(),
    }
}

fn check_uri(uri: &str, line: usize) -> Result<&str, PlaylistError> {
    if uri.len() > MAX_URI {
        return Err(PlaylistError::UriTooLong { line });
    }
    if uri.is_empty() || uri.chars().any(char::is_control) {
        return Err(invalid(line, "URI", "empty or control characters"));
    }
    Ok(uri)
}

/// A decimal number of seconds (`EXTINF`) in ms: finite, not negative, bounded.
fn duration_ms(s: &str) -> Option<u64> {
    let v: f64 = s.parse().ok()?;
    if !v.is_finite() || v < 0.0 || v > MAX_DURATION_S as f64 {
        return None;
    }
    Some((v * 1000.0).round() as u64)
}

/// Parses an attribute list (`KEY=VALUE,KEY="quoted, value"`).
fn attributes<'a>(
    s: &'a str,
    line: usize,
    tag: &'static str,
) -> Result<Vec<(&'a str, &'a str)>, PlaylistError> {
    let mut out = Vec::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            return Err(invalid(
                line,
                tag,
                format!("attribute without '=': {rest:?}"),
            ));
        };
        let key = key.trim();
        let after = after.trim_start();
        let (value, next) = if let Some(q) = after.strip_prefix('"') {
            let Some(end) = q.find('"') else {
                return Err(invalid(line, tag, "unterminated quoted string"));
            };
            (&q[..end], q[end + 1..].trim_start())
        } else {
            match after.find(',') {
                Some(i) => (after[..i].trim(), &after[i..]),
                None => (after.trim(), ""),
            }
        };
        if out.len() >= 64 {
            return Err(invalid(line, tag, "too many attributes"));
        }
        out.push((key, value));
        rest = match next.strip_prefix(',') {
            Some(r) => r.trim_start(),
            None if next.is_empty() => "",
            None => {
                return Err(invalid(
                    line,
                    tag,
                    format!("garbage after a value: {next:?}"),
                ));
            }
        };
    }
    Ok(out)
}

fn attr<'a>(a: &[(&'a str, &'a str)], key: &str) -> Option<&'a str> {
    a.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use proptest::prelude::*;

    fn media(text: &str) -> MediaPlaylist {
        match parse(text).unwrap() {
            Playlist::Media(m) => m,
            other => panic!("not a media playlist: {other:?}"),
        }
    }

    #[test]
    fn ffmpeg_fmp4_live_playlist() {
        let m = media(
            "#EXTM3U\n#EXT-X-VERSION:7\n#EXT-X-TARGETDURATION:1\n#EXT-X-MEDIA-SEQUENCE:17\n\
             #EXT-X-MAP:URI=\"init.mp4\"\n#EXTINF:1.000000,\nlive17.m4s\n#EXTINF:0.960000,\nlive18.m4s\n",
        );
        assert_eq!(m.target_duration_ms, 1000);
        assert_eq!(m.media_sequence, 17);
        assert!(!m.ended);
        assert_eq!(m.end_sequence(), 19);
        assert_eq!(m.segments.len(), 2);
        assert_eq!(m.segments[1].seq, 18);
        assert_eq!(m.segments[1].uri, "live18.m4s");
        assert_eq!(m.segments[1].duration_ms, 960);
        assert_eq!(m.segments[0].map.as_deref(), Some("init.mp4"));
    }

    #[test]
    fn discontinuity_gap_endlist_crlf_and_bom() {
        let m = media(
            "\u{feff}#EXTM3U\r\n#EXT-X-TARGETDURATION:6\r\n# a comment\r\n#EXTINF:6,title\r\na.ts\r\n\
             #EXT-X-DISCONTINUITY\r\n#EXTINF:5.5,\r\nb.ts\r\n#EXT-X-GAP\r\n#EXTINF:6,\r\nc.ts\r\n#EXT-X-ENDLIST\r\n",
        );
        assert_eq!(m.media_sequence, 0);
        assert!(m.ended);
        let flags: Vec<_> = m
            .segments
            .iter()
            .map(|s| (s.seq, s.discontinuity, s.gap))
            .collect();
        assert_eq!(
            flags,
            [(0, false, false), (1, true, false), (2, false, true)]
        );
        assert_eq!(m.segments[1].duration_ms, 5500);
    }

    #[test]
    fn master_playlist_variant_choice() {
        let text = "#EXTM3U\n\
            #EXT-X-MEDIA:TYPE=AUDIO,GROUP-ID=\"aud\",NAME=\"en\",URI=\"audio/en.m3u8\"\n\
            #EXT-X-STREAM-INF:BANDWIDTH=800000,RESOLUTION=640x360,CODECS=\"avc1.4d401e,mp4a.40.2\"\n\
            low/index.m3u8\n\
            #EXT-X-STREAM-INF:BANDWIDTH=5000000,AUDIO=\"aud\"\n\
            hi-separate-audio/index.m3u8\n\
            #EXT-X-STREAM-INF:BANDWIDTH=2000000,CODECS=\"avc1.4d401f,mp4a.40.2\"\n\
            mid/index.m3u8\n\
            #EXT-X-STREAM-INF:BANDWIDTH=2000000\n\
            mid-tie/index.m3u8\n\
            #EXT-X-I-FRAME-STREAM-INF:BANDWIDTH=90000,URI=\"iframes.m3u8\"\n";
        let Playlist::Master(m) = parse(text).unwrap() else {
            panic!("not a master playlist")
        };
        assert_eq!(m.variants.len(), 4);
        assert_eq!(
            m.variants[0].codecs.as_deref(),
            Some("avc1.4d401e,mp4a.40.2")
        );
        assert_eq!(m.choose().unwrap().uri, "mid/index.m3u8");
        // Only separate-audio variants: the highest bandwidth of all.
        let only = MasterPlaylist {
            variants: vec![m.variants[1].clone()],
            audio_groups_with_uri: m.audio_groups_with_uri.clone(),
        };
        assert_eq!(only.choose().unwrap().uri, "hi-separate-audio/index.m3u8");
    }

    #[test]
    fn refusals_are_typed() {
        assert_eq!(parse(""), Err(PlaylistError::NotM3u8));
        assert_eq!(parse("<html>"), Err(PlaylistError::NotM3u8));
        assert_eq!(
            parse("#EXTM3U\n#EXTINF:1,\na.ts\n"),
            Err(PlaylistError::NoTargetDuration)
        );
        assert_eq!(
            parse("#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=1\nv.m3u8\n#EXT-X-TARGETDURATION:2\n"),
            Err(PlaylistError::Mixed)
        );
        assert!(matches!(
            parse("#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXT-X-KEY:METHOD=AES-128,URI=\"k\"\n"),
            Err(PlaylistError::Unsupported(_))
        ));
        assert!(matches!(
            parse("#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXT-X-BYTERANGE:100@0\n"),
            Err(PlaylistError::Unsupported(_))
        ));
        assert!(matches!(
            parse("#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:NaN,\na.ts\n"),
            Err(PlaylistError::Invalid { line: 3, .. })
        ));
        assert!(matches!(
            parse("#EXTM3U\n#EXT-X-TARGETDURATION:99999999\n"),
            Err(PlaylistError::Invalid { .. })
        ));
        assert_eq!(
            parse(&format!(
                "#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXT-X-MEDIA-SEQUENCE:{}\n#EXTINF:1,\na.ts\n#EXTINF:1,\nb.ts\n",
                u64::MAX - 1
            )),
            Err(PlaylistError::SequenceOverflow)
        );
        let long = "x".repeat(MAX_URI + 1);
        assert_eq!(
            parse(&format!(
                "#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:1,\n{long}\n"
            )),
            Err(PlaylistError::UriTooLong { line: 4 })
        );
        assert_eq!(
            parse("#EXTM3U\n#EXT-X-MEDIA:TYPE=AUDIO,GROUP-ID=\"a\",URI=\"a.m3u8\"\n"),
            Err(PlaylistError::NoVariant)
        );
        assert!(matches!(
            parse("#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=\"unterminated\nv.m3u8\n"),
            Err(PlaylistError::Invalid { .. })
        ));
    }

    #[test]
    fn too_many_segments_is_refused() {
        let mut s = String::from("#EXTM3U\n#EXT-X-TARGETDURATION:1\n");
        for i in 0..=MAX_SEGMENTS {
            s.push_str(&format!("#EXTINF:1,\n{i}.ts\n"));
        }
        assert_eq!(parse(&s), Err(PlaylistError::TooMany(MAX_SEGMENTS)));
    }

    fn line() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("#EXTM3U".to_string()),
            Just("#EXT-X-ENDLIST".to_string()),
            Just("#EXT-X-DISCONTINUITY".to_string()),
            Just("#EXT-X-GAP".to_string()),
            "#EXT-X-TARGETDURATION:[0-9]{0,22}",
            "#EXT-X-MEDIA-SEQUENCE:[0-9-]{0,22}",
            "#EXTINF:[0-9.eE+-]{0,12},.{0,5}",
            "#EXT-X-MAP:[A-Z=\",]{0,20}",
            "#EXT-X-STREAM-INF:[A-Z0-9=\",-]{0,40}",
            "#EXT-X-MEDIA:[A-Z=\",-]{0,40}",
            "#EXT-X-KEY:METHOD=[A-Z-]{0,8}",
            "[a-z0-9./]{0,20}",
            ".{0,30}",
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Hostile input: never a panic; whatever parses is internally consistent.
        #[test]
        fn never_panics_and_results_are_consistent(
            lines in proptest::collection::vec(line(), 0..40),
            header in any::<bool>(),
        ) {
            let mut text = if header { "#EXTM3U\n".to_string() } else { String::new() };
            text.push_str(&lines.join("\n"));
            match parse(&text) {
                Ok(Playlist::Media(m)) => {
                    prop_assert!(m.target_duration_ms <= MAX_DURATION_S * 1000);
                    prop_assert!(m.segments.len() <= MAX_SEGMENTS);
                    for (i, s) in m.segments.iter().enumerate() {
                        prop_assert_eq!(s.seq, m.media_sequence + i as u64);
                        prop_assert!(s.duration_ms <= MAX_DURATION_S * 1000);
                        prop_assert!(!s.uri.is_empty() && s.uri.len() <= MAX_URI);
                    }
                }
                Ok(Playlist::Master(m)) => {
                    prop_assert!(!m.variants.is_empty());
                    prop_assert!(m.choose().is_some());
                }
                Err(_) => {}
            }
        }

        /// Arbitrary bytes (lossily decoded) never panic either.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut text = b"#EXTM3U\n".to_vec();
            text.extend_from_slice(&bytes);
            let _ = parse(&String::from_utf8_lossy(&text));
        }
    }
}
