//! HTTP Digest authentication for SIP (RFC 2617, RFC 7616, RFC 8760), client side. Our own code:
//! `rsip`'s misreads `qop` lists, prints `nc` in decimal, computes MD5-sess as MD5 and does not
//! know `SHA-256`.
//!
//! Sans-IO: the caller supplies the cnonce (random) and keeps the nonce count per nonce.

use md5::Md5;
use sha2::{Digest as _, Sha256};

use crate::secret::SecretString;

/// Hash algorithm of a challenge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// MD5 (the default when absent).
    Md5,
    /// MD5-sess.
    Md5Sess,
    /// SHA-256 (RFC 7616, RFC 8760).
    Sha256,
    /// SHA-256-sess.
    Sha256Sess,
}

impl Algorithm {
    fn parse(s: &str) -> Option<Algorithm> {
        match s.to_ascii_uppercase().as_str() {
            "MD5" => Some(Algorithm::Md5),
            "MD5-SESS" => Some(Algorithm::Md5Sess),
            "SHA-256" | "SHA256" => Some(Algorithm::Sha256),
            "SHA-256-SESS" | "SHA256-SESS" => Some(Algorithm::Sha256Sess),
            _ => None,
        }
    }

    /// The token written in the Authorization header.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Md5 => "MD5",
            Algorithm::Md5Sess => "MD5-sess",
            Algorithm::Sha256 => "SHA-256",
            Algorithm::Sha256Sess => "SHA-256-sess",
        }
    }

    fn strength(self) -> u8 {
        match self {
            Algorithm::Md5 | Algorithm::Md5Sess => 1,
            Algorithm::Sha256 | Algorithm::Sha256Sess => 2,
        }
    }

    fn hash(self, data: &str) -> String {
        match self {
            Algorithm::Md5 | Algorithm::Md5Sess => hex::encode(Md5::digest(data.as_bytes())),
            Algorithm::Sha256 | Algorithm::Sha256Sess => {
                hex::encode(Sha256::digest(data.as_bytes()))
            }
        }
    }

    fn hash_bytes(self, data: &[u8]) -> String {
        match self {
            Algorithm::Md5 | Algorithm::Md5Sess => hex::encode(Md5::digest(data)),
            Algorithm::Sha256 | Algorithm::Sha256Sess => hex::encode(Sha256::digest(data)),
        }
    }

    fn is_sess(self) -> bool {
        matches!(self, Algorithm::Md5Sess | Algorithm::Sha256Sess)
    }
}

/// Quality of protection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qop {
    /// `auth`.
    Auth,
    /// `auth-int` (body integrity).
    AuthInt,
}

/// Which header carried the challenge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChallengeKind {
    /// `WWW-Authenticate` in a 401; answer with `Authorization`.
    Www,
    /// `Proxy-Authenticate` in a 407; answer with `Proxy-Authorization`.
    Proxy,
}

impl ChallengeKind {
    /// The header that answers this kind of challenge.
    pub fn answer_header(self) -> &'static str {
        match self {
            ChallengeKind::Www => "Authorization",
            ChallengeKind::Proxy => "Proxy-Authorization",
        }
    }
}

/// A parsed Digest challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// Which header it came in.
    pub kind: ChallengeKind,
    /// `realm`.
    pub realm: String,
    /// `nonce`.
    pub nonce: String,
    /// `opaque`, echoed back.
    pub opaque: Option<String>,
    /// `algorithm`.
    pub algorithm: Algorithm,
    /// The qop we will use: `auth` if offered, else `auth-int` if offered alone, else none
    /// (RFC 2069 compatibility).
    pub qop: Option<Qop>,
    /// `stale=true`: the nonce expired but our credentials were fine.
    pub stale: bool,
}

/// Splits `k=v, k="v, with comma"` auth-params.
fn auth_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ',' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.trim().is_empty() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'=') {
            chars.next();
            while chars.peek().is_some_and(|c| c.is_whitespace()) {
                chars.next();
            }
            if chars.peek() == Some(&'"') {
                chars.next();
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => {
                            if let Some(n) = chars.next() {
                                value.push(n);
                            }
                        }
                        '"' => break,
                        _ => value.push(c),
                    }
                }
            } else {
                while let Some(&c) = chars.peek() {
                    if c == ',' {
                        break;
                    }
                    value.push(c);
                    chars.next();
                }
            }
        }
        out.push((key.trim().to_ascii_lowercase(), value.trim().to_owned()));
        if chars.peek().is_none() {
            break;
        }
    }
    out
}

impl Challenge {
    /// Parses a `WWW-Authenticate` / `Proxy-Authenticate` value. `None` when it is not a Digest
    /// challenge we can answer (other scheme, unknown algorithm, no nonce, only unknown qops).
    pub fn parse(kind: ChallengeKind, value: &str) -> Option<Challenge> {
        let value = value.trim();
        let (scheme, rest) = value.split_once(char::is_whitespace)?;
        if !scheme.eq_ignore_ascii_case("Digest") {
            return None;
        }
        let mut c = Challenge {
            kind,
            realm: String::new(),
            nonce: String::new(),
            opaque: None,
            algorithm: Algorithm::Md5,
            qop: None,
            stale: false,
        };
        let mut qop_offered: Option<Vec<String>> = None;
        for (k, v) in auth_params(rest) {
            match k.as_str() {
                "realm" => c.realm = v,
                "nonce" => c.nonce = v,
                "opaque" => c.opaque = Some(v),
                "algorithm" => c.algorithm = Algorithm::parse(&v)?,
                "stale" => c.stale = v.eq_ignore_ascii_case("true"),
                "qop" => {
                    qop_offered = Some(
                        v.split(',')
                            .map(|q| q.trim().to_ascii_lowercase())
                            .collect(),
                    )
                }
                _ => {}
            }
        }
        if c.nonce.is_empty() {
            return None;
        }
        c.qop = match qop_offered {
            None => None,
            Some(list) if list.iter().any(|q| q == "auth") => Some(Qop::Auth),
            Some(list) if list.iter().any(|q| q == "auth-int") => Some(Qop::AuthInt),
            Some(_) => return None,
        };
        Some(c)
    }

    /// The strongest challenge we can answer among a response's challenges (RFC 8760 §2.4:
    /// prefer SHA-256 over MD5), keeping the first of equal strength.
    pub fn best(challenges: impl IntoIterator<Item = Challenge>) -> Option<Challenge> {
        let mut best: Option<Challenge> = None;
        for c in challenges {
            if best
                .as_ref()
                .is_none_or(|b| c.algorithm.strength() > b.algorithm.strength())
            {
                best = Some(c);
            }
        }
        best
    }

    /// Every answerable challenge in a 401/407 response.
    pub fn from_response(msg: &super::message::Message) -> Vec<Challenge> {
        let mut out = Vec::new();
        for (kind, header) in [
            (ChallengeKind::Www, "WWW-Authenticate"),
            (ChallengeKind::Proxy, "Proxy-Authenticate"),
        ] {
            out.extend(
                msg.headers(header)
                    .filter_map(|v| Challenge::parse(kind, v)),
            );
        }
        out
    }
}

/// What one Authorization header is computed from.
#[derive(Debug)]
pub struct Answer<'a> {
    /// Digest user name.
    pub username: &'a str,
    /// Password.
    pub password: &'a SecretString,
    /// Request method.
    pub method: &'a str,
    /// digest-uri (the Request-URI).
    pub uri: &'a str,
    /// Request body (for auth-int).
    pub body: &'a [u8],
    /// Client nonce (random, per request).
    pub cnonce: &'a str,
    /// Nonce count for this nonce, starting at 1.
    pub nc: u32,
}

fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

impl Challenge {
    /// The `response` value (lower-case hex).
    pub fn response(&self, a: &Answer<'_>) -> String {
        let alg = self.algorithm;
        let mut ha1 = alg.hash(&format!(
            "{}:{}:{}",
            a.username,
            self.realm,
            a.password.expose_secret()
        ));
        if alg.is_sess() {
            ha1 = alg.hash(&format!("{ha1}:{}:{}", self.nonce, a.cnonce));
        }
        let ha2 = match self.qop {
            Some(Qop::AuthInt) => alg.hash(&format!(
                "{}:{}:{}",
                a.method,
                a.uri,
                alg.hash_bytes(a.body)
            )),
            _ => alg.hash(&format!("{}:{}", a.method, a.uri)),
        };
        match self.qop {
            Some(q) => {
                let q = if q == Qop::Auth { "auth" } else { "auth-int" };
                alg.hash(&format!(
                    "{ha1}:{}:{:08x}:{}:{q}:{ha2}",
                    self.nonce, a.nc, a.cnonce
                ))
            }
            None => alg.hash(&format!("{ha1}:{}:{ha2}", self.nonce)),
        }
    }

    /// The full `Authorization` / `Proxy-Authorization` value. Contains no secret (only the hash).
    pub fn authorization(&self, a: &Answer<'_>) -> String {
        let mut v = format!(
            "Digest username={}, realm={}, nonce={}, uri={}, response=\"{}\", algorithm={}",
            quote(a.username),
            quote(&self.realm),
            quote(&self.nonce),
            quote(a.uri),
            self.response(a),
            self.algorithm.as_str()
        );
        if let Some(q) = self.qop {
            let q = if q == Qop::Auth { "auth" } else { "auth-int" };
            v.push_str(&format!(
                ", qop={q}, nc={:08x}, cnonce={}",
                a.nc,
                quote(a.cnonce)
            ));
        }
        if let Some(o) = &self.opaque {
            v.push_str(&format!(", opaque={}", quote(o)));
        }
        v
    }
}

/// What a server checks of a client's `Authorization` (the demo PBX's registrar): RFC 2617
/// §3.2.2, qop `auth` or none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorization {
    /// `username`.
    pub username: String,
    /// `realm`.
    pub realm: String,
    /// `nonce`.
    pub nonce: String,
    /// `uri`.
    pub uri: String,
    response: String,
    qop: bool,
    nc: u32,
    cnonce: String,
    algorithm: Algorithm,
}

impl Authorization {
    /// Parses a `Digest ...` credentials value; `None` if it is not one we can check.
    pub fn parse(value: &str) -> Option<Authorization> {
        let rest = value.trim().strip_prefix("Digest")?;
        let params = auth_params(rest);
        let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let qop = match get("qop").as_deref() {
            None => false,
            Some(q) if q.eq_ignore_ascii_case("auth") => true,
            Some(_) => return None,
        };
        let algorithm = match get("algorithm") {
            Some(a) => Algorithm::parse(&a)?,
            None => Algorithm::Md5,
        };
        Some(Authorization {
            username: get("username")?,
            realm: get("realm")?,
            nonce: get("nonce")?,
            uri: get("uri")?,
            response: get("response")?.to_ascii_lowercase(),
            qop,
            nc: match get("nc") {
                Some(nc) => u32::from_str_radix(&nc, 16).ok()?,
                None => 1,
            },
            cnonce: get("cnonce").unwrap_or_default(),
            algorithm,
        })
    }

    /// Whether the response is right for `method` and `password` (constant time).
    pub fn verify(&self, method: &str, password: &SecretString) -> bool {
        use subtle::ConstantTimeEq as _;
        let challenge = Challenge {
            kind: ChallengeKind::Www,
            realm: self.realm.clone(),
            nonce: self.nonce.clone(),
            opaque: None,
            algorithm: self.algorithm,
            qop: self.qop.then_some(Qop::Auth),
            stale: false,
        };
        let expected = challenge.response(&Answer {
            username: &self.username,
            password,
            method,
            uri: &self.uri,
            body: b"",
            cnonce: &self.cnonce,
            nc: self.nc,
        });
        expected.as_bytes().ct_eq(self.response.as_bytes()).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer<'a>(pw: &'a SecretString, cnonce: &'a str, body: &'a [u8]) -> Answer<'a> {
        Answer {
            username: "Mufasa",
            password: pw,
            method: "GET",
            uri: "/dir/index.html",
            body,
            cnonce,
            nc: 1,
        }
    }

    /// RFC 2617 §3.5.
    #[test]
    fn rfc2617_example() {
        let c = Challenge::parse(
            ChallengeKind::Www,
            "Digest realm=\"testrealm@host.com\", qop=\"auth,auth-int\", \
             nonce=\"dcd98b7102dd2f0e8b11d0f600bfb0c093\", opaque=\"5ccc069c403ebaf9f0171e9517f40e41\"",
        )
        .unwrap();
        assert_eq!(c.qop, Some(Qop::Auth));
        let pw = SecretString::new("Circle Of Life".into());
        let a = answer(&pw, "0a4f113b", b"");
        assert_eq!(c.response(&a), "6629fae49393a05397450978507c4ef1");
        let h = c.authorization(&a);
        assert!(
            h.contains("nc=00000001") && h.contains("opaque=\"5ccc069c403ebaf9f0171e9517f40e41\""),
            "{h}"
        );
        assert!(!h.contains("Circle"));
    }

    const NONCE: &str = "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v";
    const CNONCE: &str = "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ";

    fn rfc7616(alg: &str, qop: &str) -> String {
        let c = Challenge::parse(
            ChallengeKind::Www,
            &format!(
                "Digest realm=\"http-auth@example.org\", qop=\"{qop}\", algorithm={alg}, nonce=\"{NONCE}\", \
                 opaque=\"FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS\""
            ),
        )
        .unwrap();
        let pw = SecretString::new("Circle of Life".into());
        c.response(&answer(&pw, CNONCE, b"body"))
    }

    /// RFC 7616 §3.9.1 (MD5 and SHA-256), plus the -sess and auth-int variants computed
    /// independently (Python hashlib) from the same inputs.
    #[test]
    fn rfc7616_examples_and_variants() {
        assert_eq!(rfc7616("MD5", "auth"), "8ca523f5e9506fed4657c9700eebdbec");
        assert_eq!(
            rfc7616("SHA-256", "auth"),
            "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"
        );
        assert_eq!(
            rfc7616("MD5", "auth-int"),
            "9aaa3cbaec2406853a7cb784c6813d11"
        );
        assert_eq!(
            rfc7616("SHA-256", "auth-int"),
            "2fa9fd5a55eaefc542900085331c15a0d8dcebeb505811bdd82a5b1f49ae156e"
        );
        assert_eq!(
            rfc7616("MD5-sess", "auth"),
            "e783283f46242139c486a698fec7211d"
        );
        assert_eq!(
            rfc7616("MD5-sess", "auth-int"),
            "a0dd1fdc2cda57809f734f0b1f089e7b"
        );
        assert_eq!(
            rfc7616("SHA-256-sess", "auth"),
            "2fd51b3a77ad75bad6afad6003e818d767133c46d9e2749e7f5232ae1ea3efd7"
        );
        assert_eq!(
            rfc7616("SHA-256-sess", "auth-int"),
            "351cf1de6df8006b29344896ed8e41148d9922c94d1aedab40833924f92d49c2"
        );
    }

    #[test]
    fn no_qop_is_rfc2069() {
        let c = Challenge::parse(
            ChallengeKind::Proxy,
            &format!("Digest realm=\"http-auth@example.org\", nonce=\"{NONCE}\""),
        )
        .unwrap();
        let pw = SecretString::new("Circle of Life".into());
        let a = answer(&pw, CNONCE, b"");
        assert_eq!(c.response(&a), "7b2cc3b30e75b4777ea31027084363fd");
        assert!(!c.authorization(&a).contains("nc="));
        assert_eq!(c.kind.answer_header(), "Proxy-Authorization");
    }

    #[test]
    fn parsing_edge_cases() {
        let c = Challenge::parse(
            ChallengeKind::Www,
            "digest realm=\"a, b\",nonce=abc,stale=TRUE,qop=\"auth-int\"",
        )
        .unwrap();
        assert_eq!(
            (c.realm.as_str(), c.nonce.as_str(), c.stale, c.qop),
            ("a, b", "abc", true, Some(Qop::AuthInt))
        );
        assert!(Challenge::parse(ChallengeKind::Www, "Basic realm=\"x\"").is_none());
        assert!(
            Challenge::parse(
                ChallengeKind::Www,
                "Digest realm=\"x\", nonce=\"n\", algorithm=SHA-512-256"
            )
            .is_none()
        );
        assert!(Challenge::parse(ChallengeKind::Www, "Digest realm=\"x\"").is_none());
        assert!(
            Challenge::parse(
                ChallengeKind::Www,
                "Digest realm=\"x\", nonce=\"n\", qop=\"weird\""
            )
            .is_none()
        );
        assert!(Challenge::parse(ChallengeKind::Www, "Digest nonce=\"unterminated").is_some());
        let best = Challenge::best([
            Challenge::parse(ChallengeKind::Www, "Digest realm=a, nonce=1, algorithm=MD5").unwrap(),
            Challenge::parse(
                ChallengeKind::Www,
                "Digest realm=a, nonce=2, algorithm=SHA-256",
            )
            .unwrap(),
        ])
        .unwrap();
        assert_eq!(best.nonce, "2");
    }

    #[test]
    fn quoting_in_output() {
        let c =
            Challenge::parse(ChallengeKind::Www, r#"Digest realm="we\"ird", nonce="n""#).unwrap();
        assert_eq!(c.realm, "we\"ird");
        let pw = SecretString::new("p".into());
        let h = c.authorization(&answer(&pw, "c", b""));
        assert!(h.contains(r#"realm="we\"ird""#), "{h}");
    }
}
