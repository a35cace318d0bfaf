//! Typed messages: what may travel between the primary and its workers.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// A type that can travel over the cluster channel.
///
/// Derive it with `#[cluster::message]` on the type's definition: that adds the serde derives
/// and a fingerprint of the definition, which the handshake between primary and worker compares
/// so that a worker built from other message types is refused instead of misreading bytes.
/// `()` is the message type of a direction that carries none.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a cluster message",
    label = "this type has no `#[cluster::message]`",
    note = "add `#[cluster::message]` to the definition of `{Self}`"
)]
pub trait Message: Serialize + DeserializeOwned + Send + 'static {
    /// A hash of the type's definition; it changes when the definition does.
    const FINGERPRINT: u64;
}

impl Message for () {
    const FINGERPRINT: u64 = 0;
}

/// FNV-1a, for fingerprints computed at compile time by the macro and at run time here.
pub(crate) const fn fnv1a(bytes: &[u8], mut hash: u64) -> u64 {
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

/// The offset basis of FNV-1a.
pub(crate) const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// The fingerprint of a pair of message types, as exchanged in the handshake.
pub(crate) fn pair_fingerprint<P: Message, W: Message>() -> u64 {
    let mut h = fnv1a(&P::FINGERPRINT.to_le_bytes(), FNV_OFFSET);
    h = fnv1a(&W::FINGERPRINT.to_le_bytes(), h);
    h
}
