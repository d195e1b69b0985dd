//! Entry points shared by the cargo-fuzz targets (`fuzz/fuzz_targets/`). The parsers must never
//! panic; whatever parses must encode back to the same bytes (or to a value that parses equal).

use crate::*;

/// Option requests as a server reads them: header (capped), then the option's data.
pub fn client_option(data: &[u8]) {
    let (head, rest) = data.split_at(data.len().min(OptionHeader::LEN));
    let _ = ClientFlags::parse(head.get(..4).unwrap_or(head));
    let Ok(h) = OptionHeader::parse(head, consts::MAX_OPTION_DATA) else {
        return;
    };
    if let Ok(opt) = ClientOption::parse(&h, rest) {
        let enc = opt.encode();
        let (eh, ed) = enc.split_at(OptionHeader::LEN.min(enc.len()));
        let h2 = OptionHeader::parse(eh, consts::MAX_OPTION_DATA).expect("own header parses");
        let again = ClientOption::parse(&h2, ed).expect("own option parses");
        assert_eq!(again, opt);
    }
    let _ = Request::parse(data.get(..Request::LEN).unwrap_or(data));
}

/// Option replies and greetings as a client reads them.
pub fn option_reply(data: &[u8]) {
    let _ = ServerGreeting::parse(data.get(..ServerGreeting::LEN).unwrap_or(data));
    let (head, rest) = data.split_at(data.len().min(OptionReplyHeader::LEN));
    let Ok(h) = OptionReplyHeader::parse(head, consts::MAX_OPTION_REPLY_DATA) else {
        return;
    };
    assert_eq!(h.encode().as_slice(), head, "header round trip");
    match h.reply {
        ReplyType::Info => {
            if let Ok(info) = InfoReply::parse(rest) {
                if !matches!(info, InfoReply::Other(_)) {
                    assert_eq!(InfoReply::parse(&info.encode()).as_ref(), Ok(&info));
                }
            }
        }
        ReplyType::Server => {
            let _ = ServerEntry::parse(rest);
        }
        _ => {}
    }
    let _ = ExportNameReply::parse(rest.get(..ExportNameReply::LEN).unwrap_or(rest));
}

/// Transmission replies as a client reads them.
pub fn simple_reply(data: &[u8]) {
    for chunk in data.chunks(SimpleReply::LEN) {
        if let Ok(r) = SimpleReply::parse(chunk) {
            let enc = r.encode();
            assert_eq!(SimpleReply::parse(&enc), Ok(r));
        }
    }
    if let Ok(req) = Request::parse(data.get(..Request::LEN).unwrap_or(data)) {
        let _ = req.validate(1 << 30, consts::MAX_PAYLOAD);
        assert_eq!(Request::parse(&req.encode()), Ok(req));
    }
}
