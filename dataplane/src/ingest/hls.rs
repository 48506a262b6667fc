//! The HLS ingest loop (I/O): loads the playlist (a master playlist picks its variant
//! with [`MasterPlaylist::choose`](crate::hls::MasterPlaylist::choose)), hands each
//! media playlist to the sans-IO [`Follower`], fetches the segments it names in order
//! and streams them into the chunker, and reloads when the follower says. MPEG-TS
//! segments (or anything else the chunker sniffs) go through as one continuous stream;
//! with `EXT-X-MAP` the chunker runs in fMP4 mode and gets the init segment first (again
//! after every discontinuity, and when the map changes). `EXT-X-DISCONTINUITY`, missed
//! segments and failed segments end the chunker session (the next chunk is a
//! `DISCONTINUITY`). Every fetch is bounded in size and time; redirects are followed
//! (at most [`MAX_REDIRECTS`]).

use super::{IngestTask, error_chain, http_uri};
use crate::chunker::Chunker;
use crate::error::IngestError;
use crate::hls::{self, Follower, FollowerConfig, Job, MediaPlaylist, Playlist};
use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use std::time::Duration;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// Largest playlist accepted.
pub(super) const MAX_PLAYLIST: usize = 1024 * 1024;
/// Largest `EXT-X-MAP` init segment accepted.
const MAX_INIT: usize = 4 * 1024 * 1024;
/// Largest media segment accepted (streamed into the chunker, never held whole).
const MAX_SEGMENT: usize = 64 * 1024 * 1024;
/// Redirects followed per request.
pub(super) const MAX_REDIRECTS: usize = 5;
/// Consecutive failed segments (or playlist reloads) that end the session.
const MAX_FAILURES: u32 = 3;

/// What survives a reconnect: the follower (so no segment is fetched twice) and its
/// clock origin.
pub(super) struct HlsState {
    follower: Follower,
    epoch: Instant,
}

impl HlsState {
    pub(super) fn new() -> Self {
        HlsState {
            follower: Follower::new(FollowerConfig::default()),
            epoch: Instant::now(),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// Per-session chunker mode: which kind of segments it is set up for, and which init
/// segment it got.
#[derive(Default)]
struct Mode {
    mp4: Option<bool>,
    map: Option<String>,
}

impl IngestTask {
    /// Follows an HLS source until it ends (`Ok`) or fails. `first` is the playlist
    /// already fetched (URL after redirects, body), if any.
    pub(super) async fn hls_session(
        &self,
        first: Option<(String, Bytes)>,
        chunker: &mut Chunker,
        got_data: &mut bool,
        st: &mut HlsState,
    ) -> Result<(), IngestError> {
        let id = &self.spec.broadcast_id;
        let mut load_started = st.now();
        let (mut url, body) = match first {
            Some(f) => f,
            None => {
                self.fetch(&self.spec.source_url, MAX_PLAYLIST, "playlist")
                    .await?
            }
        };
        let mut pl = match hls::playlist::parse(&String::from_utf8_lossy(&body))? {
            Playlist::Media(m) => m,
            Playlist::Master(m) => {
                let v = m.choose().ok_or(hls::PlaylistError::NoVariant)?;
                let separate_audio = v
                    .audio_group
                    .as_ref()
                    .is_some_and(|g| m.audio_groups_with_uri.contains(g));
                let vurl = hls::resolve(&url, &v.uri)
                    .ok_or_else(|| IngestError::BadUrl(format!("variant {}", v.uri)))?;
                info!(broadcast = %id, variant = %vurl, bandwidth = v.bandwidth,
                    codecs = v.codecs.as_deref().unwrap_or("?"), variants = m.variants.len(),
                    "HLS master playlist: following the highest-bandwidth variant");
                if separate_audio {
                    warn!(broadcast = %id, "HLS variant has its audio in a separate rendition: only the variant itself is ingested");
                }
                load_started = st.now();
                let (u, body) = self.fetch(&vurl, MAX_PLAYLIST, "playlist").await?;
                url = u;
                self.media_playlist(&url, &body)?
            }
        };
        info!(broadcast = %id, playlist = %url, target_ms = pl.target_duration_ms,
            segments = pl.segments.len(), fmp4 = pl.segments.iter().any(|s| s.map.is_some()),
            "following HLS media playlist");
        let mut mode = Mode::default();
        let mut seg_failures = 0u32;
        loop {
            let upd = st.follower.on_playlist(load_started, &pl);
            if upd.missed > 0 || upd.restarted {
                let s = st.follower.stats();
                warn!(broadcast = %id, missed = upd.missed, restarted = upd.restarted,
                    missed_total = s.missed, restarts = s.restarts,
                    "HLS segments lost (left the playlist before being fetched, or the origin restarted): discontinuity");
            }
            for job in &upd.jobs {
                match self
                    .hls_job(&url, job, chunker, got_data, &mut mode, st)
                    .await
                {
                    Ok(()) => seg_failures = 0,
                    Err(e) => {
                        seg_failures += 1;
                        warn!(broadcast = %id, seq = job.seq, error = %e, failures = seg_failures,
                            "HLS segment skipped: discontinuity");
                        self.restart_chunker(chunker, None);
                        mode = Mode::default();
                        if seg_failures >= MAX_FAILURES {
                            return Err(e);
                        }
                    }
                }
            }
            if st.follower.ended() {
                info!(broadcast = %id, "HLS playlist ended (EXT-X-ENDLIST)");
                return Ok(());
            }
            // Reload when the follower says; a failed reload is retried after half a
            // target duration, up to MAX_FAILURES times in a row.
            let mut reload_failures = 0u32;
            loop {
                let target = st.follower.target_ms();
                let stale = Duration::from_millis(target * 3).max(self.timeouts.source_idle);
                let unchanged_ms = st
                    .follower
                    .unchanged_since_ms()
                    .map_or(0, |t| st.now().saturating_sub(t));
                if Duration::from_millis(unchanged_ms) > stale {
                    return Err(IngestError::Stale(stale));
                }
                let at = if reload_failures == 0 {
                    st.follower.next_reload_ms().unwrap_or(0)
                } else {
                    st.now() + target / 2
                };
                tokio::time::sleep_until(st.epoch + Duration::from_millis(at)).await;
                load_started = st.now();
                let res = match self.fetch(&url, MAX_PLAYLIST, "playlist").await {
                    Ok((_, body)) => self.media_playlist(&url, &body),
                    Err(e) => Err(e),
                };
                match res {
                    Ok(p) => {
                        pl = p;
                        break;
                    }
                    Err(e) => {
                        reload_failures += 1;
                        warn!(broadcast = %id, error = %e, failures = reload_failures, "HLS playlist reload failed");
                        if reload_failures >= MAX_FAILURES {
                            return Err(e);
                        }
                    }
                }
            }
        }
    }

    fn media_playlist(&self, url: &str, body: &[u8]) -> Result<MediaPlaylist, IngestError> {
        match hls::playlist::parse(&String::from_utf8_lossy(body))? {
            Playlist::Media(m) => Ok(m),
            Playlist::Master(_) => Err(IngestError::NotMediaPlaylist(url.to_owned())),
        }
    }

    /// Fetches one segment (and its init segment when needed) into the chunker.
    async fn hls_job(
        &self,
        playlist_url: &str,
        job: &Job,
        chunker: &mut Chunker,
        got_data: &mut bool,
        mode: &mut Mode,
        st: &HlsState,
    ) -> Result<(), IngestError> {
        let seg_err = |url: &str, e: IngestError| IngestError::Segment {
            seq: job.seq,
            url: url.to_owned(),
            source: Box::new(e),
        };
        let resolve = |uri: &str| {
            hls::resolve(playlist_url, uri).ok_or_else(|| IngestError::BadUrl(uri.to_owned()))
        };
        let url = resolve(&job.uri)?;
        let mp4 = job.map.is_some();
        if job.discontinuity || mode.mp4 != Some(mp4) {
            // MPEG-TS (or sniffed) segments unless there is an init segment.
            self.restart_chunker(chunker, mp4.then_some("video/mp4"));
            *mode = Mode {
                mp4: Some(mp4),
                map: None,
            };
        }
        if let Some(m) = &job.map {
            let map_url = resolve(m)?;
            if mode.map.as_deref() != Some(map_url.as_str()) {
                let (_, init) = self
                    .fetch(&map_url, MAX_INIT, "init segment")
                    .await
                    .map_err(|e| seg_err(&map_url, e))?;
                if mode.map.is_some() {
                    // A new init segment without a discontinuity tag.
                    self.restart_chunker(chunker, Some("video/mp4"));
                }
                debug!(broadcast = %self.spec.broadcast_id, url = %map_url, bytes = init.len(), "HLS init segment");
                self.feed(chunker, &init, got_data);
                mode.map = Some(map_url);
            }
        }
        let deadline = self.timeouts.source_idle
            + Duration::from_millis(2 * job.duration_ms.max(st.follower.target_ms()));
        let fetched = tokio::time::timeout(deadline, async {
            let (_, resp) = self.get(&url).await?;
            let mut body = resp.into_body();
            let mut total = 0usize;
            loop {
                let frame = tokio::time::timeout(self.timeouts.source_idle, body.frame())
                    .await
                    .map_err(|_| IngestError::Idle(self.timeouts.source_idle))?;
                let Some(frame) = frame else { return Ok(total) };
                let frame = frame.map_err(|e| IngestError::Body(error_chain(&e)))?;
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                total += data.len();
                if total > MAX_SEGMENT {
                    return Err(IngestError::TooLarge {
                        what: "segment",
                        limit: MAX_SEGMENT,
                    });
                }
                self.feed(chunker, &data, got_data);
            }
        })
        .await
        .unwrap_or(Err(IngestError::Idle(deadline)))
        .map_err(|e| seg_err(&url, e))?;
        debug!(broadcast = %self.spec.broadcast_id, seq = job.seq, bytes = fetched, "HLS segment");
        Ok(())
    }

    /// GET with redirects; the final URL and a `200 OK` response.
    async fn get(&self, url: &str) -> Result<(String, hyper::Response<Incoming>), IngestError> {
        let mut url = url.to_owned();
        for _ in 0..=MAX_REDIRECTS {
            let req = hyper::Request::get(http_uri(&url)?)
                .header(hyper::header::USER_AGENT, "starling-dataplane/0.1")
                .header(hyper::header::ACCEPT, "*/*")
                .body(Empty::<Bytes>::new())
                .map_err(|e| IngestError::BadUrl(e.to_string()))?;
            let resp =
                tokio::time::timeout(self.timeouts.source_connect * 2, self.client.request(req))
                    .await
                    .map_err(|_| IngestError::HeadTimeout)?
                    .map_err(|e| IngestError::Request(error_chain(&e)))?;
            let status = resp.status();
            if status.is_redirection()
                && let Some(loc) = resp
                    .headers()
                    .get(hyper::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
            {
                url = hls::resolve(&url, loc)
                    .ok_or_else(|| IngestError::BadUrl(format!("redirect to {loc}")))?;
                continue;
            }
            if status != hyper::StatusCode::OK {
                return Err(IngestError::Status(status.as_u16()));
            }
            return Ok((url, resp));
        }
        Err(IngestError::TooManyRedirects(MAX_REDIRECTS))
    }

    /// GET a whole (bounded) body: the final URL and the bytes.
    async fn fetch(
        &self,
        url: &str,
        limit: usize,
        what: &'static str,
    ) -> Result<(String, Bytes), IngestError> {
        let (url, resp) = self.get(url).await?;
        let body = self.read_body(resp, limit, what).await?;
        Ok((url, body))
    }

    /// Reads a whole body, at most `limit` bytes, each frame within `source_idle`.
    pub(super) async fn read_body(
        &self,
        resp: hyper::Response<Incoming>,
        limit: usize,
        what: &'static str,
    ) -> Result<Bytes, IngestError> {
        let too_large = IngestError::TooLarge { what, limit };
        let declared = resp
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(too_large);
        }
        let mut body = resp.into_body();
        let mut buf = BytesMut::new();
        loop {
            let frame = tokio::time::timeout(self.timeouts.source_idle, body.frame())
                .await
                .map_err(|_| IngestError::Idle(self.timeouts.source_idle))?;
            let Some(frame) = frame else {
                return Ok(buf.freeze());
            };
            let frame = frame.map_err(|e| IngestError::Body(error_chain(&e)))?;
            if let Ok(data) = frame.into_data() {
                if buf.len() + data.len() > limit {
                    return Err(too_large);
                }
                buf.extend_from_slice(&data);
            }
        }
    }
}
