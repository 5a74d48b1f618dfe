//! Newtypes for secrets: SIP passwords, app keys, token plaintext.
//!
//! They print `[redacted]` in `Debug`, have no `Display`, wipe their memory on drop, and are read
//! only through `expose_secret()`, so every place a secret is used shows up in `grep`.

use std::fmt;

use zeroize::{Zeroize, Zeroizing};

/// A secret string (a SIP password). Never printed, wiped on drop.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretString(Zeroizing<String>);

impl SecretString {
    /// Wraps `s`; the caller should not keep other copies of it.
    pub fn new(s: String) -> Self {
        Self(Zeroizing::new(s))
    }

    /// The secret itself. Keep the use local: never log, format or store it.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Secret bytes (an app key, a derived key). Never printed, wiped on drop.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretBytes(Zeroizing<Vec<u8>>);

impl SecretBytes {
    /// Wraps `b`; the caller should not keep other copies of it.
    pub fn new(b: Vec<u8>) -> Self {
        Self(Zeroizing::new(b))
    }

    /// The secret itself. Keep the use local: never log, format or store it.
    pub fn expose_secret(&self) -> &[u8] {
        &self.0
    }

    /// Length in bytes (not secret).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[redacted {} bytes]", self.0.len())
    }
}

/// Wipes a temporary buffer that held secret material (decrypted token plaintext).
pub(crate) fn wipe(buf: &mut Vec<u8>) {
    buf.zeroize();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_secret() {
        let s = SecretString::new("hunter2".into());
        let b = SecretBytes::new(b"hunter2".to_vec());
        assert_eq!(format!("{s:?}"), "[redacted]");
        assert_eq!(format!("{b:?}"), "[redacted 7 bytes]");
        assert_eq!(s.expose_secret(), "hunter2");
    }
}
