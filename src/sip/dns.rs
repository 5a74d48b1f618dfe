//! DNS SRV lookups for RFC 3263 server location (`_sip._udp.<domain>`), sans-IO core plus a thin
//! UDP shell. A/AAAA lookups use the system resolver; only SRV needs this.

use std::net::SocketAddr;
use std::time::Duration;

/// Longest DNS name.
const MAX_NAME: usize = 255;
/// Most compression pointers followed in one name (loops are refused).
const MAX_JUMPS: usize = 32;

/// Why a lookup failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DnsError {
    /// The name cannot be put in a query.
    #[error("invalid DNS name")]
    BadName,
    /// The answer is malformed or not for our query.
    #[error("malformed DNS answer")]
    Malformed,
    /// The server reported an error (RCODE other than NXDOMAIN).
    #[error("DNS server error (rcode {0})")]
    Server(u8),
    /// No answer in time / network error.
    #[error("DNS server did not answer")]
    Timeout,
}

/// One SRV record (RFC 2782).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Srv {
    /// Lower is tried first.
    pub priority: u16,
    /// Relative weight within a priority.
    pub weight: u16,
    /// Port.
    pub port: u16,
    /// Target host (no trailing dot).
    pub target: String,
}

/// A recursive query for `name`'s SRV records.
pub fn srv_query(id: u16, name: &str) -> Result<Vec<u8>, DnsError> {
    let mut q = Vec::with_capacity(name.len() + 18);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD; QDCOUNT=1
    let name = name.trim_end_matches('.');
    if name.is_empty() || name.len() > MAX_NAME - 2 {
        return Err(DnsError::BadName);
    }
    for label in name.split('.') {
        let len = u8::try_from(label.len()).map_err(|_| DnsError::BadName)?;
        if len == 0 || len > 63 {
            return Err(DnsError::BadName);
        }
        q.push(len);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&[0, 33, 0, 1]); // QTYPE=SRV, QCLASS=IN
    Ok(q)
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn u8(&mut self) -> Result<u8, DnsError> {
        let b = *self.data.get(self.pos).ok_or(DnsError::Malformed)?;
        self.pos += 1;
        Ok(b)
    }
    fn u16(&mut self) -> Result<u16, DnsError> {
        Ok(u16::from(self.u8()?) << 8 | u16::from(self.u8()?))
    }
    fn skip(&mut self, n: usize) -> Result<(), DnsError> {
        let end = self.pos.checked_add(n).ok_or(DnsError::Malformed)?;
        if end > self.data.len() {
            return Err(DnsError::Malformed);
        }
        self.pos = end;
        Ok(())
    }
    /// Reads a (possibly compressed) name starting here; leaves `pos` after it.
    fn name(&mut self) -> Result<String, DnsError> {
        let mut out = String::new();
        let mut pos = self.pos;
        let mut jumped = false;
        let mut jumps = 0;
        loop {
            let len = *self.data.get(pos).ok_or(DnsError::Malformed)?;
            match len {
                0 => {
                    if !jumped {
                        self.pos = pos + 1;
                    }
                    return Ok(out);
                }
                l if l & 0xC0 == 0xC0 => {
                    let lo = *self.data.get(pos + 1).ok_or(DnsError::Malformed)?;
                    if !jumped {
                        self.pos = pos + 2;
                    }
                    jumped = true;
                    jumps += 1;
                    if jumps > MAX_JUMPS {
                        return Err(DnsError::Malformed);
                    }
                    pos = usize::from(l & 0x3F) << 8 | usize::from(lo);
                }
                l if l <= 63 => {
                    let label = self
                        .data
                        .get(pos + 1..pos + 1 + usize::from(l))
                        .ok_or(DnsError::Malformed)?;
                    if !out.is_empty() {
                        out.push('.');
                    }
                    out.push_str(std::str::from_utf8(label).map_err(|_| DnsError::Malformed)?);
                    if out.len() > MAX_NAME {
                        return Err(DnsError::Malformed);
                    }
                    pos += 1 + usize::from(l);
                }
                _ => return Err(DnsError::Malformed),
            }
        }
    }
}

/// Parses the answer to [`srv_query`] with `id`. NXDOMAIN and "no records" give an empty list.
pub fn parse_srv_answer(id: u16, data: &[u8]) -> Result<Vec<Srv>, DnsError> {
    let mut r = Reader { data, pos: 0 };
    if r.u16()? != id {
        return Err(DnsError::Malformed);
    }
    let flags = r.u16()?;
    if flags & 0x8000 == 0 {
        return Err(DnsError::Malformed); // not a response
    }
    match (flags & 0x000F) as u8 {
        0 => {}
        3 => return Ok(Vec::new()),
        rc => return Err(DnsError::Server(rc)),
    }
    let (qd, an) = (r.u16()?, r.u16()?);
    r.skip(4)?; // NSCOUNT, ARCOUNT
    for _ in 0..qd {
        r.name()?;
        r.skip(4)?;
    }
    let mut out = Vec::new();
    for _ in 0..an.min(64) {
        r.name()?;
        let (rtype, _class) = (r.u16()?, r.u16()?);
        r.skip(4)?; // TTL
        let rdlen = usize::from(r.u16()?);
        let rd_start = r.pos;
        if rtype == 33 {
            let priority = r.u16()?;
            let weight = r.u16()?;
            let port = r.u16()?;
            let target = r.name()?;
            // "." means: no service here (RFC 2782).
            if !target.is_empty() && port != 0 {
                out.push(Srv {
                    priority,
                    weight,
                    port,
                    target,
                });
            }
        }
        r.pos = rd_start;
        r.skip(rdlen)?;
    }
    Ok(out)
}

/// RFC 2782 order: by priority, and within one priority a weighted random pick (`pick` returns
/// a number in `0..=total` from the caller's randomness).
pub fn order(mut records: Vec<Srv>, mut pick: impl FnMut(u32) -> u32) -> Vec<Srv> {
    records.sort_by_key(|r| r.priority);
    let mut out = Vec::with_capacity(records.len());
    while !records.is_empty() {
        let prio = records.first().map_or(0, |r| r.priority);
        let mut group: Vec<Srv> = Vec::new();
        records.retain(|r| {
            if r.priority == prio {
                group.push(r.clone());
                false
            } else {
                true
            }
        });
        // Zero weights first, as RFC 2782 asks, so they have a (small) chance.
        group.sort_by_key(|r| r.weight != 0);
        while !group.is_empty() {
            let total: u32 = group.iter().map(|r| u32::from(r.weight)).sum();
            let n = pick(total).min(total);
            let mut acc = 0;
            let idx = group
                .iter()
                .position(|r| {
                    acc += u32::from(r.weight);
                    acc >= n
                })
                .unwrap_or(0);
            out.push(group.remove(idx));
        }
    }
    out
}

/// The first `nameserver` of `/etc/resolv.conf`.
pub fn system_nameserver() -> Option<SocketAddr> {
    let text = std::fs::read_to_string("/etc/resolv.conf").ok()?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|ip| ip.trim().parse::<std::net::IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .next()
}

/// Asks `server` for `name`'s SRV records (two tries within `timeout`).
pub async fn lookup_srv(
    server: SocketAddr,
    name: &str,
    timeout: Duration,
) -> Result<Vec<Srv>, DnsError> {
    let bind: SocketAddr = if server.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let sock = tokio::net::UdpSocket::bind(bind)
        .await
        .map_err(|_| DnsError::Timeout)?;
    sock.connect(server).await.map_err(|_| DnsError::Timeout)?;
    // An unpredictable query id is the guard against spoofed answers (RFC 5452 §4.3).
    let id = u16::from_be_bytes(crate::rand::bytes().map_err(|_| DnsError::Timeout)?);
    let query = srv_query(id, name)?;
    let mut buf = vec![0u8; 4096];
    for _ in 0..2 {
        sock.send(&query).await.map_err(|_| DnsError::Timeout)?;
        let deadline = tokio::time::Instant::now() + timeout / 2;
        loop {
            match tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
                Ok(Ok(n)) => match parse_srv_answer(id, buf.get(..n).unwrap_or_default()) {
                    // Someone else's datagram (wrong id): keep waiting.
                    Err(DnsError::Malformed) => continue,
                    other => return other,
                },
                Ok(Err(_)) => return Err(DnsError::Timeout),
                Err(_) => break,
            }
        }
    }
    Err(DnsError::Timeout)
}

/// Builds an SRV answer (for tests and the test DNS responder).
pub fn build_srv_answer(query: &[u8], records: &[Srv]) -> Option<Vec<u8>> {
    let mut r = Reader {
        data: query,
        pos: 12,
    };
    r.name().ok()?;
    r.skip(4).ok()?;
    let question = query.get(12..r.pos)?;
    let mut out = Vec::new();
    out.extend_from_slice(query.get(..2)?);
    out.extend_from_slice(&[0x81, 0x80, 0, 1]);
    out.extend_from_slice(&u16::try_from(records.len()).ok()?.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(question);
    for rec in records {
        out.extend_from_slice(&[0xC0, 12, 0, 33, 0, 1, 0, 0, 0, 60]);
        let mut rdata = Vec::new();
        rdata.extend_from_slice(&rec.priority.to_be_bytes());
        rdata.extend_from_slice(&rec.weight.to_be_bytes());
        rdata.extend_from_slice(&rec.port.to_be_bytes());
        for label in rec.target.split('.').filter(|l| !l.is_empty()) {
            rdata.push(u8::try_from(label.len()).ok()?);
            rdata.extend_from_slice(label.as_bytes());
        }
        rdata.push(0);
        out.extend_from_slice(&u16::try_from(rdata.len()).ok()?.to_be_bytes());
        out.extend_from_slice(&rdata);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn srv(p: u16, w: u16, port: u16, t: &str) -> Srv {
        Srv {
            priority: p,
            weight: w,
            port,
            target: t.into(),
        }
    }

    #[test]
    fn query_answer_round_trip() {
        let q = srv_query(0x1234, "_sip._udp.example.com").unwrap();
        let recs = vec![
            srv(10, 60, 5060, "a.example.com"),
            srv(20, 0, 5080, "b.example.com"),
        ];
        let a = build_srv_answer(&q, &recs).unwrap();
        assert_eq!(parse_srv_answer(0x1234, &a).unwrap(), recs);
        assert_eq!(parse_srv_answer(0x1235, &a), Err(DnsError::Malformed));
    }

    #[test]
    fn nxdomain_and_errors() {
        let q = srv_query(7, "_sip._udp.nowhere.test").unwrap();
        let mut a = build_srv_answer(&q, &[]).unwrap();
        a[3] = 0x83;
        assert_eq!(parse_srv_answer(7, &a), Ok(vec![]));
        a[3] = 0x82;
        assert_eq!(parse_srv_answer(7, &a), Err(DnsError::Server(2)));
        assert_eq!(srv_query(1, ""), Err(DnsError::BadName));
        assert_eq!(srv_query(1, &"a".repeat(64)), Err(DnsError::BadName));
    }

    #[test]
    fn compression_loops_and_truncation_are_refused() {
        let q = srv_query(9, "_sip._udp.x.test").unwrap();
        let a = build_srv_answer(&q, &[srv(1, 1, 5060, "t.test")]).unwrap();
        for cut in 0..a.len() {
            let _ = parse_srv_answer(9, &a[..cut]);
        }
        // An answer whose name points at itself.
        let mut looped = a.clone();
        let at = q.len();
        looped[at] = 0xC0;
        looped[at + 1] = u8::try_from(at).unwrap();
        assert_eq!(parse_srv_answer(9, &looped), Err(DnsError::Malformed));
    }

    #[test]
    fn rfc2782_order() {
        let recs = vec![srv(20, 0, 1, "c"), srv(10, 1, 2, "a"), srv(10, 99, 3, "b")];
        let got = order(recs.clone(), |total| total);
        assert_eq!(
            got.iter().map(|r| r.target.as_str()).collect::<Vec<_>>(),
            ["b", "a", "c"]
        );
        let got = order(recs, |_| 1);
        assert_eq!(got[0].target, "a");
        assert_eq!(got[2].target, "c");
    }
}
