//! SIP messages: a normalising parser in front of `rsip`, typed accessors, and a builder.
//!
//! `rsip` 0.4 rejects things real providers send (see shared/harness/NOTES.md). Before it sees a
//! datagram we: cap its size and header count; unfold continuation lines; expand compact header
//! names (`v:` → `Via:`); accept bare-LF line ends; honour Content-Length; and swap an unknown
//! request method for a known one while remembering the real one, so the UAS can answer
//! `501 Not Implemented` instead of dropping the request. Header values are then read from our own
//! normalised list (`rsip`'s typed parsers choke on e.g. `qop="auth,auth-int"`).

use std::fmt::Write as _;

/// Largest datagram accepted (and sent): the UDP payload limit.
pub const MAX_MESSAGE_BYTES: usize = 65_507;
/// Most header lines accepted in one message.
pub const MAX_HEADERS: usize = 128;

/// Why a datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    /// Only CRLFs: an RFC 5626 keepalive, not an error worth logging.
    #[error("keepalive")]
    Keepalive,
    /// Bigger than [`MAX_MESSAGE_BYTES`].
    #[error("message larger than 65507 bytes")]
    TooLarge,
    /// No blank line ending the header section.
    #[error("no end of headers")]
    Truncated,
    /// More than [`MAX_HEADERS`] header lines.
    #[error("more than 128 headers")]
    TooManyHeaders,
    /// A header line without a name and colon.
    #[error("header line without a colon")]
    BadHeader,
    /// Content-Length is not a number or exceeds the bytes received.
    #[error("bad Content-Length")]
    BadContentLength,
    /// A mandatory header (Via, From, To, Call-ID, CSeq) is missing or unparsable.
    #[error("missing or malformed {0}")]
    MissingHeader(&'static str),
    /// `rsip` refused the start line or another part.
    #[error("unparsable start line or URI")]
    Rejected,
}

impl ParseError {
    /// Stable label for metrics.
    pub fn code(self) -> &'static str {
        match self {
            ParseError::Keepalive => "keepalive",
            ParseError::TooLarge => "too_large",
            ParseError::Truncated => "truncated",
            ParseError::TooManyHeaders => "too_many_headers",
            ParseError::BadHeader => "bad_header",
            ParseError::BadContentLength => "bad_content_length",
            ParseError::MissingHeader(_) => "missing_header",
            ParseError::Rejected => "rejected",
        }
    }
}

/// RFC 3261 §7.3.3 and the IANA registry: compact form → full name.
fn expand_compact(name: &str) -> Option<&'static str> {
    let full = match name.to_ascii_lowercase().as_str() {
        "v" => "Via",
        "f" => "From",
        "t" => "To",
        "i" => "Call-ID",
        "m" => "Contact",
        "l" => "Content-Length",
        "c" => "Content-Type",
        "e" => "Content-Encoding",
        "k" => "Supported",
        "s" => "Subject",
        "o" => "Event",
        "r" => "Refer-To",
        "b" => "Referred-By",
        "u" => "Allow-Events",
        "x" => "Session-Expires",
        "a" => "Accept-Contact",
        "j" => "Reject-Contact",
        "d" => "Request-Disposition",
        "y" => "Identity",
        _ => return None,
    };
    Some(full)
}

const KNOWN_METHODS: [&str; 14] = [
    "ACK",
    "BYE",
    "CANCEL",
    "INFO",
    "INVITE",
    "MESSAGE",
    "NOTIFY",
    "OPTIONS",
    "PRACK",
    "PUBLISH",
    "REFER",
    "REGISTER",
    "SUBSCRIBE",
    "UPDATE",
];

/// A parsed SIP message.
#[derive(Debug, Clone)]
pub struct Message {
    inner: rsip::SipMessage,
    headers: Vec<(String, String)>,
    unknown_method: Option<String>,
    /// The reason phrase as received (rsip substitutes its own names).
    reason: String,
}

/// The first line of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartLine {
    /// A request: method and Request-URI as written.
    Request {
        /// The method (the real one, even when rsip does not know it).
        method: String,
        /// The Request-URI.
        uri: String,
    },
    /// A response.
    Response {
        /// Status code.
        code: u16,
        /// Reason phrase.
        reason: String,
    },
}

impl Message {
    /// Parses one datagram.
    pub fn parse(datagram: &[u8]) -> Result<Message, ParseError> {
        if datagram.len() > MAX_MESSAGE_BYTES {
            return Err(ParseError::TooLarge);
        }
        let start = datagram
            .iter()
            .position(|b| !matches!(b, b'\r' | b'\n'))
            .ok_or(ParseError::Keepalive)?;
        let data = datagram.get(start..).unwrap_or_default();
        let (head, body) = split_head(data).ok_or(ParseError::Truncated)?;
        let head = std::str::from_utf8(head).map_err(|_| ParseError::Rejected)?;

        let mut lines = head.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
        let first = lines.next().ok_or(ParseError::Truncated)?.trim();
        let mut unknown_method = None;
        let mut first_line = first.to_owned();
        let mut reason = String::new();
        if let Some(status) = first.strip_prefix("SIP/") {
            // "2.0 486 Busy Here"
            let mut parts = status.splitn(3, ' ');
            let _ = (parts.next(), parts.next());
            reason = parts
                .next()
                .unwrap_or_default()
                .trim()
                .chars()
                .take(128)
                .collect();
        } else {
            let (method, rest) = first.split_once(' ').ok_or(ParseError::Rejected)?;
            if method.is_empty()
                || !method
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&b))
            {
                return Err(ParseError::Rejected);
            }
            if !KNOWN_METHODS.contains(&method) {
                unknown_method = Some(method.to_owned());
                first_line = format!("OPTIONS {rest}");
            }
        }

        let mut headers: Vec<(String, String)> = Vec::new();
        for line in lines {
            if line.starts_with([' ', '\t']) {
                // Continuation of the previous header (RFC 3261 §7.3.1): fold into one space.
                let (_, value) = headers.last_mut().ok_or(ParseError::BadHeader)?;
                value.push(' ');
                value.push_str(line.trim());
                continue;
            }
            if line.is_empty() {
                continue;
            }
            let (name, value) = line.split_once(':').ok_or(ParseError::BadHeader)?;
            let name = name.trim();
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(ParseError::BadHeader);
            }
            let name = expand_compact(name).map_or_else(|| name.to_owned(), str::to_owned);
            headers.push((name, value.trim().to_owned()));
            if headers.len() > MAX_HEADERS {
                return Err(ParseError::TooManyHeaders);
            }
        }

        let body = match find(&headers, "Content-Length") {
            Some(v) => {
                let len: usize = v.trim().parse().map_err(|_| ParseError::BadContentLength)?;
                body.get(..len).ok_or(ParseError::BadContentLength)?
            }
            None => body,
        };

        for (mandatory, _) in [
            ("Via", ()),
            ("From", ()),
            ("To", ()),
            ("Call-ID", ()),
            ("CSeq", ()),
        ] {
            if find(&headers, mandatory).is_none() {
                return Err(ParseError::MissingHeader(mandatory));
            }
        }

        let mut normalised = String::with_capacity(head.len() + 64);
        normalised.push_str(&first_line);
        normalised.push_str("\r\n");
        for (n, v) in &headers {
            if n.eq_ignore_ascii_case("Content-Length") {
                continue;
            }
            let _ = write!(normalised, "{n}: {v}\r\n");
        }
        let _ = write!(normalised, "Content-Length: {}\r\n\r\n", body.len());
        let mut bytes = normalised.into_bytes();
        bytes.extend_from_slice(body);
        let inner = rsip::SipMessage::try_from(bytes).map_err(|_| ParseError::Rejected)?;
        let msg = Message {
            inner,
            headers,
            unknown_method,
            reason,
        };
        msg.cseq().ok_or(ParseError::MissingHeader("CSeq"))?;
        msg.top_via().ok_or(ParseError::MissingHeader("Via"))?;
        Ok(msg)
    }

    /// The underlying rsip message.
    pub fn rsip(&self) -> &rsip::SipMessage {
        &self.inner
    }

    /// Whether this is a request.
    pub fn is_request(&self) -> bool {
        self.inner.is_request()
    }

    /// The start line, with the real method.
    pub fn start_line(&self) -> StartLine {
        match &self.inner {
            rsip::SipMessage::Request(r) => StartLine::Request {
                method: self.method().to_owned(),
                uri: r.uri.to_string(),
            },
            rsip::SipMessage::Response(r) => StartLine::Response {
                code: r.status_code.code(),
                reason: self.reason.clone(),
            },
        }
    }

    /// The request method (the real one), or the CSeq method for a response.
    pub fn method(&self) -> &str {
        if let Some(m) = &self.unknown_method {
            return m;
        }
        match &self.inner {
            rsip::SipMessage::Request(r) => method_str(&r.method),
            rsip::SipMessage::Response(_) => self.cseq().map_or("", |(_, m)| m),
        }
    }

    /// Whether the request's method is one callgate does not know (answer 501).
    pub fn unknown_method(&self) -> Option<&str> {
        self.unknown_method.as_deref()
    }

    /// Status code of a response.
    pub fn status(&self) -> Option<u16> {
        match &self.inner {
            rsip::SipMessage::Response(r) => Some(r.status_code.code()),
            rsip::SipMessage::Request(_) => None,
        }
    }

    /// The first value of header `name` (case-insensitive, compact forms already expanded).
    pub fn header(&self, name: &str) -> Option<&str> {
        find(&self.headers, name)
    }

    /// Every value of header `name`, in order; comma-joined lists are not split.
    pub fn headers(&self, name: &str) -> impl Iterator<Item = &str> {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// All headers as (name, value).
    pub fn all_headers(&self) -> &[(String, String)] {
        &self.headers
    }

    /// The body.
    pub fn body(&self) -> &[u8] {
        self.inner.body()
    }

    /// CSeq number and method.
    pub fn cseq(&self) -> Option<(u32, &str)> {
        let (n, m) = self.header("CSeq")?.split_once(char::is_whitespace)?;
        Some((n.trim().parse().ok()?, m.trim()))
    }

    /// The Call-ID.
    pub fn call_id(&self) -> Option<&str> {
        self.header("Call-ID")
    }

    /// The topmost Via.
    pub fn top_via(&self) -> Option<Via> {
        Via::parse(first_list_item(self.header("Via")?))
    }

    /// `tag` parameter of From.
    pub fn from_tag(&self) -> Option<&str> {
        tag_param(self.header("From")?)
    }

    /// `tag` parameter of To.
    pub fn to_tag(&self) -> Option<&str> {
        tag_param(self.header("To")?)
    }
}

fn method_str(m: &rsip::Method) -> &'static str {
    match m {
        rsip::Method::Ack => "ACK",
        rsip::Method::Bye => "BYE",
        rsip::Method::Cancel => "CANCEL",
        rsip::Method::Info => "INFO",
        rsip::Method::Invite => "INVITE",
        rsip::Method::Message => "MESSAGE",
        rsip::Method::Notify => "NOTIFY",
        rsip::Method::Options => "OPTIONS",
        rsip::Method::PRack => "PRACK",
        rsip::Method::Publish => "PUBLISH",
        rsip::Method::Refer => "REFER",
        rsip::Method::Register => "REGISTER",
        rsip::Method::Subscribe => "SUBSCRIBE",
        rsip::Method::Update => "UPDATE",
    }
}

fn find<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn split_head(data: &[u8]) -> Option<(&[u8], &[u8])> {
    if let Some(i) = data.windows(4).position(|w| w == b"\r\n\r\n") {
        return Some((data.get(..i)?, data.get(i + 4..)?));
    }
    // Bare LF line ends (seen from some embedded devices).
    let i = data.windows(2).position(|w| w == b"\n\n")?;
    Some((data.get(..i)?, data.get(i + 2..)?))
}

/// `%XX` decoding, once, of a URI part (RFC 3261 §19.1.1-2: a header value, a user part);
/// `None` if an escape is broken or the bytes are not UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if c == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(c);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Splits a header value at top-level commas (not inside quotes or `<>`).
pub fn split_list(value: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut quoted, mut angle, mut escaped, mut start) = (false, false, false, 0);
    for (i, c) in value.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '<' if !quoted => angle = true,
            '>' if !quoted => angle = false,
            ',' if !quoted && !angle => {
                out.push(value.get(start..i).unwrap_or_default().trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(value.get(start..).unwrap_or_default().trim());
    out.retain(|s| !s.is_empty());
    out
}

fn first_list_item(value: &str) -> &str {
    split_list(value).into_iter().next().unwrap_or(value)
}

/// The header parameters of a name-addr value (`"Bob" <sip:b@x;uriparam>;tag=1;expires=60`):
/// the `;k=v` pairs after the closing `>` (or after the URI when there are no brackets).
pub fn header_params(value: &str) -> Vec<(&str, Option<&str>)> {
    let after = match value.rfind('>') {
        Some(i) => value.get(i + 1..).unwrap_or_default(),
        None => value.split_once(';').map_or("", |(_, p)| p),
    };
    after
        .split(';')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim().trim_matches('"'))),
            None => (p, None),
        })
        .collect()
}

/// A named header parameter (case-insensitive name).
pub fn header_param<'a>(value: &'a str, name: &str) -> Option<Option<&'a str>> {
    header_params(value)
        .into_iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
}

fn tag_param(value: &str) -> Option<&str> {
    header_param(value, "tag").flatten()
}

/// The URI inside a name-addr (`<...>`) or the addr-spec before any header parameter.
pub fn name_addr_uri(value: &str) -> &str {
    match (value.find('<'), value.rfind('>')) {
        (Some(a), Some(b)) if a < b => value.get(a + 1..b).unwrap_or_default(),
        _ => value.split(';').next().unwrap_or(value).trim(),
    }
}

/// A Via header value (RFC 3261 §20.42), the parts callgate needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Via {
    /// Transport (`UDP`).
    pub transport: String,
    /// sent-by host.
    pub host: String,
    /// sent-by port.
    pub port: Option<u16>,
    /// `branch` parameter.
    pub branch: Option<String>,
    /// `received` parameter.
    pub received: Option<String>,
    /// `rport` parameter: `Some(None)` when present without a value.
    pub rport: Option<Option<u16>>,
}

/// RFC 3261 branch magic cookie.
pub const BRANCH_COOKIE: &str = "z9hG4bK";

impl Via {
    /// Parses one Via value.
    pub fn parse(value: &str) -> Option<Via> {
        let (proto, rest) = value.trim().split_once(char::is_whitespace)?;
        let mut parts = proto.split('/');
        let (name, _version, transport) = (parts.next()?, parts.next()?, parts.next()?);
        if !name.trim().eq_ignore_ascii_case("SIP") {
            return None;
        }
        let mut params = rest.split(';');
        let sent_by = params.next()?.trim();
        let (host, port) = if let Some(v6) = sent_by.strip_prefix('[') {
            let (h, p) = v6.split_once(']')?;
            (format!("[{h}]"), p.strip_prefix(':'))
        } else {
            match sent_by.split_once(':') {
                Some((h, p)) => (h.to_owned(), Some(p)),
                None => (sent_by.to_owned(), None),
            }
        };
        let port = match port {
            Some(p) => Some(p.trim().parse().ok()?),
            None => None,
        };
        let mut via = Via {
            transport: transport.trim().to_ascii_uppercase(),
            host,
            port,
            branch: None,
            received: None,
            rport: None,
        };
        for p in params {
            let (k, v) = match p.split_once('=') {
                Some((k, v)) => (k.trim(), Some(v.trim())),
                None => (p.trim(), None),
            };
            match k.to_ascii_lowercase().as_str() {
                "branch" => via.branch = v.map(str::to_owned),
                "received" => via.received = v.map(str::to_owned),
                "rport" => via.rport = Some(v.and_then(|v| v.parse().ok())),
                _ => {}
            }
        }
        Some(via)
    }
}

/// Builds an outgoing message: start line, headers in order, Content-Length, body.
#[derive(Debug, Clone)]
pub struct Builder {
    start: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Builder {
    /// A request.
    pub fn request(method: &str, uri: &str) -> Builder {
        Builder {
            start: format!("{method} {uri} SIP/2.0"),
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// A response.
    pub fn response(code: u16, reason: &str) -> Builder {
        Builder {
            start: format!("SIP/2.0 {code} {reason}"),
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// Adds a header. Values are ours or copied from a parsed message, never raw peer bytes
    /// with line breaks (the parser already removed those).
    pub fn header(mut self, name: &str, value: impl Into<String>) -> Builder {
        let value: String = value.into();
        let value = value.replace(['\r', '\n'], " ");
        self.headers.push((name.to_owned(), value));
        self
    }

    /// Sets the body and its Content-Type.
    pub fn body(mut self, content_type: &str, body: Vec<u8>) -> Builder {
        self = self.header("Content-Type", content_type);
        self.body = body;
        self
    }

    /// The wire bytes.
    pub fn build(self) -> Vec<u8> {
        let mut s = String::with_capacity(256 + self.headers.len() * 48);
        s.push_str(&self.start);
        s.push_str("\r\n");
        for (n, v) in &self.headers {
            let _ = write!(s, "{n}: {v}\r\n");
        }
        let _ = write!(s, "Content-Length: {}\r\n\r\n", self.body.len());
        let mut out = s.into_bytes();
        out.extend_from_slice(&self.body);
        out
    }

    /// Builds and parses back (for callers that want a [`Message`]).
    pub fn into_message(self) -> Result<Message, ParseError> {
        Message::parse(&self.build())
    }
}

/// A response to `req` with its Via, From, To (adding `to_tag` if given and absent), Call-ID and
/// CSeq copied (RFC 3261 §8.2.6.2).
pub fn response_to(req: &Message, code: u16, reason: &str, to_tag: Option<&str>) -> Builder {
    let mut b = Builder::response(code, reason);
    for v in req.headers("Via") {
        b = b.header("Via", v);
    }
    if let Some(f) = req.header("From") {
        b = b.header("From", f);
    }
    if let Some(t) = req.header("To") {
        let t = match (to_tag, req.to_tag()) {
            (Some(tag), None) => format!("{t};tag={tag}"),
            _ => t.to_owned(),
        };
        b = b.header("To", t);
    }
    if let Some(c) = req.call_id() {
        b = b.header("Call-ID", c);
    }
    if let Some(c) = req.header("CSeq") {
        b = b.header("CSeq", c);
    }
    b
}

#[cfg(test)]
mod tests;
