//! Access tokens for the chat endpoint: JWT (RFC 7519) verification (HS256,
//! RS256, ES256) and HS256 minting.
//!
//! A token is a JWS in compact form (RFC 7515 §7.1):
//! `b64(header) "." b64(payload) "." b64(signature over b64(header) "." b64(payload))`,
//! where `b64` is base64url; the signature is HMAC-SHA256 with the shared secret
//! (HS256), RSASSA-PKCS1-v1_5 with SHA-256 (RS256) or ECDSA P-256 with SHA-256 in
//! its fixed 64-byte form (ES256), the last two with a public key ([`keys`]).
//!
//! # Decisions
//! - Hand-written, on `hmac` and `ring` for the cryptography. A JWT library would
//!   bring its own claim validation, error kinds and key types; what the gateway
//!   promises (one close code and reason per failure, `crit` refused, one spelling per
//!   token, the size bound, claims that must have their type) lives in this file, in a
//!   few hundred lines with their tests. The signature math is not written here:
//!   `hmac` for HS256 and `ring` (already the TLS provider's) for RS256 and ES256.
//! - The verifier fixes the algorithms; the token does not choose a key's (RFC 8725
//!   §3.1). `alg` must be exactly `"HS256"` when a secret is configured, or `"RS256"` /
//!   `"ES256"` when a public key of that kind is: a missing `alg`, `"none"`, `"HS512"`
//!   or `"hs256"` is refused, and an RS256 token is never checked against the HMAC
//!   secret (no algorithm confusion).
//! - A token's `kid` picks among the public keys: a key with a `kid` answers only
//!   tokens naming it; a key without one answers any. A token whose `kid` names no
//!   key is [`AuthError::UnknownKey`] (the issuer rotated: reload the keys).
//! - base64url without padding, as RFC 7515 §2 requires. A `=` or a non-canonical last
//!   symbol is `Malformed`, so a token has one spelling only and a signature cannot be
//!   re-spelled to dodge a deny list keyed on the token text.
//! - The signature is checked in constant time (`Mac::verify_slice`) before the payload
//!   is decoded: bytes nobody signed never reach the claims parser. The header is
//!   parsed first, as it must be to read `alg`; it is a few dozen bytes.
//! - A header listing `crit` extensions is refused (RFC 7515 §4.1.11): we implement none.
//! - Header and payload must be JSON objects. A repeated member name is `Malformed`
//!   (RFC 7515 §5.2 lets us choose; refusing leaves no room for two parsers to disagree).
//! - A claim that is present must have its type: `"exp": null` or `"rooms": null` is
//!   `Malformed`, not "absent", because absent means "no expiry" and "any room".
//! - NumericDates may be integers or decimals; decimals are floored. Negative dates
//!   are `Malformed`.
//! - `sub` is used as a map key and in frames, so it must be 1 to
//!   [`MAX_SUBJECT_BYTES`] bytes with no control characters.
//!
//! # Invariants
//! - [`Verifier`] holds the HMAC state already keyed with the secret, so `verify` hashes
//!   only the token, and a handle on the public keys that a reload replaces whole (one
//!   atomic load per token, no lock). It is `Send + Sync` and cheap to clone into
//!   each shard.
//! - `verify` never blocks, never panics, and looks at nothing but the length of a token
//!   over [`MAX_TOKEN_BYTES`].
#![forbid(unsafe_code)]

use std::fmt;

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use hmac::{Hmac, Mac};
use serde::{
    de::{self, IgnoredAny, Unexpected, Visitor},
    Deserialize, Deserializer, Serialize,
};
use sha2::Sha256;

pub mod keys;
pub use keys::{Alg, KeySet, Keys};

type HmacSha256 = Hmac<Sha256>;

/// Longest token `verify` will look at. Real tokens are a few hundred bytes; the bound
/// stops a client from making the gateway decode and parse megabytes per handshake.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Longest accepted `sub`. User ids are map keys and travel in every frame.
pub const MAX_SUBJECT_BYTES: usize = 128;

/// Shortest secret worth using: HS256 needs a key of at least 256 bits (RFC 7518 §3.2).
/// [`Verifier::new`] accepts any length; configuration should refuse shorter secrets.
pub const MIN_SECRET_BYTES: usize = 32;

/// HMAC-SHA256 output length.
const SIGNATURE_BYTES: usize = 32;

/// base64url of `{"alg":"HS256","typ":"JWT"}`, the header of every minted token.
const MINTED_HEADER_B64: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9";

/// The claims the gateway reads. Other claims in a token are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user id: who is connecting. Required, 1 to [`MAX_SUBJECT_BYTES`] bytes, no
    /// control characters.
    #[serde(default)]
    pub sub: String,
    /// Expiry, Unix seconds. The token is refused once `exp <= now - leeway`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "numeric_date"
    )]
    pub exp: Option<u64>,
    /// Not-before, Unix seconds. The token is refused while `nbf > now + leeway`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "numeric_date"
    )]
    pub nbf: Option<u64>,
    /// Issued-at, Unix seconds. Carried for logs; not checked.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "numeric_date"
    )]
    pub iat: Option<u64>,
    /// Room patterns the user may join; absent means any room. See [`Claims::may_join`].
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "string_array"
    )]
    pub rooms: Option<Vec<String>>,
    /// Room patterns the user may publish to; absent means every room it may join.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "string_array"
    )]
    pub publish: Option<Vec<String>>,
}

impl Claims {
    /// May this user join `room`? `rooms` absent means any room. A pattern is an exact
    /// room name, a prefix ending in `*` (`"team-*"` matches `"team-"` and
    /// `"team-red"`), or `"*"` for every room. Only a final `*` is special.
    pub fn may_join(&self, room: &str) -> bool {
        self.rooms
            .as_deref()
            .is_none_or(|patterns| matches_any(patterns, room))
    }

    /// May this user publish to `room`? It must be allowed to join `room`, and, when
    /// `publish` is present, `room` must also match one of its patterns.
    pub fn may_publish(&self, room: &str) -> bool {
        self.may_join(room)
            && self
                .publish
                .as_deref()
                .is_none_or(|patterns| matches_any(patterns, room))
    }
}

fn matches_any(patterns: &[String], room: &str) -> bool {
    patterns
        .iter()
        .any(|pattern| match pattern.strip_suffix('*') {
            Some(prefix) => room.starts_with(prefix),
            None => pattern == room,
        })
}

/// Why a token was refused. `Display` is for logs and says what to do; [`reason`]
/// is the short form for a WebSocket close frame.
///
/// [`reason`]: AuthError::reason
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token was presented.
    #[error("no access token presented (log in and reconnect with a token)")]
    Missing,
    /// Not three base64url parts, padded, over [`MAX_TOKEN_BYTES`], header or payload
    /// not a JSON object, or a claim of the wrong type.
    #[error(
        "access token is not a well-formed JWT: it needs three unpadded base64url parts, \
         JSON object header and payload, claims of the right types, and at most 8 KiB \
         (re-mint it with a JWT library)"
    )]
    Malformed,
    /// `alg` is missing, or is not one this gateway has a key for (`"HS256"` with a
    /// secret, `"RS256"`/`"ES256"` with public keys).
    #[error(
        "access token is signed with an algorithm this gateway has no key for (HS256 \
         needs --jwt-secret, RS256 and ES256 need --jwt-public-key or --jwt-jwks)"
    )]
    UnsupportedAlgorithm,
    /// The token's `kid` names none of the gateway's public keys.
    #[error(
        "access token names a key (kid) this gateway does not have (if the issuer \
         rotated its keys, update the gateway's --jwt-jwks file and send it SIGHUP)"
    )]
    UnknownKey,
    /// The header lists `crit` extensions, none of which this gateway implements
    /// (RFC 7515 §4.1.11).
    #[error(
        "access token header lists critical extensions (\"crit\") this gateway does not \
         implement (re-mint the token without \"crit\")"
    )]
    UnsupportedCriticalHeader,
    /// The signature does not match: the token was altered or signed with another secret.
    #[error(
        "access token signature does not match (the token was altered, or the issuer \
         signs with a different secret than the gateway's: check they agree)"
    )]
    BadSignature,
    /// `exp` is past, beyond the leeway.
    #[error(
        "access token expired (log in again for a fresh one; if it was just issued, \
         check the issuer's and the gateway's clocks)"
    )]
    Expired,
    /// `nbf` is in the future, beyond the leeway.
    #[error(
        "access token is not valid yet: its nbf is in the future (check the issuer's \
         clock, or raise the gateway's clock leeway)"
    )]
    NotYetValid,
    /// `sub` is absent or empty.
    #[error("access token has no subject (the issuer must put the user id in \"sub\")")]
    MissingSubject,
    /// `sub` is over [`MAX_SUBJECT_BYTES`] bytes or holds control characters.
    #[error(
        "access token subject is over 128 bytes or holds control characters (the issuer \
         must use a shorter, printable user id in \"sub\")"
    )]
    InvalidSubject,
}

impl AuthError {
    /// A short reason for the close frame (at most 123 bytes) that says what to do.
    pub fn reason(self) -> &'static str {
        match self {
            AuthError::Missing => "token required: log in and reconnect",
            AuthError::Malformed => "malformed token: log in again",
            AuthError::UnsupportedAlgorithm => "token signed with an algorithm not accepted here",
            AuthError::UnknownKey => "token signed with an unknown key (kid)",
            AuthError::UnsupportedCriticalHeader => "token has unsupported crit header",
            AuthError::BadSignature => "bad token signature: log in again",
            AuthError::Expired => "token expired: log in again",
            AuthError::NotYetValid => "token not yet valid: check your clock",
            AuthError::MissingSubject => "token has no sub: log in again",
            AuthError::InvalidSubject => "token sub too long or not printable",
        }
    }
}

/// Checks tokens against a shared secret (HS256), public keys (RS256, ES256), or both.
#[derive(Clone)]
pub struct Verifier {
    /// HMAC state after absorbing the padded key, cloned per token so the key is not
    /// rehashed on every handshake; `None`: HS256 tokens are refused.
    keyed: Option<HmacSha256>,
    /// The public keys, shared with whoever reloads them; `None`: RS256 and ES256
    /// tokens are refused.
    keys: Option<Keys>,
    /// Clock skew forgiven on `exp` and `nbf`, in seconds. Without it a token minted on a
    /// host whose clock runs slightly ahead is refused as not yet valid.
    leeway_s: u64,
}

impl fmt::Debug for Verifier {
    // Hand-written so the keyed state never reaches a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("hs256", &self.keyed.is_some())
            .field("keys", &self.keys)
            .field("leeway_s", &self.leeway_s)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier for tokens signed with `secret`, forgiving `leeway_s` seconds of clock
    /// skew. Any secret length works; see [`MIN_SECRET_BYTES`] for the one to require.
    pub fn new(secret: &[u8], leeway_s: u64) -> Verifier {
        Verifier {
            keyed: Some(keyed(secret)),
            keys: None,
            leeway_s,
        }
    }

    /// A verifier for RS256 and ES256 tokens signed by one of `keys` (and, with
    /// [`Verifier::and_secret`], HS256 tokens too).
    pub fn with_keys(keys: Keys, leeway_s: u64) -> Verifier {
        Verifier {
            keyed: None,
            keys: Some(keys),
            leeway_s,
        }
    }

    /// Also accepts HS256 tokens signed with `secret`.
    pub fn and_secret(mut self, secret: &[u8]) -> Verifier {
        self.keyed = Some(keyed(secret));
        self
    }

    /// Until when (Unix seconds) a token with these `claims` is accepted here:
    /// its `exp` plus the leeway; `None` for a token without `exp`.
    pub fn valid_until(&self, claims: &Claims) -> Option<u64> {
        claims.exp.map(|exp| exp.saturating_add(self.leeway_s))
    }

    /// Checks `token` at time `now_unix_s` and returns its claims.
    pub fn verify(&self, token: &str, now_unix_s: u64) -> Result<Claims, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Malformed);
        }
        let (signing_input, signature_b64) = token.rsplit_once('.').ok_or(AuthError::Malformed)?;
        let (header_b64, payload_b64) =
            signing_input.split_once('.').ok_or(AuthError::Malformed)?;
        if payload_b64.contains('.') {
            return Err(AuthError::Malformed);
        }

        let header: Header = decode_json_object(header_b64)?;
        let alg = header.alg.as_deref();
        let public = alg.and_then(Alg::from_name);
        let known = match public {
            Some(_) => self.keys.is_some(),
            None => alg == Some("HS256") && self.keyed.is_some(),
        };
        if !known {
            return Err(AuthError::UnsupportedAlgorithm);
        }
        if header.crit.is_some() {
            return Err(AuthError::UnsupportedCriticalHeader);
        }

        let signature = URL_SAFE_NO_PAD
            .decode(signature_b64)
            .map_err(|_| AuthError::Malformed)?;
        match (public, &self.keyed, &self.keys) {
            (Some(alg), _, Some(keys)) => {
                let set = keys.current();
                let mut candidates = set.candidates(alg, header.kid.as_deref()).peekable();
                if candidates.peek().is_none() {
                    return Err(AuthError::UnknownKey);
                }
                if !candidates.any(|k| k.verifies(signing_input.as_bytes(), &signature)) {
                    return Err(AuthError::BadSignature);
                }
            }
            (None, Some(keyed), _) => {
                if signature.len() != SIGNATURE_BYTES {
                    return Err(AuthError::BadSignature);
                }
                let mut mac = keyed.clone();
                mac.update(signing_input.as_bytes());
                mac.verify_slice(&signature)
                    .map_err(|_| AuthError::BadSignature)?;
            }
            _ => return Err(AuthError::UnsupportedAlgorithm),
        }

        let claims: Claims = decode_json_object(payload_b64)?;
        if claims.sub.is_empty() {
            return Err(AuthError::MissingSubject);
        }
        if claims.sub.len() > MAX_SUBJECT_BYTES || claims.sub.chars().any(char::is_control) {
            return Err(AuthError::InvalidSubject);
        }
        if claims
            .exp
            .is_some_and(|exp| exp <= now_unix_s.saturating_sub(self.leeway_s))
        {
            return Err(AuthError::Expired);
        }
        if claims
            .nbf
            .is_some_and(|nbf| nbf > now_unix_s.saturating_add(self.leeway_s))
        {
            return Err(AuthError::NotYetValid);
        }
        Ok(claims)
    }
}

/// Signs `claims` with `secret` under the header `{"alg":"HS256","typ":"JWT"}`.
/// Absent optional claims are left out. Nothing is validated: a token with an empty
/// `sub` is minted, and `verify` refuses it.
pub fn mint(secret: &[u8], claims: &Claims) -> String {
    let payload = serde_json::to_vec(claims)
        .expect("Claims holds only strings, integers and string arrays, which always serialize");
    let mut token =
        String::with_capacity(MINTED_HEADER_B64.len() + 2 + payload.len().div_ceil(3) * 4 + 43);
    token.push_str(MINTED_HEADER_B64);
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(&payload, &mut token);
    let mut mac = keyed(secret);
    mac.update(token.as_bytes());
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(mac.finalize().into_bytes(), &mut token);
    token
}

fn keyed(secret: &[u8]) -> HmacSha256 {
    <HmacSha256 as Mac>::new_from_slice(secret)
        .expect("HMAC takes keys of any length (RFC 2104 §2)")
}

/// The JOSE header members we act on. Others (`typ`, `x5t`, ...) are ignored.
#[derive(Deserialize)]
struct Header {
    #[serde(default)]
    alg: Option<String>,
    #[serde(default)]
    crit: Option<IgnoredAny>,
    #[serde(default)]
    kid: Option<String>,
}

/// Decodes one base64url part and parses it as a JSON object into `T`.
fn decode_json_object<T: de::DeserializeOwned>(part_b64: &str) -> Result<T, AuthError> {
    let json = URL_SAFE_NO_PAD
        .decode(part_b64)
        .map_err(|_| AuthError::Malformed)?;
    // serde's derived structs also accept a JSON array, field by field; a JWT header or
    // claims set must be an object (RFC 7519 §7.2).
    if json.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(AuthError::Malformed);
    }
    serde_json::from_slice(&json).map_err(|_| AuthError::Malformed)
}

/// A present NumericDate (RFC 7519 §2): a non-negative JSON number, decimals floored.
fn numeric_date<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    struct NumericDate;

    impl Visitor<'_> for NumericDate {
        type Value = u64;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a NumericDate: non-negative seconds since 1970")
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| E::invalid_value(Unexpected::Signed(v), &self))
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<u64, E> {
            // `as` saturates silently, so bound first; 2^64 is the first f64 past u64::MAX.
            if (0.0..18_446_744_073_709_551_616.0).contains(&v) {
                Ok(v.floor() as u64)
            } else {
                Err(E::invalid_value(Unexpected::Float(v), &self))
            }
        }
    }

    d.deserialize_any(NumericDate).map(Some)
}

/// A present array of strings; `null` or any other type is an error.
fn string_array<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    Vec::<String>::deserialize(d).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"corecast-unit-test-secret-0123456789";
    const NOW: u64 = 1_700_000_000;
    const LEEWAY: u64 = 30;
    const HS256: &str = r#"{"alg":"HS256","typ":"JWT"}"#;

    fn b64(bytes: impl AsRef<[u8]>) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    fn sign_raw(secret: &[u8], header_b64: &str, payload_b64: &str) -> String {
        let input = format!("{header_b64}.{payload_b64}");
        let mut mac = keyed(secret);
        mac.update(input.as_bytes());
        format!("{input}.{}", b64(mac.finalize().into_bytes()))
    }

    /// A token over arbitrary header and payload text, signed with `secret`.
    fn sign(secret: &[u8], header: &str, payload: impl AsRef<[u8]>) -> String {
        sign_raw(secret, &b64(header), &b64(payload))
    }

    fn good(payload: &str) -> String {
        sign(SECRET, HS256, payload)
    }

    fn parts(token: &str) -> Vec<String> {
        token.split('.').map(str::to_owned).collect()
    }

    fn exp(e: impl fmt::Display) -> String {
        good(&format!(r#"{{"sub":"alice","exp":{e}}}"#))
    }

    fn nbf(n: impl fmt::Display) -> String {
        good(&format!(r#"{{"sub":"alice","nbf":{n}}}"#))
    }

    fn sub(s: impl fmt::Display) -> String {
        good(&format!(r#"{{"sub":{s}}}"#))
    }

    /// `{"sub":"alice"}` under `header`, signed with the right secret.
    fn hdr(header: &str) -> String {
        sign(SECRET, header, r#"{"sub":"alice"}"#)
    }

    /// `{"sub":"alice","pad":"xxx..."}` with `n` x's.
    fn padded(n: usize) -> String {
        good(&format!(r#"{{"sub":"alice","pad":"{}"}}"#, "x".repeat(n)))
    }

    #[test]
    fn table() {
        let valid = good(r#"{"sub":"alice"}"#);
        let [h, p, s] = <[String; 3]>::try_from(parts(&valid)).unwrap();
        let mallory = b64(r#"{"sub":"mallory"}"#);
        let max_sub = "u".repeat(MAX_SUBJECT_BYTES);
        let at_limit = (6000..6200)
            .map(padded)
            .find(|t| t.len() == MAX_TOKEN_BYTES)
            .expect("some padding lands exactly on the limit");
        // serde_json skips unknown values with a heap stack, and refuses known ones
        // nested past 128 levels: neither can overflow ours.
        let nested = |claim: &str| {
            let (open, close) = ("[".repeat(2500), "]".repeat(2500));
            good(&format!(r#"{{"sub":"alice","{claim}":{open}{close}}}"#))
        };
        let (deep_unknown, deep_rooms) = (nested("deep"), nested("rooms"));
        assert!(deep_unknown.len() <= MAX_TOKEN_BYTES);
        // 43 symbols carry 258 bits; the last 2 must be zero. Set them.
        let non_canonical = {
            let last = URL_SAFE_NO_PAD.decode(&s).unwrap()[31];
            let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
            let symbol = char::from(alphabet[(usize::from(last & 0x0f) << 2) | 1]);
            format!("{h}.{p}.{}{symbol}", &s[..42])
        };
        let alice = Ok("alice");

        use AuthError::*;
        #[rustfmt::skip]
        let cases: Vec<(&str, String, Result<&str, AuthError>)> = vec![
            // Valid.
            ("valid",                            valid.clone(), alice),
            ("exp in the future",                exp(NOW + 60), alice),
            ("nbf in the past",                  nbf(NOW - 60), alice),
            ("header spaced, extra members",     hdr(r#" { "typ" : "JWT", "kid": "k1", "alg" : "HS256" } "#), alice),
            ("unknown claims ignored",           good(r#"{"sub":"alice","aud":["x"],"x":{"y":[1,null,{}]}}"#), alice),
            ("non-ASCII subject",                sub(r#""élise""#), Ok("élise")),
            ("subject of 128 bytes",             sub(format!(r#""{max_sub}""#)), Ok(&max_sub)),
            ("exactly MAX_TOKEN_BYTES",          at_limit.clone(), alice),
            ("rooms empty",                      good(r#"{"sub":"alice","rooms":[]}"#), alice),
            // Time.
            ("expired",                          exp(NOW - 31), Err(Expired)),
            ("exp exactly now - leeway",         exp(NOW - LEEWAY), Err(Expired)),
            ("exp within leeway",                exp(NOW - LEEWAY + 1), alice),
            ("exp 0",                            exp(0), Err(Expired)),
            ("exp u64::MAX",                     exp(u64::MAX), alice),
            ("float exp floored into expiry",    exp(format!("{}.9", NOW - LEEWAY)), Err(Expired)),
            ("float exp floored, still valid",   exp(format!("{}.5", NOW - LEEWAY + 1)), alice),
            ("exp in exponent form",             exp("1.8e9"), alice),
            ("negative exp",                     exp(-1), Err(Malformed)),
            ("negative float exp",               exp(-0.5), Err(Malformed)),
            ("exp past u64",                     exp("1e20"), Err(Malformed)),
            ("exp out of f64 range",             exp("1e400"), Err(Malformed)),
            ("exp as string",                    exp(r#""4102444800""#), Err(Malformed)),
            ("exp null",                         exp("null"), Err(Malformed)),
            ("not yet valid",                    nbf(NOW + LEEWAY + 1), Err(NotYetValid)),
            ("nbf within leeway",                nbf(NOW + LEEWAY), alice),
            ("nbf u64::MAX",                     nbf(u64::MAX), Err(NotYetValid)),
            ("float nbf floored into validity",  nbf(format!("{}.99", NOW + LEEWAY)), alice),
            // Signature.
            ("wrong secret",                     sign(b"another-secret-another-secret-!!", HS256, r#"{"sub":"alice"}"#), Err(BadSignature)),
            ("tampered payload",                 format!("{h}.{mallory}.{s}"), Err(BadSignature)),
            ("tampered header",                  format!("{}.{p}.{s}", b64(r#"{"alg":"HS256","kid":"x"}"#)), Err(BadSignature)),
            ("unsigned bad base64 in payload",   format!("{h}.{p}+/.{s}"), Err(BadSignature)),
            ("truncated signature",              format!("{h}.{p}.{}", &s[..40]), Err(BadSignature)),
            ("empty signature",                  format!("{h}.{p}."), Err(BadSignature)),
            ("signature of 33 bytes",            format!("{h}.{p}.{}", b64([7u8; 33])), Err(BadSignature)),
            ("padded signature",                 format!("{valid}="), Err(Malformed)),
            ("non-canonical signature symbol",   non_canonical, Err(Malformed)),
            ("bad base64 in signature",          format!("{h}.{p}.{}", "*".repeat(43)), Err(Malformed)),
            // Algorithm.
            ("alg none, unsigned",               format!("{}.{p}.", b64(r#"{"alg":"none"}"#)), Err(UnsupportedAlgorithm)),
            ("alg none, signed anyway",          hdr(r#"{"alg":"none"}"#), Err(UnsupportedAlgorithm)),
            ("alg HS512",                        hdr(r#"{"alg":"HS512"}"#), Err(UnsupportedAlgorithm)),
            ("alg RS256",                        hdr(r#"{"alg":"RS256"}"#), Err(UnsupportedAlgorithm)),
            ("alg in lower case",                hdr(r#"{"alg":"hs256"}"#), Err(UnsupportedAlgorithm)),
            ("alg missing",                      hdr(r#"{"typ":"JWT"}"#), Err(UnsupportedAlgorithm)),
            ("alg null",                         hdr(r#"{"alg":null}"#), Err(UnsupportedAlgorithm)),
            ("alg not a string",                 hdr(r#"{"alg":256}"#), Err(Malformed)),
            ("alg repeated",                     hdr(r#"{"alg":"HS256","alg":"none"}"#), Err(Malformed)),
            ("crit",                             hdr(r#"{"alg":"HS256","crit":["b64"],"b64":false}"#), Err(UnsupportedCriticalHeader)),
            // Shape and encoding.
            ("empty",                            String::new(), Err(Missing)),
            ("one part",                         h.clone(), Err(Malformed)),
            ("two parts",                        format!("{h}.{p}"), Err(Malformed)),
            ("four parts",                       format!("{valid}.{s}"), Err(Malformed)),
            ("only dots",                        "..".into(), Err(Malformed)),
            ("over MAX_TOKEN_BYTES",             format!("{at_limit}A"), Err(Malformed)),
            ("validly signed but too long",      padded(7000), Err(Malformed)),
            ("bad base64 in header",             format!("eyJ!.{p}.{s}"), Err(Malformed)),
            ("standard alphabet in payload",     sign_raw(SECRET, &h, &format!("{p}+/")), Err(Malformed)),
            ("padded payload",                   sign_raw(SECRET, &h, &format!("{p}==")), Err(Malformed)),
            ("header not JSON",                  hdr("HS256"), Err(Malformed)),
            ("header a JSON array",              hdr(r#"["HS256"]"#), Err(Malformed)),
            ("payload not JSON, signed",         good("sub=alice"), Err(Malformed)),
            ("payload a JSON array, signed",     good(r#"["alice"]"#), Err(Malformed)),
            ("payload with trailing bytes",      good(r#"{"sub":"alice"} x"#), Err(Malformed)),
            ("payload not UTF-8",                sign(SECRET, HS256, b"{\"sub\":\"\xff\"}"), Err(Malformed)),
            ("unknown claim nested 2500 deep",   deep_unknown, alice),
            ("rooms nested 2500 deep",           deep_rooms, Err(Malformed)),
            ("sub repeated",                     good(r#"{"sub":"alice","sub":"root"}"#), Err(Malformed)),
            ("rooms a string",                   good(r#"{"sub":"alice","rooms":"lobby"}"#), Err(Malformed)),
            ("rooms of numbers",                 good(r#"{"sub":"alice","rooms":[1]}"#), Err(Malformed)),
            ("rooms null",                       good(r#"{"sub":"alice","rooms":null}"#), Err(Malformed)),
            ("publish an object",                good(r#"{"sub":"alice","publish":{}}"#), Err(Malformed)),
            // Subject.
            ("sub missing",                      good(r#"{"exp":4102444800}"#), Err(MissingSubject)),
            ("sub empty",                        sub(r#""""#), Err(MissingSubject)),
            ("sub null",                         sub("null"), Err(Malformed)),
            ("sub a number",                     sub(42), Err(Malformed)),
            ("sub of 129 bytes",                 sub(format!(r#""{max_sub}u""#)), Err(InvalidSubject)),
            ("sub with a newline",               sub(r#""alice\nbob""#), Err(InvalidSubject)),
            ("sub with NUL",                     sub(r#""alice\u0000""#), Err(InvalidSubject)),
            ("sub with DEL",                     sub(r#""alice\u007f""#), Err(InvalidSubject)),
            ("sub with a C1 control",            sub(r#""alice\u0085""#), Err(InvalidSubject)),
        ];

        let verifier = Verifier::new(SECRET, LEEWAY);
        let mut failures = Vec::new();
        for (name, token, want) in &cases {
            let got = verifier.verify(token, NOW);
            let got = got.as_ref().map(|c| c.sub.as_str()).map_err(|e| *e);
            if got != *want {
                failures.push(format!("{name}: got {got:?}, want {want:?}"));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    /// Tokens made by someone else: Python's stdlib (hmac, hashlib, base64, json) and
    /// RFC 7515 Appendix A.1.
    #[test]
    fn golden_tokens() {
        const PY_SECRET: &[u8] = b"python-golden-secret-for-corecast-tests";
        // json.dumps({"sub": "alice", "exp": 4102444800, "iat": 1700000000,
        //   "rooms": ["lobby", "team-*"], "name": "Alice", "admin": False}), header
        // json.dumps({"alg": "HS256", "typ": "JWT"}): default separators, with spaces.
        const PY_SPACED: &str = "eyJhbGciOiAiSFMyNTYiLCAidHlwIjogIkpXVCJ9.eyJzdWIiOiAiYWxpY2UiLCAiZXhwIjogNDEwMjQ0NDgwMCwgImlhdCI6IDE3MDAwMDAwMDAsICJyb29tcyI6IFsibG9iYnkiLCAidGVhbS0qIl0sICJuYW1lIjogIkFsaWNlIiwgImFkbWluIjogZmFsc2V9.IqJk6V9i_V2SkJBPdSBCYQrjY6dA6LTQKjmfjYUWhRk";
        // {"sub": "bob", "exp": 4102444800.75, "nbf": 1699999999.5, "publish": ["lobby"]}
        // under {"typ": "JWT", "alg": "HS256", "kid": "k1"}.
        const PY_FLOAT: &str = "eyJ0eXAiOiAiSldUIiwgImFsZyI6ICJIUzI1NiIsICJraWQiOiAiazEifQ.eyJzdWIiOiAiYm9iIiwgImV4cCI6IDQxMDI0NDQ4MDAuNzUsICJuYmYiOiAxNjk5OTk5OTk5LjUsICJwdWJsaXNoIjogWyJsb2JieSJdfQ.rsGQeM1xr1_xG6jZ09psTCroeadqHCOGSAxHd-jNvcg";
        // Compact separators, keys in Claims' field order: `mint` must match it byte for byte.
        const PY_COMPACT: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJjYXJvbCIsImV4cCI6NDEwMjQ0NDgwMCwibmJmIjoxNzAwMDAwMDAwLCJpYXQiOjE3MDAwMDAwMDAsInJvb21zIjpbInRlYW0tKiIsImxvYmJ5Il0sInB1Ymxpc2giOlsidGVhbS1yZWQiXX0.fdaIQbZ_S4hkyKkdT06dCGXm2rvSn8lL5ChUWS7cwaU";
        // RFC 7515 A.1: HS256, but no `sub`; MissingSubject proves the signature passed.
        const RFC_KEY_B64: &str = "AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ-EstJQLr_T-1qS0gZH75aKtMN3Yj0iPS4hcgUuTwjAzZr1Z9CAow";
        const RFC_TOKEN: &str = "eyJ0eXAiOiJKV1QiLA0KICJhbGciOiJIUzI1NiJ9.eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ.dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";

        let rooms = |r: &[&str]| Some(r.iter().map(|s| s.to_string()).collect());
        let carol = Claims {
            sub: "carol".into(),
            exp: Some(4_102_444_800),
            nbf: Some(1_700_000_000),
            iat: Some(1_700_000_000),
            rooms: rooms(&["team-*", "lobby"]),
            publish: rooms(&["team-red"]),
        };
        let rfc_key = URL_SAFE_NO_PAD.decode(RFC_KEY_B64).unwrap();

        // name, secret, token, now, expected
        type Case<'a> = (&'a str, &'a [u8], &'a str, u64, Result<Claims, AuthError>);
        let cases: Vec<Case> = vec![
            (
                "python, spaced JSON, unknown claims",
                PY_SECRET,
                PY_SPACED,
                NOW,
                Ok(Claims {
                    sub: "alice".into(),
                    exp: Some(4_102_444_800),
                    iat: Some(1_700_000_000),
                    rooms: rooms(&["lobby", "team-*"]),
                    ..Claims::default()
                }),
            ),
            (
                "python, decimal NumericDates floored",
                PY_SECRET,
                PY_FLOAT,
                1_699_999_999,
                Ok(Claims {
                    sub: "bob".into(),
                    exp: Some(4_102_444_800),
                    nbf: Some(1_699_999_999),
                    publish: rooms(&["lobby"]),
                    ..Claims::default()
                }),
            ),
            (
                "python, nbf floored, one second early",
                PY_SECRET,
                PY_FLOAT,
                1_699_999_998,
                Err(AuthError::NotYetValid),
            ),
            (
                "python, compact JSON",
                PY_SECRET,
                PY_COMPACT,
                NOW,
                Ok(carol.clone()),
            ),
            (
                "python, wrong secret",
                &b"python-golden-secret-for-corecast-test"[..],
                PY_COMPACT,
                NOW,
                Err(AuthError::BadSignature),
            ),
            (
                "RFC 7515 A.1",
                rfc_key.as_slice(),
                RFC_TOKEN,
                NOW,
                Err(AuthError::MissingSubject),
            ),
        ];
        for (name, secret, token, now, want) in cases {
            assert_eq!(Verifier::new(secret, 0).verify(token, now), want, "{name}");
        }

        assert_eq!(mint(PY_SECRET, &carol), PY_COMPACT);
    }

    #[test]
    fn room_patterns() {
        let list = |r: &[&str]| Some(r.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let any = None;
        #[rustfmt::skip]
        let cases = [
            // name,                               rooms,                      publish,             room,        join,  publish
            ("no rooms claim: any room",           any.clone(),                any.clone(),         "lobby",     true,  true),
            ("exact match",                        list(&["lobby"]),           any.clone(),         "lobby",     true,  true),
            ("exact, other room",                  list(&["lobby"]),           any.clone(),         "lobby2",    false, false),
            ("exact is case-sensitive",            list(&["lobby"]),           any.clone(),         "Lobby",     false, false),
            ("prefix",                             list(&["team-*"]),          any.clone(),         "team-red",  true,  true),
            ("prefix matches the bare prefix",     list(&["team-*"]),          any.clone(),         "team-",     true,  true),
            ("prefix needs all of the prefix",     list(&["team-*"]),          any.clone(),         "team",      false, false),
            ("prefix is anchored at the start",    list(&["team-*"]),          any.clone(),         "x-team-red",false, false),
            ("star alone: every room",             list(&["*"]),               any.clone(),         "anything",  true,  true),
            ("inner star is literal",              list(&["a*b"]),             any.clone(),         "axb",       false, false),
            ("inner star, exact",                  list(&["a*b"]),             any.clone(),         "a*b",       true,  true),
            ("empty rooms: no room",               list(&[]),                  any.clone(),         "lobby",     false, false),
            ("second pattern matches",             list(&["lobby", "team-*"]), any.clone(),         "team-x",    true,  true),
            ("publish narrower than rooms",        list(&["team-*"]),          list(&["team-red"]), "team-blue", true,  false),
            ("publish narrower, room allowed",     list(&["team-*"]),          list(&["team-red"]), "team-red",  true,  true),
            ("publish wider than rooms",           list(&["lobby"]),           list(&["*"]),        "team-red",  false, false),
            ("publish without rooms",              any.clone(),                list(&["news-*"]),   "chat",      true,  false),
            ("publish without rooms, allowed",     any.clone(),                list(&["news-*"]),   "news-1",    true,  true),
            ("publish empty: read-only",           any.clone(),                list(&[]),           "lobby",     true,  false),
        ];
        for (name, rooms, publish, room, join, publish_ok) in cases {
            let claims = Claims {
                sub: "u".into(),
                rooms,
                publish,
                ..Claims::default()
            };
            assert_eq!(claims.may_join(room), join, "{name}: may_join");
            assert_eq!(claims.may_publish(room), publish_ok, "{name}: may_publish");
        }
    }

    #[test]
    fn mint_round_trip() {
        let claims = [
            Claims {
                sub: "alice".into(),
                ..Claims::default()
            },
            Claims {
                sub: "bob \"the\" builder ✓".into(),
                exp: Some(NOW + 3600),
                nbf: Some(NOW - 10),
                iat: Some(NOW),
                rooms: Some(vec!["lobby".into(), "team-*".into()]),
                publish: Some(vec![]),
            },
        ];
        let verifier = Verifier::new(SECRET, 0);
        for c in &claims {
            let token = mint(SECRET, c);
            assert_eq!(token.split('.').next(), Some(MINTED_HEADER_B64));
            assert_eq!(verifier.verify(&token, NOW).as_ref(), Ok(c));
        }
        assert_eq!(MINTED_HEADER_B64, b64(HS256));
        assert_eq!(
            mint(SECRET, &Claims::default()).split('.').nth(1),
            Some(b64(r#"{"sub":""}"#).as_str()),
            "absent claims are left out"
        );
    }

    #[test]
    fn errors_explain_themselves() {
        use AuthError::*;
        for e in [
            Missing,
            Malformed,
            UnsupportedAlgorithm,
            UnsupportedCriticalHeader,
            BadSignature,
            Expired,
            NotYetValid,
            MissingSubject,
            InvalidSubject,
        ] {
            assert!(!e.reason().is_empty() && e.reason().len() <= 123, "{e:?}");
            assert!(
                e.to_string().contains('('),
                "{e:?} should say what to do: {e}"
            );
        }
    }

    #[test]
    fn verifier_is_shareable_and_keeps_its_secret() {
        fn send_sync<T: Send + Sync + Clone>() {}
        send_sync::<Verifier>();
        let shown = format!("{:?}", Verifier::new(b"hunter2-hunter2", 5));
        assert_eq!(
            shown,
            "Verifier { hs256: true, keys: None, leeway_s: 5, .. }"
        );
        assert!(!shown.contains("hunter2"));
    }

    /// xorshift64: reproducible noise without a dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn pick<T: Copy>(&mut self, from: &[T]) -> T {
            from[self.below(from.len())]
        }
    }

    #[test]
    fn noise_never_panics_and_never_passes() {
        let verifier = Verifier::new(SECRET, LEEWAY);
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let token_bytes = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=";

        // Random bytes, and random strings over the token alphabet.
        for i in 0..3000 {
            let len = rng.below(400);
            let bytes: Vec<u8> = if i % 2 == 0 {
                (0..len).map(|_| rng.next() as u8).collect()
            } else {
                (0..len).map(|_| rng.pick(token_bytes)).collect()
            };
            let text = String::from_utf8_lossy(&bytes);
            assert!(verifier.verify(&text, NOW).is_err(), "{text:?}");
        }

        // Any edit to a valid token is refused.
        let valid = good(r#"{"sub":"alice","rooms":["lobby"],"exp":4102444800}"#);
        for _ in 0..3000 {
            let mut t = valid.clone().into_bytes();
            for _ in 0..=rng.below(3) {
                let at = rng.below(t.len());
                match rng.below(3) {
                    0 => t[at] = rng.pick(token_bytes),
                    1 => t.insert(at, rng.pick(token_bytes)),
                    _ => {
                        t.remove(at);
                    }
                }
            }
            let t = String::from_utf8(t).unwrap();
            if t != valid {
                assert!(verifier.verify(&t, NOW).is_err(), "{t}");
            }
        }

        // Signed JSON-ish noise reaches the claims parser; it must not panic.
        let pieces = [
            "{",
            "}",
            "[",
            "]",
            ",",
            ":",
            "\"",
            "\"sub\"",
            "\"exp\"",
            "\"nbf\"",
            "\"rooms\"",
            "\"publish\"",
            "\"a\"",
            "1",
            "-1",
            "1.5",
            "1e999",
            "null",
            "true",
            "\\u0000",
            " ",
        ];
        for _ in 0..3000 {
            let mut payload = String::from("{");
            for _ in 0..rng.below(24) {
                payload.push_str(rng.pick(&pieces));
            }
            let _ = verifier.verify(&good(&payload), NOW);
        }
    }
}
