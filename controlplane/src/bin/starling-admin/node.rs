//! `starling-admin node add|revoke|list`: per-node credentials of data-plane nodes.

use clap::Subcommand;
use starling_proto::v1::{
    AddNodeCredentialRequest, ListNodeCredentialsRequest, RevokeNodeCredentialRequest,
};

use crate::client::{ConnArgs, Failure, connect};

/// The `node` subcommands.
#[derive(Debug, Subcommand)]
pub enum NodeCmd {
    /// Make a credential for the data-plane node NAME and print it (once: the control
    /// plane keeps only its hash). Give it to the node (`--node-credential-file`); the
    /// node registers under NAME.
    Add {
        /// The node's name (1..=64 of [A-Za-z0-9._-]).
        name: String,
    },
    /// Revoke NAME's credential: the node can no longer register or report, and its
    /// alive registrations are declared dead at once (their broadcasts move).
    Revoke {
        /// The node's name.
        name: String,
    },
    /// List the node credentials (names, creation, revocation; never secrets).
    List,
}

pub async fn run(conn: &ConnArgs, cmd: &NodeCmd) -> Result<(), Failure> {
    let mut client = connect(conn).await?;
    match cmd {
        NodeCmd::Add { name } => {
            let r = client
                .add_node_credential(AddNodeCredentialRequest { name: name.clone() })
                .await?
                .into_inner();
            println!("{}", r.credential);
        }
        NodeCmd::Revoke { name } => {
            let r = client
                .revoke_node_credential(RevokeNodeCredentialRequest { name: name.clone() })
                .await?
                .into_inner();
            if r.revoked {
                println!("revoked node credential {name}");
            } else {
                println!("no credential in force for node {name}");
            }
        }
        NodeCmd::List => {
            let list = client
                .list_node_credentials(ListNodeCredentialsRequest {})
                .await?
                .into_inner()
                .credentials;
            println!("{:<24} {:<26} REVOKED", "NAME", "CREATED");
            for c in &list {
                println!(
                    "{:<24} {:<26} {}",
                    c.name,
                    crate::when::rfc3339(c.created_at_unix_ms),
                    if c.revoked_at_unix_ms == 0 {
                        "-".to_string()
                    } else {
                        crate::when::rfc3339(c.revoked_at_unix_ms)
                    }
                );
            }
        }
    }
    Ok(())
}
