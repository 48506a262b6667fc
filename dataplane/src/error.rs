//! Errors of the data-plane library.

use std::net::SocketAddr;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "no work: give --control-url (or STARLING_CONTROL_URL) and/or at least one --static-broadcast ID=URL"
    )]
    NothingToDo,
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot start executor {index}: {source}")]
    Executor {
        index: usize,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot start the tokio runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("a data-plane thread ended unexpectedly: {0}")]
    Thread(String),
}

/// Why an ingest session ended (reported as the source error string).
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("invalid source URL: {0}")]
    BadUrl(String),
    #[error("connect/request failed: {0}")]
    Request(String),
    #[error("timed out waiting for the response head")]
    HeadTimeout,
    #[error("source answered HTTP {0}")]
    Status(u16),
    #[error("source sent nothing for {0:?}")]
    Idle(std::time::Duration),
    #[error("source body error: {0}")]
    Body(String),
    #[error("source ended the stream")]
    Eof,
    #[error("invalid HLS playlist: {0}")]
    Playlist(#[from] crate::hls::PlaylistError),
    #[error("HLS variant {0} is not a media playlist")]
    NotMediaPlaylist(String),
    #[error("{what} larger than {limit} bytes")]
    TooLarge { what: &'static str, limit: usize },
    #[error("more than {0} redirects")]
    TooManyRedirects(usize),
    #[error("HLS playlist has not changed for {0:?}")]
    Stale(std::time::Duration),
    #[error("HLS segment {seq} ({url}): {source}")]
    Segment {
        seq: u64,
        url: String,
        #[source]
        source: Box<IngestError>,
    },
}
