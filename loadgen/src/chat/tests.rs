use super::*;
use crate::client::ConnFailure;
use corecast_ws::OpCode;
use corecast_ws::{Decoder, Limits, Role};

#[test]
fn seq_check() {
    use SeqVerdict::*;
    // name, base, seqs in, verdicts, [received, gaps, duplicates, reorders]
    type Case = (
        &'static str,
        u64,
        &'static [u64],
        &'static [SeqVerdict],
        [u64; 4],
    );
    #[rustfmt::skip]
    let cases: &[Case] = &[
        ("in order", 41, &[42, 43, 44], &[InOrder, InOrder, InOrder], [3, 0, 0, 0]),
        ("from zero", 0, &[1, 2], &[InOrder, InOrder], [2, 0, 0, 0]),
        ("gap", 0, &[1, 4, 5], &[InOrder, Gap(2), InOrder], [3, 2, 0, 0]),
        ("first seq skipped", 10, &[12], &[Gap(1)], [1, 1, 0, 0]),
        ("duplicate", 0, &[1, 2, 2], &[InOrder, InOrder, Duplicate], [2, 0, 1, 0]),
        ("at or below base", 5, &[5, 3, 6], &[Duplicate, Duplicate, InOrder], [1, 0, 2, 0]),
        ("swap", 0, &[2, 1, 3], &[Gap(1), Reordered, InOrder], [3, 0, 0, 1]),
        ("late arrivals split a gap", 0, &[1, 6, 3, 3, 2, 5, 4],
         &[InOrder, Gap(4), Reordered, Duplicate, Reordered, Reordered, Reordered],
         [6, 0, 1, 4]),
        ("two gaps, one filled", 0, &[2, 5, 1, 6],
         &[Gap(1), Gap(2), Reordered, InOrder], [4, 2, 0, 1]),
        ("late duplicate of a filled hole", 0, &[3, 1, 2, 1, 4],
         &[Gap(2), Reordered, Reordered, Duplicate, InOrder], [4, 0, 1, 2]),
    ];
    for (name, base, seqs, verdicts, [received, gaps, dups, reorders]) in cases {
        let mut c = SeqCheck::new(*base);
        let got: Vec<_> = seqs.iter().map(|&s| c.on_seq(s)).collect();
        assert_eq!(&got, verdicts, "{name}");
        assert_counts(&c, name, [*received, *gaps, *dups, *reorders]);
    }
}

/// Received, gaps, duplicates and reorders of a checker.
fn assert_counts(c: &SeqCheck, name: &str, [received, gaps, dups, reorders]: [u64; 4]) {
    assert_eq!(c.received, received, "{name}: received");
    assert_eq!(c.gaps(), gaps, "{name}: gaps");
    assert_eq!(c.duplicates, dups, "{name}: duplicates");
    assert_eq!(c.reorders, reorders, "{name}: reorders");
}

#[test]
fn seq_check_loss_and_catch_up() {
    let mut c = SeqCheck::new(10);
    for s in [11, 12, 14, 15] {
        c.on_seq(s);
    }
    assert!(c.has_all_up_to(12));
    assert!(!c.has_all_up_to(15), "13 is missing");
    // Acked: 11..=17; 13 missing, 16 and 17 never came.
    let acked: Vec<u64> = (11..=17).collect();
    assert_eq!(c.lost_of(&acked), 3);
    // Seqs at or below the base are not expected.
    assert_eq!(c.lost_of(&[3, 9, 10]), 0);
    c.on_seq(13);
    c.on_seq(16);
    c.on_seq(17);
    assert!(c.has_all_up_to(17));
    assert_eq!(c.lost_of(&acked), 0);
}

#[test]
fn seq_check_bounds_missing_ranges() {
    let mut c = SeqCheck::new(0);
    for i in 0..(MAX_MISSING_RANGES as u64 + 10) {
        c.on_seq(2 * i + 2);
    }
    assert_eq!(c.missing.len(), MAX_MISSING_RANGES);
    assert_eq!(c.gaps(), MAX_MISSING_RANGES as u64 + 10);
    // The oldest hole is no longer tracked: its late seq reads as a duplicate.
    assert_eq!(c.on_seq(1), SeqVerdict::Duplicate);
    assert!(!c.has_all_up_to(1));
}

#[test]
fn resume_points() {
    // name, base, seqs in, resume point
    let cases: &[(&str, u64, &[u64], u64)] = &[
        ("nothing received", 41, &[], 41),
        ("in order", 41, &[42, 43, 44], 44),
        ("below the first hole", 0, &[1, 2, 5, 6], 2),
        ("first seq skipped", 10, &[12, 13], 10),
        ("hole filled", 0, &[1, 3, 2, 4], 4),
        ("two holes", 0, &[1, 3, 5], 1),
    ];
    for (name, base, seqs, want) in cases {
        let mut c = SeqCheck::new(*base);
        for &s in *seqs {
            c.on_seq(s);
        }
        assert_eq!(c.resume_point(), *want, "{name}");
    }
    // Untracked holes: the resume starts below the oldest of them.
    let mut c = SeqCheck::new(0);
    for i in 0..(MAX_MISSING_RANGES as u64 + 3) {
        c.on_seq(10 * i + 10);
    }
    assert_eq!(c.resume_point(), 0);
}

#[test]
fn resume_replay() {
    use SeqVerdict::*;
    // name, base, seqs before the drop, seqs after the resume, verdicts
    // after, [received, gaps, duplicates, reorders] in the end
    type Case = (
        &'static str,
        u64,
        &'static [u64],
        &'static [u64],
        &'static [SeqVerdict],
        [u64; 4],
    );
    #[rustfmt::skip]
    let cases: &[Case] = &[
        ("up to date", 10, &[11, 12], &[13, 14], &[InOrder, InOrder], [4, 0, 0, 0]),
        ("nothing missed, then live", 10, &[11], &[12], &[InOrder], [2, 0, 0, 0]),
        ("the replay fills a hole", 0, &[1, 3, 4], &[2, 3, 4, 5],
         &[Reordered, Replayed, Replayed, InOrder], [5, 0, 0, 1]),
        ("a duplicate in the replay", 0, &[1, 3], &[2, 2, 3, 4],
         &[Reordered, Duplicate, Replayed, InOrder], [4, 0, 1, 1]),
        ("a duplicate of the live stream", 0, &[1, 2], &[3, 3], &[InOrder, Duplicate],
         [3, 0, 1, 0]),
        ("the replay stops short", 0, &[1, 3, 4], &[5], &[InOrder], [4, 1, 0, 0]),
        ("the replay skips", 0, &[1, 2, 3], &[5], &[Gap(1)], [4, 1, 0, 0]),
    ];
    for (name, base, before, after, verdicts, [received, gaps, dups, reorders]) in cases {
        let mut c = SeqCheck::new(*base);
        for &s in *before {
            c.on_seq(s);
        }
        let since = c.resume_point();
        c.on_resume(since);
        let got: Vec<_> = after.iter().map(|&s| c.on_seq(s)).collect();
        assert_eq!(&got, verdicts, "{name}");
        assert_counts(&c, name, [*received, *gaps, *dups, *reorders]);
    }
}

#[test]
fn resumed_member_holds_every_acked_seq() {
    let acked: Vec<u64> = (11..=20).collect();
    let mut c = SeqCheck::new(10);
    for s in 11..=14 {
        c.on_seq(s);
    }
    // Dropped; 15..=17 were sequenced meanwhile and come with the resume.
    c.on_resume(c.resume_point());
    for s in 15..=20 {
        assert_eq!(c.on_seq(s), SeqVerdict::InOrder);
    }
    assert!(c.has_all_up_to(20));
    assert_eq!(c.lost_of(&acked), 0);
}

#[test]
fn closed_check_counts_only_what_it_covered() {
    let acked: Vec<u64> = (1..=10).collect();
    let mut old = SeqCheck::new(0);
    for s in [1, 2, 4] {
        old.on_seq(s);
    }
    old.close();
    // 3 is a hole it saw; 5..=10 belong to the failed resume.
    assert_eq!(old.lost_of(&acked), 1);
    let mut fresh = SeqCheck::new(8);
    fresh.on_seq(9);
    assert!(fresh.has_all_up_to(8) && !fresh.has_all_up_to(10));
    assert_eq!(fresh.lost_of(&acked), 1, "10 never came");
}

#[test]
fn reconnectable_failures() {
    use corecast_ws::ProtocolError;
    use std::io::ErrorKind;
    let cases = [
        ("going away", ConnFailure::ServerClosed(Some(1001)), true),
        ("server error", ConnFailure::ServerClosed(Some(1011)), true),
        ("restart", ConnFailure::ServerClosed(Some(1012)), true),
        (
            "try again later",
            ConnFailure::ServerClosed(Some(1013)),
            true,
        ),
        ("no code", ConnFailure::ServerClosed(None), true),
        ("eof", ConnFailure::Eof, true),
        ("reset", ConnFailure::Io(ErrorKind::ConnectionReset), true),
        ("normal close", ConnFailure::ServerClosed(Some(1000)), false),
        (
            "protocol error",
            ConnFailure::ServerClosed(Some(1002)),
            false,
        ),
        (
            "slow consumer",
            ConnFailure::ServerClosed(Some(1008)),
            false,
        ),
        ("too big", ConnFailure::ServerClosed(Some(1009)), false),
        (
            "token expired",
            ConnFailure::ServerClosed(Some(4003)),
            false,
        ),
        (
            "framing",
            ConnFailure::Protocol(ProtocolError::ReservedBitsSet),
            false,
        ),
    ];
    for (name, failure, want) in cases {
        assert_eq!(reconnectable(failure), want, "{name}");
    }
}

#[test]
fn publish_frames() {
    for size in [0, 10, 60, 128, 5000] {
        let (mut out, mut scratch) = (Vec::new(), Vec::new());
        let tag = "0000abcd.3";
        encode_publish(
            &mut out,
            &mut scratch,
            "lg-1",
            tag,
            3,
            77,
            123_456_789,
            size,
            [9, 8, 7, 6],
        );
        let mut dec = Decoder::new(
            Role::Server,
            Limits {
                max_frame_bytes: 1 << 20,
                max_message_bytes: 1 << 20,
            },
        );
        let f = dec.decode(&mut out).unwrap().unwrap();
        assert_eq!(f.opcode, OpCode::Text);
        let v: serde_json::Value = serde_json::from_slice(&out[f.payload.clone()]).unwrap();
        assert_eq!(v["type"], "publish");
        assert_eq!(v["room"], "lg-1");
        assert_eq!(v["id"], "0000abcd.3-77");
        assert_eq!(v["body"]["t"], 123_456_789);
        assert_eq!(v["body"]["p"], 3);
        assert_eq!(v["body"]["n"], 77);
        let body = v["body"].to_string();
        assert!(body.len() >= size, "size {size}: {body}");
        if size >= 60 {
            assert_eq!(body.len(), size, "size {size}");
        }
        let id = v["id"].as_str().unwrap();
        assert_eq!(publish_number(id, tag), Some(77));
        assert_eq!(publish_number(id, "0000abcd.30"), None);
        assert_eq!(publish_number("other-77", tag), None);
    }
}

#[test]
fn parses_server_frames() {
    let msg = br#"{"type":"msg","room":"lg-0","seq":42,"from":"lg-u0","id":"x.0-5","ts":1764190000123,"body":{"t":99,"p":0,"n":5,"pad":"xxxx"}}"#;
    let m: Incoming = serde_json::from_slice(msg).unwrap();
    assert_eq!((m.kind, m.room, m.seq), ("msg", Some("lg-0"), Some(42)));
    let b = m.body.unwrap();
    assert_eq!((b.t, b.p, b.n), (Some(99), Some(0), Some(5)));
    let ack = br#"{"type":"ack","id":"x.0-5","room":"lg-0","seq":42,"duplicate":true}"#;
    let m: Incoming = serde_json::from_slice(ack).unwrap();
    assert!(m.duplicate);
    let err =
        br#"{"type":"error","code":"not_joined","message":"say \"join\" first","id":"x.0-5"}"#;
    let m: Incoming = serde_json::from_slice(err).unwrap();
    assert_eq!(m.message.as_deref(), Some("say \"join\" first"));
    let presence = br#"{"type":"presence","room":"lg-0","count":2,"users":["a","b"],"body":null}"#;
    let m: Incoming = serde_json::from_slice(presence).unwrap();
    assert_eq!(m.kind, "presence");
    let joined = br#"{"type":"joined","room":"lg-0","seq":47,"members":12,"epoch":"18c2f4a9e03b","recovered":true,"missed":6}"#;
    let m: Incoming = serde_json::from_slice(joined).unwrap();
    assert_eq!(m.epoch, Some("18c2f4a9e03b"));
    assert_eq!((m.recovered, m.missed), (Some(true), Some(6)));
}
