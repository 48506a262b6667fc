//! Pieces shared by the two signed formats ([`crate::token`] and [`crate::integrity`]):
//! a trusted key set with a size cap, the common envelope layout
//! (`version u8 | fixed fields | id_len u8 | id | signature[64]`) and big-endian reads.

use std::collections::HashMap;

use ring::signature::{ED25519, UnparsedPublicKey};

/// Problems with key material (construction and key-set management only).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("invalid Ed25519 private key (PKCS#8 v1/v2 expected)")]
    InvalidPrivateKey,
    #[error("invalid Ed25519 public key (32 raw bytes expected)")]
    InvalidPublicKey,
    #[error("too many keys (at most {0})")]
    TooManyKeys(usize),
    #[error("key generation failed")]
    Generation,
}

/// Length of every Ed25519 signature.
pub(crate) const SIGNATURE_LEN: usize = 64;

/// Public keys trusted by a verifier, by key id (several at once, for rotation).
#[derive(Debug, Clone, Default)]
pub(crate) struct KeySet {
    keys: HashMap<u32, UnparsedPublicKey<[u8; 32]>>,
}

impl KeySet {
    /// Trusts `public_key` (32 raw bytes) under `key_id`, replacing any key with that
    /// id; at most `max` keys.
    pub(crate) fn add(
        &mut self,
        key_id: u32,
        public_key: &[u8],
        max: usize,
    ) -> Result<(), KeyError> {
        let key: [u8; 32] = public_key
            .try_into()
            .map_err(|_| KeyError::InvalidPublicKey)?;
        if !self.keys.contains_key(&key_id) && self.keys.len() >= max {
            return Err(KeyError::TooManyKeys(max));
        }
        self.keys
            .insert(key_id, UnparsedPublicKey::new(&ED25519, key));
        Ok(())
    }

    pub(crate) fn remove(&mut self, key_id: u32) -> bool {
        self.keys.remove(&key_id).is_some()
    }

    pub(crate) fn get(&self, key_id: u32) -> Option<&UnparsedPublicKey<[u8; 32]>> {
        self.keys.get(&key_id)
    }

    pub(crate) fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.keys.keys().copied()
    }
}

/// Structural problems of an envelope, mapped by each format to its own error type.
pub(crate) enum EnvelopeError {
    Oversized,
    Truncated,
    UnsupportedVersion(u8),
    Malformed(&'static str),
}

/// Checks the envelope of `buf`: at most `max_len` bytes, first byte `version`, the
/// id length at `fixed_len - 1` (1..=`max_id`), and exactly `fixed_len + id_len + 64`
/// bytes. Returns `fixed_len + id_len`, where the signature starts.
pub(crate) fn check_envelope(
    buf: &[u8],
    max_len: usize,
    version: u8,
    fixed_len: usize,
    max_id: usize,
) -> Result<usize, EnvelopeError> {
    check_envelope_with_tail(buf, max_len, version, fixed_len, max_id, SIGNATURE_LEN)
}

/// [`check_envelope`] for a layout that ends in `tail_len` bytes of authenticator
/// instead of an Ed25519 signature (the MAC of a version-2 parent ticket).
pub(crate) fn check_envelope_with_tail(
    buf: &[u8],
    max_len: usize,
    version: u8,
    fixed_len: usize,
    max_id: usize,
    tail_len: usize,
) -> Result<usize, EnvelopeError> {
    if buf.len() > max_len {
        return Err(EnvelopeError::Oversized);
    }
    let Some(&v) = buf.first() else {
        return Err(EnvelopeError::Truncated);
    };
    if v != version {
        return Err(EnvelopeError::UnsupportedVersion(v));
    }
    if buf.len() < fixed_len {
        return Err(EnvelopeError::Truncated);
    }
    let id_len = usize::from(buf[fixed_len - 1]);
    if id_len == 0 {
        return Err(EnvelopeError::Malformed("empty broadcast id"));
    }
    if id_len > max_id {
        return Err(EnvelopeError::Malformed("broadcast id too long"));
    }
    let body_len = fixed_len + id_len;
    let total = body_len + tail_len;
    if buf.len() < total {
        return Err(EnvelopeError::Truncated);
    }
    if buf.len() > total {
        return Err(EnvelopeError::Malformed("trailing bytes"));
    }
    Ok(body_len)
}

/// Big-endian u32 at `at`; the caller has checked the length.
pub(crate) fn be_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

/// Big-endian u64 at `at`; the caller has checked the length.
pub(crate) fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}
