//! Public keys for RS256 and ES256 tokens: read from PEM (`--jwt-public-key`)
//! or a JWKS document (`--jwt-jwks`), swapped whole when the files change.
//!
//! Only the containers are parsed here (PEM armour, the DER of a
//! SubjectPublicKeyInfo or a PKCS#1 RSA key, JWK members); every signature
//! is checked by `ring`. Parsing is from bytes: reading the files is the
//! gateway's.

use std::sync::Arc;

use arc_swap::ArcSwap;
use base64::{
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
    Engine as _,
};
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use serde::Deserialize;

/// The asymmetric algorithms a key verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    Rs256,
    Es256,
}

impl Alg {
    /// The JOSE `alg` name.
    pub fn name(self) -> &'static str {
        match self {
            Alg::Rs256 => "RS256",
            Alg::Es256 => "ES256",
        }
    }

    pub fn from_name(name: &str) -> Option<Alg> {
        match name {
            "RS256" => Some(Alg::Rs256),
            "ES256" => Some(Alg::Es256),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Material {
    /// Big-endian modulus and exponent, without leading zeros.
    Rsa { n: Vec<u8>, e: Vec<u8> },
    /// The uncompressed P-256 point: `04 || x || y`.
    P256(Vec<u8>),
}

/// One public key: what it verifies, and the `kid` that names it (`None`:
/// it answers tokens with any `kid`, or none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    pub kid: Option<String>,
    material: Material,
}

/// Smallest RSA modulus accepted, in bytes (2048 bits, as `ring` requires).
const MIN_RSA_BYTES: usize = 256;

impl PublicKey {
    pub fn alg(&self) -> Alg {
        match self.material {
            Material::Rsa { .. } => Alg::Rs256,
            Material::P256(_) => Alg::Es256,
        }
    }

    /// Whether `signature` signs `message` under this key.
    pub fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        match &self.material {
            Material::Rsa { n, e } => RsaPublicKeyComponents { n, e }
                .verify(&signature::RSA_PKCS1_2048_8192_SHA256, message, signature)
                .is_ok(),
            Material::P256(point) => {
                UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                    .verify(message, signature)
                    .is_ok()
            }
        }
    }

    fn rsa(kid: Option<String>, n: &[u8], e: &[u8]) -> Result<PublicKey, String> {
        let n = strip_zeros(n);
        let e = strip_zeros(e);
        if n.len() < MIN_RSA_BYTES {
            return Err(format!(
                "the RSA key is {} bits; at least 2048 are required",
                n.len() * 8
            ));
        }
        if e.is_empty() || e.len() > 8 {
            return Err("the RSA key's exponent is not a usable number".into());
        }
        Ok(PublicKey {
            kid,
            material: Material::Rsa {
                n: n.to_vec(),
                e: e.to_vec(),
            },
        })
    }

    fn p256(kid: Option<String>, point: Vec<u8>) -> Result<PublicKey, String> {
        if point.len() != 65 || point[0] != 4 {
            return Err("the EC key is not an uncompressed P-256 point".into());
        }
        Ok(PublicKey {
            kid,
            material: Material::P256(point),
        })
    }
}

fn strip_zeros(mut b: &[u8]) -> &[u8] {
    while let [0, rest @ ..] = b {
        b = rest;
    }
    b
}

/// Every public key the verifier knows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeySet {
    pub keys: Vec<PublicKey>,
}

impl KeySet {
    /// The keys in a PEM file: one or more `PUBLIC KEY` (SubjectPublicKeyInfo,
    /// RSA or EC P-256) or `RSA PUBLIC KEY` (PKCS#1) blocks.
    pub fn from_pem(text: &str) -> Result<KeySet, String> {
        let mut keys = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find("-----BEGIN ") {
            let after = &rest[start + 11..];
            let label_end = after
                .find("-----")
                .ok_or("a BEGIN line without its closing -----")?;
            let label = &after[..label_end];
            let body_start = &after[label_end + 5..];
            let end_marker = format!("-----END {label}-----");
            let body_end = body_start
                .find(&end_marker)
                .ok_or_else(|| format!("no END line for {label}"))?;
            let body: String = body_start[..body_end]
                .chars()
                .filter(|c| !c.is_whitespace())
                .collect();
            rest = &body_start[body_end + end_marker.len()..];
            let der = STANDARD
                .decode(body.as_bytes())
                .map_err(|_| format!("the {label} block is not base64"))?;
            let key = match label {
                "PUBLIC KEY" => spki(&der),
                "RSA PUBLIC KEY" => pkcs1(&der).and_then(|(n, e)| PublicKey::rsa(None, n, e)),
                "CERTIFICATE" => Err("this is a certificate: give its public key \
                     (openssl x509 -in CERT -pubkey -noout)"
                    .into()),
                l if l.contains("PRIVATE KEY") => Err("this is a private key: give the \
                     public key (openssl pkey -in KEY -pubout)"
                    .into()),
                l => Err(format!("a {l} block is not a public key")),
            }?;
            keys.push(key);
        }
        if keys.is_empty() {
            return Err("no -----BEGIN PUBLIC KEY----- block".into());
        }
        Ok(KeySet { keys })
    }

    /// The signing keys of a JWKS document (RFC 7517 §5): RSA keys and EC
    /// P-256 keys whose `use` is `sig` or absent and whose `alg` is RS256 or
    /// ES256 or absent. Other keys (encryption keys, other curves and
    /// algorithms) are skipped and named in the second value; a key of ours
    /// that is malformed is an error.
    pub fn from_jwks(text: &str) -> Result<(KeySet, Vec<String>), String> {
        let doc: Jwks = serde_json::from_str(text)
            .map_err(|e| format!("not a JWKS document ({{\"keys\":[...]}}): {e}"))?;
        let mut keys = Vec::new();
        let mut skipped = Vec::new();
        for (i, jwk) in doc.keys.into_iter().enumerate() {
            let name = match &jwk.kid {
                Some(kid) => format!("key {kid:?}"),
                None => format!("key #{i}"),
            };
            if jwk.use_.as_deref().is_some_and(|u| u != "sig") {
                skipped.push(format!("{name}: not a signing key (use {:?})", jwk.use_));
                continue;
            }
            let alg = jwk.alg.as_deref();
            let b64 = |field: &Option<String>, what: &str| {
                let v = field.as_deref().ok_or(format!("{name}: no {what:?}"))?;
                URL_SAFE_NO_PAD
                    .decode(v)
                    .map_err(|_| format!("{name}: {what:?} is not base64url"))
            };
            let key = match (jwk.kty.as_str(), alg) {
                ("RSA", None | Some("RS256")) => {
                    PublicKey::rsa(jwk.kid.clone(), &b64(&jwk.n, "n")?, &b64(&jwk.e, "e")?)
                }
                ("EC", None | Some("ES256")) if jwk.crv.as_deref() == Some("P-256") => {
                    let (x, y) = (b64(&jwk.x, "x")?, b64(&jwk.y, "y")?);
                    if x.len() != 32 || y.len() != 32 {
                        return Err(format!("{name}: x and y must be 32 bytes for P-256"));
                    }
                    PublicKey::p256(jwk.kid.clone(), [&[4u8][..], &x, &y].concat())
                }
                (kty, alg) => {
                    let crv = jwk.crv.as_deref().unwrap_or("-");
                    skipped.push(format!(
                        "{name}: kty {kty}, crv {crv}, alg {} is not RS256 or ES256 (P-256)",
                        alg.unwrap_or("-")
                    ));
                    continue;
                }
            }
            .map_err(|e| format!("{name}: {e}"))?;
            keys.push(key);
        }
        if keys.is_empty() {
            return Err("no RS256 or ES256 (P-256) signing key in it".into());
        }
        Ok((KeySet { keys }, skipped))
    }

    /// The keys that may have signed a token with this `alg` and `kid`: a
    /// key with a `kid` answers only that `kid`; one without answers any.
    pub fn candidates<'a>(
        &'a self,
        alg: Alg,
        kid: Option<&'a str>,
    ) -> impl Iterator<Item = &'a PublicKey> + 'a {
        self.keys.iter().filter(move |k| {
            k.alg() == alg
                && match (&k.kid, kid) {
                    (Some(mine), Some(theirs)) => mine == theirs,
                    _ => true,
                }
        })
    }
}

#[derive(Deserialize)]
struct Jwks {
    keys: Vec<Jwk>,
}

/// The members of a JWK we read; others (`x5c`, `key_ops`, ...) are ignored.
#[derive(Deserialize)]
struct Jwk {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    alg: Option<String>,
    #[serde(default, rename = "use")]
    use_: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
}

/// The key set every shard reads, replaced whole on a reload: a read is one
/// atomic load, never a lock.
#[derive(Debug, Clone)]
pub struct Keys(Arc<ArcSwap<KeySet>>);

impl Keys {
    pub fn new(set: KeySet) -> Keys {
        Keys(Arc::new(ArcSwap::from_pointee(set)))
    }

    pub fn current(&self) -> arc_swap::Guard<Arc<KeySet>> {
        self.0.load()
    }

    /// Replaces the keys for every verifier that shares this handle.
    pub fn replace(&self, set: KeySet) {
        self.0.store(Arc::new(set));
    }
}

/// A DER reader for the few structures a public key comes in.
struct Der<'a>(&'a [u8]);

impl<'a> Der<'a> {
    /// The contents of the next element, which must have `tag`.
    fn next(&mut self, tag: u8) -> Result<&'a [u8], String> {
        let bad = || "the key's DER is malformed".to_string();
        let [t, l, rest @ ..] = self.0 else {
            return Err(bad());
        };
        if *t != tag {
            return Err(bad());
        }
        let (len, rest) = match *l {
            l if l < 0x80 => (l as usize, rest),
            l => {
                let n = (l & 0x7f) as usize;
                if n == 0 || n > 3 || rest.len() < n {
                    return Err(bad());
                }
                let len = rest[..n].iter().fold(0, |v, &b| (v << 8) | b as usize);
                (len, &rest[n..])
            }
        };
        if rest.len() < len {
            return Err(bad());
        }
        let (value, after) = rest.split_at(len);
        self.0 = after;
        Ok(value)
    }

    fn end(&self) -> Result<(), String> {
        match self.0.is_empty() {
            true => Ok(()),
            false => Err("the key's DER has trailing bytes".into()),
        }
    }
}

const SEQUENCE: u8 = 0x30;
const INTEGER: u8 = 0x02;
const BIT_STRING: u8 = 0x03;
const OID: u8 = 0x06;
/// 1.2.840.113549.1.1.1
const RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
/// 1.2.840.10045.2.1
const EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
/// 1.2.840.10045.3.1.7 (P-256)
const PRIME256V1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// A SubjectPublicKeyInfo (RFC 5280 §4.1.2.7) holding an RSA or P-256 key.
fn spki(der: &[u8]) -> Result<PublicKey, String> {
    let mut top = Der(der);
    let mut info = Der(top.next(SEQUENCE)?);
    top.end()?;
    let mut algorithm = Der(info.next(SEQUENCE)?);
    let bits = info.next(BIT_STRING)?;
    info.end()?;
    let [0, key @ ..] = bits else {
        return Err("the key's DER is malformed".into());
    };
    let oid = algorithm.next(OID)?;
    if oid == RSA_ENCRYPTION {
        let (n, e) = pkcs1(key)?;
        PublicKey::rsa(None, n, e)
    } else if oid == EC_PUBLIC_KEY {
        if algorithm.next(OID)? != PRIME256V1 {
            return Err("the EC key is not on P-256 (ES256 needs prime256v1)".into());
        }
        PublicKey::p256(None, key.to_vec())
    } else {
        Err("not an RSA or EC public key".into())
    }
}

/// A PKCS#1 RSAPublicKey: `SEQUENCE { n INTEGER, e INTEGER }`.
fn pkcs1(der: &[u8]) -> Result<(&[u8], &[u8]), String> {
    let mut top = Der(der);
    let mut key = Der(top.next(SEQUENCE)?);
    top.end()?;
    let n = key.next(INTEGER)?;
    let e = key.next(INTEGER)?;
    key.end()?;
    Ok((n, e))
}

#[cfg(test)]
mod tests {
    //! The keys and tokens in `testdata/` were made by `scripts/jwt-keys.py`
    //! (Python `cryptography`): `keys testdata`, then `sign` for each token.
    use super::*;
    use crate::auth::{AuthError, Verifier};

    const RSA_SPKI: &str = include_str!("testdata/rsa.pub.pem");
    const RSA_PKCS1: &str = include_str!("testdata/rsa.pkcs1.pem");
    const EC_SPKI: &str = include_str!("testdata/ec.pub.pem");
    const JWKS: &str = include_str!("testdata/jwks.json");
    const TOKENS: &str = include_str!("testdata/tokens.txt");

    fn token(name: &str) -> &'static str {
        TOKENS
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no token {name}"))
    }

    fn verifier(set: KeySet) -> Verifier {
        Verifier::with_keys(Keys::new(set), 0)
    }

    #[test]
    fn pem_keys_of_each_form_load() {
        let rsa = KeySet::from_pem(RSA_SPKI).unwrap();
        assert_eq!(rsa.keys.len(), 1);
        assert_eq!(rsa.keys[0].alg(), Alg::Rs256);
        assert_eq!(
            KeySet::from_pem(RSA_PKCS1).unwrap(),
            rsa,
            "PKCS#1 is the same key"
        );
        let ec = KeySet::from_pem(EC_SPKI).unwrap();
        assert_eq!(ec.keys[0].alg(), Alg::Es256);
        let both = KeySet::from_pem(&format!("{RSA_SPKI}\n{EC_SPKI}")).unwrap();
        assert_eq!(both.keys.len(), 2);
    }

    #[test]
    fn what_is_not_a_public_key_says_so() {
        let cert = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let private = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        let cases = [
            ("", "no -----BEGIN PUBLIC KEY"),
            (cert, "certificate"),
            (private, "private key"),
            (
                "-----BEGIN PUBLIC KEY-----\n!!\n-----END PUBLIC KEY-----\n",
                "base64",
            ),
            (
                "-----BEGIN PUBLIC KEY-----\nMAA=\n-----END PUBLIC KEY-----\n",
                "DER",
            ),
            ("-----BEGIN PUBLIC KEY-----\nAAAA\n", "no END line"),
        ];
        for (pem, says) in cases {
            let err = KeySet::from_pem(pem).unwrap_err();
            assert!(err.contains(says), "{pem:?}: {err}");
        }
        // A short RSA key: a 1024-bit modulus in a PKCS#1 block.
        let mut der = vec![0x30, 0x81, 0x89, 0x02, 0x81, 0x81, 0x00];
        der.extend([0xc5; 128]);
        der.extend([0x02, 0x03, 0x01, 0x00, 0x01]);
        let pem = format!(
            "-----BEGIN RSA PUBLIC KEY-----\n{}\n-----END RSA PUBLIC KEY-----\n",
            STANDARD.encode(&der)
        );
        let err = KeySet::from_pem(&pem).unwrap_err();
        assert!(err.contains("1024 bits"), "{err}");
    }

    #[test]
    fn jwks_keeps_signing_keys_and_names_the_rest() {
        let (set, skipped) = KeySet::from_jwks(JWKS).unwrap();
        let kids: Vec<_> = set
            .keys
            .iter()
            .map(|k| (k.kid.as_deref(), k.alg()))
            .collect();
        assert_eq!(
            kids,
            [(Some("rsa-1"), Alg::Rs256), (Some("ec-1"), Alg::Es256)]
        );
        assert_eq!(skipped.len(), 1);
        assert!(skipped[0].contains("enc-1"), "{skipped:?}");
        // The same RSA key as the PEM file.
        let pem = KeySet::from_pem(RSA_SPKI).unwrap();
        assert_eq!(set.keys[0].material, pem.keys[0].material);
        for (doc, says) in [
            ("[]", "not a JWKS"),
            (r#"{"keys":[]}"#, "no RS256 or ES256"),
            (
                r#"{"keys":[{"kty":"OKP","crv":"Ed25519","x":"AA"}]}"#,
                "no RS256 or ES256",
            ),
            (
                r#"{"keys":[{"kty":"RSA","kid":"k","n":"AQAB"}]}"#,
                "key \"k\": no \"e\"",
            ),
            (
                r#"{"keys":[{"kty":"RSA","n":"AQAB","e":"AQAB"}]}"#,
                "key #0: the RSA key is 24 bits",
            ),
            (
                r#"{"keys":[{"kty":"EC","crv":"P-256","x":"AA","y":"AA"}]}"#,
                "32 bytes",
            ),
        ] {
            let err = KeySet::from_jwks(doc).unwrap_err();
            assert!(err.contains(says), "{doc}: {err}");
        }
    }

    #[test]
    fn rs256_and_es256_tokens_verify_and_tampered_ones_do_not() {
        let (jwks, _) = KeySet::from_jwks(JWKS).unwrap();
        let v = verifier(jwks);
        for name in ["rs256-kid", "es256-kid", "rs256-nokid"] {
            assert_eq!(
                v.verify(token(name), 0).map(|c| c.sub),
                Ok("alice".into()),
                "{name}"
            );
        }
        assert_eq!(
            v.verify(token("es256-tampered"), 0),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            v.verify(token("rs256-unknown-kid"), 0),
            Err(AuthError::UnknownKey)
        );
        // A key without a kid answers tokens with any kid.
        let pem = verifier(KeySet::from_pem(RSA_SPKI).unwrap());
        assert!(pem.verify(token("rs256-unknown-kid"), 0).is_ok());
        assert_eq!(
            pem.verify(token("es256-kid"), 0),
            Err(AuthError::UnknownKey),
            "no EC key"
        );
        // Without public keys RS256 is an algorithm this verifier does not take,
        // and with only public keys HS256 is.
        let hs = Verifier::new(b"some secret that is long enough, 32+", 0);
        assert_eq!(
            hs.verify(token("rs256-kid"), 0),
            Err(AuthError::UnsupportedAlgorithm)
        );
        let minted =
            crate::auth::mint(b"some secret that is long enough, 32+", &Default::default());
        assert_eq!(pem.verify(&minted, 0), Err(AuthError::UnsupportedAlgorithm));
    }

    #[test]
    fn a_reload_swaps_the_keys_for_every_clone() {
        let keys = Keys::new(KeySet::from_pem(EC_SPKI).unwrap());
        let v = Verifier::with_keys(keys.clone(), 0);
        let on_a_shard = v.clone();
        assert!(on_a_shard.verify(token("es256-kid"), 0).is_ok());
        keys.replace(KeySet::from_pem(RSA_SPKI).unwrap());
        assert_eq!(
            on_a_shard.verify(token("es256-kid"), 0),
            Err(AuthError::UnknownKey)
        );
        assert!(on_a_shard.verify(token("rs256-kid"), 0).is_ok());
    }
}
