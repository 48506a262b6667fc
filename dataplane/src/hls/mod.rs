//! HLS (RFC 8216) source support, sans-IO: [`playlist`] parses master and media
//! playlists, [`follower`] decides which segments to fetch and when to reload, [`uri`]
//! resolves segment URIs and recognises HLS sources. The I/O loop that fetches
//! playlists and segments and feeds the chunker is `ingest::hls`.

pub mod follower;
pub mod playlist;
pub mod uri;

pub use follower::{Follower, FollowerConfig, FollowerStats, Job, Update};
pub use playlist::{MasterPlaylist, MediaPlaylist, Playlist, PlaylistError, Segment, Variant};
pub use uri::{is_hls_content_type, is_hls_url, resolve};
