//! Harness errors.

/// Why the harness could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// A component of the deployment did not start.
    #[error("starting the deployment: {0}")]
    Start(String),
    /// An admin API call failed.
    #[error("admin API: {0}")]
    Admin(String),
    /// Bad configuration.
    #[error("configuration: {0}")]
    Config(String),
}
