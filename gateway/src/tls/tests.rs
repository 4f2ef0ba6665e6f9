use std::path::PathBuf;

use super::*;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/testdata/tls")).join(name)
}

fn temp(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("corecast-tls-unit-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn the_expiry_is_read_from_the_leaf() {
    // `openssl x509 -enddate` of the fixture: notAfter=Dec  4 14:24:47 2036 GMT,
    // `date -d "2036-12-04 14:24:47 UTC" +%s`: 2112013487.
    let tls = Tls::load(&fixture("cert.pem"), &fixture("key.pem")).unwrap();
    assert_eq!(tls.current().not_after, 2_112_013_487);
    let mut out = String::new();
    tls.render_metrics(&mut out);
    assert!(
        out.contains("\ncorecast_tls_cert_expiry_seconds 2112013487\n"),
        "{out}"
    );
}

#[test]
fn times_in_both_asn1_forms() {
    assert_eq!(parse_time(0x17, b"700101000000Z"), Some(0));
    assert_eq!(parse_time(0x17, b"491231235959Z"), Some(2_524_607_999));
    assert_eq!(parse_time(0x18, b"20361204142447Z"), Some(2_112_013_487));
    assert_eq!(parse_time(0x18, b"2036120414244Z"), None);
    assert_eq!(parse_time(0x17, b"701301000000Z"), None);
    assert_eq!(parse_time(0x17, b"700101000000+"), None);
    assert_eq!(not_after(b"\x30\x03\x02\x01\x00"), None);
}

#[test]
fn rsa_and_ec_keys_load() {
    assert!(Tls::load(&fixture("cert2.pem"), &fixture("key2.pem")).is_ok());
    assert!(Tls::load(&fixture("cert.pem"), &fixture("key.pem")).is_ok());
}

#[test]
fn files_that_do_not_load_are_named_with_what_is_wrong() {
    let dir = temp("bad");
    let junk = dir.join("junk.pem");
    std::fs::write(&junk, "hello").unwrap();
    let cases = [
        (fixture("cert.pem"), fixture("key2.pem"), "does not belong"),
        (
            dir.join("missing.pem"),
            fixture("key.pem"),
            "cannot read it",
        ),
        (junk.clone(), fixture("key.pem"), "--tls-cert"),
        (fixture("cert.pem"), junk.clone(), "--tls-key"),
        (fixture("cert.pem"), fixture("cert.pem"), "--tls-key"),
    ];
    for (cert, key, says) in cases {
        let e = Tls::load(&cert, &key).unwrap_err();
        assert!(e.contains(says), "{cert:?} {key:?}: {e}");
    }
}

#[test]
fn a_broken_reload_keeps_the_certificate_in_use() {
    let dir = temp("reload");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::copy(fixture("cert.pem"), &cert).unwrap();
    std::fs::copy(fixture("key.pem"), &key).unwrap();
    let tls = Tls::load(&cert, &key).unwrap();
    let first = tls.current().key.cert[0].clone();
    // A new certificate whose key has not been written yet: refused.
    std::fs::copy(fixture("cert2.pem"), &cert).unwrap();
    let e = tls.reload().unwrap_err();
    assert!(e.contains("does not belong"), "{e}");
    assert_eq!(tls.current().key.cert[0], first);
    std::fs::copy(fixture("key2.pem"), &key).unwrap();
    tls.reload().unwrap();
    assert_ne!(tls.current().key.cert[0], first);
}
