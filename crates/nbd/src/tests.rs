//! Vectors built by hand from the byte layouts in the spec (`doc/proto.md`).

use crate::consts::*;
use crate::*;

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("test hex"))
        .collect()
}

#[test]
fn greeting_layout() {
    let bytes = hex("4e42444d41474943 49484156454f5054 0003");
    let g = ServerGreeting::parse(&bytes).expect("greeting");
    assert_eq!(g.flags, HandshakeFlags::BULKHEAD);
    assert_eq!(g.encode().to_vec(), bytes);
    // Oldstyle: NBDMAGIC then 0x00420281861253.
    let old = hex("4e42444d41474943 0000420281861253 0000");
    assert!(matches!(
        ServerGreeting::parse(&old),
        Err(NbdError::BadMagic { .. })
    ));
    let plain = hex("4e42444d41474943 49484156454f5054 0000");
    assert_eq!(
        ServerGreeting::parse(&plain),
        Err(NbdError::NotFixedNewstyle(0))
    );
    assert!(matches!(
        ServerGreeting::parse(&bytes[..17]),
        Err(NbdError::Length { .. })
    ));
}

#[test]
fn client_flags() {
    assert_eq!(ClientFlags::BULKHEAD.encode(), [0, 0, 0, 3]);
    assert_eq!(ClientFlags::parse(&[0, 0, 0, 3]), Ok(ClientFlags(3)));
    assert_eq!(
        ClientFlags::parse(&[0, 0, 0, 4]),
        Err(NbdError::UnknownClientFlags(4))
    );
}

#[test]
fn starttls_request() {
    let bytes = ClientOption::StartTls.encode();
    assert_eq!(bytes, hex("49484156454f5054 00000005 00000000"));
    let h = OptionHeader::parse(&bytes, MAX_OPTION_DATA).expect("header");
    assert_eq!(ClientOption::parse(&h, &[]), Ok(ClientOption::StartTls));
    let h = OptionHeader {
        option: OPT_STARTTLS,
        length: 1,
    };
    assert_eq!(
        ClientOption::parse(&h, &[0]),
        Err(NbdError::UnexpectedData(OPT_STARTTLS))
    );
}

#[test]
fn go_request_layout() {
    let go = ClientOption::Go(InfoRequest {
        name: ExportName::new("vol-1").expect("name"),
        requests: vec![InfoType::Export, InfoType::BlockSize],
    });
    let bytes = go.encode();
    // header, name length 5, "vol-1", 2 requests: 0 (EXPORT) and 3 (BLOCK_SIZE)
    let want = hex("49484156454f5054 00000007 0000000f 00000005 766f6c2d31 0002 0000 0003");
    assert_eq!(bytes, want);
    let h = OptionHeader::parse(&bytes[..16], MAX_OPTION_DATA).expect("header");
    assert_eq!(h.data_len(), 15);
    assert_eq!(ClientOption::parse(&h, &bytes[16..]), Ok(go));
}

#[test]
fn go_request_bad_counts() {
    let h = |len| OptionHeader {
        option: OPT_GO,
        length: len,
    };
    // Name length past the data.
    let d = hex("00000010 41 0000");
    assert!(matches!(
        ClientOption::parse(&h(7), &d),
        Err(NbdError::Length { .. })
    ));
    // Two requests announced, one present.
    let d = hex("00000001 41 0002 0000");
    assert!(matches!(
        ClientOption::parse(&h(9), &d),
        Err(NbdError::Length { .. })
    ));
    // Name over 4096 bytes.
    let d = hex("00001001");
    assert!(matches!(
        ClientOption::parse(&h(4), &d),
        Err(NbdError::TooLong { .. })
    ));
    // Data shorter than the header announced.
    assert!(matches!(
        ClientOption::parse(&h(9), &d),
        Err(NbdError::Length { .. })
    ));
    // Not UTF-8.
    let d = hex("00000001 ff 0000");
    assert_eq!(ClientOption::parse(&h(7), &d), Err(NbdError::NameNotUtf8));
}

#[test]
fn option_header_cap_and_magic() {
    let big = hex("49484156454f5054 00000007 00100000");
    assert!(matches!(
        OptionHeader::parse(&big, MAX_OPTION_DATA),
        Err(NbdError::TooLong { got: 0x100000, .. })
    ));
    let bad = hex("49484156454f5055 00000007 00000000");
    assert!(matches!(
        OptionHeader::parse(&bad, 10),
        Err(NbdError::BadMagic { .. })
    ));
    let unknown = hex("49484156454f5054 000000ff 00000002");
    let h = OptionHeader::parse(&unknown, 10).expect("header");
    assert_eq!(
        ClientOption::parse(&h, &[1, 2]),
        Ok(ClientOption::Unknown(0xff))
    );
}

#[test]
fn export_name_option() {
    let o = ClientOption::ExportName(ExportName::new("disk").expect("name"));
    let bytes = o.encode();
    assert_eq!(bytes, hex("49484156454f5054 00000001 00000004 6469736b"));
}

#[test]
fn option_reply_layouts() {
    let ack = OptionReply::ack(OPT_STARTTLS).encode();
    assert_eq!(ack, hex("0003e889045565a9 00000005 00000001 00000000"));
    let h = OptionReplyHeader::parse(&ack, MAX_OPTION_REPLY_DATA).expect("ack");
    assert_eq!(h.reply, ReplyType::Ack);
    assert_eq!(h.option, OPT_STARTTLS);

    let info = InfoReply::Export {
        size: 1 << 30,
        flags: TransmissionFlags(FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_TRIM),
    };
    let r = OptionReply::info(OPT_GO, &info).encode();
    assert_eq!(
        r,
        hex("0003e889045565a9 00000007 00000003 0000000c 0000 0000000040000000 0025")
    );
    let h = OptionReplyHeader::parse(&r[..20], MAX_OPTION_REPLY_DATA).expect("info");
    assert_eq!(h.reply, ReplyType::Info);
    let parsed = InfoReply::parse(&r[20..]).expect("export info");
    assert_eq!(parsed, info);
    if let InfoReply::Export { flags, .. } = parsed {
        assert!(flags.flush() && flags.trim() && !flags.read_only() && !flags.write_zeroes());
    }

    let bs = InfoReply::BlockSize {
        min: 1,
        preferred: 4096,
        max: 32 << 20,
    };
    assert_eq!(bs.encode(), hex("0003 00000001 00001000 02000000"));
    assert_eq!(InfoReply::parse(&bs.encode()), Ok(bs));
    // An export info one byte short, or with a trailing byte.
    assert!(InfoReply::parse(&hex("0000 0000000040000000 00")).is_err());
    assert!(InfoReply::parse(&hex("0000 0000000040000000 0025 00")).is_err());
}

#[test]
fn option_reply_errors() {
    let e = OptionReply::error(OPT_GO, OptionError::Policy).encode();
    assert_eq!(e, hex("0003e889045565a9 00000007 80000002 00000000"));
    let h = OptionReplyHeader::parse(&e, 0).expect("err");
    assert_eq!(h.reply, ReplyType::Error(OptionError::Policy));
    for (code, err) in [
        (0x8000_0001, OptionError::Unsup),
        (0x8000_0003, OptionError::Invalid),
        (0x8000_0005, OptionError::TlsReqd),
        (0x8000_0006, OptionError::Unknown),
        (0x8000_0009, OptionError::TooBig),
        (0x8000_0077, OptionError::Other(0x8000_0077)),
    ] {
        assert_eq!(ReplyType::from_code(code), ReplyType::Error(err));
        assert_eq!(err.code(), code);
    }
    assert_eq!(ReplyType::from_code(0x77), ReplyType::Other(0x77));
    let big = hex("0003e889045565a9 00000007 00000003 ffffffff");
    assert!(matches!(
        OptionReplyHeader::parse(&big, MAX_OPTION_REPLY_DATA),
        Err(NbdError::TooLong { .. })
    ));
}

#[test]
fn server_entry() {
    let e = ServerEntry {
        name: ExportName::new("a").expect("name"),
    };
    assert_eq!(e.encode(), hex("00000001 61"));
    assert_eq!(ServerEntry::parse(&hex("00000001 61 6465736372")), Ok(e));
    assert!(ServerEntry::parse(&hex("00000009 61")).is_err());
}

#[test]
fn export_name_reply() {
    let r = ExportNameReply {
        size: 512,
        flags: TransmissionFlags(1),
    };
    assert_eq!(r.encode(true), hex("0000000000000200 0001"));
    assert_eq!(r.encode(false).len(), 134);
    assert_eq!(ExportNameReply::parse(&r.encode(true)), Ok(r));
}

#[test]
fn request_layout() {
    let req = Request {
        flags: CommandFlags(CMD_FLAG_FUA),
        command: Command::Write,
        cookie: Cookie(0x0102030405060708),
        offset: 4096,
        length: 512,
    };
    let bytes = req.encode();
    assert_eq!(
        bytes.to_vec(),
        hex("25609513 0001 0001 0102030405060708 0000000000001000 00000200")
    );
    assert_eq!(Request::parse(&bytes), Ok(req));
    assert_eq!(req.payload_len(), 512);
    assert_eq!(req.validate(8192, MAX_PAYLOAD), Ok(()));
    assert_eq!(req.validate(4096, MAX_PAYLOAD), Err(Errno::NoSpc));
    assert_eq!(req.validate(8192, 256), Err(Errno::Overflow));
    let read = Request {
        command: Command::Read,
        ..req
    };
    assert_eq!(read.payload_len(), 0);
    assert_eq!(read.validate(4096, MAX_PAYLOAD), Err(Errno::Inval));
    let wrap = Request {
        offset: u64::MAX,
        ..read
    };
    assert_eq!(wrap.validate(u64::MAX, MAX_PAYLOAD), Err(Errno::Inval));
    let other = Request {
        command: Command::Other(99),
        ..read
    };
    assert_eq!(other.validate(1 << 20, MAX_PAYLOAD), Err(Errno::Inval));
    let badflag = Request {
        flags: CommandFlags(1 << 9),
        ..read
    };
    assert_eq!(badflag.validate(1 << 20, MAX_PAYLOAD), Err(Errno::Inval));
    for (code, cmd) in [
        (2, Command::Disconnect),
        (3, Command::Flush),
        (4, Command::Trim),
        (6, Command::WriteZeroes),
    ] {
        assert_eq!(Command::from_code(code), cmd);
        assert_eq!(cmd.code(), code);
    }
    let mut bad = bytes;
    bad[0] = 0;
    assert!(matches!(
        Request::parse(&bad),
        Err(NbdError::BadMagic { .. })
    ));
}

#[test]
fn simple_reply_layout() {
    let ok = SimpleReply {
        error: None,
        cookie: Cookie(7),
    };
    assert_eq!(
        ok.encode().to_vec(),
        hex("67446698 00000000 0000000000000007")
    );
    assert_eq!(SimpleReply::parse(&ok.encode()), Ok(ok));
    let eio = hex("67446698 00000005 0000000000000007");
    assert_eq!(
        SimpleReply::parse(&eio),
        Ok(SimpleReply {
            error: Some(Errno::Io),
            cookie: Cookie(7)
        })
    );
    let odd = hex("67446698 000000aa 0000000000000007");
    assert_eq!(
        SimpleReply::parse(&odd).map(|r| r.error),
        Ok(Some(Errno::Other(0xaa)))
    );
    let structured = hex("668e33ef 00000000 0000000000000007");
    assert_eq!(
        SimpleReply::parse(&structured),
        Err(NbdError::StructuredReply)
    );
    assert!(matches!(
        SimpleReply::parse(&eio[..15]),
        Err(NbdError::Length { .. })
    ));
    let bad = hex("deadbeef 00000000 0000000000000007");
    assert_eq!(
        SimpleReply::parse(&bad).map_err(|e| e.code()),
        Err("bad_magic")
    );
}

#[test]
fn fuzz_entry_points_survive_the_vectors() {
    for v in [
        ClientOption::StartTls.encode(),
        hex("0003e889045565a9 00000007 00000003 0000000c 0000 0000000040000000 0025"),
        hex("67446698 00000000 0000000000000007 25609513"),
        Vec::new(),
    ] {
        fuzzing::client_option(&v);
        fuzzing::option_reply(&v);
        fuzzing::simple_reply(&v);
    }
}
