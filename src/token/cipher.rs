//! The two token ciphers. No parsing here: bytes in, bytes out.
//!
//! `ctr`: `AES-CTR(key, iv)` with the app's fixed IV, byte-compatible with
//! `openssl enc -aes-{128,192,256}-ctr -nosalt -K <key> -iv <iv>` (128-bit big-endian counter).
//!
//! `ctr-hmac`: `iv(16) || AES-CTR(k_enc, iv) || HMAC-SHA256(k_mac, app || ":" || iv || ct)(32)`
//! with a random IV per token, where `k_enc = HMAC-SHA256(key, "callgate token v1 encryption")`
//! truncated to the key's length and `k_mac = HMAC-SHA256(key, "callgate token v1 mac")`.
//! The tag is checked (in constant time) before anything is decrypted.

use aes::{Aes128, Aes192, Aes256};
use ctr::cipher::{KeyIvInit, StreamCipher};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::secret::SecretBytes;

/// Length of the per-token IV in `ctr-hmac` (and of the AES block).
pub const IV_LEN: usize = 16;
/// Length of the `ctr-hmac` tag.
pub const TAG_LEN: usize = 32;

const ENC_LABEL: &[u8] = b"callgate token v1 encryption";
const MAC_LABEL: &[u8] = b"callgate token v1 mac";

type HmacSha256 = Hmac<Sha256>;

/// A key length AES does not have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadKeyLength(pub usize);

/// Checks that `len` is an AES key length (16, 24 or 32 bytes).
pub fn check_key_len(len: usize) -> Result<(), BadKeyLength> {
    match len {
        16 | 24 | 32 => Ok(()),
        n => Err(BadKeyLength(n)),
    }
}

/// XORs `data` with the AES-CTR keystream for `key` and `iv` (encrypts and decrypts).
pub fn apply_ctr(key: &[u8], iv: &[u8; IV_LEN], data: &mut [u8]) -> Result<(), BadKeyLength> {
    fn run<C: KeyIvInit + StreamCipher>(
        key: &[u8],
        iv: &[u8; IV_LEN],
        data: &mut [u8],
    ) -> Result<(), BadKeyLength> {
        let mut c = C::new_from_slices(key, iv).map_err(|_| BadKeyLength(key.len()))?;
        c.apply_keystream(data);
        Ok(())
    }
    match key.len() {
        16 => run::<ctr::Ctr128BE<Aes128>>(key, iv, data),
        24 => run::<ctr::Ctr128BE<Aes192>>(key, iv, data),
        32 => run::<ctr::Ctr128BE<Aes256>>(key, iv, data),
        n => Err(BadKeyLength(n)),
    }
}

fn hmac(key: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length; this cannot fail.
    match <HmacSha256 as Mac>::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC accepts keys of any length"),
    }
}

/// The keys one app key yields for `ctr-hmac`.
#[derive(Debug, Clone)]
pub struct DerivedKeys {
    enc: SecretBytes,
    mac: SecretBytes,
}

impl DerivedKeys {
    /// Derives the encryption and MAC keys from an app key (16, 24 or 32 bytes).
    pub fn derive(app_key: &[u8]) -> Result<DerivedKeys, BadKeyLength> {
        check_key_len(app_key.len())?;
        let mut m = hmac(app_key);
        m.update(ENC_LABEL);
        let enc_full = m.finalize().into_bytes();
        let enc = enc_full.get(..app_key.len()).unwrap_or(&enc_full).to_vec();
        let mut m = hmac(app_key);
        m.update(MAC_LABEL);
        let mac = m.finalize().into_bytes().to_vec();
        Ok(DerivedKeys {
            enc: SecretBytes::new(enc),
            mac: SecretBytes::new(mac),
        })
    }

    fn tag_mac(&self, app: &str, iv: &[u8], ct: &[u8]) -> HmacSha256 {
        let mut m = hmac(self.mac.expose_secret());
        m.update(app.as_bytes());
        m.update(b":");
        m.update(iv);
        m.update(ct);
        m
    }

    /// Seals `plaintext` for `app` with `iv`: returns `iv || ct || tag`.
    pub fn seal(&self, app: &str, iv: &[u8; IV_LEN], plaintext: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(IV_LEN + plaintext.len() + TAG_LEN);
        out.extend_from_slice(iv);
        let mut ct = plaintext.to_vec();
        // The derived key has the app key's (checked) length.
        if apply_ctr(self.enc.expose_secret(), iv, &mut ct).is_err() {
            unreachable!("derived keys have a valid AES length");
        }
        let tag = self.tag_mac(app, iv, &ct).finalize().into_bytes();
        out.extend_from_slice(&ct);
        out.extend_from_slice(&tag);
        out
    }

    /// Opens `iv || ct || tag`: `None` when the tag does not verify (or the input is too short).
    pub fn open(&self, app: &str, sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < IV_LEN + TAG_LEN {
            return None;
        }
        let (iv, rest) = sealed.split_at(IV_LEN);
        let (ct, tag) = rest.split_at(rest.len() - TAG_LEN);
        // `verify_slice` compares in constant time.
        self.tag_mac(app, iv, ct).verify_slice(tag).ok()?;
        let iv: &[u8; IV_LEN] = iv.try_into().ok()?;
        let mut pt = ct.to_vec();
        apply_ctr(self.enc.expose_secret(), iv, &mut pt).ok()?;
        Some(pt)
    }
}

/// The tag of a sealed `iv || ct || tag` (all zeros if it is too short to hold one, which
/// [`DerivedKeys::open`] refuses anyway).
pub fn tag_of(sealed: &[u8]) -> [u8; TAG_LEN] {
    sealed
        .len()
        .checked_sub(TAG_LEN)
        .and_then(|start| sealed.get(start..))
        .and_then(|t| <[u8; TAG_LEN]>::try_from(t).ok())
        .unwrap_or([0; TAG_LEN])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NIST SP 800-38A F.5.1 (CTR-AES128.Encrypt), first block.
    #[test]
    fn nist_ctr_vector() {
        let key = hex::decode("2b7e151628aed2a6abf7158809cf4f3c").unwrap_or_default();
        let iv: [u8; 16] = hex::decode("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")
            .unwrap_or_default()
            .try_into()
            .unwrap_or([0; 16]);
        let mut data =
            hex::decode("6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51")
                .unwrap_or_default();
        apply_ctr(&key, &iv, &mut data).unwrap_or_else(|e| panic!("{e:?}"));
        // The second block also checks that the counter carries across all 128 bits.
        assert_eq!(
            hex::encode(&data),
            "874d6191b620e3261bef6864990db6ce9806f66b7970fdff8617187bb9fffdff"
        );
    }

    #[test]
    fn seal_open_round_trip_and_tamper() {
        let keys = DerivedKeys::derive(&[7u8; 32]).unwrap_or_else(|e| panic!("{e:?}"));
        let sealed = keys.seal("crm", &[1; 16], b"<a/>");
        assert_eq!(keys.open("crm", &sealed).as_deref(), Some(&b"<a/>"[..]));
        assert_eq!(
            keys.open("other", &sealed),
            None,
            "the app name is authenticated"
        );
        for i in 0..sealed.len() {
            let mut t = sealed.clone();
            if let Some(b) = t.get_mut(i) {
                *b ^= 0x01;
            }
            assert_eq!(keys.open("crm", &t), None, "flip at byte {i}");
        }
        assert_eq!(keys.open("crm", &sealed[..sealed.len() - 1]), None);
    }

    #[test]
    fn key_lengths() {
        assert!(DerivedKeys::derive(&[0; 16]).is_ok());
        assert!(DerivedKeys::derive(&[0; 24]).is_ok());
        assert_eq!(DerivedKeys::derive(&[0; 20]).err(), Some(BadKeyLength(20)));
        assert_eq!(
            apply_ctr(&[0; 15], &[0; 16], &mut []),
            Err(BadKeyLength(15))
        );
    }
}
