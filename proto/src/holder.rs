//! Proof of possession for chunk tokens ("bound tokens").
//!
//! A viewer generates an Ed25519 key pair per session ([`HolderKey`]) and sends its
//! public half in `JoinRequest.holder_key`; the control plane writes it into every chunk
//! token it issues for that session (`token::TokenClaims::holder_key`). A token alone
//! is then worth nothing on a link: whoever verifies a token (the data plane, a relay
//! on its peer listener) sends a fresh random nonce in `HELLO_ACK`, and the presenter
//! answers with a `PROOF` frame, the signature of
//!
//! ```text
//! "starling/link-proof/v2\0" | nonce [32] | SHA-256(token from HELLO) [32]
//!   | verifier_kind u8 (1 = data plane, 2 = peer) | verifier_peer_id u64 (0 for the data plane)
//! ```
//!
//! with the key the token names. The verifier's identity is what the *presenter*
//! believes it is talking to (the data plane it was sent to, the peer id the control
//! plane named), so a relay that collects its children's tokens can neither present
//! them elsewhere (it lacks the key) nor have a child sign a challenge it relays from
//! another verifier (the child signs for the relay's peer id, not for the data plane
//! or a third peer). Byte layouts in `docs/PROTOCOL.md`, "Proof of possession".

use ring::digest::{SHA256, digest};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

/// Length of a holder public key.
pub const HOLDER_KEY_LEN: usize = 32;
/// Length of a verifier's nonce.
pub const NONCE_LEN: usize = 32;
/// Length of a proof (an Ed25519 signature).
pub const PROOF_LEN: usize = crate::ed25519::SIGNATURE_LEN;
/// Domain-separation prefix of the signed message (not on the wire).
pub const PROOF_CONTEXT: &[u8] = b"starling/link-proof/v2\0";

/// Who verifies the proof, as the presenter knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verifier {
    /// A data-plane node (the one `Join` named).
    DataPlane,
    /// A relaying peer, by its peer id in the grid.
    Peer(u64),
}

impl Verifier {
    fn encode(self) -> [u8; 9] {
        let (kind, id) = match self {
            Verifier::DataPlane => (1u8, 0u64),
            Verifier::Peer(id) => (2u8, id),
        };
        let mut out = [0u8; 9];
        out[0] = kind;
        out[1..].copy_from_slice(&id.to_be_bytes());
        out
    }
}

/// Why a proof is refused (or cannot be made).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    /// The token names a key the proof was not made with, or the proof is over another
    /// nonce, token or verifier.
    #[error("proof of possession is not valid for this token, nonce and verifier")]
    BadProof,
    /// No `PROOF` frame was sent before it was needed.
    #[error("a proof of possession of the token's key is required")]
    Missing,
    /// The presented proof is not [`PROOF_LEN`] bytes.
    #[error("proof has the wrong length")]
    Malformed,
    /// The system random generator failed.
    #[error("no randomness available")]
    Random,
}

/// A fresh random nonce for one handshake.
pub fn new_nonce() -> Result<[u8; NONCE_LEN], ProofError> {
    let mut n = [0u8; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut n)
        .map_err(|_| ProofError::Random)?;
    Ok(n)
}

/// The signed message of a proof.
fn message(nonce: &[u8; NONCE_LEN], token: &[u8], verifier: Verifier) -> [u8; 96] {
    const N: usize = PROOF_CONTEXT.len() + NONCE_LEN + 32 + 9;
    const { assert!(N == 96) };
    let mut m = [0u8; N];
    let mut at = 0;
    for part in [
        PROOF_CONTEXT,
        &nonce[..],
        digest(&SHA256, token).as_ref(),
        &verifier.encode()[..],
    ] {
        m[at..at + part.len()].copy_from_slice(part);
        at += part.len();
    }
    m
}

/// A viewer's per-session key pair, whose public half its chunk tokens name.
pub struct HolderKey {
    key: Ed25519KeyPair,
}

impl std::fmt::Debug for HolderKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HolderKey({:02x?}..)", &self.public_key()[..4])
    }
}

impl HolderKey {
    /// A fresh key pair from the system random generator.
    pub fn generate() -> Result<HolderKey, ProofError> {
        let rng = SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| ProofError::Random)?;
        let key = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|_| ProofError::Random)?;
        Ok(HolderKey { key })
    }

    /// A key pair from a 32-byte seed (deterministic: tests and simulations only).
    pub fn from_seed(seed: &[u8; 32]) -> Result<HolderKey, ProofError> {
        let key = Ed25519KeyPair::from_seed_unchecked(seed).map_err(|_| ProofError::Random)?;
        Ok(HolderKey { key })
    }

    /// The public key to send in `JoinRequest.holder_key`.
    pub fn public_key(&self) -> [u8; HOLDER_KEY_LEN] {
        let mut out = [0u8; HOLDER_KEY_LEN];
        out.copy_from_slice(self.key.public_key().as_ref());
        out
    }

    /// The `PROOF` for `token` on a link to `verifier` that sent `nonce`.
    pub fn prove(
        &self,
        nonce: &[u8; NONCE_LEN],
        token: &[u8],
        verifier: Verifier,
    ) -> [u8; PROOF_LEN] {
        let mut out = [0u8; PROOF_LEN];
        out.copy_from_slice(self.key.sign(&message(nonce, token, verifier)).as_ref());
        out
    }
}

/// Checks a `PROOF`: made with `holder_key` (from the verified token) over `nonce` (the
/// one this verifier sent), `token` (the one presented in `HELLO`) and `verifier` (us).
pub fn verify(
    holder_key: &[u8; HOLDER_KEY_LEN],
    nonce: &[u8; NONCE_LEN],
    token: &[u8],
    verifier: Verifier,
    proof: &[u8],
) -> Result<(), ProofError> {
    if proof.len() != PROOF_LEN {
        return Err(ProofError::Malformed);
    }
    UnparsedPublicKey::new(&ED25519, holder_key)
        .verify(&message(nonce, token, verifier), proof)
        .map_err(|_| ProofError::BadProof)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_proof_verifies_only_for_its_key_nonce_token_and_verifier() {
        let k = HolderKey::generate().unwrap();
        let other = HolderKey::generate().unwrap();
        let n = new_nonce().unwrap();
        let n2 = new_nonce().unwrap();
        assert_ne!(n, n2);
        let pk = k.public_key();
        let p = k.prove(&n, b"token", Verifier::Peer(7));
        assert_eq!(verify(&pk, &n, b"token", Verifier::Peer(7), &p), Ok(()));
        for (key, nonce, token, v) in [
            (other.public_key(), n, &b"token"[..], Verifier::Peer(7)),
            (pk, n2, b"token", Verifier::Peer(7)),
            (pk, n, b"tokeN", Verifier::Peer(7)),
            (pk, n, b"token", Verifier::Peer(8)),
            (pk, n, b"token", Verifier::DataPlane),
        ] {
            assert_eq!(
                verify(&key, &nonce, token, v, &p),
                Err(ProofError::BadProof)
            );
        }
        assert_eq!(
            verify(&pk, &n, b"token", Verifier::Peer(7), &p[..63]),
            Err(ProofError::Malformed)
        );
        // Deterministic keys for simulations.
        let s = HolderKey::from_seed(&[5; 32]).unwrap();
        assert_eq!(
            s.public_key(),
            HolderKey::from_seed(&[5; 32]).unwrap().public_key()
        );
        assert!(format!("{s:?}").starts_with("HolderKey("));
    }

    /// Prints the cost of one proof on each side (`cargo test -p starling-proto --lib
    /// -- --ignored --nocapture proof_cost`).
    #[test]
    #[ignore]
    fn proof_cost() {
        let k = HolderKey::generate().unwrap();
        let pk = k.public_key();
        let n = new_nonce().unwrap();
        let token = [7u8; 200];
        let rounds = 5_000u32;
        let t = std::time::Instant::now();
        for _ in 0..rounds {
            std::hint::black_box(HolderKey::generate().unwrap());
        }
        let keygen = t.elapsed() / rounds;
        let t = std::time::Instant::now();
        let mut p = [0u8; PROOF_LEN];
        for _ in 0..rounds {
            p = k.prove(&n, std::hint::black_box(&token), Verifier::DataPlane);
        }
        let prove = t.elapsed() / rounds;
        let t = std::time::Instant::now();
        for _ in 0..rounds {
            verify(
                &pk,
                &n,
                std::hint::black_box(&token),
                Verifier::DataPlane,
                &p,
            )
            .unwrap();
        }
        let check = t.elapsed() / rounds;
        println!(
            "holder key {keygen:?}, prove {prove:?}, verify {check:?} (this build's opt level)"
        );
    }
}
